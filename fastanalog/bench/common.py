"""Shared pieces of the whole-model benchmarks: timing, environment record, result files.

Every figure a benchmark reports is a ratio of two things measured in the same
process: the callables being compared are timed interleaved (one call of each per
repeat, after the warm-up calls), and the ratio is taken repeat by repeat, so slow
drifts of a shared machine cancel. Ratios and times are reported as median, min and
max over the repeats.

Results go to a folder as ``<name>.csv`` (raw numbers plus the environment record in
every row), ``<name>.md`` (environment and a formatted table) and ``<name>.png`` (bar
chart of the ratios, min-max as error bars); the table is also printed.
"""

from __future__ import annotations

import csv
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..config import ALGORITHMS

# Root of the source checkout (where ``.git`` and ``benchmarks/`` live in a development install).
REPO_ROOT = Path(__file__).resolve().parents[2]

# Environment columns appended to every CSV row, in this order.
ENV_COLUMNS = ("machine", "cpu", "gpu", "threads", "torch", "triton", "timm", "python", "commit", "backend", "device")

# Seconds to milliseconds.
MS = 1e3


# ----- timing ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Stats:
    """Median, min and max of a sample (``n`` values)."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        """The statistics of ``values`` (at least one)."""
        if len(values) == 0:
            raise ValueError("Stats.of needs at least one value")
        return cls(float(statistics.median(values)), float(min(values)), float(max(values)), len(values))

    def scaled(self, factor: float) -> Stats:
        """The same statistics multiplied by ``factor`` (> 0), e.g. seconds to milliseconds."""
        return Stats(self.median * factor, self.min * factor, self.max * factor, self.n)

    def fmt(self, digits: int = 3) -> str:
        """``median [min, max]`` with ``digits`` significant digits."""
        return f"{_g(self.median, digits)} [{_g(self.min, digits)}, {_g(self.max, digits)}]"


def _g(x: float, digits: int) -> str:
    if not math.isfinite(x):
        return str(x)
    if x != 0 and (abs(x) >= 10 ** (digits + 2) or abs(x) < 10 ** -(digits - 1)):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the queued work of ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    warmup: int,
    repeats: int,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Time each callable of ``fns``, interleaved; return the seconds of every repeat, per name.

    Each round calls every callable once, in the order of ``fns``: ``warmup`` rounds
    untimed, then ``repeats`` timed rounds. ``sync`` (e.g. ``torch.cuda.synchronize``)
    runs before the clock starts and before it stops.
    """
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if not fns:
        raise ValueError("measure_interleaved needs at least one callable")
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio_stats(numerator: Sequence[float], denominator: Sequence[float]) -> Stats:
    """Statistics of the repeat-by-repeat ratios ``numerator[i] / denominator[i]``."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"ratio_stats needs two equally long, non-empty samples, got {len(numerator)} and {len(denominator)}")
    return Stats.of([a / b if b > 0 else math.inf for a, b in zip(numerator, denominator)])


def stats_columns(prefix: str, stats: Stats | None) -> dict[str, float | str]:
    """CSV columns ``<prefix>_median``, ``_min`` and ``_max`` (empty when ``stats`` is None)."""
    if stats is None:
        return {f"{prefix}_median": "", f"{prefix}_min": "", f"{prefix}_max": ""}
    return {f"{prefix}_median": stats.median, f"{prefix}_min": stats.min, f"{prefix}_max": stats.max}


def stats_names(prefix: str) -> list[str]:
    """The three column names :func:`stats_columns` writes for ``prefix``."""
    return [f"{prefix}_median", f"{prefix}_min", f"{prefix}_max"]


# ----- set-up ----------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``; a clear error when CUDA is asked for but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was given but torch sees no CUDA GPU: use --device cpu (or auto)")
        return torch.device("cuda")
    raise ValueError(f"unknown device {name!r}: choose auto, cpu or cuda")


def set_threads(threads: int | None) -> None:
    """Set torch's CPU thread count (None leaves torch's choice)."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    torch.set_num_threads(threads)


def parse_algorithms(text: str | Sequence[str]) -> list[str]:
    """Algorithms from a comma-separated string (or a list), validated and de-duplicated in order."""
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else [str(t).strip() for t in text]
    items = [t for t in items if t]
    if not items:
        raise ValueError(f"--algorithms is empty: give a comma-separated subset of {','.join(ALGORITHMS)}")
    bad = [t for t in items if t not in ALGORITHMS]
    if bad:
        raise ValueError(f"unknown algorithm(s) {', '.join(map(repr, bad))} in --algorithms: choose from {','.join(ALGORITHMS)}")
    return list(dict.fromkeys(items))


def parse_names(text: str | Sequence[str] | None, known: Sequence[str], option: str) -> list[str]:
    """Names from a comma-separated string (None: all of ``known``), each checked against ``known``."""
    if text is None:
        return list(known)
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else [str(t).strip() for t in text]
    items = [t for t in items if t]
    bad = [t for t in items if t not in known]
    if bad or not items:
        raise ValueError(f"{option} {text!r} names {', '.join(map(repr, bad)) or 'nothing'}: choose from {','.join(known)}")
    return list(dict.fromkeys(items))


