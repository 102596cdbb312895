"""Accuracy runs: one model, one algorithm, one device, one learning rate and seed per :class:`Job`.

A job trains from scratch on tensors held in memory (Fashion-MNIST or scikit-learn's digits),
on the training split minus a validation split that is the same for every job (a fixed
permutation), and reports the accuracy on the validation split (used to choose learning
rates) and on the test split (what the tables show). Jobs run in worker processes, one torch
thread each (:func:`run_jobs`).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fastanalog as fa

from .common import analog_config

# Seed of the permutation that splits the validation samples off the training split.
SPLIT_SEED = 1234


@dataclass(frozen=True)
class DeviceSpec:
    """A response family at given parameters (``gamma`` is the family's shape parameter)."""

    family: str = "power"  # linear | power | exp
    tau: float = 0.6
    gamma: float = 0.5
    dw_min: float = 0.001
    c2c_std: float = 0.0

    def build(self) -> fa.ResponseDevice:
        common = dict(tau=self.tau, dw_min=self.dw_min, c2c_std=self.c2c_std)
        if self.family == "linear":
            return fa.LinearResponse(**common)
        if self.family == "power":
            return fa.PowerResponse(gamma=self.gamma, **common)
        if self.family == "exp":
            return fa.ExpResponse(gamma=self.gamma, **common)
        raise ValueError(f"unknown response family {self.family!r}: choose linear, power or exp")

    @property
    def label(self) -> str:
        if self.family == "linear":
            base = f"linear tau {self.tau:g}"
        else:
            base = f"{self.family} gamma_res {self.gamma:g}, tau {self.tau:g}"
        return base + (f", c2c {self.c2c_std:g}" if self.c2c_std else "")


@dataclass(frozen=True)
class Job:
    """One training run."""

    model: str  # fcn | cnn
    dataset: str  # fashion-mnist | digits
    algorithm: str  # digital | asgd | rl | rl2
    device: DeviceSpec
    lr: float
    seed: int
    epochs: int
    batch: int
    n_train: int | None = None  # training samples used (None: all but the validation split)
    n_val: int = 0
    update: str | None = None  # None: the library's default; "batch": the batch-mode column
    gamma: float = 0.1
    transfer_lr: float = 0.1
    read_noise: float = 0.0
    max_steps: int | None = None
    tags: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def config(self) -> fa.AnalogConfig:
        kwargs: dict[str, Any] = {}
        if self.algorithm in ("rl", "rl2"):
            kwargs.update(gamma=self.gamma, transfer_lr=self.transfer_lr, read_noise=self.read_noise)
        return analog_config(self.algorithm, self.device.build(), update=self.update, **kwargs)


# ----- data -----------------------------------------------------------------------------------
_DATA: dict[str, tuple[torch.Tensor, ...]] = {}


def load_data(dataset: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of ``dataset``, cached per process."""
    if dataset not in _DATA:
        from ..train.data import load_digits, load_fashion_mnist

        if dataset == "fashion-mnist":
            xtr, ytr = load_fashion_mnist(train=True)
            xte, yte = load_fashion_mnist(train=False)
        elif dataset == "digits":
            xtr, ytr = load_digits(train=True)
            xte, yte = load_digits(train=False)
        else:
            raise ValueError(f"unknown dataset {dataset!r}: choose fashion-mnist or digits")
        _DATA[dataset] = (xtr, ytr, xte, yte)
    return _DATA[dataset]  # type: ignore[return-value]


def splits(job: Job) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Train, validation and test tensors of ``job`` (validation: the first ``n_val`` of a fixed permutation)."""
    xtr, ytr, xte, yte = load_data(job.dataset)
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_idx = perm[: job.n_val]
    train_idx = perm[job.n_val :]
    if job.n_train is not None:
        train_idx = train_idx[: job.n_train]
    return (xtr[train_idx], ytr[train_idx]), (xtr[val_idx], ytr[val_idx]), (xte, yte)


def build_model(job: Job, x: torch.Tensor) -> nn.Module:
    from ..train.models import MLP, SmallCNN

    if job.model == "fcn":
        return MLP(in_features=x[0].numel(), num_classes=10)
    if job.model == "cnn":
        return SmallCNN(in_channels=x.shape[1], num_classes=10, image_size=x.shape[-1])
    raise ValueError(f"unknown model {job.model!r}: choose fcn or cnn")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    if len(y) == 0:
        return float("nan")
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    model.train()
    return correct / len(y)


def train_job(job: Job) -> dict[str, Any]:
    """Train ``job`` and return its result row (accuracies as fractions, ``diverged`` when the loss went non-finite)."""
    (x, y), (xv, yv), (xt, yt) = splits(job)
    torch.manual_seed(job.seed)
    model = build_model(job, x)
    if job.algorithm != "digital":
        model = fa.convert_to_analog(model, job.config())
        opt: torch.optim.Optimizer = fa.AnalogSGD(model.parameters(), lr=job.lr, seed=job.seed)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=job.lr)
    gen = torch.Generator().manual_seed(job.seed)
    steps = 0
    diverged = False
    t0 = time.perf_counter()
    c0 = time.process_time()
    last_loss = float("nan")
    for _ in range(job.epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), job.batch):
            idx = order[i : i + job.batch]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if not torch.isfinite(loss):
                diverged = True
                break
            loss.backward()
            try:
                opt.step()
            except FloatingPointError:
                diverged = True
                break
            last_loss = float(loss.detach())
            steps += 1
            if job.max_steps is not None and steps >= job.max_steps:
                break
        if diverged or (job.max_steps is not None and steps >= job.max_steps):
            break
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    row = job_row(job)
    row.update(
        steps=steps,
        train_loss=last_loss,
        val_acc=float("nan") if diverged else accuracy(model, xv, yv),
        test_acc=0.1 if diverged else accuracy(model, xt, yt),
        diverged=diverged,
        wall_s=round(wall, 2),
        cpu_s=round(cpu, 2),
    )
    return row


