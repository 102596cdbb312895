"""``fastanalog bench step``: the optimizer step alone, on whole timm models.

For each model and algorithm: one backward pass leaves gradients in an analog copy
and in a plain copy of the same model; then ``AnalogSGD.step`` and
``torch.optim.SGD(foreach=True).step`` are timed interleaved, again and again on the
same gradients (the steps move the weights, which does not matter for timing). The
figure is the analog step time over the SGD step time, per algorithm. Each analog
algorithm is timed twice: writing per sample (the default ``AnalogConfig.update``: the
backward pass leaves A, and the first write carries its opposite-pulse pairs) and in
batch mode (row ``<algorithm> (batch)``: one write of the mini-batch gradient, the bytes
of SGD plus the analog arrays).

Two columns say what the ratio is made of: the time of AnalogSGD's check that every gradient
is finite (the pass over all gradients it makes before it writes anything; SGD makes none),
timed in the same interleaving, over the SGD step time; and the share of the analog weights'
gradient elements that are exactly zero (they send no pulse, whatever their random number;
the C++ kernels draw none for a block of 256 elements that are all zero, and asgd leaves its
W unwritten where the write would not change it).

A second figure is the launch count of one step, read from ``torch.profiler``: on
CUDA the GPU kernels; on CPU the calls of ``fastanalog::*`` custom ops when a
compiled backend serves the update, else (the plain-PyTorch reference backend) the
torch ops issued at the top level of the step. The CSV says which in
``*_launch_kind``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import fastanalog as fa
from fastanalog.optim import _all_finite, _step_gradients

from .common import (
    MS,
    TINY_RESNET,
    TINY_VIT,
    ModelSpec,
    Panel,
    Report,
    Stats,
    analog_config,
    count_params,
    device_note,
    device_range,
    measure_interleaved,
    ratio_stats,
    stats_columns,
    stats_names,
    synchronizer,
)

# Full-size models: timm's default 1000-class heads; the ViT sized to 32x32 inputs to keep the one backward cheap.
STEP_MODELS: dict[str, ModelSpec] = {
    "resnet": ModelSpec("resnet50", "resnet50", (), (3, 32, 32), 2, 1000),
    "vit": ModelSpec("vit_small_patch16_224", "vit_small_patch16_224", (("img_size", 32),), (3, 32, 32), 2, 1000),
}
TINY_STEP_MODELS: dict[str, ModelSpec] = {"resnet": TINY_RESNET, "vit": TINY_VIT}

# Learning rate of both optimizers (any positive value; the timing does not depend on it).
LR = 0.01
# Learning rate of the plain SGD steps a model may take before its gradients are made (--warm-steps).
WARM_LR = 0.01

COLUMNS = [
    "model",
    "params",
    "analog_layers",
    "algorithm",
    "tau",
    "warm_steps",
    *stats_names("analog_ms"),
    *stats_names("sgd_ms"),
    *stats_names("ratio"),
    *stats_names("check_ratio"),
    *stats_names("unplanned_ratio"),
    "zero_grad_fraction",
    "analog_launches",
    "analog_launch_kind",
    "sgd_launches",
    "sgd_launch_kind",
    "warmup",
    "repeats",
]


def _is_wrapper(name: str) -> bool:
    """Profiler ranges that torch wraps around ``Optimizer.step`` (not ops themselves)."""
    return name.startswith("Optimizer.")


def count_launches(fn: Callable[[], Any], device: torch.device, *, custom_ops: bool = True) -> tuple[int, str]:
    """Run ``fn`` once under ``torch.profiler`` and count what it launches; return ``(count, kind)``.

    ``kind`` is ``cuda kernels`` on CUDA; on CPU ``fastanalog:: op calls`` when
    ``custom_ops`` and any were called, else ``top-level torch ops`` (the ops called
    directly by ``fn``, not counting the ``Optimizer.step`` range torch wraps around it).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = synchronizer(device)
    sync()
    with profile(activities=activities) as prof:
        fn()
        sync()
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == DeviceType.CUDA), "cuda kernels"
    if custom_ops:
        n = sum(1 for e in events if e.name.startswith("fastanalog::"))
        if n:
            return n, "fastanalog:: op calls"
    top = 0
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        parent = e.cpu_parent
        if parent is None:
            top += not _is_wrapper(e.name)
        elif parent.cpu_parent is None and _is_wrapper(parent.name):
            top += 1
    return top, "top-level torch ops"


