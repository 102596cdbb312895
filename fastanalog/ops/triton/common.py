"""Shared pieces of the fused Triton update kernels: device math, pulses, storage, launch helpers.

Every ``@triton.jit`` helper here reproduces one step of ``fastanalog.ops.reference``
operation for operation, in float32, so that a kernel applies the same pulse counts as
the reference element for element (SPEC sections 2 and 4):

* Scalars (learning rates, device means, ...) reach the kernels already rounded to
  float32 (:func:`f32`), as the reference rounds every Python scalar first.
* Divisions use ``tl.div_rn`` and square roots ``tl.sqrt_rn`` (IEEE round-to-nearest
  on every target; plain ``/`` and ``tl.sqrt`` may be approximate on GPUs), and the
  launchers turn off multiply-add contraction (``enable_fp_fusion=False``), because
  the reference rounds every product before the following sum.
* Transcendentals of the response curves (``pow`` of the power family, ``expm1`` of
  the exponential family) and of the closed-form symmetric points are evaluated in
  float64 and rounded once to float32, which is the correctly rounded float32 value
  in all but vanishingly rare cases. The normals of Box-Muller follow Triton's own
  ``pair_uniform_to_normal`` (float32 ``log``/``cos``/``sin``), as SPEC section 4
  prescribes. These functions are not correctly rounded on every platform (torch's
  CPU kernels, numpy under ``TRITON_INTERPRET=1`` and GPU approximations each differ
  by an ulp or a few), which moves stored values by far less than one pulse and flips
  a pulse count only when a rounding decision sits within an ulp of its threshold.
* Storage dtypes: float32, bfloat16 and float16 arrays are widened on load and
  written back with round-to-nearest-even like ``tensor.to(dtype)``; bfloat16 is
  rounded with integer bit operations (the interpreter's own float32 -> bfloat16
  cast truncates), float16 by the native conversion.

Random numbers (SPEC section 4). Each purpose has its stream ``s`` with key
``step_key ^ STREAM_SALT[s]`` (the salts are compile-time constants, the XOR happens in
the kernel), and in a stream global element ``i`` takes word ``i % 4`` of the Philox
call with counter ``i // 4``. A program's block therefore starts at a global index that
is a multiple of 4 (:func:`block_range`: a shard whose offset is not one masks the
elements of its first block that lie before the offset), draws ``tl.randint4x`` once
for each of its ``BLOCK // 4`` calls and interleaves the four words into ``BLOCK``
elements (:func:`stream_uniform`); normals take the Box-Muller pairs ``(r0, r1)`` and
``(r2, r3)`` of each call (:func:`stream_normal`). A stream a configuration does not
need is not drawn (compile-time switches).

Pulses (SPEC section 2). A write rounds its net count ``N`` (stream 0, or truncation for
the threshold transfer) and, given the excess input ``A``, its pairs ``M`` (stream 1);
``N_up = M + max(N, 0)``, ``N_down = M + max(-N, 0)``, each capped. Per element the
kernels store the net count ``N_up - N_down`` (int32) and, with ``A``, the pairs
``min(N_up, N_down)``; asked for totals (``TOTALS``) they store none of that and add
instead each program's ``sum(N_up + N_down)`` into a 0-d int64 tensor per array and
tensor (:func:`report_pulses`).

Device-to-device parameters are regenerated in-kernel exactly like
``ResponseDevice.element_params``: ``mean * max(1 + d2d_std * clamp(z, -3, 3), 0.05)``
with ``(z_tau_min, z_tau_max, z_gamma, z_dw_min) = tl.randn4x(var_key, i)`` and
``z_asym`` the first normal of ``randn4x(var_key ^ 1, i)``; the asymmetry is then
clipped to ``[-0.99, 0.99]``.

Multi-tensor launches. A kernel updates one tensor per launch (its arrays and per-tensor
scalars passed directly, ``MULTI=False``) or, with ``MULTI=True``, every tensor of a group
in one launch: the per-tensor scalars and array addresses then come from an int64 table
(:func:`tensor_launch`) and each program finds its tensor by a binary search of the
tensors' first blocks (:func:`multi_tensor_block`). The per-element math is the same code
in both modes, so a tensor gets the same result either way.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from ...config import AnalogConfig
from .. import philox
from ..packing import DEVICE_FIELDS, FAMILY_IDS, PackedDevice, device_floats, pack_config

# Family ids (packing.FAMILY_IDS): ints for the host, constexprs for the kernels.
FAMILY_LINEAR, FAMILY_POWER, FAMILY_EXP, FAMILY_TABLE = (FAMILY_IDS[f] for f in ("linear", "power", "exp", "table"))
LINEAR, POWER, EXP, TABLE = (tl.constexpr(f) for f in (FAMILY_LINEAR, FAMILY_POWER, FAMILY_EXP, FAMILY_TABLE))

STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Elements per program: one warp-friendly tile on a GPU; under the interpreter every
# program is a Python-level loop iteration, so fewer, larger programs are faster.
BLOCK_GPU = 1024
BLOCK_INTERPRETER = 4096
NUM_WARPS = 4


# ----------------------------------------------------------------------------------------
# Host-side helpers
# ----------------------------------------------------------------------------------------
def f32(x: float) -> float:
    """``x`` rounded to the nearest float32, returned as a Python float (exactly representable)."""
    return float(np.float32(x))


def interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def block_size() -> int:
    """Elements per Triton program for the current mode."""
    return BLOCK_INTERPRETER if interpreting() else BLOCK_GPU


def launch_options() -> dict:
    """Launch keywords shared by every kernel (ignored by the interpreter)."""
    return dict(num_warps=NUM_WARPS, enable_fp_fusion=False)


@functools.lru_cache(maxsize=64)
def _table_tensor(values: tuple[float, ...], device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, device=device)


def table_tensor(dev: PackedDevice, where: torch.device) -> torch.Tensor:
    """``[up_0 .. up_n, down_0 .. down_n]`` in float64 (a one-element dummy for analytic families).

    Interpolation rounds the samples to float32 in-kernel (as ``torch.tensor(samples,
    dtype=float32)`` does in the reference); the symmetric-point search uses them in
    float64 like the reference's bisection.
    """
    values = tuple(dev.table_up) + tuple(dev.table_down) if dev.family == FAMILY_TABLE else (0.0,)
    return _table_tensor(values, str(where))


def table_geometry(table: torch.Tensor, family: int) -> tuple[int, int]:
    """(number of table intervals ``n``, bisection steps ``ceil(log2 n)``); (1, 0) for analytic families."""
    if family != FAMILY_TABLE:
        return 1, 0
    n = table.numel() // 2 - 1
    return n, max(0, math.ceil(math.log2(n)))


# ----------------------------------------------------------------------------------------
# Device descriptions and step scalars
# ----------------------------------------------------------------------------------------
# A kernel gets each array's device in two parts. The run-time part is a tuple of float32
# scalars in ``packing.DEVICE_FIELDS`` order (the layout csrc/op_layout.h shares), passed as
# kernel parameters; kernels read it by these indices. The compile-time part (``DEVICE_SPEC``
# order) selects code: the family, which options are on and the table's geometry.
FIELD = {name: i for i, name in enumerate(DEVICE_FIELDS)}
TAU_MIN = tl.constexpr(FIELD["tau_min"])
TAU_MAX = tl.constexpr(FIELD["tau_max"])
GAMMA = tl.constexpr(FIELD["gamma"])
DW_MIN = tl.constexpr(FIELD["dw_min"])
ASYM = tl.constexpr(FIELD["asym"])
D2D_STD = tl.constexpr(FIELD["d2d_std"])
C2C_STD = tl.constexpr(FIELD["c2c_std"])
SHIFT = tl.constexpr(FIELD["shift"])

DEVICE_SPEC = ("family", "d2d", "has_gamma", "c2c", "zero_shift", "table_n", "table_steps")
S_FAMILY, S_D2D, S_HAS_GAMMA, S_C2C, S_ZERO_SHIFT, S_TABLE_N, S_TABLE_STEPS = (tl.constexpr(i) for i in range(len(DEVICE_SPEC)))


@functools.lru_cache(maxsize=1024)
def described_devices(config: AnalogConfig) -> tuple[tuple[float, ...], ...]:
    """The run-time device descriptions of a config's arrays: ``(W's,)``, or ``(W's, P's)`` with a residual.

    Each is ``packing.device_floats`` rounded to float32. Cached per config (configs are
    frozen): packing evaluates symmetric points, a float64 bisection for tables. Variation
    keys are per tensor and not part of it (:func:`variation_keys`).
    """
    return tuple(tuple(f32(v) for v in device_floats(dev)) for dev in pack_config(config, 0) if dev is not None)


def device_tables(config: AnalogConfig, where: torch.device) -> list[torch.Tensor]:
    """The response tables (:func:`table_tensor`) of a config's arrays on ``where``, in ``described_devices`` order."""
    return [table_tensor(dev, where) for dev in pack_config(config, 0) if dev is not None]


