"""AnalogSGD: routing, exact resume, schedulers, non-finite gradients, bad input."""

import copy
import warnings

import pytest
import torch
from torch import nn

import fastanalog as fa

ALGORITHMS = ["digital", "asgd", "rl", "rl2"]


def _model(algorithm: str, seed: int = 0, **cfg) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    device = fa.PowerResponse(tau=0.6, gamma=0.5, dw_min=0.002, d2d_std=0.1, c2c_std=0.05)
    return fa.convert_to_analog(m, fa.AnalogConfig(algorithm=algorithm, device=device, read_noise=0.01, **cfg))


def _train(model, opt, steps: int, start: int = 0):
    for k in range(start, start + steps):
        g = torch.Generator().manual_seed(k)
        x = torch.randn(8, 12, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _arrays(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resume_from_state_dicts_continues_the_exact_trajectory(algorithm):
    full = _model(algorithm)
    opt = fa.AnalogSGD(full.parameters(), lr=0.2, momentum=0.5, seed=42)
    _train(full, opt, 6)

    first = _model(algorithm)
    opt1 = fa.AnalogSGD(first.parameters(), lr=0.2, momentum=0.5, seed=42)
    _train(first, opt1, 3)
    model_sd, opt_sd = copy.deepcopy(first.state_dict()), copy.deepcopy(opt1.state_dict())

    resumed = _model(algorithm, seed=123)  # different init: everything must come from the checkpoint
    opt2 = fa.AnalogSGD(resumed.parameters(), lr=0.2, momentum=0.5, seed=7)
    resumed.load_state_dict(model_sd)
    opt2.load_state_dict(opt_sd)
    _train(resumed, opt2, 3, start=3)

    a, b = _arrays(full), _arrays(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if algorithm != "digital":
        assert fa.total_pulses(full) > 0


def test_same_seed_same_result_other_seed_other_result():
    runs = []
    for seed in (1, 1, 2):
        m = _model("rl2")
        _train(m, fa.AnalogSGD(m.parameters(), lr=0.2, seed=seed), 3)
        runs.append(m[0].weight.detach().clone())
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_seed_none_follows_torch_manual_seed():
    torch.manual_seed(5)
    a = fa.AnalogSGD([nn.Parameter(torch.zeros(1))], lr=0.1).seed
    torch.manual_seed(5)
    b = fa.AnalogSGD([nn.Parameter(torch.zeros(1))], lr=0.1).seed
    assert a == b


def test_digital_parameters_follow_torch_sgd_exactly():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))
    ours = copy.deepcopy(plain)
    opt_ref = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt = fa.AnalogSGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for k in range(3):
        x = torch.randn(6, 5, generator=torch.Generator().manual_seed(k))
        for m, o in ((plain, opt_ref), (ours, opt)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for p, q in zip(plain.parameters(), ours.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("algorithm", ["asgd", "rl", "rl2"])
@pytest.mark.parametrize("mixed_weight", ["transient", "stored"])
def test_step_updates_the_arrays_behind_weight_and_counts_pulses(algorithm, mixed_weight):
    m = _model(algorithm, mixed_weight=mixed_weight)
    opt = fa.AnalogSGD(m.parameters(), lr=0.5, seed=3)
    _train(m, opt, 2)
    layer = m[0]
    st = layer.analog_state()
    assert st["main"].data_ptr() == layer.weight.data_ptr()
    if algorithm == "asgd":
        assert st["residual"] is None and layer.analog_mixed is None
    else:
        torch.testing.assert_close(layer.forward_weight(), st["main"] + 0.1 * st["residual"], rtol=0, atol=1e-7)
        assert (st["buffer"] is not None) == (algorithm == "rl2")
        if mixed_weight == "stored":  # the kernels wrote it with the update
            assert torch.equal(layer.analog_mixed, layer.forward_weight())
        else:
            assert layer.analog_mixed is None
    assert int(layer.analog_last_pulses.sum()) > 0
    assert int(layer.analog_pulses.sum()) >= int(layer.analog_last_pulses.sum())


@pytest.mark.parametrize("algorithm", ["asgd", "rl", "rl2"])
@pytest.mark.parametrize("update", ["per-sample", "batch"])
def test_pulse_counters_are_each_steps_totals_by_array(algorithm, update, monkeypatch):
    """The kernels add each layer's pulses into its counters: [W, P] of the last step, and their
    running sum; the same numbers whether the compiled kernels or the reference serve the step."""
    from fastanalog.ops.reference import pulse_total

    def run(backend):
        monkeypatch.setenv("FASTANALOG_BACKEND", backend)
        m = _model(algorithm, transfer_every=2, update=update)
        opt = fa.AnalogSGD(m.parameters(), lr=0.5, seed=3)
        lasts = []
        for k in range(3):
            _train(m, opt, 1, start=k)
            lasts.append([layer.analog_last_pulses.clone() for _, layer in fa.analog_layers(m)])
        return m, lasts

    for backend in ("cpp", "reference"):
        if backend == "cpp" and not fa.ops.dispatch.backend_available("cpp"):
            continue
        m, lasts = run(backend)
        layers = [layer for _, layer in fa.analog_layers(m)]
        for i, layer in enumerate(layers):
            per_step = torch.stack([step[i] for step in lasts])
            assert torch.equal(layer.analog_pulses, per_step.sum(0))
            assert int(per_step.sum()) > 0
            if algorithm == "asgd":
                assert int(per_step[:, 1].abs().sum()) == 0  # no P
            elif algorithm == "rl":
                assert int(per_step[0, 0]) == 0 and int(per_step[2, 0]) == 0  # W written on step 2 only
        if backend == "cpp":
            compiled = lasts
        else:
            reference = lasts
    if fa.ops.dispatch.backend_available("cpp"):
        for a, b in zip(compiled, reference):
            for x, y in zip(a, b):
                assert torch.equal(x, y), (x, y)
    # One step by hand: the counters hold the StepPulses totals, W's at 0 and P's at 1.
    monkeypatch.delenv("FASTANALOG_BACKEND")
    m = _model(algorithm)
    layer = m[0]
    state = {k: (v.clone() if v is not None else None) for k, v in layer.analog_state().items()}
    g = torch.randn_like(layer.weight) * 0.01
    counters = torch.zeros(2, dtype=torch.int64)
    item = fa.ops.dispatch.StepItem(layer.analog_state(), None, g, layer.analog_config, 77, 0, None, counters)
    fa.ops.dispatch.analog_step_group([item], lr=0.5, step=1, totals=True)
    ref = fa.ops.dispatch.analog_step(state, None, g, lr=0.5, config=layer.analog_config, key=77, tensor_id=0, step=1)
    first, main = int(pulse_total(ref.first, ref.first_pairs)), int(ref.main_total()) if ref.main is not None else 0
    assert counters.tolist() == ([main, first] if algorithm != "asgd" else [first, 0])
    assert first > 0


def test_lr_is_read_from_the_param_group_so_schedulers_work():
    m = _model("asgd")
    opt = fa.AnalogSGD(m.parameters(), lr=0.5, seed=3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0)  # lr -> 0
    before = m[0].weight.detach().clone()
    _train(m, opt, 1)
    assert torch.equal(before, m[0].weight.detach())  # lr 0: no pulse
    sched.last_epoch = -1
    opt.param_groups[0]["lr"] = 0.5
    _train(m, opt, 1)
    assert not torch.equal(before, m[0].weight.detach())


@pytest.mark.parametrize("algorithm", ["asgd", "rl2"])
def test_nonfinite_gradient_raises_and_touches_nothing(algorithm):
    m = _model(algorithm)
    opt = fa.AnalogSGD(m.parameters(), lr=0.5, seed=3)
    _train(m, opt, 1)
    before = _arrays(m)
    opt.zero_grad()
    m(torch.randn(4, 12)).sum().backward()
    m[2].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="nonfinite='skip'"):
        opt.step()
    after = _arrays(m)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert opt.step_count == 1

    skip = fa.AnalogSGD(m.parameters(), lr=0.5, seed=3, nonfinite="skip")
    skip.step()
    assert skip.skipped_steps == 1 and skip.step_count == 0
    after = _arrays(m)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_huge_finite_gradients_are_not_mistaken_for_nonfinite():
    # The fused check's 2-norm of these overflows float32; the elements are finite, so the step runs.
    m = _model("rl2")
    opt = fa.AnalogSGD(m.parameters(), lr=1e-40, seed=3)
    for p in m.parameters():
        p.grad = torch.full_like(p, 1e30)
    opt.step()
    assert opt.step_count == 1 and opt.skipped_steps == 0
    m[0].bias.grad[0] = float("inf")
    with pytest.raises(FloatingPointError):
        opt.step()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=0.0), "lr must be"),
        (dict(lr=-1.0), "lr must be"),
        (dict(lr=0.1, momentum=1.5), "momentum"),
        (dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
        (dict(lr=0.1, seed=-1), "seed"),
        (dict(lr=0.1, nonfinite="ignore"), "nonfinite"),
    ],
)
def test_bad_optimizer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fa.AnalogSGD([nn.Parameter(torch.zeros(2))], **kwargs)


