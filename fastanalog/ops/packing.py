"""Flat scalar descriptions of devices and steps, for kernels that take no Python objects.

A fused kernel regenerates per-element device parameters from these scalars with
exactly the formulas of ``ResponseDevice.element_params`` (SPEC section 1):
``mean * max(1 + d2d_std * clamp(z, -3, 3), 0.05)`` with ``z`` the four normals of
``randn4x(var_key, i)`` for ``(tau_min, tau_max, gamma, dw_min)`` and the first
normal of ``randn4x(var_key ^ 1, i)`` for the asymmetry (then clipped to
``[-0.99, 0.99]``); ``gamma`` varies only for families with a shape parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..config import AnalogConfig
from ..devices import DEVICE_FAMILIES, MATH_DTYPE, DeviceParams, ResponseDevice
from . import philox
from .reference import ALGORITHMS

# The one layout the compiled kernels share with Python (tests/test_layout.py checks it
# against csrc/op_layout.h): family and algorithm ids, the order of the float[] device
# description of one array (the ``DeviceField`` enum there, ``kTauMin`` <-> ``tau_min``) and
# that of the float[] step scalars (``StepField``, ``kStepLr`` <-> ``lr``).
FAMILY_IDS = {name: cls.family_id for name, cls in DEVICE_FAMILIES.items()}  # each family's own id
ALGORITHM_IDS = {name: a.id for name, a in ALGORITHMS.items()}  # each algorithm's declared id
DEVICE_FIELDS = (
    "family", "tau_min", "tau_max", "gamma", "dw_min", "asym", "d2d_std", "c2c_std", "has_gamma", "zero_shift", "shift",
    "table_size",
)  # fmt: skip
# ``flag``: the algorithm's step flag (``reference.Algorithm.step_flag``: rl's transfer flag of
# the step, rl2's "ema" buffer, 0 for asgd); ``max_pulses``:
# the pulse cap of each direction (``config.pulse_cap``).
STEP_FIELDS = ("lr", "gamma", "transfer_lr", "read_noise", "threshold", "max_pulses", "flag")


@dataclass(frozen=True)
class PackedDevice:
    """One array's device as scalars (floats are rounded to float32 by the kernels)."""

    family: int  # 0 linear, 1 power, 2 exp, 3 table
    tau_min: float
    tau_max: float
    gamma: float
    dw_min: float
    asym: float
    d2d_std: float
    c2c_std: float
    var_key: int  # Philox key of the d2d draw (0 and unused when d2d_std == 0)
    has_gamma: bool  # whether d2d varies gamma
    shift: float  # nominal symmetric point of a zero-shifted array without d2d, else 0
    zero_shift: bool  # the array is zero-shifted (with d2d: per-element symmetric point)
    table_up: tuple[float, ...] = ()
    table_down: tuple[float, ...] = ()

    @property
    def table_size(self) -> int:
        """Floats of the table samples (up, then down) that follow in the ops' ``tables`` (0 but for tables)."""
        return len(self.table_up) + len(self.table_down)


@lru_cache(maxsize=1024)
def nominal_symmetric_point(device: ResponseDevice) -> float:
    """The nominal symmetric point exactly as the reference computes it.

    The reference rounds the nominal parameters to float32 before it evaluates
    ``device.symmetric_point``; from the float64 parameters the result can differ by
    an ulp or two where the asymmetry is non-zero or the device is a table.
    """
    p = device.params()
    p32 = DeviceParams(*(torch.tensor(float(v), dtype=MATH_DTYPE) for v in (p.tau_min, p.tau_max, p.gamma, p.dw_min, p.asym)))
    return float(device.symmetric_point(p32))


def pack_device(device: ResponseDevice, tensor_id: int, array: int, zero_shift: bool) -> PackedDevice:
    """Scalars of ``device`` as array ``array`` (0: W, 1: P) of analog tensor ``tensor_id``."""
    var_key = philox.variation_key(device.variation_seed, tensor_id, array) if device.d2d_std > 0 else 0
    shift = nominal_symmetric_point(device) if zero_shift and device.d2d_std == 0 else 0.0
    return PackedDevice(
        family=FAMILY_IDS[device.family],
        tau_min=float(device.tau_min),
        tau_max=float(device.tau_max),
        gamma=float(device.gamma_value),
        dw_min=float(device.dw_min),
        asym=float(device.asymmetry),
        d2d_std=float(device.d2d_std),
        c2c_std=float(device.c2c_std),
        var_key=var_key,
        has_gamma=bool(device.has_gamma),
        shift=shift,
        zero_shift=bool(zero_shift),
        table_up=tuple(getattr(device, "up", ())),
        table_down=tuple(getattr(device, "down", ())),
    )


@lru_cache(maxsize=8192)
def pack_config(config: AnalogConfig, tensor_id: int) -> tuple[PackedDevice, PackedDevice | None]:
    """(W's packed device, P's packed device or None) of one analog tensor.

    Cached: configs and devices are frozen, and the result (frozen too) is a pure function of
    them, so an optimizer step does not redo the symmetric point's tensor arithmetic per tensor.
    """
    dev_w = pack_device(config.device, tensor_id, 0, zero_shift=False)
    dev_p = pack_device(config.residual_device, tensor_id, 1, zero_shift=config.zero_shift) if config.has_residual else None
    return dev_w, dev_p


def device_floats(packed: PackedDevice) -> list[float]:
    """The float[] device description of one array, in ``DEVICE_FIELDS`` order (booleans and ids as floats)."""
    return [float(getattr(packed, name)) for name in DEVICE_FIELDS]


