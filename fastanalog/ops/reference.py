"""The update rules of SPEC.md in plain PyTorch: readable, slow, the oracle of every test.

Conventions every backend follows, element for element:

* All math in float32. Scalars (``lr``, ``transfer_lr``, ...) are rounded to float32
  before use. Arrays stored in a narrower dtype are widened, updated, and written
  back with round-to-nearest.
* A write (SPEC section 2) asks for a net change ``d`` and an excess ``e >= 0``:
  ``n = d / dw_min`` and ``m = e / dw_min`` (float32 divisions) round stochastically,
  ``N = floor(n) + (u0 < n - floor(n))`` and ``M`` likewise with ``u1``; threshold
  transfers truncate ``n`` instead and have ``M = 0``. Then ``N_up = M + max(N, 0)``,
  ``N_down = M + max(-N, 0)``, each capped at ``config.pulse_cap`` (``max_pulses``, else
  ``PULSE_LIMIT`` = 2**24, so that no count overflows, whatever the gradient).
* The stored value ``x`` becomes, with ``w = x + shift`` and ``dw = dw_min``::

      up    = (N_up * dw) * q_up(w)        (0 where N_up = 0)
      down  = (N_down * dw) * q_down(w)    (0 where N_down = 0)
      delta = up - down
      delta = delta + ((c2c_std * dw) * sqrt((N_up * q_up) * q_up + (N_down * q_down) * q_down)) * z
      x_new = clamp(x + delta, tau_min - shift, tau_max - shift)

  (the noise line only where the device has ``c2c_std > 0``; each product rounded to
  float32 in this order). With ``M = 0`` only the response the net pulse selects is
  needed. ``shift`` is the device's symmetric point for a zero-shifted residual
  array, else 0.
* The excess of a per-sample write comes from ``A``, the per-element sum of the
  samples' absolute gradients (SPEC section 2a), given as an array beside ``g``:
  ``e = (lr * max(A - |g|, 0)) * 0.5``. ``A = None`` is ``e = 0`` (batch mode, and the
  fast path: stream 1 is not drawn). Momentum or weight decay change ``g`` but not
  the excess; a caller with both passes ``A' = max(A - |S|, 0) + |g|``.
* Random numbers: the streams of SPEC section 4 (``philox.stream_key``), one
  Philox call per four consecutive global elements ``i = offset + position``:
  stream 0 rounds the net pulses of the first array written (P for rl/rl2, W for
  asgd), 1 its pairs, 2 the W transfer (rl, rl2 "ema"); 3, 4, 5 are normals: c2c of
  the first array, read noise of P, c2c of W. A stream a step does not need is not drawn.
* Device-to-device parameters come from ``ResponseDevice.element_params`` with
  ``array = 0`` for W and ``1`` for P.

Each ``*_step_ref`` updates its arrays in place (flat, contiguous tensors of equal
numel) and returns the pulses it applied (:class:`StepPulses`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..devices import MATH_DTYPE, DeviceParams, ResponseDevice
from . import philox

if TYPE_CHECKING:  # the config module reads ALGORITHMS below, so it is not imported at run time
    from ..config import AnalogConfig

ARRAY_W = 0
ARRAY_P = 1


@dataclass
class StepPulses:
    """Pulses applied in one step, per element as int32 (None for an array not written).

    ``first`` and ``main`` are the signed net counts ``N_up - N_down``; ``first_pairs``
    the opposite-pulse pairs ``min(N_up, N_down)`` of the first array's write (None
    without an excess: no pairs). The pulses an element received are
    ``|net| + 2 * pairs``. A kernel asked for totals reports instead, per array, that
    sum over the array as a 0-d int64 tensor (``first`` then already includes the pairs
    and ``first_pairs`` is None).
    """

    first: torch.Tensor  # P for rl/rl2, W for asgd
    main: torch.Tensor | None = None  # W for rl/rl2 (None on a step without transfer)
    first_pairs: torch.Tensor | None = None

    def first_total(self) -> torch.Tensor:
        """Pulses written to the first array, summed (0-d int64)."""
        return pulse_total(self.first, self.first_pairs)

    def main_total(self) -> torch.Tensor | None:
        """Pulses written to W by the transfer of rl/rl2, summed (0-d int64), or None."""
        return None if self.main is None else pulse_total(self.main, None)


def pulse_total(net: torch.Tensor, pairs: torch.Tensor | None) -> torch.Tensor:
    """``sum(|net| + 2 * pairs)`` as a 0-d int64 tensor; a 0-d int64 ``net`` is a total already."""
    if net.dim() == 0 and net.dtype == torch.int64:
        return net
    total = net.to(torch.int64).abs().sum()
    if pairs is not None:
        total = total + 2 * pairs.to(torch.int64).sum()
    return total


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
    """Net pulse count for the requested pulses ``n``: stochastic if ``u`` is given, else truncation; capped."""
    count = stochastic_round(n, u) if u is not None else torch.trunc(n)
    if max_pulses is not None:
        count = torch.clamp(count, -float(max_pulses), float(max_pulses))
    return count


def directional_counts(
    n: torch.Tensor, u0: torch.Tensor | None, m: torch.Tensor | None, u1: torch.Tensor | None, max_pulses: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N_up, N_down)`` of a write of ``n`` net and ``m`` paired pulses (SPEC section 2, step 1), float32.

    ``u0`` None: the net count truncates (threshold transfer). ``m`` None: no pairs.
    """
    net = stochastic_round(n, u0) if u0 is not None else torch.trunc(n)
    up = torch.clamp(net, min=0.0)
    down = torch.clamp(-net, min=0.0)
    if m is not None:
        pairs = stochastic_round(m, u1)
        up = pairs + up
        down = pairs + down
    if max_pulses is not None:
        up = torch.clamp(up, max=float(max_pulses))
        down = torch.clamp(down, max=float(max_pulses))
    return up, down


