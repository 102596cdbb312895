"""The analog update as ``torch.library`` ops: one op per algorithm, a kernel per device.

Every algorithm of ``reference.ALGORITHMS`` gets its op, whose schema follows from its
declaration (``op_lists``): its arrays (``Algorithm.arrays``, then ``Wbar`` with a residual),
``g``, ``A``, its pulse outputs and the common arguments. Today's ops (schemas defined here,
so they exist whether or not the compiled library is built)::

    fastanalog::asgd_step(Tensor(a!)[] W, Tensor[] g, Tensor[] A, Tensor(b!)[] pulses, Tensor(c!)[] pairs, <common>)
    fastanalog::rl_step(Tensor(a!)[] W, Tensor(b!)[] P, Tensor(c!)[] Wbar, Tensor[] g, Tensor[] A,
                        Tensor(d!)[] pulses_p, Tensor(e!)[] pairs_p, Tensor(f!)[] pulses_w, <common>)
    fastanalog::rl2_step(Tensor(a!)[] W, Tensor(b!)[] P, Tensor(c!)[] H, Tensor(d!)[] Wbar, Tensor[] g, Tensor[] A,
                         Tensor(e!)[] pulses_p, Tensor(f!)[] pairs_p, Tensor(g!)[] pulses_w, <common>)
    <common> = int[] keys, int[] offsets, int[] tensor_ids, float[] step, float[] devices, float[] tables, int[] seeds

Each steps a group of flat, contiguous tensors of one config, arrays updated in place;
index ``i`` of every list belongs to tensor ``i`` (``A``: empty, no excess, or every
tensor's per-sample |g| sums; ``Wbar``: empty, no mixed weight written, or one per tensor).
``keys[i]`` is tensor ``i``'s step key, ``offsets[i]`` the global index of its element 0,
``tensor_ids[i]`` its id (it keys the device-to-device draw with the seeds). ``step``,
``devices``, ``tables`` and ``seeds`` are the config packed in the layout of
``fastanalog.ops.packing`` (``pack_op_config``, ``step_floats``; csrc/op_layout.h is its C++
copy). A pulse output ``pulses*[i]`` is empty (not reported), int32 of the tensor's size (net
counts ``N_up - N_down`` per element) or a one-element int64 to which the array's total
``sum(N_up + N_down)`` is added; ``pairs*`` is empty or int32 per element (the first write's
``min(N_up, N_down)``, only with ``A`` and per-element counts). ``pulses_w[i]`` of an rl step
without transfer is left alone.

Kernels, by the device of the tensors:

* CPU: the C++ kernels (``csrc/analog_update.cpp``) for float32/bfloat16/float16 arrays,
  the reference otherwise or where the compiled library is unavailable;
* CUDA: the Triton kernels (``fastanalog.ops.triton``), else the CUDA kernels
  (``csrc/cuda/analog_update.cu``), else the reference;
* any other device: the reference (``fastanalog.ops.reference``).

The C++ and CUDA kernels are one private op, ``fastanalog::_native_step`` (the algorithm's
id first, then the arguments of the three ops in one list form), whose CPU and CUDA kernels
the compiled library registers. ``FASTANALOG_BACKEND=reference|cpp|cuda|triton`` makes every
step take that implementation (``cpp``: the C++ CPU kernels, ``cuda``: the .cu kernels), and
fails with a clear error where it cannot serve the tensors. An algorithm whose declaration
leaves a backend out of ``Algorithm.backends`` (its kernel not written yet) takes the
reference where that backend would be the default.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import warnings
from collections.abc import Iterator, Sequence

import torch

from . import packing, reference
from .reference import StepPulses

BACKENDS = ("reference", "cpp", "cuda", "triton")
# The storage dtypes of the compiled kernels; other float arrays (float64) take the reference.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The oldest Triton whose tl.randint4x is SPEC section 4's generator: Philox4x32-10 keyed by
# the seed's two 32-bit halves, counter (offset low, offset high, 0, 0) for int64 offsets
# (tests/test_philox.py checks it bit for bit, across the counter's 2^32 boundary).
MIN_TRITON = (3, 0)
ALGORITHMS = tuple(reference.ALGORITHMS)

# The ops' list arguments: (name in the op, name in ``_native_step``, written). An algorithm's op
# takes its arrays (``Algorithm.arrays``, then Wbar with a residual), g, A and its pulse outputs.
_FIRST_OUTPUTS = (("pulses", "pulses_first", True), ("pairs", "pairs_first", True))
_RESIDUAL_OUTPUTS = (("pulses_p", "pulses_first", True), ("pairs_p", "pairs_first", True), ("pulses_w", "pulses_main", True))
# The lists of ``_native_step`` after the algorithm's id, in its order (absent lists empty).
NATIVE_LISTS = ("W", "P", "H", "Wbar", "g", "A", "pulses_first", "pairs_first", "pulses_main")
# SPEC's array names -> the keys of a layer's ``analog_state()`` (and the stored mixed weight's role).
STATE_NAMES = {"W": "main", "P": "residual", "H": "buffer", "Wbar": "weight"}
_COMMON_NAMES = ("keys", "offsets", "tensor_ids", "step", "devices", "tables", "seeds")
_COMMON = "int[] keys, int[] offsets, int[] tensor_ids, float[] step, float[] devices, float[] tables, int[] seeds) -> ()"


def op_lists(algorithm: str) -> tuple[tuple[str, str, bool], ...]:
    """The list arguments of ``algorithm``'s op: (name, ``_native_step`` name, written) each, in order."""
    spec = reference.algorithm(algorithm)
    outputs = _RESIDUAL_OUTPUTS if spec.residual else _FIRST_OUTPUTS
    return tuple((n, n, True) for n in spec.op_arrays) + (("g", "g", False), ("A", "A", False)) + outputs