# ----- the ops' packed arguments ------------------------------------------------------------------
# The ops fastanalog::{asgd,rl,rl2}_step take, besides their tensor lists and the per-tensor
# keys, offsets and tensor ids, four packed arguments that describe a config:
#
#   step     float[len(STEP_FIELDS)]           the step's scalars (``step_floats``)
#   devices  float[k * len(DEVICE_FIELDS)]     W's device description, then P's (rl, rl2: k = 2)
#   tables   float[]                           W's table samples, then P's (``table_size`` each)
#   seeds    int[k]                            W's variation seed, then P's, as int64
#
# The kernels derive each array's variation key ``philox.variation_key(seed, tensor_id, array)``.
MASK64 = (1 << 64) - 1


def _signed64(v: int) -> int:
    v &= MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass(frozen=True)
class PackedConfig:
    """A config's ``devices``, ``tables`` and ``seeds`` arguments (see above)."""

    devices: tuple[float, ...]
    tables: tuple[float, ...]
    seeds: tuple[int, ...]

    def main_only(self) -> PackedConfig:
        """W's part alone (what asgd takes, e.g. when it runs with an rl/rl2 config)."""
        n = len(DEVICE_FIELDS)
        size = int(self.devices[DEVICE_FIELDS.index("table_size")])
        return PackedConfig(self.devices[:n], self.tables[:size], self.seeds[:1])


@lru_cache(maxsize=1024)
def pack_op_config(config: AnalogConfig) -> PackedConfig:
    """The ``devices``, ``tables`` and ``seeds`` arguments of the ops for ``config`` (cached: configs are frozen)."""
    arrays = [(config.device, False)]
    if config.has_residual:
        arrays.append((config.residual_device, config.zero_shift))
    devices: list[float] = []
    tables: list[float] = []
    seeds: list[int] = []
    for array, (device, zero_shift) in enumerate(arrays):
        packed = pack_device(device, 0, array, zero_shift)
        devices += device_floats(packed)
        tables += [float(v) for v in packed.table_up + packed.table_down]
        seeds.append(_signed64(device.variation_seed))
    return PackedConfig(tuple(devices), tuple(tables), tuple(seeds))


def step_floats(config: AnalogConfig, lr: float, flag: bool) -> list[float]:
    """The ``step`` argument of the ops, in ``STEP_FIELDS`` order (``flag``: rl's transfer, rl2's "ema")."""
    return [float(lr), float(config.gamma), float(config.transfer_lr), float(config.read_noise), float(config.threshold),
            float(config.pulse_cap), float(bool(flag))]  # fmt: skip


def _unpack_device(floats: tuple[float, ...], table: tuple[float, ...], seed: int) -> ResponseDevice:
    from ..devices import DEVICE_FAMILIES

    field = dict(zip(DEVICE_FIELDS, floats))
    family_id = int(field["family"])
    names = {v: k for k, v in FAMILY_IDS.items()}
    if family_id not in names:
        raise ValueError(f"unknown response family id {family_id} in a device description (known: {sorted(names)})")
    cls = DEVICE_FAMILIES[names[family_id]]
    kw = dict(
        tau_min=field["tau_min"], tau_max=field["tau_max"], dw_min=field["dw_min"], asymmetry=field["asym"],
        d2d_std=field["d2d_std"], c2c_std=field["c2c_std"], variation_seed=seed & MASK64,
    )  # fmt: skip
    if cls.family == "table":
        half = len(table) // 2
        kw.update(up=tuple(table[:half]), down=tuple(table[half:]))
    elif field["has_gamma"]:
        kw["gamma"] = field["gamma"]
    return cls(**kw)


@lru_cache(maxsize=1024)
def unpack_op_config(
    algorithm: str, step: tuple[float, ...], devices: tuple[float, ...], tables: tuple[float, ...], seeds: tuple[int, ...]
) -> AnalogConfig:
    """The AnalogConfig that ``pack_op_config`` and ``step_floats`` packed (``transfer_every`` and
    ``mixed_weight``, which the ops do not need, at their defaults): for the launchers that take configs."""
    from ..config import PULSE_LIMIT

    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    spec = ALGORITHMS[algorithm]
    k = 2 if spec.residual else 1
    n = len(DEVICE_FIELDS)
    if len(step) != len(STEP_FIELDS) or len(devices) != k * n or len(seeds) != k:
        raise ValueError(
            f"{algorithm} takes {len(STEP_FIELDS)} step scalars, {k * n} device floats and {k} seeds, "
            f"got {len(step)}, {len(devices)} and {len(seeds)}"
        )
    s = dict(zip(STEP_FIELDS, step))
    sizes = [int(devices[a * n + DEVICE_FIELDS.index("table_size")]) for a in range(k)]
    if sum(sizes) != len(tables):
        raise ValueError(f"the table sizes {sizes} of the device descriptions do not add up to the {len(tables)} table floats")
    arrays = [_unpack_device(devices[a * n : (a + 1) * n], tables[sum(sizes[:a]) : sum(sizes[: a + 1])], seeds[a]) for a in range(k)]
    cap = int(s["max_pulses"])
    kw = dict(algorithm=algorithm, device=arrays[0], gamma=s["gamma"], transfer_lr=s["transfer_lr"], read_noise=s["read_noise"],
              threshold=s["threshold"], max_pulses=None if cap == PULSE_LIMIT else cap)  # fmt: skip
    if k == 2:
        kw.update(residual_device=arrays[1], zero_shift=bool(devices[n + DEVICE_FIELDS.index("zero_shift")]))
    kw.update(spec.flag_config(bool(s["flag"])))
    return AnalogConfig(**kw)
