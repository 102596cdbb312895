"""Resistive devices: response functions, Definition-1 checks, F/G, symmetric point, variation.

A device is a frozen dataclass. Its response of one up pulse ``q_up(w)`` and one down
pulse ``q_down(w)`` follow SPEC section 1, written with the normalised distances to the
bounds (``c = (tau_max + tau_min) / 2``)::

    u_up(w)   = (tau_max - w) / (tau_max - c)        in [0, 2] on the range
    u_down(w) = (w - tau_min) / (c - tau_min)

and scaled by the up/down asymmetry ``a``: ``q_up *= 1 + a``, ``q_down *= 1 - a``.
``F = (q_down + q_up) / 2`` and ``G = (q_down - q_up) / 2``.

Device-to-device variation (``d2d_std``) gives every element its own ``tau_min``,
``tau_max``, ``gamma``, ``dw_min`` and ``a``, each ``mean * factor`` with
``factor = max(1 + d2d_std * clamp(z, -3, 3), 0.05)``: the factor stays positive, so
every element keeps the signs Definition 1 needs (``tau_min < 0 < tau_max``,
``gamma > 0`` for power curves, ``dw_min > 0``); the asymmetry is further clipped to
``[-0.99, 0.99]``. ``z`` comes from Philox keyed by ``variation_key(variation_seed,
tensor_id, array)`` with the global element index as counter: call one gives the
normals for ``(tau_min, tau_max, gamma, dw_min)``, a second call with the key XOR
``1`` gives the normal for ``a`` (its first). The parameters are thus a pure function
of seed and index, and a kernel may regenerate them instead of storing them.
Cycle-to-cycle noise ``c2c_std`` is a property of the device that the update applies
(SPEC section 2, step 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .ops import philox

# Dtype of all device math (SPEC: math in float32 whatever the storage dtype).
MATH_DTYPE = torch.float32


@dataclass(frozen=True)
class DeviceParams:
    """Per-element (tensor) or shared (float) parameters of one array's devices."""

    tau_min: torch.Tensor | float
    tau_max: torch.Tensor | float
    gamma: torch.Tensor | float
    dw_min: torch.Tensor | float
    asym: torch.Tensor | float


