"""Fused Residual Learning v1 step (Tiki-Taka with mixing) in one pass (SPEC section 3).

Per element ``i`` (global index ``offset + i``), float32 math, words ``r0..r3`` of
``randint4x(key, i)``:

    P    <- pulse_update_P(P, -lr * g)           rounding u0; c2c: sine normal of (r2, r3)
    if transfer (a compile-time switch):
      Phat = P + read_noise * zr                   zr: cosine normal of (r2, r3)
      W    <- pulse_update_W(W, transfer_lr * Phat)   rounding u1; c2c: cosine normal of
                                                      randint4x(key ^ STREAM_W_C2C, i) words 0, 1
    Wbar <- W + gamma * P

P is zero-shifted when the config says so (responses at ``P + w_sym``). Reads g, W, P;
writes P, Wbar (and W on transfer steps) and int32 pulse counts: at float32 24 bytes
per element on a transfer step (g, W, P in; W, P, Wbar out), 20 without. Without a
mixed weight (``Wbar`` None, ``MIX=False``) Wbar is neither written nor counted.

``rl_multi_step_triton`` updates several tensors of one config in one launch
(``common.tensor_launch``), each exactly as ``rl_step_triton`` would.
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
    c2c_key,
    check_arrays,
    check_tensor_lists,
    given_arrays,
    kernel_device_args,
    launch_options,
    load_f32,
    mixed_pointers,
    multi_tensor_block,
    normal_pair,
    packed_arrays,
    prefixed,
    residual_write,
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
def _rl_step_kernel(
    W_ptr,
    P_ptr,
    Wbar_ptr,
    g_ptr,
    count_p_ptr,
    count_w_ptr,
    numel,
    key,
    key_c2c,
    offset,
    w_var_key,
    w_var_key_a,
    p_var_key,
    p_var_key_a,
    table_ptr,
    n_tensors,
    search_steps,
    lr,
    tlr,
    mix,
    read_noise,
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
    p_tmin,
    p_tmax,
    p_gamma,
    p_dw,
    p_asym,
    p_d2d,
    p_c2c,
    p_shift,
    p_table,
    TRANSFER: tl.constexpr,
    READ_NOISE: tl.constexpr,
    HAS_CAP: tl.constexpr,
    W_FAMILY: tl.constexpr,
    W_D2D: tl.constexpr,
    W_HAS_GAMMA: tl.constexpr,
    W_C2C: tl.constexpr,
    W_ZERO_SHIFT: tl.constexpr,
    W_TABLE_N: tl.constexpr,
    W_TABLE_STEPS: tl.constexpr,
    P_FAMILY: tl.constexpr,
    P_D2D: tl.constexpr,
    P_HAS_GAMMA: tl.constexpr,
    P_C2C: tl.constexpr,
    P_ZERO_SHIFT: tl.constexpr,
    P_TABLE_N: tl.constexpr,
    P_TABLE_STEPS: tl.constexpr,
    MIX: tl.constexpr,
    MULTI: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One block of one tensor: the tensor's arrays and scalars are the arguments, or with ``MULTI`` come from ``table_ptr``."""
    if MULTI:
        t, block = multi_tensor_block(table_ptr, n_tensors, search_steps)
        numel, offset, key, key_c2c, w_var_key, w_var_key_a, p_var_key, p_var_key_a = tensor_scalars(table_ptr, n_tensors, t)
        W_ptr = tensor_array(table_ptr, n_tensors, t, 0, W_ptr)
        P_ptr = tensor_array(table_ptr, n_tensors, t, 1, P_ptr)
        Wbar_ptr = tensor_array(table_ptr, n_tensors, t, 2, Wbar_ptr)
        g_ptr = tensor_array(table_ptr, n_tensors, t, 3, g_ptr)
        count_p_ptr = tensor_array(table_ptr, n_tensors, t, 4, count_p_ptr)
        count_w_ptr = tensor_array(table_ptr, n_tensors, t, 5, count_w_ptr)
    else:
        block = tl.program_id(0)
    local = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = local < numel
    idx = local + tl.to_tensor(offset).to(tl.int64)

    g = load_f32(g_ptr, local, mask)
    x_w = load_f32(W_ptr, local, mask)
    r0, r1, r2, r3 = tl.randint4x(key, idx)
    if P_C2C or (TRANSFER and READ_NOISE):
        z_read, z_c2c = normal_pair(r2, r3)
    else:
        z_read = 0.0
        z_c2c = 0.0

    p_st, count_p = residual_write(
        P_ptr,
        local,
        mask,
        idx,
        g,
        lr,
        tl.uint_to_uniform_float(r0),
        z_c2c,
        cap,
        p_tmin,
        p_tmax,
        p_gamma,
        p_dw,
        p_asym,
        p_d2d,
        p_c2c,
        p_shift,
        p_var_key,
        p_var_key_a,
        p_table,
        HAS_CAP,
        P_FAMILY,
        P_D2D,
        P_HAS_GAMMA,
        P_C2C,
        P_ZERO_SHIFT,
        P_TABLE_N,
        P_TABLE_STEPS,
    )
    tl.store(count_p_ptr + local, count_p.to(tl.int32), mask=mask)

    if TRANSFER:
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
        if READ_NOISE:
            p_hat = p_st + tl.to_tensor(read_noise) * z_read
        else:
            p_hat = p_st
        d = tl.to_tensor(tlr) * p_hat
        count_w = stochastic_count(tl.div_rn(d, dw), tl.uint_to_uniform_float(r1), cap, HAS_CAP)
        if W_C2C:
            v0, v1, _, _ = tl.randint4x(key_c2c, idx)
            z_w, _ = normal_pair(v0, v1)
        else:
            z_w = 0.0
        x_new = apply_pulses(
            x_w, count_w, z_w, shift, tmin, tmax, gamma, dw, asym, w_c2c, w_table, W_FAMILY, W_TABLE_N, W_C2C, W_ZERO_SHIFT
        )
        w_st = store_f32(W_ptr, local, x_new, mask)
        tl.store(count_w_ptr + local, count_w.to(tl.int32), mask=mask)
    else:
        w_st = x_w
    if MIX:
        store_f32(Wbar_ptr, local, w_st + tl.to_tensor(mix) * p_st, mask)