def test_loading_a_plain_sgd_state_dict_is_refused():
    p = nn.Parameter(torch.zeros(2))
    sd = torch.optim.SGD([p], lr=0.1).state_dict()
    with pytest.raises(ValueError, match="not saved by AnalogSGD"):
        fa.AnalogSGD([p], lr=0.1).load_state_dict(sd)


def test_channels_last_conv_gives_the_same_update_as_contiguous():
    def run(channels_last: bool):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
        m = fa.convert_to_analog(m, fa.AnalogConfig(algorithm="rl2", device=fa.LinearResponse(tau=1.0, dw_min=0.002)))
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
            assert not m[0].weight.is_contiguous() and not m[0].analog_residual.is_contiguous()
        opt = fa.AnalogSGD(m.parameters(), lr=0.5, seed=1)
        gen = torch.Generator().manual_seed(0)
        for p in m.parameters():  # identical gradients (conv backward sums in a layout-dependent order)
            p.grad = torch.randn(p.shape, generator=gen).to(memory_format=torch.channels_last if p.dim() == 4 and channels_last else torch.contiguous_format)
        opt.step()
        return {k: v.contiguous() for k, v in m.state_dict().items()}

    a, b = run(False), run(True)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert int(a["0.analog_last_pulses"].sum()) > 0


