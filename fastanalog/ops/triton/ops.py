"""The public Triton launchers, thin layers over ``step.launch``.

They are the CUDA implementation of the per-algorithm ops ``fastanalog::{asgd,rl,rl2}_step``
(``fastanalog/ops/library.py``), which ``torch.compile`` and ``opcheck`` see; below them there
is no op of their own. Every entry point takes the same kinds of arguments, so one launch path
serves all six:

* the arrays (tensors for a single-tensor op, lists for a multi-tensor one), the excess
  input ``A`` (None / empty: none), the pulse outputs (int32 per element, or 0-d int64
  totals; ``pairs`` empty unless ``A`` is given and counts are per element);
* ``tables``: the response tables (``common.table_tensor``) of W and (rl, rl2) P;
* per tensor the step key and the offset; ``var_keys``, per array (W, then P) one
  variation key per tensor;
* ``scalars`` (``common.STEP_SCALARS``), ``flags`` (``common.STEP_FLAGS``) and ``devices``,
  the float32 device descriptions of W and (rl, rl2) P in ``packing.DEVICE_FIELDS`` order,
  concatenated (``common.described_devices``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...config import AnalogConfig
from ..packing import DEVICE_FIELDS
from ..reference import StepPulses
from .common import (
    check_arrays,
    check_excess,
    check_offset,
    check_tensor_lists,
    described_devices,
    device_tables,
    excess_list,
    given_arrays,
    is_total,
    new_counts,
    new_counts_multi,
    step_flags,
    step_scalars,
    variation_keys,
)
from .step import launch


def _launch(algorithm: str, W, g, A, pulses, pairs, tables, keys, offsets, var_keys, scalars, flags, devices, **rl_args):
    """``step.launch`` from an op's arguments (lists, one entry per tensor; W-then-P order per array).

    ``rl_args``: ``P``, ``Wbar``, ``pulses_w`` (and ``H``) of rl and rl2, ``transfer`` of rl.
    """
    arrays = {"first": W, "g": g, "A": A}
    outputs = {"count_first": pulses, "pairs_first": pairs}
    per_array = [var_keys[i * len(keys) : (i + 1) * len(keys)] for i in range(len(tables))]
    n = len(DEVICE_FIELDS)
    described = [devices[i * n : (i + 1) * n] for i in range(len(tables))]
    if algorithm != "asgd":
        # rl, rl2: the gradient writes P first, the transfer writes W (the main array).
        arrays.update(first=rl_args["P"], main=W, Wbar=rl_args["Wbar"])
        if "H" in rl_args:
            arrays["H"] = rl_args["H"]
        outputs["count_main"] = rl_args["pulses_w"]
        tables, per_array, described = tables[::-1], per_array[::-1], described[::-1]
    step_args = dict(keys=keys, offsets=offsets, var_keys=per_array, devices=[v for d in described for v in d], tables=tables)
    launch(algorithm, arrays, outputs, scalars=scalars, flags=flags, transfer=rl_args.get("transfer", True), **step_args)


# ----- the entry points (arguments by kind: arrays, pulse outputs, tables, per tensor, per step) --------
Tensor = torch.Tensor
Tensors = list[torch.Tensor]


def asgd_step_triton_(W: Tensor, g: Tensor, A: Tensor | None, pulses: Tensor, pairs: Tensor, tables: Tensors,
                      key: int, offset: int, var_keys: list[int], scalars: list[float], flags: list[bool], devices: list[float]) -> None:  # fmt: skip
    """In-place Analog SGD step (behind :func:`asgd_step_triton`)."""
    _launch("asgd", [W], [g], [A] if A is not None else [], [pulses], [pairs], tables, [key], [offset], var_keys, scalars, flags, devices)


def asgd_multi_step_triton_(W: Tensors, g: Tensors, A: Tensors, pulses: Tensors, pairs: Tensors, tables: Tensors,
                            keys: list[int], offsets: list[int], var_keys: list[int], scalars: list[float], flags: list[bool],
                            devices: list[float]) -> None:  # fmt: skip
    """In-place Analog SGD step of several tensors in one launch (behind :func:`asgd_multi_step_triton`)."""
    _launch("asgd", W, g, A, pulses, pairs, tables, keys, offsets, var_keys, scalars, flags, devices)


def rl_step_triton_(W: Tensor, P: Tensor, Wbar: Tensor, g: Tensor, A: Tensor | None, pulses_p: Tensor, pairs_p: Tensor,
                    pulses_w: Tensor, tables: Tensors, key: int, offset: int, var_keys: list[int], transfer: bool,
                    scalars: list[float], flags: list[bool], devices: list[float]) -> None:  # fmt: skip
    """In-place rl step (behind :func:`rl_step_triton`); an empty ``Wbar`` asks for no mixed weight,
    ``pulses_w`` is written only when ``transfer``."""
    rl_args = dict(P=[P], Wbar=[Wbar], pulses_w=[pulses_w], transfer=transfer)
    _launch("rl", [W], [g], [A] if A is not None else [], [pulses_p], [pairs_p], tables, [key], [offset], var_keys, scalars, flags,
            devices, **rl_args)  # fmt: skip


def rl_multi_step_triton_(W: Tensors, P: Tensors, Wbar: Tensors, g: Tensors, A: Tensors, pulses_p: Tensors, pairs_p: Tensors,
                          pulses_w: Tensors, tables: Tensors, keys: list[int], offsets: list[int], var_keys: list[int],
                          transfer: bool, scalars: list[float], flags: list[bool], devices: list[float]) -> None:  # fmt: skip
    """In-place rl step of several tensors in one launch (behind :func:`rl_multi_step_triton`)."""
    rl_args = dict(P=P, Wbar=Wbar, pulses_w=pulses_w, transfer=transfer)
    _launch("rl", W, g, A, pulses_p, pairs_p, tables, keys, offsets, var_keys, scalars, flags, devices, **rl_args)


def rl2_step_triton_(W: Tensor, P: Tensor, H: Tensor, Wbar: Tensor, g: Tensor, A: Tensor | None, pulses_p: Tensor,
                     pairs_p: Tensor, pulses_w: Tensor, tables: Tensors, key: int, offset: int, var_keys: list[int],
                     scalars: list[float], flags: list[bool], devices: list[float]) -> None:  # fmt: skip
    """In-place rl2 step (behind :func:`rl2_step_triton`); an empty ``Wbar`` asks for no mixed weight."""
    rl_args = dict(P=[P], H=[H], Wbar=[Wbar], pulses_w=[pulses_w])
    _launch("rl2", [W], [g], [A] if A is not None else [], [pulses_p], [pairs_p], tables, [key], [offset], var_keys, scalars, flags,
            devices, **rl_args)  # fmt: skip


def rl2_multi_step_triton_(W: Tensors, P: Tensors, H: Tensors, Wbar: Tensors, g: Tensors, A: Tensors, pulses_p: Tensors,
                           pairs_p: Tensors, pulses_w: Tensors, tables: Tensors, keys: list[int], offsets: list[int],
                           var_keys: list[int], scalars: list[float], flags: list[bool], devices: list[float]) -> None:  # fmt: skip
    """In-place rl2 step of several tensors in one launch (behind :func:`rl2_multi_step_triton`)."""
    _launch("rl2", W, g, A, pulses_p, pairs_p, tables, keys, offsets, var_keys, scalars, flags, devices, P=P, H=H, Wbar=Wbar,
            pulses_w=pulses_w)  # fmt: skip


# ----- argument preparation -----------------------------------------------------------------
def _step_pulses(first: torch.Tensor, pairs: torch.Tensor, main: torch.Tensor | None, has_a: bool) -> StepPulses:
    return StepPulses(first=first, main=main, first_pairs=pairs if has_a and not is_total(first) else None)


def _config_args(config: AnalogConfig, lr: float, where: torch.device) -> dict:
    """The op arguments that come from the config: tables, scalars, flags and device descriptions."""
    devices = [v for dev in described_devices(config) for v in dev]
    return dict(tables=device_tables(config, where), scalars=step_scalars(config, lr), flags=step_flags(config), devices=devices)


def prepare(
    algorithm: str,
    arrays: dict[str, torch.Tensor | None],
    g: torch.Tensor,
    *,
    lr: float,
    config: AnalogConfig,
    key: int,
    tensor_id: int,
    offset: int = 0,
    A: torch.Tensor | None = None,
    totals: bool = False,
    transfer: bool | None = None,
) -> tuple[dict, StepPulses]:
    """(keyword arguments of the algorithm's single-tensor op, the StepPulses it fills).

    ``arrays``: ``W`` (asgd); ``W``, ``P``, ``Wbar`` (rl); ``W``, ``P``, ``H``, ``Wbar`` (rl2),
    ``Wbar`` None for no mixed weight. ``transfer``: rl's flag (None for the others).
    """
    W = arrays["W"]
    numel = W.numel()
    check_arrays(numel, **given_arrays(**arrays, g=g))
    check_excess(A, g)
    where = W.device
    pairs = new_counts(numel if A is not None and not totals else 0, where, False)
    kwargs = dict(arrays, g=g, A=A, key=int(key), offset=check_offset(offset), var_keys=variation_keys(config, tensor_id))
    kwargs.update(_config_args(config, lr, where))
    if algorithm == "asgd":
        kwargs.update(pulses=new_counts(numel, where, totals), pairs=pairs)
        return kwargs, _step_pulses(kwargs["pulses"], pairs, None, A is not None)
    if kwargs["Wbar"] is None:
        kwargs["Wbar"] = W.new_empty(0)
    writes_main = algorithm == "rl2" or transfer
    if algorithm == "rl":
        kwargs["transfer"] = bool(transfer)
    pulses_w = new_counts(numel, where, totals) if writes_main else new_counts(0, where, False)
    kwargs.update(pulses_p=new_counts(numel, where, totals), pairs_p=pairs, pulses_w=pulses_w)
    return kwargs, _step_pulses(kwargs["pulses_p"], pairs, pulses_w if writes_main else None, A is not None)


def prepare_multi(
    algorithm: str,
    arrays: dict[str, Sequence[torch.Tensor] | None],
    g: Sequence[torch.Tensor],
    *,
    lr: float,
    config: AnalogConfig,
    keys: Sequence[int],
    tensor_ids: Sequence[int],
    offsets: Sequence[int] | None = None,
    As: Sequence[torch.Tensor] | None = None,
    totals: bool = False,
    transfer: bool | None = None,
) -> tuple[dict, list[StepPulses]]:
    """(keyword arguments of the algorithm's multi-tensor op, the StepPulses it fills, one per tensor); see :func:`prepare`."""
    offsets = check_tensor_lists(given_arrays(**arrays, g=g), keys, tensor_ids, offsets)
    A = excess_list(As, g)
    has_a = bool(A)
    where = arrays["W"][0].device
    numels = [Wi.numel() for Wi in arrays["W"]]
    var_keys = [variation_keys(config, tid) for tid in tensor_ids]
    kwargs = {name: list(ts) if ts is not None else [] for name, ts in arrays.items()}
    # per array (W, then P) one variation key per tensor
    kwargs.update(g=list(g), A=A, keys=[int(k) for k in keys], offsets=offsets, var_keys=[k for ks in zip(*var_keys) for k in ks])
    kwargs.update(_config_args(config, lr, where))
    (pairs,) = new_counts_multi([n if has_a and not totals else 0 for n in numels], where, False)
    if algorithm == "asgd":
        (pulses,) = new_counts_multi(numels, where, totals)
        kwargs.update(pulses=pulses, pairs=pairs)
        return kwargs, [_step_pulses(c, p, None, has_a) for c, p in zip(pulses, pairs)]
    writes_main = algorithm == "rl2" or transfer
    if algorithm == "rl":
        kwargs["transfer"] = bool(transfer)
    if writes_main:
        pulses_p, pulses_w = new_counts_multi(numels, where, totals, arrays=2)
    else:
        (pulses_p,) = new_counts_multi(numels, where, totals)
        (pulses_w,) = new_counts_multi([0] * len(numels), where, False)
    kwargs.update(pulses_p=pulses_p, pairs_p=pairs, pulses_w=pulses_w)
    mains = pulses_w if writes_main else [None] * len(numels)
    return kwargs, [_step_pulses(c, p, m, has_a) for c, p, m in zip(pulses_p, pairs, mains)]


# ----- the public launchers -------------------------------------------------------------------
# Each has the signature and result of its reference twin (``fastanalog.ops.reference``).
# Arguments they share:
#   arrays (W, P, H, Wbar): flat float32/bfloat16/float16 tensors in weight units, updated in
#       place; Wbar None: no mixed weight is written. g: the gradient (at W for asgd, at Wbar
#       for rl/rl2), same numel, any supported float dtype.
#   lr: learning rate (rounded to float32). config: the tensor's AnalogConfig (device for W,
#       residual_device for P, buffer, threshold, ...).
#   key: this step's 63-bit Philox key (philox.step_key); tensor_id: the analog tensor's id
#       (keys the device-to-device draw); offset: global index of element 0 (shards).
#   A: the per-sample |g| sums of the first write (SPEC section 2a), like g; None: no excess.
#   totals: report per written array the sum of N_up + N_down (0-d int64) instead of
#       per-element int32 counts (then first_pairs is None).
# The multi-tensor launchers take one entry per tensor in every list (arrays, keys,
# tensor_ids, offsets, default 0, and As, None: no excess for any tensor), each array role of
# one dtype and device, update all tensors of one config in one launch, each as the
# single-tensor launcher would, and return one StepPulses per tensor.
def asgd_step_triton(W: torch.Tensor, g: torch.Tensor, *, lr: float, config: AnalogConfig, key: int, tensor_id: int,
                     offset: int = 0, A: torch.Tensor | None = None, totals: bool = False) -> StepPulses:  # fmt: skip
    """Analog SGD on flat tensors, in place: ``StepPulses(first=N_W, first_pairs=pairs with A, else None)``."""
    kw = dict(lr=lr, config=config, key=key, tensor_id=tensor_id, offset=offset, A=A, totals=totals)
    kwargs, pulses = prepare("asgd", {"W": W}, g, **kw)
    asgd_step_triton_(**kwargs)
    return pulses


def rl_step_triton(W: torch.Tensor, P: torch.Tensor, Wbar: torch.Tensor | None, g: torch.Tensor, *, lr: float,
                   config: AnalogConfig, key: int, tensor_id: int, transfer: bool, offset: int = 0,
                   A: torch.Tensor | None = None, totals: bool = False) -> StepPulses:  # fmt: skip
    """Residual Learning v1 on flat tensors, in place; ``transfer``: whether this step transfers P into W.

    Returns ``StepPulses(first=N_P, main=N_W or None without transfer, first_pairs=pairs of P
    with A, else None)``.
    """
    kw = dict(lr=lr, config=config, key=key, tensor_id=tensor_id, offset=offset, A=A, totals=totals, transfer=transfer)
    kwargs, pulses = prepare("rl", {"W": W, "P": P, "Wbar": Wbar}, g, **kw)
    rl_step_triton_(**kwargs)
    return pulses


def rl2_step_triton(W: torch.Tensor, P: torch.Tensor, H: torch.Tensor, Wbar: torch.Tensor | None, g: torch.Tensor, *,
                    lr: float, config: AnalogConfig, key: int, tensor_id: int, offset: int = 0,
                    A: torch.Tensor | None = None, totals: bool = False) -> StepPulses:  # fmt: skip
    """Residual Learning v2 on flat tensors (H: the digital buffer), in place.

    Returns ``StepPulses(first=N_P, main=N_W, first_pairs=pairs of P with A, else None)``.
    """
    kw = dict(lr=lr, config=config, key=key, tensor_id=tensor_id, offset=offset, A=A, totals=totals)
    kwargs, pulses = prepare("rl2", {"W": W, "P": P, "H": H, "Wbar": Wbar}, g, **kw)
    rl2_step_triton_(**kwargs)
    return pulses


def asgd_multi_step_triton(W: Sequence[torch.Tensor], g: Sequence[torch.Tensor], *, lr: float, config: AnalogConfig,
                           keys: Sequence[int], tensor_ids: Sequence[int], offsets: Sequence[int] | None = None,
                           As: Sequence[torch.Tensor] | None = None, totals: bool = False) -> list[StepPulses]:  # fmt: skip
    """Analog SGD on several tensors of one config in one launch; tensor ``i`` as ``asgd_step_triton`` updates it."""
    kw = dict(lr=lr, config=config, keys=keys, tensor_ids=tensor_ids, offsets=offsets, As=As, totals=totals)
    kwargs, pulses = prepare_multi("asgd", {"W": W}, g, **kw)
    asgd_multi_step_triton_(**kwargs)
    return pulses


def rl_multi_step_triton(W: Sequence[torch.Tensor], P: Sequence[torch.Tensor], Wbar: Sequence[torch.Tensor] | None,
                         g: Sequence[torch.Tensor], *, lr: float, config: AnalogConfig, keys: Sequence[int],
                         tensor_ids: Sequence[int], transfer: bool, offsets: Sequence[int] | None = None,
                         As: Sequence[torch.Tensor] | None = None, totals: bool = False) -> list[StepPulses]:  # fmt: skip
    """Residual Learning v1 on several tensors of one config in one launch; tensor ``i`` as ``rl_step_triton`` updates it."""
    kw = dict(lr=lr, config=config, keys=keys, tensor_ids=tensor_ids, offsets=offsets, As=As, totals=totals, transfer=transfer)
    kwargs, pulses = prepare_multi("rl", {"W": W, "P": P, "Wbar": Wbar}, g, **kw)
    rl_multi_step_triton_(**kwargs)
    return pulses


def rl2_multi_step_triton(W: Sequence[torch.Tensor], P: Sequence[torch.Tensor], H: Sequence[torch.Tensor],
                          Wbar: Sequence[torch.Tensor] | None, g: Sequence[torch.Tensor], *, lr: float, config: AnalogConfig,
                          keys: Sequence[int], tensor_ids: Sequence[int], offsets: Sequence[int] | None = None,
                          As: Sequence[torch.Tensor] | None = None, totals: bool = False) -> list[StepPulses]:  # fmt: skip
    """Residual Learning v2 on several tensors of one config in one launch; tensor ``i`` as ``rl2_step_triton`` updates it."""
    kw = dict(lr=lr, config=config, keys=keys, tensor_ids=tensor_ids, offsets=offsets, As=As, totals=totals)
    kwargs, pulses = prepare_multi("rl2", {"W": W, "P": P, "H": H, "Wbar": Wbar}, g, **kw)
    rl2_multi_step_triton_(**kwargs)
    return pulses
