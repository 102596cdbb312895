"""Checkpoints of ``fastanalog train``: atomic writes, validated reads, the latest of a run.

A checkpoint is one ``torch.save`` file ``<run>/checkpoints/step-<8 digits>.pt`` holding a dict:

* ``format`` (``"fastanalog-train-checkpoint"``) and ``format_version`` (``FORMAT_VERSION``);
* ``args``: every option of the run, resolved (the checkpoint alone says how to continue);
* ``meta``: model, algorithm, dataset, world size and the library versions that wrote it;
* ``step`` (optimizer steps taken), ``epoch`` and ``batch`` (the next batch of that epoch) and
  ``shuffle_seed`` (the seed of the sampler's permutations, so the same order is regenerated);
* ``model``, ``optimizer`` (``AnalogSGD.state_dict()``: seed and step counter included) and
  ``scheduler`` (or None) state dicts;
* ``rng``: the Python, numpy and torch (CPU and CUDA) generator states of every rank;
* ``meters``: the running sums of the training loss and accuracy, summed over ranks.

Everything in it is a tensor, a number, a string or a container of those, so it is read with
``torch.load(weights_only=True)``: loading a checkpoint cannot run code from the file.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

FORMAT = "fastanalog-train-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
REQUIRED_KEYS = ("args", "meta", "step", "epoch", "batch", "shuffle_seed", "model", "optimizer", "scheduler", "rng", "meters")
_NAME = re.compile(r"^step-(\d{8,})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, of another format version, or of another run set-up."""


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint after ``step`` optimizer steps: ``step-00000042.pt``."""
    return f"step-{step:08d}.pt"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write a file so that ``path`` holds either its old content or all of the new, never a part.

    ``write(f)`` fills a temporary file in the same folder, which is flushed and fsync'ed, then
    renamed over ``path`` with ``os.replace``; the folder is fsync'ed last, so the rename itself
    survives a crash. The temporary file is removed if anything fails.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``state`` (see the module docstring) atomically to ``path``, adding the format and version."""
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(state, f))


def list_checkpoints(folder: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints in ``folder`` (a run folder or its ``checkpoints/``), by step."""
    folder = Path(folder)
    if (folder / CHECKPOINT_DIR).is_dir():
        folder = folder / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = ((_NAME.match(p.name), p) for p in folder.iterdir() if p.is_file())
    return sorted((int(m.group(1)), p) for m, p in found if m)


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint that ``--resume PATH`` names: PATH itself if a file, else the latest one in the run folder PATH."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"--resume {path}: no such file or folder")
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"--resume {path}: the folder holds no checkpoint (checkpoints/step-*.pt)")
    return found[-1][1]


def _reason(exc: Exception) -> str:
    """The telling line of a ``torch.load`` error (the unpickler's own line when there is one)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    unpickler = [line for line in lines if line.startswith("WeightsUnpickler error:")]
    return (unpickler or lines or ["no message"])[0]


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a checkpoint file (tensors on the CPU).

    Raises:
        CheckpointError: the file is missing, truncated or not a checkpoint of ``fastanalog train``,
            or of another format version, or lacks an entry; the message names the file.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except Exception as exc:  # a truncated archive, a bad pickle and a disallowed global all land here
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({type(exc).__name__}: {_reason(exc)}); "
            "the file is truncated or corrupt, or was not written by fastanalog train"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fastanalog train checkpoint (no format marker {FORMAT!r})")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r}, but this fastanalog reads version {FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks {', '.join(missing)}")
    return state


def remove_old_checkpoints(folder: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the ``keep`` latest checkpoints of a run folder."""
    for _, path in list_checkpoints(folder)[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