@pytest.mark.parametrize("algorithm", ["asgd", "rl"])
def test_channels_last_weights_are_updated_like_contiguous_ones(algorithm):
    """asgd writes W through the forward weight itself: a strided weight must get the update too."""

    def run(channels_last: bool):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
        m = fa.convert_to_analog(m, fa.AnalogConfig(algorithm=algorithm, device=fa.LinearResponse(tau=1.0, dw_min=0.002)))
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
            assert not m[0].weight.is_contiguous()
        opt = fa.AnalogSGD(m.parameters(), lr=0.5, seed=1)
        gen = torch.Generator().manual_seed(0)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        before = m[0].weight.detach().clone()
        opt.step()
        assert not torch.equal(before, m[0].weight.detach())
        return {k: v.contiguous() for k, v in m.state_dict().items()}

    a, b = run(False), run(True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_grouped_update_equals_one_tensor_at_a_time():
    """analog_step_group over mixed configs, dtypes and a strided tensor gives each tensor what analog_step gives it."""
    from fastanalog.ops import philox
    from fastanalog.ops.dispatch import StepItem, analog_step, analog_step_group

    device = fa.PowerResponse(tau=0.6, gamma=0.5, dw_min=0.01, d2d_std=0.1, c2c_std=0.1)
    configs = [fa.AnalogConfig(algorithm="rl2", device=device, read_noise=0.01), fa.AnalogConfig(algorithm="asgd", device=device)]
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (4, 2, 3, 3), (7,), (2, 9), (6, 1)]
    tensors = []
    for i, shape in enumerate(shapes):
        config = configs[i % 2]
        dtype = torch.bfloat16 if i == 3 else torch.float32
        arrays = {n: (0.2 * torch.randn(shape, generator=gen)).to(dtype) for n in ("main", "residual", "buffer", "weight")}
        if len(shape) == 4:  # a channels_last conv weight: updated through contiguous copies
            arrays = {n: a.to(memory_format=torch.channels_last) for n, a in arrays.items()}
        tensors.append((arrays, torch.randn(shape, generator=gen).to(dtype), config))

    def items():
        """Fresh copies of the tensors' arrays (for asgd W is the forward weight and there is no P, H)."""
        out = []
        for tid, (arrays, grad, config) in enumerate(tensors):
            a = {n: t.clone() for n, t in arrays.items()}
            if config.algorithm == "asgd":
                a.update(residual=None, buffer=None, weight=None)
            elif tid == 2:  # no stored mixed weight: launched apart from the others
                a.update(weight=None)
            state = {n: a[n] for n in ("main", "residual", "buffer")}
            out.append(StepItem(state, a["weight"], grad, config, philox.step_key(3, 1, tid), tid))
        return out

    alone, grouped = items(), items()
    want = [analog_step(i.arrays, i.weight, i.grad, lr=0.3, config=i.config, key=i.key, tensor_id=i.tensor_id, step=1) for i in alone]
    got = analog_step_group(grouped, lr=0.3, step=1)
    for a, b, w, g in zip(alone, grouped, want, got):
        assert torch.equal(w.first, g.first) and (w.main is None) == (g.main is None)
        assert w.main is None or torch.equal(w.main, g.main)
        assert (a.weight is None and b.weight is None) or torch.equal(a.weight, b.weight)
        for n in a.arrays:
            assert (a.arrays[n] is None and b.arrays[n] is None) or torch.equal(a.arrays[n], b.arrays[n]), n
    assert int(sum(g.first.abs().sum() for g in got)) > 0


