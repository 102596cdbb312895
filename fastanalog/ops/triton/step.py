"""The fused analog update: one Triton kernel for Analog SGD, rl and rl2 (SPEC section 3), and its launcher.

The algorithm is a compile-time constant (``ALG``, the ids of ``reference.ALGORITHMS``), as in
the CUDA ``step_kernel<ALG>``. Per element ``i`` (global index ``offset + i``), float32 math,
streams as SPEC section 4:

    first write (W for asgd, P for rl and rl2; ``common.first_write``):
      n = (-lr g) / dw                             net rounding: stream 0
      with A:  m = ((lr max(A - |g|, 0)) 0.5) / dw  pairs rounding: stream 1
      N_up = M + max(N, 0), N_down = M + max(-N, 0), each capped; c2c noise: stream 3
    rl on a transfer step, and rl2 (W written by ``common.transfer_write``, c2c stream 5):
      Phat = P + read_noise zr                     zr: stream 4
      rl:              N = stochastic_round((transfer_lr Phat) / dw_W)          stream 2
      rl2 accumulate:  H <- H + transfer_lr Phat;  N = trunc(H / dw_W) where
                       |H| >= threshold dw_W, else 0;  after the write H <- H - N dw_W
      rl2 ema:         H <- (1 - transfer_lr) H + transfer_lr Phat
                       N = stochastic_round((transfer_lr H) / dw_W)             stream 2
    rl, rl2 with a mixed weight:  Wbar = W + gamma P

A stream the configuration does not need is not drawn. Bytes per element at float32: asgd
reads g (and A) and W and writes W (12 bytes, 16 with A); rl reads g, W, P and writes P,
Wbar (and W on transfer steps): 24 bytes on a transfer step, 20 without; rl2 reads g, W, P,
H and writes W, P, H, Wbar (32 bytes). Without a mixed weight (``MIX=False``) Wbar is not
written. Pulses: int32 net counts per element (and pairs with A), or one int64 total per
array with ``TOTALS``.

One kernel serves the single-tensor launch (the tensor's arrays and scalars as arguments)
and the multi-tensor launch (``MULTI``: every tensor of one config in one launch, per-tensor
values from the tables of ``common.tensor_launch``); the per-element code is the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..reference import ALGORITHMS
from .common import (
    SALT_READ_P,
    SALT_ROUND_W,
    array_params,
    block_range,
    block_size,
    device_guard,
    device_spec,
    first_write,
    is_total,
    launch_options,
    load_f32,
    mixed_pointers,
    multi_tensor_block,
    multi_tensor_extent,
    report_pulses,
    stochastic_round,
    store_f32,
    stream_normal,
    stream_uniform,
    tensor_array,
    tensor_key,
    tensor_launch,
    tensor_output,
    tensor_scalars,
    threshold_count,
    transfer_write,
    variation_rows,
)

# Array roles: the kernel's pointer arguments in this order, and the rows of the multi-tensor
# table (the kernel's row numbers) (``first``: the array the gradient writes, W for asgd and P for rl/rl2; ``main``: W of
# rl/rl2). A role an algorithm has no array for carries the first array, which the kernel
# never touches.
ARRAYS = ("first", "main", "H", "Wbar", "g", "A")
OUTPUTS = ("count_first", "pairs_first", "count_main")

# The algorithms' ids (``reference.ALGORITHMS``) as the kernel's compile-time constants.
ASGD, RL, RL2 = (tl.constexpr(ALGORITHMS[a].id) for a in ("asgd", "rl", "rl2"))


@triton.jit
def _first_outputs(step_ptr, n_tensors, tensor, count_ptr, pairs_ptr, HAS_A: tl.constexpr, TOTALS: tl.constexpr,
                   ALIGNED: tl.constexpr):  # fmt: skip
    """The first array's pulse outputs (counts, pairs) of tensor ``tensor`` of a multi-tensor launch."""
    count_ptr = tensor_output(step_ptr, n_tensors, tensor, 0, count_ptr, ALIGNED and not TOTALS)
    if HAS_A and not TOTALS:
        pairs_ptr = tensor_output(step_ptr, n_tensors, tensor, 1, pairs_ptr, ALIGNED)
    return count_ptr, pairs_ptr


