"""``fastanalog bench train``: end-to-end training steps, analog over digital.

One training step is ``zero_grad``, forward, cross-entropy, backward and ``step``. For
each model, the analog model (``convert_to_analog`` + ``AnalogSGD``) and the digital
one (the same initial weights, plain modules + ``torch.optim.SGD``) are timed
interleaved on the same fixed batch; the figure is analog time over digital time. The
analog model writes per sample (the default ``AnalogConfig.update``); the same model in
batch mode is timed in the same interleaving, and the cost of per-sample writes is the
per-sample step time over the batch-mode one. For rl and rl2 a third copy runs in batch
mode with ``mixed_weight="stored"`` (the step's kernels write ``W + gamma * P`` into a
buffer, and forward and backward read it instead of mixing the two arrays in each pass).

Peak memory, analog over digital: on CUDA ``torch.cuda.max_memory_allocated`` of a
few training steps, in this process. On CPU every configuration runs in a fresh
process (one worker started for the benchmark imports torch, then forks one child per
configuration; glibc's mmap threshold pinned, see ``MALLOC_ENV``), which reads its own
peak resident set size (``VmHWM``, else
``getrusage(RUSAGE_SELF).ru_maxrss``). Each measurement first runs one warm-up step
of its configuration on a two-sample batch and frees it, so the libraries' pages are
resident before the baseline is taken; then it builds the model and, on Linux, resets
the peak (``/proc/self/clear_refs``), so that the transient of the conversion (the
digital weights and their analog copies side by side) does not count, only what
training holds. The figure compares the peaks above those baselines (the
configuration's own data), and the CSV keeps the absolute peaks too.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import fastanalog as fa
from fastanalog.nn.layers import _UNFOLD_MAX_POSITIONS, _UNFOLD_MIN_CHANNELS, _conv_bf16_product, sample_abs_dtype

from .common import (
    MS,
    REPO_ROOT,
    TINY_RESNET,
    TINY_VIT,
    ModelSpec,
    Panel,
    Report,
    Stats,
    analog_config,
    backend_name,
    count_params,
    device_note,
    device_range,
    linear_spec,
    measure_interleaved,
    ratio_stats,
    set_threads,
    stats_columns,
    stats_names,
    synchronizer,
)

TRAIN_MODELS: dict[str, ModelSpec] = {
    "linear": linear_spec(1024, 128),
    "resnet": ModelSpec("resnet18", "resnet18", (("num_classes", 10),), (3, 32, 32), 32, 10),
    "vit": ModelSpec(
        "vit_tiny_p4", "vit_tiny_patch16_224", (("img_size", 32), ("patch_size", 4), ("num_classes", 10)), (3, 32, 32), 32, 10
    ),
}
TINY_TRAIN_MODELS: dict[str, ModelSpec] = {"linear": linear_spec(64, 8), "resnet": TINY_RESNET, "vit": TINY_VIT}

# Learning rate of both optimizers.
LR = 0.01
# Training steps each memory measurement runs (the first allocates gradients and optimizer state).
MEMORY_STEPS = 2
# Name of the digital baseline in memory jobs.
BASELINE = "torch"
# Prefix of the worker's result line on stdout.
_RESULT_TAG = "FASTANALOG_BENCH_MEMORY "
MB = 1 / 2**20

# The phase columns: forward and backward, and the optimizer step, of batch mode (and of batch mode
# with the stored mixed weight) over the digital step's, repeat by repeat.
PHASE_COLUMNS = {
    "batch_fwdbwd_ratio": ("batch", "fwdbwd"),
    "batch_step_ratio": ("batch", "step"),
    "stored_fwdbwd_ratio": ("stored", "fwdbwd"),
    "stored_step_ratio": ("stored", "step"),
}


COLUMNS = [
    "model",
    "batch",
    "params",
    "algorithm",
    "tau",
    *stats_names("analog_ms"),
    *stats_names("digital_ms"),
    *stats_names("ratio"),
    *stats_names("batch_mode_ms"),
    *stats_names("sample_ratio"),
    *stats_names("batch_ratio"),
    *stats_names("stored_ms"),
    *stats_names("stored_ratio"),
    *(name for column in PHASE_COLUMNS for name in stats_names(column)),
    "sample_dtype",
    "analog_peak_mb",
    "digital_peak_mb",
    "analog_mem_mb",
    "digital_mem_mb",
    "mem_ratio",
    "arrays_mb",
    "mem_goal",
    "batch_mem_ratio",
    "stored_mem_ratio",
    "mem_kind",
    "warmup",
    "repeats",
]


def sample_dtype_note(device: torch.device) -> str:
    """How the layers compute A on ``device`` for float32 models (linear layers; convolutions), e.g.
    ``linear bfloat16 factors with float32 sums; conv float32 (...)``."""
    mixed = "bfloat16 factors with float32 sums"

    def one(conv: bool) -> str:
        dtype = sample_abs_dtype(device, torch.float32, conv=conv)
        if dtype == torch.bfloat16 and device.type == "cpu" and not conv:
            return mixed
        return str(dtype).removeprefix("torch.")

    conv = one(True)
    if device.type == "cpu" and conv == "float32" and _conv_bf16_product():
        conv += (
            f" ({mixed} for 1x1 kernels and where a sample has at most {_UNFOLD_MAX_POSITIONS} output positions"
            f" and the layer {_UNFOLD_MIN_CHANNELS}+ channels)"
        )
    return f"linear {one(False)}; conv {conv}"


# ----- models and steps --------------------------------------------------------------------
def build_pair(
    spec: ModelSpec,
    algorithm: str,
    device: torch.device,
    seed: int = 0,
    update: str | None = None,
    mixed_weight: str | None = None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, float]:
    """``(model, optimizer, tau)`` for ``algorithm`` (``update``, ``mixed_weight``: those options of the config,
    None for their defaults), or for the plain-torch baseline when it is ``torch``."""
    torch.manual_seed(seed)
    model = spec.build().to(device)
    tau = device_range(model)
    if algorithm == BASELINE:
        return model, torch.optim.SGD(model.parameters(), lr=LR), tau
    config = analog_config(algorithm, tau)
    if update is not None:
        config = dataclasses.replace(config, update=update)
    if mixed_weight is not None:
        config = dataclasses.replace(config, mixed_weight=mixed_weight)
    model = fa.convert_to_analog(model, config)
    return model, fa.AnalogSGD(model.parameters(), lr=LR, seed=seed), tau


def train_step_fn(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    phases: dict[str, list[float]] | None = None,
    sync: Callable[[], None] | None = None,
) -> Callable[[], None]:
    """One training step (zero_grad, forward, cross-entropy, backward, step) as a callable.

    With ``phases``, each call appends the seconds of zero_grad, forward and backward to
    ``phases["fwdbwd"]`` and of the optimizer step to ``phases["step"]`` (``sync``, e.g.
    ``torch.cuda.synchronize``, runs at the boundary between the two).
    """
    sync = sync or (lambda: None)
    if phases is not None:
        phases.setdefault("fwdbwd", [])
        phases.setdefault("step", [])

    def step() -> None:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        if phases is not None:
            sync()
            phases["fwdbwd"].append(t1 - t0)
            phases["step"].append(time.perf_counter() - t1)

    return step


# ----- memory ----------------------------------------------------------------------------
def _rss_now() -> int:
    """Resident set size of this process now, bytes (Linux ``/proc``; else the peak so far)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _rss_peak()


