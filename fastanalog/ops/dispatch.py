"""Backend selection for the analog update.

Backends, each a set of launchers with the reference's signatures:

* ``reference`` - ``ops/reference.py``, plain PyTorch, any device (the oracle);
* ``cpp``       - the C++ extension's CPU kernels (``ops/cpp.py``);
* ``cuda``      - the C++ extension's CUDA kernels (``ops/cpp.py``);
* ``triton``    - fused Triton kernels (``ops/triton``), CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``.

Default: CUDA tensors use ``triton`` (else ``cuda``, else ``reference``); CPU tensors
``cpp`` (else ``reference``). ``FASTANALOG_BACKEND`` overrides the choice and fails
with a clear error when the named backend cannot serve a tensor.

:func:`analog_step_group` updates many tensors at once: tensors with the same backend,
config, device and array dtypes go to the backend's multi-tensor launcher in one launch
(``triton``, ``cpp``), or one after the other (backends without one); each tensor gets exactly
what :func:`analog_step` gives it alone.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..config import AnalogConfig
from . import reference
from .reference import StepPulses

BACKENDS = ("reference", "cpp", "cuda", "triton")
# The storage dtypes of the compiled kernels; other float arrays (float64) take the reference.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_noticed: set[torch.dtype] = set()
# The oldest Triton whose tl.randint4x is SPEC section 4's generator: Philox4x32-10 keyed by
# the seed's two 32-bit halves, counter (offset low, offset high, 0, 0) for int64 offsets
# (tests/test_philox.py checks it bit for bit, across the counter's 2^32 boundary).
MIN_TRITON = (3, 0)


def triton_version_ok(version: str) -> bool:
    """Whether Triton ``version`` (e.g. ``"3.8.0"``, ``"3.1.0+git..."``) is at least ``MIN_TRITON``."""
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts) >= MIN_TRITON


@dataclass(frozen=True)
class Backend:
    """One backend's launchers: per algorithm one tensor, and optionally many tensors in one launch (``*_multi``)."""

    name: str
    asgd: Callable[..., StepPulses]
    rl: Callable[..., StepPulses]
    rl2: Callable[..., StepPulses]
    serves: Callable[[torch.Tensor], bool]
    asgd_multi: Callable[..., list[StepPulses]] | None = None
    rl_multi: Callable[..., list[StepPulses]] | None = None
    rl2_multi: Callable[..., list[StepPulses]] | None = None
    # The launchers (single and multi-tensor) accept ``totals=True``: each written array's sum
    # |N| as a 0-d int64 tensor, reduced in the kernel, instead of the counts per element.
    totals: bool = False


