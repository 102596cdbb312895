"""Fused Analog SGD step: ``W <- pulse_update_W(W, -lr * g)`` in one pass (SPEC section 3).

Per element ``i`` (global index ``offset + i``), float32 math:

    d = (-lr) * g;  n = d / dw_min
    N = floor(n) + (u0 < n - floor(n))           u0 from word r0 of randint4x(key, i)
    N = clamp(N, -max_pulses, max_pulses)          (if capped)
    W = clamp(W + (N dw_min + c2c dw_min sqrt|N| z) q_s(W), tau_min, tau_max)

with ``z`` the sine normal of words ``(r2, r3)``. Reads g and W, writes W and the
int32 pulse counts: 12 bytes per element at float32 (plus 4 for the counts).

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
    apply_pulses,
    array_params,
    block_size,
    check_arrays,
    check_tensor_lists,
    kernel_device_args,
    launch_options,
    load_f32,
    multi_tensor_block,
    normal_pair,
    packed_arrays,
    prefixed,
    step_scalars,
    stochastic_count,
    store_f32,
    table_tensor,
    tensor_array,
    tensor_launch,
    tensor_scalars,
    variation_rows,
)


@triton.jit
def _asgd_step_kernel(
    W_ptr,
    g_ptr,
    count_ptr,
    numel,
    key,
    offset,
    w_var_key,
    w_var_key_a,
    table_ptr,
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
    HAS_CAP: tl.constexpr,
    W_FAMILY: tl.constexpr,
    W_D2D: tl.constexpr,
    W_HAS_GAMMA: tl.constexpr,
    W_C2C: tl.constexpr,
    W_ZERO_SHIFT: tl.constexpr,
    W_TABLE_N: tl.constexpr,
    W_TABLE_STEPS: tl.constexpr,
    MULTI: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One block of one tensor: the tensor's arrays and scalars are the arguments, or with ``MULTI`` come from ``table_ptr``."""
    if MULTI:
        t, block = multi_tensor_block(table_ptr, n_tensors, search_steps)
        numel, offset, key, _, w_var_key, w_var_key_a, _, _ = tensor_scalars(table_ptr, n_tensors, t)
        W_ptr = tensor_array(table_ptr, n_tensors, t, 0, W_ptr)
        g_ptr = tensor_array(table_ptr, n_tensors, t, 1, g_ptr)
        count_ptr = tensor_array(table_ptr, n_tensors, t, 2, count_ptr)
    else:
        block = tl.program_id(0)
    local = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = local < numel
    idx = local + tl.to_tensor(offset).to(tl.int64)

    g = load_f32(g_ptr, local, mask)
    x = load_f32(W_ptr, local, mask)
    r0, r1, r2, r3 = tl.randint4x(key, idx)

    tmin, tmax, gamma, dw, asym, shift = array_params(
        idx,
        w_var_key,
        w_var_key_a,
        w_tmin,
        w_tmax,
        w_gamma,
        w_dw,
        w_asym,
        w_d2d,
        w_shift,
        w_table,
        W_FAMILY,
        W_D2D,
        W_HAS_GAMMA,
        W_ZERO_SHIFT,
        W_TABLE_N,
        W_TABLE_STEPS,
    )
    d = (-tl.to_tensor(lr)) * g
    count = stochastic_count(tl.div_rn(d, dw), tl.uint_to_uniform_float(r0), cap, HAS_CAP)
    if W_C2C:
        _, z = normal_pair(r2, r3)
    else:
        z = 0.0
    x_new = apply_pulses(
        x, count, z, shift, tmin, tmax, gamma, dw, asym, w_c2c, w_table, W_FAMILY, W_TABLE_N, W_C2C, W_ZERO_SHIFT
    )
    store_f32(W_ptr, local, x_new, mask)
    tl.store(count_ptr + local, count.to(tl.int32), mask=mask)


def _launch(W, g, pulses, table_w, keys, offsets, var_keys_w, lr, cap, has_cap, dev_w_floats, dev_w_ints):
    """One launch over the tensors ``W[i], g[i], pulses[i]`` (lists, one entry per tensor)."""
    launch = tensor_launch(
        {"W_ptr": W, "g_ptr": g, "count_ptr": pulses},
        {"key": keys, "offset": offsets, **variation_rows("w", var_keys_w, dev_w_floats)},
        block_size(),
    )
    if launch is None:
        return
    grid, per_tensor = launch
    runtime, const = kernel_device_args(dev_w_floats, dev_w_ints, table_w)
    _asgd_step_kernel[grid](
        lr=lr,
        cap=cap,
        HAS_CAP=has_cap,
        BLOCK=block_size(),
        **per_tensor,
        **prefixed("w", runtime, const),
        **launch_options(),
    )