@triton.jit
def _step_kernel(
    first_ptr,
    main_ptr,
    H_ptr,
    Wbar_ptr,
    g_ptr,
    A_ptr,
    count_first_ptr,
    pairs_first_ptr,
    count_main_ptr,
    numel,
    key,
    offset,
    lead,
    first_var_key,
    first_var_key_a,
    main_var_key,
    main_var_key_a,
    table_ptr,
    step_ptr,
    n_tensors,
    search_steps,
    first_dev,
    main_dev,
    first_table,
    main_table,
    lr,
    tlr,
    mix,
    read_noise,
    threshold,
    cap,
    ALG: tl.constexpr,
    FIRST_SPEC: tl.constexpr,
    MAIN_SPEC: tl.constexpr,
    TRANSFER: tl.constexpr,
    EMA: tl.constexpr,
    READ_NOISE: tl.constexpr,
    HAS_A: tl.constexpr,
    HAS_CAP: tl.constexpr,
    TOTALS: tl.constexpr,
    MIX: tl.constexpr,
    MULTI: tl.constexpr,
    ALIGNED: tl.constexpr,
    NUMEL16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One block of one tensor: the tensor's arrays and scalars are the arguments, or with ``MULTI`` come from ``table_ptr``.

    ``*_dev``: run-time device descriptions (``packing.DEVICE_FIELDS``), ``*_SPEC`` their
    compile-time parts (``common.DEVICE_SPEC``), ``*_table`` the response tables; the
    ``main`` ones are unused by asgd. ``TRANSFER``: rl's step transfers (rl2 always does).
    """
    WRITES_MAIN: tl.constexpr = (ALG == RL2) or (ALG == RL and TRANSFER)
    if MULTI:
        tensor, block = multi_tensor_block(table_ptr, n_tensors, search_steps)
        numel, offset, first_var_key, first_var_key_a, main_var_key, main_var_key_a = tensor_scalars(table_ptr, n_tensors, tensor)
        key = tensor_key(step_ptr, tensor)
        numel, lead = multi_tensor_extent(numel, offset, ALIGNED, NUMEL16)
        first_ptr = tensor_array(table_ptr, n_tensors, tensor, 0, first_ptr, ALIGNED)
        if ALG != ASGD:
            main_ptr = tensor_array(table_ptr, n_tensors, tensor, 1, main_ptr, ALIGNED)
        if ALG == RL2:
            H_ptr = tensor_array(table_ptr, n_tensors, tensor, 2, H_ptr, ALIGNED)
        g_ptr = tensor_array(table_ptr, n_tensors, tensor, 4, g_ptr, ALIGNED)
        if HAS_A:
            A_ptr = tensor_array(table_ptr, n_tensors, tensor, 5, A_ptr, ALIGNED)
        # Where the pulse outputs and Wbar are looked up decides what ptxas spills (bench
        # gpu-compile): asgd, whose only write ends the block, here; rl and rl2 where they are
        # written (held from here on, W's pulse address spilled in rl2 with A).
        if ALG == ASGD:
            count_first_ptr, pairs_first_ptr = _first_outputs(step_ptr, n_tensors, tensor, count_first_ptr, pairs_first_ptr,
                                                              HAS_A, TOTALS, ALIGNED)  # fmt: skip
    else:
        tensor = 0
        block = tl.program_id(0)
    blk = block_range(block, offset, lead, numel, BLOCK)
    local, mask, idx, call0 = blk

    g = load_f32(g_ptr, local, mask)
    if HAS_A:
        a = load_f32(A_ptr, local, mask)
    else:
        a = g
    first_keys = (first_var_key, first_var_key_a)
    first_st, up, down = first_write(first_ptr, blk, key, g, a, lr, cap, first_dev, first_keys, first_table, FIRST_SPEC,
                                     HAS_A, HAS_CAP, BLOCK)  # fmt: skip
    if MULTI and ALG != ASGD:
        count_first_ptr, pairs_first_ptr = _first_outputs(step_ptr, n_tensors, tensor, count_first_ptr, pairs_first_ptr,
                                                          HAS_A, TOTALS, ALIGNED)  # fmt: skip
    report_pulses(count_first_ptr, pairs_first_ptr, local, mask, up, down, HAS_A, TOTALS)
    if WRITES_MAIN:
        x_w = load_f32(main_ptr, local, mask)
        params = array_params(idx, (main_var_key, main_var_key_a), main_dev, main_table, MAIN_SPEC)
        dw = params[3]
        if READ_NOISE:
            p_hat = first_st + tl.to_tensor(read_noise) * stream_normal(key, call0, SALT_READ_P, BLOCK)
        else:
            p_hat = first_st
        t = tl.to_tensor(tlr)
        if ALG == RL:
            n = stochastic_round(tl.div_rn(t * p_hat, dw), stream_uniform(key, call0, SALT_ROUND_W, BLOCK))
        else:
            h = load_f32(H_ptr, local, mask)
            if EMA:
                h = (1.0 - t) * h + t * p_hat
                n = stochastic_round(tl.div_rn(t * h, dw), stream_uniform(key, call0, SALT_ROUND_W, BLOCK))
            else:
                h = h + t * p_hat
                n = threshold_count(h, tl.to_tensor(threshold), dw)
        w_st, up, down = transfer_write(main_ptr, blk, key, x_w, n, cap, params, main_dev, main_table, MAIN_SPEC, HAS_CAP, BLOCK)
        if MULTI:
            count_main_ptr = tensor_output(step_ptr, n_tensors, tensor, 2, count_main_ptr, ALIGNED and not TOTALS)
        report_pulses(count_main_ptr, count_main_ptr, local, mask, up, down, False, TOTALS)
        if ALG == RL2:
            if not EMA:
                h = h - (up - down) * dw
            store_f32(H_ptr, local, h, mask)
    elif MIX:
        w_st = load_f32(main_ptr, local, mask)
    if MIX:
        if MULTI:
            Wbar_ptr = tensor_array(table_ptr, n_tensors, tensor, 3, Wbar_ptr, ALIGNED)
        store_f32(Wbar_ptr, local, w_st + tl.to_tensor(mix) * first_st, mask)


def launch(
    algorithm: str,
    arrays: dict[str, Sequence[torch.Tensor]],
    outputs: dict[str, Sequence[torch.Tensor]],
    *,
    keys: Sequence[int],
    offsets: Sequence[int],
    var_keys: Sequence[Sequence[int]],
    devices: Sequence[float],
    tables: Sequence[torch.Tensor],
    scalars: Sequence[float],
    flags: Sequence[bool],
    flag: bool = False,
) -> None:
    """One launch of ``_step_kernel`` over the tensors of ``arrays`` (the launcher behind every op).

    Args:
        algorithm: a name of ``reference.ALGORITHMS`` ("asgd", "rl" or "rl2").
        arrays: per role of ``ARRAYS`` one tensor per updated tensor; ``A`` and ``Wbar`` may be
            empty (no excess input, no mixed weight), roles the algorithm lacks absent.
        outputs: per role of ``OUTPUTS`` the pulse outputs, one per tensor: int32 per element,
            or 0-d int64 totals; ``pairs_first`` empty unless ``A`` is given and counts are per
            element, ``count_main`` absent for asgd (and unused by rl without ``transfer``).
        keys, offsets: per tensor the step key and the global index of element 0.
        var_keys: per described array (first, then main) one variation key per tensor.
        devices: the device descriptions (``packing.DEVICE_FIELDS`` floats each) of the
            first array and (rl, rl2) the main one, concatenated.
        tables: their response tables (``common.table_tensor``).
        scalars, flags: ``common.STEP_SCALARS`` and ``common.STEP_FLAGS``.
        flag: the algorithm's step flag (``Algorithm.step_flag``: whether an rl step transfers P into W).
    """
    spec = ALGORITHMS[algorithm]
    alg = spec.id
    first = list(arrays["first"])
    A = list(arrays.get("A", ()))
    has_a = len(A) == len(first)
    counts = list(outputs["count_first"])
    totals = is_total(counts[0])
    main = list(arrays.get("main", first))
    Wbar, write_mix = mixed_pointers(list(arrays.get("Wbar", ())), main) if "main" in arrays else (first, False)
    pointers = {
        "first_ptr": first,
        "main_ptr": main,
        "H_ptr": list(arrays.get("H", first)),
        "Wbar_ptr": Wbar,
        "g_ptr": list(arrays["g"]),
        "A_ptr": A if has_a else list(arrays["g"]),
    }
    writes_main = spec.residual and spec.writes_w(bool(flag))
    out_pointers = {
        "count_first_ptr": counts,
        "pairs_first_ptr": list(outputs["pairs_first"]) if has_a and not totals else counts,
        "count_main_ptr": list(outputs["count_main"]) if writes_main else counts,
    }
    n_fields = len(devices) // len(tables)
    devs = [tuple(devices[i * n_fields : (i + 1) * n_fields]) for i in range(len(tables))]
    first_keys, first_keys_a = variation_rows(var_keys[0], devs[0])
    main_keys, main_keys_a = variation_rows(var_keys[-1], devs[-1])
    scalar_rows = {
        "offset": offsets,
        "first_var_key": first_keys,
        "first_var_key_a": first_keys_a,
        "main_var_key": main_keys,
        "main_var_key_a": main_keys_a,
    }
    block = block_size()
    launched = tensor_launch(pointers, out_pointers, scalar_rows, keys, block)
    if launched is None:
        return
    grid, per_tensor = launched
    lr, tlr, mix, read_noise, threshold, cap = scalars
    has_cap, read_on, ema = flags
    with device_guard(first[0].device):
        _step_kernel[grid](
            first_dev=devs[0],
            main_dev=devs[-1],
            first_table=tables[0],
            main_table=tables[-1],
            lr=lr,
            tlr=tlr,
            mix=mix,
            read_noise=read_noise,
            threshold=threshold,
            cap=cap,
            ALG=alg,
            FIRST_SPEC=device_spec(devs[0], tables[0]),
            MAIN_SPEC=device_spec(devs[-1], tables[-1]),
            TRANSFER=bool(flag) and algorithm == "rl",
            EMA=bool(ema) and algorithm == "rl2",
            READ_NOISE=bool(read_on) and writes_main,
            HAS_A=has_a,
            HAS_CAP=bool(has_cap),
            TOTALS=totals,
            MIX=write_mix,
            BLOCK=block,
            **per_tensor,
            **launch_options(),
        )
