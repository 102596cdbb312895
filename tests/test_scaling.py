"""Mapping digital weights onto devices (SPEC section 7): per-output-channel digital scales."""

import contextlib
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fastanalog as fa

TAU = 0.5


def _cfg(**kw) -> fa.AnalogConfig:
    kw.setdefault("algorithm", "rl2")
    kw.setdefault("device", fa.LinearResponse(tau=TAU))
    return fa.AnalogConfig(**kw)


@contextlib.contextmanager
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _layers():
    """Linear, Conv1d and Conv2d (groups, bias) with channels inside and 10x beyond the device range."""
    torch.manual_seed(0)
    out = [
        (nn.Linear(6, 5), torch.randn(3, 6)),
        (nn.Conv1d(4, 6, 3, padding=1, groups=2), torch.randn(2, 4, 7)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), torch.randn(2, 4, 8, 8)),
        (nn.Conv2d(3, 4, 3, bias=False), torch.randn(2, 3, 6, 6)),
    ]
    for layer, _ in out:
        with torch.no_grad():
            w = layer.weight
            w.copy_(w / w.abs().amax() * 0.9 * TAU)  # every channel fits...
            w[1:3].mul_(10)  # ...but two, 10x beyond tau
    return out


@pytest.mark.parametrize("algorithm", ["asgd", "rl", "rl2"])
@pytest.mark.parametrize("scaling", ["fit", "channel", "tensor"])
def test_converted_layers_give_the_original_outputs_for_any_weights(algorithm, scaling):
    for layer, x in _layers():
        before = layer(x)
        w = layer.weight.detach().clone()
        with _no_warnings():
            analog = fa.convert_to_analog(copy.deepcopy(layer), _cfg(algorithm=algorithm, weight_scaling=scaling))
        torch.testing.assert_close(analog(x), before, rtol=1e-5, atol=1e-6)
        W, s = analog.weight.detach(), analog.analog_scale
        assert s.shape == (w.shape[0],) and s.dtype == torch.float32 and "analog_scale" in analog.state_dict()
        assert float(W.abs().max()) <= TAU
        torch.testing.assert_close(analog.digital_weight(), w, rtol=1e-6, atol=1e-7)
        reach = w.reshape(w.shape[0], -1).abs().amax(1) / TAU
        if scaling == "fit":
            assert torch.equal(s[reach <= 1], torch.ones(int((reach <= 1).sum())))
            torch.testing.assert_close(s[reach > 1], reach[reach > 1] / 0.95)
            assert torch.equal(W[reach <= 1], w[reach <= 1])  # the channels that fit are untouched
        elif scaling == "channel":
            torch.testing.assert_close(W.reshape(len(s), -1).abs().amax(1), torch.full_like(s, 0.95 * TAU))
        else:
            assert torch.equal(s, s[:1].expand_as(s))
            assert float(W.abs().max()) == pytest.approx(0.95 * TAU)


def test_asymmetric_range_uses_the_bound_of_each_sign():
    dev = fa.LinearResponse(tau_min=-0.2, tau_max=1.0)
    lin = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.9, -0.1], [0.5, -0.4], [2.0, -0.2]]))
    analog = fa.convert_to_analog(copy.deepcopy(lin), fa.AnalogConfig(algorithm="asgd", device=dev, weight_scaling_omega=0.5))
    # row 0 fits; row 1 reaches 0.4 / 0.2 = 2 of the negative bound; row 2 reaches 2.0 / 1.0 = 2 of the positive one
    torch.testing.assert_close(analog.analog_scale, torch.tensor([1.0, 4.0, 4.0]))
    scaled = analog.weight.detach()[1:]
    assert float(scaled.min()) >= -0.2 * 0.5 - 1e-6 and float(scaled.max()) <= 1.0 * 0.5 + 1e-6
    assert torch.equal(analog.weight.detach()[0], lin.weight.detach()[0])


def test_a_layer_trained_from_scratch_is_the_unscaled_layer():
    torch.manual_seed(0)
    lin = fa.AnalogLinear(16, 4, config=_cfg())
    torch.manual_seed(0)
    ref = nn.Linear(16, 4)
    assert torch.equal(lin.analog_scale, torch.ones(4)) and lin._fa_unit_scale
    assert torch.equal(lin.weight, ref.weight)
    x = torch.randn(3, 16)
    assert torch.equal(lin(x), ref(x))
    # a layer whose initialisation does not fit the device is scaled, not clipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = fa.AnalogConv2d(1, 4, 2, config=_cfg(device=fa.LinearResponse(tau=0.1)))
    assert float(small.analog_scale.max()) > 1 and float(small.weight.detach().abs().max()) <= 0.1
    digital = fa.AnalogLinear(3, 3, config=fa.AnalogConfig(algorithm="digital"))
    assert digital.analog_scale is None and "analog_scale" not in digital.state_dict()