@torch.library.custom_op("fastanalog::asgd_step_triton_", mutates_args=("W", "pulses"))
def asgd_step_triton_(
    W: torch.Tensor,
    g: torch.Tensor,
    pulses: torch.Tensor,
    table_w: torch.Tensor,
    key: int,
    offset: int,
    lr: float,
    cap: float,
    has_cap: bool,
    dev_w_floats: list[float],
    dev_w_ints: list[int],
) -> None:
    """In-place Analog SGD step (the op behind :func:`asgd_step_triton`); see ``common.DeviceArgs``."""
    _launch([W], [g], [pulses], table_w, [key], [offset], [dev_w_ints[1]], lr, cap, has_cap, dev_w_floats, dev_w_ints)


@asgd_step_triton_.register_fake
def _(W, g, pulses, table_w, key, offset, lr, cap, has_cap, dev_w_floats, dev_w_ints) -> None:
    return None


@torch.library.custom_op("fastanalog::asgd_multi_step_triton_", mutates_args=("W", "pulses"))
def asgd_multi_step_triton_(
    W: list[torch.Tensor],
    g: list[torch.Tensor],
    pulses: list[torch.Tensor],
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

    Per tensor ``i``: ``W[i], g[i], pulses[i]``, ``keys[i]``, ``offsets[i]`` and the variation
    key ``var_keys_w[i]``; the device lists (``common.DeviceArgs``) are shared, their
    variation key unused.
    """
    _launch(W, g, pulses, table_w, keys, offsets, var_keys_w, lr, cap, has_cap, dev_w_floats, dev_w_ints)


@asgd_multi_step_triton_.register_fake
def _(W, g, pulses, table_w, keys, offsets, var_keys_w, lr, cap, has_cap, dev_w_floats, dev_w_ints) -> None:
    return None


def _prepare(
    W: torch.Tensor, g: torch.Tensor, *, lr: float, config: AnalogConfig, key: int, tensor_id: int, offset: int = 0
) -> tuple[tuple, StepPulses]:
    """(arguments of ``fastanalog::asgd_step_triton_``, the StepPulses it fills)."""
    numel = W.numel()
    check_arrays(numel, W=W, g=g)
    dev_w, args_w, _, _ = packed_arrays(config, tensor_id)
    s = step_scalars(config, lr)
    pulses = torch.empty(numel, dtype=torch.int32, device=W.device)
    args = (
        W,
        g,
        pulses,
        table_tensor(dev_w, W.device),
        int(key),
        int(offset),
        s["lr"],
        s["cap"],
        s["has_cap"],
        list(args_w.floats),
        list(args_w.ints),
    )
    return args, StepPulses(first=pulses)


def asgd_step_triton(
    W: torch.Tensor, g: torch.Tensor, *, lr: float, config: AnalogConfig, key: int, tensor_id: int, offset: int = 0
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

    Returns:
        ``StepPulses(first=N_W)``: signed int32 pulse counts per element.
    """
    args, pulses = _prepare(W, g, lr=lr, config=config, key=key, tensor_id=tensor_id, offset=offset)
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
) -> tuple[tuple, list[StepPulses]]:
    """(arguments of ``fastanalog::asgd_multi_step_triton_``, the StepPulses it fills, one per tensor)."""
    offsets = check_tensor_lists({"W": W, "g": g}, keys, tensor_ids, offsets)
    dev_w, args_w, _, _ = packed_arrays(config, tensor_ids[0])
    s = step_scalars(config, lr)
    pulses = [torch.empty(Wi.numel(), dtype=torch.int32, device=Wi.device) for Wi in W]
    args = (
        list(W),
        list(g),
        pulses,
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
    return args, [StepPulses(first=p) for p in pulses]


def asgd_multi_step_triton(
    W: Sequence[torch.Tensor],
    g: Sequence[torch.Tensor],
    *,
    lr: float,
    config: AnalogConfig,
    keys: Sequence[int],
    tensor_ids: Sequence[int],
    offsets: Sequence[int] | None = None,
) -> list[StepPulses]:
    """Analog SGD on several tensors of one config in one launch; tensor ``i`` as ``asgd_step_triton`` updates it.

    ``W[i]``, ``g[i]``, ``keys[i]``, ``tensor_ids[i]`` and ``offsets[i]`` (default 0) are the
    arguments of tensor ``i``; each array role shares one dtype and device. Returns one
    ``StepPulses`` per tensor.
    """
    args, pulses = _prepare_multi(W, g, lr=lr, config=config, keys=keys, tensor_ids=tensor_ids, offsets=offsets)
    torch.ops.fastanalog.asgd_multi_step_triton_(*args)
    return pulses


__all__ = [
    "asgd_multi_step_triton",
    "asgd_multi_step_triton_",
    "asgd_step_triton",
    "asgd_step_triton_",
    "_asgd_step_kernel",
]