def variation_keys(config: AnalogConfig, tensor_id: int) -> list[int]:
    """Philox keys of the device-to-device draws of W and (with a residual) P of one tensor; 0 without variation."""
    return [int(dev.var_key) for dev in pack_config(config, tensor_id) if dev is not None]


def device_spec(dev: Sequence[float], table: torch.Tensor) -> tuple:
    """The compile-time part of one array's device (``DEVICE_SPEC`` order) from its description and table."""
    family = int(dev[FIELD["family"]])
    n_table, steps = table_geometry(table, family)
    d2d = dev[FIELD["d2d_std"]] > 0
    has_gamma = bool(dev[FIELD["has_gamma"]]) and d2d
    return (family, d2d, has_gamma, dev[FIELD["c2c_std"]] > 0, bool(dev[FIELD["zero_shift"]]), n_table, steps)


def variation_rows(var_keys: Sequence[int], dev: Sequence[float]) -> tuple[list[int], list[int]]:
    """(per-tensor variation keys, their ``key ^ 1``: the asymmetry's stream) of one array; zeros without variation."""
    if dev[FIELD["d2d_std"]] > 0:
        return [int(k) for k in var_keys], [int(k) ^ 1 for k in var_keys]
    return [0] * len(var_keys), [0] * len(var_keys)


# Step scalars and flags as the ops carry them (lists in these orders).
STEP_SCALARS = ("lr", "transfer_lr", "gamma", "read_noise", "threshold", "cap")
STEP_FLAGS = ("has_cap", "read_noise", "ema")


def step_scalars(config: AnalogConfig, lr: float) -> list[float]:
    """The float32-rounded ``STEP_SCALARS`` of a step (``cap``: ``config.pulse_cap``, 0 for none)."""
    cap = config.pulse_cap
    values = (lr, config.transfer_lr, config.gamma, config.read_noise, config.threshold, cap if cap is not None else 0.0)
    return [f32(v) for v in values]


def step_flags(config: AnalogConfig) -> list[bool]:
    """The ``STEP_FLAGS`` of a config: a pulse cap, read noise, the rl2 buffer an EMA."""
    return [config.pulse_cap is not None, config.read_noise > 0, config.buffer == "ema"]


def check_arrays(numel: int, **tensors: torch.Tensor) -> None:
    """Flat, contiguous, same-device tensors of ``numel`` elements in a supported storage dtype."""
    where = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name} must be a flat contiguous 1-D tensor (use .view(-1)), got shape {tuple(t.shape)}")
        if t.numel() != numel:
            raise ValueError(f"{name} has {t.numel()} elements, expected {numel} like the main array")
        if t.dtype not in STORAGE_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}: Triton kernels store float32, bfloat16 or float16")
        if where is None:
            where = t.device
        elif t.device != where:
            raise ValueError(f"{name} is on {t.device} but the other arrays are on {where}: put them on one device")
    if where is not None and where.type == "cpu" and not interpreting():
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (set before importing triton)")


def given_arrays(**arrays):
    """The named arrays (or lists of arrays) that are given: a mixed weight ``Wbar`` of None asks for none."""
    return {name: t for name, t in arrays.items() if t is not None}


