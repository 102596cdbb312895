"""Analog layers, convert_to_analog on timm models, AnalogConfig validation."""

import copy
import warnings

import pytest
import torch
from torch import nn

import fastanalog as fa

ALGORITHMS = ["digital", "asgd", "rl", "rl2"]


def test_layers_accept_every_nn_argument_and_forward_like_their_twins():
    cfg = fa.AnalogConfig(algorithm="rl2")
    torch.manual_seed(0)
    conv = fa.AnalogConv2d(3, 8, 3, stride=2, padding=1, dilation=1, groups=1, bias=False, padding_mode="reflect", config=cfg)
    ref = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False, padding_mode="reflect")
    ref.weight.data.copy_(conv.weight.data)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(conv(x), ref(x))
    c1 = fa.AnalogConv1d(4, 6, 5, padding=2, groups=2, config=cfg)
    assert c1(torch.randn(1, 4, 11)).shape == (1, 6, 11)
    lin = fa.AnalogLinear(5, 3, bias=False, config=cfg)
    assert lin.bias is None and lin(torch.randn(2, 5)).shape == (2, 3)
    assert "algorithm=rl2" in repr(lin)


def test_analog_state_returns_live_tensors_and_state_dict_restores_everything():
    lin = fa.AnalogLinear(4, 3, config=fa.AnalogConfig(algorithm="rl2", gamma=0.5))
    st = lin.analog_state()
    st["residual"].fill_(0.01)
    assert float(lin.analog_residual[0, 0]) == pytest.approx(0.01)
    lin.refresh_weight()
    torch.testing.assert_close(lin.weight.detach(), lin.analog_main + 0.5 * lin.analog_residual)
    other = fa.AnalogLinear(4, 3, config=fa.AnalogConfig(algorithm="rl2", gamma=0.5))
    other.load_state_dict(lin.state_dict())
    for k, v in lin.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])
    assert set(lin.state_dict()) >= {"weight", "bias", "analog_main", "analog_residual", "analog_buffer", "analog_pulses"}


def test_convert_keeps_weights_biases_and_leaves_the_original_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    model.eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 1, 8, 8)
    converted = fa.convert_to_analog(copy.deepcopy(model), fa.AnalogConfig(algorithm="rl"))
    assert isinstance(converted[0], fa.AnalogConv2d) and isinstance(converted[3], fa.AnalogLinear)
    assert isinstance(converted[1], nn.BatchNorm2d)
    torch.testing.assert_close(converted(x), original(x), rtol=0, atol=0)
    assert type(model[0]) is nn.Conv2d


def test_include_exclude_and_clipping_warning():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with torch.no_grad():
        model[1].weight.fill_(2.0)
    fa.convert_to_analog(model, fa.AnalogConfig(), exclude=["1"])
    assert isinstance(model[0], fa.AnalogLinear) and type(model[1]) is nn.Linear
    with pytest.warns(UserWarning, match="outside the device range"):
        fa.convert_to_analog(model, fa.AnalogConfig(device=fa.LinearResponse(tau=0.5)), include=["1"])
    assert float(model[1].weight.detach().max()) == pytest.approx(0.5)
    with pytest.raises(TypeError, match="glob patterns"):
        fa.convert_to_analog(model, fa.AnalogConfig(), include="0")


def test_subclass_with_its_own_forward_is_left_digital_with_a_warning():
    class SameConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))

    model = nn.Sequential(SameConv(1, 2, 3))
    with pytest.warns(UserWarning, match="left digital"):
        fa.convert_to_analog(model, fa.AnalogConfig())
    assert type(model[0]) is SameConv


def _timm_step(name: str, algorithm: str, **kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    size = kwargs.get("img_size", 32)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        before = model(x)
    cfg = fa.AnalogConfig(algorithm=algorithm, device=fa.LinearResponse(tau=2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no weight may need clipping at tau = 2
        analog = fa.convert_to_analog(copy.deepcopy(model), cfg)
    n_analog = sum(1 for _ in fa.analog_layers(analog))
    assert n_analog > 0
    with torch.no_grad():
        torch.testing.assert_close(analog(x), before, rtol=1e-5, atol=1e-5)
    analog.train()
    opt = fa.AnalogSGD(analog.parameters(), lr=0.05, seed=0)
    loss = nn.functional.cross_entropy(analog(x), torch.tensor([1, 2]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    loss2 = nn.functional.cross_entropy(analog(x), torch.tensor([1, 2]))
    assert torch.isfinite(loss2)
    if algorithm != "digital":
        assert fa.total_pulses(analog) > 0


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_timm_resnet18_trains_with_every_algorithm(algorithm):
    _timm_step("resnet18", algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_timm_vit_small_trains_with_every_algorithm(algorithm):
    _timm_step("vit_small_patch16_224", algorithm, img_size=32)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_timm_resnet50_trains_with_every_algorithm(algorithm):
    _timm_step("resnet50", algorithm)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(algorithm="sgd"), "unknown algorithm"),
        (dict(threshold=0.5), "threshold must be >= 1"),
        (dict(read_noise=-0.1), "read_noise must be >= 0"),
        (dict(gamma=-0.1), "gamma must be >= 0"),
        (dict(transfer_lr=0.0), "transfer_lr must be > 0"),
        (dict(transfer_every=0), "transfer_every"),
        (dict(buffer="fifo"), "unknown buffer"),
        (dict(buffer="ema", transfer_lr=2.0), "transfer_lr must be <= 1"),
        (dict(max_pulses=0), "max_pulses"),
        (dict(device="power"), "ResponseDevice"),
        (dict(gamma=float("nan")), "finite"),
    ],
)
def test_bad_configs_are_rejected(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fa.AnalogConfig(**kwargs)