def _rss_peak() -> int:
    """Peak resident set size of this process, bytes: Linux ``VmHWM`` (which ``_reset_rss_peak`` resets), else ``ru_maxrss``."""
    import resource

    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _reset_rss_peak() -> None:
    """Start the peak resident size anew from the current size (Linux 4.0+; elsewhere the peak stays)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def memory_job(
    spec: ModelSpec,
    algorithm: str,
    device: torch.device,
    threads: int | None,
    steps: int = MEMORY_STEPS,
    options: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A memory measurement of ``spec`` trained with ``algorithm`` (``torch``: the digital baseline), as plain JSON data
    (``options``: config options of :func:`build_pair`, e.g. ``{"update": "batch"}``)."""
    return {
        "spec": dataclasses.asdict(spec),
        "algorithm": algorithm,
        "device": str(device),
        "threads": threads,
        "steps": steps,
        "options": dict(options or {}),
    }


def spec_from_json(data: dict[str, Any]) -> ModelSpec:
    """The :class:`ModelSpec` of ``dataclasses.asdict(spec)`` after a JSON round trip (lists back to tuples)."""

    def tup(v: Any) -> Any:
        return tuple(tup(x) for x in v) if isinstance(v, list) else v

    return ModelSpec(**{k: tup(v) for k, v in data.items()})