def _backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def _train_digital(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """``steps`` plain SGD steps of ``model`` on ``(x, y)`` (``WARM_LR``): gradients then come from a model that has
    left its initialisation (a fresh timm ResNet passes none into its blocks' convolutions)."""
    opt = torch.optim.SGD(model.parameters(), lr=WARM_LR)
    for _ in range(steps):
        _backward(model, x, y)
        opt.step()
    model.zero_grad(set_to_none=True)


def bench_model(
    spec: ModelSpec,
    algorithms: Sequence[str],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    seed: int = 0,
    warm_steps: int = 0,
) -> list[dict[str, Any]]:
    """Time ``AnalogSGD.step`` against ``SGD(foreach=True).step`` on ``spec`` for each algorithm; one row each.

    ``warm_steps``: plain SGD steps the digital model takes before the gradients are made.
    """
    torch.manual_seed(seed)
    base = spec.build().to(device)
    x, y = spec.data(device, seed)
    _train_digital(base, x, y, warm_steps)
    tau = device_range(base)
    sync = synchronizer(device)

    sgd_model = copy.deepcopy(base)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=LR, foreach=True)
    _backward(sgd_model, x, y)
    sgd_launches, sgd_kind = count_launches(sgd.step, device, custom_ops=False)

    rows = []
    for _, label, config in _configs(algorithms, tau):
        model = fa.convert_to_analog(copy.deepcopy(base), config)
        opt = fa.AnalogSGD(model.parameters(), lr=LR, seed=seed)
        _backward(model, x, y)
        grads = _step_gradients(opt.param_groups)  # the list the step checks
        zero_fraction = _zero_fraction(model)

        fns = {"analog": opt.step, "sgd": sgd.step, "check": functools.partial(_all_finite, grads)}
        times = measure_interleaved(fns, warmup=warmup, repeats=repeats, sync=sync)
        # The same step without the plan of its parameters, against the step as it runs: a pair of its own,
        # so that the figures above are timed as before.
        unplanned = fa.AnalogSGD(model.parameters(), lr=LR, seed=seed)
        unplanned._planned = False
        pair = measure_interleaved({"analog": opt.step, "unplanned": unplanned.step}, warmup=warmup, repeats=repeats, sync=sync)
        launches, kind = count_launches(opt.step, device)
        analog_ms = Stats.of(times["analog"]).scaled(MS)
        sgd_ms = Stats.of(times["sgd"]).scaled(MS)
        ratio = ratio_stats(times["analog"], times["sgd"])
        check_ratio = ratio_stats(times["check"], times["sgd"])
        unplanned_ratio = ratio_stats(pair["unplanned"], pair["analog"])
        rows.append(
            {
                "model": spec.label,
                "params": count_params(base),
                "analog_layers": sum(1 for _ in fa.analog_layers(model)),
                "algorithm": label,
                "tau": tau,
                "warm_steps": warm_steps,
                **stats_columns("analog_ms", analog_ms),
                **stats_columns("sgd_ms", sgd_ms),
                **stats_columns("ratio", ratio),
                **stats_columns("check_ratio", check_ratio),
                **stats_columns("unplanned_ratio", unplanned_ratio),
                "zero_grad_fraction": zero_fraction,
                "analog_launches": launches,
                "analog_launch_kind": kind,
                "sgd_launches": sgd_launches,
                "sgd_launch_kind": sgd_kind,
                "warmup": warmup,
                "repeats": repeats,
            }
        )
        print(
            f"  {spec.label} / {label}: AnalogSGD.step {analog_ms.median:.3g} ms, SGD.step {sgd_ms.median:.3g} ms, "
            f"ratio {ratio.median:.3g} (gradient check {check_ratio.median:.3g}), {launches} {kind}",
            flush=True,
        )
        del model, opt, unplanned
    return rows


def _zero_fraction(model: torch.nn.Module) -> float:
    """The share of the analog layers' weight-gradient elements that are exactly zero (0 without analog layers).

    The layers of ``algorithm="digital"`` count too: the same backward pass, the same gradients.
    """
    zero = total = 0
    for _, layer in fa.analog_layers(model):
        g = layer.weight.grad
        if g is not None:
            zero += int((g == 0).sum())
            total += g.numel()
    return zero / total if total else 0.0


def _configs(algorithms: Sequence[str], tau: float) -> list[tuple[str, str, Any]]:
    """(algorithm, row label, config): each analog algorithm per sample (the default) and in batch mode."""
    out = []
    for algorithm in algorithms:
        config = analog_config(algorithm, tau)
        out.append((algorithm, algorithm, config))
        if config.is_analog:
            out.append((algorithm, f"{algorithm} (batch)", dataclasses.replace(config, update="batch")))
    return out


def row_labels(algorithms: Sequence[str]) -> list[str]:
    """The rows' algorithm labels, in order: each analog algorithm and its batch-mode twin."""
    return [label for _, label, _ in _configs(algorithms, 1.0)]


def _stats(row: dict[str, Any], prefix: str) -> Stats:
    return Stats(row[f"{prefix}_median"], row[f"{prefix}_min"], row[f"{prefix}_max"], row["repeats"])