@pytest.mark.parametrize("mixed_weight", ["transient", "stored"])
def test_gradient_is_that_of_W_in_device_units(mixed_weight):
    """y = s * (x @ (W + gamma P)^T) + b: dL/dW = s * dL/dw, the input gradient that of the digital layer."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(20)
    analog = fa.convert_to_analog(copy.deepcopy(conv), _cfg(gamma=0.3, mixed_weight=mixed_weight))
    with torch.no_grad():
        analog.analog_residual.copy_(torch.randn_like(analog.analog_residual) * 0.05)
    analog.refresh_weight()
    s = analog.analog_scale
    assert float(s.min()) > 1
    twin = copy.deepcopy(conv)
    with torch.no_grad():
        twin.weight.copy_(analog.digital_weight())
    xa = torch.randn(2, 2, 5, 5, requires_grad=True)
    xd = xa.detach().clone().requires_grad_()
    out, ref = analog(xa), twin(xd)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(xa.grad, xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(analog.weight.grad, twin.weight.grad * s.view(-1, 1, 1, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(analog.bias.grad, twin.bias.grad)


def test_double_backward_through_a_scaled_layer():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    with torch.no_grad():
        lin.weight.mul_(30)
    analog = fa.convert_to_analog(copy.deepcopy(lin), _cfg(gamma=0.3))
    with torch.no_grad():
        analog.analog_residual.copy_(torch.randn_like(analog.analog_residual) * 0.05)
    twin = copy.deepcopy(lin)
    with torch.no_grad():
        twin.weight.copy_(analog.digital_weight())
    x = torch.randn(3, 6, requires_grad=True)
    (gx,) = torch.autograd.grad(analog(x).square().sum(), x, create_graph=True)
    gx.square().sum().backward()
    xd = x.detach().clone().requires_grad_()
    (gd,) = torch.autograd.grad(twin(xd).square().sum(), xd, create_graph=True)
    gd.square().sum().backward()
    torch.testing.assert_close(analog.weight.grad, twin.weight.grad * analog.analog_scale.view(-1, 1), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_of_a_scaled_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.mul_(10)
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(x)
    analog = fa.convert_to_analog(copy.deepcopy(model), _cfg())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = analog(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), before.float(), rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert analog[0].weight.grad.dtype == torch.float32


def _trained(model: nn.Module, steps: int, opt_state=None, start: int = 0):
    opt = fa.AnalogSGD(model.parameters(), lr=0.1, momentum=0.5, seed=7)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    for k in range(start, start + steps):
        g = torch.Generator().manual_seed(k)
        x, y = torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def _scaled_model(scaling="fit"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    with torch.no_grad():
        model[0].weight[:2].mul_(10)
        model[3].weight.mul_(20)
    return fa.convert_to_analog(model, _cfg(algorithm="rl2", gamma=0.2, transfer_lr=0.5, weight_scaling=scaling))


@pytest.mark.parametrize("scaling", ["fit", "channel"])
def test_state_dict_carries_the_scale_and_resume_is_exact(scaling):
    straight = _scaled_model(scaling)
    _trained(straight, 4)
    first = _scaled_model(scaling)
    opt = _trained(first, 2)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = _scaled_model("tensor")  # other scales: loading restores the saved ones exactly
    resumed.load_state_dict(ckpt["model"])
    for k in ("0.analog_scale", "3.analog_scale"):
        assert torch.equal(resumed.state_dict()[k], first.state_dict()[k])
    _trained(resumed, 2, ckpt["opt"], start=2)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert fa.total_pulses(resumed) > 0


def test_state_dicts_without_a_scale_load_with_scale_one():
    lin = fa.AnalogLinear(4, 3, config=_cfg())
    old = {k: v.clone() for k, v in lin.state_dict().items() if k != "analog_scale"}
    other = fa.convert_to_analog(nn.Linear(4, 3), _cfg())
    with torch.no_grad():
        other.analog_scale.fill_(3.0)
    other.load_state_dict(old)
    assert torch.equal(other.analog_scale, torch.ones(3)) and torch.equal(other.weight, lin.weight)
    assert other._fa_unit_scale


def test_loading_a_digital_checkpoint_chooses_the_scales():
    torch.manual_seed(0)
    digital = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    with torch.no_grad():
        digital[0].weight.mul_(10)
        digital[3].weight[0].mul_(100)
    torch.manual_seed(1)
    analog = fa.convert_to_analog(nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)), _cfg())
    with torch.no_grad():
        analog[3].analog_residual.fill_(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analog.load_state_dict(digital.state_dict())
    x = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(analog(x), digital(x), rtol=1e-5, atol=1e-5)
    assert float(analog[3].analog_scale[0]) > 1 and torch.equal(analog[3].analog_scale[1:], torch.ones(2))
    assert torch.equal(analog[3].analog_residual, torch.zeros_like(analog[3].analog_residual))
    assert float(analog[0].weight.detach().abs().max()) <= TAU


def test_weights_out_of_range_later_are_named():
    model = fa.convert_to_analog(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), _cfg(algorithm="asgd"))
    x = torch.randn(3, 4)
    # an analog state dict whose W lies outside the range
    sd = copy.deepcopy(model.state_dict())
    sd["2.weight"].fill_(2 * TAU)
    with pytest.warns(UserWarning, match=r"^2: 8 of 8 weights lie outside the device range"):
        model.load_state_dict(sd)
    model.load_state_dict(_scaled_state(model))
    # a plain torch optimizer moves W beyond the range: the next forward names the layer
    opt = torch.optim.SGD(model.parameters(), lr=100.0)
    model(x).square().sum().backward()
    opt.step()
    with pytest.warns(UserWarning) as record:
        model(x)
    msgs = sorted(str(r.message) for r in record)
    assert len(msgs) == 2 and msgs[0].startswith("0: ") and msgs[1].startswith("2: ")
    assert all("outside the device range" in m and "W was changed outside AnalogSGD" in m for m in msgs)
    # by hand
    with torch.no_grad():
        model[2].weight.fill_(0.1)
        model[0].weight.fill_(0.1)
    with _no_warnings():
        model(x)
    with torch.no_grad():
        model[2].weight[0, 0] = 5.0
    with pytest.warns(UserWarning, match=r"^2: 1 of 8 weights"):
        model(x)
    with _no_warnings():
        model(x)  # said once, not at every forward


def _scaled_state(model):
    return {k: (v.clamp(-TAU, TAU) if k.endswith("weight") else v) for k, v in model.state_dict().items()}


def test_an_analog_sgd_step_raises_no_range_warning():
    model = _scaled_model()
    with _no_warnings():
        _trained(model, 3)
        model(torch.randn(1, 2, 6, 6))


def test_set_digital_weight_maps_and_digital_weight_reads_back():
    lin = fa.AnalogLinear(3, 2, config=_cfg(algorithm="rl"))
    w = torch.tensor([[4.0, -1.0, 0.0], [0.1, 0.2, -0.3]])
    lin.set_digital_weight(w)
    torch.testing.assert_close(lin.digital_weight(), w)
    torch.testing.assert_close(lin.analog_scale, torch.tensor([4.0 / (0.95 * TAU), 1.0]))
    x = torch.randn(5, 3)
    torch.testing.assert_close(lin(x), x @ w.T + lin.bias)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weight_scaling="row"), "unknown weight_scaling"),
        (dict(weight_scaling_omega=1.0), r"weight_scaling_omega must be a number in \(0, 1\)"),
        (dict(weight_scaling_omega=0), "weight_scaling_omega"),
        (dict(weight_scaling_omega=float("nan")), "weight_scaling_omega"),
        (dict(weight_scaling_omega="0.9"), "weight_scaling_omega"),
        (dict(weight_scaling_omega=True), "weight_scaling_omega"),
    ],
)
def test_bad_scaling_configs_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fa.AnalogConfig(**kwargs)


def test_compiled_forward_and_backward_of_a_scaled_model():
    model = _scaled_model()
    eager = copy.deepcopy(model)
    x = torch.randn(4, 2, 6, 6)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(x)
        out.square().sum().backward()
    finally:
        torch._dynamo.reset()
    ref = eager(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenetv3_small_100", "resnet18"])
def test_timm_models_with_weights_far_beyond_the_range_keep_their_outputs(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(10)  # far beyond tau = 0.5; BatchNorm in eval keeps the activations finite-ish
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analog = fa.convert_to_analog(copy.deepcopy(model), _cfg(algorithm="asgd"))
    assert sum(1 for _ in fa.analog_layers(analog)) > 10
    with torch.no_grad():
        out = analog(x)
    scale = before.abs().max()
    torch.testing.assert_close(out / scale, before / scale, rtol=1e-4, atol=1e-4)


def test_compiled_train_step_of_a_scaled_model_equals_eager(monkeypatch):
    """torch.compile(fullgraph=True) of forward, backward and AnalogSGD.step with scales != 1, as tests/test_compile.py does.

    Float32 per-sample sums: with bfloat16 factors (the default on CPUs with AMX) an ulp of
    difference between inductor's and eager's output gradients can flip a factor's rounding,
    and so a pair; the README says so."""
    monkeypatch.setenv("FASTANALOG_SAMPLE_DTYPE", "float32")
    model, eager = _scaled_model(), _scaled_model()
    assert not model[0]._fa_unit_scale and not model[3]._fa_unit_scale
    opt = fa.AnalogSGD(model.parameters(), lr=0.1, seed=5)
    eager_opt = fa.AnalogSGD(eager.parameters(), lr=0.1, seed=5)

    def step_of(m, o):
        def step(x, y):
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            o.step()
            return loss.detach()

        return step

    torch._dynamo.reset()
    try:
        compiled = torch.compile(step_of(model, opt), fullgraph=True)
        eager_step = step_of(eager, eager_opt)
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            for k in range(3):
                g = torch.Generator().manual_seed(k)
                x, y = torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
                opt.zero_grad()
                eager_opt.zero_grad()
                compiled(x, y)
                eager_step(x, y)
    finally:
        torch._dynamo.reset()
    a, b = model.state_dict(), eager.state_dict()
    for k in a:
        if k.split(".")[-1] in ("weight", "analog_scale", "analog_residual", "analog_buffer", "analog_pulses"):
            assert torch.equal(a[k], b[k]), k
    assert fa.total_pulses(model) > 0
