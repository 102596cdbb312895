"""Data-parallel training for ``fastanalog train`` with ``torch.distributed``.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; with them present the launcher joins
a process group (gloo on CPU, nccl on GPU) and wraps the model in ``DistributedDataParallel``.
The gradients are all-reduced by DDP; the analog update is then applied by every rank with the
same ``(seed, step)`` keys, so the analog arrays stay bit-identical without being broadcast. DDP
does not sync buffers at each forward pass (the analog arrays are buffers and must not be sent at
every step); the few digital buffers (batch-norm statistics, which only evaluation reads) are
broadcast from rank 0 before each evaluation with :func:`broadcast_digital_buffers`.

Every collective operation waits at most ``--ddp-timeout`` seconds (``DEFAULT_TIMEOUT_S``) for the
other ranks: a rank that stopped or hangs ends the run with a :class:`CollectiveError` instead of
leaving the others waiting for ever.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

# Buffer names of the analog layers: these stay identical on every rank by construction.
ANALOG_BUFFERS = ("analog_residual", "analog_buffer", "analog_mixed", "analog_pulses", "analog_last_pulses", "analog_scale")
ACCELERATORS = ("auto", "cpu", "cuda")
# Seconds a collective operation (gradient all-reduce, metric sums, ...) waits for the other ranks by default.
DEFAULT_TIMEOUT_S = 600.0


class CollectiveError(RuntimeError):
    """A collective operation failed: another rank stopped, hung past the timeout or died."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: its ``rank`` among ``world_size`` processes, ``local_rank`` on its node, ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def launched_by_torchrun() -> bool:
    """True when ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` are all set (``torchrun`` and friends)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def process_rank() -> int:
    """This process's rank: ``RANK`` under ``torchrun``, else 0."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def select_device(accelerator: str, local_rank: int = 0) -> torch.device:
    """The compute device: ``cuda:<local_rank>`` for ``cuda`` (and ``auto`` when CUDA is available), else the CPU."""
    if accelerator not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {accelerator!r}: choose one of {', '.join(ACCELERATORS)}")
    if accelerator == "cuda" or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--accelerator cuda asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def describe_env(accelerator: str) -> DistEnv:
    """This process's place (rank 0 of 1 unless started by ``torchrun``) and device; starts nothing."""
    if not launched_by_torchrun():
        return DistEnv(0, 1, 0, select_device(accelerator))
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent (need 0 <= RANK < WORLD_SIZE)")
    return DistEnv(rank, world, local, select_device(accelerator, local))


def init_process_group(env: DistEnv, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group of a ``torchrun`` launch (nccl on GPU, gloo on CPU); True if this call created it.

    Every collective operation of the group fails after ``timeout_s`` seconds without the other ranks.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        return False
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    dist.init_process_group(backend="nccl" if env.device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return True


# What torch's gloo and nccl backends say when a peer is gone or late (their errors are often plain RuntimeErrors).
_PEER_FAILURE = re.compile(
    r"timed out|timeout|connection (closed|reset|refused)|broken pipe|peer|watchdog|NCCL communicator was aborted",
    re.IGNORECASE,
)


def collective_failure(exc: BaseException) -> bool:
    """True when ``exc`` says that a collective operation failed for want of another rank."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and bool(_PEER_FAILURE.search(str(exc)))


def first_line(exc: BaseException) -> str:
    """The first sentence of an error message, without torch's source-location prefix."""
    for line in str(exc).splitlines():
        line = re.sub(r"^\[[^\]]*\]\s*", "", line.strip())
        if line:
            return re.split(r"(?<=[a-z0-9)\]])\.\s", line, maxsplit=1)[0].rstrip(".")
    return type(exc).__name__


def broadcast_object(obj, env: DistEnv):
    """Rank 0's ``obj`` on every rank; ``obj`` itself on a single process."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: Sequence[float], env: DistEnv) -> list[float]:
    """Sum ``values`` over all ranks (float64); the values themselves on a single process."""
    if not env.distributed:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj, env: DistEnv) -> list:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` on a single process."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel`` of ``model`` that syncs its buffers once at construction, not at every forward pass."""
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    # torch >= 2.14 names the per-forward buffer sync forward_sync_buffers; older versions broadcast_buffers.
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **no_sync)


@torch.no_grad()
def broadcast_digital_buffers(model: nn.Module, env: DistEnv) -> None:
    """Copy rank 0's buffers other than the analog arrays (batch-norm statistics) to every rank."""
    if not env.distributed:
        return
    for name, buf in model.named_buffers():
        if name.rsplit(".", 1)[-1] not in ANALOG_BUFFERS:
            dist.broadcast(buf, src=0)


def state_digest(model: nn.Module) -> str:
    """SHA-256 of every entry of ``model.state_dict()`` (names, dtypes, shapes and bytes): equal digests, equal state."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start part-way through an epoch.

    The order of an epoch is ``DistributedSampler``'s: a permutation of ``seed + epoch``,
    padded to a multiple of ``num_replicas``, rank ``r`` taking every ``num_replicas``-th index
    from ``r``. With a per-rank batch of ``B / num_replicas``, global batch ``k`` therefore holds
    positions ``k*B .. (k+1)*B - 1`` of the permutation whatever the number of ranks.
    :meth:`set_start` skips the first ``n`` indices of this rank's share, so a resumed run
    continues with the very batches it had not seen.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of this rank's share of the current epoch."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start
