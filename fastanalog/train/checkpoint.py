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
* ``meters``: the running sums of the training loss and accuracy, summed over ranks;
* ``sha256``: the SHA-256 of everything above (:func:`content_digest`: every key, number and string,
  and every tensor's dtype, shape and bytes). :func:`load_checkpoint` recomputes it, so a file whose
  bytes changed after writing (a flipped bit inside a tensor included) is an error, not a silent resume.
  Files of format version 1 (written before the checksum) still load, with a warning.

Everything in it is a tensor, a number, a string or a container of those, so it is read with
``torch.load(weights_only=True)``: loading a checkpoint cannot run code from the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import IO, Any

import torch

FORMAT = "fastanalog-train-checkpoint"
FORMAT_VERSION = 2
# Format versions this module reads: version 1 is version 2 without the ``sha256`` entry.
READABLE_VERSIONS = (1, 2)
CHECKSUM_KEY = "sha256"
CHECKPOINT_DIR = "checkpoints"
REQUIRED_KEYS = ("args", "meta", "step", "epoch", "batch", "shuffle_seed", "model", "optimizer", "scheduler", "rng", "meters")
_NAME = re.compile(r"^step-(\d{8,})\.pt$")
# Temporary files of atomic_write: ``.<name>.<8 characters of tempfile>.tmp``.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, of another format version, or of another run set-up."""


class WriteError(OSError):
    """A file of the run folder could not be written (a full disk, a quota, a read-only file system).

    The message is one line: what was written where, the system's reason and the free space left
    there. The file's previous content, if any, is intact (see :func:`atomic_write`).
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code

    def __str__(self) -> str:
        return str(self.args[0])


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # not reached


def free_space(folder: str | os.PathLike[str]) -> str:
    """``"<free> free of <total>"`` on the file system of ``folder`` (``shutil.disk_usage``), or a note why not known."""
    try:
        usage = shutil.disk_usage(folder)
    except OSError as exc:
        return f"free space unknown ({exc.strerror or exc})"
    return f"{_size(usage.free)} free of {_size(usage.total)}"


def write_error(path: str | os.PathLike[str], exc: OSError, what: str = "file") -> WriteError:
    """The :class:`WriteError` for ``exc`` raised while writing ``path``: what, where, why and the space left
    (measured after the partial file is gone: the room there is for the whole file)."""
    path = Path(path)
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno is not None:
        reason += f" [{errno.errorcode.get(exc.errno, exc.errno)}]"
    return WriteError(f"cannot write {what} {path}: {reason}; {free_space(path.parent)} on {path.parent}", exc.errno)


class _Recorder:
    """A file object that remembers the first ``OSError`` of its writes.

    ``torch.save`` turns an error of the file it writes to into a ``RuntimeError`` of its zip
    writer (``inline_container.cc ... unexpected pos``) that no longer says why: the recorded
    error does.
    """

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.error: OSError | None = None

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._file, name)(*args)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def write(self, data: Any) -> int:
        return self._call("write", data)

    def flush(self) -> None:
        self._call("flush")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def _open_temporary(fd: int, path: str) -> IO[bytes]:
    """The file object of the temporary file ``path`` (open as ``fd``) that :func:`atomic_write` fills."""
    return os.fdopen(fd, "wb")


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


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None], what: str = "file") -> None:
    """Write a file so that ``path`` holds either its old content or all of the new, never a part.

    ``write(f)`` fills a temporary file in the same folder, which is flushed and fsync'ed, then
    renamed over ``path`` with ``os.replace``; the folder is fsync'ed last, so the rename itself
    survives a crash. The temporary file is removed if anything fails (a process killed meanwhile
    leaves it behind: :func:`remove_temporaries` clears those).

    Raises:
        WriteError: the system refused a write (a full disk, a quota, ...); ``path`` is untouched.
            ``what`` names the file in the message.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc, what) from exc
    recorder = None
    try:
        with _open_temporary(fd, tmp) as f:
            recorder = _Recorder(f)
            write(recorder)
            recorder.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = recorder.error if recorder is not None and recorder.error is not None else exc
        if isinstance(cause, OSError) and not isinstance(cause, WriteError):
            raise write_error(path, cause, what) from exc
        raise


def remove_temporaries(folder: str | os.PathLike[str], run_files: Collection[str] = ()) -> list[Path]:
    """Delete the temporary files that interrupted :func:`atomic_write` calls left in a run folder.

    Those of checkpoints (in ``checkpoints/``) and of the files named ``run_files`` (in the folder
    itself); other files are left alone. Returns the files removed.
    """
    folder = Path(folder)
    removed = []
    for where, owned in ((folder, lambda name: name in run_files), (folder / CHECKPOINT_DIR, _NAME.match)):
        if not where.is_dir():
            continue
        for p in where.iterdir():
            m = _TEMPORARY.match(p.name)
            if m and owned(m.group("name")) and p.is_file():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    return removed


def _feed(h: Any, obj: Any) -> None:
    """Hash ``obj`` into ``h``: type tags, lengths, keys in order, numbers exactly, tensors by dtype, shape and bytes."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"D%d:" % len(obj))
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):  # pickle keeps the kind, but a list and a tuple hash alike
        h.update(b"L%d:" % len(obj))
        for v in obj:
            _feed(h, v)
    elif obj is None or isinstance(obj, bool):
        h.update(f"B{obj};".encode())
    elif isinstance(obj, int):
        h.update(f"I{obj};".encode())
    elif isinstance(obj, float):
        h.update(b"F" + struct.pack("<d", obj))
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(b"S%d:" % len(data) + data)
    elif isinstance(obj, bytes):
        h.update(b"Y%d:" % len(obj) + obj)
    else:
        text = f"{type(obj).__module__}.{type(obj).__qualname__}:{obj!r}".encode("utf-8", "backslashreplace")
        h.update(b"O%d:" % len(text) + text)


def content_digest(state: dict[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint's content: every entry but ``sha256`` itself, in order."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``state`` (see the module docstring) atomically to ``path``, adding the format, version and checksum.

    Raises:
        WriteError: the file could not be written (the earlier checkpoints are untouched).
    """
    state = {k: v for k, v in state.items() if k not in ("format", "format_version", CHECKSUM_KEY)}
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    state[CHECKSUM_KEY] = content_digest(state)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda f: torch.save(state, f), what="checkpoint")
    except WriteError as exc:
        raise WriteError(f"{exc}; the earlier checkpoints are intact", exc.errno) from exc


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
            or of another format version, or its content does not match its checksum, or it lacks
            an entry; the message names the file.
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
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r}, but this fastanalog reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if version == 1:
        warnings.warn(
            f"{path} was written before checkpoints carried a checksum (format version 1): its content cannot be "
            "verified, only checked against the device range",
            stacklevel=2,
        )
    else:
        stored = state.get(CHECKSUM_KEY)
        if not isinstance(stored, str):
            raise CheckpointError(f"{path}: the checkpoint has no {CHECKSUM_KEY} checksum; the file is corrupt")
        actual = content_digest(state)
        if actual != stored:
            raise CheckpointError(
                f"{path}: the checkpoint's content does not match its SHA-256 checksum (stored {stored[:16]}..., "
                f"content {actual[:16]}...); the file is corrupt (changed after it was written)"
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