def _release_freed_heap() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``), so the resident size reflects live data."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _warm_up(spec: ModelSpec, algorithm: str, device: torch.device, options: dict[str, str]) -> None:
    """One training step of the configuration on a batch of (at most) two samples, then free it.

    It loads the code the measured steps run (library pages, kernels, lazy
    initialisations), so the baseline taken after it holds them and the measured peak
    above the baseline is the configuration's own data.
    """
    small = dataclasses.replace(spec, batch=min(2, spec.batch))
    model, opt, _ = build_pair(small, algorithm, device, **options)
    x, y = small.data(device)
    train_step_fn(model, opt, x, y)()
    del model, opt, x, y


def run_memory_job(job: dict[str, Any]) -> dict[str, Any]:
    """Build one configuration, run a few training steps; return its peak and baseline memory in bytes.

    ``job`` (see :func:`memory_job`) holds ``spec``, ``algorithm`` (or ``torch`` for
    the digital baseline), ``device``, ``threads``, ``steps`` and ``options``. The baseline is taken
    after a warm-up step on a two-sample batch (see :func:`_warm_up`).
    """
    set_threads(job.get("threads"))
    device = torch.device(job["device"])
    spec = spec_from_json(job["spec"])
    cuda = device.type == "cuda"
    options = job.get("options") or {}
    _warm_up(spec, job["algorithm"], device, options)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        _release_freed_heap()
        baseline = _rss_now()
    model, opt, _ = build_pair(spec, job["algorithm"], device, **options)
    arrays = extra_array_bytes(model)
    x, y = spec.data(device)
    step = train_step_fn(model, opt, x, y)
    if cuda:  # the peak of training, not of the conversion
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _release_freed_heap()
        _reset_rss_peak()
    for _ in range(job["steps"]):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del model, opt, x, y, step
        torch.cuda.empty_cache()
    else:
        peak = _rss_peak()
    return {"peak": int(peak), "baseline": int(baseline), "arrays": int(arrays)}


# Layer buffers an analog model holds beyond its digital twin's tensors: P, H and a stored mixed weight.
EXTRA_ARRAYS = ("analog_residual", "analog_buffer", "analog_mixed")
# The per-sample companion parameter: its data and its gradient A are two more arrays.
COMPANION = "analog_abs"


def extra_array_bytes(model: torch.nn.Module) -> int:
    """Bytes of the arrays an analog ``model`` keeps beyond the digital one's (``EXTRA_ARRAYS``, and the per-sample
    companion with its gradient A)."""
    buffers = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if name.rsplit(".", 1)[-1] in EXTRA_ARRAYS)
    companions = sum(2 * p.numel() * p.element_size() for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == COMPANION)
    return buffers + companions


