"""Devices: Definition 1, F/G, symmetric points, device-to-device variation, errors."""

import pytest
import torch

import fastanalog as fa
from fastanalog.devices import DeviceParams

LINEAR_TABLE = dict(tau_min=-1.0, tau_max=1.0, up=(2.0, 1.5, 1.0, 0.5, 0.0), down=(0.0, 0.5, 1.0, 1.5, 2.0))

DEVICES = [
    fa.LinearResponse(tau=0.8),
    fa.LinearResponse(tau_min=-0.5, tau_max=1.2, asymmetry=0.2),
    fa.PowerResponse(tau=0.6, gamma=0.5),
    fa.PowerResponse(tau_min=-0.9, tau_max=0.4, gamma=2.0, asymmetry=-0.3),
    fa.ExpResponse(tau=1.0, gamma=2.0),
    fa.ExpResponse(tau_min=-0.7, tau_max=1.1, gamma=-1.5, asymmetry=0.4),
    fa.TableResponse(**LINEAR_TABLE),
    fa.TableResponse(tau_min=-1.0, tau_max=0.5, up=(1.0, 0.9, 0.4, 0.0), down=(0.0, 0.2, 0.7, 1.3), asymmetry=0.1),
]


def test_linear_symmetric_has_unit_F_and_G_w_over_tau():
    d = fa.LinearResponse(tau=0.5)
    w = torch.linspace(-0.5, 0.5, 11)
    torch.testing.assert_close(d.F(w), torch.ones(11))
    torch.testing.assert_close(d.G(w), w / 0.5)


def test_power_and_exp_formulas():
    w = torch.tensor([-0.3, 0.0, 0.2], dtype=torch.float64)
    p = fa.PowerResponse(tau=0.6, gamma=0.5, asymmetry=0.1)
    torch.testing.assert_close(p.q_up(w), ((0.6 - w) / 0.6) ** 0.5 * 1.1)
    torch.testing.assert_close(p.q_down(w), ((w + 0.6) / 0.6) ** 0.5 * 0.9)
    e = fa.ExpResponse(tau=1.0, gamma=2.0)
    torch.testing.assert_close(e.q_up(w), torch.expm1(2.0 * (1 - w)) / torch.expm1(torch.tensor(2.0, dtype=torch.float64)))
    torch.testing.assert_close(e.F(w), (e.q_up(w) + e.q_down(w)) / 2)
    torch.testing.assert_close(e.G(w), (e.q_down(w) - e.q_up(w)) / 2)


def test_table_of_a_linear_curve_equals_the_linear_device():
    w = torch.linspace(-1, 1, 101)
    t, lin = fa.TableResponse(**LINEAR_TABLE), fa.LinearResponse(tau=1.0)
    torch.testing.assert_close(t.q_up(w), lin.q_up(w))
    torch.testing.assert_close(t.q_down(w), lin.q_down(w))


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: type(d).__name__)
def test_definition1_holds_and_symmetric_point_zeroes_G(device):
    w = torch.linspace(device.tau_min, device.tau_max, 1001, dtype=torch.float64)
    assert bool((device.q_up(w[:-1]) > 0).all()) and bool((device.q_down(w[1:]) > 0).all())
    assert abs(float(device.q_up(w[-1:]))) < 1e-12 and abs(float(device.q_down(w[:1]))) < 1e-12
    ws = device.symmetric_point()
    assert device.tau_min < float(ws) < device.tau_max
    assert abs(float(device.G(ws.double().reshape(1)))) < 1e-5


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: type(d).__name__)
def test_closed_form_symmetric_points_match_bisection(device):
    generic = fa.ResponseDevice.symmetric_point(device)
    torch.testing.assert_close(device.symmetric_point(), generic, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["linear", "power", "exp", "table"])