def device_range(model: torch.nn.Module, floor: float = 0.6) -> float:
    """A device range ``tau`` covering every Linear/Conv weight of ``model`` (5% headroom, rounded up to 0.1)."""
    peak = 0.0
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
            peak = max(peak, float(module.weight.detach().abs().max()))
    return max(floor, math.ceil(peak * 1.05 * 10) / 10)


# ----- models ----------------------------------------------------------------------------
# Device of the analog arrays in the step and train benchmarks (the README's example device).
RESPONSE_GAMMA = 0.5
DW_MIN = 0.001
MIX_GAMMA = 0.1


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: ``nn.Linear(n, n)`` (``timm_name`` None) or a timm model, with its input batch.

    Attributes:
        label: the name in the results.
        timm_name: timm model name, or None for a single ``nn.Linear(n, n)`` with ``n = input_shape[0]``.
        kwargs: keyword arguments of ``timm.create_model`` (as pairs, so the spec stays hashable).
        input_shape: one sample's shape.
        batch: samples per step.
        num_classes: logits (cross-entropy targets are drawn in ``[0, num_classes)``).
    """

    label: str
    timm_name: str | None
    kwargs: tuple[tuple[str, Any], ...]
    input_shape: tuple[int, ...]
    batch: int
    num_classes: int

    def build(self) -> torch.nn.Module:
        """A freshly initialised model (seeded by the caller)."""
        if self.timm_name is None:
            return torch.nn.Linear(self.input_shape[0], self.num_classes)
        import timm

        return timm.create_model(self.timm_name, **dict(self.kwargs))

    def data(self, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed random batch ``(x, y)`` on ``device``."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((self.batch, *self.input_shape), generator=g)
        y = torch.randint(0, self.num_classes, (self.batch,), generator=g)
        return x.to(device), y.to(device)


def linear_spec(n: int, batch: int) -> ModelSpec:
    """``nn.Linear(n, n)`` trained on batches of ``batch`` samples."""
    return ModelSpec(f"linear{n}", None, (), (n,), batch, n)


# Smallest timm models (timm's own test models, narrowed further) for --tiny runs.
TINY_RESNET = ModelSpec(
    "test_resnet-tiny", "test_resnet", (("num_classes", 10), ("channels", (8, 8, 8, 8)), ("stem_width", 8)), (3, 16, 16), 2, 10
)
TINY_VIT = ModelSpec(
    "test_vit-tiny",
    "test_vit",
    (("num_classes", 10), ("img_size", 16), ("patch_size", 8), ("embed_dim", 16), ("depth", 1), ("num_heads", 2)),
    (3, 16, 16),
    2,
    10,
)


def analog_config(algorithm: str, tau: float):
    """The ``AnalogConfig`` of ``algorithm`` on the benchmark device (power response on ``[-tau, tau]``)."""
    import fastanalog as fa

    if algorithm == "digital":
        return fa.AnalogConfig(algorithm="digital")
    device = fa.PowerResponse(tau=tau, gamma=RESPONSE_GAMMA, dw_min=DW_MIN)
    return fa.AnalogConfig(algorithm=algorithm, device=device, gamma=MIX_GAMMA)


def device_note(rows: Sequence[Mapping[str, Any]]) -> str:
    """The notes' line on the analog device, with the range ``tau`` chosen for each model of ``rows``."""
    taus = ", ".join(f"{model} {tau:g}" for model, tau in dict((r["model"], r["tau"]) for r in rows).items())
    return (
        f"Analog device: PowerResponse(gamma={RESPONSE_GAMMA:g}, dw_min={DW_MIN:g}) on [-tau, tau], tau covering each "
        f"model's initial weights ({taus}); rl/rl2 mixing gamma={MIX_GAMMA:g}."
    )


