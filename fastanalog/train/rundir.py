"""The run folder of ``fastanalog train``: configuration, metric logs, plots.

A run folder holds:

* ``config.json``: every option of the run, the library versions, the world size and device,
  and one entry per resume;
* ``metrics.csv``: one row per logging interval and per epoch end (``METRIC_COLUMNS``);
* ``diagnostics.csv``: the same steps in long format, one row per analog layer (``DIAGNOSTIC_COLUMNS``,
  from :func:`fastanalog.diagnostics.layer_diagnostics`);
* ``curves.png`` (loss and accuracy) and ``diagnostics.png`` (per layer), redrawn at every checkpoint
  and at the end;
* ``checkpoints/step-*.pt`` (:mod:`fastanalog.train.checkpoint`) and, at the end, ``summary.json``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINT_DIR, atomic_write, list_checkpoints, write_error

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
DIAGNOSTICS_FILE = "diagnostics.csv"
SUMMARY_FILE = "summary.json"
CURVES_PLOT = "curves.png"
DIAGNOSTICS_PLOT = "diagnostics.png"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, DIAGNOSTICS_FILE, SUMMARY_FILE, CURVES_PLOT, DIAGNOSTICS_PLOT)

# train_* are means over the steps since the previous row; test_* are filled at epoch ends and at the last step.
METRIC_COLUMNS = (
    "step",
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "images_per_s",
    "pulses",
    "saturation_max",
)
DIAGNOSTIC_KEYS = (
    "saturation_max",
    "saturation_mean",
    "dist_sym",
    "abs_P",
    "abs_H",
    "pulses_W",
    "pulses_P",
    "last_pulses_W",
    "last_pulses_P",
)
DIAGNOSTIC_COLUMNS = ("step", "epoch", "layer", *DIAGNOSTIC_KEYS)
# Above this many analog layers the diagnostics plot colours layers by depth instead of naming them.
MAX_LEGEND_LAYERS = 12


def holds_run(folder: str | os.PathLike[str]) -> list[str]:
    """The run files (and checkpoints) that ``folder`` already holds, by name; empty when none."""
    folder = Path(folder)
    found = [name for name in RUN_FILES if (folder / name).exists()]
    if list_checkpoints(folder):
        found.append(f"{CHECKPOINT_DIR}/")
    return found


def check_run_folder(folder: str | os.PathLike[str], resuming_here: bool, overwrite: bool) -> None:
    """Refuse to clobber a previous run: FileExistsError unless the folder is free, resumed or ``overwrite``."""
    if resuming_here or overwrite:
        return
    found = holds_run(folder)
    if found:
        raise FileExistsError(
            f"{folder} already holds a run ({', '.join(found)}); pass --resume {folder} to continue it, "
            "--overwrite to replace it, or another --out"
        )


def clear_run_folder(folder: str | os.PathLike[str]) -> None:
    """Delete the run files and checkpoints of ``folder`` (``--overwrite``); other files are left alone."""
    folder = Path(folder)
    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    for _, path in list_checkpoints(folder):
        path.unlink()


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


class CsvLog:
    """A CSV file with a fixed header, appended one row at a time (each row flushed)."""

    def __init__(self, path: str | os.PathLike[str], columns: Sequence[str]) -> None:
        self.path = Path(path)
        self.columns = tuple(columns)

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append rows (dicts keyed by column; missing or None cells stay empty), writing the header first if new."""
        new = not self.path.exists() or self.path.stat().st_size == 0
        try:
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(self.columns)
                for row in rows:
                    writer.writerow([_cell(row.get(c)) for c in self.columns])
        except OSError as exc:
            raise write_error(self.path, exc) from exc

    def read(self) -> list[dict[str, str]]:
        """All rows as dicts of strings; empty when the file does not exist."""
        if not self.path.exists():
            return []
        with open(self.path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def truncate_after(self, step: int) -> None:
        """Drop the rows of steps after ``step`` (written after the checkpoint a run resumes from), atomically."""
        rows = self.read()
        keep = [r for r in rows if int(r["step"]) <= step]
        if len(keep) == len(rows):
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(keep)
        atomic_write(self.path, lambda f: f.write(buf.getvalue().encode()))


def _floats(rows: Sequence[Mapping[str, str]], key: str) -> list[float]:
    return [float(r[key]) if r.get(key) not in (None, "") else math.nan for r in rows]


def _figure(nrows: int, ncols: int, width: float, height: float):
    """A matplotlib Figure that draws with Agg (pyplot and the global backend are left alone), or None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: no plots are drawn (pip install matplotlib)", stacklevel=3)
        return None
    fig = Figure(figsize=(width, height))
    fig.subplots(nrows, ncols)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.9, wspace=0.25, hspace=0.4)
    return fig


def _save_png(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def plot_curves(folder: str | os.PathLike[str]) -> Path | None:
    """Draw ``curves.png``: train and test loss and accuracy against the step, from ``metrics.csv``."""
    folder = Path(folder)
    rows = CsvLog(folder / METRICS_FILE, METRIC_COLUMNS).read()
    if not rows:
        return None
    fig = _figure(1, 2, 10, 4)
    if fig is None:
        return None
    ax_loss, ax_acc = fig.axes
    steps = _floats(rows, "step")
    test = [i for i, r in enumerate(rows) if r.get("test_loss")]
    for ax, key, label in ((ax_loss, "loss", "cross-entropy loss"), (ax_acc, "acc", "accuracy")):
        ax.plot(steps, _floats(rows, f"train_{key}"), label="train (since previous row)")
        values = _floats(rows, f"test_{key}")
        ax.plot([steps[i] for i in test], [values[i] for i in test], "o-", label="test")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    path = folder / CURVES_PLOT
    _save_png(fig, path)
    return path


def plot_diagnostics(folder: str | os.PathLike[str]) -> Path | None:
    """Draw ``diagnostics.png``: per analog layer, the saturation, |W - w_sym|, |P| and pulses against the step."""
    folder = Path(folder)
    rows = CsvLog(folder / DIAGNOSTICS_FILE, DIAGNOSTIC_COLUMNS).read()
    if not rows:
        return None
    fig = _figure(2, 2, 11, 7)
    if fig is None:
        return None
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    by_layer = {name: [r for r in rows if r["layer"] == name] for name in layers}
    panels = (
        ("saturation_max", "max saturation degree sqrt(|G|/F)"),
        ("dist_sym", "mean |W - w_sym|"),
        ("abs_P", "mean |P|"),
        ("pulses", "pulses written (W + P)"),
    )
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for ax, (key, title) in zip(fig.axes, panels):
        for i, name in enumerate(layers):
            sub = by_layer[name]
            if key == "pulses":
                values = [w + p for w, p in zip(_floats(sub, "pulses_W"), _floats(sub, "pulses_P"))]
            else:
                values = _floats(sub, key)
            ax.plot(_floats(sub, "step"), values, color=cmap(i / max(len(layers) - 1, 1)), label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if len(layers) <= MAX_LEGEND_LAYERS:
        fig.axes[0].legend(fontsize="small")
    else:
        fig.suptitle(f"{len(layers)} analog layers, coloured by depth (dark: first, yellow: last)")
    path = folder / DIAGNOSTICS_PLOT
    _save_png(fig, path)
    return path
