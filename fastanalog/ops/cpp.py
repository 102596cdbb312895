"""The compiled analog-update kernels (C++ on CPU, CUDA on GPU): loader and thin helpers.

The kernels live in ``csrc/analog_update.cpp`` (CPU) and ``csrc/cuda/analog_update.cu``
(CUDA). The library registers them, for CPU and CUDA tensors, as the kernels of the private op
``torch.ops.fastanalog._native_step`` whose schema ``fastanalog.ops.library`` defines: the
arguments of the ops ``fastanalog::{asgd,rl,rl2}_step`` in one list form, the algorithm's id
first. Those ops reach it when the compiled kernels serve the tensors (see ``library``).
Besides, the library defines a few helpers of its own: ``mix_cpp_``, ``triad_cpp_``,
``all_finite_cpp``, ``cpu_variant_cpp``.

Loading, on first use: the library built by ``pip install`` (``fastanalog/_C*.so``, with the
CUDA kernels inside where CUDA was found at build time); failing that, a JIT build of the
CPU kernels with ``torch.utils.cpp_extension.load`` (with ``-march=native``); failing that,
one warning and ``cpp_available()`` is False (the reference then serves CPU tensors).
Importing fastanalog never builds or loads anything. ``FASTANALOG_NO_JIT=1`` disables the
JIT build.

``asgd_step_cpp``, ``rl_step_cpp``, ``rl2_step_cpp`` (the reference functions' signatures)
and ``*_multi_step_cpp`` (lists, one entry per tensor) run the compiled kernels on CPU or
CUDA tensors whatever ``FASTANALOG_BACKEND`` says, through the one op: for tests and
benchmarks of the kernels themselves. For the same key they give the reference's pulse
counts element for element (see the kernels' header for the one place where a float can
differ in its last bit).
"""

from __future__ import annotations

import glob
import hashlib
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import AnalogConfig
from . import library
from .reference import StepPulses

__all__ = [
    "asgd_multi_step_cpp",
    "asgd_step_cpp",
    "cpp_available",
    "cpu_variant",
    "cuda_available",
    "cuda_kernels_registered",
    "rl2_multi_step_cpp",
    "rl2_step_cpp",
    "rl_multi_step_cpp",
    "rl_step_cpp",
    "triad_cpp",
    "all_finite_cpp",
    "abs_outer_bf16",
    "abs_sums_bf16",
    "bf16_gemm_available",
    "bf16_amx_available",
]

_PKG_DIR = Path(__file__).resolve().parents[1]
_CSRC = _PKG_DIR.parent / "csrc"
# Flags of the JIT build (the machine that builds is the machine that runs, so -march=native).
JIT_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-march=native"]

STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "cpu": False, "cuda": False, "source": None, "error": None}


def _prebuilt(stem: str) -> str | None:
    hits = sorted(glob.glob(str(_PKG_DIR / f"{stem}.*.so"))) + sorted(glob.glob(str(_PKG_DIR / f"{stem}.so")))
    return hits[0] if hits else None


def _warn_if_stale(path: str) -> None:
    sources = [p for p in _CSRC.rglob("*") if p.suffix in (".cpp", ".h", ".cu")] if _CSRC.is_dir() else []
    if sources and max(p.stat().st_mtime for p in sources) > os.path.getmtime(path):
        warnings.warn(
            f"fastanalog: {path} is older than the sources in {_CSRC}; rebuild it with "
            "`pip install --no-build-isolation -e .` (or delete it to use a JIT build)",
            RuntimeWarning,
            stacklevel=4,
        )


def _jit_build() -> None:
    from torch.utils import cpp_extension

    source = _CSRC / "analog_update.cpp"
    if not source.exists():
        raise FileNotFoundError(f"{source} not found: install fastanalog from a source checkout to build the C++ kernels")
    # The headers' hash among the flags: torch rebuilds when sources or flags change, and
    # does not look at included headers by itself.
    headers = b"".join((_CSRC / h).read_bytes() for h in ("philox.h", "op_layout.h"))
    header_hash = hashlib.sha1(headers).hexdigest()[:12]
    cpp_extension.load(
        name="fastanalog_cpu_jit",
        sources=[str(source)],
        extra_include_paths=[str(_CSRC)],
        extra_cflags=JIT_CFLAGS + [f"-DFASTANALOG_HEADER_HASH={header_hash}"],
        extra_ldflags=["-lgomp"],
        is_python_module=False,
        verbose=False,
    )


