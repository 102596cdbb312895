"""Numbers a user reads (SPEC section 5): F, G, symmetric point, saturation, pulses.

``saturation`` is the paper's saturation degree ``sqrt(|G(W)| / F(W)) per element``;
the S^ASGD amplification factor is its squared infinity norm averaged over steps,
which ``SaturationMeter`` accumulates.
"""

from __future__ import annotations

import torch
from torch import nn

from .devices import MATH_DTYPE
from .nn.layers import AnalogLayerMixin, analog_layers
from .ops.reference import ARRAY_W


def _main_params(layer: AnalogLayerMixin, tensor_id: int):
    dev = layer.analog_config.device
    W = layer.analog_state()["main"]
    params = dev.element_params(W.numel(), tensor_id, ARRAY_W, device=W.device)
    return dev, W.detach().reshape(-1).to(MATH_DTYPE), params


@torch.no_grad()
def saturation(layer: AnalogLayerMixin, tensor_id: int = 0) -> torch.Tensor:
    """Per-element saturation degree ``sqrt(|G(W)| / F(W))`` of the main array (flat).

    ``tensor_id`` selects the device-to-device draw (the layer's position among the
    optimizer's analog tensors); it matters only with ``d2d_std > 0``.
    """
    dev, W, p = _main_params(layer, tensor_id)
    return torch.sqrt(dev.G(W, p).abs() / dev.F(W, p))


@torch.no_grad()
def layer_diagnostics(layer: AnalogLayerMixin, tensor_id: int = 0) -> dict[str, float]:
    """Scalar summaries of one analog layer.

    Keys: ``saturation_max`` (infinity norm of the saturation degree),
    ``saturation_mean``, ``dist_sym`` (mean |W - w_sym|), ``abs_P`` (mean |P|, 0 without
    a residual array), ``abs_H`` (mean |H|), ``pulses_W``, ``pulses_P`` (written so far),
    ``last_pulses_W``, ``last_pulses_P`` (last step).
    """
    cfg = layer.analog_config
    out = {"saturation_max": 0.0, "saturation_mean": 0.0, "dist_sym": 0.0, "abs_P": 0.0, "abs_H": 0.0}
    if cfg.is_analog:
        dev, W, p = _main_params(layer, tensor_id)
        s = torch.sqrt(dev.G(W, p).abs() / dev.F(W, p))
        out["saturation_max"] = float(s.max())
        out["saturation_mean"] = float(s.mean())
        out["dist_sym"] = float((W - dev.symmetric_point(p, like=W)).abs().mean())
    st = layer.analog_state()
    if st["residual"] is not None:
        out["abs_P"] = float(st["residual"].abs().mean())
    if st["buffer"] is not None:
        out["abs_H"] = float(st["buffer"].abs().mean())
    out["pulses_W"], out["pulses_P"] = (int(v) for v in layer.analog_pulses)
    out["last_pulses_W"], out["last_pulses_P"] = (int(v) for v in layer.analog_last_pulses)
    return out


def model_diagnostics(model: nn.Module) -> dict[str, dict[str, float]]:
    """``layer_diagnostics`` of every analog layer, keyed by module name.

    Layers are numbered in module order for the d2d draw, which matches AnalogSGD's
    tensor ids when the optimizer was given ``model.parameters()``.
    """
    return {name: layer_diagnostics(layer, tid) for tid, (name, layer) in enumerate(analog_layers(model))}


class SaturationMeter:
    """Running average over steps of the squared infinity norm of the saturation degree.

    Call ``update(model)`` after each optimizer step; ``value`` is the S^ASGD factor.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        worst = 0.0
        for tid, (_, layer) in enumerate(analog_layers(model)):
            if layer.analog_config.is_analog:
                worst = max(worst, float(saturation(layer, tid).max()))
        self.total += worst**2
        self.count += 1
        return worst**2

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else 0.0
