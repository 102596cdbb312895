"""SPEC section 5 diagnostics."""

import math

import pytest
import torch
from torch import nn

import fastanalog as fa
from fastanalog.diagnostics import SaturationMeter, layer_diagnostics, model_diagnostics, saturation


def test_saturation_of_a_linear_device_is_sqrt_of_w_over_tau():
    lin = fa.AnalogLinear(3, 2, config=fa.AnalogConfig(algorithm="asgd", device=fa.LinearResponse(tau=1.0)))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0.1, -0.2], [0.25, 0.4, -0.45]]))
    expected = torch.sqrt(lin.weight.detach().abs().reshape(-1) / 1.0)  # F = 1, G = w / tau
    torch.testing.assert_close(saturation(lin), expected)
    d = layer_diagnostics(lin)
    assert d["saturation_max"] == pytest.approx(math.sqrt(0.45))
    assert d["dist_sym"] == pytest.approx(float(lin.weight.detach().abs().mean()))
    assert d["abs_P"] == 0.0


def test_model_diagnostics_and_meter_track_training():
    torch.manual_seed(0)
    m = fa.convert_to_analog(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)), fa.AnalogConfig(algorithm="rl2"))
    opt = fa.AnalogSGD(m.parameters(), lr=0.5, seed=0)
    meter = SaturationMeter()
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(4, 6)).pow(2).sum().backward()
        opt.step()
        meter.update(m)
    diags = model_diagnostics(m)
    assert set(diags) == {"0", "2"}
    assert diags["0"]["pulses_P"] > 0 and diags["0"]["abs_P"] > 0
    assert diags["0"]["pulses_P"] + diags["0"]["pulses_W"] == int(m[0].analog_pulses.sum())
    assert 0 < meter.value < 1 and meter.count == 3
