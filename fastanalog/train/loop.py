"""The training loop of ``fastanalog train``: steps, evaluation, logging, checkpoints and resume.

:func:`train` runs one resolved set of options (see :mod:`fastanalog.train.cli`) on one process
of a possibly distributed run. The order of everything random is fixed so that a run resumed from
a checkpoint continues the exact trajectory of an uninterrupted one:

* the model is initialised from ``seed`` (identically on every rank), after which the global
  generators are re-seeded with ``seed + rank`` (dropout and other random layers);
* the order of epoch ``e`` is the permutation of ``seed + e`` (:class:`ResumableSampler`), and
  random augmentations draw from ``(seed, epoch, index)`` (:class:`EpochSeededDataset`); data
  loaders get their own generators, so nothing else draws from the global ones;
* the analog updates draw from ``(seed, step)`` inside ``AnalogSGD``.

A checkpoint stores the position ``(epoch, batch)``, all generator states and every state dict;
resuming skips the batches of the epoch already seen and goes on.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import fastanalog as fa

from ..diagnostics import model_diagnostics
from .checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    checkpoint_name,
    remove_old_checkpoints,
    remove_temporaries,
    save_checkpoint,
)
from .data import BatchAdapter, EpochSeededDataset, Splits
from .distributed import (
    DistEnv,
    ResumableSampler,
    all_gather_object,
    all_reduce_sum,
    broadcast_digital_buffers,
    state_digest,
    wrap_ddp,
)
from .rundir import (
    CONFIG_FILE,
    DIAGNOSTIC_COLUMNS,
    DIAGNOSTIC_KEYS,
    DIAGNOSTICS_FILE,
    METRIC_COLUMNS,
    METRICS_FILE,
    RUN_FILES,
    SUMMARY_FILE,
    CsvLog,
    clear_run_folder,
    plot_curves,
    plot_diagnostics,
    read_json,
    write_json,
)

# Test-set batch size of the evaluations, samples.
EVAL_BATCH_SIZE = 1000
# lr factor of ``--schedule step`` at each of its milestones (half and three quarters of the steps).
STEP_SCHEDULE_FACTOR = 0.1
# Relative slack of the device-range check of a loaded checkpoint (float32 rounding of the per-element bounds).
RANGE_TOLERANCE = 1e-5


class _NoCudaRuntimeNote(logging.Filter):
    """Drop torch's "No CUDA runtime is found, using CUDA_HOME=..." note on a machine without a CUDA device.

    ``torch.utils.cpp_extension`` logs it when imported (``torch.compile``'s inductor imports it, and
    so does a JIT build of the C++ kernels) wherever a CUDA toolkit is installed but torch sees no
    GPU: on a CPU-only run it says nothing wrong. Every other record of that logger passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("No CUDA runtime is found"))


def quiet_cuda_home_note() -> None:
    """Install :class:`_NoCudaRuntimeNote` on ``torch.utils.cpp_extension``'s logger (once) when torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNote) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNote())


def check_device_range(model: nn.Module, path: Path | str | None) -> None:
    """CheckpointError unless every analog array of ``model`` lies in its device's range (and H is finite).

    The bound of an array on device ``d`` is ``[d.tau_min, d.tau_max]`` widened by the largest
    device-to-device factor, ``1 + 3 * d.d2d_std`` (a cheap bound that holds for every element).
    """
    for name, layer in fa.analog_layers(model):
        cfg = layer.analog_config
        if not cfg.is_analog:
            continue
        state = layer.analog_state()
        arrays = (("weight", state["main"], cfg.device), ("analog_residual", state["residual"], cfg.residual_device))
        for array, t, device in arrays:
            if t is None or device is None:
                continue
            spread = (1 + 3 * device.d2d_std) * (1 + RANGE_TOLERANCE)
            lo, hi = device.tau_min * spread, device.tau_max * spread
            bad = ~((t >= lo) & (t <= hi))  # NaN included
            if bool(bad.any()):
                flat = t.detach().reshape(-1)
                first = int(bad.reshape(-1).nonzero()[0, 0])
                raise CheckpointError(
                    f"{path}: {name}.{array} holds {float(flat[first]):g} (element {first}; {int(bad.sum())} element(s) "
                    f"in all), outside the device range [{lo:g}, {hi:g}]; the checkpoint is corrupt"
                )
        buffer = state["buffer"]
        if buffer is not None and not bool(torch.isfinite(buffer).all()):
            raise CheckpointError(f"{path}: {name}.analog_buffer holds NaN or infinite values; the checkpoint is corrupt")


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape a run's numbers."""
    import importlib

    versions = {"python": sys.version.split()[0], "fastanalog": fa.__version__, "torch": str(torch.__version__)}
    versions["numpy"] = np.__version__
    for name in ("torchvision", "timm"):
        try:
            versions[name] = str(importlib.import_module(name).__version__)
        except ImportError:
            versions[name] = "not installed"
    return versions