def apply_pulses(x: torch.Tensor, n_up: torch.Tensor, n_down: torch.Tensor, arr: _Array, c2c_z: torch.Tensor | None) -> torch.Tensor:
    """Stored value after ``n_up`` up and ``n_down`` down pulses (SPEC section 2 steps 2-4), float32."""
    p = arr.params
    w = x + arr.shift
    zero = torch.zeros((), dtype=MATH_DTYPE, device=x.device)
    q_up = arr.device.q_up(w, p)
    q_down = arr.device.q_down(w, p)
    has_up = n_up > 0
    has_down = n_down > 0
    delta = torch.where(has_up, (n_up * p.dw_min) * q_up, zero) - torch.where(has_down, (n_down * p.dw_min) * q_down, zero)
    if arr.device.c2c_std > 0 and c2c_z is not None:
        var = torch.where(has_up, (n_up * q_up) * q_up, zero) + torch.where(has_down, (n_down * q_down) * q_down, zero)
        delta = delta + ((f32(arr.device.c2c_std).to(x.device) * p.dw_min) * torch.sqrt(var)) * c2c_z
    x_new = x + delta
    return torch.clamp(x_new, p.tau_min - arr.shift, p.tau_max - arr.shift)


def excess(A: torch.Tensor, g: torch.Tensor, lr: float) -> torch.Tensor:
    """The excess ``e = (lr * max(A - |g|, 0)) * 0.5`` of a per-sample write (SPEC section 2a), float32.

    ``max`` ignores a NaN as IEEE ``fmax`` does (the kernels' max): where A and g both
    overflow float32 (``inf - inf``) there is no excess, and the capped net count stands.
    """
    a32 = A.to(MATH_DTYPE)
    g32 = g.to(MATH_DTYPE)
    zero = torch.zeros((), dtype=MATH_DTYPE, device=g.device)
    return (f32(lr).to(g.device) * torch.fmax(a32 - torch.abs(g32), zero)) * 0.5


def _uniform(key: int, stream: int, numel: int, offset: int, where) -> torch.Tensor:
    return philox.stream_uniform(philox.stream_key(key, stream), offset, numel, where)


