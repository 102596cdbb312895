"""Fused Analog SGD step: ``W <- pulse_update_W(W, -lr * g, e)`` in one pass (SPEC section 3).

Per element ``i`` (global index ``offset + i``), float32 math:

    d = (-lr) * g;  n = d / dw_min
    N = floor(n) + (u0 < n - floor(n))               u0: stream 0
    with A:  e = (lr * max(A - |g|, 0)) * 0.5;  m = e / dw_min
             M = floor(m) + (u1 < m - floor(m))       u1: stream 1
    N_up = M + max(N, 0), N_down = M + max(-N, 0)     (M = 0 without A; each capped)
    W = clamp(W + [(N_up dw) q_up] - [(N_down dw) q_down] + c2c noise, tau_min, tau_max)

with the c2c normal from stream 3 (see ``common.apply_pulses``). Each Philox call serves
four elements. Reads g (and A) and W, writes W and the int32 net counts (with A also the
int32 pairs), or with ``totals`` only one int64 total per tensor: 12 bytes per element at
float32 (16 with A).

``asgd_multi_step_triton`` updates several tensors of one config in one launch
(``common.tensor_launch``), each exactly as ``asgd_step_triton`` would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ...config import AnalogConfig
from ..reference import StepPulses
from .common import (
    block_range,
    block_size,
    check_arrays,
    check_excess,
    check_offset,
    check_tensor_lists,
    device_guard,
    excess_list,
    first_write,
    is_total,
    kernel_device_args,
    launch_options,
    load_f32,
    multi_tensor_block,
    multi_tensor_extent,
    new_counts,
    new_counts_multi,
    packed_arrays,
    prefixed,
    step_scalars,
    table_tensor,
    tensor_array,
    tensor_key,
    tensor_launch,
    tensor_output,
    tensor_scalars,
    variation_rows,
)


@triton.jit
def _asgd_step_kernel(
    W_ptr,
    g_ptr,
    A_ptr,
    count_ptr,
    pairs_ptr,
    numel,
    key,
    offset,
    lead,
    w_var_key,
    w_var_key_a,
    table_ptr,
    step_ptr,
    n_tensors,
    search_steps,
    lr,
    cap,
    w_tmin,
    w_tmax,
    w_gamma,
    w_dw,
    w_asym,
    w_d2d,
    w_c2c,
    w_shift,
    w_table,
    HAS_A: tl.constexpr,
    HAS_CAP: tl.constexpr,
    TOTALS: tl.constexpr,
    W_FAMILY: tl.constexpr,
    W_D2D: tl.constexpr,
    W_HAS_GAMMA: tl.constexpr,
    W_C2C: tl.constexpr,
    W_ZERO_SHIFT: tl.constexpr,
    W_TABLE_N: tl.constexpr,
    W_TABLE_STEPS: tl.constexpr,
    MULTI: tl.constexpr,
    ALIGNED: tl.constexpr,
    NUMEL16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One block of one tensor: the tensor's arrays and scalars are the arguments, or with ``MULTI`` come from ``table_ptr``."""
    if MULTI:
        t, block = multi_tensor_block(table_ptr, n_tensors, search_steps)
        numel, offset, w_var_key, w_var_key_a, _, _ = tensor_scalars(table_ptr, n_tensors, t)
        key = tensor_key(step_ptr, t)
        numel, lead = multi_tensor_extent(numel, offset, ALIGNED, NUMEL16)
        W_ptr = tensor_array(table_ptr, n_tensors, t, 0, W_ptr, ALIGNED)
        g_ptr = tensor_array(table_ptr, n_tensors, t, 1, g_ptr, ALIGNED)
        if HAS_A:
            A_ptr = tensor_array(table_ptr, n_tensors, t, 2, A_ptr, ALIGNED)
        count_ptr = tensor_output(step_ptr, n_tensors, t, 0, count_ptr, ALIGNED and not TOTALS)
        if HAS_A and not TOTALS:
            pairs_ptr = tensor_output(step_ptr, n_tensors, t, 1, pairs_ptr, ALIGNED)
    else:
        block = tl.program_id(0)
    local, mask, idx, call0 = block_range(block, offset, lead, numel, BLOCK)

    g = load_f32(g_ptr, local, mask)
    if HAS_A:
        a = load_f32(A_ptr, local, mask)
    else:
        a = g
    first_write(
        W_ptr,
        count_ptr,
        pairs_ptr,
        local,
        mask,
        idx,
        call0,
        key,
        g,
        a,
        lr,
        cap,
        w_tmin,
        w_tmax,
        w_gamma,
        w_dw,
        w_asym,
        w_d2d,
        w_c2c,
        w_shift,
        w_var_key,
        w_var_key_a,
        w_table,
        HAS_A,
        HAS_CAP,
        TOTALS,
        W_FAMILY,
        W_D2D,
        W_HAS_GAMMA,
        W_C2C,
        W_ZERO_SHIFT,
        W_TABLE_N,
        W_TABLE_STEPS,
        BLOCK,
    )


