"""The eager step's plan (fastanalog.step_plan): the same numbers as the general path, and made anew when the model changes."""

import pytest
import torch
from torch import nn

import fastanalog as fa
from fastanalog import step_plan
from fastanalog.nn.layers import AnalogLayerMixin

ALGORITHMS = ["asgd", "rl", "rl2"]


def _config(algorithm: str, **options) -> fa.AnalogConfig:
    device = fa.PowerResponse(tau=0.6, gamma=0.5, dw_min=0.002, d2d_std=0.1, c2c_std=0.05)
    return fa.AnalogConfig(algorithm=algorithm, device=device, gamma=0.1, read_noise=0.01, **options)


def _model(config: fa.AnalogConfig) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 10), nn.Linear(10, 4)
    )
    return fa.convert_to_analog(m, config)


def _snapshot(model: nn.Module) -> dict:
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out["pulses"] = torch.tensor(fa.total_pulses(model))
    return out


def _steps(model, opt, steps: int, start: int = 0, between=None) -> None:
    for k in range(start, start + steps):
        g = torch.Generator().manual_seed(k)
        x = torch.randn(5, 3, 6, 6, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        if between is not None:
            between(model, opt, k)


def _general(monkeypatch) -> None:
    """Make AnalogSGD take the general path (no plan) from now on."""
    monkeypatch.setattr(fa.AnalogSGD, "_step_plan", lambda self: None)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _count_fast(monkeypatch) -> list:
    """Record whether each fast_launch call served its group (True) or handed it back (False)."""
    calls = []
    real = step_plan.fast_launch

    def spy(*args):
        launch = real(*args)
        calls.append(launch is not None)
        return launch

    monkeypatch.setattr("fastanalog.optim.fast_launch", spy)
    return calls


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize(
    "options", [{}, {"update": "batch"}, {"update": "batch", "mixed_weight": "stored"}], ids=["per-sample", "batch", "stored"]
)
@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.01)])
def test_planned_step_gives_the_general_path_bit_for_bit(monkeypatch, algorithm, options, momentum, weight_decay):
    if options.get("mixed_weight") == "stored" and algorithm == "asgd":
        pytest.skip("asgd has no mixed weight")
    config = _config(algorithm, **options)
    planned = _model(config)
    opt = fa.AnalogSGD(planned.parameters(), lr=0.3, momentum=momentum, weight_decay=weight_decay, seed=5)
    calls = _count_fast(monkeypatch)
    _steps(planned, opt, 4)
    assert calls == [True] * 4  # the planned call served every step
    with monkeypatch.context() as m:
        _general(m)
        general = _model(config)
        opt_g = fa.AnalogSGD(general.parameters(), lr=0.3, momentum=momentum, weight_decay=weight_decay, seed=5)
        _steps(general, opt_g, 4)
    assert len(calls) == 4  # the general path made no planned call
    assert fa.total_pulses(planned) > 0
    _assert_same(_snapshot(planned), _snapshot(general))


def _edits(model, opt, k):
    """Between steps: what users do to a model under an optimizer, one thing a step."""
    analog = [m for m in model.modules() if isinstance(m, AnalogLayerMixin)]
    if k == 0:  # new data under the same Parameter
        analog[1].weight.data = analog[1].weight.data.clone() * 0.5
    elif k == 1:  # another config object, another algorithm's rule for one layer (its arrays kept)
        analog[2].analog_config = fa.AnalogConfig(algorithm="asgd", device=analog[2].analog_config.device)
    elif k == 2:  # a new param group
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "lr": 0.1})
    elif k == 3:  # a gradient missing from one analog weight
        analog[0].weight.requires_grad_(False)
    elif k == 4:
        analog[0].weight.requires_grad_(True)
        opt.param_groups[0]["lr"] = 0.05


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_plan_follows_edits_of_the_model_and_groups(monkeypatch, algorithm):
    config = _config(algorithm, update="batch")
    planned = _model(config)
    opt = fa.AnalogSGD(planned.parameters(), lr=0.3, seed=9)
    _steps(planned, opt, 6, between=_edits)
    with monkeypatch.context() as m:
        _general(m)
        general = _model(config)
        opt_g = fa.AnalogSGD(general.parameters(), lr=0.3, seed=9)
        _steps(general, opt_g, 6, between=_edits)
    _assert_same(_snapshot(planned), _snapshot(general))


