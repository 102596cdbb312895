"""The update rules of SPEC.md in plain PyTorch: readable, slow, the oracle of every test.

Conventions every backend follows, element for element:

* All math in float32. Scalars (``lr``, ``transfer_lr``, ...) are rounded to float32
  before use. Arrays stored in a narrower dtype are widened, updated, and written
  back with round-to-nearest.
* A write of ``N`` pulses (``D = N * dw_min``) changes the stored value ``x`` by
  ``x + (D + c2c_std * dw_min * sqrt(|N|) * z) * q_s(x + shift)`` where ``q_s`` is
  ``q_up`` for ``N > 0`` and ``q_down`` for ``N < 0`` (this equals
  ``D*F - |D|*G`` plus SPEC's cycle-to-cycle term), then clamps to the device range
  ``[tau_min - shift, tau_max - shift]``. ``shift`` is the device's symmetric point
  for a zero-shifted residual array, else 0.
* Pulse counts: stochastic rounding ``N = floor(n) + (u < n - floor(n))`` with
  ``n = d / dw_min`` computed as a float32 division, then the optional
  ``max_pulses`` cap. Threshold transfers truncate instead.
* Random numbers: one ``randint4x(step_key, i)`` per element per step for the
  global element index ``i`` = ``offset`` + position in the flat tensor. ``r0``
  rounds the first array written (P for rl/rl2, W for asgd), ``r1`` rounds W
  (rl, rl2 "ema"), ``(r2, r3)`` become two normals by Box-Muller: the cosine one
  is the read noise of P, the sine one the c2c noise of the first array. The c2c
  noise of W in rl/rl2 is the cosine normal of ``(r0, r1)`` of a second call
  keyed ``step_key ^ STREAM_W_C2C``.
* Device-to-device parameters come from ``ResponseDevice.element_params`` with
  ``array = 0`` for W and ``1`` for P.

Each ``*_step_ref`` updates its arrays in place (flat, contiguous tensors of equal
numel) and returns the signed pulse counts it applied, as int32 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AnalogConfig
from ..devices import MATH_DTYPE, DeviceParams, ResponseDevice
from . import philox

ARRAY_W = 0
ARRAY_P = 1


@dataclass
class StepPulses:
    """Signed pulses applied in one step, per element (None for an array not written)."""

    first: torch.Tensor  # P for rl/rl2, W for asgd
    main: torch.Tensor | None = None  # W for rl/rl2 (None on a step without transfer)


def f32(x: float) -> torch.Tensor:
    """A Python scalar rounded to float32 (every backend rounds scalars so)."""
    return torch.tensor(float(x), dtype=MATH_DTYPE)


@dataclass
class _Array:
    """One physical array: its device, the per-element parameters and the zero shift."""

    device: ResponseDevice
    params: DeviceParams
    shift: torch.Tensor | float

    @classmethod
    def make(cls, device: ResponseDevice, numel: int, tensor_id: int, array: int, offset: int, where, zero_shift: bool):
        params = device.element_params(numel, tensor_id, array, offset=offset, device=where)
        params = DeviceParams(*(_f32(v, where) for v in (params.tau_min, params.tau_max, params.gamma, params.dw_min, params.asym)))
        shift = device.symmetric_point(params).to(where) if zero_shift else 0.0
        return cls(device, params, shift)


def _f32(v, where):
    if isinstance(v, torch.Tensor):
        return v.to(device=where, dtype=MATH_DTYPE)
    return f32(v).to(where)


def stochastic_round(n: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Unbiased stochastic rounding: ``floor(n) + (u < n - floor(n))`` (float32 result)."""
    fl = torch.floor(n)
    return fl + (u < (n - fl)).to(n.dtype)


def pulse_count(n: torch.Tensor, u: torch.Tensor | None, max_pulses: int | None) -> torch.Tensor:
    """Pulse count for the requested pulses ``n``: stochastic if ``u`` is given, else truncation."""
    count = stochastic_round(n, u) if u is not None else torch.trunc(n)
    if max_pulses is not None:
        count = torch.clamp(count, -float(max_pulses), float(max_pulses))
    return count


def apply_pulses(x: torch.Tensor, count: torch.Tensor, arr: _Array, c2c_z: torch.Tensor | None) -> torch.Tensor:
    """Stored value after ``count`` pulses (SPEC section 2 steps 2-4), float32."""
    p = arr.params
    w = x + arr.shift
    q = torch.where(count > 0, arr.device.q_up(w, p), arr.device.q_down(w, p))
    step = count * p.dw_min
    if arr.device.c2c_std > 0 and c2c_z is not None:
        step = step + f32(arr.device.c2c_std) * p.dw_min * torch.sqrt(torch.abs(count)) * c2c_z
    x_new = x + step * q
    return torch.clamp(x_new, p.tau_min - arr.shift, p.tau_max - arr.shift)


def _draws(key: int, numel: int, offset: int, where):
    idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=where)
    r0, r1, r2, r3 = philox.randint4x(key, idx)
    u0, u1, u2, u3 = (philox.uint_to_uniform(r) for r in (r0, r1, r2, r3))
    n_read, n_c2c_first = philox.pair_uniform_to_normal(u2, u3)
    return idx, u0, u1, n_read, n_c2c_first


def _w_c2c_noise(key: int, idx: torch.Tensor) -> torch.Tensor:
    v0, v1, _, _ = philox.rand4x(key ^ philox.STREAM_W_C2C, idx)
    return philox.pair_uniform_to_normal(v0, v1)[0]