def _normal(key: int, stream: int, numel: int, offset: int, where) -> torch.Tensor:
    return philox.stream_normal(philox.stream_key(key, stream), offset, numel, where)


def _first_write(x: torch.Tensor, g, A, lr, arr: _Array, config: AnalogConfig, key: int, offset: int):
    """The gradient-driven write of the first array (W for asgd, P for rl/rl2): new value, net counts, pairs."""
    where = x.device
    numel = x.numel()
    d = -f32(lr).to(where) * g.to(MATH_DTYPE)
    u0 = _uniform(key, philox.STREAM_ROUND_FIRST, numel, offset, where)
    m = u1 = None
    if A is not None:
        if A.shape != g.shape:
            raise ValueError(f"A (the per-sample |g| sums) must have g's shape {tuple(g.shape)}, got {tuple(A.shape)}")
        m = excess(A, g, lr) / arr.params.dw_min
        u1 = _uniform(key, philox.STREAM_PAIRS_FIRST, numel, offset, where)
    n_up, n_down = directional_counts(d / arr.params.dw_min, u0, m, u1, config.pulse_cap)
    z = _normal(key, philox.STREAM_C2C_FIRST, numel, offset, where) if arr.device.c2c_std > 0 else None
    new = apply_pulses(x.to(MATH_DTYPE), n_up, n_down, arr, z)
    pairs = torch.minimum(n_up, n_down).to(torch.int32) if A is not None else None
    return new, (n_up - n_down).to(torch.int32), pairs


def _store(dst: torch.Tensor, value: torch.Tensor) -> None:
    dst.copy_(value.to(dst.dtype))


def asgd_step_ref(
    W: torch.Tensor,
    g: torch.Tensor,
    *,
    lr: float,
    config: AnalogConfig,
    key: int,
    tensor_id: int,
    offset: int = 0,
    A: torch.Tensor | None = None,
) -> StepPulses:
    """Analog SGD: ``W <- pulse_update_W(W, -lr * g, e)``; ``A`` the per-sample |g| sums (None: ``e = 0``)."""
    arr_w = _Array.make(config.device, W.numel(), tensor_id, ARRAY_W, offset, W.device, zero_shift=False)
    new, net, pairs = _first_write(W, g, A, lr, arr_w, config, key, offset)
    _store(W, new)
    return StepPulses(first=net, first_pairs=pairs)


def _residual_update(P, g, A, lr, config, key, tensor_id, offset):
    arr_p = _Array.make(config.residual_device, P.numel(), tensor_id, ARRAY_P, offset, P.device, zero_shift=config.zero_shift)
    new, net, pairs = _first_write(P, g, A, lr, arr_p, config, key, offset)
    _store(P, new)
    return P.to(MATH_DTYPE), net, pairs


def _read_p(p32: torch.Tensor, config: AnalogConfig, key: int, offset: int) -> torch.Tensor:
    """The noisy read ``P + read_noise * z`` (stream 4), float32."""
    if config.read_noise == 0:
        return p32
    z = _normal(key, philox.STREAM_READ_P, p32.numel(), offset, p32.device)
    return p32 + f32(config.read_noise).to(p32.device) * z


def _write_w(W, n_up, n_down, arr_w, config, key, offset) -> None:
    """The transfer's write of W (no pairs), c2c noise from stream 5."""
    z = _normal(key, philox.STREAM_C2C_W, W.numel(), offset, W.device) if config.device.c2c_std > 0 else None
    _store(W, apply_pulses(W.to(MATH_DTYPE), n_up, n_down, arr_w, z))


def mixed_weight(W: torch.Tensor, P: torch.Tensor, gamma: float) -> torch.Tensor:
    """The mixed weight ``W + gamma * P`` in float32 math, in the arrays' dtype (what every backend writes)."""
    return (W.to(MATH_DTYPE) + f32(gamma).to(W.device) * P.to(MATH_DTYPE)).to(W.dtype)


def _mixed(Wbar, W, P, config):
    if Wbar is not None:  # None: no mixed weight is written (the layer computes it where forward needs it)
        Wbar.copy_(mixed_weight(W, P, config.gamma))