def make_scheduler(opt: torch.optim.Optimizer, schedule: str, total_steps: int):
    """The lr scheduler of ``--schedule``, stepped once per optimizer step; None for ``none``.

    ``cosine`` anneals from ``--lr`` to 0 over ``total_steps`` (``CosineAnnealingLR``); ``step``
    multiplies the lr by 0.1 after half and after three quarters of the steps (``MultiStepLR``).
    """
    if schedule == "none":
        return None
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    if schedule == "step":
        milestones = sorted({max(total_steps // 2, 1), max(3 * total_steps // 4, 1)})
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=STEP_SCHEDULE_FACTOR)
    raise ValueError(f"unknown schedule {schedule!r}: choose cosine, step or none")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = EVAL_BATCH_SIZE,
    *,
    adapter: BatchAdapter | None = None,
    amp: bool = False,
    env: DistEnv | None = None,
    workers: int = 0,
) -> tuple[float, float]:
    """Return ``(accuracy in [0, 1], mean cross-entropy loss)`` of ``model`` on ``dataset`` (eval mode).

    Args:
        model: the model (its parameters' device is the compute device).
        dataset: ``(image, label)`` samples.
        batch_size: samples per forward pass.
        adapter: transform of each batch on the device (channels, size), or None.
        amp: run the forward pass under bfloat16 autocast.
        env: in a distributed run, each rank evaluates every ``world_size``-th sample and the sums are all-reduced.
        workers: data-loader worker processes.
    """
    device = next(model.parameters()).device
    if env is not None and env.distributed:
        dataset = Subset(dataset, range(env.rank, len(dataset), env.world_size))
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0.0, 0.0, 0.0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, generator=torch.Generator())
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if adapter is not None:
            x = adapter(x)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
        n += y.numel()
    model.train(was_training)
    if env is not None:
        correct, loss_sum, n = all_reduce_sum([correct, loss_sum, n], env)
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return correct / n, loss_sum / n


@dataclass
class Meter:
    """Sums of the training loss and correct predictions over ``seen`` samples."""

    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0

    def add(self, loss: float, correct: float, n: int) -> None:
        self.loss_sum += loss * n
        self.correct += correct
        self.seen += n

    def means(self) -> tuple[float, float]:
        """``(mean loss, accuracy)``; NaN for both before any sample."""
        if self.seen == 0:
            return math.nan, math.nan
        return self.loss_sum / self.seen, self.correct / self.seen

    def reduced(self, env: DistEnv) -> Meter:
        """The sums over all ranks."""
        return Meter(*all_reduce_sum([self.loss_sum, self.correct, self.seen], env))