def _check_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class ResponseDevice:
    """Base of every response family. Use a subclass: Linear/Power/Exp/TableResponse.

    Parameters (weight units unless stated):
        tau: symmetric range ``[-tau, tau]``; or give ``tau_min`` and ``tau_max``.
        dw_min: weight change of one pulse at unit response (> 0).
        asymmetry: up/down asymmetry ``a``, ``|a| < 1``.
        d2d_std: relative device-to-device spread of every parameter (>= 0).
        c2c_std: relative cycle-to-cycle spread of each pulse (>= 0).
        variation_seed: seed of the device-to-device draw.
    """

    tau: float | None = None
    tau_min: float | None = None
    tau_max: float | None = None
    dw_min: float = 0.001
    asymmetry: float = 0.0
    d2d_std: float = 0.0
    c2c_std: float = 0.0
    variation_seed: int = 0

    family: ClassVar[str] = "base"
    family_id: ClassVar[int] = -1
    # Whether the response is data (a table) rather than a formula of the range, pulse size and
    # shape parameter: such a family is built in Python only, not from command-line options.
    tabulated: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if type(self) is ResponseDevice:
            raise TypeError("ResponseDevice is abstract: use LinearResponse, PowerResponse, ExpResponse or TableResponse")
        if self.tau is not None:
            _check_finite("tau", self.tau)
            if self.tau <= 0:
                raise ValueError(f"tau must be > 0 (the range is [-tau, tau]), got {self.tau}")
            if self.tau_min is not None or self.tau_max is not None:
                raise ValueError("give either tau or tau_min/tau_max, not both")
            object.__setattr__(self, "tau_min", -float(self.tau))
            object.__setattr__(self, "tau_max", float(self.tau))
        else:
            if self.tau_min is None and self.tau_max is None:
                object.__setattr__(self, "tau_min", -1.0)
                object.__setattr__(self, "tau_max", 1.0)
            elif self.tau_min is None or self.tau_max is None:
                raise ValueError("give both tau_min and tau_max (or tau for a symmetric range)")
        _check_finite("tau_min", self.tau_min)
        _check_finite("tau_max", self.tau_max)
        if self.tau_min >= self.tau_max:
            raise ValueError(f"tau_min must be < tau_max, got tau_min={self.tau_min}, tau_max={self.tau_max}")
        if self.tau_max <= 0:
            raise ValueError(f"tau_max must be > 0 (the range must contain 0), got {self.tau_max}")
        if self.tau_min >= 0:
            raise ValueError(f"tau_min must be < 0 (the range must contain 0), got {self.tau_min}")
        _check_finite("dw_min", self.dw_min)
        if self.dw_min <= 0:
            raise ValueError(f"dw_min must be > 0 (weight change of one pulse), got {self.dw_min}")
        if self.dw_min > (self.tau_max - self.tau_min):
            raise ValueError(
                f"dw_min={self.dw_min} is larger than the whole range {self.tau_max - self.tau_min}: use a smaller dw_min"
            )
        _check_finite("asymmetry", self.asymmetry)
        if not -1.0 < self.asymmetry < 1.0:
            raise ValueError(f"asymmetry must be in (-1, 1), got {self.asymmetry}")
        _check_finite("d2d_std", self.d2d_std)
        if self.d2d_std < 0:
            raise ValueError(f"d2d_std must be >= 0, got {self.d2d_std}")
        _check_finite("c2c_std", self.c2c_std)
        if self.c2c_std < 0:
            raise ValueError(f"c2c_std must be >= 0, got {self.c2c_std}")
        if not isinstance(self.variation_seed, int) or self.variation_seed < 0:
            raise ValueError(f"variation_seed must be a non-negative int, got {self.variation_seed!r}")
        self._check_family()
        self.check_definition1()

    # ----- family hooks -------------------------------------------------------------
    @property
    def gamma_value(self) -> float:
        """The family's shape parameter (1.0 where the family has none)."""
        return 1.0

    def _check_family(self) -> None:
        pass

    def _shape(self, u: torch.Tensor, gamma) -> torch.Tensor:
        """Response at normalised distance ``u`` in [0, 2] (before asymmetry)."""
        raise NotImplementedError  # abstract: every family overrides it

    # ----- responses ----------------------------------------------------------------
    def params(self) -> DeviceParams:
        """The nominal (variation-free) parameters as floats."""
        return DeviceParams(self.tau_min, self.tau_max, self.gamma_value, self.dw_min, self.asymmetry)

    def _u(self, w: torch.Tensor, p: DeviceParams) -> tuple[torch.Tensor, torch.Tensor]:
        half = (p.tau_max - p.tau_min) / 2
        u_up = torch.clamp((p.tau_max - w) / half, 0.0, 2.0)
        u_down = torch.clamp((w - p.tau_min) / half, 0.0, 2.0)
        return u_up, u_down

    def q_up(self, w: torch.Tensor, params: DeviceParams | None = None) -> torch.Tensor:
        """Response of one up pulse at (physical) weight ``w``."""
        p = params or self.params()
        u_up, _ = self._u(w, p)
        return self._shape(u_up, p.gamma) * (1 + p.asym)

    def q_down(self, w: torch.Tensor, params: DeviceParams | None = None) -> torch.Tensor:
        """Response of one down pulse at (physical) weight ``w``."""
        p = params or self.params()
        _, u_down = self._u(w, p)
        return self._shape(u_down, p.gamma) * (1 - p.asym)

    def F(self, w: torch.Tensor, params: DeviceParams | None = None) -> torch.Tensor:
        """Symmetric component ``(q_down + q_up) / 2``."""
        return (self.q_down(w, params) + self.q_up(w, params)) / 2

    def G(self, w: torch.Tensor, params: DeviceParams | None = None) -> torch.Tensor:
        """Asymmetric component ``(q_down - q_up) / 2``."""
        return (self.q_down(w, params) - self.q_up(w, params)) / 2

    def symmetric_point(self, params: DeviceParams | None = None, like: torch.Tensor | None = None) -> torch.Tensor:
        """The weight where ``q_up = q_down`` (G = 0), per element for per-element params.

        Bisection on ``G`` (which rises from < 0 at tau_min to > 0 at tau_max),
        60 halvings in float64; families with a closed form override it.
        """
        p = params or self.params()
        lo = torch.as_tensor(p.tau_min, dtype=torch.float64)
        hi = torch.as_tensor(p.tau_max, dtype=torch.float64)
        lo, hi = torch.broadcast_tensors(lo, hi)
        if like is not None:
            lo = lo.expand(like.shape) if lo.dim() == 0 else lo
            hi = hi.expand(like.shape) if hi.dim() == 0 else hi
        lo, hi = lo.clone(), hi.clone()
        p64 = _to64(p)
        for _ in range(60):
            mid = (lo + hi) / 2
            g = self.G(mid, p64)
            lo = torch.where(g > 0, lo, mid)
            hi = torch.where(g > 0, mid, hi)
        return ((lo + hi) / 2).to(MATH_DTYPE)

    def check_definition1(self) -> None:
        """Definition 1 of the paper on a fine grid of the nominal range, else ValueError."""
        p = _to64(self.params())
        w = torch.linspace(p.tau_min, p.tau_max, 4097, dtype=torch.float64)
        up = self.q_up(w, p)
        down = self.q_down(w, p)
        bad_up = ~(up[:-1] > 0)
        bad_down = ~(down[1:] > 0)
        name = type(self).__name__
        if bool(bad_up.any()):
            at = float(w[:-1][bad_up][0])
            raise ValueError(f"{name} breaks Definition 1: q_up must be > 0 on [tau_min, tau_max), got {float(up[:-1][bad_up][0])} at w={at}")
        if bool(bad_down.any()):
            at = float(w[1:][bad_down][0])
            raise ValueError(f"{name} breaks Definition 1: q_down must be > 0 on (tau_min, tau_max], got {float(down[1:][bad_down][0])} at w={at}")
        if abs(float(up[-1])) > 1e-12 or abs(float(down[0])) > 1e-12:
            raise ValueError(
                f"{name} breaks Definition 1: q_up(tau_max) and q_down(tau_min) must be 0, got {float(up[-1])} and {float(down[0])}"
            )

    # ----- device-to-device variation ------------------------------------------------
    def element_params(self, numel: int, tensor_id: int, array: int, offset: int = 0, device=None) -> DeviceParams:
        """Parameters of elements ``offset .. offset+numel-1`` of one array of one tensor.

        Without variation these are the nominal floats; with ``d2d_std > 0`` float32
        tensors drawn as described in the module docstring.
        """
        if self.d2d_std == 0:
            return self.params()
        key = philox.variation_key(self.variation_seed, tensor_id, array)
        idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
        z0, z1, z2, z3 = philox.randn4x(key, idx)
        za = philox.randn4x(key ^ 1, idx)[0]

        def vary(mean: float, z: torch.Tensor) -> torch.Tensor:
            factor = torch.clamp(1 + self.d2d_std * torch.clamp(z, -3.0, 3.0), min=0.05)
            return float(mean) * factor

        gamma = vary(self.gamma_value, z2) if self.has_gamma else torch.full_like(z2, self.gamma_value)
        asym = torch.clamp(vary(self.asymmetry, za), -0.99, 0.99)
        return DeviceParams(vary(self.tau_min, z0), vary(self.tau_max, z1), gamma, vary(self.dw_min, z3), asym)

    has_gamma: ClassVar[bool] = False


