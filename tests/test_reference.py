"""The reference update rules: SPEC section 6 (the paper's theorems) and invariants."""

import math

import pytest
import torch

import fastanalog as fa
from fastanalog.ops import philox
from fastanalog.ops.reference import (
    _Array,
    apply_pulses,
    asgd_step_ref,
    directional_counts,
    pulse_count,
    rl2_step_ref,
    rl_step_ref,
    stochastic_round,
)

W_STAR = 0.5


def _quadratic(algorithm: str, sigma: float, tau: float, lr: float, steps: int, n: int = 1024, **cfg):
    """Run ``n`` independent replicas of f(w) = (w - w*)^2 / 2 with N(0, sigma^2) gradient noise.

    Returns (mean, standard error) over replicas of each replica's time average of the
    forward weight over the second half of the run.
    """
    cfg = fa.AnalogConfig(algorithm=algorithm, device=fa.LinearResponse(tau=tau, dw_min=1e-3), gamma=0.5, **cfg)
    W, P, H, Wbar = (torch.zeros(n) for _ in range(4))
    gen = torch.Generator().manual_seed(0)
    acc = torch.zeros(n)
    for k in range(1, steps + 1):
        x = W if algorithm == "asgd" else Wbar
        g = x - W_STAR + sigma * torch.randn(n, generator=gen)
        key = philox.step_key(0, k, 0)
        if algorithm == "asgd":
            asgd_step_ref(W, g, lr=lr, config=cfg, key=key, tensor_id=0)
        elif algorithm == "rl":
            rl_step_ref(W, P, Wbar, g, lr=lr, config=cfg, key=key, tensor_id=0, transfer=True)
        else:
            rl2_step_ref(W, P, H, Wbar, g, lr=lr, config=cfg, key=key, tensor_id=0)
        if k > steps // 2:
            acc += W if algorithm == "asgd" else Wbar
    avg = acc / (steps - steps // 2)
    return float(avg.mean()), float(avg.std()) / math.sqrt(n)


def _asgd_prediction(sigma: float, tau: float) -> float:
    """Root of E[g] F(w) + E|g| G(w) = 0 for a symmetric linear device (F = 1, G = w / tau).

    g ~ N(mu, sigma^2) with mu = w - w*, so E|g| is the folded-normal mean.
    """
    lo, hi = -tau, tau
    for _ in range(200):
        w = (lo + hi) / 2
        mu = w - W_STAR
        e_abs = sigma * math.sqrt(2 / math.pi) * math.exp(-mu * mu / (2 * sigma**2)) + mu * math.erf(mu / (sigma * math.sqrt(2)))
        lo, hi = (w, hi) if mu + e_abs * w / tau < 0 else (lo, w)
    return (lo + hi) / 2


def test_asgd_settles_at_the_implicit_penalty_point_not_at_w_star():
    """Theorem 1. The stationary mean is the root of the drift up to the drift's
    curvature times the weight variance (lr*sigma^2/2 ~ 0.005, so < 0.002 here);
    we allow 4 standard errors plus 0.003 for it."""
    results = {}
    for sigma, tau in [(1.0, 1.0), (0.5, 1.0), (1.0, 2.0)]:
        mean, se = _quadratic("asgd", sigma, tau, lr=0.01, steps=3000)
        pred = _asgd_prediction(sigma, tau)
        assert abs(mean - pred) < 4 * se + 0.003, (sigma, tau, mean, pred)
        results[(sigma, tau)] = W_STAR - mean
    assert results[(1.0, 1.0)] > 0.2  # far from w*
    assert results[(1.0, 1.0)] > results[(0.5, 1.0)] + 0.05  # the gap grows with sigma
    assert results[(1.0, 1.0)] > results[(1.0, 2.0)] + 0.05  # and shrinks with tau


@pytest.mark.parametrize("algorithm", ["rl", "rl2"])
def test_residual_learning_settles_at_w_star(algorithm):
    """Theorem 3 / Corollary 1. With gamma > 0 the mixed weight settles at w*, up to a
    bias from P's fluctuations meeting W's asymmetric response in the transfer
    (stationarity of W needs E[P] F_W = E|P| G_W). P's spread is O(sqrt(lr)), so the
    bias is O(sqrt(lr)): we require < 0.03 at lr = 0.01 (asgd is 0.22 away on the
    same problem) and that quartering lr at least roughly halves it."""
    mean, se = _quadratic(algorithm, 1.0, 1.0, lr=0.01, steps=3000)
    err = abs(mean - W_STAR)
    assert err < 0.03, mean
    asgd_gap = abs(_asgd_prediction(1.0, 1.0) - W_STAR)
    assert err < asgd_gap / 7
    if algorithm == "rl2":
        mean_small, se_small = _quadratic(algorithm, 1.0, 1.0, lr=0.0025, steps=10000, n=512)
        assert abs(mean_small - W_STAR) < 0.65 * err + 4 * se_small, (mean_small, mean)


def test_stochastic_rounding_is_unbiased():
    n_req = torch.tensor([0.3, -0.3, 2.75, -4.1, 0.999, 5.0])
    reps = 20000
    total = torch.zeros_like(n_req)
    counts = []
    for k in range(reps // 1000):
        idx = torch.arange(k * 1000 * 6, (k + 1) * 1000 * 6)
        u = philox.rand4x(77, idx)[0].view(1000, 6)
        c = stochastic_round(n_req.expand(1000, 6), u)
        total += c.sum(0)
        counts.append(c)
    mean = total / reps
    frac = n_req - torch.floor(n_req)
    se = torch.sqrt(frac * (1 - frac) / reps)
    assert bool(((mean - n_req).abs() <= 5 * se + 1e-6).all()), (mean, n_req)
    allc = torch.cat(counts)
    assert bool(((allc == torch.floor(n_req)) | (allc == torch.floor(n_req) + 1)).all())


def test_pulse_cap_and_truncation():
    n = torch.tensor([7.9, -7.9, 2.5, -2.5])
    assert pulse_count(n, None, None).tolist() == [7.0, -7.0, 2.0, -2.0]
    assert pulse_count(n, None, 3).tolist() == [3.0, -3.0, 2.0, -2.0]


def test_one_pulse_moves_by_dw_min_times_the_response_in_its_direction():
    dev = fa.PowerResponse(tau=0.6, gamma=0.5, dw_min=0.01)
    arr = _Array.make(dev, 3, 0, 0, 0, "cpu", zero_shift=False)
    x = torch.tensor([0.1, 0.1, -0.2])
    out = apply_pulses(x, torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 3.0, 0.0]), arr, None)
    expected = torch.tensor([0.1 + 0.02 * float(dev.q_up(torch.tensor(0.1))), 0.1 - 0.03 * float(dev.q_down(torch.tensor(0.1))), -0.2])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("algorithm", ["asgd", "rl", "rl2"])