def job_row(job: Job) -> dict[str, Any]:
    """The job's settings as a flat dict (for CSV rows)."""
    d = asdict(job)
    dev = d.pop("device")
    tags = dict(d.pop("tags"))
    d["response"] = job.device.label
    d.update({f"device_{k}": v for k, v in dev.items()})
    d["update"] = job.update or "default"
    d.update(tags)
    return d


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` fresh processes (spawned: no inherited thread state) of one torch thread each."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(1,))


def run_jobs(
    jobs: Sequence[Job],
    workers: int,
    progress: Callable[[str], None] | None = None,
    cache: dict[Job, dict[str, Any]] | None = None,
    pool: ProcessPoolExecutor | None = None,
) -> list[dict[str, Any]]:
    """Run ``jobs`` (in ``workers`` processes of one torch thread each; 1: in this process) and return their rows in order.

    Jobs that differ in their tags only run once; ``cache`` (Job without tags -> row) carries
    results between calls, so a run already made is not made again.
    """
    if not jobs:
        return []
    say = progress or (lambda s: None)
    cache = {} if cache is None else cache
    todo: dict[Job, Job] = {}
    for job in jobs:
        key = replace(job, tags=())
        if key not in cache and key not in todo:
            todo[key] = job
    for key, row in zip(todo, _run_unique(list(todo.values()), workers, say, pool)):
        cache[key] = row
    out = []
    for job in jobs:
        row = dict(cache[replace(job, tags=())])
        for k in ("table", "row", "ablation", "level", "defaults"):
            row.pop(k, None)
        row.update(dict(job.tags))
        out.append(row)
    return out


def _run_unique(jobs: Sequence[Job], workers: int, say: Callable[[str], None], pool: ProcessPoolExecutor | None) -> list[dict[str, Any]]:
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i, job in enumerate(jobs):
                results[i] = train_job(job)
                say(_describe(i, len(jobs), results[i]))
        finally:
            torch.set_num_threads(threads)
    else:
        own = pool is None
        pool = worker_pool(workers) if own else pool
        try:
            futures = {pool.submit(train_job, job): i for i, job in enumerate(jobs)}
            for done, fut in enumerate(as_completed(futures)):
                i = futures[fut]
                results[i] = fut.result()
                say(_describe(done, len(jobs), results[i]))
        finally:
            if own:
                pool.shutdown()
    return [r for r in results if r is not None]


def _describe(i: int, n: int, r: dict[str, Any]) -> str:
    acc = "diverged" if r["diverged"] else f"test {100 * r['test_acc']:.2f}%"
    what = r["algorithm"] if r["algorithm"] == "digital" else f"{r['algorithm']} ({r['response']}"
    if r["algorithm"] in ("rl", "rl2"):
        what += f", gamma {r['gamma']:g}, transfer_lr {r['transfer_lr']:g}"
        what += f", read noise {r['read_noise']:g}" if r["read_noise"] else ""
    what += ")" if r["algorithm"] != "digital" else ""
    return f"  [{i + 1}/{n}] {r['model']} {r['dataset']} {what}, lr {r['lr']:g}, seed {r['seed']}: {acc} in {r['wall_s']:.0f} s"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
