"""Fuzz: random configs, shapes, dtypes and gradients (NaN/Inf, huge, tiny, zero).

A step either raises a clear error with every array untouched, or leaves every array finite
and inside its device's range, with pulse counters that never decrease (they cannot wrap).
Runs on the default backend (the C++ kernels on CPU) and on the reference, through the user's
path (AnalogLinear + AnalogSGD) and through the kernel entry with a per-sample excess.
"""

from __future__ import annotations

import random

import pytest
import torch

import fastanalog as fa
from fastanalog.ops import dispatch, philox
from fastanalog.ops.reference import ARRAY_P, ARRAY_W, _Array

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SCALES = (0.0, 1e-30, 1e-3, 1.0, 1e30, 3e38)
LRS = (1e-6, 0.01, 1.0, 1e6)


def _device(rng: random.Random) -> fa.ResponseDevice:
    family = rng.choice(["linear", "power", "exp", "table"])
    tau_max = rng.choice([0.3, 0.6, 1.0])
    tau_min = -rng.choice([tau_max, 0.5 * tau_max])
    common = dict(
        tau_min=tau_min,
        tau_max=tau_max,
        dw_min=rng.choice([1e-4, 1e-3, 0.05]),
        asymmetry=rng.choice([0.0, 0.3]),
        c2c_std=rng.choice([0.0, 0.5]),
        d2d_std=rng.choice([0.0, 0.3]),
        variation_seed=rng.randrange(100),
    )
    if family == "linear":
        return fa.LinearResponse(**common)
    if family == "power":
        return fa.PowerResponse(gamma=rng.choice([0.3, 1.0, 2.0]), **common)
    if family == "exp":
        return fa.ExpResponse(gamma=rng.choice([-2.0, 1.0, 3.0]), **common)
    grid = [i / 8 for i in range(9)]
    return fa.TableResponse(up=tuple(1 - x for x in grid), down=tuple(grid), **common)


def _config(rng: random.Random) -> fa.AnalogConfig:
    buffer = rng.choice(["accumulate", "ema"])
    return fa.AnalogConfig(
        algorithm=rng.choice(["asgd", "rl", "rl2"]),
        device=_device(rng),
        residual_device=_device(rng) if rng.random() < 0.3 else None,
        gamma=rng.choice([0.0, 0.1, 0.5]),
        transfer_lr=rng.choice([0.1, 1.0]),
        read_noise=rng.choice([0.0, 0.1]),
        buffer=buffer,
        threshold=rng.choice([1.0, 2.5]),
        max_pulses=rng.choice([None, 1, 100]),
        zero_shift=rng.random() < 0.8,
    )


def _gradient(rng: random.Random, shape, dtype, poison: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    scale = rng.choice(SCALES)
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if rng.random() < 0.3:
        g[torch.rand(shape, generator=gen) < 0.5] = 0.0
    g = g.to(dtype)  # huge values overflow to +-inf in narrow dtypes: then the step must refuse
    if poison:
        flat = g.view(-1)
        flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
    return g


def _tolerance(dtype: torch.dtype) -> float:
    # The clamp is exact in float32; storing a bound in a narrower dtype rounds it by up to half an ulp.
    return float(torch.finfo(dtype).eps) if dtype != torch.float64 else 1e-6


def _check_in_range(layer, config: fa.AnalogConfig, tensor_id: int) -> None:
    state = layer.analog_state()
    n = layer.weight.numel()
    W = state["main"].detach().reshape(-1).double()
    assert bool(torch.isfinite(W).all()), "W is not finite"
    arr_w = _Array.make(config.device, n, tensor_id, ARRAY_W, 0, "cpu", zero_shift=False)
    tol = _tolerance(W.dtype if state["main"].dtype == torch.float64 else state["main"].dtype) * (1 + abs(config.device.tau_max))
    assert bool((W >= arr_w.params.tau_min.double() - tol).all() and (W <= arr_w.params.tau_max.double() + tol).all()), "W left its range"
    if config.has_residual:
        P = state["residual"].detach().reshape(-1).double()
        assert bool(torch.isfinite(P).all()), "P is not finite"
        arr_p = _Array.make(config.residual_device, n, tensor_id, ARRAY_P, 0, "cpu", zero_shift=config.zero_shift)
        shift = torch.as_tensor(arr_p.shift, dtype=torch.float64)
        phys = P + shift
        assert bool((phys >= arr_p.params.tau_min.double() - tol).all() and (phys <= arr_p.params.tau_max.double() + tol).all())
    if config.has_buffer:
        assert bool(torch.isfinite(state["buffer"]).all()), "H is not finite"


@pytest.mark.parametrize("backend", ["default", "reference"])
@pytest.mark.parametrize("case", range(24))
def test_a_step_refuses_or_stays_finite_and_in_range(backend, case, monkeypatch):
    if backend == "reference":
        monkeypatch.setenv("FASTANALOG_BACKEND", "reference")
    rng = random.Random(1000 * case + (backend == "reference"))
    config = _config(rng)
    dtype = rng.choice(DTYPES)
    layer = fa.AnalogLinear(rng.randint(1, 40), rng.randint(1, 40), bias=rng.random() < 0.5, config=config).to(dtype)
    opt = fa.AnalogSGD(layer.parameters(), lr=rng.choice(LRS), seed=case)
    counters = layer.analog_pulses.clone()
    for _ in range(3):
        poison = rng.random() < 0.25
        for p in layer.parameters():
            p.grad = _gradient(rng, p.shape, p.dtype, poison and p is layer.weight)
        # The companion's gradient is A, the per-sample sums, which the step takes as it is
        # (infinite: capped pairs; NaN: none) rather than refusing: only real gradients count.
        checked = [p for n, p in layer.named_parameters() if not n.endswith("analog_abs")]
        nonfinite = any(not bool(torch.isfinite(p.grad).all()) for p in checked)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        if nonfinite:
            with pytest.raises(FloatingPointError, match="non-finite gradients"):
                opt.step()
            for k, v in layer.state_dict().items():
                assert torch.equal(v, before[k]), f"{k} changed by a refused step"
            continue
        opt.step()
        _check_in_range(layer, config, tensor_id=0)
        assert layer.analog_pulses.dtype == torch.int64
        assert bool((layer.analog_pulses >= counters).all()), (layer.analog_pulses, counters)
        counters = layer.analog_pulses.clone()


@pytest.mark.parametrize("case", range(12))
def test_kernel_entry_with_an_excess_stays_finite_and_in_range(case):
    """The per-sample excess input A (huge, zero, below |g|) never breaks the invariants."""
    rng = random.Random(50_000 + case)
    config = _config(rng)
    dtype = rng.choice(DTYPES[:3])
    layer = fa.AnalogLinear(rng.randint(1, 30), rng.randint(1, 30), config=config).to(dtype)
    lr = rng.choice(LRS)
    for step in range(1, 4):
        g = _gradient(rng, layer.weight.shape, dtype, poison=False)
        if not bool(torch.isfinite(g).all()):
            continue  # the optimizer's gradient check refuses these before any kernel runs
        A = (g.float().abs() * rng.choice([0.0, 0.5, 1.0, 3.0, 1e30])).clamp(max=3e38).to(dtype)  # may overflow to inf
        item = dispatch.StepItem(layer.analog_state(), layer.analog_mixed, g, config, philox.step_key(case, step, 0), 0, A)
        out = dispatch.analog_step_group([item], lr=lr, step=step, totals=True)[0]
        _check_in_range(layer, config, tensor_id=0)
        assert int(out.first_total()) >= 0