def test_weights_never_leave_the_device_range(algorithm):
    dev = fa.ExpResponse(tau_min=-0.4, tau_max=0.7, gamma=1.5, dw_min=0.01, d2d_std=0.3, c2c_std=0.5, asymmetry=0.3)
    cfg = fa.AnalogConfig(algorithm=algorithm, device=dev, transfer_lr=1.0, read_noise=0.1)
    n = 4096
    W, P, H, Wbar = (torch.zeros(n) for _ in range(4))
    params_w = dev.element_params(n, 0, 0)
    arr_p = _Array.make(dev, n, 0, 1, 0, "cpu", zero_shift=True)
    for k in range(1, 30):
        g = 50 * torch.randn(n, generator=torch.Generator().manual_seed(k))  # huge steps: many hit a bound
        key = philox.step_key(1, k, 0)
        if algorithm == "asgd":
            asgd_step_ref(W, g, lr=1.0, config=cfg, key=key, tensor_id=0)
        elif algorithm == "rl":
            rl_step_ref(W, P, Wbar, g, lr=1.0, config=cfg, key=key, tensor_id=0, transfer=True)
        else:
            rl2_step_ref(W, P, H, Wbar, g, lr=1.0, config=cfg, key=key, tensor_id=0)
        assert bool((W >= params_w.tau_min).all() and (W <= params_w.tau_max).all())
        if algorithm != "asgd":
            phys = P + arr_p.shift
            assert bool((phys >= arr_p.params.tau_min - 1e-6).all() and (phys <= arr_p.params.tau_max + 1e-6).all())
    assert bool((W == params_w.tau_max).any() and (W == params_w.tau_min).any())  # the bounds were reached