def _rng_state() -> dict[str, Any]:
    """This process's generator states, in types that ``torch.load(weights_only=True)`` reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Clock:
    """Seconds of training, excluding the pauses for evaluation, logging and checkpoints."""

    def __init__(self) -> None:
        self.total = 0.0
        self._since = time.perf_counter()

    def pause(self) -> float:
        """Stop counting; return the seconds since the last resume (also added to ``total``)."""
        elapsed = time.perf_counter() - self._since
        self.total += elapsed
        return elapsed

    def resume(self) -> None:
        self._since = time.perf_counter()


class Run:
    """One process's share of a training run. Build it, then call :meth:`fit`.

    Args:
        ns: the resolved options (every entry set; see :mod:`fastanalog.train.cli`).
        config: the analog configuration of the model's layers.
        splits: the data.
        env: this process's rank, world size and device.
        run_dir: the run folder (rank 0 writes there), or None to write nothing.
        checkpoint: a loaded checkpoint to continue from, or None.
        checkpoint_path: its file (named in errors).
    """

    def __init__(
        self,
        ns: argparse.Namespace,
        config: fa.AnalogConfig,
        splits: Splits,
        env: DistEnv,
        run_dir: Path | None,
        checkpoint: dict[str, Any] | None = None,
        checkpoint_path: Path | None = None,
    ) -> None:
        from .models import build_model

        self.ns, self.splits, self.env, self.run_dir = ns, splits, env, run_dir
        self.writes = run_dir is not None and env.is_main
        seed_everything(ns.seed)
        model = build_model(ns.model, splits.channels, splits.num_classes, splits.image_size)
        self.model = fa.convert_to_analog(model, config).to(env.device)
        self.analog = config.is_analog
        self.opt = fa.AnalogSGD(
            self.model.parameters(), lr=ns.lr, momentum=ns.momentum, weight_decay=ns.weight_decay, seed=ns.seed
        )
        self.per_rank_batch = ns.batch_size // env.world_size
        self.sampler = ResumableSampler(splits.train, env.world_size, env.rank, seed=ns.seed)
        self.steps_per_epoch = math.ceil(self.sampler.num_samples / self.per_rank_batch)
        self.total_steps = ns.epochs * self.steps_per_epoch
        self.scheduler = make_scheduler(self.opt, ns.schedule, self.total_steps)
        self.step, self.epoch, self.batch = 0, 0, 0
        self.interval, self.epoch_meter = Meter(), Meter()
        self.last_epoch: tuple[float, float] = (math.nan, math.nan)
        self.interval_images = 0
        self.saved_step = self.row_step = self.eval_step = self.plotted_step = -1
        self.test: tuple[float, float] = (math.nan, math.nan)
        self.eval_time = 0.0
        self.clock = _Clock()
        seed_everything(ns.seed + env.rank)
        if checkpoint is not None:
            self._restore(checkpoint, checkpoint_path)
        self.checkpoint_path = checkpoint_path
        self.resumed_from = self.step if checkpoint is not None else None

        self.train_module: nn.Module = self.model
        if env.distributed:
            self.train_module = wrap_ddp(self.model, env)
        if ns.compile:
            quiet_cuda_home_note()  # inductor imports torch.utils.cpp_extension
            self.train_module = torch.compile(self.train_module)
        # The progress bar shows on a terminal; elsewhere (a log file, a pipe) a run with a run folder
        # prints a progress line at each metrics row instead.
        self.show_bar = not ns.no_progress and env.is_main and _is_terminal(sys.stderr)
        self.show_lines = not ns.no_progress and env.is_main and run_dir is not None and not self.show_bar
        self.metrics = CsvLog(run_dir / METRICS_FILE, METRIC_COLUMNS) if run_dir is not None else None
        self.diagnostics = CsvLog(run_dir / DIAGNOSTICS_FILE, DIAGNOSTIC_COLUMNS) if run_dir is not None else None

    # ----- checkpoints ------------------------------------------------------------------
    def _restore(self, ckpt: dict[str, Any], path: Path | None) -> None:
        """Load model, optimizer, scheduler, position, meters and generator states from ``ckpt``."""
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())
            raise CheckpointError(f"{path}: its model state does not fit this {self.ns.model}: {detail}") from exc
        check_device_range(self.model, path)
        try:
            self.opt.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: its optimizer state does not fit this model: {exc}") from exc
        if (ckpt["scheduler"] is None) != (self.scheduler is None):
            raise CheckpointError(f"{path}: written with another lr schedule than --schedule {self.ns.schedule}")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["shuffle_seed"] != self.ns.seed:
            raise CheckpointError(f"{path}: shuffle seed {ckpt['shuffle_seed']} differs from --seed {self.ns.seed}")
        epoch, batch = int(ckpt["epoch"]), int(ckpt["batch"])
        if not (0 <= batch < self.steps_per_epoch and 0 <= epoch <= self.ns.epochs):
            raise CheckpointError(
                f"{path}: position epoch {epoch}, batch {batch} lies outside this run "
                f"({self.ns.epochs} epochs of {self.steps_per_epoch} steps)"
            )
        self.step, self.epoch, self.batch = int(ckpt["step"]), epoch, batch
        meters = ckpt["meters"]
        if self.env.is_main:
            self.interval = Meter(**meters["interval"])
            self.epoch_meter = Meter(**meters["epoch"])
        self.last_epoch = tuple(meters["last_epoch"])
        rng = ckpt["rng"]
        if len(rng) == self.env.world_size:
            _set_rng_state(rng[self.env.rank])
        elif self.env.is_main:
            warnings.warn(
                f"{path} holds the generator states of {len(rng)} rank(s), this run has {self.env.world_size}: "
                "random layers (dropout) start from fresh seeds",
                stacklevel=2,
            )
        saved_world = ckpt["meta"].get("world_size", len(rng)) if isinstance(ckpt["meta"], dict) else len(rng)
        if saved_world != self.env.world_size and self.env.is_main:
            print(
                f"fastanalog train: note: {path} was written by a run of world size {saved_world}, this run has world "
                f"size {self.env.world_size}: the samples keep their order, but the gradients are split and summed "
                "differently (and random layers draw anew), so from here on the run is no longer bit-identical to "
                "the uninterrupted one",
                file=sys.stderr,
                flush=True,
            )
        self.saved_step = self.step

    def _save_checkpoint(self) -> None:
        """Write the checkpoint of the current step (rank 0; every rank takes part in gathering the state)."""
        rng = all_gather_object(_rng_state(), self.env)
        interval, epoch_meter = self.interval.reduced(self.env), self.epoch_meter.reduced(self.env)
        self.saved_step = self.step
        if not self.writes:
            return
        state = {
            "args": dict(vars(self.ns)),
            "meta": {
                "model": self.ns.model,
                "algorithm": self.ns.algorithm,
                "dataset": self.ns.dataset,
                "world_size": self.env.world_size,
                "versions": library_versions(),
                "analog_layers": {name: list(layer.weight.shape) for name, layer in fa.analog_layers(self.model)},
            },
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
            "shuffle_seed": self.ns.seed,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": rng,
            "meters": {
                "interval": asdict(interval),
                "epoch": asdict(epoch_meter),
                "last_epoch": list(self.last_epoch),
            },
        }
        save_checkpoint(state, self.run_dir / CHECKPOINT_DIR / checkpoint_name(self.step))
        remove_old_checkpoints(self.run_dir, self.ns.keep_checkpoints)
        self._plot()
        self.plotted_step = self.step

    # ----- logging ----------------------------------------------------------------------
    def _plot(self) -> None:
        plot_curves(self.run_dir)
        if self.analog:
            plot_diagnostics(self.run_dir)

    def _evaluate(self) -> None:
        start = time.perf_counter()
        broadcast_digital_buffers(self.model, self.env)
        self.test = evaluate(
            self.model,
            self.splits.test,
            adapter=self.splits.batch_adapter,
            amp=self.ns.amp == "bf16",
            env=self.env,
            workers=self.ns.workers,
        )
        self.eval_step = self.step
        self.eval_time += time.perf_counter() - start

    def _log_row(self, seconds: float, lr: float, with_test: bool) -> None:
        """Write one row of metrics.csv (and diagnostics.csv) for the steps since the previous row; print a progress line."""
        if with_test:
            self._evaluate()
        interval = self.interval.reduced(self.env)
        images = all_reduce_sum([self.interval_images], self.env)[0]
        self.interval, self.interval_images = Meter(), 0
        self.row_step = self.step
        epoch = self.epoch + self.batch / self.steps_per_epoch
        train_loss, train_acc = interval.means()
        if self.show_lines:
            test = f" | test loss {self.test[1]:.4f} acc {self.test[0]:.2%}" if with_test else ""
            rate = f" | {images / seconds:.0f} img/s" if seconds > 0 else ""
            print(
                f"step {self.step}/{self.total_steps} | epoch {epoch:.2f}/{self.ns.epochs} | lr {lr:.4g} | "
                f"train loss {train_loss:.4f} acc {train_acc:.2%}{test}{rate}",
                flush=True,
            )
        if not self.writes:
            return
        diagnostics = model_diagnostics(self.model) if self.analog else {}
        row = {
            "step": self.step,
            "epoch": round(epoch, 6),
            "lr": lr,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_acc": self.test[0] if with_test else None,
            "test_loss": self.test[1] if with_test else None,
            "images_per_s": images / seconds if seconds > 0 else None,
            "pulses": fa.total_pulses(self.model) if self.analog else 0,
            "saturation_max": max((d["saturation_max"] for d in diagnostics.values()), default=None),
        }
        self.metrics.append([row])
        self.diagnostics.append(
            [
                {"step": self.step, "epoch": row["epoch"], "layer": name, **{k: d[k] for k in DIAGNOSTIC_KEYS}}
                for name, d in diagnostics.items()
            ]
        )

    def _prepare_folder(self) -> None:
        """Write config.json (fresh run) or add this resume to it; drop log rows written after the checkpoint.

        With ``--overwrite`` the previous run's files are deleted first.
        """
        if not self.writes:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_temporaries(self.run_dir, RUN_FILES)  # left by a process killed while writing
        if self.ns.overwrite:
            clear_run_folder(self.run_dir)
        resumed_from = self.checkpoint_path
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        config_path = self.run_dir / CONFIG_FILE
        resume = {"checkpoint": str(resumed_from), "step": self.step, "time": now, "world_size": self.env.world_size}
        if resumed_from is not None and config_path.exists():
            config = read_json(config_path)
            config.setdefault("resumes", []).append({**resume, "command": sys.argv})
            self.metrics.truncate_after(self.step)
            self.diagnostics.truncate_after(self.step)
        else:
            config = {
                "args": dict(vars(self.ns)),
                "versions": library_versions(),
                "command": sys.argv,
                "created": now,
                "world_size": self.env.world_size,
                "device": str(self.env.device),
                "channels": self.splits.channels,
                "image_size": self.splits.image_size,
                "num_classes": self.splits.num_classes,
                "train_samples": len(self.splits.train),
                "test_samples": len(self.splits.test),
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
                "analog_layers": sum(1 for _ in fa.analog_layers(self.model)),
                "resumes": [resume] if resumed_from is not None else [],
            }
        write_json(config_path, config)

    # ----- the loop ---------------------------------------------------------------------
    def _loader(self, epoch: int, start_batch: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start_batch * self.per_rank_batch)
        if isinstance(self.splits.train, EpochSeededDataset):
            self.splits.train.set_epoch(epoch)
        return DataLoader(
            self.splits.train,
            batch_size=self.per_rank_batch,
            sampler=self.sampler,
            num_workers=self.ns.workers,
            pin_memory=self.env.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.ns.seed + epoch),
        )

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
        """One optimizer step; returns ``(loss, correct predictions, lr used)``."""
        device = self.env.device
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if self.splits.batch_adapter is not None:
            x = self.splits.batch_adapter(x)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.ns.amp == "bf16"):
            logits = self.train_module(x)
            loss = nn.functional.cross_entropy(logits, y)
        loss.backward()
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.opt.zero_grad()
        if self.scheduler is not None:
            self.scheduler.step()
        correct = (logits.detach().argmax(dim=1) == y).sum().item()
        return loss.item(), correct, lr

    def _stop_requested(self) -> bool:
        return self.ns.max_steps is not None and self.step >= self.ns.max_steps

    def fit(self) -> dict[str, Any]:
        """Train to the end of the last epoch (or ``--max-steps``), then evaluate; return the results (see ``run_training``)."""
        from tqdm.auto import tqdm

        ns, env = self.ns, self.env
        self._prepare_folder()
        self.model.train()
        lr = self.opt.param_groups[0]["lr"]
        self.clock.resume()
        interval_seconds = 0.0
        while self.epoch < ns.epochs and not self._stop_requested():
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=self.batch,
                desc=f"{ns.algorithm} epoch {self.epoch + 1}/{ns.epochs}",
                disable=not self.show_bar,
                leave=False,
                dynamic_ncols=True,
            )
            epoch_start, epoch_images = time.perf_counter(), 0
            for x, y in self._loader(self.epoch, self.batch):
                loss, correct, lr = self._train_step(x, y)
                self.step += 1
                self.batch += 1
                self.interval.add(loss, correct, y.numel())
                self.epoch_meter.add(loss, correct, y.numel())
                self.interval_images += y.numel()
                epoch_images += y.numel() * env.world_size
                bar.update()
                bar_loss, bar_acc = self.epoch_meter.means()
                rate = epoch_images / max(time.perf_counter() - epoch_start, 1e-9)
                bar.set_postfix(loss=f"{bar_loss:.4f}", acc=f"{bar_acc:.2%}", img_s=f"{rate:.0f}", refresh=False)

                epoch_end = self.batch == self.steps_per_epoch
                stop = self._stop_requested()
                if self.run_dir is not None and (epoch_end or stop or self.step % ns.log_every == 0):
                    interval_seconds += self.clock.pause()
                    # The last row of a run (its end or --max-steps) holds the final test result.
                    self._log_row(interval_seconds, lr, with_test=epoch_end or stop)
                    interval_seconds = 0.0
                    self.clock.resume()
                if epoch_end:
                    self.last_epoch = self.epoch_meter.reduced(env).means()
                    self.epoch, self.batch, self.epoch_meter = self.epoch + 1, 0, Meter()
                every = ns.checkpoint_every is not None and self.step % ns.checkpoint_every == 0
                if self.run_dir is not None and (every or epoch_end) and not stop:
                    interval_seconds += self.clock.pause()
                    self._save_checkpoint()
                    self.clock.resume()
                if stop or epoch_end:
                    break
            bar.close()
        interval_seconds += self.clock.pause()
        return self._finish(interval_seconds, lr)

    def _finish(self, interval_seconds: float, lr: float) -> dict[str, Any]:
        """Evaluate (unless done at this step), write the last row, checkpoint, plots and summary; check the ranks agree."""
        ns, env = self.ns, self.env
        if self.eval_step != self.step:
            if self.run_dir is not None and self.row_step != self.step and self.interval.reduced(env).seen > 0:
                self._log_row(interval_seconds, lr, with_test=True)
            else:
                self._evaluate()
        if self.run_dir is not None and self.saved_step != self.step:
            self._save_checkpoint()
        elif self.writes and self.plotted_step != self.step:
            self._plot()
        broadcast_digital_buffers(self.model, env)
        digests = all_gather_object(state_digest(self.model), env)
        epoch_meter = self.epoch_meter.reduced(env)
        train_loss, train_acc = self.last_epoch if epoch_meter.seen == 0 else epoch_meter.means()
        result = {
            "test_accuracy": self.test[0],
            "test_loss": self.test[1],
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "wall_time_s": self.clock.total,
            "eval_time_s": self.eval_time,
            "pulses": int(fa.total_pulses(self.model)),
            "steps": self.step,
            "train_samples": len(self.splits.train),
            "algorithm": ns.algorithm,
            "model": ns.model,
            "dataset": ns.dataset,
            "world_size": env.world_size,
            "run_dir": str(self.run_dir) if self.run_dir is not None else None,
        }
        if self.writes:
            summary = {
                **result,
                "epochs_done": self.epoch,
                "resumed_from_step": self.resumed_from,
                "rank_state_sha256": digests,
            }
            write_json(self.run_dir / SUMMARY_FILE, summary)
        if len(set(digests)) != 1:
            raise RuntimeError(f"the ranks ended with different model states (SHA-256 per rank: {digests})")
        return result