def _launch(W, g, A, pulses, pairs, table_w, keys, offsets, var_keys_w, lr, cap, has_cap, dev_w_floats, dev_w_ints):
    """One launch over the tensors ``W[i], g[i], pulses[i]`` (lists, one entry per tensor; ``A``, ``pairs`` may be empty)."""
    has_a = len(A) == len(W)
    totals = is_total(pulses[0])
    launch = tensor_launch(
        {"W_ptr": W, "g_ptr": g, "A_ptr": A if has_a else g},
        {"count_ptr": pulses, "pairs_ptr": pairs if has_a and not totals else pulses},
        {"offset": offsets, **variation_rows("w", var_keys_w, dev_w_floats)},
        keys,
        block_size(),
    )
    if launch is None:
        return
    grid, per_tensor = launch
    runtime, const = kernel_device_args(dev_w_floats, dev_w_ints, table_w)
    with device_guard(W[0].device):
        _asgd_step_kernel[grid](
            lr=lr,
            cap=cap,
            HAS_A=has_a,
            HAS_CAP=has_cap,
            TOTALS=totals,
            BLOCK=block_size(),
            **per_tensor,
            **prefixed("w", runtime, const),
            **launch_options(),
        )


@torch.library.custom_op("fastanalog::asgd_step_triton_", mutates_args=("W", "pulses", "pairs"))
def asgd_step_triton_(
    W: torch.Tensor,
    g: torch.Tensor,
    A: torch.Tensor | None,
    pulses: torch.Tensor,
    pairs: torch.Tensor,
    table_w: torch.Tensor,
    key: int,
    offset: int,
    lr: float,
    cap: float,
    has_cap: bool,
    dev_w_floats: list[float],
    dev_w_ints: list[int],
) -> None:
    """In-place Analog SGD step (the op behind :func:`asgd_step_triton`); see ``common.DeviceArgs``.

    ``A`` None: no excess. ``pulses``: int32 net counts per element, or a 0-d int64 total
    (then nothing per element is written); ``pairs``: int32 per element when ``A`` is given
    and ``pulses`` is per element, else empty (left alone).
    """
    _launch(
        [W],
        [g],
        [A] if A is not None else [],
        [pulses],
        [pairs],
        table_w,
        [key],
        [offset],
        [dev_w_ints[1]],
        lr,
        cap,
        has_cap,
        dev_w_floats,
        dev_w_ints,
    )


@asgd_step_triton_.register_fake
def _(W, g, A, pulses, pairs, table_w, key, offset, lr, cap, has_cap, dev_w_floats, dev_w_ints) -> None:
    return None


@torch.library.custom_op("fastanalog::asgd_multi_step_triton_", mutates_args=("W", "pulses", "pairs"))
def asgd_multi_step_triton_(
    W: list[torch.Tensor],
    g: list[torch.Tensor],
    A: list[torch.Tensor],
    pulses: list[torch.Tensor],
    pairs: list[torch.Tensor],
    table_w: torch.Tensor,
    keys: list[int],
    offsets: list[int],
    var_keys_w: list[int],
    lr: float,
    cap: float,
    has_cap: bool,
    dev_w_floats: list[float],
    dev_w_ints: list[int],
) -> None:
    """In-place Analog SGD step of several tensors in one launch (the op behind :func:`asgd_multi_step_triton`).

    Per tensor ``i``: ``W[i], g[i], A[i], pulses[i], pairs[i]``, ``keys[i]``, ``offsets[i]`` and
    the variation key ``var_keys_w[i]``; ``A`` empty: no excess; pulse outputs as in
    ``asgd_step_triton_``. The device lists (``common.DeviceArgs``) are shared, their
    variation key unused.
    """
    _launch(W, g, A, pulses, pairs, table_w, keys, offsets, var_keys_w, lr, cap, has_cap, dev_w_floats, dev_w_ints)


@asgd_multi_step_triton_.register_fake
def _(W, g, A, pulses, pairs, table_w, keys, offsets, var_keys_w, lr, cap, has_cap, dev_w_floats, dev_w_ints) -> None:
    return None


def _pulses(count: torch.Tensor, pairs: torch.Tensor, has_a: bool) -> StepPulses:
    if is_total(count):
        return StepPulses(first=count)
    return StepPulses(first=count, first_pairs=pairs if has_a else None)


