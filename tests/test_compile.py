"""torch.compile(fullgraph=True) of a whole training step: forward, loss, backward and AnalogSGD.step.

The compiled step is traced once and must then give the eager run's analog arrays,
pulse counters and step counters, and the eager non-finite behaviour (raise with
nothing touched, or skip and count). Compiled gradients differ from eager ones in the
last bit (Inductor fuses and reorders reductions), which moves digital parameters and
momentum buffers by an ulp; it could flip a pulse count only where a gradient lands
within an ulp of a rounding threshold (odds of about 1e-7 per element and step), which
no element does with these seeds, so the analog state must be equal, not just close.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastanalog as fa
from fastanalog.ops import cpp, dispatch

ANALOG_STATE = ("weight", "analog_residual", "analog_buffer", "analog_pulses", "analog_last_pulses")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(config: fa.AnalogConfig, **opt_kw) -> tuple[nn.Module, fa.AnalogSGD]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    m = fa.convert_to_analog(m, config)
    return m, fa.AnalogSGD(m.parameters(), lr=0.1, seed=2**63 + 12345, **opt_kw)


def _batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(k)
    return torch.randn(4, 1, 6, 6, generator=gen), torch.randint(0, 4, (4,), generator=gen)


def _train_step(model: nn.Module, opt: fa.AnalogSGD):
    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _analog_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[-1] in ANALOG_STATE}


def _assert_same_analog_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = _analog_state(a), _analog_state(b)
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.skipif(not cpp.cpp_available(), reason="the C++ kernels are not built")
def test_compiled_train_step_equals_eager_cpp():
    config = fa.AnalogConfig(
        algorithm="rl2", device=fa.PowerResponse(tau=0.6, gamma=0.5, dw_min=0.01, d2d_std=0.1, c2c_std=0.1), read_noise=0.01
    )
    model, opt = _model(config, weight_decay=0.01)
    eager, eager_opt = _model(config, weight_decay=0.01)
    assert dispatch.backend_for(model[0].weight) == "cpp"
    compiled = torch.compile(_train_step(model, opt), fullgraph=True)
    eager_step = _train_step(eager, eager_opt)

    def both(k: int) -> None:
        x, y = _batch(k)
        opt.zero_grad()
        eager_opt.zero_grad()
        compiled(x, y)
        eager_step(x, y)

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        both(0)
        # Traced once: later steps must not recompile (the step number is read at run time).
        with torch._dynamo.config.patch(error_on_recompile=True):
            both(1)
            both(2)
            _assert_same_analog_state(model, eager)
            assert opt.step_count == eager_opt.step_count == 3
            assert fa.total_pulses(model) > 0

            # A NaN gradient raises before anything changes, in the compiled step as in eager mode.
            before = {k: v.clone() for k, v in model.state_dict().items()}
            x, y = _batch(3)
            x[0, 0, 0, 0] = float("nan")
            opt.zero_grad()
            with pytest.raises(FloatingPointError, match="nonfinite='skip'"):
                compiled(x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert opt.step_count == 3 and opt.skipped_steps == 0


def test_compiled_train_step_equals_eager_triton(monkeypatch):
    """The Triton backend (interpreted here), with momentum, rl transfers every 2 steps, a skipped step and a stored mixed weight."""
    monkeypatch.setenv("FASTANALOG_BACKEND", "triton")
    config = fa.AnalogConfig(
        algorithm="rl",
        device=fa.ExpResponse(tau=0.6, gamma=1.5, dw_min=0.01, d2d_std=0.1),
        read_noise=0.01,
        transfer_every=2,
        mixed_weight="stored",
    )
    model, opt = _model(config, momentum=0.5, nonfinite="skip")
    eager, eager_opt = _model(config, momentum=0.5, nonfinite="skip")
    compiled = torch.compile(_train_step(model, opt), fullgraph=True)
    eager_step = _train_step(eager, eager_opt)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for k in range(4):
            x, y = _batch(k)
            if k == 2:
                x[0, 0, 0, 0] = float("nan")
            opt.zero_grad()
            eager_opt.zero_grad()
            compiled(x, y)
            eager_step(x, y)
    _assert_same_analog_state(model, eager)
    assert (opt.step_count, opt.skipped_steps) == (eager_opt.step_count, eager_opt.skipped_steps) == (3, 1)
    assert torch.equal(model[0].analog_mixed, model[0].forward_weight())


def test_opcheck_compiled_step_ops():
    """The custom ops the compiled step calls pass torch.library.opcheck (schema, fake, autograd, AOT dispatch)."""
    from fastanalog.optim import _config_handle

    config = fa.AnalogConfig(algorithm="rl2", device=fa.PowerResponse(tau=0.6, gamma=0.5, dw_min=0.01, d2d_std=0.1))
    torch.manual_seed(0)
    layers = [fa.convert_to_analog(nn.Linear(5, 3), config), fa.convert_to_analog(nn.Linear(4, 2), config)]
    states = [layer.analog_state() for layer in layers]
    finite = torch.tensor(True)
    args = (
        [s["main"] for s in states],
        [s["residual"] for s in states],
        [s["buffer"] for s in states],
        [torch.zeros_like(layer.weight) for layer in layers],  # a stored mixed weight
        [torch.randn_like(layer.weight) for layer in layers],
        [torch.rand_like(layers[0].weight) + 1, torch.empty(0)],  # per-sample sums of the first, none for the second
        [layer.analog_last_pulses for layer in layers],
        [layer.analog_pulses for layer in layers],
        torch.tensor([4, 0]),
        finite,
        _config_handle(config),
        [0, 1],
        0.5,
        -(2**63) + 7,
    )
    torch.library.opcheck(torch.ops.fastanalog.analog_sgd_update_.default, args)
    grads = [torch.randn(3), torch.randn(2, 2)]
    torch.library.opcheck(torch.ops.fastanalog.analog_sgd_check_.default, (finite, torch.zeros(2, dtype=torch.int64), grads, False))
    torch.library.opcheck(torch.ops.fastanalog.analog_sgd_check_.default, (~finite, torch.zeros(2, dtype=torch.int64), grads, True))


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("algorithm", ["asgd", "rl", "rl2"])
def test_compiled_op_call_equals_eager(algorithm, backend):
    """The step ops traced by torch.compile (fullgraph: their fakes and mutation annotations) update
    the arrays and pulse outputs as an eager call does."""
    if backend == "cpp" and not cpp.cpp_available():
        pytest.skip("the C++ kernels are not built")
    from fastanalog.ops import library

    config = fa.AnalogConfig(algorithm=algorithm, device=fa.PowerResponse(tau=0.6, gamma=0.5, dw_min=0.01, d2d_std=0.1),
                             read_noise=0.01)  # fmt: skip
    sizes = (5, 300)

    def arrays(seed: int) -> dict:
        gen = torch.Generator().manual_seed(seed)
        out = {"main": [0.1 * torch.randn(n, generator=gen) for n in sizes]}
        if config.has_residual:
            out["residual"] = [0.01 * torch.randn(n, generator=gen) for n in sizes]
            out["weight"] = [torch.zeros(n) for n in sizes]
        if algorithm == "rl2":
            out["buffer"] = [torch.zeros(n) for n in sizes]
        return out

    grads = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in sizes]

    def step(state, g):
        return library.step(algorithm, state, g, lr=0.5, config=config, keys=[11, 12], tensor_ids=[0, 1], flag=True, totals=True)

    eager, traced = arrays(0), arrays(0)
    with library.use_backend(backend):
        expected = step(eager, grads)
        got = torch.compile(step, fullgraph=True)(traced, grads)
    for name in eager:
        for x, y in zip(eager[name], traced[name]):
            assert torch.equal(x, y), name
    for e, c in zip(expected, got):
        assert int(e.first) == int(c.first) > 0
        assert (e.main is None) == (c.main is None) and (e.main is None or int(e.main) == int(c.main))