def _load() -> None:
    """Load (or JIT-build) the kernels once; never raises."""
    if _state["tried"]:
        return
    with _lock:
        if _state["tried"]:
            return
        errors = []
        assert library.SCHEMAS  # the op schemas exist (defined on import of .library) before kernels register
        path = _prebuilt("_C")
        if path is not None:
            _warn_if_stale(path)
            try:
                torch.ops.load_library(path)
                _state["cpu"], _state["source"] = True, path
            except (OSError, RuntimeError) as exc:
                errors.append(f"loading {path}: {exc}")
        if not _state["cpu"] and os.environ.get("FASTANALOG_NO_JIT", "") != "1":
            try:
                _jit_build()
                _state["cpu"], _state["source"] = True, "jit"
            except Exception as exc:  # a failed JIT build must not break the caller
                errors.append(f"JIT build: {exc}")
        if _state["cpu"]:
            _state["cuda"] = torch._C._dispatch_has_kernel_for_dispatch_key("fastanalog::_native_step", "CUDA")
            _register_fakes()
        else:
            _state["error"] = "; ".join(errors) or "no compiled kernels found"
            warnings.warn(
                f"fastanalog: the C++ kernels are unavailable ({_state['error']}); the reference backend still works. "
                "Reinstall with `pip install --no-build-isolation -e .` (needs a C++ compiler) to build them.",
                RuntimeWarning,
                stacklevel=3,
            )
        _state["tried"] = True


def cpp_available() -> bool:
    """Whether the C++ CPU kernels are loaded (building them on first call if needed)."""
    _load()
    return bool(_state["cpu"])


def cuda_kernels_registered() -> bool:
    """Whether the CUDA kernels of the ops are registered in this process (built and loaded)."""
    _load()
    return bool(_state["cuda"])


def cuda_available() -> bool:
    """Whether the CUDA kernels are registered and a CUDA device is present to run them."""
    return cuda_kernels_registered() and torch.cuda.is_available()


def cpu_variant() -> str:
    """Code path of the CPU kernels in this process: ``"avx2"`` or ``"generic"`` (see csrc/analog_update.cpp)."""
    _require_cpp()
    return torch.ops.fastanalog.cpu_variant_cpp()


def _require_cpp() -> None:
    if not cpp_available():
        raise RuntimeError(f"the fastanalog C++ kernels are unavailable: {_state['error']}")


# ----- fake (meta) kernels of the helper ops, so torch.compile can trace them ----------------
def _register_fakes() -> None:
    def triad_fake(a, b, c, s):
        return None

    def mix_fake(out, W, P, gamma):
        return None

    def abs_outer_fake(d, x):
        torch._check(d.dim() == 2 and x.dim() == 2 and d.shape[0] == x.shape[0], lambda: "abs_outer_bf16: d and x must be matrices of equal rows")
        return d.new_empty((d.shape[1], x.shape[1]), dtype=torch.float32)

    def abs_sums_fake(d, x, kernel, stride, padding, dilation, chunk=0):
        torch._check(d.dim() == x.dim() and d.shape[0] == x.shape[0], lambda: "abs_sums_bf16: d and x must have one rank and the same samples")
        return d.new_empty((d.shape[1], x.shape[1], *kernel), dtype=torch.float32)

    fakes = (("triad_cpp_", triad_fake), ("mix_cpp_", mix_fake), ("abs_outer_bf16_cpp", abs_outer_fake), ("abs_sums_bf16_cpp", abs_sums_fake))
    for name, fn in fakes:
        if not hasattr(torch.ops.fastanalog, name):  # kernels built before the op existed
            continue
        try:
            torch.library.register_fake(f"fastanalog::{name}")(fn)
        except RuntimeError as exc:  # registered already (a second load in one process)
            if "already" not in str(exc):
                raise