@pytest.mark.parametrize("family", ["linear", "power", "exp"])
def test_zero_shift_makes_G_P_vanish_at_zero_per_element(family):
    kw = dict(tau_min=-0.5, tau_max=0.9, d2d_std=0.3, asymmetry=0.25, variation_seed=3)
    dev = {"linear": fa.LinearResponse(**kw), "power": fa.PowerResponse(gamma=0.7, **kw), "exp": fa.ExpResponse(gamma=2.0, **kw)}[family]
    arr = _Array.make(dev, 2048, 5, 1, 0, "cpu", zero_shift=True)
    w0 = torch.zeros(2048) + arr.shift
    # Relative to F: the float32 shift, times the slope of a curve that d2d made
    # steep (gamma down to 0.05 of its mean near a bound), leaves ~1e-5 of G.
    ratio = dev.G(w0, arr.params).abs() / dev.F(w0, arr.params)
    assert float(ratio.max()) < 1e-4
    assert float(ratio.median()) < 1e-6
    unshifted = _Array.make(dev, 2048, 5, 1, 0, "cpu", zero_shift=False)
    assert float(dev.G(torch.zeros(2048), unshifted.params).abs().max()) > 0.05  # the shift matters


@pytest.mark.parametrize("threshold", [1.0, 3.0])
def test_rl2_accumulate_loses_no_sub_granularity_remainder(threshold):
    """Everything read into the buffer is either transferred as whole pulses or still in it."""
    dev = fa.LinearResponse(tau=1.0, dw_min=0.01)
    cfg = fa.AnalogConfig(algorithm="rl2", device=dev, transfer_lr=0.05, threshold=threshold, read_noise=0.0)
    n = 512
    W, P, H, Wbar = (torch.zeros(n, dtype=torch.float32) for _ in range(4))
    read_total = torch.zeros(n, dtype=torch.float64)
    transferred = torch.zeros(n, dtype=torch.float64)
    for k in range(1, 60):
        g = torch.randn(n, generator=torch.Generator().manual_seed(k))
        out = rl2_step_ref(W, P, H, Wbar, g, lr=0.05, config=cfg, key=philox.step_key(2, k, 0), tensor_id=0)
        read_total += 0.05 * P.double()
        transferred += out.main.double() * 0.01
        below = (H.abs() < threshold * 0.01) | (out.main != 0)
        assert bool(below.all())
    torch.testing.assert_close(read_total, transferred + H.double(), rtol=0, atol=1e-5)
    assert float(transferred.abs().sum()) > 0 and float(H.abs().sum()) > 0


def test_rl_transfers_only_on_transfer_steps_and_mixes():
    cfg = fa.AnalogConfig(algorithm="rl", gamma=0.3, transfer_every=2)
    n = 256
    W, P, Wbar = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    g = torch.randn(n)
    out = rl_step_ref(W, P, Wbar, g, lr=0.5, config=cfg, key=1, tensor_id=0, transfer=False)
    assert out.main is None and bool((W == 0).all()) and bool((P != 0).any())
    torch.testing.assert_close(Wbar, 0.3 * P)
    out = rl_step_ref(W, P, Wbar, g, lr=0.5, config=cfg, key=2, tensor_id=0, transfer=True)
    assert bool((W != 0).any()) and int(out.main.abs().sum()) > 0
    torch.testing.assert_close(Wbar, W + 0.3 * P)


def test_rl2_ema_moves_buffer_as_a_moving_average():
    cfg = fa.AnalogConfig(algorithm="rl2", buffer="ema", transfer_lr=0.25, gamma=0.0)
    n = 64
    W, P, H, Wbar = (torch.zeros(n) for _ in range(4))
    H.fill_(0.2)
    g = torch.full((n,), -0.1)
    rl2_step_ref(W, P, H, Wbar, g, lr=0.1, config=cfg, key=5, tensor_id=0)
    torch.testing.assert_close(H, 0.75 * 0.2 + 0.25 * P)


