"""AnalogSGD: the analog update for analog tensors, plain SGD for the rest."""

from __future__ import annotations

import math

import torch
from torch.optim.optimizer import Optimizer, required

from .ops import philox
from .ops.dispatch import analog_step

NONFINITE_MODES = ("raise", "skip")


def _layer_of(p: torch.Tensor):
    ref = getattr(p, "_fa_layer", None)
    layer = ref() if ref is not None else None
    if layer is None or layer.weight is not p:
        return None
    return layer


class AnalogSGD(Optimizer):
    """SGD whose analog parameters are written through their devices (SPEC section 3).

    Args:
        params: parameters or param groups, as for ``torch.optim.SGD``. The ``weight``
            of an analog layer gets its layer's configured analog update; every other
            parameter (and analog layers with ``algorithm="digital"``) plain SGD.
        lr: learning rate (> 0); read from the param group at each step, so lr
            schedulers work.
        momentum: momentum factor (>= 0). For analog tensors it shapes the gradient
            signal fed to the devices (a digital momentum buffer per tensor).
        weight_decay: L2 penalty (>= 0), added to the gradient of every parameter
            (for analog tensors: of the forward weight).
        seed: 64-bit seed of the pulse randomness; None draws one from torch's global
            generator (so ``torch.manual_seed`` makes runs repeatable).
        nonfinite: what a NaN/Inf gradient does: ``"raise"`` (default) raises
            ``FloatingPointError`` before any array or parameter is touched;
            ``"skip"`` skips that whole step (no array, counter or random stream
            advances) and counts it in ``skipped_steps``.

    The random stream of analog tensor ``t`` (its position among the analog weights,
    in param-group order) at step ``k`` (counting from 1) is keyed by
    ``step_key(seed, k, t)``; ``state_dict`` holds seed and step, so a resumed run
    continues the exact trajectory.
    """

    def __init__(self, params, lr=required, momentum: float = 0.0, weight_decay: float = 0.0, seed: int | None = None, nonfinite: str = "raise"):
        if lr is not required and (not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.seed = seed
        self.nonfinite = nonfinite
        self.step_count = 0
        self.skipped_steps = 0

    # ----- bookkeeping -----------------------------------------------------------------
    def _analog_params(self):
        """(param, layer, tensor_id, group) for every analog weight, in param-group order."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                layer = _layer_of(p)
                if layer is not None and layer.analog_config.is_analog:
                    out.append((p, layer, len(out), group))
        return out

    def _grads_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        flags = torch.stack([torch.isfinite(g).all().to("cpu") for g in grads])
        return bool(flags.all())

    def _signal(self, p: torch.Tensor, group) -> torch.Tensor:
        """The gradient signal of ``p`` after weight decay and momentum."""
        d_p = p.grad
        if group["weight_decay"] != 0:
            d_p = d_p.add(p.detach(), alpha=group["weight_decay"])
        if group["momentum"] != 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d_p.detach().clone()
            else:
                buf.mul_(group["momentum"]).add_(d_p)
            d_p = buf
        return d_p

    # ----- the step --------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._grads_finite():
            bad = [
                tuple(p.shape) for g in self.param_groups for p in g["params"] if p.grad is not None and not torch.isfinite(p.grad).all()
            ]
            if self.nonfinite == "skip":
                self.skipped_steps += 1
                return loss
            raise FloatingPointError(
                f"non-finite gradients in parameters of shapes {bad}; no array was changed. "
                "Fix the loss, or pass nonfinite='skip' to AnalogSGD to skip such steps"
            )
        self.step_count += 1
        k = self.step_count
        analog = {id(p): (layer, tid) for p, layer, tid, _ in self._analog_params()}
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = self._signal(p, group)
                entry = analog.get(id(p))
                if entry is None:
                    p.add_(d_p, alpha=-lr)
                    continue
                layer, tid = entry
                pulses = analog_step(
                    layer.analog_state(),
                    p.data,
                    d_p,
                    lr=lr,
                    config=layer.analog_config,
                    key=philox.step_key(self.seed, k, tid),
                    tensor_id=tid,
                    step=k,
                )
                self._count(layer, pulses)
        return loss

    @staticmethod
    def _count(layer, pulses) -> None:
        """Pulses per array: index 0 is W, index 1 is P."""
        last = layer.analog_last_pulses
        if layer.analog_config.has_residual:
            last[1] = pulses.first.abs().sum()
            last[0] = pulses.main.abs().sum() if pulses.main is not None else 0
        else:
            last[0] = pulses.first.abs().sum()
            last[1] = 0
        layer.analog_pulses += last

    # ----- checkpoints ----------------------------------------------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd["fastanalog"] = {"seed": self.seed, "step": self.step_count, "skipped_steps": self.skipped_steps}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("fastanalog", None)
        if extra is None:
            raise ValueError("this optimizer state_dict has no 'fastanalog' entry: it was not saved by AnalogSGD")
        super().load_state_dict(state_dict)
        self.seed = int(extra["seed"])
        self.step_count = int(extra["step"])
        self.skipped_steps = int(extra.get("skipped_steps", 0))