def test_d2d_per_element_symmetric_point_zeroes_G(family):
    kw = dict(d2d_std=0.3, variation_seed=5, asymmetry=0.2)
    device = {
        "linear": fa.LinearResponse(tau=0.7, **kw),
        "power": fa.PowerResponse(tau=0.7, gamma=0.6, **kw),
        "exp": fa.ExpResponse(tau=0.7, gamma=1.5, **kw),
        "table": fa.TableResponse(**LINEAR_TABLE, **kw),
    }[family]
    params = device.element_params(4096, tensor_id=3, array=1)
    ws = device.symmetric_point(params)
    assert ws.shape == (4096,)
    assert float(ws.std()) > 0  # the elements really differ
    g = device.G(ws.double(), DeviceParams(*(v.double() for v in vars(params).values())))
    assert float(g.abs().max()) < 1e-5


def test_d2d_parameters_are_a_pure_function_of_seed_and_index():
    d = fa.PowerResponse(tau=0.6, gamma=0.5, d2d_std=0.2, asymmetry=0.1, variation_seed=11)
    full = d.element_params(1000, tensor_id=2, array=0)
    part = d.element_params(300, tensor_id=2, array=0, offset=500)
    for a, b in zip(vars(full).values(), vars(part).values()):
        assert torch.equal(a[500:800], b)
    other = d.element_params(1000, tensor_id=3, array=0)
    assert not torch.equal(full.tau_max, other.tau_max)
    # Every element satisfies Definition 1's signs.
    assert bool((full.tau_min < 0).all() and (full.tau_max > 0).all() and (full.gamma > 0).all())
    assert bool((full.dw_min > 0).all() and (full.asym.abs() < 1).all())
    rel = full.tau_max / 0.6 - 1
    assert 0.15 < float(rel.std()) < 0.25


def test_no_variation_gives_nominal_floats():
    p = fa.LinearResponse(tau=0.5).element_params(10, 0, 0)
    assert p.tau_max == 0.5 and p.dw_min == 0.001


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: fa.LinearResponse(tau=0.0), "tau must be > 0"),
        (lambda: fa.LinearResponse(tau=-1.0), "tau must be > 0"),
        (lambda: fa.LinearResponse(tau_min=0.5, tau_max=0.2), "tau_min must be < tau_max"),
        (lambda: fa.LinearResponse(tau_min=0.1, tau_max=0.5), "tau_min must be < 0"),
        (lambda: fa.LinearResponse(tau_min=-0.5), "give both tau_min and tau_max"),
        (lambda: fa.LinearResponse(tau=1.0, tau_max=1.0), "either tau or tau_min/tau_max"),
        (lambda: fa.LinearResponse(dw_min=0.0), "dw_min must be > 0"),
        (lambda: fa.LinearResponse(dw_min=float("nan")), "dw_min must be a finite number"),
        (lambda: fa.LinearResponse(asymmetry=1.0), "asymmetry must be in"),
        (lambda: fa.LinearResponse(d2d_std=-0.1), "d2d_std must be >= 0"),
        (lambda: fa.LinearResponse(c2c_std=-0.1), "c2c_std must be >= 0"),
        (lambda: fa.PowerResponse(gamma=0.0), "gamma must be in"),
        (lambda: fa.PowerResponse(gamma=-1.0), "gamma must be in"),
        (lambda: fa.ExpResponse(gamma=0.0), "gamma must be non-zero"),
        (lambda: fa.TableResponse(up=(1.0, 0.5), down=(0.0, 0.5, 1.0)), "same length"),
        (lambda: fa.TableResponse(up=(1.0, 0.5, 0.1), down=(0.0, 0.5, 1.0)), "q_up\\(tau_max\\)"),
        (lambda: fa.TableResponse(up=(1.0, 0.0, 0.0), down=(0.0, 0.5, 1.0)), "q_up must be > 0"),
        (lambda: fa.TableResponse(up=(1.0, 0.5, 0.0), down=(0.0, -0.5, 1.0)), "q_down must be > 0"),
        (lambda: fa.ResponseDevice(), "abstract"),
    ],
)
def test_bad_devices_are_rejected_with_a_clear_error(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()
