"""Fused Residual Learning v1 step (Tiki-Taka with mixing) in one pass (SPEC section 3).

Per element ``i`` (global index ``offset + i``), float32 math; streams as SPEC section 4:

    P    <- pulse_update_P(P, -lr * g, e)         net rounding stream 0, pairs (with A) stream 1,
                                                  c2c stream 3
    if transfer (a compile-time switch):
      Phat = P + read_noise * zr                   zr: stream 4
      W    <- pulse_update_W(W, transfer_lr * Phat, 0)   rounding stream 2, c2c stream 5
    Wbar <- W + gamma * P

P is zero-shifted when the config says so (responses at ``P + w_sym``). Each Philox call
serves four elements; a stream the configuration does not need is not drawn. Reads g (and
A), W, P; writes P, Wbar (and W on transfer steps) and the pulses (int32 per element, or
one int64 total per array with ``totals``): at float32 24 bytes per element on a transfer
step (g, W, P in; W, P, Wbar out), 20 without. Without a mixed weight (``Wbar`` None,
``MIX=False``) Wbar is neither written nor counted.

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
    SALT_READ_P,
    SALT_ROUND_W,
    array_params,
    block_range,
    block_size,
    check_arrays,
    check_excess,
    check_offset,
    check_tensor_lists,
    device_guard,
    excess_list,
    first_write,
    given_arrays,
    is_total,
    kernel_device_args,
    launch_options,
    load_f32,
    mixed_pointers,
    multi_tensor_block,
    multi_tensor_extent,
    new_counts,
    new_counts_multi,
    packed_arrays,
    prefixed,
    step_scalars,
    stochastic_round,
    store_f32,
    stream_normal,
    stream_uniform,
    table_tensor,
    tensor_array,
    tensor_key,
    tensor_launch,
    tensor_output,
    tensor_scalars,
    transfer_write,
    variation_rows,
)


@triton.jit
def _rl_step_kernel(
    W_ptr,
    P_ptr,
    Wbar_ptr,
    g_ptr,
    A_ptr,
    count_p_ptr,
    pairs_p_ptr,
    count_w_ptr,
    numel,
    key,
    offset,
    lead,
    w_var_key,
    w_var_key_a,
    p_var_key,
    p_var_key_a,
    table_ptr,
    step_ptr,
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
    P_FAMILY: tl.constexpr,
    P_D2D: tl.constexpr,
    P_HAS_GAMMA: tl.constexpr,
    P_C2C: tl.constexpr,
    P_ZERO_SHIFT: tl.constexpr,
    P_TABLE_N: tl.constexpr,
    P_TABLE_STEPS: tl.constexpr,
    MIX: tl.constexpr,
    MULTI: tl.constexpr,
    ALIGNED: tl.constexpr,
    NUMEL16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One block of one tensor: the tensor's arrays and scalars are the arguments, or with ``MULTI`` come from ``table_ptr``."""
    if MULTI:
        t, block = multi_tensor_block(table_ptr, n_tensors, search_steps)
        numel, offset, w_var_key, w_var_key_a, p_var_key, p_var_key_a = tensor_scalars(table_ptr, n_tensors, t)
        key = tensor_key(step_ptr, t)
        numel, lead = multi_tensor_extent(numel, offset, ALIGNED, NUMEL16)
        W_ptr = tensor_array(table_ptr, n_tensors, t, 0, W_ptr, ALIGNED)
        P_ptr = tensor_array(table_ptr, n_tensors, t, 1, P_ptr, ALIGNED)
        if MIX:
            Wbar_ptr = tensor_array(table_ptr, n_tensors, t, 2, Wbar_ptr, ALIGNED)
        g_ptr = tensor_array(table_ptr, n_tensors, t, 3, g_ptr, ALIGNED)
        if HAS_A:
            A_ptr = tensor_array(table_ptr, n_tensors, t, 4, A_ptr, ALIGNED)
        count_p_ptr = tensor_output(step_ptr, n_tensors, t, 0, count_p_ptr, ALIGNED and not TOTALS)
        if HAS_A and not TOTALS:
            pairs_p_ptr = tensor_output(step_ptr, n_tensors, t, 1, pairs_p_ptr, ALIGNED)
        if TRANSFER:
            count_w_ptr = tensor_output(step_ptr, n_tensors, t, 2, count_w_ptr, ALIGNED and not TOTALS)
    else:
        block = tl.program_id(0)
    local, mask, idx, call0 = block_range(block, offset, lead, numel, BLOCK)

    g = load_f32(g_ptr, local, mask)
    if HAS_A:
        a = load_f32(A_ptr, local, mask)
    else:
        a = g
    p_st = first_write(
        P_ptr,
        count_p_ptr,
        pairs_p_ptr,
        local,
        mask,
        idx,
        call0,
        key,
        g,
        a,
        lr,
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
        HAS_A,
        HAS_CAP,
        TOTALS,
        P_FAMILY,
        P_D2D,
        P_HAS_GAMMA,
        P_C2C,
        P_ZERO_SHIFT,
        P_TABLE_N,
        P_TABLE_STEPS,
        BLOCK,
    )

    if TRANSFER:
        x_w = load_f32(W_ptr, local, mask)
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
            p_hat = p_st + tl.to_tensor(read_noise) * stream_normal(key, call0, SALT_READ_P, BLOCK)
        else:
            p_hat = p_st
        d = tl.to_tensor(tlr) * p_hat
        n = stochastic_round(tl.div_rn(d, dw), stream_uniform(key, call0, SALT_ROUND_W, BLOCK))
        _, w_st = transfer_write(
            W_ptr,
            count_w_ptr,
            local,
            mask,
            idx,
            call0,
            key,
            x_w,
            n,
            cap,
            dw,
            tmin,
            tmax,
            gamma,
            asym,
            w_c2c,
            shift,
            w_table,
            HAS_CAP,
            TOTALS,
            W_FAMILY,
            W_C2C,
            W_ZERO_SHIFT,
            W_TABLE_N,
            BLOCK,
        )
        if MIX:
            store_f32(Wbar_ptr, local, w_st + tl.to_tensor(mix) * p_st, mask)
    elif MIX:
        x_w = load_f32(W_ptr, local, mask)
        store_f32(Wbar_ptr, local, x_w + tl.to_tensor(mix) * p_st, mask)


