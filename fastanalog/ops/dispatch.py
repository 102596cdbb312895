"""The analog update of many tensors: grouping, flat views, and the one op per algorithm.

:func:`analog_step_group` updates many tensors at once: tensors with the same config,
device and array dtypes go to their algorithm's op (``torch.ops.fastanalog.{asgd,rl,rl2}_step``,
``fastanalog.ops.library``) in one call, whose kernel the dispatcher picks by device: on CPU
the C++ kernels (the reference for other dtypes, e.g. float64, or without the compiled
library), on CUDA the Triton kernels (else the CUDA kernels, else the reference), elsewhere
the reference. Each tensor gets exactly what :func:`analog_step` gives it alone.

Implementations (``BACKENDS``; :func:`backend_for` names the one that serves a tensor):

* ``reference`` - ``ops/reference.py``, plain PyTorch, any device (the oracle);
* ``cpp``       - the compiled CPU kernels (``csrc/analog_update.cpp``);
* ``cuda``      - the compiled CUDA kernels (``csrc/cuda/analog_update.cu``);
* ``triton``    - fused Triton kernels (``ops/triton``), CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``.

``FASTANALOG_BACKEND`` overrides the choice and fails with a clear error when the named
implementation cannot serve a tensor; :func:`use_backend` does the same within a block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import AnalogConfig
from . import library, reference
from .library import (
    BACKENDS,
    KERNEL_DTYPES,
    MIN_TRITON,
    _noticed,  # noqa: F401  (the dtypes already noticed as served by the reference; tests reset it)
    available_backends,
    backend_available,
    backend_for,
    triton_usable,
    triton_version_ok,
    use_backend,
)
from .reference import StepPulses

__all__ = [
    "BACKENDS",
    "KERNEL_DTYPES",
    "MIN_TRITON",
    "StepItem",
    "analog_step",
    "analog_step_group",
    "available_backends",
    "backend_available",
    "backend_for",
    "mixed_weight",
    "triton_usable",
    "triton_version_ok",
    "use_backend",
]


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
    ``counters``: None, or a zeroed int64 tensor of two elements (a layer's
    ``analog_last_pulses``) into which the step adds its pulses, W's at 0 and P's at 1, in
    the kernels: the item's StepPulses then hold these totals as one-element views of it.
    """

    arrays: dict[str, torch.Tensor | None]
    weight: torch.Tensor | None
    grad: torch.Tensor
    config: AnalogConfig
    key: int
    tensor_id: int
    A: torch.Tensor | None = None
    counters: torch.Tensor | None = None


# The arrays each algorithm updates (its declaration's, then the mixed weight with a residual),
# by the roles of a StepItem: the keys of ``analog_state()`` and "weight".
_ARRAYS = {
    name: tuple(library.STATE_NAMES[n] for n in spec.op_arrays)
    for name, spec in reference.ALGORITHMS.items()
}


def analog_step_group(items: Sequence[StepItem], *, lr: float, step: int, totals: bool = False) -> list[StepPulses]:
    """One step of ``lr`` on many analog tensors, arrays updated in place; one StepPulses per item, in order.

    Tensors with the same config (their tensor ids and keys apart), device and array dtypes
    form one call of their algorithm's op. Every tensor gets the result of
    :func:`analog_step`. ``step`` counts from 1 (it sets the transfer steps of rl). With
    ``totals``, each written array's pulses are reported as their sum |N| (a 0-d int64
    tensor) instead of per element, which is all that pulse bookkeeping needs and saves
    writing the counts.
    """
    launches: dict[tuple, list[int]] = {}
    # The implementation depends on the device, dtype and algorithm alone (checked once per
    # such triple: a FASTANALOG_BACKEND that cannot serve them fails before anything is updated),
    # and equal configs are one call: configs are looked up once per config object, not per
    # tensor (hashing a config walks all its fields).
    checked: set[tuple[torch.device, torch.dtype, str]] = set()
    config_ids: dict[int, int] = {}
    distinct: dict[AnalogConfig, int] = {}
    for i, item in enumerate(items):
        algorithm = item.config.algorithm
        if algorithm not in _ARRAYS:
            raise ValueError(f"analog_step got algorithm {algorithm!r}, which has no analog update")
        device, dtypes = _check_item(item, algorithm)
        if (device, dtypes[0], algorithm) not in checked:  # dtypes[0]: W's
            backend_for(item.arrays["main"], algorithm)
            checked.add((device, dtypes[0], algorithm))
        config_id = config_ids.get(id(item.config))
        if config_id is None:
            config_id = config_ids[id(item.config)] = distinct.setdefault(item.config, len(distinct))
        launches.setdefault((config_id, device, dtypes), []).append(i)
    out: list[StepPulses | None] = [None] * len(items)
    for indices in launches.values():
        for i, pulses in zip(indices, _launch([items[i] for i in indices], lr=lr, step=step, totals=totals)):
            out[i] = pulses
    return out


_ROLES = {"main": "W (main)", "residual": "P (residual)", "buffer": "H (buffer)", "weight": "Wbar (stored mixed weight)"}