def run_step(
    *,
    models: Sequence[str],
    algorithms: Sequence[str],
    device: torch.device,
    warmup: int,
    repeats: int,
    tiny: bool,
    warm_steps: int = 0,
) -> Report:
    """Run the step benchmark on the named models (keys of :data:`STEP_MODELS`) and build its report.

    ``warm_steps``: plain SGD steps each model takes on its batch before the gradients are made (0: a fresh model).
    """
    table = TINY_STEP_MODELS if tiny else STEP_MODELS
    specs = [table[m] for m in models]
    rows: list[dict[str, Any]] = []
    for spec in specs:
        print(f"step: {spec.label} ({'tiny' if tiny else 'full'} size), algorithms {', '.join(algorithms)}", flush=True)
        rows += bench_model(spec, algorithms, device, warmup=warmup, repeats=repeats, warm_steps=warm_steps)

    groups = [s.label for s in specs]
    algorithms = row_labels(algorithms)

    def bars(key: Callable[[dict[str, Any]], Stats | None], algorithm: str) -> list[Stats | None]:
        by_model = {r["model"]: r for r in rows if r["algorithm"] == algorithm}
        return [key(by_model[g]) if g in by_model else None for g in groups]

    ratio_panel = Panel(
        "AnalogSGD.step time / torch.optim.SGD(foreach=True).step time",
        "time ratio (median, min-max)",
        groups,
        {a: bars(lambda r: _stats(r, "ratio"), a) for a in algorithms},
    )
    launch_series = {a: bars(lambda r: Stats(r["analog_launches"], r["analog_launches"], r["analog_launches"], 1), a) for a in algorithms}
    sgd_by_model = {r["model"]: r["sgd_launches"] for r in rows}
    launch_series["SGD(foreach)"] = [Stats(sgd_by_model[g], sgd_by_model[g], sgd_by_model[g], 1) if g in sgd_by_model else None for g in groups]
    kinds = sorted({r["analog_launch_kind"] for r in rows})
    launch_panel = Panel(f"launches per step ({'; '.join(kinds)})", "count", groups, launch_series, baseline=None)

    notes = [
        f"Ratio: AnalogSGD.step time / torch.optim.SGD(foreach=True).step time on the same model and gradients, "
        f"repeat by repeat; median [min, max] over {repeats} repeats after {warmup} warm-up steps.",
        (
            f"Gradients: one backward pass of each model after {warm_steps} plain SGD steps (lr {WARM_LR:g}) on the same batch."
            if warm_steps
            else "Gradients: one backward pass of each freshly initialised model (timm's ResNets start with the last "
            "batch-norm scale of each block at zero, so their blocks' convolutions get none; --warm-steps N trains first)."
        ),
        "Gradient check / SGD.step: the part of AnalogSGD.step that checks every gradient for NaN and Inf before "
        "anything is written (timed alone, in the same interleaving). Zero gradients: the share of the analog "
        "weights' gradient elements that are exactly 0 after the one backward pass (they send no pulse; the C++ "
        "kernels draw no random numbers for 256-element blocks of them, and asgd's leave such a block's W "
        "unwritten where it would not change).",
        "Without the plan / with: AnalogSGD.step taking the general path at every step (no plan of its "
        "parameters kept between steps, fastanalog/step_plan.py; the same numbers) over the step as it runs, "
        "on the same model and gradients, timed interleaved with it after the other columns.",
        device_note(rows),
        "Launches: cuda kernels on GPU; on CPU fastanalog:: custom-op calls when a compiled backend serves the update, "
        "else the torch ops issued at the top level of the step (reference backend).",
    ]
    table_spec = [
        ("model", lambda r: r["model"]),
        ("params", lambda r: f"{r['params']:,}"),
        ("algorithm", lambda r: r["algorithm"]),
        ("AnalogSGD.step ms", lambda r: _stats(r, "analog_ms").fmt()),
        ("SGD.step ms", lambda r: _stats(r, "sgd_ms").fmt()),
        ("ratio", lambda r: _stats(r, "ratio").fmt()),
        ("gradient check / SGD.step", lambda r: _stats(r, "check_ratio").fmt()),
        ("without the plan / with", lambda r: _stats(r, "unplanned_ratio").fmt()),
        ("zero gradients", lambda r: f"{float(r['zero_grad_fraction']):.0%}"),
        ("launches (analog / SGD)", lambda r: f"{r['analog_launches']} / {r['sgd_launches']} ({r['analog_launch_kind']})"),
    ]
    return Report("step", "Optimizer step: AnalogSGD over SGD(foreach)", COLUMNS, rows, table_spec, [ratio_panel, launch_panel], notes)
