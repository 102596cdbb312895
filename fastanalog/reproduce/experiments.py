"""What ``fastanalog reproduce`` runs, in its full and ``--quick`` sizes, and the runner.

Three phases keep both worker processes busy: (1) the theory runs (in a worker, beside the
training runs) and the learning-rate grid of every accuracy table (seed 0, scored on the
validation split) with the default-setting sweep; (2) the remaining seeds at each cell's
chosen learning rate with the ablations (which use the chosen learning rates of the first
table); (3) the report.

Run time: :func:`total_cost` sums :func:`_cost` over the distinct training runs of a setting.
The full setting before the paper's Table 6 cells, Table 5 levels and Figure 2 were added
summed to ``OLD_FULL_COST`` (2.70M) and was estimated at about 55 minutes on 2 idle cores; the
current full setting sums to 3.34M, 1.24 times that, so an estimated 68 minutes (the Figure 2
runs, about a minute, run in a worker beside the training runs). Estimated by that ratio, not
measured: the report states the time it took.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

import fastanalog as fa

from . import paper, theory
from .common import HAS_UPDATE_MODE
from .training import DeviceSpec, Job, mean_std, run_jobs, worker_pool

# Accuracy-table rows: label -> (algorithm, mixing gamma, update mode). "tiki-taka" is rl with gamma 0.
ROWS: dict[str, tuple[str, float, str | None]] = {
    "digital": ("digital", 0.0, None),
    "asgd": ("asgd", 0.0, None),
    "asgd (batch mode)": ("asgd", 0.0, "batch"),
    "tiki-taka (rl, gamma 0)": ("rl", 0.0, None),
    "rl": ("rl", 0.1, None),
    "rl2": ("rl2", 0.1, None),
}
RL_TRANSFER_LR = 0.1  # the residual-learning transfer rate of the scalar theory checks (the presets' value)
# The tables' and ablations' transfer rate: the paper's beta (Appendix K). The presets' 0.1, picked on short cnn
# runs, lets P's transfers swing W on long runs with mild power responses (rl at power 0.5, tau 0.6: 52.9%
# test accuracy at 0.1 against 83.9% at 0.01, fmnist-fcn, lr 0.05, seed 0).
TABLE_TRANSFER_LR = 0.01


@dataclass(frozen=True)
class TableSpec:
    """One accuracy table: a model on a dataset, several responses, a learning-rate grid and seeds."""

    name: str
    model: str
    dataset: str
    responses: tuple[DeviceSpec, ...]
    lr_grid: tuple[float, ...]
    seeds: int
    epochs: int
    batch: int
    n_train: int | None
    n_val: int
    # Per-row grids that replace ``lr_grid`` (row label -> grid).
    row_grids: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # Rows to leave out (e.g. ``--quick`` has no room for some).
    skip_rows: tuple[str, ...] = ()

    def grid(self, row: str) -> tuple[float, ...]:
        return self.row_grids.get(row, self.lr_grid)

    def rows(self) -> list[str]:
        return [r for r in ROWS if (r != "asgd (batch mode)" or HAS_UPDATE_MODE) and r not in self.skip_rows]

    def job(self, row: str, device: DeviceSpec, lr: float, seed: int) -> Job:
        algorithm, gamma, update = ROWS[row]
        return Job(
            self.model, self.dataset, algorithm, device, lr=lr, seed=seed, epochs=self.epochs, batch=self.batch,
            n_train=self.n_train, n_val=self.n_val, update=update, gamma=gamma, transfer_lr=TABLE_TRANSFER_LR,
            tags=(("table", self.name), ("row", row)),
        )  # fmt: skip

    def cells(self) -> list[tuple[str, DeviceSpec | None]]:
        """(row, response) pairs; digital has one cell (no device)."""
        out: list[tuple[str, DeviceSpec | None]] = [("digital", None)]
        for dev in self.responses:
            out += [(row, dev) for row in self.rows() if row != "digital"]
        return out


@dataclass(frozen=True)
class Settings:
    name: str
    workers: int
    # theory
    replicas: int
    fp_sigmas: tuple[float, ...]
    fp_taus: tuple[float, ...]
    fp_steps: int
    lr_grid_theory: tuple[float, ...]
    horizon: float
    max_steps_theory: int
    gammas: tuple[float, ...]
    gamma_steps: int
    # accuracy
    tables: tuple[TableSpec, ...]
    # ablations (on the first table's model, dataset and reference response)
    c2c_levels: tuple[float, ...]
    read_noise_levels: tuple[float, ...]
    ablation_seeds: int
    # default-setting sweep: `fastanalog train`'s cnn run at batch 128 for a few steps
    defaults_dataset: str
    defaults_steps: int
    defaults_transfer_lrs: tuple[float, ...]
    defaults_algorithms: tuple[str, ...] = ("digital", "asgd", "rl", "rl2")
    c2c_rows: tuple[str, ...] = ("asgd", "rl2")
    c2c_seeds: int = 1
    # the paper's Figure 2 (least squares, asymmetric linear device): gradient computations,
    # replicas (own W*, shared A), write modes and curves (names in LS_ALGORITHMS)
    ls_steps: int = 1000
    ls_replicas: int = 8
    ls_updates: tuple[str, ...] = ("per-sample", "batch")
    ls_algorithms: tuple[str, ...] = ()


REFERENCE = DeviceSpec("power", 0.6, 0.5)
# The paper's cycle-to-cycle levels (Table 5) and 0, the tables' own runs (the same jobs, so not run twice).
C2C_LEVELS = (0.0, 0.1, 0.3, 0.6, 0.9, 1.2)
# The learning-rate grid of the full tables (every row).
FULL_GRID = (0.05, 0.1, 0.2, 0.5)
# --quick has no grid: one learning rate per row, picked from short runs of this table's setting by
# validation accuracy (digital at 0.5 is unstable over 5 epochs: 47% and 12% on two seeds, 0.3 gives 95%).
QUICK_LRS = {"digital": (0.3,), "asgd": (0.2,), "asgd (batch mode)": (0.2,), "rl": (0.1,), "rl2": (0.1,)}


def full_settings(workers: int) -> Settings:
    # Table 6 cells: a range of tau at power gamma_res 0.5 (where the paper's Analog SGD works),
    # steep power and exponential ones (where it fails, <15%), and exponential gamma_res 0.5.
    fcn_responses = (
        DeviceSpec("power", 0.6, 0.5),
        DeviceSpec("power", 0.8, 0.5),
        DeviceSpec("power", 0.6, 2.0),
        DeviceSpec("exp", 0.6, 0.5),
        DeviceSpec("exp", 0.6, 2.0),
    )
    cnn_responses = (DeviceSpec("power", 0.6, 0.5), DeviceSpec("power", 0.6, 2.0))
    tables = (
        TableSpec("fmnist-fcn", "fcn", "fashion-mnist", fcn_responses, FULL_GRID, 3, 8, 32, 10000, 2000),
        TableSpec("fmnist-cnn", "cnn", "fashion-mnist", cnn_responses, FULL_GRID, 3, 5, 32, 8000, 2000),
        TableSpec("digits-fcn", "fcn", "digits", fcn_responses, FULL_GRID, 3, 20, 16, None, 300),
    )
    return Settings(
        "full", workers, 512, (0.0, 0.1, 0.2, 0.5, 1.0), (0.3, 0.6, 1.0), 2000,
        (0.005, 0.01, 0.02, 0.05, 0.1), 100.0, 20000, (0.0, 0.05, 0.1, 0.2, 0.3, 0.5), 4000,
        tables, C2C_LEVELS, (0.0, 0.002, 0.01, 0.05), 1,
        "fashion-mnist", 150, (0.03, 0.1, 0.3, 1.0),
        c2c_rows=("asgd", "tiki-taka (rl, gamma 0)", "rl2"), c2c_seeds=3,
        ls_steps=1000, ls_replicas=8, ls_updates=("per-sample", "batch"), ls_algorithms=tuple(LS_ALGORITHMS),
    )  # fmt: skip


def quick_settings(workers: int) -> Settings:
    # Both responses are Table 6 cells: power gamma_res 0.5 / tau 0.6 (the paper's Analog SGD works)
    # and power gamma_res 2 / tau 0.6 (it fails).
    responses = (DeviceSpec("power", 0.6, 0.5), DeviceSpec("power", 0.6, 2.0))
    tables = (
        TableSpec("digits-fcn", "fcn", "digits", responses, (0.1,), 1, 5, 16, None, 300, QUICK_LRS, ("tiki-taka (rl, gamma 0)",)),
    )
    return Settings(
        "quick", workers, 64, (0.0, 0.5, 1.0), (0.5, 1.0), 1000,
        (0.02, 0.1), 20.0, 1000, (0.0, 0.1), 600,
        tables, (0.0, 1.2), (0.0, 0.05), 1,
        "digits", 100, (0.1, 1.0), ("rl2",), ("asgd", "rl2"), 1,
        ls_steps=600, ls_replicas=4, ls_updates=("per-sample",),
        ls_algorithms=("asgd", "tiki-taka (gamma 0, no zero-shift)", "residual learning (gamma 0.1, zero-shift)"),
    )  # fmt: skip


# ----- theory -----------------------------------------------------------------------------------
THEORY_PROBLEM = theory.ScalarProblem(w_star=0.3, sigma=0.5)
THEORY_DEVICE = dict(tau=0.6)
OFF_CENTRE = dict(tau_min=-0.3, tau_max=0.9)  # a residual device whose symmetric point is 0.3

# Figure 2: the paper's least-squares problem and device; the curves with their learning rates, picked so that
# each converges at cLin = 0 (per-sample writes, 1000 gradient computations): Analog SGD at 0.005 (the full
# gradient's step limit is about 2 / 290), Tiki-Taka and Residual Learning at 0.02 with transfer_lr 0.1.
LS_PROBLEM = theory.LeastSquares(rows=100, cols=50, a_std=1.0, w_std=0.5, seed=0)
LS_TRANSFER_LR = 0.1
LS_ALGORITHMS = {
    a.name: a
    for a in (
        theory.LsAlgorithm("asgd", "asgd", 0.005),
        theory.LsAlgorithm("tiki-taka (gamma 0, no zero-shift)", "rl", 0.02, gamma=0.0, zero_shift=False),
        theory.LsAlgorithm("tiki-taka + zero-shift (gamma 0)", "rl", 0.02, gamma=0.0, zero_shift=True),
        theory.LsAlgorithm("residual learning (gamma 0.1, zero-shift)", "rl", 0.02, gamma=0.1, zero_shift=True),
    )
}
LS_TT = "tiki-taka (gamma 0, no zero-shift)"
LS_RL = "residual learning (gamma 0.1, zero-shift)"


def run_theory(s: Settings, say: Callable[[str], None]) -> dict[str, Any]:
    """The scalar experiments (one torch thread, in this process)."""
    out: dict[str, Any] = {}
    dev = fa.LinearResponse(**THEORY_DEVICE)
    t = time.perf_counter()
    out["fixed_point"] = theory.fixed_point_sweep(
        list(s.fp_sigmas), list(s.fp_taus), w_star=THEORY_PROBLEM.w_star, lr=0.02, steps=s.fp_steps, replicas=s.replicas
    )
    say(f"theory: Analog SGD fixed points ({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    out["lr_sweep"] = theory.lr_sweep(
        list(s.lr_grid_theory), device=dev, problem=THEORY_PROBLEM, horizon=s.horizon, replicas=s.replicas,
        transfer_lr=RL_TRANSFER_LR, gamma=0.1, max_steps=s.max_steps_theory,
    )  # fmt: skip
    say(f"theory: error against the learning rate ({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    out["zero_shift"] = theory.zero_shift_runs(
        device=dev, residual_device=fa.LinearResponse(**OFF_CENTRE), problem=THEORY_PROBLEM, lr=0.02, steps=s.gamma_steps,
        replicas=s.replicas, gamma=0.1, transfer_lr=RL_TRANSFER_LR,
    )  # fmt: skip
    say(f"theory: zero-shift on and off ({time.perf_counter() - t:.0f} s)")
    t = time.perf_counter()
    rows = []
    for sigma in (0.0, THEORY_PROBLEM.sigma):
        prob = replace(THEORY_PROBLEM, sigma=sigma)
        for r in theory.gamma_sweep(list(s.gammas), device=dev, problem=prob, lr=0.1, steps=s.gamma_steps, replicas=s.replicas, transfer_lr=RL_TRANSFER_LR):
            rows.append({"sigma": sigma, **r})
    out["gamma"] = rows
    say(f"theory: mixing weight gamma ({time.perf_counter() - t:.0f} s)")
    if s.ls_algorithms:
        t = time.perf_counter()
        algs = tuple(LS_ALGORITHMS[name] for name in s.ls_algorithms)
        ls = []
        for update in s.ls_updates:
            if update == "batch" and not HAS_UPDATE_MODE:
                continue
            ls += theory.least_squares_runs(
                list(paper.FIGURE2["c_lins"]), algs, problem=LS_PROBLEM, tau=paper.FIGURE2_TAU, dw_min=paper.FIGURE2_DW_MIN,
                steps=s.ls_steps, replicas=s.ls_replicas, transfer_lr=LS_TRANSFER_LR, update=update,
            )  # fmt: skip
        out["least_squares"] = ls
        say(f"theory: Figure 2 least squares ({time.perf_counter() - t:.0f} s)")
    return out


# ----- accuracy tables ---------------------------------------------------------------------------
def grid_jobs(spec: TableSpec) -> list[Job]:
    jobs = []
    for row, dev in spec.cells():
        for lr in spec.grid(row):
            jobs.append(spec.job(row, dev or REFERENCE, lr, 0))
    return jobs


def choose_lrs(spec: TableSpec, grid_rows: list[dict]) -> dict[tuple[str, str], float]:
    """Per (row, response label): the grid learning rate with the best validation accuracy (seed 0)."""
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for r in grid_rows:
        if r.get("table") != spec.name:
            continue
        key = (r["row"], "-" if r["row"] == "digital" else r["response"])
        score = -1.0 if r["diverged"] or math.isnan(r["val_acc"]) else r["val_acc"]
        if key not in best or score > best[key][1]:
            best[key] = (r["lr"], score)
    return {k: v[0] for k, v in best.items()}


def seed_jobs(spec: TableSpec, chosen: dict[tuple[str, str], float]) -> list[Job]:
    jobs = []
    for row, dev in spec.cells():
        lr = chosen[(row, "-" if dev is None else dev.label)]
        for seed in range(1, spec.seeds):
            jobs.append(spec.job(row, dev or REFERENCE, lr, seed))
    return jobs


def table_rows(spec: TableSpec, runs: list[dict], chosen: dict[tuple[str, str], float]) -> list[dict]:
    """One row per (row, response): chosen lr, test accuracy mean and std over the seeds at that lr."""
    out = []
    for row, dev in spec.cells():
        resp = "-" if dev is None else dev.label
        lr = chosen[(row, resp)]
        mine = [r for r in runs if r.get("table") == spec.name and r["row"] == row and (row == "digital" or r["response"] == resp)]
        final = [r for r in mine if r["lr"] == lr]
        accs = [100 * r["test_acc"] for r in final]
        m, sd = mean_std(accs)
        grid = {r["lr"]: r["val_acc"] for r in mine if r["seed"] == 0}
        out.append(
            {
                "table": spec.name,
                "model": spec.model,
                "dataset": spec.dataset,
                "row": row,
                "response": resp,
                "lr": lr,
                "test_acc_mean": round(m, 2),
                "test_acc_std": round(sd, 2),
                "seeds": len(final),
                "diverged": sum(bool(r["diverged"]) for r in final),
                "val_acc_by_lr": "; ".join(f"{k:g}: {100 * v:.1f}" for k, v in sorted(grid.items())),
                "paper": paper.table_paper_value(row, spec.model, dev),
            }
        )
    return out


# ----- ablations and defaults ------------------------------------------------------------------
def ablation_jobs(s: Settings, chosen: dict[tuple[str, str], float]) -> list[Job]:
    spec = s.tables[0]
    jobs = []
    for seed in range(s.c2c_seeds):
        for c2c in s.c2c_levels:
            dev = replace(REFERENCE, c2c_std=c2c)
            for row in s.c2c_rows:
                lr = chosen.get((row, REFERENCE.label), spec.grid(row)[0])
                jobs.append(replace(spec.job(row, dev, lr, seed), tags=(("ablation", "c2c"), ("row", row), ("level", c2c))))
    for seed in range(s.ablation_seeds):
        for noise in s.read_noise_levels:
            for row in ("rl", "rl2"):
                lr = chosen.get((row, REFERENCE.label), spec.grid(row)[0])
                job = replace(spec.job(row, REFERENCE, lr, seed), read_noise=noise)
                jobs.append(replace(job, tags=(("ablation", "read_noise"), ("row", row), ("level", noise))))
    return jobs


DEFAULTS_LR = 0.05  # `fastanalog train`'s default learning rate


def defaults_jobs(s: Settings) -> list[Job]:
    """`fastanalog train`'s cnn run (batch 128, lr 0.05, power tau 0.6, gamma 0.1) for a few steps, per transfer_lr."""
    common = dict(seed=0, epochs=1000, batch=128, n_train=None, n_val=0, max_steps=s.defaults_steps, gamma=0.1)
    jobs = []
    for algorithm in ("digital", "asgd"):
        if algorithm in s.defaults_algorithms:
            jobs.append(Job("cnn", s.defaults_dataset, algorithm, REFERENCE, lr=DEFAULTS_LR, tags=(("defaults", algorithm), ("row", algorithm)), **common))
    for algorithm in ("rl", "rl2"):
        if algorithm not in s.defaults_algorithms:
            continue
        for beta in s.defaults_transfer_lrs:
            jobs.append(
                Job("cnn", s.defaults_dataset, algorithm, REFERENCE, lr=DEFAULTS_LR, transfer_lr=beta, tags=(("defaults", algorithm), ("row", algorithm)), **common)
            )
    return jobs