def _store(dst: torch.Tensor, value: torch.Tensor) -> None:
    dst.copy_(value.to(dst.dtype))


def asgd_step_ref(W: torch.Tensor, g: torch.Tensor, *, lr: float, config: AnalogConfig, key: int, tensor_id: int, offset: int = 0) -> StepPulses:
    """Analog SGD: ``W <- pulse_update_W(W, -lr * g)``."""
    where = W.device
    numel = W.numel()
    arr_w = _Array.make(config.device, numel, tensor_id, ARRAY_W, offset, where, zero_shift=False)
    _, u0, _, _, n_c2c = _draws(key, numel, offset, where)
    d = -f32(lr).to(where) * g.to(MATH_DTYPE)
    count = pulse_count(d / arr_w.params.dw_min, u0, config.max_pulses)
    _store(W, apply_pulses(W.to(MATH_DTYPE), count, arr_w, n_c2c))
    return StepPulses(first=count.to(torch.int32))


def _residual_update(P, g, lr, config, tensor_id, offset, where, u0, n_c2c):
    arr_p = _Array.make(config.residual_device, P.numel(), tensor_id, ARRAY_P, offset, where, zero_shift=config.zero_shift)
    d = -f32(lr).to(where) * g.to(MATH_DTYPE)
    count = pulse_count(d / arr_p.params.dw_min, u0, config.max_pulses)
    p_new = apply_pulses(P.to(MATH_DTYPE), count, arr_p, n_c2c)
    _store(P, p_new)
    return P.to(MATH_DTYPE), count


def mixed_weight(W: torch.Tensor, P: torch.Tensor, gamma: float) -> torch.Tensor:
    """The mixed weight ``W + gamma * P`` in float32 math, in the arrays' dtype (what every backend writes)."""
    return (W.to(MATH_DTYPE) + f32(gamma).to(W.device) * P.to(MATH_DTYPE)).to(W.dtype)


def _mixed(Wbar, W, P, config):
    if Wbar is not None:  # None: no mixed weight is written (the layer computes it where forward needs it)
        Wbar.copy_(mixed_weight(W, P, config.gamma))


def rl_step_ref(
    W, P, Wbar, g, *, lr: float, config: AnalogConfig, key: int, tensor_id: int, transfer: bool, offset: int = 0
) -> StepPulses:
    """Residual Learning v1 (Tiki-Taka with mixing); ``transfer`` is this step's transfer flag.

    ``Wbar`` receives the mixed weight ``W + gamma * P``, or is None: then none is written.
    """
    where = W.device
    idx, u0, u1, n_read, n_c2c = _draws(key, W.numel(), offset, where)
    p32, count_p = _residual_update(P, g, lr, config, tensor_id, offset, where, u0, n_c2c)
    count_w = None
    if transfer:
        arr_w = _Array.make(config.device, W.numel(), tensor_id, ARRAY_W, offset, where, zero_shift=False)
        p_hat = p32 + f32(config.read_noise).to(where) * n_read
        d = f32(config.transfer_lr).to(where) * p_hat
        count_w = pulse_count(d / arr_w.params.dw_min, u1, config.max_pulses)
        z_w = _w_c2c_noise(key, idx) if config.device.c2c_std > 0 else None
        _store(W, apply_pulses(W.to(MATH_DTYPE), count_w, arr_w, z_w))
        count_w = count_w.to(torch.int32)
    _mixed(Wbar, W, P, config)
    return StepPulses(first=count_p.to(torch.int32), main=count_w)


def rl2_step_ref(W, P, H, Wbar, g, *, lr: float, config: AnalogConfig, key: int, tensor_id: int, offset: int = 0) -> StepPulses:
    """Residual Learning v2: residual write, noisy read, digital buffer, transfer, mix (``Wbar`` None: no mix)."""
    where = W.device
    idx, u0, u1, n_read, n_c2c = _draws(key, W.numel(), offset, where)
    p32, count_p = _residual_update(P, g, lr, config, tensor_id, offset, where, u0, n_c2c)
    arr_w = _Array.make(config.device, W.numel(), tensor_id, ARRAY_W, offset, where, zero_shift=False)
    p_hat = p32 + f32(config.read_noise).to(where) * n_read
    tlr = f32(config.transfer_lr).to(where)
    h = H.to(MATH_DTYPE)
    dw = arr_w.params.dw_min
    if config.buffer == "accumulate":
        h = h + tlr * p_hat
        count_w = torch.trunc(h / dw)
        count_w = torch.where(torch.abs(h) >= f32(config.threshold).to(where) * dw, count_w, torch.zeros_like(count_w))
        if config.max_pulses is not None:
            count_w = torch.clamp(count_w, -float(config.max_pulses), float(config.max_pulses))
    else:
        h = (1 - tlr) * h + tlr * p_hat
        count_w = pulse_count(tlr * h / dw, u1, config.max_pulses)
    z_w = _w_c2c_noise(key, idx) if config.device.c2c_std > 0 else None
    _store(W, apply_pulses(W.to(MATH_DTYPE), count_w, arr_w, z_w))
    if config.buffer == "accumulate":
        h = h - count_w * dw
    _store(H, h)
    _mixed(Wbar, W, P, config)
    return StepPulses(first=count_p.to(torch.int32), main=count_w.to(torch.int32))