# ----- arguments ---------------------------------------------------------------------------------
def _check_arrays(
    names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], g: torch.Tensor, A: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate the arrays (equal numel, dtype and device, contiguous, disjoint) and the excess ``A``.

    Returns g and A ready for the op.
    """
    ref = tensors[0]
    if ref.dtype not in STORAGE_DTYPES:
        raise ValueError(f"W must be float32, bfloat16 or float16 for the C++ kernels, got {ref.dtype}")
    for name, t in zip(names, tensors):
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but W is on {ref.device}: move all arrays to one device")
        if t.dtype != ref.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but W has {ref.dtype}: store all arrays in one dtype")
        if t.numel() != ref.numel():
            raise ValueError(f"{name} has {t.numel()} elements but W has {ref.numel()}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (pass a flat view of the array)")
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), n) for n, t in zip(names, tensors)]
    for i in range(len(spans)):
        for j in range(i + 1, len(spans)):
            if spans[i][0] < spans[j][1] and spans[j][0] < spans[i][1] and ref.numel() > 0:
                raise ValueError(f"{spans[i][2]} and {spans[j][2]} overlap in memory: the kernels need separate arrays")
    if g.device != ref.device or g.numel() != ref.numel():
        raise ValueError(f"g must have W's device and numel ({ref.device}, {ref.numel()}), got {g.device}, {g.numel()}")
    if not g.is_floating_point():
        raise ValueError(f"g must be a floating tensor, got {g.dtype}")
    if g.dtype not in (torch.float32, ref.dtype):
        g = g.to(torch.float32)
    return g.contiguous(), _check_excess(A, ref, names, tensors)


def _check_excess(
    A: torch.Tensor | None, ref: torch.Tensor, names: Sequence[str] = (), written: Sequence[torch.Tensor] = ()
) -> torch.Tensor | None:
    """Validate ``A``, the per-sample |g| sums of the first write (None: no excess); return it ready for the op.

    It must be a contiguous floating tensor with W's numel and device, apart from the arrays the
    step writes. float32, bfloat16 and float16 pass as they are (whatever W's dtype); other
    floating dtypes are widened to float32.
    """
    if A is None:
        return None
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A (the per-sample |g| sums) must be a tensor or None, got {type(A).__name__}")
    if not A.is_floating_point():
        raise ValueError(f"A (the per-sample |g| sums) must be a floating tensor, got {A.dtype}")
    if A.device != ref.device:
        raise ValueError(f"A is on {A.device} but W is on {ref.device}: move it to W's device")
    if A.numel() != ref.numel():
        raise ValueError(f"A (the per-sample |g| sums) has {A.numel()} elements but W has {ref.numel()}")
    if not A.is_contiguous():
        raise ValueError("A (the per-sample |g| sums) must be contiguous (pass a flat view of it)")
    if A.numel() > 0:
        lo, hi = A.data_ptr(), A.data_ptr() + A.numel() * A.element_size()
        for name, t in zip(names, written):
            if lo < t.data_ptr() + t.numel() * t.element_size() and t.data_ptr() < hi:
                raise ValueError(f"A and {name} overlap in memory: the kernels need separate arrays")
    if A.dtype not in STORAGE_DTYPES:
        A = A.to(torch.float32)
    return A


def _named(**arrays: torch.Tensor | None) -> tuple[tuple[str, ...], tuple[torch.Tensor, ...]]:
    """Names and tensors of the arrays given (a mixed weight ``Wbar`` of None is left out)."""
    given = {name: t for name, t in arrays.items() if t is not None}
    return tuple(given), tuple(given.values())


def _check_offset(offset: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0 (global index of element 0), got {offset!r}")
    return offset


# ----- launchers (signatures of the reference functions) ----------------------------------------
# With ``totals=True`` a launcher reports, instead of the counts per element, each written
# array's total number of pulses sum(N_up + N_down) as a 0-d int64 tensor (computed inside the
# kernel: no count array is written or read again). ``A``: the per-sample |g| sums of the first
# write (SPEC section 2a); None is no excess (e = 0, no pairs).
def _one(algorithm: str, arrays: dict, g, A, *, lr, config, key, tensor_id, offset, totals, transfer=False) -> StepPulses:
    lists = {name: [t] if t is not None else None for name, t in arrays.items()}
    return library.step(algorithm, lists, [g], lr=lr, config=config, keys=[int(key)], tensor_ids=[int(tensor_id)],
                        flag=bool(transfer), offsets=[_check_offset(offset)], As=[A] if A is not None else None,
                        totals=totals, native=True)[0]  # fmt: skip


def asgd_step_cpp(
    W,
    g,
    *,
    lr: float,
    config: AnalogConfig,
    key: int,
    tensor_id: int,
    offset: int = 0,
    A: torch.Tensor | None = None,
    totals: bool = False,
) -> StepPulses:
    """Analog SGD, ``W <- pulse_update_W(W, -lr * g, e)``, in place; as ``asgd_step_ref``."""
    _require_cpp()
    g, A = _check_arrays(("W",), (W,), g, A)
    return _one("asgd", {"main": W}, g, A, lr=lr, config=config, key=key, tensor_id=tensor_id, offset=offset, totals=totals)


def rl_step_cpp(
    W,
    P,
    Wbar,
    g,
    *,
    lr: float,
    config: AnalogConfig,
    key: int,
    tensor_id: int,
    transfer: bool,
    offset: int = 0,
    A: torch.Tensor | None = None,
    totals: bool = False,
) -> StepPulses:
    """Residual Learning v1 in place (``transfer``: this step's transfer flag); as ``rl_step_ref``."""
    _require_cpp()
    g, A = _check_arrays(*_named(W=W, P=P, Wbar=Wbar), g, A)
    return _one("rl", {"main": W, "residual": P, "weight": Wbar}, g, A, lr=lr, config=config, key=key, tensor_id=tensor_id,
                offset=offset, totals=totals, transfer=transfer)  # fmt: skip


def rl2_step_cpp(
    W,
    P,
    H,
    Wbar,
    g,
    *,
    lr: float,
    config: AnalogConfig,
    key: int,
    tensor_id: int,
    offset: int = 0,
    A: torch.Tensor | None = None,
    totals: bool = False,
) -> StepPulses:
    """Residual Learning v2 in place (residual write, noisy read, buffer, transfer, mix); as ``rl2_step_ref``."""
    _require_cpp()
    g, A = _check_arrays(*_named(W=W, P=P, H=H, Wbar=Wbar), g, A)
    return _one("rl2", {"main": W, "residual": P, "buffer": H, "weight": Wbar}, g, A, lr=lr, config=config, key=key,
                tensor_id=tensor_id, offset=offset, totals=totals)  # fmt: skip


# ----- multi-tensor launchers ---------------------------------------------------------------------
# One op call steps a whole group of tensors that share a config: the kernels' threads split
# the group's elements in one parallel region, and Python does no per-tensor work beyond
# collecting arguments. Tensor i is updated exactly as the single-tensor launcher updates it.
def _multi(
    algorithm: str,
    arrays: dict[str, Sequence[torch.Tensor] | None],
    g: Sequence[torch.Tensor],
    *,
    lr: float,
    config: AnalogConfig,
    keys: Sequence[int],
    tensor_ids: Sequence[int],
    offsets: Sequence[int] | None,
    flag: bool,
    totals: bool,
    As: Sequence[torch.Tensor] | None = None,
) -> list[StepPulses]:
    _require_cpp()
    W = list(arrays["main"])
    m = len(W)
    offsets = [0] * m if offsets is None else [_check_offset(int(o)) for o in offsets]
    lists = {name: ts for name, ts in arrays.items() if ts is not None}
    lengths = {len(ts) for ts in lists.values()} | {len(g), len(keys), len(tensor_ids), len(offsets)}
    if As is not None:
        lengths.add(len(As))
    if m == 0 or len(lengths) != 1:
        raise ValueError(
            f"{', '.join(lists)}, g, {'As, ' if As is not None else ''}keys, tensor_ids and offsets must be non-empty lists "
            f"of one length (one entry per tensor), got lengths {sorted(lengths)}"
        )
    where = W[0].device
    if where.type not in ("cpu", "cuda"):
        raise ValueError(f"W[0] is on {where}: the compiled kernels take CPU or CUDA tensors")
    for name, ts in lists.items():
        for i, t in enumerate(ts):
            if t.device != where:
                raise ValueError(f"{name}[{i}] is on {t.device} but W[0] is on {where}: the compiled kernels take CPU or CUDA tensors of one device")
    if W[0].dtype not in STORAGE_DTYPES:
        raise ValueError(f"W must be float32, bfloat16 or float16 for the C++ kernels, got {W[0].dtype}")
    excess = None
    if As is not None:
        excess = []
        for i, (A, w) in enumerate(zip(As, W)):
            if not isinstance(A, torch.Tensor):
                raise TypeError(f"As[{i}] must be a tensor, got {type(A).__name__}")
            try:
                excess.append(_check_excess(A, w))
            except ValueError as exc:
                raise ValueError(f"As[{i}]: {exc}") from None
    return library.step(algorithm, arrays, list(g), lr=lr, config=config, keys=keys, tensor_ids=tensor_ids, flag=flag,
                        offsets=offsets, As=excess, totals=totals, native=True)  # fmt: skip


def asgd_multi_step_cpp(
    W: Sequence[torch.Tensor],
    g: Sequence[torch.Tensor],
    *,
    lr: float,
    config: AnalogConfig,
    keys: Sequence[int],
    tensor_ids: Sequence[int],
    offsets: Sequence[int] | None = None,
    As: Sequence[torch.Tensor] | None = None,
    totals: bool = False,
) -> list[StepPulses]:
    """Analog SGD on several tensors of one config in one call; tensor ``i`` as ``asgd_step_cpp`` updates it.

    ``As``: None (no excess) or each tensor's per-sample |g| sums (the ``A`` of the single-tensor step).
    """
    return _multi("asgd", {"main": W}, g, lr=lr, config=config, keys=keys, tensor_ids=tensor_ids, offsets=offsets,
                  flag=False, totals=totals, As=As)  # fmt: skip


def rl_multi_step_cpp(
    W: Sequence[torch.Tensor],
    P: Sequence[torch.Tensor],
    Wbar: Sequence[torch.Tensor] | None,
    g: Sequence[torch.Tensor],
    *,
    lr: float,
    config: AnalogConfig,
    keys: Sequence[int],
    tensor_ids: Sequence[int],
    transfer: bool,
    offsets: Sequence[int] | None = None,
    As: Sequence[torch.Tensor] | None = None,
    totals: bool = False,
) -> list[StepPulses]:
    """Residual Learning v1 on several tensors in one call (``Wbar`` None: no mixed weight); as ``rl_step_cpp``."""
    return _multi("rl", {"main": W, "residual": P, "weight": Wbar}, g, lr=lr, config=config, keys=keys,
                  tensor_ids=tensor_ids, offsets=offsets, flag=transfer, totals=totals, As=As)  # fmt: skip


def rl2_multi_step_cpp(
    W: Sequence[torch.Tensor],
    P: Sequence[torch.Tensor],
    H: Sequence[torch.Tensor],
    Wbar: Sequence[torch.Tensor] | None,
    g: Sequence[torch.Tensor],
    *,
    lr: float,
    config: AnalogConfig,
    keys: Sequence[int],
    tensor_ids: Sequence[int],
    offsets: Sequence[int] | None = None,
    As: Sequence[torch.Tensor] | None = None,
    totals: bool = False,
) -> list[StepPulses]:
    """Residual Learning v2 on several tensors in one call (``Wbar`` None: no mixed weight); as ``rl2_step_cpp``."""
    return _multi("rl2", {"main": W, "residual": P, "buffer": H, "weight": Wbar}, g, lr=lr, config=config, keys=keys,
                  tensor_ids=tensor_ids, offsets=offsets, flag=False, totals=totals, As=As)  # fmt: skip


def mix_cpp(W: torch.Tensor, P: torch.Tensor, gamma: float) -> torch.Tensor | None:
    """``W + gamma * P`` as a new tensor, rounded as the kernels write the mixed weight (see ``reference.mixed_weight``);
    None when the loaded kernels predate this op."""
    if not cpp_available() or not hasattr(torch.ops.fastanalog, "mix_cpp_"):
        return None
    W, P = W.contiguous(), P.contiguous()
    out = torch.empty_like(W)
    torch.ops.fastanalog.mix_cpp_(out, W, P, float(gamma))
    return out


def triad_cpp(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, s: float) -> None:
    """``a = b + s * c`` on float32 CPU tensors with the kernels' threads: the bandwidth yardstick of benchmarks."""
    _require_cpp()
    torch.ops.fastanalog.triad_cpp_(a, b, c, float(s))


_FINITE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The largest element count of either factor or the result of abs_outer_bf16 (MKL's 32-bit sizes).
ABS_OUTER_MAX = 2**31 - 1


def bf16_gemm_available() -> bool:
    """Whether :func:`abs_outer_bf16` runs here (the C++ kernels loaded, torch built with MKL)."""
    return cpp_available() and hasattr(torch.ops.fastanalog, "bf16_gemm_cpp") and bool(torch.ops.fastanalog.bf16_gemm_cpp())


def bf16_amx_available() -> bool:
    """Whether :func:`abs_outer_bf16` runs on oneDNN's bfloat16 micro-kernel here (a CPU with AMX or
    AVX512-BF16), where it is several times faster than the float32 product."""
    return cpp_available() and hasattr(torch.ops.fastanalog, "bf16_amx_cpp") and bool(torch.ops.fastanalog.bf16_amx_cpp())


def abs_sums_bf16(
    d: torch.Tensor,
    x: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    chunk: int = 0,
) -> torch.Tensor:
    """The weight gradient of ``|x|`` and ``|d|`` of a batched 1-d or 2-d convolution with groups 1
    (``x``: B x C x spatial, ``d``: B x O x output spatial, one dtype of float32, bfloat16 or
    float16, CPU; ``kernel``, ``stride``, ``padding``, ``dilation``: one entry per spatial
    dimension, zero padding), in float32 from the bfloat16 roundings of ``|d|`` and ``|x|`` with
    float32 accumulation, on oneDNN's AMX/AVX512-BF16 micro-kernel (:func:`bf16_amx_available`).
    Empty ``kernel`` etc. is a linear layer (``d``: rows x O, ``x``: rows x I), as
    :func:`abs_outer_bf16`. ``chunk``: output positions per chunk of the product (0: chosen from
    the shapes); A does not depend on it nor on the threads beyond the order of its float32 sums."""
    _require_cpp()
    return torch.ops.fastanalog.abs_sums_bf16_cpp(d, x, list(kernel), list(stride), list(padding), list(dilation), int(chunk))


def abs_outer_bf16(d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``|d|^T |x|`` (``d``: rows x O, ``x``: rows x I, CPU) in float32 from the bfloat16 roundings of
    ``|d|`` and ``|x|`` with float32 accumulation (MKL's mixed-precision product: AMX or AVX512-BF16
    where the CPU has them, else MKL). Each product of two bfloat16 numbers is exact in float32."""
    _require_cpp()
    return torch.ops.fastanalog.abs_outer_bf16_cpp(d, x)


def all_finite_cpp(tensors: list[torch.Tensor]) -> bool | None:
    """Whether every element of the CPU ``tensors`` is finite, in one threaded pass (complex
    tensors as their real and imaginary parts). None when the loaded kernels predate this op or
    a floating dtype is not float32/float64/bfloat16/float16: the caller then checks another way."""
    tensors = [torch.view_as_real(t) if t.is_complex() else t for t in tensors]  # a complex number: two floats
    if not tensors:
        return True
    if not cpp_available() or not hasattr(torch.ops.fastanalog, "all_finite_cpp"):
        return None
    if any(t.is_floating_point() and t.dtype not in _FINITE_DTYPES for t in tensors):
        return None  # e.g. float8: the caller's generic check handles it
    return bool(torch.ops.fastanalog.all_finite_cpp(tensors))
