"""Analog layers, convert_to_analog on timm models, AnalogConfig validation."""

import copy
import gc
import warnings
import weakref

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
    assert st["main"].data_ptr() == lin.weight.data_ptr()
    st["residual"].fill_(0.01)
    assert float(lin.analog_residual[0, 0]) == pytest.approx(0.01)
    torch.testing.assert_close(lin.forward_weight(), lin.weight.detach() + 0.5 * lin.analog_residual)
    other = fa.AnalogLinear(4, 3, config=fa.AnalogConfig(algorithm="rl2", gamma=0.5))
    other.load_state_dict(lin.state_dict())
    for k, v in lin.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])
    assert set(lin.state_dict()) == {
        "weight",
        "bias",
        "analog_scale",
        "analog_residual",
        "analog_buffer",
        "analog_pulses",
        "analog_last_pulses",
    }


def test_state_dicts_of_the_earlier_layout_load():
    """Before the mixed weight became transient, W lived in ``analog_main`` and ``weight`` held W + gamma P."""
    lin = fa.AnalogLinear(4, 3, config=fa.AnalogConfig(algorithm="rl", gamma=0.5))
    old = {k: v.clone() for k, v in lin.state_dict().items()}
    old["analog_main"] = torch.full((3, 4), 0.25)
    old["analog_residual"] = torch.full((3, 4), 0.1)
    old["weight"] = old["analog_main"] + 0.5 * old["analog_residual"]
    lin.load_state_dict(old)
    assert torch.equal(lin.weight.detach(), torch.full((3, 4), 0.25))
    torch.testing.assert_close(lin.forward_weight(), torch.full((3, 4), 0.3))


def _twin_layers(kind: str, mixed_weight: str, algorithm: str = "rl2", gamma: float = 0.3):
    torch.manual_seed(1)
    cfg = fa.AnalogConfig(algorithm=algorithm, gamma=gamma, mixed_weight=mixed_weight)
    if kind == "linear":
        layer = fa.AnalogLinear(6, 5, config=cfg)
        x = torch.randn(3, 2, 6)
    elif kind == "conv1d":
        layer = fa.AnalogConv1d(4, 6, 3, padding=1, groups=2, config=cfg)
        x = torch.randn(2, 4, 7)
    else:
        layer = fa.AnalogConv2d(3, 4, 3, stride=2, padding="valid", padding_mode="zeros", config=cfg)
        x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        layer.analog_residual.copy_(torch.randn_like(layer.analog_residual) * 0.05)
    layer.refresh_weight()
    return layer, x


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
@pytest.mark.parametrize("mixed_weight", ["transient", "stored"])
@pytest.mark.parametrize("input_grad", [True, False])
def test_forward_and_gradients_are_those_at_the_mixed_weight(kind, mixed_weight, input_grad):
    """Output, input gradient and weight gradient equal a digital twin's whose weight is W + gamma * P."""
    layer, x = _twin_layers(kind, mixed_weight)
    twin = copy.deepcopy(layer)
    digital = {"linear": nn.Linear, "conv1d": nn.Conv1d, "conv2d": nn.Conv2d}[kind]
    twin.__class__ = digital  # the plain nn forward
    with torch.no_grad():
        twin.weight.copy_(layer.weight + 0.3 * layer.analog_residual)
    xa, xd = x.clone().requires_grad_(input_grad), x.clone().requires_grad_(input_grad)
    out, ref = layer(xa), twin(xd)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    if input_grad:
        torch.testing.assert_close(xa.grad, xd.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, twin.weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, twin.bias.grad)
    assert layer.analog_residual.grad is None


@pytest.mark.parametrize("needs_input_grad", [True, False])
def test_transient_mixed_weight_is_not_kept_by_autograd(monkeypatch, needs_input_grad):
    """Between forward and backward no mixed weight is alive: backward computes it again if it needs it."""
    from fastanalog.ops import dispatch

    made = []
    real = dispatch.mixed_weight

    def spy(*args):
        t = real(*args)
        made.append(weakref.ref(t))
        return t

    monkeypatch.setattr(dispatch, "mixed_weight", spy)
    layer, x = _twin_layers("conv2d", "transient")
    assert layer.analog_mixed is None and "analog_mixed" not in dict(layer.named_buffers())
    x.requires_grad_(needs_input_grad)
    out = layer(x)
    gc.collect()
    assert len(made) == 1 and made[0]() is None, "autograd kept the mixed weight"
    out.sum().backward()
    assert len(made) == (2 if needs_input_grad else 1)  # the input's gradient needs the weight, W's gradient not
    assert layer.weight.grad is not None
    stored, _ = _twin_layers("conv2d", "stored")
    assert stored.analog_mixed is not None and "analog_mixed" not in stored.state_dict()


def test_transient_mixed_weight_supports_double_backward():
    layer, x = _twin_layers("linear", "transient")
    x = x.requires_grad_()
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    gx.square().sum().backward()
    twin = nn.Linear(6, 5)
    with torch.no_grad():
        twin.weight.copy_(layer.forward_weight())
        twin.bias.copy_(layer.bias)
    xd = x.detach().clone().requires_grad_()
    (gd,) = torch.autograd.grad(twin(xd).square().sum(), xd, create_graph=True)
    gd.square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, twin.weight.grad, rtol=1e-5, atol=1e-6)


def test_stored_and_transient_mixed_weights_train_identically():
    runs = []
    for mixed_weight in ("transient", "stored"):
        torch.manual_seed(0)
        cfg = fa.AnalogConfig(algorithm="rl2", gamma=0.2, transfer_lr=0.5, mixed_weight=mixed_weight)
        model = fa.convert_to_analog(nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)), cfg)
        opt = fa.AnalogSGD(model.parameters(), lr=0.5, momentum=0.5, weight_decay=0.01, seed=3)
        x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 3, (8,))
        for _ in range(4):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        if mixed_weight == "stored":
            for layer in (model[0], model[2]):
                assert torch.equal(layer.analog_mixed, layer.forward_weight())
        runs.append(model.state_dict())
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k
    assert int(runs[0]["0.analog_pulses"].sum()) > 0


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


def test_include_exclude_and_weights_beyond_the_range_are_scaled_not_clipped():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with torch.no_grad():
        model[1].weight.fill_(2.0)
    fa.convert_to_analog(model, fa.AnalogConfig(), exclude=["1"])
    assert isinstance(model[0], fa.AnalogLinear) and type(model[1]) is nn.Linear
    x = torch.randn(4, 3)
    before = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fa.convert_to_analog(model, fa.AnalogConfig(device=fa.LinearResponse(tau=0.5)), include=["1"])
    assert float(model[1].weight.detach().max()) == pytest.approx(0.95 * 0.5)
    torch.testing.assert_close(model(x), before)
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


@pytest.mark.parametrize("algorithm", ["asgd", "rl2"])
def test_whole_model_torch_save_round_trip(algorithm):
    """torch.save of the model itself (not its state dict) pickles; the loaded layers own their weights."""
    import io

    model = fa.convert_to_analog(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2)), fa.AnalogConfig(algorithm=algorithm))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for i in (0, 2):
        assert loaded[i].weight._fa_layer() is loaded[i]
        assert loaded[i].analog_abs._fa_companion_of() is loaded[i]
    opt = fa.AnalogSGD(loaded.parameters(), lr=0.1, seed=0)
    loaded(torch.randn(4, 2, 4, 4)).sum().backward()
    opt.step()
    assert fa.total_pulses(loaded) > 0