def test_c2c_noise_is_unbiased_and_scales_with_sqrt_pulses():
    n = 20000
    base = fa.LinearResponse(tau=1.0, dw_min=0.001)
    noisy = fa.LinearResponse(tau=1.0, dw_min=0.001, c2c_std=0.3)
    g = torch.full((n,), -0.016)  # 16 pulses up at lr 1, from w = 0 where q_up = 1
    outs = {}
    for name, dev in (("base", base), ("noisy", noisy)):
        W = torch.zeros(n)
        asgd_step_ref(W, g, lr=1.0, config=fa.AnalogConfig(algorithm="asgd", device=dev), key=9, tensor_id=0)
        outs[name] = W
    diff = outs["noisy"] - outs["base"]
    expected_std = 0.3 * 0.001 * math.sqrt(16)
    assert abs(float(diff.mean())) < 5 * expected_std / math.sqrt(n)
    assert abs(float(diff.std()) / expected_std - 1) < 0.05


def _uniform(key: int, stream: int, numel: int, offset: int = 0) -> torch.Tensor:
    return philox.stream_uniform(philox.stream_key(key, stream), offset, numel)


def test_asgd_rounds_with_stream_0_and_pairs_with_stream_1():
    """The net count rounds with stream 0, the pairs with stream 1 (SPEC section 4), element for element."""
    n, lr, dw = 1003, 0.7, 0.01
    dev = fa.LinearResponse(tau=1.0, dw_min=dw)
    cfg = fa.AnalogConfig(algorithm="asgd", device=dev)
    gen = torch.Generator().manual_seed(3)
    g = 0.05 * torch.randn(n, generator=gen)
    A = g.abs() + 0.04 * torch.rand(n, generator=gen)
    key, offset = philox.step_key(4, 9, 1), 2**34 - 501  # shard start not a multiple of 4, crossing counter 2^32
    out = asgd_step_ref(torch.zeros(n), g, lr=lr, config=cfg, key=key, tensor_id=1, offset=offset, A=A)
    f32 = torch.float32
    req = (-torch.tensor(lr, dtype=f32) * g) / torch.tensor(dw, dtype=f32)
    u0 = _uniform(key, 0, n, offset)
    net = torch.floor(req) + (u0 < req - torch.floor(req)).to(f32)
    m = ((torch.tensor(lr, dtype=f32) * torch.clamp(A - g.abs(), min=0)) * 0.5) / torch.tensor(dw, dtype=f32)
    u1 = _uniform(key, 1, n, offset)
    pairs = torch.floor(m) + (u1 < m - torch.floor(m)).to(f32)
    assert torch.equal(out.first, net.to(torch.int32))
    assert torch.equal(out.first_pairs, pairs.to(torch.int32))
    assert int(out.first_pairs.sum()) > n // 2  # the excess is real: 0.7 pairs per element on average
    assert int(out.first_total()) == int(net.abs().sum() + 2 * pairs.sum())
    # Batch mode draws nothing else: the same net count, no pairs.
    batch = asgd_step_ref(torch.zeros(n), g, lr=lr, config=cfg, key=key, tensor_id=1, offset=offset)
    assert torch.equal(batch.first, out.first) and batch.first_pairs is None


def test_a_shard_draws_what_the_whole_tensor_draws():
    """Counters are global element indices: any split, at any offset, gives the unsplit result."""
    n = 2 * 4096 + 13
    dev = fa.PowerResponse(tau=0.6, gamma=0.5, dw_min=0.002, c2c_std=0.2, d2d_std=0.1)
    cfg = fa.AnalogConfig(algorithm="rl2", device=dev, read_noise=0.01, buffer="ema", transfer_lr=0.3)
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(n, generator=gen) * 0.1
    A = g.abs() * 2
    W0 = 0.1 * torch.randn(n, generator=gen)
    whole = [W0.clone(), torch.zeros(n), torch.zeros(n)]
    key = philox.step_key(1, 2, 3)
    ref = rl2_step_ref(*whole, None, g, lr=0.5, config=cfg, key=key, tensor_id=3, A=A)
    parts = [W0.clone(), torch.zeros(n), torch.zeros(n)]
    nets, pairs = [], []
    for lo, hi in ((0, 5), (5, 4099), (4099, n)):
        out = rl2_step_ref(*(t[lo:hi] for t in parts), None, g[lo:hi], lr=0.5, config=cfg, key=key, tensor_id=3, offset=lo, A=A[lo:hi])
        nets.append(out.first)
        pairs.append(out.first_pairs)
    assert torch.equal(torch.cat(nets), ref.first) and torch.equal(torch.cat(pairs), ref.first_pairs)
    for a, b in zip(parts, whole):
        assert torch.equal(a, b)