def _launch(
    W,
    P,
    Wbar,
    g,
    pulses_p,
    pulses_w,
    table_w,
    table_p,
    keys,
    offsets,
    var_keys_w,
    var_keys_p,
    transfer,
    scalars,
    flags,
    dev_w_floats,
    dev_w_ints,
    dev_p_floats,
    dev_p_ints,
):
    """One launch over the tensors ``W[i], P[i], ...`` (lists, one entry per tensor; ``Wbar`` may be empty)."""
    Wbar, write_mix = mixed_pointers(Wbar, W)
    launch = tensor_launch(
        {
            "W_ptr": W,
            "P_ptr": P,
            "Wbar_ptr": Wbar,
            "g_ptr": g,
            "count_p_ptr": pulses_p,
            "count_w_ptr": pulses_w if transfer else pulses_p,
        },
        {
            "key": keys,
            "key_c2c": [c2c_key(k) for k in keys],
            "offset": offsets,
            **variation_rows("w", var_keys_w, dev_w_floats),
            **variation_rows("p", var_keys_p, dev_p_floats),
        },
        block_size(),
    )
    if launch is None:
        return
    grid, per_tensor = launch
    lr, tlr, mix, read_noise, cap = scalars
    has_cap, read_on = flags
    rt_w, c_w = kernel_device_args(dev_w_floats, dev_w_ints, table_w)
    rt_p, c_p = kernel_device_args(dev_p_floats, dev_p_ints, table_p)
    _rl_step_kernel[grid](
        lr=lr,
        tlr=tlr,
        mix=mix,
        read_noise=read_noise,
        cap=cap,
        TRANSFER=bool(transfer),
        READ_NOISE=bool(read_on),
        HAS_CAP=bool(has_cap),
        MIX=write_mix,
        BLOCK=block_size(),
        **per_tensor,
        **prefixed("w", rt_w, c_w),
        **prefixed("p", rt_p, c_p),
        **launch_options(),
    )