def _load(name: str) -> Backend | None:
    """The backend ``name``, or None where it is not built or not importable here."""
    if name == "reference":
        return Backend("reference", reference.asgd_step_ref, reference.rl_step_ref, reference.rl2_step_ref, lambda t: True)
    try:
        if name in ("cpp", "cuda"):
            mod = importlib.import_module(".cpp", __package__)
            available = mod.cpp_available() if name == "cpp" else mod.cuda_available()
            if not available:
                return None
            if name == "cuda":
                return Backend(
                    name,
                    mod.asgd_step_cpp,
                    mod.rl_step_cpp,
                    mod.rl2_step_cpp,
                    lambda t: t.device.type == "cuda" and t.dtype in KERNEL_DTYPES,
                    totals=True,
                )
            return Backend(
                name,
                mod.asgd_step_cpp,
                mod.rl_step_cpp,
                mod.rl2_step_cpp,
                lambda t: t.device.type == "cpu" and t.dtype in KERNEL_DTYPES,
                asgd_multi=mod.asgd_multi_step_cpp,
                rl_multi=mod.rl_multi_step_cpp,
                rl2_multi=mod.rl2_multi_step_cpp,
                totals=True,
            )
        if name == "triton":
            import triton

            if not triton_version_ok(triton.__version__):
                warnings.warn(
                    f"fastanalog: triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, whose "
                    "tl.randint4x the kernels rely on; the Triton backend is off (pip install 'triton>=3.0')",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return None
            mod = importlib.import_module(".triton", __package__)
            interpret = os.environ.get("TRITON_INTERPRET") == "1"
            return Backend(
                "triton",
                mod.asgd_step_triton,
                mod.rl_step_triton,
                mod.rl2_step_triton,
                lambda t: t.dtype in KERNEL_DTYPES and (t.device.type == "cuda" or (interpret and t.device.type == "cpu")),
                asgd_multi=mod.asgd_multi_step_triton,
                rl_multi=mod.rl_multi_step_triton,
                rl2_multi=mod.rl2_multi_step_triton,
                totals=True,
            )
    except ImportError:
        return None
    raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


@functools.cache
def get_backend(name: str) -> Backend | None:
    return _load(name)


def available_backends() -> list[str]:
    """Names of the backends importable on this machine."""
    return [n for n in BACKENDS if get_backend(n) is not None]


def choose_backend(tensor: torch.Tensor) -> Backend:
    """The backend for ``tensor``: the ``FASTANALOG_BACKEND`` override, else the default."""
    forced = os.environ.get("FASTANALOG_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"FASTANALOG_BACKEND={forced!r} is not a backend: choose one of {', '.join(BACKENDS)}")
        backend = get_backend(forced)
        if backend is None:
            raise RuntimeError(
                f"FASTANALOG_BACKEND={forced!r} is not available on this machine (available: "
                f"{', '.join(available_backends())}); unset it or build the backend"
            )
        if not backend.serves(tensor):
            raise RuntimeError(
                f"FASTANALOG_BACKEND={forced!r} cannot update a {tensor.device.type} {tensor.dtype} tensor (its kernels store "
                "float32, bfloat16 or float16); unset it, or move or cast the model"
            )
        return backend
    order = ("triton", "cuda", "reference") if tensor.device.type == "cuda" else ("cpp", "reference")
    for name in order:
        backend = get_backend(name)
        if backend is not None and backend.serves(tensor):
            if name == "reference" and tensor.dtype not in KERNEL_DTYPES and tensor.dtype not in _noticed:
                _noticed.add(tensor.dtype)
                warnings.warn(
                    f"fastanalog: {tensor.dtype} analog arrays are updated by the reference backend (plain PyTorch, slower): "
                    "the compiled kernels store float32, bfloat16 or float16. The update math is float32 either way.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return backend
    return get_backend("reference")


def mixed_weight(W: torch.Tensor, P: torch.Tensor, gamma: float) -> torch.Tensor:
    """``W + gamma * P`` (a new tensor) rounded as every backend's kernels write it: float32 math, in W's dtype.

    CPU tensors go through the C++ kernels' threads where they are built (not while
    torch.compile traces: there the reference's tensor ops are traced).
    """
    if W.device.type == "cpu" and W.dtype in (torch.float32, torch.bfloat16, torch.float16) and not torch.compiler.is_compiling():
        from . import cpp

        mixed = cpp.mix_cpp(W, P, gamma)
        if mixed is not None:
            return mixed
    return reference.mixed_weight(W, P, gamma)


@dataclass(frozen=True)
class StepItem:
    """One analog tensor of a step: its arrays (a layer's ``analog_state()``), stored mixed weight, gradient, config and key.

    ``weight`` (rl/rl2 only) receives ``W + gamma * P``, or is None: then no mixed weight
    is written. ``key`` is the tensor's step key ``philox.step_key(seed, step, tensor_id)``.
    ``A`` is the per-element sum of the samples' absolute gradients of a per-sample write
    (SPEC section 2a), of ``grad``'s shape, or None: the write has no excess (batch mode).
    """

    arrays: dict[str, torch.Tensor | None]
    weight: torch.Tensor | None
    grad: torch.Tensor
    config: AnalogConfig
    key: int
    tensor_id: int
    A: torch.Tensor | None = None


# The arrays each algorithm updates, in the order of its launchers' arguments (before g).
_ARRAYS = {"asgd": ("main",), "rl": ("main", "residual", "weight"), "rl2": ("main", "residual", "buffer", "weight")}


def _array(item: StepItem, name: str) -> torch.Tensor:
    return item.weight if name == "weight" else item.arrays[name]


def analog_step_group(items: Sequence[StepItem], *, lr: float, step: int, totals: bool = False) -> list[StepPulses]:
    """One step of ``lr`` on many analog tensors, arrays updated in place; one StepPulses per item, in order.

    Tensors served by the same backend with the same config (their tensor ids and keys
    apart), device and array dtypes form one launch where the backend has a
    multi-tensor launcher; otherwise each tensor is launched alone. Either way every
    tensor gets the result of :func:`analog_step`. ``step`` counts from 1 (it sets the
    transfer steps of rl). With ``totals``, a backend that can (``Backend.totals``) reports
    each written array's pulses as their sum |N| (a 0-d int64 tensor) instead of per
    element, which is all that pulse bookkeeping needs and saves writing the counts.
    """
    launches: dict[tuple, tuple[Backend, list[int]]] = {}
    # The backend depends on the device alone, and equal configs are one launch: both are
    # looked up once per device and per config object, not per tensor (hashing a config
    # walks all its fields).
    backends: dict[torch.device, Backend] = {}
    config_ids: dict[int, int] = {}
    distinct: dict[AnalogConfig, int] = {}
    for i, item in enumerate(items):
        algorithm = item.config.algorithm
        if algorithm not in _ARRAYS:
            raise ValueError(f"analog_step got algorithm {algorithm!r}, which has no analog update")
        main = item.arrays["main"]
        backend = backends.get(main.device)
        if backend is None:
            backend = backends[main.device] = choose_backend(main)
        config_id = config_ids.get(id(item.config))
        if config_id is None:
            config_id = config_ids[id(item.config)] = distinct.setdefault(item.config, len(distinct))
        arrays = (_array(item, n) for n in _ARRAYS[algorithm])
        dtypes = tuple(a.dtype if a is not None else None for a in arrays) + (item.grad.dtype,)
        dtypes += (item.A.dtype if item.A is not None else None,)
        key = (backend.name, config_id, main.device, dtypes)
        launches.setdefault(key, (backend, []))[1].append(i)
    out: list[StepPulses | None] = [None] * len(items)
    for backend, indices in launches.values():
        for i, pulses in zip(indices, _launch(backend, [items[i] for i in indices], lr=lr, step=step, totals=totals)):
            out[i] = pulses
    return out


def _launch(backend: Backend, items: list[StepItem], *, lr: float, step: int, totals: bool) -> list[StepPulses]:
    """Update ``items`` (one backend, config, device and dtypes) with one multi-tensor launch, or one launch each."""
    config = items[0].config
    names = _ARRAYS[config.algorithm]
    # Flat views in logical (row-major) order: the random counter of an element is its
    # logical index whatever the memory layout (e.g. channels_last), so strided arrays
    # are updated through contiguous copies and written back.
    # A role without arrays (no stored mixed weight: all None, as the launch key says) is None.
    flat = [[_flat(_array(item, n)) for item in items] if _array(items[0], n) is not None else None for n in names]
    grads = [item.grad.reshape(-1).contiguous() for item in items]
    for item in items:
        if item.A is not None and item.A.shape != item.grad.shape:
            raise ValueError(f"A (per-sample |g| sums) must have the gradient's shape {tuple(item.grad.shape)}, got {tuple(item.A.shape)}")
    sums = [item.A.reshape(-1).contiguous() for item in items] if items[0].A is not None else None
    extra = {"transfer": step % config.transfer_every == 0} if config.algorithm == "rl" else {}
    if totals and backend.totals:
        extra["totals"] = True
    multi = getattr(backend, f"{config.algorithm}_multi")
    if multi is not None:
        keys = [item.key for item in items]
        if sums is not None:
            extra["As"] = sums
        out = multi(*flat, grads, lr=lr, config=config, keys=keys, tensor_ids=[item.tensor_id for item in items], **extra)
    else:
        single = getattr(backend, config.algorithm)
        out = [
            single(
                *(arrays[i] if arrays is not None else None for arrays in flat),
                grads[i],
                lr=lr,
                config=config,
                key=item.key,
                tensor_id=item.tensor_id,
                **({"A": sums[i]} if sums is not None else {}),
                **extra,
            )
            for i, item in enumerate(items)
        ]
    for n, arrays in zip(names, flat):
        for item, array in zip(items, arrays or ()):
            _write_back(_array(item, n), array)
    return out


def analog_step(
    arrays: dict[str, torch.Tensor | None],
    weight: torch.Tensor | None,
    grad: torch.Tensor,
    *,
    lr: float,
    config: AnalogConfig,
    key: int,
    tensor_id: int,
    step: int,
    A: torch.Tensor | None = None,
) -> StepPulses:
    """One step of ``config.algorithm`` on one tensor; arrays are updated in place.

    ``arrays`` is a layer's ``analog_state()``; ``weight`` the stored mixed weight
    (written with ``W + gamma * P`` for rl/rl2), or None; ``step`` counts from 1;
    ``A`` the per-sample |g| sums of a per-sample write (None: batch mode).
    """
    item = StepItem(arrays, weight, grad, config, key, tensor_id, A)
    return analog_step_group([item], lr=lr, step=step)[0]


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A flat view of ``t`` if it is contiguous, else a flat contiguous copy."""
    return t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)


def _write_back(t: torch.Tensor, flat: torch.Tensor) -> None:
    if not t.is_contiguous():
        t.copy_(flat.view(t.shape))
