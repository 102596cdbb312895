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
from ..devices import MATH_DTYPE, DeviceParams, ResponseDevice
from . import philox

# The one layout the compiled kernels share with Python (tests/test_layout.py checks it
# against csrc/op_layout.h): family and algorithm ids, and the order of the float[]
# device description (the ``DeviceField`` enum there, ``kTauMin`` <-> ``tau_min``).
FAMILY_IDS = {"linear": 0, "power": 1, "exp": 2, "table": 3}
ALGORITHM_IDS = {"asgd": 0, "rl": 1, "rl2": 2}
DEVICE_FIELDS = ("family", "tau_min", "tau_max", "gamma", "dw_min", "asym", "d2d_std", "c2c_std", "has_gamma", "zero_shift", "shift")


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