@torch.library.custom_op("fastanalog::rl_step_triton_", mutates_args=("W", "P", "Wbar", "pulses_p", "pulses_w"))
def rl_step_triton_(
    W: torch.Tensor,
    P: torch.Tensor,
    Wbar: torch.Tensor,
    g: torch.Tensor,
    pulses_p: torch.Tensor,
    pulses_w: torch.Tensor,
    table_w: torch.Tensor,
    table_p: torch.Tensor,
    key: int,
    offset: int,
    transfer: bool,
    scalars: list[float],
    flags: list[bool],
    dev_w_floats: list[float],
    dev_w_ints: list[int],
    dev_p_floats: list[float],
    dev_p_ints: list[int],
) -> None:
    """In-place rl step (the op behind :func:`rl_step_triton`).

    ``scalars = [lr, transfer_lr, gamma, read_noise, max_pulses]`` (float32-rounded),
    ``flags = [has max_pulses, read_noise > 0]``; ``pulses_w`` is written only when
    ``transfer``; device lists as in ``common.DeviceArgs``. An empty ``Wbar`` asks for no
    mixed weight.
    """
    _launch(
        [W],
        [P],
        [Wbar],
        [g],
        [pulses_p],
        [pulses_w],
        table_w,
        table_p,
        [key],
        [offset],
        [dev_w_ints[1]],
        [dev_p_ints[1]],
        transfer,
        scalars,
        flags,
        dev_w_floats,
        dev_w_ints,
        dev_p_floats,
        dev_p_ints,
    )


@rl_step_triton_.register_fake
def _(
    W,
    P,
    Wbar,
    g,
    pulses_p,
    pulses_w,
    table_w,
    table_p,
    key,
    offset,
    transfer,
    scalars,
    flags,
    dev_w_floats,
    dev_w_ints,
    dev_p_floats,
    dev_p_ints,
) -> None:
    return None


@torch.library.custom_op("fastanalog::rl_multi_step_triton_", mutates_args=("W", "P", "Wbar", "pulses_p", "pulses_w"))
def rl_multi_step_triton_(
    W: list[torch.Tensor],
    P: list[torch.Tensor],
    Wbar: list[torch.Tensor],
    g: list[torch.Tensor],
    pulses_p: list[torch.Tensor],
    pulses_w: list[torch.Tensor],
    table_w: torch.Tensor,
    table_p: torch.Tensor,
    keys: list[int],
    offsets: list[int],
    var_keys_w: list[int],
    var_keys_p: list[int],
    transfer: bool,
    scalars: list[float],
    flags: list[bool],
    dev_w_floats: list[float],
    dev_w_ints: list[int],
    dev_p_floats: list[float],
    dev_p_ints: list[int],
) -> None:
    """In-place rl step of several tensors in one launch (the op behind :func:`rl_multi_step_triton`).

    Per tensor ``i``: its arrays at index ``i`` of the tensor lists, ``keys[i]``,
    ``offsets[i]`` and the variation keys ``var_keys_w[i]``, ``var_keys_p[i]``; scalars,
    flags and device lists as in ``rl_step_triton_``, shared (their variation keys unused).
    """
    _launch(
        W,
        P,
        Wbar,
        g,
        pulses_p,
        pulses_w,
        table_w,
        table_p,
        keys,
        offsets,
        var_keys_w,
        var_keys_p,
        transfer,
        scalars,
        flags,
        dev_w_floats,
        dev_w_ints,
        dev_p_floats,
        dev_p_ints,
    )


@rl_multi_step_triton_.register_fake
def _(
    W,
    P,
    Wbar,
    g,
    pulses_p,
    pulses_w,
    table_w,
    table_p,
    keys,
    offsets,
    var_keys_w,
    var_keys_p,
    transfer,
    scalars,
    flags,
    dev_w_floats,
    dev_w_ints,
    dev_p_floats,
    dev_p_ints,
) -> None:
    return None


def _prepare(
    W: torch.Tensor,
    P: torch.Tensor,
    Wbar: torch.Tensor | None,
    g: torch.Tensor,
    *,
    lr: float,
    config: AnalogConfig,
    key: int,
    tensor_id: int,
    transfer: bool,
    offset: int = 0,
) -> tuple[tuple, StepPulses]:
    """(arguments of ``fastanalog::rl_step_triton_``, the StepPulses it fills)."""
    numel = W.numel()
    check_arrays(numel, **given_arrays(W=W, P=P, Wbar=Wbar, g=g))
    dev_w, args_w, dev_p, args_p = packed_arrays(config, tensor_id)
    s = step_scalars(config, lr)
    pulses_p = torch.empty(numel, dtype=torch.int32, device=W.device)
    pulses_w = torch.empty(numel if transfer else 0, dtype=torch.int32, device=W.device)
    args = (
        W,
        P,
        Wbar if Wbar is not None else W.new_empty(0),
        g,
        pulses_p,
        pulses_w,
        table_tensor(dev_w, W.device),
        table_tensor(dev_p, W.device),
        int(key),
        int(offset),
        bool(transfer),
        [s["lr"], s["tlr"], s["mix"], s["read_noise"], s["cap"]],
        [s["has_cap"], config.read_noise > 0],
        list(args_w.floats),
        list(args_w.ints),
        list(args_p.floats),
        list(args_p.ints),
    )
    return args, StepPulses(first=pulses_p, main=pulses_w if transfer else None)