def test_step_counters_live_in_a_tensor_and_round_trip():
    """step_count and skipped_steps (the compiled step counts in a tensor) read, set and checkpoint as ints."""
    m = _model("asgd")
    opt = fa.AnalogSGD(m.parameters(), lr=0.2, seed=3, nonfinite="skip")
    _train(m, opt, 2)
    opt.zero_grad()
    m(torch.randn(2, 12)).sum().backward()
    m[0].weight.grad[0, 0] = float("inf")
    opt.step()
    assert (opt.step_count, opt.skipped_steps) == (2, 1)
    other = fa.AnalogSGD(m.parameters(), lr=0.2, seed=4)
    other.load_state_dict(opt.state_dict())
    assert (other.step_count, other.skipped_steps, other.seed) == (2, 1, 3)
    assert isinstance(other.step_count, int) and isinstance(other.skipped_steps, int)


def test_a_float64_model_trains_on_the_reference_with_one_notice(recwarn):
    """The compiled kernels store float32/bf16/f16: float64 arrays go to the reference, with one notice."""
    from fastanalog.ops import dispatch

    dispatch._noticed.discard(torch.float64)
    torch.manual_seed(0)
    model = fa.convert_to_analog(torch.nn.Sequential(torch.nn.Linear(16, 8)).double(), fa.AnalogConfig(algorithm="rl2"))
    before = model[0].weight.detach().clone()
    opt = fa.AnalogSGD(model.parameters(), lr=0.5, seed=0)
    for _ in range(3):
        loss = model(torch.randn(4, 16, dtype=torch.float64)).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    notices = [w for w in recwarn if "reference backend" in str(w.message)]
    assert len(notices) == 1 and "float64" in str(notices[0].message)
    assert model[0].weight.dtype == torch.float64 and fa.total_pulses(model) > 0
    assert not torch.equal(model[0].analog_state()["residual"], torch.zeros_like(before))


def test_an_edit_between_forward_and_step_is_named_before_the_update():
    """W set out of range after the forward (by hand) is reported by the step, naming the layer, not clipped silently."""
    model = fa.convert_to_analog(nn.Sequential(nn.Linear(8, 4)), fa.AnalogConfig(algorithm="asgd", device=fa.LinearResponse(tau=0.5)))
    opt = fa.AnalogSGD(model.parameters(), lr=0.1, seed=0)
    model(torch.randn(2, 8)).sum().backward()
    with torch.no_grad():
        model[0].weight[0, 0] = 3.0
    with pytest.warns(UserWarning, match=r"^0: 1 of 32 weights lie outside the device range.*changed outside AnalogSGD"):
        opt.step()
    for _ in range(2):  # our own writes are not reported
        opt.zero_grad()
        model(torch.randn(2, 8)).sum().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()


@pytest.mark.parametrize("backend", ["default", "reference"])
def test_a_huge_learning_rate_saturates_pulse_counts_instead_of_wrapping(backend, monkeypatch):
    """AnalogLinear(16, 8), asgd, lr=1e6, one step: counters stay non-negative int64 and bounded by the cap.

    Per-sample writes (the default) send opposite-pulse pairs too: each direction is capped, so an element
    gets at most 2 * PULSE_LIMIT pulses."""
    if backend == "reference":
        monkeypatch.setenv("FASTANALOG_BACKEND", "reference")
    from fastanalog.config import PULSE_LIMIT

    torch.manual_seed(0)
    layer = fa.AnalogLinear(16, 8, config=fa.AnalogConfig(algorithm="asgd"))
    opt = fa.AnalogSGD(layer.parameters(), lr=1e6, seed=0)
    layer(torch.randn(4, 16)).sum().backward()
    opt.step()
    pulses = layer.analog_pulses
    assert pulses.dtype == torch.int64
    assert 0 < int(pulses[0]) <= 2 * PULSE_LIMIT * layer.weight.numel()
    assert int(pulses[1]) == 0
    assert bool(torch.isfinite(layer.weight).all())
    with pytest.raises(ValueError, match="max_pulses"):
        fa.AnalogConfig(max_pulses=PULSE_LIMIT + 1)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_continues_the_trajectory(how):
    """copy.deepcopy or pickle of model and optimizer together keeps the seed, the step count and the options."""
    import pickle

    model = _model("rl2")
    opt = fa.AnalogSGD(model.parameters(), lr=0.2, momentum=0.5, seed=42, nonfinite="skip")
    _train(model, opt, 2)
    pair = {"model": model, "opt": opt}
    copied = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    model2, opt2 = copied["model"], copied["opt"]
    assert (opt2.seed, opt2.step_count, opt2.nonfinite) == (42, 2, "skip")
    _train(model, opt, 2, start=2)
    _train(model2, opt2, 2, start=2)
    a, b = _arrays(model), _arrays(model2)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert opt2._counters is not opt._counters