def _launch(
    W,
    P,
    Wbar,
    g,
    A,
    pulses_p,
    pairs_p,
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
    """One launch over the tensors ``W[i], P[i], ...`` (lists, one entry per tensor; ``Wbar``, ``A``, ``pairs_p`` may be empty)."""
    Wbar, write_mix = mixed_pointers(Wbar, W)
    has_a = len(A) == len(W)
    totals = is_total(pulses_p[0])
    launch = tensor_launch(
        {
            "W_ptr": W,
            "P_ptr": P,
            "Wbar_ptr": Wbar,
            "g_ptr": g,
            "A_ptr": A if has_a else g,
        },
        {
            "count_p_ptr": pulses_p,
            "pairs_p_ptr": pairs_p if has_a and not totals else pulses_p,
            "count_w_ptr": pulses_w if transfer else pulses_p,
        },
        {
            "offset": offsets,
            **variation_rows("w", var_keys_w, dev_w_floats),
            **variation_rows("p", var_keys_p, dev_p_floats),
        },
        keys,
        block_size(),
    )
    if launch is None:
        return
    grid, per_tensor = launch
    lr, tlr, mix, read_noise, cap = scalars
    has_cap, read_on = flags
    rt_w, c_w = kernel_device_args(dev_w_floats, dev_w_ints, table_w)
    rt_p, c_p = kernel_device_args(dev_p_floats, dev_p_ints, table_p)
    with device_guard(W[0].device):
        _rl_step_kernel[grid](
            lr=lr,
            tlr=tlr,
            mix=mix,
            read_noise=read_noise,
            cap=cap,
            TRANSFER=bool(transfer),
            READ_NOISE=bool(read_on),
            HAS_A=has_a,
            HAS_CAP=bool(has_cap),
            TOTALS=totals,
            MIX=write_mix,
            BLOCK=block_size(),
            **per_tensor,
            **prefixed("w", rt_w, c_w),
            **prefixed("p", rt_p, c_p),
            **launch_options(),
        )


@torch.library.custom_op("fastanalog::rl_step_triton_", mutates_args=("W", "P", "Wbar", "pulses_p", "pairs_p", "pulses_w"))
def rl_step_triton_(
    W: torch.Tensor,
    P: torch.Tensor,
    Wbar: torch.Tensor,
    g: torch.Tensor,
    A: torch.Tensor | None,
    pulses_p: torch.Tensor,
    pairs_p: torch.Tensor,
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
    ``flags = [has max_pulses, read_noise > 0]``; ``A`` None: no excess. ``pulses_p`` and
    ``pulses_w`` (written only when ``transfer``) are int32 net counts per element, or 0-d
    int64 totals; ``pairs_p`` int32 per element when ``A`` is given and counts are per
    element, else empty. Device lists as in ``common.DeviceArgs``. An empty ``Wbar`` asks for
    no mixed weight.
    """
    _launch(
        [W],
        [P],
        [Wbar],
        [g],
        [A] if A is not None else [],
        [pulses_p],
        [pairs_p],
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
    A,
    pulses_p,
    pairs_p,
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


@torch.library.custom_op(
    "fastanalog::rl_multi_step_triton_", mutates_args=("W", "P", "Wbar", "pulses_p", "pairs_p", "pulses_w")
)
def rl_multi_step_triton_(
    W: list[torch.Tensor],
    P: list[torch.Tensor],
    Wbar: list[torch.Tensor],
    g: list[torch.Tensor],
    A: list[torch.Tensor],
    pulses_p: list[torch.Tensor],
    pairs_p: list[torch.Tensor],
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

    Per tensor ``i``: its arrays at index ``i`` of the tensor lists (``A`` empty: no excess),
    ``keys[i]``, ``offsets[i]`` and the variation keys ``var_keys_w[i]``, ``var_keys_p[i]``;
    scalars, flags, pulse outputs and device lists as in ``rl_step_triton_``, shared (their
    variation keys unused).
    """
    _launch(
        W,
        P,
        Wbar,
        g,
        A,
        pulses_p,
        pairs_p,
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
    A,
    pulses_p,
    pairs_p,
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


def _pulses(count_p: torch.Tensor, pairs_p: torch.Tensor, count_w: torch.Tensor | None, has_a: bool) -> StepPulses:
    if is_total(count_p):
        return StepPulses(first=count_p, main=count_w)
    return StepPulses(first=count_p, main=count_w, first_pairs=pairs_p if has_a else None)


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
    A: torch.Tensor | None = None,
    totals: bool = False,
) -> tuple[tuple, StepPulses]:
    """(arguments of ``fastanalog::rl_step_triton_``, the StepPulses it fills)."""
    numel = W.numel()
    check_arrays(numel, **given_arrays(W=W, P=P, Wbar=Wbar, g=g))
    check_excess(A, g)
    offset = check_offset(offset)
    dev_w, args_w, dev_p, args_p = packed_arrays(config, tensor_id)
    s = step_scalars(config, lr)
    pulses_p = new_counts(numel, W.device, totals)
    pairs_p = new_counts(numel if A is not None and not totals else 0, W.device, False)
    pulses_w = new_counts(numel, W.device, totals) if transfer else new_counts(0, W.device, False)
    args = (
        W,
        P,
        Wbar if Wbar is not None else W.new_empty(0),
        g,
        A,
        pulses_p,
        pairs_p,
        pulses_w,
        table_tensor(dev_w, W.device),
        table_tensor(dev_p, W.device),
        int(key),
        offset,
        bool(transfer),
        [s["lr"], s["tlr"], s["mix"], s["read_noise"], s["cap"]],
        [s["has_cap"], config.read_noise > 0],
        list(args_w.floats),
        list(args_w.ints),
        list(args_p.floats),
        list(args_p.ints),
    )
    return args, _pulses(pulses_p, pairs_p, pulses_w if transfer else None, A is not None)


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
    A: torch.Tensor | None = None,
    totals: bool = False,
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
        A: the per-sample ``|g|`` sums of P's write (SPEC section 2a); None: no excess.
        totals: report per array the sum of ``N_up + N_down`` (0-d int64) instead of
            per-element counts.

    Returns:
        ``StepPulses(first=N_P, main=N_W or None without transfer, first_pairs=pairs of P or
        None)``, int32 per element; with ``totals`` the 0-d int64 totals (``first_pairs`` None).
    """
    args, pulses = _prepare(
        W, P, Wbar, g, lr=lr, config=config, key=key, tensor_id=tensor_id, transfer=transfer, offset=offset, A=A, totals=totals
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
    As: Sequence[torch.Tensor] | None = None,
    totals: bool = False,
) -> tuple[tuple, list[StepPulses]]:
    """(arguments of ``fastanalog::rl_multi_step_triton_``, the StepPulses it fills, one per tensor)."""
    offsets = check_tensor_lists(given_arrays(W=W, P=P, Wbar=Wbar, g=g), keys, tensor_ids, offsets)
    A = excess_list(As, g)
    has_a = bool(A)
    dev_w, args_w, dev_p, args_p = packed_arrays(config, tensor_ids[0])
    packed = [packed_arrays(config, tid) for tid in tensor_ids]
    s = step_scalars(config, lr)
    where = W[0].device
    numels = [Wi.numel() for Wi in W]
    if transfer:
        pulses_p, pulses_w = new_counts_multi(numels, where, totals, arrays=2)
    else:
        (pulses_p,) = new_counts_multi(numels, where, totals)
        (pulses_w,) = new_counts_multi([0] * len(numels), where, False)
    (pairs_p,) = new_counts_multi([n if has_a and not totals else 0 for n in numels], where, False)
    args = (
        list(W),
        list(P),
        list(Wbar) if Wbar is not None else [],
        list(g),
        A,
        pulses_p,
        pairs_p,
        pulses_w,
        table_tensor(dev_w, where),
        table_tensor(dev_p, where),
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
    out = [_pulses(pp, qp, pw if transfer else None, has_a) for pp, qp, pw in zip(pulses_p, pairs_p, pulses_w)]
    return args, out


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
    As: Sequence[torch.Tensor] | None = None,
    totals: bool = False,
) -> list[StepPulses]:
    """Residual Learning v1 on several tensors of one config in one launch; tensor ``i`` as ``rl_step_triton`` updates it.

    Index ``i`` of every list (arrays, ``keys``, ``tensor_ids``, ``offsets``, default 0, and
    ``As``, None: no excess) belongs to tensor ``i``; each array role shares one dtype and
    device; ``transfer`` is the step's flag, common to all. Returns one ``StepPulses`` per
    tensor (totals with ``totals``).
    """
    args, pulses = _prepare_multi(
        W,
        P,
        Wbar,
        g,
        lr=lr,
        config=config,
        keys=keys,
        tensor_ids=tensor_ids,
        transfer=transfer,
        offsets=offsets,
        As=As,
        totals=totals,
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
