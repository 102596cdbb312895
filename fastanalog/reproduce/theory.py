"""The paper's scalar experiments, run by the engine itself (AnalogLinear + AnalogSGD).

Every experiment trains many independent elements at once: one analog layer whose rows are
the settings of a sweep and whose columns are replicas, on ``f(w) = (w - w_star)^2 / 2`` with
a gradient set by hand, ``g = (Wbar - w_star) + sigma * z`` (``Wbar`` the forward weight:
``W`` for Analog SGD, ``W + gamma * P`` for rl/rl2). A hand-set gradient is one sample, so
these runs are the same in per-sample and batch mode (SPEC section 2a).

- :func:`fixed_point_sweep`: Analog SGD's fixed point against the solution of
  ``E[g] F(w) + E|g| G(w) = 0`` (Theorem 1, the implicit penalty), over the gradient noise
  ``sigma`` and the device range ``tau``.
- :func:`lr_sweep`: the stationary error of Analog SGD, rl and rl2 against the learning rate
  (Theorem 3: rl and rl2 converge exactly, their error shrinking with the step size, while
  Analog SGD keeps the gap of Theorem 1 whatever the step size).
- :func:`zero_shift_runs`: rl2 with and without zero-shifting on a residual device whose
  symmetric point is off centre.
- :func:`gamma_sweep`: the mixing weight ``gamma`` from 0 (Tiki-Taka, the paper's Figure 2
  counterexample) to 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

import fastanalog as fa

from .common import analog_config


@dataclass(frozen=True)
class ScalarProblem:
    """The quadratic ``f(w) = (w - w_star)^2 / 2`` with additive gradient noise of std ``sigma``."""

    w_star: float = 0.3
    sigma: float = 0.5


def folded_mean(mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """``E|mu + sigma z|``, z standard normal (the folded normal's mean)."""
    mu = torch.as_tensor(mu, dtype=torch.float64)
    if sigma == 0:
        return mu.abs()
    normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    r = mu / sigma
    return sigma * math.sqrt(2 / math.pi) * torch.exp(-(r**2) / 2) + mu * (1 - 2 * normal.cdf(-r))


def predicted_fixed_point(device: fa.ResponseDevice, w_star: float, sigma: float) -> float:
    """The root in the device range of ``(w - w_star) F(w) + E|w - w_star + sigma z| G(w)`` (Theorem 1), by bisection."""
    lo, hi = float(device.tau_min), float(device.tau_max)

    def h(w: float) -> float:
        t = torch.tensor([w], dtype=torch.float64)
        return float((t - w_star) * device.F(t).double() + folded_mean(t - w_star, sigma) * device.G(t).double())

    a, b = lo + 1e-9, hi - 1e-9
    ha, hb = h(a), h(b)
    if ha * hb > 0:  # no sign change: the drift pins the weight to a bound
        return a if abs(ha) < abs(hb) else b
    for _ in range(80):
        m = (a + b) / 2
        hm = h(m)
        if ha * hm <= 0:
            b = m
        else:
            a, ha = m, hm
    return (a + b) / 2


def simulate(
    config: fa.AnalogConfig,
    w_star: float | torch.Tensor,
    sigma: float | torch.Tensor,
    *,
    rows: int,
    replicas: int,
    lr: float,
    steps: int,
    seed: int = 0,
    w0: float = 0.0,
    record_every: int = 0,
) -> dict[str, torch.Tensor]:
    """Run ``rows x replicas`` independent elements for ``steps`` optimizer steps.

    ``w_star`` and ``sigma`` are floats or per-row tensors. Returns ``mean`` and ``mse``
    (per row, of the forward weight ``Wbar`` over the replicas and the last half of the steps)
    and, with ``record_every``, ``trace``: the replica mean of ``Wbar`` per row every that many
    steps (shape ``(rows, points)``).
    """
    layer = fa.AnalogLinear(replicas, rows, bias=False, config=config)
    layer.set_digital_weight(torch.full((rows, replicas), float(w0)))
    opt = fa.AnalogSGD(layer.parameters(), lr=lr, seed=seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    target = torch.as_tensor(w_star, dtype=torch.float32).reshape(-1, 1).expand(rows, 1)
    noise = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1).expand(rows, 1)
    start = steps // 2
    total = torch.zeros(rows, dtype=torch.float64)
    total_sq = torch.zeros(rows, dtype=torch.float64)
    trace = []
    for k in range(steps):
        wbar = layer.forward_weight()
        if k >= start:
            total += wbar.double().mean(1)
            total_sq += (wbar.double() - target.double()).pow(2).mean(1)
        if record_every and k % record_every == 0:
            trace.append(wbar.mean(1))
        layer.weight.grad = (wbar - target) + noise * torch.randn(rows, replicas, generator=gen)
        opt.step()
    n = steps - start
    out = {"mean": total / n, "mse": total_sq / n}
    if record_every:
        out["trace"] = torch.stack(trace, 1)
    return out


# ----- Theorem 1 ------------------------------------------------------------------------------
def fixed_point_sweep(sigmas: list[float], taus: list[float], *, w_star: float, lr: float, steps: int, replicas: int, seed: int = 0) -> list[dict]:
    """Analog SGD on linear (soft-bounds) devices: measured fixed point and Theorem 1's, per ``(tau, sigma)``."""
    rows = []
    for tau in taus:
        device = fa.LinearResponse(tau=tau)
        res = simulate(analog_config("asgd", device), w_star, torch.tensor(sigmas), rows=len(sigmas), replicas=replicas, lr=lr, steps=steps, seed=seed)
        for i, s in enumerate(sigmas):
            pred = predicted_fixed_point(device, w_star, s)
            rows.append(
                {
                    "tau": tau,
                    "sigma": s,
                    "w_star": w_star,
                    "measured": float(res["mean"][i]),
                    "predicted": pred,
                    "gap_measured": float(res["mean"][i]) - w_star,
                    "gap_predicted": pred - w_star,
                }
            )
    return rows


# ----- Theorem 3 ------------------------------------------------------------------------------
def lr_sweep(
    lrs: list[float], *, device: fa.ResponseDevice, problem: ScalarProblem, horizon: float, replicas: int, transfer_lr: float, gamma: float, seed: int = 0, max_steps: int = 20_000
) -> list[dict]:
    """Stationary error ``E(Wbar - w_star)^2`` of asgd, rl and rl2 per learning rate (``steps = horizon / lr``)."""
    rows = []
    for algorithm in ("asgd", "rl", "rl2"):
        cfg = analog_config(algorithm, device, gamma=gamma, transfer_lr=transfer_lr)
        for lr in lrs:
            steps = min(max_steps, int(math.ceil(horizon / lr)))
            res = simulate(cfg, problem.w_star, problem.sigma, rows=1, replicas=replicas, lr=lr, steps=steps, seed=seed)
            mean = float(res["mean"][0])
            rows.append(
                {
                    "algorithm": algorithm,
                    "lr": lr,
                    "steps": steps,
                    "transfer_lr": transfer_lr if algorithm != "asgd" else "",
                    "gamma": gamma if algorithm != "asgd" else "",
                    "mean_weight": mean,
                    "bias": mean - problem.w_star,
                    "mse": float(res["mse"][0]),
                }
            )
    return rows


def transfer_lr_sweep(
    transfer_lrs: list[float], *, device: fa.ResponseDevice, problem: ScalarProblem, lr: float, steps: int, replicas: int, gamma: float, seed: int = 0
) -> list[dict]:
    """Stationary error of rl and rl2 per transfer rate at a fixed learning rate."""
    rows = []
    for algorithm in ("rl", "rl2"):
        for beta in transfer_lrs:
            cfg = analog_config(algorithm, device, gamma=gamma, transfer_lr=beta)
            res = simulate(cfg, problem.w_star, problem.sigma, rows=1, replicas=replicas, lr=lr, steps=steps, seed=seed)
            mean = float(res["mean"][0])
            rows.append(
                {"algorithm": algorithm, "transfer_lr": beta, "lr": lr, "steps": steps, "bias": mean - problem.w_star, "mse": float(res["mse"][0])}
            )
    return rows


# ----- zero-shift -----------------------------------------------------------------------------
def zero_shift_runs(
    *, device: fa.ResponseDevice, residual_device: fa.ResponseDevice, problem: ScalarProblem, lr: float, steps: int, replicas: int, gamma: float, transfer_lr: float, algorithm: str = "rl2", seed: int = 0, record_every: int = 10
) -> dict[str, dict]:
    """``algorithm`` with zero-shifting on and off, on a residual device whose symmetric point is not 0."""
    out = {}
    for on in (True, False):
        cfg = replace(analog_config(algorithm, device, gamma=gamma, transfer_lr=transfer_lr), residual_device=residual_device, zero_shift=on)
        res = simulate(cfg, problem.w_star, problem.sigma, rows=1, replicas=replicas, lr=lr, steps=steps, seed=seed, record_every=record_every)
        out["on" if on else "off"] = {
            "bias": float(res["mean"][0]) - problem.w_star,
            "mse": float(res["mse"][0]),
            "trace": res["trace"][0].tolist(),
        }
    return out


# ----- gamma ----------------------------------------------------------------------------------
def gamma_sweep(
    gammas: list[float], *, device: fa.ResponseDevice, problem: ScalarProblem, lr: float, steps: int, replicas: int, transfer_lr: float, algorithms: tuple[str, ...] = ("rl", "rl2"), seed: int = 0
) -> list[dict]:
    """Stationary bias and error of rl/rl2 per mixing weight ``gamma`` (``gamma = 0``: Tiki-Taka)."""
    rows = []
    for algorithm in algorithms:
        for gamma in gammas:
            cfg = analog_config(algorithm, device, gamma=gamma, transfer_lr=transfer_lr)
            res = simulate(cfg, problem.w_star, problem.sigma, rows=1, replicas=replicas, lr=lr, steps=steps, seed=seed)
            mean = float(res["mean"][0])
            rows.append({"algorithm": algorithm, "gamma": gamma, "bias": mean - problem.w_star, "mse": float(res["mse"][0])})
    return rows


# ----- Figure 2: least squares on an asymmetric linear device --------------------------------------
@dataclass(frozen=True)
class LeastSquares:
    """``f(W) = 1/2 ||A W - b||^2`` with ``A`` (``rows x cols``) Gaussian of std ``a_std``, ``W*`` Gaussian of std ``w_std``, ``b = A W*``.

    Replicas share ``A`` and have their own ``W*`` (drawn from ``seed``).
    """

    rows: int = 100
    cols: int = 50
    a_std: float = 1.0
    w_std: float = 0.5
    seed: int = 0

    def make(self, replicas: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, W*, B)``: ``A`` (rows, cols), ``W*`` (replicas, cols), ``B = A W*^T`` (rows, replicas)."""
        gen = torch.Generator().manual_seed(self.seed)
        a = self.a_std * torch.randn(self.rows, self.cols, generator=gen)
        w_star = self.w_std * torch.randn(replicas, self.cols, generator=gen)
        return a, w_star, a @ w_star.T


@dataclass(frozen=True)
class LsAlgorithm:
    """One curve of the least-squares experiment: an algorithm with its learning rate (and for rl, gamma and zero-shift)."""

    name: str
    algorithm: str  # asgd | rl
    lr: float
    gamma: float = 0.0
    zero_shift: bool = True


def least_squares_runs(
    c_lins: list[float],
    algorithms: tuple[LsAlgorithm, ...],
    *,
    problem: LeastSquares,
    tau: float,
    dw_min: float,
    steps: int,
    replicas: int,
    transfer_lr: float,
    update: str = "per-sample",
    record_every: int = 10,
    seed: int = 0,
) -> list[dict]:
    """The paper's Figure 2: ``f`` of the forward weight over ``steps`` gradient computations per asymmetry ``cLin``.

    The device is ``LinearResponse(tau, dw_min, asymmetry=cLin)`` for W and P alike. Every
    gradient computation is one optimizer step on the whole problem: the layer
    ``AnalogLinear(cols, replicas, bias=False)`` reads all ``rows`` rows of A as one batch
    (replica r is output r), the loss is ``f`` summed over the replicas, and the write is per
    sample (``update="per-sample"``: the rows' pulses are all sent, as a crossbar writes) or one
    write of the summed gradient (``"batch"``). W starts at 0. Returns one row per
    (cLin, algorithm) with ``trace`` (the replica mean of ``f`` every ``record_every`` steps,
    first point at step 0), ``final`` (the replica mean at the last step) and ``f0``.
    """
    a, _, b = problem.make(replicas)
    out = []
    for c in c_lins:
        device = fa.LinearResponse(tau=tau, dw_min=dw_min, asymmetry=c)
        for alg in algorithms:
            if alg.algorithm == "asgd":
                cfg = analog_config("asgd", device, update=update)
            else:
                cfg = replace(analog_config(alg.algorithm, device, update=update, gamma=alg.gamma, transfer_lr=transfer_lr), zero_shift=alg.zero_shift)
            layer = fa.AnalogLinear(problem.cols, replicas, bias=False, config=cfg)
            layer.set_digital_weight(torch.zeros(replicas, problem.cols))
            opt = fa.AnalogSGD(layer.parameters(), lr=alg.lr, seed=seed)
            trace = []
            f = torch.zeros(replicas)
            for k in range(steps + 1):
                res = layer(a) - b
                f = 0.5 * res.detach().pow(2).sum(0)
                if k % record_every == 0 or k == steps:
                    trace.append(float(f.mean()))
                if k == steps:
                    break
                opt.zero_grad(set_to_none=True)
                (0.5 * res.pow(2).sum()).backward()
                opt.step()
            out.append(
                {
                    "update": update,
                    "c_lin": c,
                    "symmetric_point": c * tau,
                    "name": alg.name,
                    "algorithm": alg.algorithm,
                    "lr": alg.lr,
                    "gamma": alg.gamma if alg.algorithm != "asgd" else "",
                    "zero_shift": alg.zero_shift if alg.algorithm != "asgd" else "",
                    "transfer_lr": transfer_lr if alg.algorithm != "asgd" else "",
                    "steps": steps,
                    "f0": trace[0],
                    "final": float(f.mean()),
                    "final_median": float(f.median()),
                    "trace": trace,
                }
            )
    return out