def mixed_pointers(Wbar: Sequence[torch.Tensor], W: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    """(the Wbar pointer arguments of a launch, whether the kernel writes the mixed weight).

    ``Wbar`` holds one array per tensor, or is empty (or holds empty tensors) when no mixed
    weight is asked for; then W's arrays stand in for the pointers, which the kernel never
    touches (``MIX=False``).
    """
    if len(Wbar) == len(W) and all(b.numel() == w.numel() for b, w in zip(Wbar, W)):
        return list(Wbar), True
    return list(W), False


def check_offset(offset: int) -> int:
    """A shard's global offset as an int; it must be non-negative."""
    offset = int(offset)
    if offset < 0:
        raise ValueError(f"offset (the global index of element 0) must be >= 0, got {offset}")
    return offset


def check_excess(A: torch.Tensor | None, g: torch.Tensor, name: str = "A") -> None:
    """The excess input ``A`` (SPEC section 2a), if given: a flat array like ``g`` on g's device."""
    if A is None:
        return
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(A).__name__}")
    if A.shape != g.shape:
        raise ValueError(f"{name} (the per-sample |g| sums) must have g's shape {tuple(g.shape)}, got {tuple(A.shape)}")
    check_arrays(g.numel(), **{name: A})
    if A.device != g.device:
        raise ValueError(f"{name} is on {A.device} but g is on {g.device}: put them on one device")


def new_counts(numel: int, where: torch.device, totals: bool) -> torch.Tensor:
    """The pulse output of one written array: int32 per element, or a 0-d int64 total (zeroed: kernels add into it)."""
    if totals:
        return torch.zeros((), dtype=torch.int64, device=where)
    return torch.empty(numel, dtype=torch.int32, device=where)


def new_counts_multi(numels: Sequence[int], where: torch.device, totals: bool, arrays: int = 1) -> list[list[torch.Tensor]]:
    """``new_counts`` for ``arrays`` written arrays of several tensors: one list per array, one entry per tensor.

    Totals of one launch are 0-d views of one zeroed buffer (one allocation, one fill).
    """
    if totals:
        buf = torch.zeros(arrays * len(numels), dtype=torch.int64, device=where)
        views = list(buf.unbind())
        return [views[a * len(numels) : (a + 1) * len(numels)] for a in range(arrays)]
    return [[torch.empty(n, dtype=torch.int32, device=where) for n in numels] for _ in range(arrays)]


def is_total(counts: torch.Tensor) -> bool:
    """Whether a pulse output is a total (0-d int64) rather than per-element int32 counts."""
    return counts.dtype == torch.int64


def device_guard(where: torch.device):
    """Context making ``where`` the current CUDA device for a launch (a no-op for CPU tensors)."""
    if where.type == "cuda":
        return torch.cuda.device(where)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------
# Multi-tensor launches
# ----------------------------------------------------------------------------------------
# Per-tensor scalars of the kernels, in the row order of the multi-tensor table; the rows of
# the array addresses follow (the kernel's pointer arguments, in its order). The step keys and
# the pulse outputs, new every step, are in a second table (see tensor_launch).
TENSOR_SCALARS = ("numel", "offset", "first_var_key", "first_var_key_a", "main_var_key", "main_var_key_a")
N_TENSOR_SCALARS = tl.constexpr(len(TENSOR_SCALARS))


def check_tensor_lists(
    arrays: dict[str, Sequence[torch.Tensor]],
    keys: Sequence[int],
    tensor_ids: Sequence[int],
    offsets: Sequence[int] | None,
) -> list[int]:
    """Validate the per-tensor arguments of a multi-tensor launcher; return the offsets (default 0 each).

    One entry per tensor in every list; each tensor's arrays pass :func:`check_arrays`, and
    each array role (``arrays`` maps role names to lists) has one dtype and device.
    """
    offsets = [0] * len(keys) if offsets is None else [check_offset(o) for o in offsets]
    lengths = {len(ts) for ts in arrays.values()} | {len(keys), len(tensor_ids), len(offsets)}
    if not keys or len(lengths) != 1:
        raise ValueError(
            f"{', '.join(arrays)}, keys, tensor_ids and offsets must be non-empty lists of one length (one entry per "
            f"tensor), got lengths {sorted(lengths)}"
        )
    for i in range(len(keys)):
        tensors = {name: ts[i] for name, ts in arrays.items()}
        check_arrays(next(iter(tensors.values())).numel(), **tensors)
    for name, ts in arrays.items():
        for t in ts[1:]:
            if t.dtype != ts[0].dtype or t.device != ts[0].device:
                raise ValueError(
                    f"the {name} arrays of one launch must share dtype and device, got {ts[0].dtype} on {ts[0].device} "
                    f"and {t.dtype} on {t.device}: launch such tensors separately"
                )
    return offsets