def _schema(lists: Sequence[tuple[str, str, bool]]) -> str:
    aliases = iter("abcdefghijklmnopqrstuvwxyz")
    return "(" + "".join(f"Tensor({next(aliases)}!)[] {n}, " if written else f"Tensor[] {n}, " for n, _, written in lists) + _COMMON


SCHEMAS = {f"{name}_step": _schema(op_lists(name)) for name in reference.ALGORITHMS}
SCHEMAS["_native_step"] = "(int algorithm, " + _schema([(n, n, n not in ("g", "A")) for n in NATIVE_LISTS])[1:]

_lib = torch.library.Library("fastanalog", "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)


# ----- which implementation serves a tensor ---------------------------------------------------
def triton_version_ok(version: str) -> bool:
    """Whether Triton ``version`` (e.g. ``"3.8.0"``, ``"3.1.0+git..."``) is at least ``MIN_TRITON``."""
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts) >= MIN_TRITON


@functools.cache
def triton_usable() -> bool:
    """Whether the Triton kernels import here (a Triton of at least ``MIN_TRITON``); warns once when it is too old."""
    try:
        import triton
    except ImportError:
        return False
    if not triton_version_ok(triton.__version__):
        warnings.warn(
            f"fastanalog: triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, whose "
            "tl.randint4x the kernels rely on; the Triton backend is off (pip install 'triton>=3.0')",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    try:
        importlib.import_module(".triton", __package__)
    except ImportError:
        return False
    return True


def _available(name: str) -> bool:
    if name == "reference":
        return True
    if name in ("cpp", "cuda"):
        from . import cpp

        return cpp.cpp_available() if name == "cpp" else cpp.cuda_available()
    if name == "triton":
        return triton_usable()
    raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


def backend_available(name: str) -> bool:
    """Whether implementation ``name`` (of ``BACKENDS``) is usable on this machine."""
    return _available(name)


def available_backends() -> list[str]:
    """Names of the implementations usable on this machine (of ``BACKENDS``)."""
    return [n for n in BACKENDS if _available(n)]


def _serves(name: str, t: torch.Tensor) -> bool:
    if name == "reference":
        return True
    if t.dtype not in KERNEL_DTYPES:
        return False
    if name == "cpp":
        return t.device.type == "cpu"
    if name == "cuda":
        return t.device.type == "cuda"
    # triton: CUDA tensors, or CPU tensors under the interpreter
    return t.device.type == "cuda" or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


_noticed: set[torch.dtype] = set()
# (name, any_device) of ``use_backend``, which takes precedence over FASTANALOG_BACKEND.
_override: contextvars.ContextVar[tuple[str, bool] | None] = contextvars.ContextVar("fastanalog_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str, *, any_device: bool = False) -> Iterator[None]:
    """Within the block, every step takes implementation ``name`` (as ``FASTANALOG_BACKEND=name``, which it overrides).

    For tests and benchmarks of one implementation. ``any_device=True`` skips the check that
    ``name`` serves the tensors' device and dtype (e.g. to record Triton launches on CPU
    tensors without running them).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    token = _override.set((name, any_device))
    try:
        yield
    finally:
        _override.reset(token)


def backend_for(tensor: torch.Tensor, algorithm: str | None = None) -> str:
    """The implementation that updates ``tensor``'s arrays: ``FASTANALOG_BACKEND``, else the device's default.

    With ``algorithm``, a default backend that has no kernel for it (``Algorithm.backends``)
    gives way to the reference. Raises where ``FASTANALOG_BACKEND`` names no backend, one not
    available here, one that cannot serve ``tensor``, or one without ``algorithm``'s kernel.
    """
    backends = reference.algorithm(algorithm).backends if algorithm is not None else BACKENDS
    override = _override.get()
    forced = override[0] if override else os.environ.get("FASTANALOG_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"FASTANALOG_BACKEND={forced!r} is not a backend: choose one of {', '.join(BACKENDS)}")
        if not _available(forced):
            raise RuntimeError(
                f"FASTANALOG_BACKEND={forced!r} is not available on this machine (available: "
                f"{', '.join(available_backends())}); unset it or build the backend"
            )
        if not (override and override[1]) and not _serves(forced, tensor):
            raise RuntimeError(
                f"FASTANALOG_BACKEND={forced!r} cannot update a {tensor.device.type} {tensor.dtype} tensor (its kernels store "
                "float32, bfloat16 or float16); unset it, or move or cast the model"
            )
        if forced not in backends:
            raise RuntimeError(
                f"FASTANALOG_BACKEND={forced!r} has no kernel for the algorithm {algorithm!r} (it runs on "
                f"{', '.join(backends)}); unset it or choose one of those"
            )
        return forced
    order = ("triton", "cuda") if tensor.device.type == "cuda" else ("cpp",) if tensor.device.type == "cpu" else ()
    for name in order:
        if name in backends and _serves(name, tensor) and _available(name):
            return name
    if tensor.dtype not in KERNEL_DTYPES and tensor.dtype not in _noticed:
        _noticed.add(tensor.dtype)
        warnings.warn(
            f"fastanalog: {tensor.dtype} analog arrays are updated by the reference backend (plain PyTorch, slower): "
            "the compiled kernels store float32, bfloat16 or float16. The update math is float32 either way.",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


# ----- the kernels registered for the ops -------------------------------------------------------
def _lists(algorithm: str, args: tuple) -> dict:
    """The arguments of ``algorithm``'s op by name, in the one form of ``_native_step`` (absent lists empty)."""
    lists = op_lists(algorithm)
    a: dict = {name: [] for name in NATIVE_LISTS}
    for (_, native, _), value in zip(lists, args):
        a[native] = value
    a.update(zip(_COMMON_NAMES, args[len(lists) :]))
    return a


def _check(algorithm: str, a: dict) -> None:
    """List lengths and per-tensor sizes and dtypes (``torch._check``: also on fake tensors)."""
    m = len(a["W"])
    spec = reference.ALGORITHMS[algorithm]
    residual = spec.residual
    required = {"g": a["g"], "pulses_first": a["pulses_first"], "keys": a["keys"], "offsets": a["offsets"], "tensor_ids": a["tensor_ids"]}
    required.update({n: a[n] for n in spec.arrays if n != "W"})
    if residual:
        required["pulses_main"] = a["pulses_main"]
    optional = {"A": a["A"], "pairs_first": a["pairs_first"], "Wbar": a["Wbar"]}
    for name, values in required.items():
        torch._check(len(values) == m, lambda name=name, values=values: f"{name} has {len(values)} entries for {m} tensors")
    for name, values in optional.items():
        torch._check(len(values) in (0, m), lambda name=name, values=values: f"{name} has {len(values)} entries for {m} tensors (or give none)")
    k = 2 if residual else 1
    torch._check(len(a["step"]) == len(packing.STEP_FIELDS), lambda: f"step must have {len(packing.STEP_FIELDS)} scalars (packing.STEP_FIELDS), got {len(a['step'])}")
    torch._check(len(a["devices"]) == k * len(packing.DEVICE_FIELDS), lambda: f"devices must hold {k} device description(s) of {len(packing.DEVICE_FIELDS)} floats, got {len(a['devices'])}")
    torch._check(len(a["seeds"]) == k, lambda: f"seeds must hold {k} variation seed(s), got {len(a['seeds'])}")
    for i in range(m):
        w = a["W"][i]
        torch._check(w.dtype.is_floating_point, lambda w=w, i=i: f"W[{i}] must be a floating tensor, got {w.dtype}")
        arrays = [("g", a["g"][i])] + [(n, a[n][i]) for n in ("P", "H", "Wbar", "A") if a[n]]
        for name, t in arrays:
            torch._check(t.numel() == w.numel(), lambda name=name, t=t, i=i, w=w: f"{name}[{i}] has {t.numel()} elements but W[{i}] has {w.numel()}")
            torch._check(t.dtype.is_floating_point, lambda name=name, t=t, i=i: f"{name}[{i}] must be a floating tensor, got {t.dtype}")
            torch._check(t.device == w.device, lambda name=name, t=t, i=i, w=w: f"{name}[{i}] is on {t.device} but W[{i}] is on {w.device}")
        for name, t in [(n, a[n][i]) for n in ("P", "H", "Wbar") if a[n]]:
            torch._check(t.dtype == w.dtype, lambda name=name, t=t, i=i, w=w: f"{name}[{i}] has dtype {t.dtype} but W[{i}] has {w.dtype}")
        for name in ("pulses_first", "pulses_main", "pairs_first"):
            if not a[name]:
                continue
            p = a[name][i]
            ok = p.numel() == 0 or (p.dtype == torch.int32 and p.numel() == w.numel()) or (p.dtype == torch.int64 and p.numel() == 1 and name != "pairs_first")
            torch._check(ok, lambda name=name, p=p, i=i: f"{name}[{i}] must be empty, int32 per element or (pulses) one int64 total, got {p.dtype} of {p.numel()} elements")  # fmt: skip


def _native(algorithm: str, a: dict) -> None:
    torch.ops.fastanalog._native_step(packing.ALGORITHM_IDS[algorithm], *a.values())


def _report(out: torch.Tensor, counts: torch.Tensor | None, pairs: torch.Tensor | None = None) -> None:
    """Write one array's pulses into its op output (see the module docstring)."""
    if out.numel() == 0 or counts is None:
        return
    if out.dtype == torch.int64:
        out.view(()).add_(reference.pulse_total(counts, pairs).to(out.device))
    else:
        out.copy_(counts.reshape(-1))


def _python(algorithm: str, a: dict, backend: str) -> None:
    """The reference or the Triton launchers (which take configs) on the op's arguments."""
    m = len(a["W"])
    if m == 0:
        return
    spec = reference.ALGORITHMS[algorithm]
    config = packing.unpack_op_config(algorithm, tuple(a["step"]), tuple(a["devices"]), tuple(a["tables"]), tuple(a["seeds"]))
    flag = bool(a["step"][packing.STEP_FIELDS.index("flag")])
    lr = float(a["step"][packing.STEP_FIELDS.index("lr")])
    names = spec.op_arrays if a["Wbar"] else spec.arrays
    has_a = bool(a["A"])
    if backend == "triton":
        from . import triton as tk

        totals = all(p.dtype == torch.int64 for p in a["pulses_first"])
        results = tk.multi_step_triton(algorithm, {n: list(a[n]) for n in names}, list(a["g"]), lr=lr, config=config,
                                       keys=list(a["keys"]), tensor_ids=list(a["tensor_ids"]), offsets=list(a["offsets"]),
                                       As=list(a["A"]) if has_a else None, totals=totals, flag=flag)  # fmt: skip
    else:
        results = [
            spec.step({n: a[n][i] for n in names}, a["Wbar"][i] if a["Wbar"] else None, a["g"][i], flag=flag, lr=lr,
                      config=config, key=int(a["keys"][i]), tensor_id=int(a["tensor_ids"][i]), offset=int(a["offsets"][i]),
                      A=a["A"][i] if has_a else None)  # fmt: skip
            for i in range(m)
        ]
    for i, pulses in enumerate(results):
        pairs_out = a["pairs_first"][i] if a["pairs_first"] else None
        first_pairs = pulses.first_pairs
        _report(a["pulses_first"][i], pulses.first, first_pairs)
        if pairs_out is not None and pairs_out.numel() and first_pairs is not None:
            pairs_out.copy_(first_pairs.reshape(-1))
        if a["pulses_main"]:
            _report(a["pulses_main"][i], pulses.main)


def _kernel(algorithm: str):
    def run(*args) -> None:
        a = _lists(algorithm, args)
        if not a["W"]:
            _check(algorithm, a)
            return
        backend = backend_for(a["W"][0], algorithm)
        if backend in ("cpp", "cuda"):
            _native(algorithm, a)
        else:
            _check(algorithm, a)
            _python(algorithm, a, backend)

    run.__name__ = f"{algorithm}_step"
    return run


def _fake(algorithm: str):
    def fake(*args) -> None:
        _check(algorithm, _lists(algorithm, args))

    fake.__name__ = f"{algorithm}_step_fake"
    return fake


def _native_fake(algorithm_id, *args) -> None:
    return None


for _alg in ALGORITHMS:
    # CPU and CUDA choose among their kernels; any other device gets the same function, which
    # picks the reference there.
    _lib.impl(f"{_alg}_step", _kernel(_alg), "CPU")
    _lib.impl(f"{_alg}_step", _kernel(_alg), "CUDA")
    _lib.impl(f"{_alg}_step", _kernel(_alg), "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastanalog::{_alg}_step", _fake(_alg), lib=_lib)
torch.library.register_fake("fastanalog::_native_step", _native_fake, lib=_lib)


def op(algorithm: str):
    """The op of ``algorithm`` (``torch.ops.fastanalog.<algorithm>_step``)."""
    reference.algorithm(algorithm)  # ValueError for an unknown name
    return getattr(torch.ops.fastanalog, f"{algorithm}_step")


def _eager_native(t: torch.Tensor, algorithm: str) -> bool:
    """Whether an eager step on ``t`` goes straight to the compiled kernels: a plain tensor, not traced,
    no dispatch mode watching (which is to see the op), and the compiled kernels serve it."""
    return (
        type(t) is torch.Tensor
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and backend_for(t, algorithm) in ("cpp", "cuda")
    )


def public_args(algorithm: str, a: dict) -> tuple:
    """The arguments of ``algorithm``'s op from the ``_native_step`` form ``a`` (inverse of ``_lists``)."""
    return tuple(a[native] for _, native, _ in op_lists(algorithm)) + tuple(a[n] for n in _COMMON_NAMES)


def step(
    algorithm: str,
    arrays: dict[str, Sequence[torch.Tensor] | None],
    g: Sequence[torch.Tensor],
    *,
    lr: float,
    config,
    keys: Sequence[int],
    tensor_ids: Sequence[int],
    flag: bool = False,
    offsets: Sequence[int] | None = None,
    As: Sequence[torch.Tensor] | None = None,
    totals: bool = False,
    native: bool = False,
    counters: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[StepPulses]:
    """One call of ``algorithm``'s op on flat, contiguous tensors of ``config``; one ``StepPulses`` per tensor.

    (With ``native``, any contiguous tensors: the compiled kernels take an array's elements in
    memory order, which for a contiguous tensor is the order of its flat view.)

    ``arrays``: ``main`` (W), ``residual`` (P), ``buffer`` (H), ``weight`` (Wbar; None: no
    mixed weight), lists of one entry per tensor. ``flag``: rl's transfer flag of this step
    (ignored otherwise). ``totals``: report each written array's ``sum(N_up + N_down)`` as a
    0-d int64 tensor instead of per-element counts. ``native``: call the compiled kernels
    (``_native_step``) whatever ``FASTANALOG_BACKEND`` says, instead of the op. ``counters``:
    per tensor the one-element int64 tensors (W's, P's) to which its pulse totals are added
    (implies ``totals``; the StepPulses then hold these tensors).
    """
    spec = reference.algorithm(algorithm)
    W = list(arrays["main"])
    m = len(W)
    if spec.flag_arg is None:  # a flag the rule does not take comes from the config alone (rl2's "ema")
        flag = spec.step_flag(config, 0)
    residual = spec.residual
    main_written = residual and spec.writes_w(bool(flag))
    where = W[0].device if W else torch.device("cpu")
    if counters is not None:
        totals = True
        first = [c[1] if residual else c[0] for c in counters]
        main = [c[0] for c in counters]
    elif totals:
        counts = torch.zeros(2, m, dtype=torch.int64, device=where)
        first, main = list(counts[0].split(1)), list(counts[1].split(1))
    else:
        first = [torch.empty(t.numel(), dtype=torch.int32, device=where) for t in W]
        main = [torch.empty(t.numel() if main_written else 0, dtype=torch.int32, device=where) for t in W]
    pairs = [torch.empty(t.numel(), dtype=torch.int32, device=where) for t in W] if As is not None and not totals else []
    packed = packing.pack_op_config(config)
    if not residual:
        packed = packed.main_only()
    op_arrays = spec.op_arrays
    a = {n: list(arrays.get(STATE_NAMES[n]) or []) if n in op_arrays else [] for n in ("W", "P", "H", "Wbar")}
    a.update(
        W=W,
        g=list(g),
        A=list(As) if As is not None else [],
        pulses_first=first,
        pairs_first=pairs,
        pulses_main=main if residual else [],
        keys=[int(k) for k in keys],
        offsets=[0] * m if offsets is None else [int(o) for o in offsets],
        tensor_ids=[int(t) for t in tensor_ids],
        step=packing.step_floats(config, lr, flag),
        devices=list(packed.devices),
        tables=list(packed.tables),
        seeds=list(packed.seeds),
    )
    if native or (W and _eager_native(W[0], algorithm)):
        _native(algorithm, a)  # what the op's kernel would do, without the round trip through the dispatcher
    else:
        op(algorithm)(*public_args(algorithm, a))
    if totals and counters is None:  # each total as a 0-d tensor
        first = [c.view(()) for c in first]
        main = [c.view(()) for c in main] if main_written else main
    mains = main if main_written else [None] * m
    return [StepPulses(first=f, main=w, first_pairs=q) for f, w, q in zip(first, mains, pairs or [None] * m)]
