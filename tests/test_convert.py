"""convert_to_analog keeps shared modules shared and tied parameters tied."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fastanalog as fa

CFG = fa.AnalogConfig(algorithm="rl2", gamma=0.2)


def _train(model: nn.Module, x: torch.Tensor, steps: int = 2) -> fa.AnalogSGD:
    opt = fa.AnalogSGD(model.parameters(), lr=0.5, seed=1)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    return opt


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a  # one module, two names

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_shared_module_becomes_one_shared_analog_module():
    torch.manual_seed(0)
    model = Twice()
    x = torch.randn(4, 8)
    before = model(x)
    fa.convert_to_analog(model, CFG)
    assert isinstance(model.a, fa.AnalogLinear) and model.b is model.a
    assert len(list(model.parameters())) == 3  # weight, bias and the per-sample companion analog_abs
    torch.testing.assert_close(model(x), before)
    assert [name for name, _ in fa.analog_layers(model)] == ["a"]
    assert model.a._fa_name == "a, b"
    _train(model, x)
    assert model.b is model.a and fa.total_pulses(model) == int(model.a.analog_pulses.sum()) > 0


class TiedLinears(nn.Module):
    def __init__(self, tie_bias: bool = False):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        if tie_bias:
            self.b.bias = self.a.bias

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("tie_bias", [False, True])
def test_tied_weights_of_two_layers_stay_one_analog_array(tie_bias):
    torch.manual_seed(0)
    model = TiedLinears(tie_bias)
    with torch.no_grad():
        model.a.weight.mul_(10)  # beyond tau = 1: the shared weight is scaled once, for both
    x = torch.randn(4, 8)
    before = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fa.convert_to_analog(model, CFG)
    a, b = model.a, model.b
    assert isinstance(a, fa.AnalogLinear) and isinstance(b, fa.AnalogLinear) and a is not b
    assert b.weight is a.weight
    for name in ("analog_scale", "analog_residual", "analog_buffer", "analog_pulses", "analog_last_pulses", "analog_abs"):
        assert getattr(b, name) is getattr(a, name), name
    assert (b.bias is a.bias) == tie_bias
    assert len(list(model.parameters())) == (3 if tie_bias else 4)  # one weight, one companion analog_abs
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert [name for name, _ in fa.analog_layers(model)] == ["a"]
    _train(model, x)
    assert b.weight is a.weight and b.analog_residual is a.analog_residual
    assert fa.total_pulses(model) == int(a.analog_pulses.sum()) > 0
    # deepcopy and a state dict round trip keep the tie
    twin = copy.deepcopy(model)
    assert twin.b.weight is twin.a.weight and twin.b.analog_residual is twin.a.analog_residual
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = fa.convert_to_analog(TiedLinears(tie_bias), CFG)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.b.weight is fresh.a.weight
    torch.testing.assert_close(fresh(x), model(x))


class TiedHead(nn.Module):
    """A language-model-style head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        return self.head(torch.relu(self.mid(self.embed(idx))))


def test_a_head_tied_to_an_embedding_stays_digital_and_tied_with_one_warning():
    torch.manual_seed(0)
    model = TiedHead()
    with torch.no_grad():
        model.embed.weight.mul_(3)  # beyond tau = 1: a clipped analog copy would change the outputs
    idx = torch.randint(0, 16, (5,))
    before = model(idx)
    with pytest.warns(UserWarning) as record:
        fa.convert_to_analog(model, CFG)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "head.weight" in msg and "embed.weight" in msg and "Embedding" in msg
    assert type(model.head) is nn.Linear and model.head.weight is model.embed.weight
    assert isinstance(model.mid, fa.AnalogLinear)
    torch.testing.assert_close(model(idx), before)
    opt = fa.AnalogSGD(model.parameters(), lr=0.1, seed=0)
    model(idx).sum().backward()
    opt.step()
    assert model.head.weight is model.embed.weight


def test_a_weight_tied_to_an_excluded_layer_stays_digital_with_a_warning():
    model = TiedLinears()
    with pytest.warns(UserWarning, match=r"a\.weight \(Linear\), b\.weight \(Linear\)"):
        fa.convert_to_analog(model, CFG, exclude=["b"])
    assert type(model.a) is nn.Linear and type(model.b) is nn.Linear and model.b.weight is model.a.weight


def test_tied_layers_of_different_kinds_stay_digital():
    class SameConv(nn.Conv2d):  # a subclass left digital: its weight cannot be an analog array
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))

    model = nn.Sequential(nn.Conv2d(2, 2, 3), SameConv(2, 2, 3))
    model[1].weight = model[0].weight
    with pytest.warns(UserWarning) as record:
        fa.convert_to_analog(model, CFG)
    msgs = " | ".join(str(r.message) for r in record)
    assert "0.weight (Conv2d), 1.weight (SameConv)" in msgs
    assert type(model[0]) is nn.Conv2d and model[1].weight is model[0].weight


def test_digital_algorithm_keeps_every_tie():
    model = TiedHead()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fa.convert_to_analog(model, fa.AnalogConfig(algorithm="digital"))
    assert isinstance(model.head, fa.AnalogLinear) and model.head.weight is model.embed.weight
    tied = fa.convert_to_analog(TiedLinears(), fa.AnalogConfig(algorithm="digital"))
    assert tied.b.weight is tied.a.weight


def test_a_bias_tied_to_a_digital_module_stays_tied():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model[1].bias = model[0].bias
    fa.convert_to_analog(model, CFG)
    assert isinstance(model[0], fa.AnalogLinear) and model[1].bias is model[0].bias


def test_timm_model_with_tied_weights_if_any():
    timm = pytest.importorskip("timm")
    # timm's vision models tie no weights; build one whose head shares a block's projection.
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=192, img_size=32, patch_size=8, depth=2)
    model.head.weight = model.blocks[1].attn.proj.weight
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fa.convert_to_analog(model, CFG)
    assert isinstance(model.head, fa.AnalogLinear) and model.head.weight is model.blocks[1].attn.proj.weight
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