# ----- the runner ----------------------------------------------------------------------------------
def run_all(s: Settings, say: Callable[[str], None], parts: tuple[str, ...] = ("theory", "tables", "ablations", "defaults")) -> dict[str, Any]:
    """Run every part of ``s`` and return the results (what :mod:`.report` writes)."""
    t0 = time.perf_counter()
    res: dict[str, Any] = {"settings": s, "timings": {}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stack = contextlib.ExitStack()
    try:
        phase1: list[Job] = []
        if "tables" in parts or "ablations" in parts:
            for spec in s.tables:
                phase1 += grid_jobs(spec)
        if "defaults" in parts:
            phase1 += defaults_jobs(s)
        phase1.sort(key=_cost, reverse=True)
        pool = stack.enter_context(worker_pool(s.workers)) if s.workers > 1 else None
        theory_future = None
        if "theory" in parts:
            if pool is not None:  # in a worker, beside the first training runs
                theory_future = pool.submit(_timed_theory, s)
            else:
                res["theory"], res["timings"]["theory"] = _timed_theory(s, say)
        t = time.perf_counter()
        say(f"phase 1: {len(phase1)} training runs in {s.workers} worker(s)")
        cache: dict = {}
        runs = run_jobs(phase1, s.workers, say, cache, pool)
        if theory_future is not None:
            res["theory"], res["timings"]["theory"] = theory_future.result()
        chosen = {spec.name: choose_lrs(spec, runs) for spec in s.tables}
        phase2: list[Job] = []
        if "tables" in parts:
            for spec in s.tables:
                phase2 += seed_jobs(spec, chosen[spec.name])
        if "ablations" in parts and s.tables:
            phase2 += ablation_jobs(s, chosen[s.tables[0].name])
        phase2.sort(key=_cost, reverse=True)
        say(f"phase 2: {len(phase2)} training runs in {s.workers} worker(s)")
        runs += run_jobs(phase2, s.workers, say, cache, pool)
        res["timings"]["training"] = time.perf_counter() - t
    finally:
        stack.close()
        torch.set_num_threads(threads)
    res["runs"] = runs
    res["chosen_lr"] = chosen
    if "tables" in parts:
        res["tables"] = {spec.name: table_rows(spec, runs, chosen[spec.name]) for spec in s.tables}
    res["timings"]["total"] = time.perf_counter() - t0
    return res


def _print(msg: str) -> None:
    print(msg, flush=True)


def _timed_theory(s: Settings, say: Callable[[str], None] = _print) -> tuple[dict[str, Any], float]:
    t = time.perf_counter()
    return run_theory(s, say), time.perf_counter() - t


OLD_FULL_COST = 2_703_400.0  # total_cost of the full setting before the paper's cells were added (about 55 min, estimated)


def total_cost(s: Settings) -> float:
    """The summed :func:`_cost` of the distinct training runs of ``s`` (learning rates do not change it)."""
    jobs: list[Job] = []
    for spec in s.tables:
        jobs += grid_jobs(spec)
    jobs += defaults_jobs(s)
    for spec in s.tables:
        first = {(row, "-" if dev is None else dev.label): spec.grid(row)[0] for row, dev in spec.cells()}
        jobs += seed_jobs(spec, first)
    if s.tables:
        jobs += ablation_jobs(s, {(row, "-" if dev is None else dev.label): s.tables[0].grid(row)[0] for row, dev in s.tables[0].cells()})
    unique = {replace(j, tags=()) for j in jobs}
    return sum(_cost(j) for j in unique)


def _cost(job: Job) -> float:
    """A rough relative cost, to start the longest runs first."""
    per_step = {"fcn": 1.0, "cnn": 4.0}[job.model] * {"digital": 0.3, "asgd": 0.7, "rl": 1.0, "rl2": 1.0}[job.algorithm]
    if job.dataset == "digits":
        per_step *= 0.3
    n = job.max_steps if job.max_steps is not None else job.epochs * 1000
    return per_step * n