def test_plan_is_made_anew_only_when_something_changed():
    model = _model(_config("rl2", update="batch"))
    opt = fa.AnalogSGD(model.parameters(), lr=0.3, seed=1)
    _steps(model, opt, 2)
    plan = opt._plan
    _steps(model, opt, 2, start=2)
    assert opt._plan is plan
    layer = model[4]
    layer.analog_config = _config("rl2", update="batch")  # equal, but another object
    _steps(model, opt, 1, start=4)
    assert opt._plan is not plan
    plan = opt._plan
    old = layer.weight
    layer.weight = nn.Parameter(old.detach().clone())  # the optimizer's parameter is no longer the layer's weight
    _steps(model, opt, 1, start=5)
    assert opt._plan is not plan
    assert all(p is not old for p, *_ in (e for entries in opt._plan.analog for e in entries))


def test_plan_holds_no_layer_alive():
    import gc
    import weakref

    model = _model(_config("rl", update="batch"))
    opt = fa.AnalogSGD(model.parameters(), lr=0.3, seed=1)
    _steps(model, opt, 1)
    ref = weakref.ref(model[4])
    del model
    gc.collect()
    assert ref() is None
    assert opt._plan is not None


def test_mixed_configs_and_channels_last_take_the_general_path(monkeypatch):
    calls = _count_fast(monkeypatch)
    model = _model(_config("rl2", update="batch"))
    model[5].analog_config = _config("asgd", update="batch")  # two configs in one group
    opt = fa.AnalogSGD(model.parameters(), lr=0.3, seed=3)
    _steps(model, opt, 1)
    assert calls == []
    model = _model(_config("asgd", update="batch")).to(memory_format=torch.channels_last)
    opt = fa.AnalogSGD(model.parameters(), lr=0.3, seed=3)
    _steps(model, opt, 1)
    assert calls == [False]  # the conv's W is not contiguous: handed back before anything was written
    with monkeypatch.context() as m:
        _general(m)
        general = _model(_config("asgd", update="batch")).to(memory_format=torch.channels_last)
        opt_g = fa.AnalogSGD(general.parameters(), lr=0.3, seed=3)
        _steps(general, opt_g, 1)
    _assert_same(_snapshot(model), _snapshot(general))


def test_misshapen_array_is_named_as_before():
    model = _model(_config("rl2", update="batch"))
    opt = fa.AnalogSGD(model.parameters(), lr=0.3, seed=3)
    _steps(model, opt, 1)
    layer = model[5]
    before = layer.weight.detach().clone()
    layer.analog_residual = layer.analog_residual.detach().t().contiguous()  # W's elements, (in, out) instead of (out, in)
    with pytest.raises(ValueError, match="P \\(residual\\) has shape"):
        _steps(model, opt, 1, start=1)
    assert torch.equal(layer.weight.detach(), before)


class _Cast(nn.Module):
    """Casts its input to the dtype of ``like``'s weight (or to float32 when ``like`` is None)."""

    def __init__(self, like=None):
        super().__init__()
        self.like = [like]  # not a submodule

    def forward(self, x):
        return x.to(torch.float32 if self.like[0] is None else self.like[0].weight.dtype)


def test_layer_cast_after_the_plan_splits_the_call(monkeypatch):
    """One layer cast to bfloat16 after the plan was made: the general path serves the group (two kernel calls)."""

    def run(general: bool):
        torch.manual_seed(0)
        m = fa.convert_to_analog(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3)), _config("rl2", update="batch"))
        m = nn.Sequential(m[0], _Cast(m[1]), m[1], _Cast())
        opt = fa.AnalogSGD(m.parameters(), lr=0.3, seed=2)
        for k in range(3):
            if k == 1:
                m[2].to(torch.bfloat16)
            opt.zero_grad()
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(k))
            m(x).pow(2).mean().backward()
            opt.step()
        return m

    calls = _count_fast(monkeypatch)
    planned = run(False)
    assert calls == [True, False, False]
    with monkeypatch.context() as m:
        _general(m)
        general = run(True)
    assert planned[2].weight.dtype == torch.bfloat16
    _assert_same(_snapshot(planned), _snapshot(general))


def test_unplanned_optimizer_takes_the_general_path(monkeypatch):
    """``_planned = False`` (what `fastanalog bench step` times the plan against): no plan, no planned call, same numbers."""
    calls = _count_fast(monkeypatch)
    config = _config("rl2", update="batch")
    unplanned = _model(config)
    opt = fa.AnalogSGD(unplanned.parameters(), lr=0.3, seed=4)
    opt._planned = False
    _steps(unplanned, opt, 2)
    assert calls == [] and getattr(opt, "_plan", None) is None
    planned = _model(config)
    _steps(planned, fa.AnalogSGD(planned.parameters(), lr=0.3, seed=4), 2)
    assert calls == [True, True]
    _assert_same(_snapshot(unplanned), _snapshot(planned))