def count_params(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----- environment -----------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU model name (from ``/proc/cpuinfo`` on Linux), else what ``platform`` knows, else ``unknown``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    """The installed version of distribution ``name``, or ``not installed``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit(root: Path = REPO_ROOT) -> str:
    """``git rev-parse HEAD`` of the checkout at ``root``, or ``unknown`` (no git, not a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else "unknown"


def backend_name(device: torch.device) -> str:
    """The name of the update backend fastanalog's dispatcher picks for a tensor on ``device``.

    A ``FASTANALOG_BACKEND`` that is invalid or cannot serve ``device`` raises
    ValueError with the dispatcher's message (which names the choices), so a benchmark
    fails before it measures anything.
    """
    from ..ops import dispatch

    try:
        return dispatch.backend_for(torch.empty(1, device=device))
    except RuntimeError as e:
        raise ValueError(str(e)) from e


def environment(device: torch.device) -> dict[str, str]:
    """The record written beside every result: machine, CPU/GPU, threads, versions, commit, backend, device."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return {
        "machine": platform.platform(),
        "cpu": cpu_model(),
        "gpu": gpu,
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "timm": package_version("timm"),
        "python": platform.python_version(),
        "commit": git_commit(),
        "backend": backend_name(device),
        "device": str(device),
    }


# ----- result files ----------------------------------------------------------------------
@dataclass
class Panel:
    """One bar chart: ``series[name][i]`` is the bar of group ``groups[i]`` (None: no bar)."""

    title: str
    ylabel: str
    groups: list[str]
    series: dict[str, list[Stats | None]]
    baseline: float | None = 1.0


@dataclass
class Report:
    """What a benchmark writes: rows for the CSV, a formatted table, notes and the plot panels.

    ``columns`` are the result columns of the CSV (the environment columns follow);
    ``table`` lists ``(header, formatter)`` pairs for the markdown table.
    """

    name: str
    title: str
    columns: list[str]
    rows: list[dict[str, Any]]
    table: list[tuple[str, Callable[[dict[str, Any]], str]]]
    panels: list[Panel]
    notes: list[str] = field(default_factory=list)


def prepare_out_dir(out: str | Path) -> Path:
    """Create the results folder ``out`` (with parents); a clear error if it is a file."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder: give a folder for the results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def markdown_table(report: Report) -> str:
    """The report's rows as a GitHub markdown table."""
    headers = [h for h, _ in report.table]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in report.rows:
        lines.append("| " + " | ".join(str(fmt(row)).replace("|", "/") for _, fmt in report.table) + " |")
    return "\n".join(lines)


def write_csv(path: Path, report: Report, env: Mapping[str, str]) -> None:
    """Write the rows with the environment columns appended."""
    columns = list(report.columns) + [c for c in ENV_COLUMNS if c not in report.columns]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in report.rows:
            writer.writerow({**{c: env.get(c, "") for c in ENV_COLUMNS}, **row})


def write_markdown(path: Path, report: Report, env: Mapping[str, str]) -> str:
    """Write title, environment, notes and the table; return the table."""
    table = markdown_table(report)
    lines = [f"# {report.title}", ""]
    lines += [f"- {k}: {env.get(k, '')}" for k in ENV_COLUMNS]
    lines.append("")
    lines += [f"{n}" for n in report.notes] + ([""] if report.notes else [])
    lines += [table, ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return table


def write_plot(path: Path, report: Report) -> bool:
    """Draw the report's panels as grouped bar charts into ``path``; False (with a note) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(f"matplotlib is not installed, so {path.name} was not drawn: pip install matplotlib")
        return False
    panels = report.panels
    bars = max((len(p.groups) * max(1, len(p.series)) for p in panels), default=1)
    width = min(18.0, max(6.0, 2.0 + 0.45 * bars))
    fig = Figure(figsize=(width, 4.2 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel)
    fig.suptitle(report.title)
    fig.savefig(path, dpi=110)
    return True


def _draw_panel(ax, panel: Panel) -> None:
    n_series = max(1, len(panel.series))
    bar_w = 0.8 / n_series
    values = []
    for k, (name, bars) in enumerate(panel.series.items()):
        xs, meds, lo, hi = [], [], [], []
        for i, s in enumerate(bars):
            if s is None or not math.isfinite(s.median):
                continue
            xs.append(i - 0.4 + bar_w * (k + 0.5))
            meds.append(s.median)
            lo.append(max(s.median - s.min, 0.0))
            hi.append(max(s.max - s.median, 0.0))
            values += [s.min, s.max]
        if xs:
            ax.bar(xs, meds, bar_w, yerr=[lo, hi], capsize=3, label=name)
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if positive and max(positive) / min(positive) > 30:
        ax.set_yscale("log")
    if panel.baseline is not None:
        ax.axhline(panel.baseline, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(panel.groups)))
    ax.set_xticklabels(panel.groups)
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.title)
    if panel.series:
        ax.legend(fontsize="small")
    if not values:
        ax.text(0.5, 0.5, "no measurements", transform=ax.transAxes, ha="center", va="center")


def write_report(out: str | Path, report: Report, env: Mapping[str, str]) -> dict[str, Path]:
    """Write ``<name>.csv``, ``<name>.md`` and ``<name>.png`` into ``out``, print the table; return the paths."""
    folder = prepare_out_dir(out)
    paths = {ext: folder / f"{report.name}.{ext}" for ext in ("csv", "md", "png")}
    write_csv(paths["csv"], report, env)
    table = write_markdown(paths["md"], report, env)
    drawn = write_plot(paths["png"], report)
    print()
    print(f"## {report.title}")
    print(f"{env.get('machine', '')} | {env.get('cpu', '')} | gpu {env.get('gpu', '')} | {env.get('threads', '')} threads | "
          f"torch {env.get('torch', '')} | triton {env.get('triton', '')} | backend {env.get('backend', '')} | commit {env.get('commit', '')[:12]}")
    for note in report.notes:
        print(note)
    print(table)
    print("wrote " + ", ".join(str(p) for ext, p in paths.items() if ext != "png" or drawn))
    if not drawn:
        del paths["png"]
    return paths