def excess_list(As: Sequence[torch.Tensor] | None, g: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The excess inputs of a multi-tensor launcher: ``[]`` for None, else one per tensor like ``g``."""
    if As is None:
        return []
    As = list(As)
    if len(As) != len(g):
        raise ValueError(f"As must hold one array per tensor ({len(g)}), got {len(As)}")
    for i, (a, gi) in enumerate(zip(As, g)):
        check_excess(a, gi, f"As[{i}]")
    for a in As[1:]:
        if a.dtype != As[0].dtype:
            raise ValueError(f"the As arrays of one launch must share one dtype, got {As[0].dtype} and {a.dtype}")
    return As


def device_table(values: list[int], where: torch.device) -> torch.Tensor:
    """``values`` as an int64 tensor on ``where`` (on CUDA copied asynchronously from pinned memory)."""
    table = torch.tensor(values, dtype=torch.int64)
    if where.type == "cpu":
        return table
    return table.pin_memory().to(where, non_blocking=True)


def blocks_of(numel: int, offset: int, block: int) -> int:
    """Programs covering a tensor of ``numel`` elements at global ``offset``: blocks start at multiples of 4."""
    return triton.cdiv(numel + offset % 4, block) if numel > 0 else 0


# Cached device copies of multi-tensor tables: {(device, table values): int64 tensor}, oldest first.
_TABLE_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
TABLE_CACHE_SIZE = 64


def cached_device_table(values: list[int], where: torch.device) -> torch.Tensor:
    """``device_table(values, where)``, reused while the values are the same (LRU of ``TABLE_CACHE_SIZE``).

    A table holds addresses, sizes, offsets and variation keys, all of which stay the same
    from step to step while a model trains, so it is copied to the device once. A table is
    a pure function of its values: an address reused by another tensor of the same shape
    gives the same, still correct table.
    """
    key = (str(where), tuple(values))
    table = _TABLE_CACHE.get(key)
    if table is None:
        table = _TABLE_CACHE[key] = device_table(values, where)
        if len(_TABLE_CACHE) > TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    else:
        _TABLE_CACHE.move_to_end(key)
    return table


def tensor_launch(
    arrays: dict[str, Sequence[torch.Tensor]],
    outputs: dict[str, Sequence[torch.Tensor]],
    scalars: dict[str, Sequence[int]],
    keys: Sequence[int],
    block: int,
) -> tuple[tuple[int], dict] | None:
    """(grid, per-tensor keyword arguments) of one kernel launch over several tensors; None if all are empty.

    Args:
        arrays: the kernel's pointer arguments that stay from step to step (the arrays
            and the inputs), in its order, each with one tensor per updated tensor (the
            first array's numel is the tensor's).
        outputs: its pointer arguments that are new every step (the pulse outputs), in its
            order, one tensor per updated tensor.
        scalars: the per-tensor scalar arguments the kernel takes besides ``numel`` and
            ``key`` (names from ``TENSOR_SCALARS``; ``offset`` among them), one value per tensor.
        keys: the step key of each tensor.
        block: elements per program.

    Empty tensors are left out. One tensor is passed directly (``MULTI=False``, with
    ``lead = offset % 4``, the elements of its first block before the offset). Several
    are described by two int64 tables (``MULTI=True``): ``table_ptr``, ``[first block of
    each tensor and the total (T + 1) | row r of TENSOR_SCALARS (T each) | addresses of
    array a (T each)]``, cached on the device (:func:`cached_device_table`), and
    ``step_ptr``, ``[step keys (T) | addresses of output o (T each)]``, copied every step.
    The pointer arguments then carry the first tensor's arrays only for their element
    types, the scalar arguments 0, and the constexprs ``ALIGNED`` and ``NUMEL16`` say what
    the tables' values allow the compiler to assume (see :func:`multi_tensor_extent`,
    :func:`tensor_array`).
    """
    first = next(iter(arrays.values()))
    rows = {"numel": [t.numel() for t in first], **scalars}
    live = [i for i, n in enumerate(rows["numel"]) if n > 0]
    if not live:
        return None
    blocks = [blocks_of(rows["numel"][i], int(rows["offset"][i]), block) for i in live]
    pointers = {**arrays, **outputs}
    if len(live) == 1:
        (i,) = live
        kwargs = {name: ts[i] for name, ts in pointers.items()}
        kwargs.update({name: int(values[i]) for name, values in rows.items()})
        kwargs.update(key=int(keys[i]), lead=int(rows["offset"][i]) % 4)
        kwargs.update(table_ptr=None, step_ptr=None, n_tensors=1, search_steps=0, MULTI=False)
        # One tensor: Triton specializes its pointers, numel and lead on alignment itself.
        kwargs.update(ALIGNED=False, NUMEL16=False)
        return (blocks[0],), kwargs
    starts = [0]
    for b in blocks:
        starts.append(starts[-1] + b)
    values = list(starts)
    for name in TENSOR_SCALARS:
        values += [int(rows[name][i]) if name in rows else 0 for i in live]
    for ts in arrays.values():
        values += [ts[i].data_ptr() for i in live]
    step_values = [int(keys[i]) for i in live]
    for ts in outputs.values():
        step_values += [ts[i].data_ptr() for i in live]
    kwargs = {name: ts[live[0]] for name, ts in pointers.items()}
    kwargs.update({name: 0 for name in rows})
    # Alignment facts for the compiler (the tables hide them): array starts at multiples of
    # 16 bytes (0-d totals are never accessed by vectors and do not count) and blocks that
    # start at multiples of 4 elements; numels that are multiples of 16.
    aligned = all(ts[i].data_ptr() % 16 == 0 for ts in pointers.values() for i in live if ts[i].dim() > 0)
    aligned = aligned and all(int(rows["offset"][i]) % 4 == 0 for i in live)
    kwargs.update(ALIGNED=aligned, NUMEL16=all(rows["numel"][i] % 16 == 0 for i in live))
    where = first[live[0]].device
    kwargs.update(
        key=0,
        lead=0,
        table_ptr=cached_device_table(values, where),
        step_ptr=device_table(step_values, where),
        n_tensors=len(live),
        search_steps=math.ceil(math.log2(len(live))),
        MULTI=True,
    )
    return (starts[-1],), kwargs


@triton.jit
def _table_entry(table_ptr, n_tensors, t, row):
    """Row ``row`` of tensor ``t`` in a multi-tensor table (see :func:`tensor_launch`)."""
    return tl.load(table_ptr + (n_tensors + 1) + row * n_tensors + t)


@triton.jit
def multi_tensor_block(table_ptr, n_tensors, search_steps):
    """(tensor, block within that tensor) of this program in a multi-tensor launch.

    Binary search of the first blocks ``starts`` (the table's head) for the last tensor
    ``t`` with ``starts[t] <= program id``, keeping ``starts[lo] <= pid < starts[hi]``;
    ``search_steps = ceil(log2(n_tensors))`` halvings leave ``hi = lo + 1``.
    """
    pid = tl.program_id(0).to(tl.int64)
    lo = pid * 0
    hi = lo + n_tensors
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        right = tl.load(table_ptr + mid) <= pid
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo, pid - tl.load(table_ptr + lo)


@triton.jit
def tensor_scalars(table_ptr, n_tensors, t):
    """The ``TENSOR_SCALARS`` of tensor ``t`` in a multi-tensor table, in that order."""
    return (
        _table_entry(table_ptr, n_tensors, t, 0),
        _table_entry(table_ptr, n_tensors, t, 1),
        _table_entry(table_ptr, n_tensors, t, 2),
        _table_entry(table_ptr, n_tensors, t, 3),
        _table_entry(table_ptr, n_tensors, t, 4),
        _table_entry(table_ptr, n_tensors, t, 5),
    )


@triton.jit
def tensor_key(step_ptr, t):
    """The step key of tensor ``t`` of a multi-tensor launch (the step table's first row)."""
    return tl.load(step_ptr + t)


@triton.jit
def tensor_output(step_ptr, n_tensors, t, output: tl.constexpr, like, ALIGNED: tl.constexpr = False):
    """Pointer to output ``output`` (the kernel's pulse outputs, counted in order) of tensor ``t``, typed as ``like``."""
    address = tl.load(step_ptr + (output + 1) * n_tensors + t)
    ptr = address.to(tl.pointer_type(like.dtype.element_ty))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def tensor_array(table_ptr, n_tensors, t, array: tl.constexpr, like, ALIGNED: tl.constexpr = False):
    """Pointer to array ``array`` (the kernel's pointer arguments, counted in order) of tensor ``t``, typed as ``like``.

    ``ALIGNED``: the launcher checked that every tensor's array starts at a multiple of 16
    bytes, which lets the compiler vectorise its accesses.
    """
    address = _table_entry(table_ptr, n_tensors, t, N_TENSOR_SCALARS + array)
    ptr = address.to(tl.pointer_type(like.dtype.element_ty))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def multi_tensor_extent(numel, offset, ALIGNED: tl.constexpr, NUMEL16: tl.constexpr):
    """(numel, lead) of a tensor of a multi-tensor launch, with the alignment facts the launcher checked.

    ``ALIGNED``: every offset is a multiple of 4 (``lead = 0``, blocks start at multiples of
    the block size); ``NUMEL16``: every numel is a multiple of 16 (masks are constant over
    vectors).
    """
    if NUMEL16:
        numel = (numel >> 4) * 16  # the same value, with its divisibility visible to the compiler
    if ALIGNED:
        lead = 0
    else:
        lead = offset & 3
    return numel, lead


@triton.jit
def block_range(block, offset, lead, numel, BLOCK: tl.constexpr):
    """(positions in the tensor, mask, global indices, first Philox call) of one program's block.

    Blocks are aligned to the global element index: block ``b`` covers global indices
    ``offset - lead + b * BLOCK + [0, BLOCK)`` with ``lead = offset % 4``, so it holds the
    whole Philox calls ``offset // 4 + b * BLOCK // 4 + [0, BLOCK // 4)``; positions
    outside ``[0, numel)`` (the ``lead`` ones before the offset, the tail) are masked.
    """
    b = block.to(tl.int64)
    off = tl.to_tensor(offset).to(tl.int64)
    local = b * BLOCK - lead + tl.arange(0, BLOCK)
    mask = (local >= 0) & (local < numel)
    call0 = (off >> 2) + b * (BLOCK // 4)
    return local, mask, local + off, call0


# ----------------------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------------------
@triton.jit
def load_f32(ptr, offs, mask):
    """Load a block and widen it to float32 exactly (bfloat16 by shifting its bits)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.uint16, bitcast=True)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_f32(ptr, offs, x, mask):
    """Store float32 ``x`` in the array's dtype (round to nearest even); return the stored value as float32."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a quiet NaN
        tl.store(ptr + offs, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        return (rounded << 16).to(tl.float32, bitcast=True)
    elif ptr.dtype.element_ty == tl.float16:
        h = x.to(tl.float16)
        tl.store(ptr + offs, h, mask=mask)
        return h.to(tl.float32)
    else:
        tl.store(ptr + offs, x, mask=mask)
        return x


# ----------------------------------------------------------------------------------------
# Random numbers (SPEC section 4)
# ----------------------------------------------------------------------------------------
# Stream salts (philox.STREAM_SALT): stream s of a step is keyed step_key ^ SALT_s.
SALT_ROUND_FIRST = tl.constexpr(philox.STREAM_SALT[philox.STREAM_ROUND_FIRST])
SALT_PAIRS_FIRST = tl.constexpr(philox.STREAM_SALT[philox.STREAM_PAIRS_FIRST])
SALT_ROUND_W = tl.constexpr(philox.STREAM_SALT[philox.STREAM_ROUND_W])
SALT_C2C_FIRST = tl.constexpr(philox.STREAM_SALT[philox.STREAM_C2C_FIRST])
SALT_READ_P = tl.constexpr(philox.STREAM_SALT[philox.STREAM_READ_P])
SALT_C2C_W = tl.constexpr(philox.STREAM_SALT[philox.STREAM_C2C_W])


@triton.jit
def normal_pair(ra, rb):
    """Two normals (cosine, sine) from two 32-bit words, by Triton's Box-Muller."""
    return tl.pair_uniform_to_normal(tl.uint_to_uniform_float(ra), tl.uint_to_uniform_float(rb))


@triton.jit
def interleave4(a, b, c, d, BLOCK: tl.constexpr):
    """``[a0, b0, c0, d0, a1, b1, ...]`` (``BLOCK`` elements): element ``4j + k`` is element ``j`` of the k-th input.

    ``join(join(a, c), join(b, d))`` has shape ``[BLOCK // 4, 2, 2]`` with ``[j, i, k]`` the
    input ``2 i + k``; its row-major reshape is the interleaving (``tl.interleave`` twice,
    written with builtins only).
    """
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), [BLOCK])


@triton.jit
def stream_uniform(key, call0, SALT: tl.constexpr, BLOCK: tl.constexpr):
    """Uniforms of the ``BLOCK`` elements from global index ``4 * call0`` on, of the stream keyed ``key ^ SALT``.

    One Philox call per four elements: calls ``call0 + [0, BLOCK // 4)``, element ``4j + k``
    takes word ``k`` of call ``j``.
    """
    k = tl.to_tensor(key).to(tl.int64)
    if SALT != 0:
        k = k ^ SALT
    r0, r1, r2, r3 = tl.randint4x(k, call0 + tl.arange(0, BLOCK // 4).to(tl.int64))
    return tl.uint_to_uniform_float(interleave4(r0, r1, r2, r3, BLOCK))


@triton.jit
def stream_normal(key, call0, SALT: tl.constexpr, BLOCK: tl.constexpr):
    """Normals of the ``BLOCK`` elements from global index ``4 * call0`` on, of the stream keyed ``key ^ SALT``.

    Elements ``4j, 4j + 1`` are the (cosine, sine) Box-Muller pair of words ``(r0, r1)``
    of call ``j``, elements ``4j + 2, 4j + 3`` that of ``(r2, r3)``.
    """
    k = tl.to_tensor(key).to(tl.int64)
    if SALT != 0:
        k = k ^ SALT
    r0, r1, r2, r3 = tl.randint4x(k, call0 + tl.arange(0, BLOCK // 4).to(tl.int64))
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    return interleave4(n0, n1, n2, n3, BLOCK)


@triton.jit
def _vary(mean, z, d2d):
    """``mean * max(1 + d2d * clamp(z, -3, 3), 0.05)`` in float32 (``ResponseDevice.element_params``)."""
    factor = tl.maximum(1.0 + d2d * tl.minimum(tl.maximum(z, -3.0), 3.0), 0.05)
    return mean * factor


@triton.jit
def element_params(idx, var_key, var_key_a, tmin, tmax, gamma, dw, asym, d2d, HAS_GAMMA: tl.constexpr):
    """Per-element ``(tau_min, tau_max, gamma, dw_min, asym)`` of global elements ``idx``."""
    z0, z1, z2, z3 = tl.randn4x(var_key, idx)
    ra0, ra1, _, _ = tl.randint4x(var_key_a, idx)
    za, _ = normal_pair(ra0, ra1)
    e_tmin = _vary(tmin, z0, d2d)
    e_tmax = _vary(tmax, z1, d2d)
    if HAS_GAMMA:
        e_gamma = _vary(gamma, z2, d2d)
    else:
        e_gamma = gamma
    e_dw = _vary(dw, z3, d2d)
    e_asym = tl.minimum(tl.maximum(_vary(asym, za, d2d), -0.99), 0.99)
    return e_tmin, e_tmax, e_gamma, e_dw, e_asym


# ----------------------------------------------------------------------------------------
# Responses (SPEC section 1)
# ----------------------------------------------------------------------------------------
@triton.jit
def expm1_f64(x):
    """``exp(x) - 1`` in float64, accurate to ~1e-11 relative (Taylor series near 0)."""
    small = x + x * x * 0.5 + x * x * x * (1.0 / 6.0)
    return tl.where(tl.abs(x) < 1e-5, small, tl.exp(x) - 1.0)


@triton.jit
def _shape(u, gamma, FAMILY: tl.constexpr):
    """Response of the analytic family at normalised distance ``u`` in [0, 2], before asymmetry."""
    if FAMILY == POWER:
        # u ** gamma, evaluated as exp(gamma * log(u)) in float64 and rounded once.
        # An exponent of 0.5 is the square root, correctly rounded (PowerResponse._shape).
        u64 = u.to(tl.float64)
        pos = u64 > 0.0
        r = tl.exp(gamma.to(tl.float64) * tl.log(tl.where(pos, u64, 1.0)))
        return tl.where(gamma == 0.5, tl.sqrt_rn(u), tl.where(pos, r, 0.0).to(tl.float32))
    elif FAMILY == EXP:
        # expm1(gamma * u) / expm1(gamma): each expm1 rounded to float32 as torch.expm1 returns it.
        num = expm1_f64((gamma * u).to(tl.float64)).to(tl.float32)
        den = expm1_f64(gamma.to(tl.float64)).to(tl.float32)
        return tl.div_rn(num, den)
    else:
        return u


@triton.jit
def response(w, up, tmin, tmax, gamma, asym, table_ptr, FAMILY: tl.constexpr, TABLE_N: tl.constexpr):
    """``q_up(w)`` where ``up`` else ``q_down(w)``, float32, physical weight ``w``.

    Analytic families: ``u_up = clamp((tau_max - w) / half, 0, 2)``, ``u_down =
    clamp((w - tau_min) / half, 0, 2)`` with ``half = (tau_max - tau_min) / 2``.
    Tables: linear interpolation of the float32 samples on the uniform grid over
    ``[tau_min, tau_max]`` (``TableResponse._interp``). Then ``* (1 + a)`` for up,
    ``* (1 - a)`` for down. Only the selected direction is evaluated.
    """
    if FAMILY == TABLE:
        x = tl.minimum(tl.maximum(tl.div_rn(w - tmin, tmax - tmin), 0.0), 1.0) * TABLE_N
        fl = tl.minimum(tl.floor(x), TABLE_N - 1)
        frac = x - fl
        i = tl.minimum(tl.maximum(fl.to(tl.int32), 0), TABLE_N - 1)
        i = i + tl.where(up, 0, TABLE_N + 1)
        t0 = tl.load(table_ptr + i).to(tl.float32)
        t1 = tl.load(table_ptr + i + 1).to(tl.float32)
        r = t0 + (t1 - t0) * frac
    else:
        half = tl.div_rn(tmax - tmin, 2.0)
        u = tl.where(up, tl.div_rn(tmax - w, half), tl.div_rn(w - tmin, half))
        u = tl.minimum(tl.maximum(u, 0.0), 2.0)
        r = _shape(u, gamma, FAMILY)
    return r * tl.where(up, 1.0 + asym, 1.0 - asym)


@triton.jit
def _table_g(table_ptr, k, a64, TABLE_N: tl.constexpr):
    """``2 G`` at knot ``k`` in float64: ``(1 - a) down_k - (1 + a) up_k``."""
    up = tl.load(table_ptr + k)
    down = tl.load(table_ptr + TABLE_N + 1 + k)
    return (1.0 - a64) * down - (1.0 + a64) * up


@triton.jit
def symmetric_point(
    tmin, tmax, gamma, asym, table_ptr, FAMILY: tl.constexpr, TABLE_N: tl.constexpr, TABLE_STEPS: tl.constexpr
):
    """Per-element symmetric point (``G = 0``), float32, like ``<Family>.symmetric_point``.

    Linear: ``((1 + a) tau_max + (1 - a) tau_min) / 2`` in float32. Power:
    ``tau_min + (tau_max - tau_min) / 2 * 2 / (1 + ((1 - a) / (1 + a)) ** (1 / gamma))``
    in float64. Exponential: ``u_down = log(x) / gamma`` with ``x`` the positive root of
    ``(1 - a) x^2 + 2 a x - (1 + a) e^{2 gamma}``, in float64. Tables: ``G`` is piecewise
    linear between the grid knots, so instead of the reference's 60 float64 halvings
    over ``[tau_min, tau_max]`` this bisects over the knot indices (``TABLE_STEPS =
    ceil(log2 n)`` steps, keeping ``G(lo) <= 0 < G(hi)`` like the reference) and then
    solves the linear segment exactly in float64. Both land within ~1e-16 of the same
    crossing, so the float32 results agree whenever ``G`` crosses zero once (true for
    every device whose ``q_up`` falls and ``q_down`` rises); with several crossings the
    two may pick different ones.
    """
    if FAMILY == LINEAR:
        return tl.div_rn((1.0 + asym) * tmax + (1.0 - asym) * tmin, 2.0)
    elif FAMILY == POWER:
        a = asym.to(tl.float64)
        g = gamma.to(tl.float64)
        ratio = tl.exp(tl.log((1.0 - a) / (1.0 + a)) * (1.0 / g))
        u_down = 2.0 / (1.0 + ratio)
        lo = tmin.to(tl.float64)
        hi = tmax.to(tl.float64)
        return (lo + (hi - lo) / 2.0 * u_down).to(tl.float32)
    elif FAMILY == EXP:
        a = asym.to(tl.float64)
        g = gamma.to(tl.float64)
        x = (-a + tl.sqrt(a * a + (1.0 - a * a) * tl.exp(2.0 * g))) / (1.0 - a)
        u_down = tl.log(x) / g
        lo = tmin.to(tl.float64)
        hi = tmax.to(tl.float64)
        return (lo + (hi - lo) / 2.0 * u_down).to(tl.float32)
    else:
        a = asym.to(tl.float64)
        k_lo = tl.zeros_like(a).to(tl.int32)
        k_hi = k_lo + TABLE_N
        for _ in tl.static_range(TABLE_STEPS):
            active = (k_hi - k_lo) > 1
            mid = (k_lo + k_hi) // 2
            above = _table_g(table_ptr, mid, a, TABLE_N) > 0.0
            k_hi = tl.where(active & above, mid, k_hi)
            k_lo = tl.where(active & (~above), mid, k_lo)
        g_lo = _table_g(table_ptr, k_lo, a, TABLE_N)
        g_hi = _table_g(table_ptr, k_lo + 1, a, TABLE_N)
        x = k_lo.to(tl.float64) + g_lo / (g_lo - g_hi)
        lo = tmin.to(tl.float64)
        hi = tmax.to(tl.float64)
        return (lo + (hi - lo) * (x / TABLE_N)).to(tl.float32)


# ----------------------------------------------------------------------------------------
# Pulses (SPEC section 2)
# ----------------------------------------------------------------------------------------
@triton.jit
def stochastic_round(n, u):
    """``floor(n) + (u < n - floor(n))``: unbiased stochastic rounding (float32)."""
    fl = tl.floor(n)
    return fl + (u < (n - fl)).to(tl.float32)


@triton.jit
def truncate(n):
    """``trunc(n)`` (toward zero), float32."""
    return tl.where(n < 0.0, tl.ceil(n), tl.floor(n))


@triton.jit
def directional_counts(net, pairs, cap, PAIRS: tl.constexpr, CAP: tl.constexpr):
    """``(N_up, N_down) = (M + max(N, 0), M + max(-N, 0))``, each capped at ``cap`` if ``CAP``; ``M = pairs`` if ``PAIRS`` else 0."""
    up = tl.maximum(net, 0.0)
    down = tl.maximum(-net, 0.0)
    if PAIRS:
        up = pairs + up
        down = pairs + down
    if CAP:
        up = tl.minimum(up, cap)
        down = tl.minimum(down, cap)
    return up, down


@triton.jit
def threshold_count(h, threshold, dw):
    """The rl2 "accumulate" transfer count: ``trunc(h / dw)`` where ``|h| >= threshold * dw``, else 0 (float32)."""
    return truncate(tl.where(tl.abs(h) >= threshold * dw, tl.div_rn(h, dw), 0.0))


@triton.jit
def apply_pulses(x, up, down, z, params, c2c, table_ptr, SPEC: tl.constexpr, PAIRS: tl.constexpr):
    """Stored value after ``up`` up and ``down`` down pulses (float32), as ``reference.apply_pulses``.

    ``params`` are the array's ``(tau_min, tau_max, gamma, dw_min, asym, shift)``
    (:func:`array_params`), ``SPEC`` its compile-time device. ``delta = [(up dw) q_up if
    up > 0] - [(down dw) q_down if down > 0]``, plus with cycle-to-cycle noise ``((c2c dw)
    sqrt([(up q_up) q_up] + [(down q_down) q_down])) z``; then ``x + delta`` clamped to
    ``[tau_min - shift, tau_max - shift]``. Responses are evaluated at ``x + shift``
    (``shift`` used only for a zero-shifted array). Without ``PAIRS`` at most one direction
    has pulses, and only its response is evaluated.
    """
    tmin, tmax, gamma, dw, asym, shift = params
    FAMILY: tl.constexpr = SPEC[S_FAMILY]
    TABLE_N: tl.constexpr = SPEC[S_TABLE_N]
    if SPEC[S_ZERO_SHIFT]:
        w = x + shift
    else:
        w = x
    has_up = up > 0.0
    has_down = down > 0.0
    if PAIRS:
        q_up = response(w, tl.full(w.shape, True, tl.int1), tmin, tmax, gamma, asym, table_ptr, FAMILY, TABLE_N)
        q_down = response(w, tl.full(w.shape, False, tl.int1), tmin, tmax, gamma, asym, table_ptr, FAMILY, TABLE_N)
    else:
        q_up = response(w, has_up, tmin, tmax, gamma, asym, table_ptr, FAMILY, TABLE_N)
        q_down = q_up
    delta = tl.where(has_up, (up * dw) * q_up, 0.0) - tl.where(has_down, (down * dw) * q_down, 0.0)
    if SPEC[S_C2C]:
        var = tl.where(has_up, (up * q_up) * q_up, 0.0) + tl.where(has_down, (down * q_down) * q_down, 0.0)
        delta = delta + ((c2c * dw) * tl.sqrt_rn(var)) * z
    x_new = x + delta
    if SPEC[S_ZERO_SHIFT]:
        lo = tmin - shift
        hi = tmax - shift
    else:
        lo = tmin
        hi = tmax
    return tl.minimum(tl.maximum(x_new, lo), hi)


@triton.jit
def report_pulses(count_ptr, pairs_ptr, local, mask, up, down, PAIRS: tl.constexpr, TOTALS: tl.constexpr):
    """Write one array's pulses: per element the net ``up - down`` (and with ``PAIRS`` ``min(up, down)``), int32;
    with ``TOTALS`` instead add the block's ``sum(up + down)`` into the 0-d int64 ``count_ptr``."""
    if TOTALS:
        n = tl.where(mask, up.to(tl.int64) + down.to(tl.int64), 0)
        tl.atomic_add(count_ptr, tl.sum(n, axis=0), sem="relaxed")
    else:
        tl.store(count_ptr + local, (up - down).to(tl.int32), mask=mask)
        if PAIRS:
            tl.store(pairs_ptr + local, tl.minimum(up, down).to(tl.int32), mask=mask)


@triton.jit
def array_params(idx, var_keys, dev, table_ptr, SPEC: tl.constexpr):
    """``(tau_min, tau_max, gamma, dw_min, asym, shift)`` of one array: scalars, or per element with variation.

    ``var_keys``: the array's ``(variation key, variation key ^ 1)``; ``dev`` its run-time
    device description (``packing.DEVICE_FIELDS``), ``SPEC`` its compile-time one
    (``DEVICE_SPEC``). ``shift`` is the symmetric point of a zero-shifted array: the
    nominal one of ``dev`` without variation, else computed per element from that
    element's parameters.
    """
    tmin = tl.to_tensor(dev[TAU_MIN])
    tmax = tl.to_tensor(dev[TAU_MAX])
    gamma = tl.to_tensor(dev[GAMMA])
    dw = tl.to_tensor(dev[DW_MIN])
    asym = tl.to_tensor(dev[ASYM])
    if SPEC[S_D2D]:
        var_key, var_key_a = var_keys
        e_tmin, e_tmax, e_gamma, e_dw, e_asym = element_params(
            idx, var_key, var_key_a, tmin, tmax, gamma, dw, asym, tl.to_tensor(dev[D2D_STD]), SPEC[S_HAS_GAMMA]
        )
        if SPEC[S_ZERO_SHIFT]:
            e_shift = symmetric_point(
                e_tmin, e_tmax, e_gamma, e_asym, table_ptr, SPEC[S_FAMILY], SPEC[S_TABLE_N], SPEC[S_TABLE_STEPS]
            )
        else:
            e_shift = tl.to_tensor(dev[SHIFT])
        return e_tmin, e_tmax, e_gamma, e_dw, e_asym, e_shift
    else:
        return tmin, tmax, gamma, dw, asym, tl.to_tensor(dev[SHIFT])


@triton.jit
def write_pulses(X_ptr, blk, key, x, up, down, params, dev, table_ptr, SPEC: tl.constexpr, C2C_SALT: tl.constexpr,
                 PAIRS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Apply ``up``/``down`` pulses to ``x`` (c2c noise from the stream salted ``C2C_SALT``) and store the array;
    returns it as stored, in float32."""
    local, mask, _, call0 = blk
    if SPEC[S_C2C]:
        z = stream_normal(key, call0, C2C_SALT, BLOCK)
    else:
        z = 0.0
    x_new = apply_pulses(x, up, down, z, params, dev[C2C_STD], table_ptr, SPEC, PAIRS)
    return store_f32(X_ptr, local, x_new, mask)


@triton.jit
def first_write(X_ptr, blk, key, g, a, lr, cap, dev, var_keys, table_ptr, SPEC: tl.constexpr, HAS_A: tl.constexpr,
                HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """The gradient-driven write of the first array (W for asgd, P for rl/rl2).

    ``blk``: the block of :func:`block_range`. ``n = (-lr g) / dw`` rounds with stream 0;
    with ``HAS_A`` the excess ``e = (lr max(a - |g|, 0)) 0.5`` gives ``m = e / dw`` pairs,
    rounded with stream 1; cycle-to-cycle noise from stream 3. Returns the array as stored
    and the pulses ``(N_up, N_down)``, float32, for :func:`report_pulses`.
    """
    local, mask, idx, call0 = blk
    x = load_f32(X_ptr, local, mask)
    params = array_params(idx, var_keys, dev, table_ptr, SPEC)
    e_dw = params[3]
    lr32 = tl.to_tensor(lr)
    d = (-lr32) * g
    net = stochastic_round(tl.div_rn(d, e_dw), stream_uniform(key, call0, SALT_ROUND_FIRST, BLOCK))
    if HAS_A:
        excess = a - tl.abs(g)
        e = (lr32 * tl.where(excess > 0.0, excess, 0.0)) * 0.5  # a NaN A: no pairs (fmax)
        pairs = stochastic_round(tl.div_rn(e, e_dw), stream_uniform(key, call0, SALT_PAIRS_FIRST, BLOCK))
    else:
        pairs = net
    up, down = directional_counts(net, pairs, cap, HAS_A, HAS_CAP)
    return write_pulses(X_ptr, blk, key, x, up, down, params, dev, table_ptr, SPEC, SALT_C2C_FIRST, HAS_A, BLOCK), up, down


@triton.jit
def transfer_write(W_ptr, blk, key, x, n, cap, params, dev, table_ptr, SPEC: tl.constexpr, HAS_CAP: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
    """A transfer's write of W with net count ``n`` (already rounded, no pairs): c2c noise from stream 5.

    ``params``: W's :func:`array_params`. Stores W; returns it as stored and the pulses
    ``(N_up, N_down)``, float32, for :func:`report_pulses`.
    """
    up, down = directional_counts(n, n, cap, False, HAS_CAP)
    return write_pulses(W_ptr, blk, key, x, up, down, params, dev, table_ptr, SPEC, SALT_C2C_W, False, BLOCK), up, down