def _to64(p: DeviceParams) -> DeviceParams:
    def c(x):
        return x.to(torch.float64) if isinstance(x, torch.Tensor) else float(x)

    return DeviceParams(c(p.tau_min), c(p.tau_max), c(p.gamma), c(p.dw_min), c(p.asym))


@dataclass(frozen=True)
class LinearResponse(ResponseDevice):
    """Linear ("soft bounds") response: ``q_up = u_up``, ``q_down = u_down``."""

    family: ClassVar[str] = "linear"
    family_id: ClassVar[int] = 0

    def _shape(self, u, gamma):
        return u

    def symmetric_point(self, params=None, like=None):
        # (1 + a) (tau_max - w) = (1 - a) (w - tau_min)
        p = params or self.params()
        w = ((1 + p.asym) * p.tau_max + (1 - p.asym) * p.tau_min) / 2
        return _as_math(w, like)


@dataclass(frozen=True)
class PowerResponse(ResponseDevice):
    """Power response: ``q_up = u_up ** gamma``, ``q_down = u_down ** gamma``, gamma > 0."""

    gamma: float = 0.5
    family: ClassVar[str] = "power"
    family_id: ClassVar[int] = 1
    has_gamma: ClassVar[bool] = True

    @property
    def gamma_value(self) -> float:
        return float(self.gamma)

    def _check_family(self):
        _check_finite("gamma", self.gamma)
        if not 0 < self.gamma <= 20:
            raise ValueError(f"PowerResponse gamma must be in (0, 20], got {self.gamma}")

    def _shape(self, u, gamma):
        # One exponent of 0.5 for the whole array (no device-to-device variation: gamma is a
        # number or a 0-dim tensor) is the square root, correctly rounded (IEEE sqrt), as every
        # backend computes it. torch.sqrt of float32 on CPU is not always correctly rounded
        # (MKL), so it is taken in float64 and rounded once: sqrt of a float32 is never close
        # enough to a float32 midpoint for float64's error to move the rounding.
        if self.gamma_value == 0.5 and (not isinstance(gamma, torch.Tensor) or gamma.dim() == 0):
            if u.dtype == torch.float32:
                return torch.sqrt(u.to(torch.float64)).to(torch.float32)
            return torch.sqrt(u)
        return torch.pow(u, gamma)

    def symmetric_point(self, params=None, like=None):
        # (1+a) u_up^g = (1-a) u_down^g and u_up + u_down = 2
        p = params or self.params()
        if isinstance(p.asym, float) and p.asym == 0.0:
            return _as_math((p.tau_max + p.tau_min) / 2, like)
        ratio = ((1 - torch.as_tensor(p.asym, dtype=torch.float64)) / (1 + torch.as_tensor(p.asym, dtype=torch.float64))) ** (
            1 / torch.as_tensor(p.gamma, dtype=torch.float64)
        )
        u_down = 2 / (1 + ratio)
        tmin = torch.as_tensor(p.tau_min, dtype=torch.float64)
        tmax = torch.as_tensor(p.tau_max, dtype=torch.float64)
        return _as_math(tmin + (tmax - tmin) / 2 * u_down, like)