def test_cancelling_samples_drift_by_the_asymmetric_component():
    """SPEC 2a: per-sample gradients that cancel (S = 0) still write lr*A/2 opposite pairs,
    so W moves by -lr*A*G(W) in expectation; in batch mode (no A) it does not move."""
    n, lr, dw = 40000, 0.05, 0.001
    dev = fa.LinearResponse(tau=0.5, dw_min=dw)
    cfg = fa.AnalogConfig(algorithm="asgd", device=dev)
    w0 = 0.3
    g = torch.zeros(n)
    A = torch.full((n,), 0.37)  # e.g. two samples with gradients +0.185 and -0.185
    W = torch.full((n,), w0)
    out = asgd_step_ref(W, g, lr=lr, config=cfg, key=philox.step_key(0, 1, 0), tensor_id=0, A=A)
    G = float(dev.G(torch.tensor(w0), dev.params()))
    expected = -lr * 0.37 * G
    moved = W - w0
    se = float(moved.std()) / math.sqrt(n)
    assert abs(float(moved.mean()) - expected) < 5 * se + 1e-7, (float(moved.mean()), expected)
    assert expected < -0.005  # a visible drift toward the symmetric point
    assert bool((out.first == 0).all())
    W = torch.full((n,), w0)
    asgd_step_ref(W, g, lr=lr, config=cfg, key=philox.step_key(0, 1, 0), tensor_id=0)
    assert bool((W == w0).all())


def test_pairs_respect_the_cap_on_each_direction():
    n = torch.tensor([5.0, -5.0, 0.0, 2.0])
    m = torch.tensor([3.0, 3.0, 9.0, 0.0])
    up, down = directional_counts(n, torch.zeros(4), m, torch.ones(4), 6)
    assert up.tolist() == [6.0, 3.0, 6.0, 2.0]
    assert down.tolist() == [3.0, 6.0, 6.0, 0.0]


def test_c2c_noise_of_paired_pulses_has_the_spec_variance():
    """c2c with pairs: std = c2c * dw * sqrt(N_up q_up^2 + N_down q_down^2)."""
    n = 40000
    dev = fa.LinearResponse(tau=1.0, dw_min=0.001, c2c_std=0.4)
    arr = _Array.make(dev, n, 0, 0, 0, "cpu", zero_shift=False)
    x = torch.full((n,), 0.5)
    up, down = torch.full((n,), 7.0), torch.full((n,), 3.0)
    z = torch.randn(n, generator=torch.Generator().manual_seed(1))
    out = apply_pulses(x, up, down, arr, z)
    mean = 0.5 + 0.007 * 0.5 - 0.003 * 1.5
    std = 0.4 * 0.001 * math.sqrt(7 * 0.25 + 3 * 2.25)
    assert abs(float(out.mean()) - mean) < 5 * std / math.sqrt(n)
    assert abs(float(out.std()) / std - 1) < 0.03


@pytest.mark.parametrize("algorithm", ["rl", "rl2"])
def test_residual_write_takes_the_excess_and_transfers_take_none(algorithm):
    n = 2000
    cfg = fa.AnalogConfig(algorithm=algorithm, device=fa.LinearResponse(tau=1.0, dw_min=0.01), buffer="ema", transfer_lr=0.5)
    g = torch.zeros(n)
    A = torch.full((n,), 0.1)
    W, P, H = torch.zeros(n), torch.full((n,), 0.2), torch.zeros(n)
    kw = dict(transfer=True) if algorithm == "rl" else {}
    args = (W, P, None) if algorithm == "rl" else (W, P, H, None)
    out = (rl_step_ref if algorithm == "rl" else rl2_step_ref)(*args, g, lr=1.0, config=cfg, key=11, tensor_id=0, A=A, **kw)
    assert int(out.first_pairs.sum()) == 5 * n  # m = 1.0 * 0.1 / 2 / 0.01 = 5 exactly
    assert out.main is not None and int(out.main.abs().sum()) > 0
    assert out.main_total() is not None and int(out.main_total()) == int(out.main.abs().sum())