def rl_step_ref(
    W,
    P,
    Wbar,
    g,
    *,
    lr: float,
    config: AnalogConfig,
    key: int,
    tensor_id: int,
    transfer: bool,
    offset: int = 0,
    A: torch.Tensor | None = None,
) -> StepPulses:
    """Residual Learning v1 (Tiki-Taka with mixing); ``transfer`` is this step's transfer flag.

    ``Wbar`` receives the mixed weight ``W + gamma * P``, or is None: then none is written.
    ``A``: the per-sample |g| sums of P's write (None: ``e = 0``).
    """
    where = W.device
    p32, net_p, pairs = _residual_update(P, g, A, lr, config, key, tensor_id, offset)
    net_w = None
    if transfer:
        arr_w = _Array.make(config.device, W.numel(), tensor_id, ARRAY_W, offset, where, zero_shift=False)
        d = f32(config.transfer_lr).to(where) * _read_p(p32, config, key, offset)
        u = _uniform(key, philox.STREAM_ROUND_W, W.numel(), offset, where)
        n_up, n_down = directional_counts(d / arr_w.params.dw_min, u, None, None, config.pulse_cap)
        _write_w(W, n_up, n_down, arr_w, config, key, offset)
        net_w = (n_up - n_down).to(torch.int32)
    _mixed(Wbar, W, P, config)
    return StepPulses(first=net_p, main=net_w, first_pairs=pairs)


def rl2_step_ref(
    W,
    P,
    H,
    Wbar,
    g,
    *,
    lr: float,
    config: AnalogConfig,
    key: int,
    tensor_id: int,
    offset: int = 0,
    A: torch.Tensor | None = None,
) -> StepPulses:
    """Residual Learning v2: residual write, noisy read, digital buffer, transfer, mix (``Wbar`` None: no mix)."""
    where = W.device
    p32, net_p, pairs = _residual_update(P, g, A, lr, config, key, tensor_id, offset)
    arr_w = _Array.make(config.device, W.numel(), tensor_id, ARRAY_W, offset, where, zero_shift=False)
    p_hat = _read_p(p32, config, key, offset)
    tlr = f32(config.transfer_lr).to(where)
    h = H.to(MATH_DTYPE)
    dw = arr_w.params.dw_min
    if config.buffer == "accumulate":
        h = h + tlr * p_hat
        n = torch.where(torch.abs(h) >= f32(config.threshold).to(where) * dw, h / dw, torch.zeros_like(h))
        n_up, n_down = directional_counts(n, None, None, None, config.pulse_cap)
    else:
        h = (1 - tlr) * h + tlr * p_hat
        u = _uniform(key, philox.STREAM_ROUND_W, W.numel(), offset, where)
        n_up, n_down = directional_counts(tlr * h / dw, u, None, None, config.pulse_cap)
    _write_w(W, n_up, n_down, arr_w, config, key, offset)
    net_w = n_up - n_down
    if config.buffer == "accumulate":
        h = h - net_w * dw
    _store(H, h)
    _mixed(Wbar, W, P, config)
    return StepPulses(first=net_p, main=net_w.to(torch.int32), first_pairs=pairs)