def _prepare(
    W: torch.Tensor,
    g: torch.Tensor,
    *,
    lr: float,
    config: AnalogConfig,
    key: int,
    tensor_id: int,
    offset: int = 0,
    A: torch.Tensor | None = None,
    totals: bool = False,
) -> tuple[tuple, StepPulses]:
    """(arguments of ``fastanalog::asgd_step_triton_``, the StepPulses it fills)."""
    numel = W.numel()
    check_arrays(numel, W=W, g=g)
    check_excess(A, g)
    offset = check_offset(offset)
    dev_w, args_w, _, _ = packed_arrays(config, tensor_id)
    s = step_scalars(config, lr)
    pulses = new_counts(numel, W.device, totals)
    pairs = new_counts(numel if A is not None and not totals else 0, W.device, False)
    args = (
        W,
        g,
        A,
        pulses,
        pairs,
        table_tensor(dev_w, W.device),
        int(key),
        offset,
        s["lr"],
        s["cap"],
        s["has_cap"],
        list(args_w.floats),
        list(args_w.ints),
    )
    return args, _pulses(pulses, pairs, A is not None)


def asgd_step_triton(
    W: torch.Tensor,
    g: torch.Tensor,
    *,
    lr: float,
    config: AnalogConfig,
    key: int,
    tensor_id: int,
    offset: int = 0,
    A: torch.Tensor | None = None,
    totals: bool = False,
) -> StepPulses:
    """Analog SGD on flat tensors, in place; same signature and result as ``asgd_step_ref``.

    Args:
        W: main array (weight units), float32/bfloat16/float16, updated in place.
        g: gradient at W (same numel, any supported float dtype).
        lr: learning rate (rounded to float32).
        config: the tensor's ``AnalogConfig`` (its ``device`` is W's device).
        key: this step's 63-bit Philox key (``philox.step_key``).
        tensor_id: the analog tensor's id (keys the device-to-device draw).
        offset: global index of ``W[0]`` (for shards of a larger tensor).
        A: the per-sample ``|g|`` sums (SPEC section 2a), like g; None: no excess.
        totals: report the sum of ``N_up + N_down`` over W (a 0-d int64 tensor) instead of
            per-element counts.

    Returns:
        ``StepPulses(first=N_W, first_pairs=pairs or None)``: int32 net counts (and pairs
        with ``A``) per element, or with ``totals`` ``StepPulses(first=total)``.
    """
    args, pulses = _prepare(W, g, lr=lr, config=config, key=key, tensor_id=tensor_id, offset=offset, A=A, totals=totals)
    torch.ops.fastanalog.asgd_step_triton_(*args)
    return pulses


def _prepare_multi(
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
) -> tuple[tuple, list[StepPulses]]:
    """(arguments of ``fastanalog::asgd_multi_step_triton_``, the StepPulses it fills, one per tensor)."""
    offsets = check_tensor_lists({"W": W, "g": g}, keys, tensor_ids, offsets)
    A = excess_list(As, g)
    has_a = bool(A)
    dev_w, args_w, _, _ = packed_arrays(config, tensor_ids[0])
    s = step_scalars(config, lr)
    numels = [Wi.numel() for Wi in W]
    (pulses,) = new_counts_multi(numels, W[0].device, totals)
    (pairs,) = new_counts_multi([n if has_a and not totals else 0 for n in numels], W[0].device, False)
    args = (
        list(W),
        list(g),
        A,
        pulses,
        pairs,
        table_tensor(dev_w, W[0].device),
        [int(k) for k in keys],
        offsets,
        [packed_arrays(config, tid)[1].ints[1] for tid in tensor_ids],
        s["lr"],
        s["cap"],
        s["has_cap"],
        list(args_w.floats),
        list(args_w.ints),
    )
    return args, [_pulses(c, p, has_a) for c, p in zip(pulses, pairs)]


def asgd_multi_step_triton(
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
    """Analog SGD on several tensors of one config in one launch; tensor ``i`` as ``asgd_step_triton`` updates it.

    ``W[i]``, ``g[i]``, ``keys[i]``, ``tensor_ids[i]``, ``offsets[i]`` (default 0) and ``As[i]``
    (None: no excess for any tensor) are the arguments of tensor ``i``; each array role shares
    one dtype and device. Returns one ``StepPulses`` per tensor (totals with ``totals``).
    """
    args, pulses = _prepare_multi(
        W, g, lr=lr, config=config, keys=keys, tensor_ids=tensor_ids, offsets=offsets, As=As, totals=totals
    )
    torch.ops.fastanalog.asgd_multi_step_triton_(*args)
    return pulses


__all__ = [
    "asgd_multi_step_triton",
    "asgd_multi_step_triton_",
    "asgd_step_triton",
    "asgd_step_triton_",
    "_asgd_step_kernel",
]