def _run_forked(job: dict[str, Any]) -> dict[str, Any]:
    """Run ``job`` in a forked child of this (fresh) worker and return what it reports."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: measure, report through the pipe, leave without running any parent clean-up
        os.close(read_fd)
        try:
            payload = json.dumps(run_memory_job(job))
        except BaseException as e:  # every failure, even an interrupt, is reported to the parent
            payload = json.dumps({"error": f"{type(e).__name__}: {e}"})
        data = payload.encode()
        while data:
            data = data[os.write(write_fd, data) :]
        os.close(write_fd)
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"error": f"the measuring process ended without a result (wait status {status})"}
    return json.loads(b"".join(chunks))


def memory_worker_main() -> None:
    """Entry of the fresh worker process: read jobs (JSON) from stdin, print the results line."""
    jobs = json.loads(sys.stdin.read())
    # Load what the configurations use once, before forking: timm (when a job needs it) and the CPU
    # update backend (no torch op runs here, so no thread pool exists to be lost in the children).
    if any(job["spec"]["timm_name"] for job in jobs):
        importlib.import_module("timm")
    backend_name(torch.device("cpu"))
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)  # an optimizer's first construction imports torch._dynamo
    results = [_run_forked(job) if hasattr(os, "fork") else run_memory_job(job) for job in jobs]
    print(_RESULT_TAG + json.dumps(results), flush=True)


# glibc's malloc raises its mmap threshold as large blocks are freed, and then keeps such blocks
# resident after free: the peak RSS would count what the allocator retains, not what training
# holds. Pinning the threshold (which also turns its adjustment off) returns every block of
# 64 KiB and more to the system when freed, for the analog and the digital runs alike.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _run_worker(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    env = {**os.environ, **MALLOC_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-c", "from fastanalog.bench.train import memory_worker_main; memory_worker_main()"]
    proc = subprocess.run(cmd, input=json.dumps(jobs), capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"the memory-measuring process failed (exit status {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(_RESULT_TAG) :])


def measure_memory(jobs: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """Peak and baseline memory (bytes) of each job: in this process on CUDA, in fresh processes on CPU."""
    if device.type == "cuda":
        return [run_memory_job(job) for job in jobs]
    if hasattr(os, "fork"):
        return _run_worker(jobs)  # one fresh worker, one forked child per job
    return [r for job in jobs for r in _run_worker([job])]  # no fork: one fresh process per job


# ----- the benchmark ---------------------------------------------------------------------
def _phase_columns(parts: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """The :data:`PHASE_COLUMNS` stats from the phase times of the timed rounds (empty where a variant was not timed)."""
    out: dict[str, Any] = {}
    digital = parts["digital"]
    for column, (variant, phase) in PHASE_COLUMNS.items():
        mine = parts.get(variant, {}).get(phase)
        out.update(stats_columns(column, ratio_stats(mine, digital[phase]) if mine else None))
    return out


def time_model(spec: ModelSpec, algorithms: Sequence[str], device: torch.device, *, warmup: int, repeats: int) -> list[dict[str, Any]]:
    """Time the training step of ``spec`` for each algorithm against the digital baseline; one row each (no memory yet)."""
    sync = synchronizer(device)
    x, y = spec.data(device)
    digital, digital_opt, tau = build_pair(spec, BASELINE, device)
    # The phases (forward and backward; the optimizer step) of the digital and the batch-mode steps.
    digital_phases: dict[str, list[float]] = {}
    digital_step = train_step_fn(digital, digital_opt, x, y, digital_phases, sync)
    rows = []

    def training_step(algorithm: str, record: dict[str, list[float]] | None = None, **options: str) -> Callable[[], None]:
        model, opt, _ = build_pair(spec, algorithm, device, **options)
        return train_step_fn(model, opt, x, y, record, sync)

    for algorithm in algorithms:
        for times in digital_phases.values():
            times.clear()
        # Every step timed records its phases (the per-sample one's are not reported), so that all
        # take the same path (on CUDA a synchronisation between backward and the optimizer step).
        phases: dict[str, dict[str, list[float]]] = {"digital": digital_phases, "analog": {}, "batch": {}, "stored": {}}
        steps = {
            "analog": training_step(algorithm, phases["analog"]),
            "batch": training_step(algorithm, phases["batch"], update="batch"),
            "digital": digital_step,
        }
        if analog_config(algorithm, tau).has_residual:  # the mixed weight kept in a buffer (rl, rl2)
            steps["stored"] = training_step(algorithm, phases["stored"], update="batch", mixed_weight="stored")
        t = measure_interleaved(steps, warmup=warmup, repeats=repeats, sync=sync)
        parts = {name: {k: v[-repeats:] for k, v in rec.items()} for name, rec in phases.items() if rec}  # the timed rounds
        analog_ms, digital_ms = Stats.of(t["analog"]).scaled(MS), Stats.of(t["digital"]).scaled(MS)
        batch_ms = Stats.of(t["batch"]).scaled(MS)
        stored_ms = Stats.of(t["stored"]).scaled(MS) if "stored" in t else None
        stored_note = f", stored mixed weight {stored_ms.median:.3g}" if stored_ms else ""
        print(
            f"  {spec.label} / {algorithm}: analog {analog_ms.median:.3g} ms (batch mode {batch_ms.median:.3g}{stored_note}), "
            f"digital {digital_ms.median:.3g} ms per training step",
            flush=True,
        )
        rows.append(
            {
                "model": spec.label,
                "batch": spec.batch,
                "params": count_params(digital),
                "algorithm": algorithm,
                "tau": tau,
                **stats_columns("analog_ms", analog_ms),
                **stats_columns("digital_ms", digital_ms),
                **stats_columns("ratio", ratio_stats(t["analog"], t["digital"])),
                **stats_columns("batch_mode_ms", batch_ms),
                **stats_columns("sample_ratio", ratio_stats(t["analog"], t["batch"])),
                **stats_columns("batch_ratio", ratio_stats(t["batch"], t["digital"])),
                **stats_columns("stored_ms", stored_ms),
                **stats_columns("stored_ratio", ratio_stats(t["stored"], t["digital"]) if "stored" in t else None),
                **_phase_columns(parts),
                "sample_dtype": sample_dtype_note(device),
                "warmup": warmup,
                "repeats": repeats,
            }
        )
        del steps  # the models and optimizers of this algorithm
    return rows


# The configurations whose memory is measured beside the default (per-sample writes, transient
# mixed weight): batch mode, and for rl and rl2 batch mode with the stored mixed weight.
MEMORY_VARIANTS: dict[str, dict[str, str]] = {"": {}, "batch": {"update": "batch"}, "stored": {"update": "batch", "mixed_weight": "stored"}}


def _memory_variants(row: dict[str, Any]) -> list[str]:
    """The variants of :data:`MEMORY_VARIANTS` measured for ``row``: those it has times of."""
    if row["algorithm"] == "digital":
        return [""]
    return ["", "batch"] + (["stored"] if row.get("stored_ratio_median", "") != "" else [])


def add_memory(rows: list[dict[str, Any]], specs: Sequence[ModelSpec], device: torch.device, threads: int | None) -> None:
    """Measure peak memory of every model of ``specs`` (digital baseline and each algorithm of ``rows``, per sample,
    in batch mode and with the stored mixed weight); fill the rows' memory columns.

    On CPU all configurations share one fresh worker process (one forked child each).
    """
    by_label = {s.label: s for s in specs}
    keys = [(label, BASELINE, "") for label in by_label] + [(r["model"], r["algorithm"], v) for r in rows for v in _memory_variants(r)]
    keys = list(dict.fromkeys(keys))
    print(f"train: peak memory of {len(keys)} configurations", flush=True)
    jobs = [memory_job(by_label[label], algorithm, device, threads, options=MEMORY_VARIANTS[v]) for label, algorithm, v in keys]
    memory = dict(zip(keys, measure_memory(jobs, device)))
    errors = [f"{label} / {algorithm} {v}".rstrip() + f": {m['error']}" for (label, algorithm, v), m in memory.items() if "error" in m]
    if errors:
        raise RuntimeError("memory measurement failed: " + "; ".join(errors))
    mem_kind = "cuda max_memory_allocated" if device.type == "cuda" else "cpu peak RSS, fresh process"

    def extra(m: dict[str, Any]) -> int:
        return m["peak"] - m["baseline"]

    def ratio(key: tuple[str, str, str], dig_extra: int) -> float | str:
        if key not in memory:
            return ""
        return extra(memory[key]) / dig_extra if dig_extra > 0 else float("nan")

    for row in rows:
        model, algorithm = row["model"], row["algorithm"]
        mem, dig = memory[(model, algorithm, "")], memory[(model, BASELINE, "")]
        dig_extra = extra(dig)
        row.update(
            {
                "analog_peak_mb": mem["peak"] * MB,
                "digital_peak_mb": dig["peak"] * MB,
                "analog_mem_mb": extra(mem) * MB,
                "digital_mem_mb": dig_extra * MB,
                "mem_ratio": ratio((model, algorithm, ""), dig_extra),
                "arrays_mb": mem["arrays"] * MB,
                "mem_goal": 1 + mem["arrays"] / dig_extra if dig_extra > 0 else float("nan"),
                "batch_mem_ratio": ratio((model, algorithm, "batch"), dig_extra),
                "stored_mem_ratio": ratio((model, algorithm, "stored"), dig_extra),
                "mem_kind": mem_kind,
            }
        )


def _stats(row: dict[str, Any], prefix: str) -> Stats:
    return Stats(row[f"{prefix}_median"], row[f"{prefix}_min"], row[f"{prefix}_max"], row["repeats"])


def _mem_text(value: float | str) -> str:
    """A memory ratio of the table, ``-`` where the configuration was not measured."""
    return "-" if value == "" else f"{value:.3g}"


def _maybe_stats(row: dict[str, Any], prefix: str) -> Stats | None:
    """The statistics of ``prefix``, or None where the row has none (the stored mixed weight of asgd)."""
    return None if row[f"{prefix}_median"] == "" else _stats(row, prefix)


def run_train(
    *,
    models: Sequence[str],
    algorithms: Sequence[str],
    device: torch.device,
    warmup: int,
    repeats: int,
    tiny: bool,
    threads: int | None,
) -> Report:
    """Run the training-step benchmark on the named models (keys of :data:`TRAIN_MODELS`) and build its report."""
    table = TINY_TRAIN_MODELS if tiny else TRAIN_MODELS
    specs = [table[key] for key in models]
    rows: list[dict[str, Any]] = []
    for spec in specs:
        print(f"train: {spec.label} batch {spec.batch} ({'tiny' if tiny else 'full'} size), algorithms {', '.join(algorithms)}", flush=True)
        rows += time_model(spec, algorithms, device, warmup=warmup, repeats=repeats)
    add_memory(rows, specs, device, threads)

    groups = [table[k].label for k in models]

    def bars(key: Callable[[dict[str, Any]], Stats | None], algorithm: str) -> list[Stats | None]:
        by_model = {r["model"]: r for r in rows if r["algorithm"] == algorithm}
        return [key(by_model[g]) if g in by_model else None for g in groups]

    def mem(r: dict[str, Any]) -> Stats:
        return Stats(r["mem_ratio"], r["mem_ratio"], r["mem_ratio"], 1)

    panels = [
        Panel("training step time, analog / digital", "time ratio (median, min-max)", groups, {a: bars(lambda r: _stats(r, "ratio"), a) for a in algorithms}),
        Panel(
            "training step time in batch mode, analog / digital",
            "time ratio (median, min-max)",
            groups,
            {
                **{a: bars(lambda r: _stats(r, "batch_ratio"), a) for a in algorithms},
                **{
                    f"{a}, stored mixed weight": bars(lambda r: _maybe_stats(r, "stored_ratio"), a)
                    for a in algorithms
                    if any(r["algorithm"] == a and r["stored_ratio_median"] != "" for r in rows)
                },
            },
        ),
        Panel(
            "training step time, per-sample writes / batch-mode writes",
            "time ratio (median, min-max)",
            groups,
            {a: bars(lambda r: _stats(r, "sample_ratio"), a) for a in algorithms},
        ),
        Panel(f"peak memory above baseline, analog / digital ({rows[0]['mem_kind'] if rows else ''})", "memory ratio", groups, {a: bars(mem, a) for a in algorithms}),
    ]
    notes = [
        "Time ratio: one training step (zero_grad, forward, cross-entropy, backward, step) of the analog model "
        "(convert_to_analog + AnalogSGD) over the same step of the digital model (plain modules + torch.optim.SGD), "
        f"repeat by repeat; median [min, max] over {repeats} repeats after {warmup} warm-up steps. The analog model "
        "writes per sample (the default); 'per-sample / batch' is its step time over the same model's in batch mode "
        "(update='batch'), timed in the same interleaving, and 'batch / digital' its step time over the digital one; "
        "'batch, stored / digital' is the same for rl and rl2 with mixed_weight='stored' (the step writes the mixed "
        "weight W + gamma P into a buffer that forward and backward read; transient, the default, mixes W and P in "
        "forward and again in backward). 'fwd+bwd / step': where batch mode's time goes, the same interleaving's "
        "zero_grad, forward and backward over the digital model's, and its optimizer step over SGD's (medians of the "
        "repeat-by-repeat ratios; without the stored mixed weight, and with it). "
        + (
            f"The per-sample sums A are computed here as: {rows[0]['sample_dtype']}."
            if rows
            else ""
        ),
        f"Memory: peak during {MEMORY_STEPS} training steps, above the size after a freed two-sample warm-up step "
        + (
            "(torch.cuda.max_memory_allocated)."
            if device.type == "cuda"
            else "(ru_maxrss of a fresh process per configuration, glibc's mmap threshold pinned at 64 KiB so freed blocks "
            "leave the resident set)."
        )
        + " '1 + extra arrays': the memory ratio if the analog model held nothing beyond the digital one but its extra "
        "arrays (P, H, a stored mixed weight, and per sample the companion analog_abs and its gradient A). "
        "'mem ratio, batch / batch stored': the same ratio of the model in batch mode, and in batch mode with the "
        "stored mixed weight (rl, rl2), each in a process of its own.",
        device_note(rows),
    ]
    table_spec = [
        ("model", lambda r: r["model"]),
        ("batch", lambda r: str(r["batch"])),
        ("params", lambda r: f"{r['params']:,}"),
        ("algorithm", lambda r: r["algorithm"]),
        ("analog ms", lambda r: _stats(r, "analog_ms").fmt()),
        ("digital ms", lambda r: _stats(r, "digital_ms").fmt()),
        ("time ratio", lambda r: _stats(r, "ratio").fmt()),
        ("per-sample / batch", lambda r: _stats(r, "sample_ratio").fmt()),
        ("batch / digital", lambda r: _stats(r, "batch_ratio").fmt()),
        ("batch, stored / digital", lambda r: s.fmt() if (s := _maybe_stats(r, "stored_ratio")) else "-"),
        ("fwd+bwd / step, batch", lambda r: _phase_text(r, "batch")),
        ("fwd+bwd / step, stored", lambda r: _phase_text(r, "stored")),
        ("mem MB (analog / digital)", lambda r: f"{r['analog_mem_mb']:.1f} / {r['digital_mem_mb']:.1f}"),
        ("mem ratio", lambda r: f"{r['mem_ratio']:.3g}"),
        ("1 + extra arrays", lambda r: f"{r['mem_goal']:.3g}"),
        ("mem ratio, batch / batch stored", lambda r: " / ".join(_mem_text(r[k]) for k in ("batch_mem_ratio", "stored_mem_ratio"))),
    ]
    return Report("train", "Training step: analog over digital", COLUMNS, rows, table_spec, panels, notes)


def _phase_text(row: dict[str, Any], variant: str) -> str:
    """``forward+backward ratio / step ratio`` (medians) of ``variant`` ("batch" or "stored"), or "-"."""
    parts = [_maybe_stats(row, f"{variant}_{phase}_ratio") for phase in ("fwdbwd", "step")]
    return " / ".join(f"{p.median:.3g}" for p in parts) if all(parts) else "-"
