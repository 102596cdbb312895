"""The public Triton launchers, thin layers over ``step.launch``.

They are the CUDA implementation of the per-algorithm ops ``fastanalog::<algorithm>_step``
(``fastanalog/ops/library.py``), which ``torch.compile`` and ``opcheck`` see; below them there
is no op of their own. One path serves every algorithm of ``reference.ALGORITHMS``:
:func:`step_triton` (one tensor) and :func:`multi_step_triton` (several tensors of one
config, one launch) take the arrays by SPEC's names (W, P, H, Wbar), check them, allocate the
pulse outputs (int32 per element, or 0-d int64 totals; pairs only with an excess input and
per-element counts) and launch with what the config gives: the response tables
(``common.table_tensor``), ``common.STEP_SCALARS``, ``common.STEP_FLAGS``, the float32 device
descriptions in ``packing.DEVICE_FIELDS`` order (``common.described_devices``) and per tensor
the step key, the offset and the variation keys. The named launchers (``asgd_step_triton``,
``rl_multi_step_triton``, ...) keep the signatures of their reference twins.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...config import AnalogConfig
from ..packing import DEVICE_FIELDS
from ..reference import Algorithm, StepPulses
from ..reference import algorithm as algorithm_spec
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
    new_counts_multi,
    step_flags,
    step_scalars,
    variation_keys,
)
from .step import launch


def _launch(spec: Algorithm, arrays: dict[str, Tensors], g: Tensors, A: Tensors, counts: dict[str, Tensors], *, tables: Tensors,
            keys: list[int], offsets: list[int], var_keys: list[int], scalars: list[float], flags: list[bool], devices: list[float],
            flag: bool) -> None:  # fmt: skip
    """``step.launch`` from an op's arguments (lists, one entry per tensor; W-then-P order per described array).

    ``arrays``: SPEC's names (``W``, ``P``, ``H``, ``Wbar``; an empty ``Wbar``: no mixed weight);
    ``counts``: ``first``, ``pairs`` and (residual algorithms) ``main``; ``flag``: the step flag.
    """
    W = arrays["W"]
    step_arrays = {"first": W, "g": g, "A": A}
    outputs = {"count_first": counts["first"], "pairs_first": counts["pairs"]}
    per_array = [var_keys[i * len(keys) : (i + 1) * len(keys)] for i in range(len(tables))]
    n = len(DEVICE_FIELDS)
    described = [devices[i * n : (i + 1) * n] for i in range(len(tables))]
    if spec.residual:
        # The gradient writes P first, the transfer writes W (the main array).
        step_arrays.update(first=arrays["P"], main=W, Wbar=arrays["Wbar"])
        if spec.buffered:
            step_arrays["H"] = arrays["H"]
        outputs["count_main"] = counts["main"]
        tables, per_array, described = tables[::-1], per_array[::-1], described[::-1]
    step_args = dict(keys=keys, offsets=offsets, var_keys=per_array, devices=[v for d in described for v in d], tables=tables)
    launch(spec.name, step_arrays, outputs, scalars=scalars, flags=flags, flag=flag, **step_args)


Tensor = torch.Tensor
Tensors = list[torch.Tensor]


# ----- argument preparation -----------------------------------------------------------------
def _config_args(config: AnalogConfig, lr: float, where: torch.device) -> dict:
    """The launch arguments that come from the config: tables, scalars, flags and device descriptions."""
    devices = [v for dev in described_devices(config) for v in dev]
    return dict(tables=device_tables(config, where), scalars=step_scalars(config, lr), flags=step_flags(config), devices=devices)


def _run(spec: Algorithm, arrays: dict[str, Tensors], g: Tensors, A: Tensors, *, lr: float, config: AnalogConfig,
         keys: list[int], offsets: list[int], var_keys: list[int], totals: bool, flag: bool) -> list[StepPulses]:  # fmt: skip
    """Allocate the pulse outputs, launch, and return one StepPulses per tensor (arguments checked)."""
    where = arrays["W"][0].device
    numels = [t.numel() for t in arrays["W"]]
    has_a = bool(A)
    writes_w = spec.residual and spec.writes_w(bool(flag))
    (pairs,) = new_counts_multi([n if has_a and not totals else 0 for n in numels], where, False)
    if writes_w:
        first, main = new_counts_multi(numels, where, totals, arrays=2)
    else:
        (first,) = new_counts_multi(numels, where, totals)
        (main,) = new_counts_multi([0] * len(numels), where, False)
    if spec.residual:
        arrays = dict(arrays, Wbar=arrays.get("Wbar") or [])
    _launch(spec, arrays, g, A, {"first": first, "pairs": pairs, "main": main}, keys=keys, offsets=offsets,
            var_keys=var_keys, flag=bool(flag), **_config_args(config, lr, where))  # fmt: skip
    return [
        StepPulses(first=c, main=m if writes_w else None, first_pairs=p if has_a and not is_total(c) else None)
        for c, p, m in zip(first, pairs, main)
    ]


def _given(spec: Algorithm, arrays: dict) -> dict:
    """The arrays ``spec`` updates, by SPEC name (a missing or None ``Wbar``: no mixed weight)."""
    missing = [n for n in spec.arrays if arrays.get(n) is None]
    if missing:
        raise ValueError(f"{spec.name} needs the arrays {', '.join(spec.arrays)}: {', '.join(missing)} missing")
    names = spec.op_arrays if arrays.get("Wbar") is not None else spec.arrays
    return {n: arrays[n] for n in names}


def step_triton(algorithm: str, arrays: dict[str, torch.Tensor | None], g: torch.Tensor, *, lr: float, config: AnalogConfig,
                key: int, tensor_id: int, offset: int = 0, A: torch.Tensor | None = None, totals: bool = False,
                flag: bool = False) -> StepPulses:  # fmt: skip
    """One step of ``algorithm`` (a name of ``reference.ALGORITHMS``) on one tensor's flat arrays, in place.

    ``arrays``: by SPEC name, ``W`` (and ``P``, ``H``, ``Wbar``: None for no mixed weight);
    ``flag``: the algorithm's step flag (rl's transfer); the rest as the named launchers below.
    """
    spec = algorithm_spec(algorithm)
    given = _given(spec, arrays)
    check_arrays(given["W"].numel(), **given_arrays(**given, g=g))
    check_excess(A, g)
    lists = {n: [t] for n, t in given.items()}
    return _run(spec, lists, [g], [A] if A is not None else [], lr=lr, config=config, keys=[int(key)],
                offsets=[check_offset(offset)], var_keys=variation_keys(config, tensor_id), totals=totals, flag=flag)[0]  # fmt: skip


def multi_step_triton(algorithm: str, arrays: dict[str, Sequence[torch.Tensor] | None], g: Sequence[torch.Tensor], *,
                      lr: float, config: AnalogConfig, keys: Sequence[int], tensor_ids: Sequence[int],
                      offsets: Sequence[int] | None = None, As: Sequence[torch.Tensor] | None = None, totals: bool = False,
                      flag: bool = False) -> list[StepPulses]:  # fmt: skip
    """:func:`step_triton` on several tensors of one config in one launch (lists, one entry per tensor)."""
    spec = algorithm_spec(algorithm)
    given = {n: list(ts) for n, ts in _given(spec, arrays).items()}
    offsets = check_tensor_lists(given_arrays(**given, g=g), keys, tensor_ids, offsets)
    A = excess_list(As, g)
    per_tensor = [variation_keys(config, tid) for tid in tensor_ids]
    var_keys = [k for ks in zip(*per_tensor) for k in ks]  # per array (W, then P) one variation key per tensor
    return _run(spec, given, list(g), A, lr=lr, config=config, keys=[int(k) for k in keys], offsets=offsets,
                var_keys=var_keys, totals=totals, flag=flag)  # fmt: skip


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
    return step_triton("asgd", {"W": W}, g, lr=lr, config=config, key=key, tensor_id=tensor_id, offset=offset, A=A, totals=totals)


def rl_step_triton(W: torch.Tensor, P: torch.Tensor, Wbar: torch.Tensor | None, g: torch.Tensor, *, lr: float,
                   config: AnalogConfig, key: int, tensor_id: int, transfer: bool, offset: int = 0,
                   A: torch.Tensor | None = None, totals: bool = False) -> StepPulses:  # fmt: skip
    """Residual Learning v1 on flat tensors, in place; ``transfer``: whether this step transfers P into W.

    Returns ``StepPulses(first=N_P, main=N_W or None without transfer, first_pairs=pairs of P
    with A, else None)``.
    """
    return step_triton("rl", {"W": W, "P": P, "Wbar": Wbar}, g, lr=lr, config=config, key=key, tensor_id=tensor_id,
                       offset=offset, A=A, totals=totals, flag=transfer)  # fmt: skip


def rl2_step_triton(W: torch.Tensor, P: torch.Tensor, H: torch.Tensor, Wbar: torch.Tensor | None, g: torch.Tensor, *,
                    lr: float, config: AnalogConfig, key: int, tensor_id: int, offset: int = 0,
                    A: torch.Tensor | None = None, totals: bool = False) -> StepPulses:  # fmt: skip
    """Residual Learning v2 on flat tensors (H: the digital buffer), in place.

    Returns ``StepPulses(first=N_P, main=N_W, first_pairs=pairs of P with A, else None)``.
    """
    return step_triton("rl2", {"W": W, "P": P, "H": H, "Wbar": Wbar}, g, lr=lr, config=config, key=key, tensor_id=tensor_id,
                       offset=offset, A=A, totals=totals, flag=config.buffer == "ema")  # fmt: skip


def asgd_multi_step_triton(W: Sequence[torch.Tensor], g: Sequence[torch.Tensor], *, lr: float, config: AnalogConfig,
                           keys: Sequence[int], tensor_ids: Sequence[int], offsets: Sequence[int] | None = None,
                           As: Sequence[torch.Tensor] | None = None, totals: bool = False) -> list[StepPulses]:  # fmt: skip
    """Analog SGD on several tensors of one config in one launch; tensor ``i`` as ``asgd_step_triton`` updates it."""
    return multi_step_triton("asgd", {"W": W}, g, lr=lr, config=config, keys=keys, tensor_ids=tensor_ids, offsets=offsets,
                             As=As, totals=totals)  # fmt: skip


def rl_multi_step_triton(W: Sequence[torch.Tensor], P: Sequence[torch.Tensor], Wbar: Sequence[torch.Tensor] | None,
                         g: Sequence[torch.Tensor], *, lr: float, config: AnalogConfig, keys: Sequence[int],
                         tensor_ids: Sequence[int], transfer: bool, offsets: Sequence[int] | None = None,
                         As: Sequence[torch.Tensor] | None = None, totals: bool = False) -> list[StepPulses]:  # fmt: skip
    """Residual Learning v1 on several tensors of one config in one launch; tensor ``i`` as ``rl_step_triton`` updates it."""
    return multi_step_triton("rl", {"W": W, "P": P, "Wbar": Wbar}, g, lr=lr, config=config, keys=keys, tensor_ids=tensor_ids,
                             offsets=offsets, As=As, totals=totals, flag=transfer)  # fmt: skip


def rl2_multi_step_triton(W: Sequence[torch.Tensor], P: Sequence[torch.Tensor], H: Sequence[torch.Tensor],
                          Wbar: Sequence[torch.Tensor] | None, g: Sequence[torch.Tensor], *, lr: float, config: AnalogConfig,
                          keys: Sequence[int], tensor_ids: Sequence[int], offsets: Sequence[int] | None = None,
                          As: Sequence[torch.Tensor] | None = None, totals: bool = False) -> list[StepPulses]:  # fmt: skip
    """Residual Learning v2 on several tensors of one config in one launch; tensor ``i`` as ``rl2_step_triton`` updates it."""
    return multi_step_triton("rl2", {"W": W, "P": P, "H": H, "Wbar": Wbar}, g, lr=lr, config=config, keys=keys,
                             tensor_ids=tensor_ids, offsets=offsets, As=As, totals=totals, flag=config.buffer == "ema")  # fmt: skip