def rl_step_triton(
    W: torch.Tensor,
    P: torch.Tensor,
    Wbar: torch.Tensor | None,
    g: torch.Tensor,
    *,
    lr: float,
    config: AnalogConfig,
    key: int,
    tensor_id: int,
    transfer: bool,
    offset: int = 0,
) -> StepPulses:
    """Residual Learning v1 on flat tensors, in place; same signature and result as ``rl_step_ref``.

    Args:
        W, P, Wbar: main, residual and mixed forward arrays (weight units), updated in place;
            ``Wbar`` None: no mixed weight is written.
        g: gradient at Wbar.
        lr: learning rate (rounded to float32).
        config: the tensor's ``AnalogConfig`` (``device`` for W, ``residual_device`` for P).
        key: this step's 63-bit Philox key; tensor_id: the analog tensor's id.
        transfer: whether this step transfers P into W.
        offset: global index of element 0.

    Returns:
        ``StepPulses(first=N_P, main=N_W or None without transfer)``, int32 per element.
    """
    args, pulses = _prepare(
        W, P, Wbar, g, lr=lr, config=config, key=key, tensor_id=tensor_id, transfer=transfer, offset=offset
    )
    torch.ops.fastanalog.rl_step_triton_(*args)
    return pulses


def _prepare_multi(
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
) -> tuple[tuple, list[StepPulses]]:
    """(arguments of ``fastanalog::rl_multi_step_triton_``, the StepPulses it fills, one per tensor)."""
    offsets = check_tensor_lists(given_arrays(W=W, P=P, Wbar=Wbar, g=g), keys, tensor_ids, offsets)
    dev_w, args_w, dev_p, args_p = packed_arrays(config, tensor_ids[0])
    packed = [packed_arrays(config, tid) for tid in tensor_ids]
    s = step_scalars(config, lr)
    pulses_p = [torch.empty(Wi.numel(), dtype=torch.int32, device=Wi.device) for Wi in W]
    pulses_w = [torch.empty(Wi.numel() if transfer else 0, dtype=torch.int32, device=Wi.device) for Wi in W]
    args = (
        list(W),
        list(P),
        list(Wbar) if Wbar is not None else [],
        list(g),
        pulses_p,
        pulses_w,
        table_tensor(dev_w, W[0].device),
        table_tensor(dev_p, W[0].device),
        [int(k) for k in keys],
        offsets,
        [p[1].ints[1] for p in packed],
        [p[3].ints[1] for p in packed],
        bool(transfer),
        [s["lr"], s["tlr"], s["mix"], s["read_noise"], s["cap"]],
        [s["has_cap"], config.read_noise > 0],
        list(args_w.floats),
        list(args_w.ints),
        list(args_p.floats),
        list(args_p.ints),
    )
    return args, [StepPulses(first=pp, main=pw if transfer else None) for pp, pw in zip(pulses_p, pulses_w)]


def rl_multi_step_triton(
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
) -> list[StepPulses]:
    """Residual Learning v1 on several tensors of one config in one launch; tensor ``i`` as ``rl_step_triton`` updates it.

    Index ``i`` of every list (arrays, ``keys``, ``tensor_ids``, ``offsets``, default 0)
    belongs to tensor ``i``; each array role shares one dtype and device; ``transfer`` is
    the step's flag, common to all. Returns one ``StepPulses`` per tensor.
    """
    args, pulses = _prepare_multi(
        W, P, Wbar, g, lr=lr, config=config, keys=keys, tensor_ids=tensor_ids, transfer=transfer, offsets=offsets
    )
    torch.ops.fastanalog.rl_multi_step_triton_(*args)
    return pulses


__all__ = [
    "rl_multi_step_triton",
    "rl_multi_step_triton_",
    "rl_step_triton",
    "rl_step_triton_",
    "_rl_step_kernel",
]
