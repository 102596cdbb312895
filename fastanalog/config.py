"""AnalogConfig: which algorithm trains an analog tensor, on which devices."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .devices import LinearResponse, ResponseDevice
from .ops.reference import ALGORITHMS as ANALOG_ALGORITHMS

# "digital" (plain SGD, no device), then the analog algorithms of ``ops.reference.ALGORITHMS``.
ALGORITHMS = ("digital", *ANALOG_ALGORITHMS)
BUFFERS = ("accumulate", "ema")
MIXED_WEIGHTS = ("transient", "stored")
# Pulses per element and write never exceed this (each direction): a huge gradient or learning
# rate saturates the count instead of overflowing it (every backend, SPEC section 2's cap).
PULSE_LIMIT = 2**24
WEIGHT_SCALINGS = ("fit", "channel", "tensor")
UPDATES = ("per-sample", "batch")


@dataclass(frozen=True)
class AnalogConfig:
    """How one analog tensor is stored and trained (SPEC section 3).

    Attributes:
        algorithm: ``digital`` (plain SGD, no device), ``asgd`` (Analog SGD),
            ``rl`` (Residual Learning v1; ``gamma=0`` is Tiki-Taka) or ``rl2``
            (Residual Learning v2: digital buffer and threshold transfer).
        device: the main array W's device.
        residual_device: the residual array P's device (default: ``device``).
        gamma: mixing weight of the forward weight ``W + gamma * P`` (>= 0).
        transfer_lr: step size of the P -> W transfer (> 0; default 0.1: ``fastanalog reproduce`` measures
            rl and rl2 training at 0.1 where 1.0, the default before, stalls them).
        transfer_every: ``rl`` transfers every this many optimizer steps (>= 1).
        read_noise: std of the additive noise of each read of P, weight units (>= 0).
        buffer: ``rl2`` buffer mode, ``accumulate`` (threshold transfer) or ``ema``.
        threshold: ``rl2`` accumulate mode transfers once ``|H| >= threshold * dw_min_W`` (>= 1).
        max_pulses: cap on pulses per element per write and direction, at most ``PULSE_LIMIT``
            (2**24; None: that limit, which only a diverging run reaches).
        zero_shift: use P's device with its symmetric point subtracted (``G_P(0) = 0``).
        mixed_weight: how rl/rl2 keep the forward weight ``W + gamma * P``:
            ``transient`` (computed in forward and again in backward; no array is kept)
            or ``stored`` (an array the optimizer's kernels rewrite at every step).
        weight_scaling: how digital weights ``w`` are mapped onto the devices when they
            enter a layer (``convert_to_analog``, the layer's own initialisation,
            ``load_state_dict`` of a digital checkpoint; SPEC section 7). The layer keeps
            ``W = w / s`` on the devices and computes ``y = s * (x @ W^T) + b`` with a
            digital per-output-channel scale ``s`` (the buffer ``analog_scale``):
            ``fit`` (default): ``s_c = 1`` for every output channel whose weights lie
            inside the device range (a model trained from scratch is exactly the
            paper's model), ``s_c = m_c / omega`` for a channel that does not fit;
            ``channel``: ``s_c = m_c / omega`` for every channel; ``tensor``: one
            ``s = max_c m_c / omega`` for the whole tensor. Here ``m_c = max_i max(w_ci /
            tau_max, -w_ci / |tau_min|)`` measures a channel against the bound of each
            weight's sign (positive weights against ``tau_max``, negative ones against
            ``|tau_min|``), so the weight of a scaled channel that reaches furthest sits at
            ``omega`` times its bound. These are the nominal bounds of ``device``: with
            ``d2d_std > 0`` an element whose own range is narrower is clipped to it at its
            first write, as it would be on the hardware. The
            converted model computes the original outputs for any weights. Learning
            rate: the gradient the optimizer sees is that of W (device units),
            ``dL/dW_c = s_c dL/dw_c``, and a change ``dW_c = -lr dL/dW_c`` is
            ``dw_c = s_c dW_c = -lr s_c**2 dL/dw_c`` in digital units: a channel with
            scale ``s_c`` trains like a digital one with learning rate ``lr * s_c**2``
            (momentum alike; one pulse moves its digital weight by ``s_c * dw_min``, and its
            range is ``s_c`` times the device's). AnalogSGD's weight decay acts on W:
            ``-lr * wd * W`` is ``-lr * wd * w`` in digital units, unscaled.
        weight_scaling_omega: the margin ``omega`` in ``(0, 1)`` (default 0.95): scaled
            channels use this fraction of the bound, where the response reaches 0.
        update: how a mini-batch is written (SPEC section 2a). ``per-sample`` (default):
            as a crossbar is written, one outer product per sample (for a convolution,
            per output position), so the up and down pulses of samples that cancel in
            the batch gradient are still sent: the gradient-driven write (W for asgd,
            P for rl/rl2) carries, on top of the net pulses of ``-lr * S``, the
            opposite-pulse pairs of ``e = lr * max(A - |S|, 0) / 2``, with ``S`` the
            weight gradient and ``A`` the sum of the samples' absolute gradients, which
            the layer computes in backward (one more GEMM of the weight gradient's size,
            on absolute values). Its expected change is ``-lr*S*F(W) - lr*A*G(W)``: the
            drift toward the symmetric point grows with ``sum_b |g_b|``, as in IBM's
            aihwkit. ``batch``: the mini-batch gradient is one write (``e = 0``), the
            model the paper's theorems state (drift grows with ``|sum_b g_b|`` only).
            Transfers are one write either way, and a gradient set by hand (no backward
            through the layer) is one sample.
    """

    algorithm: str = "rl2"
    device: ResponseDevice = LinearResponse()
    residual_device: ResponseDevice | None = None
    gamma: float = 0.1
    transfer_lr: float = 0.1
    transfer_every: int = 1
    read_noise: float = 0.0
    buffer: str = "accumulate"
    threshold: float = 1.0
    max_pulses: int | None = None
    zero_shift: bool = True
    mixed_weight: str = "transient"
    weight_scaling: str = "fit"
    weight_scaling_omega: float = 0.95
    update: str = "per-sample"

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
        if not isinstance(self.device, ResponseDevice):
            raise TypeError(f"device must be a ResponseDevice (e.g. fastanalog.PowerResponse(tau=0.6)), got {self.device!r}")
        if self.residual_device is None:
            object.__setattr__(self, "residual_device", self.device)
        elif not isinstance(self.residual_device, ResponseDevice):
            raise TypeError(f"residual_device must be a ResponseDevice or None, got {self.residual_device!r}")
        for name in ("gamma", "transfer_lr", "read_noise", "threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0 (mixing weight of W + gamma*P), got {self.gamma}")
        if self.transfer_lr <= 0:
            raise ValueError(f"transfer_lr must be > 0, got {self.transfer_lr}")
        if self.buffer == "ema" and self.transfer_lr > 1:
            raise ValueError(f"transfer_lr must be <= 1 with buffer='ema' (it is the moving-average weight), got {self.transfer_lr}")
        if isinstance(self.transfer_every, bool) or not isinstance(self.transfer_every, int) or self.transfer_every < 1:
            raise ValueError(f"transfer_every must be an int >= 1, got {self.transfer_every!r}")
        if self.read_noise < 0:
            raise ValueError(f"read_noise must be >= 0 (std of the read of P), got {self.read_noise}")
        if self.mixed_weight not in MIXED_WEIGHTS:
            raise ValueError(f"unknown mixed_weight {self.mixed_weight!r}: choose 'transient' or 'stored'")
        if self.weight_scaling not in WEIGHT_SCALINGS:
            raise ValueError(f"unknown weight_scaling {self.weight_scaling!r}: choose one of {', '.join(WEIGHT_SCALINGS)}")
        omega = self.weight_scaling_omega
        if isinstance(omega, bool) or not isinstance(omega, (int, float)) or not math.isfinite(omega) or not 0 < omega < 1:
            raise ValueError(
                f"weight_scaling_omega must be a number in (0, 1) (the fraction of the device bound a scaled weight may use), got {omega!r}"
            )
        if self.update not in UPDATES:
            raise ValueError(f"unknown update {self.update!r}: choose 'per-sample' (one write per sample, as a crossbar) or 'batch'")
        if self.buffer not in BUFFERS:
            raise ValueError(f"unknown buffer {self.buffer!r}: choose 'accumulate' or 'ema'")
        if self.threshold < 1:
            raise ValueError(f"threshold must be >= 1 (in units of dw_min of W), got {self.threshold}")
        if self.max_pulses is not None and (
            isinstance(self.max_pulses, bool)
            or not isinstance(self.max_pulses, int)
            or not 1 <= self.max_pulses <= PULSE_LIMIT
        ):
            raise ValueError(f"max_pulses must be None or an int in [1, {PULSE_LIMIT}], got {self.max_pulses!r}")

    @property
    def pulse_cap(self) -> int:
        """The cap every write applies to each direction's pulses: ``max_pulses``, or ``PULSE_LIMIT``."""
        return PULSE_LIMIT if self.max_pulses is None else self.max_pulses

    @property
    def is_analog(self) -> bool:
        return self.algorithm != "digital"

    @property
    def has_residual(self) -> bool:
        """Whether the algorithm keeps a residual array P (and a mixed weight ``W + gamma * P``)."""
        return self.is_analog and ANALOG_ALGORITHMS[self.algorithm].residual

    @property
    def per_sample(self) -> bool:
        """Whether the layer computes ``A`` (the samples' |g| sums) for its writes: analog and ``update="per-sample"``."""
        return self.is_analog and self.update == "per-sample"

    @property
    def has_buffer(self) -> bool:
        """Whether the algorithm keeps a digital buffer H."""
        return self.is_analog and ANALOG_ALGORITHMS[self.algorithm].buffered