@dataclass(frozen=True)
class ExpResponse(ResponseDevice):
    """Exponential response: ``(exp(gamma * u) - 1) / (exp(gamma) - 1)``, gamma != 0."""

    gamma: float = 1.0
    family: ClassVar[str] = "exp"
    family_id: ClassVar[int] = 2
    has_gamma: ClassVar[bool] = True

    @property
    def gamma_value(self) -> float:
        return float(self.gamma)

    def _check_family(self):
        _check_finite("gamma", self.gamma)
        if self.gamma == 0 or abs(self.gamma) > 20:
            raise ValueError(f"ExpResponse gamma must be non-zero with |gamma| <= 20 (use LinearResponse for 0), got {self.gamma}")

    def _shape(self, u, gamma):
        denom = torch.expm1(gamma) if isinstance(gamma, torch.Tensor) else math.expm1(gamma)
        return torch.expm1(gamma * u) / denom

    def symmetric_point(self, params=None, like=None):
        # (1+a)(e^{g u_up} - 1) = (1-a)(e^{g u_down} - 1) with u_up = 2 - u_down; for
        # x = e^{g u_down}: (1-a) x^2 + 2a x - (1+a) e^{2g} = 0, the positive root.
        p = _to64(params or self.params())
        a = torch.as_tensor(p.asym, dtype=torch.float64)
        g = torch.as_tensor(p.gamma, dtype=torch.float64)
        x = (-a + torch.sqrt(a * a + (1 - a * a) * torch.exp(2 * g))) / (1 - a)
        u_down = torch.log(x) / g
        tmin = torch.as_tensor(p.tau_min, dtype=torch.float64)
        tmax = torch.as_tensor(p.tau_max, dtype=torch.float64)
        return _as_math(tmin + (tmax - tmin) / 2 * u_down, like)


@dataclass(frozen=True)
class TableResponse(ResponseDevice):
    """Tabulated response: ``up`` and ``down`` sampled on a uniform grid over the range.

    ``up[i]`` and ``down[i]`` are the responses at
    ``w_i = tau_min + i * (tau_max - tau_min) / (len - 1)``; between samples the
    response is piecewise linear in w. Under device-to-device variation the grid
    stretches with each element's own ``tau_min``/``tau_max``.
    """

    up: tuple[float, ...] = field(default=())
    down: tuple[float, ...] = field(default=())
    family: ClassVar[str] = "table"
    family_id: ClassVar[int] = 3
    tabulated: ClassVar[bool] = True

    def _check_family(self):
        up = tuple(float(x) for x in self.up)
        down = tuple(float(x) for x in self.down)
        object.__setattr__(self, "up", up)
        object.__setattr__(self, "down", down)
        if len(up) < 2 or len(down) != len(up):
            raise ValueError(f"TableResponse needs up and down of the same length >= 2, got {len(up)} and {len(down)}")
        for name, vals in (("up", up), ("down", down)):
            if not all(math.isfinite(v) for v in vals):
                raise ValueError(f"TableResponse {name} samples must be finite, got {vals}")

    def _table(self, which: str, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.up if which == "up" else self.down, dtype=like.dtype, device=like.device)

    def _interp(self, which: str, w: torch.Tensor, p: DeviceParams) -> torch.Tensor:
        table = self._table(which, w)
        n = table.numel() - 1
        x = torch.clamp((w - p.tau_min) / (p.tau_max - p.tau_min), 0.0, 1.0) * n
        i = torch.clamp(torch.floor(x), max=n - 1).to(torch.int64)
        frac = x - i.to(x.dtype)
        return table[i] + (table[i + 1] - table[i]) * frac

    def q_up(self, w, params=None):
        p = params or self.params()
        return self._interp("up", w, p) * (1 + p.asym)

    def q_down(self, w, params=None):
        p = params or self.params()
        return self._interp("down", w, p) * (1 - p.asym)


def _as_math(w, like: torch.Tensor | None) -> torch.Tensor:
    w = torch.as_tensor(w, dtype=MATH_DTYPE)
    if like is not None:
        w = w.to(like.device)
        if w.dim() == 0:
            w = w.expand(like.shape)
    return w


DEVICE_FAMILIES = {"linear": LinearResponse, "power": PowerResponse, "exp": ExpResponse, "table": TableResponse}