def _check_item(item: StepItem, algorithm: str) -> tuple[torch.device, tuple]:
    """ValueError/TypeError naming the array where ``item`` cannot be stepped; checked before anything is written.

    The arrays ``algorithm`` needs are present, floating, of W's shape, dtype and device, and
    apart in memory; the gradient and ``A`` are floating tensors of W's shape on its device.
    Returns W's device and the item's dtypes, which with its config make its launch: those of
    the arrays (W's for each array, as they share it; None for a role without one), of the
    gradient and of A (None without), and whether it has pulse counters.
    """
    main = item.arrays.get("main")
    if not isinstance(main, torch.Tensor):
        raise TypeError(f"W (main) must be a tensor, got {type(main).__name__}")
    if not main.is_floating_point():
        raise TypeError(f"W (main) must be a floating tensor, got {main.dtype}")
    shape, dtype, device = main.shape, main.dtype, main.device
    written = [("main", main)]
    dtypes = [dtype]
    for name in _ARRAYS[algorithm][1:]:  # W is the first role of every algorithm
        t = item.weight if name == "weight" else item.arrays[name]
        if t is None:
            if name == "weight":
                dtypes.append(None)
                continue
            raise ValueError(f"{algorithm} needs the array {_ROLES[name]}, got None")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_ROLES[name]} must be a tensor, got {type(t).__name__}")
        if t is not main:
            if t.shape != shape:
                raise ValueError(f"{_ROLES[name]} has shape {tuple(t.shape)}, W has {tuple(shape)}")
            if t.dtype != dtype:
                raise ValueError(f"{_ROLES[name]} has dtype {t.dtype}, W has {dtype}: store a tensor's arrays in one dtype")
            if t.device != device:
                raise ValueError(f"{_ROLES[name]} is on {t.device}, W on {device}: keep a tensor's arrays on one device")
        written.append((name, t))
        dtypes.append(dtype)
    dtypes.append(_check_input("the gradient", item.grad, shape, device))
    dtypes.append(None if item.A is None else _check_input("A (the per-sample |g| sums)", item.A, shape, device))
    dtypes.append(item.counters is not None)
    numel = main.numel()
    if len(written) == 1 or numel == 0 or device.type == "meta":  # asgd writes one array: nothing to overlap
        return device, tuple(dtypes)
    size = main.element_size()  # every written array has W's dtype and shape
    spans = []
    for name, t in written:
        start = t.untyped_storage().data_ptr() + t.storage_offset() * size
        spans.append((name, start, start + (numel if t.is_contiguous() else _extent(t)) * size))
    for i, (name, start, end) in enumerate(spans):
        for other, other_start, other_end in spans[i + 1 :]:
            if start < other_end and other_start < end:
                raise ValueError(f"{_ROLES[name]} and {_ROLES[other]} overlap in memory: each array needs its own")
    return device, tuple(dtypes)


def _check_input(label: str, t, shape: torch.Size, device: torch.device) -> torch.dtype:
    """ValueError/TypeError unless ``t`` (the gradient or A) is a floating tensor of W's ``shape`` on its ``device``.

    Returns its dtype.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{label} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{label} must be a floating tensor, got {t.dtype}")
    if t.shape != shape:
        raise ValueError(f"{label} has shape {tuple(t.shape)}, W has {tuple(shape)}")
    if t.device != device:
        raise ValueError(f"{label} is on {t.device}, W on {device}")
    return t.dtype


def _extent(t: torch.Tensor) -> int:
    """Elements from the first to one past the last element ``t`` addresses (its span in storage).

    For a contiguous ``t`` that is not empty, ``t.numel()``: its row-major strides make the sum telescope.
    """
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def _launch(items: list[StepItem], *, lr: float, step: int, totals: bool) -> list[StepPulses]:
    """Update ``items`` (one config, device and dtypes) with one call of their algorithm's op."""
    config = items[0].config
    names = _ARRAYS[config.algorithm]
    # Flat views in logical (row-major) order: the random counter of an element is its
    # logical index whatever the memory layout (e.g. channels_last), so strided arrays
    # are updated through contiguous copies (``copies``) and written back.
    # A role without arrays (no stored mixed weight: all None, as the launch key says) is None.
    flat: dict[str, list[torch.Tensor] | None] = {}
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    for n in names:
        arrays = [item.weight for item in items] if n == "weight" else [item.arrays[n] for item in items]
        if arrays[0] is None:
            flat[n] = None
            continue
        flat[n] = [_flat(t) for t in arrays]
        copies += [(t, view) for t, view in zip(arrays, flat[n]) if not t.is_contiguous()]
    grads = [_flat(item.grad) for item in items]
    for item in items:
        if item.A is not None and item.A.shape != item.grad.shape:
            raise ValueError(f"A (per-sample |g| sums) must have the gradient's shape {tuple(item.grad.shape)}, got {tuple(item.A.shape)}")
    sums = [_flat(item.A) for item in items] if items[0].A is not None else None
    counters = [_counter_views(item.counters) for item in items] if items[0].counters is not None else None
    out = library.step(
        config.algorithm,
        flat,
        grads,
        lr=lr,
        config=config,
        keys=[item.key for item in items],
        tensor_ids=[item.tensor_id for item in items],
        flag=reference.ALGORITHMS[config.algorithm].step_flag(config, step),
        As=sums,
        totals=totals,
        counters=counters,
    )
    for t, array in copies:
        t.copy_(array.view(t.shape))
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


def _counter_views(counters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W's, P's) one-element views of a two-element int64 pulse counter, made once per tensor."""
    views = getattr(counters, "_fa_views", None)
    if views is None or views[0].data_ptr() != counters.data_ptr():
        if counters.dtype != torch.int64 or counters.shape != (2,) or not counters.is_contiguous():
            raise ValueError(f"counters must be a contiguous int64 tensor of two elements, got {counters.dtype} of shape {tuple(counters.shape)}")
        views = counters._fa_views = (counters[0:1], counters[1:2])
    return views


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A flat view of ``t`` if it is contiguous, else a flat contiguous copy."""
    return t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)