# ----- the algorithms -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Algorithm:
    """One analog training algorithm, as every part of the package knows it: the config's
    ``algorithm``, the layers' arrays, the optimizer, the ops and their dispatch all read it
    from ``ALGORITHMS`` below. Adding an algorithm is its entry and rule here, its id in
    csrc/op_layout.h and its kernel in each compiled backend (csrc/analog_update.cpp,
    csrc/cuda/analog_update.cu, fastanalog/ops/triton/step.py); until a backend has its kernel,
    leave that backend out of ``backends`` and the reference serves the algorithm there.

    Attributes:
        name: the config's ``algorithm``.
        id: its id in the compiled kernels' ``Algorithm`` enum (csrc/op_layout.h).
        arrays: the arrays it keeps, in SPEC's names and the order of its op and ``rule``:
            ``W`` first, then ``P`` (residual) and ``H`` (digital buffer) where it has them.
            With ``P`` it also writes the mixed weight ``Wbar = W + gamma * P`` on request,
            and the gradient's write goes to ``P`` (else to ``W``).
        rule: the reference step, ``rule(*arrays, [Wbar,] g, *, lr, config, key, tensor_id,
            offset, A, [flag_arg=flag])`` returning ``StepPulses``.
        step_flag: the ``flag`` step scalar of optimizer step ``k`` (counted from 1) under a config;
            for an algorithm whose rule takes no flag it depends on the config alone.
        writes_w: whether a step with that flag writes W by a transfer (residual algorithms).
        flag_arg: the keyword under which ``rule`` takes the flag (None: it does not).
        flag_config: the config fields the flag stands for (``packing.unpack_op_config``).
        backends: the implementations that have its kernel (the others fall back to the reference).
    """

    name: str
    id: int
    arrays: tuple[str, ...]
    rule: Callable[..., StepPulses]
    step_flag: Callable[[AnalogConfig, int], bool] = lambda config, k: False
    writes_w: Callable[[bool], bool] = lambda flag: False
    flag_arg: str | None = None
    flag_config: Callable[[bool], dict] = lambda flag: {}
    backends: tuple[str, ...] = ("reference", "cpp", "cuda", "triton")

    def __post_init__(self) -> None:
        if self.arrays not in (("W",), ("W", "P"), ("W", "P", "H")):
            raise ValueError(f"algorithm {self.name!r}: arrays must be ('W',), ('W', 'P') or ('W', 'P', 'H'), got {self.arrays!r}")
        if isinstance(self.id, bool) or not isinstance(self.id, int) or self.id < 0:
            raise ValueError(f"algorithm {self.name!r}: id must be an int >= 0 (its csrc/op_layout.h id), got {self.id!r}")
        unknown = [b for b in self.backends if b not in ("reference", "cpp", "cuda", "triton")]
        if "reference" not in self.backends or unknown:
            raise ValueError(f"algorithm {self.name!r}: backends must include 'reference' and name only reference, cpp, cuda, triton")

    @property
    def residual(self) -> bool:
        """Whether it keeps a residual array P (and so a mixed weight; the gradient writes P)."""
        return "P" in self.arrays

    @property
    def op_arrays(self) -> tuple[str, ...]:
        """The arrays its op takes, in order: ``arrays``, then the mixed weight ``Wbar`` with a residual."""
        return self.arrays + (("Wbar",) if self.residual else ())

    @property
    def buffered(self) -> bool:
        """Whether it keeps a digital buffer H."""
        return "H" in self.arrays

    def step(self, arrays, Wbar, g, *, flag: bool = False, **kwargs) -> StepPulses:
        """``rule`` on one tensor's flat arrays (``arrays``: SPEC name -> tensor; ``Wbar`` None: no mix)."""
        tensors = [arrays[n] for n in self.arrays] + ([Wbar] if self.residual else [])
        if self.flag_arg is not None:
            kwargs[self.flag_arg] = bool(flag)
        return self.rule(*tensors, g, **kwargs)


# Names and ids are unique (tests/test_algorithms.py).
ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("asgd", 0, ("W",), asgd_step_ref),
        Algorithm(
            "rl", 1, ("W", "P"), rl_step_ref,
            step_flag=lambda config, k: k % config.transfer_every == 0,  # the transfer steps
            writes_w=lambda flag: flag,
            flag_arg="transfer",
        ),
        Algorithm(
            "rl2", 2, ("W", "P", "H"), rl2_step_ref,
            step_flag=lambda config, k: config.buffer == "ema",
            writes_w=lambda flag: True,
            flag_config=lambda flag: {"buffer": "ema" if flag else "accumulate"},
        ),
    )
}  # fmt: skip


def algorithm(name: str) -> Algorithm:
    """The declaration of analog algorithm ``name`` (ValueError naming the known ones otherwise)."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown analog algorithm {name!r}: choose one of {', '.join(ALGORITHMS)}") from None
