"""``fastanalog train``: train a model whose weights live on analog resistive devices.

Example::

    fastanalog train --model resnet18 --dataset fashion-mnist --algorithm rl2 --preset paper-power --epochs 1

Any timm model name or the built-in ``cnn`` and ``mlp``; Fashion-MNIST, digits, CIFAR-10/100
(a local folder in torchvision's format) or an image folder. The command writes a run folder
(``--out``, default a new ``runs/<timestamp>-<model>-<algorithm>``, ``-2``, ``-3``, ... appended
when two runs start in the same second) with ``config.json``,
``metrics.csv``, ``diagnostics.csv``, plots and checkpoints; ``--resume`` continues a run on
the exact same trajectory. Started by ``torchrun`` it trains data-parallel (see
:mod:`fastanalog.train.distributed`).

The same training is available from Python through :func:`run_training`, which takes an
``argparse.Namespace``, a mapping or keyword arguments named like the long options
(``batch_size`` for ``--batch-size``) and returns the metrics as a dict.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import fastanalog as fa

from ..config import ALGORITHMS, MIXED_WEIGHTS, UPDATES
from ..devices import DEVICE_FAMILIES, ResponseDevice
from .checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    WriteError,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    write_error,
)
from .data import DATASETS, IMAGEFOLDER_PREFIX, describe_dataset, is_dataset_name, load_splits
from .distributed import (
    ACCELERATORS,
    DEFAULT_TIMEOUT_S,
    CollectiveError,
    broadcast_object,
    collective_failure,
    describe_env,
    first_line,
    init_process_group,
    process_rank,
)
from .loop import EVAL_BATCH_SIZE, Run, evaluate, quiet_cuda_home_note, seed_everything
from .models import check_model_name, model_input
from .rundir import check_run_folder

__all__ = [
    "EVAL_BATCH_SIZE",
    "PRESETS",
    "add_train_arguments",
    "build_parser",
    "evaluate",
    "format_result",
    "main",
    "make_config",
    "make_device",
    "run_training",
    "seed_everything",
    "train_command",
]

# The response families the command line builds from a range, a pulse size and a shape parameter:
# those of fastanalog.devices whose response is a formula (all but the tabulated one), so that a
# family added there is a --device choice too.
_FAMILIES: dict[str, type[ResponseDevice]] = {name: cls for name, cls in DEVICE_FAMILIES.items() if not cls.tabulated}
DEVICES = tuple(_FAMILIES)
SCHEDULES = ("none", "cosine", "step")
AMP_MODES = ("none", "bf16")
# Default shape parameter (``gamma`` of the response family) per device when --response-gamma is not
# given: the family's own default (0.5 for power, 1.0 for exp).
DEFAULT_RESPONSE_GAMMA = {
    name: next(f.default for f in dataclasses.fields(cls) if f.name == "gamma") for name, cls in _FAMILIES.items() if cls.has_gamma
}
# Folder under which the command line puts run folders when --out is not given.
RUNS_ROOT = "runs"

# Device presets after the paper's three response families (linear, power, exponential), at this
# package's default range and pulse size (tau 0.6, dw_min 0.001), with the residual-learning
# settings of the demo (gamma 0.1, transfer_lr 0.1). Options given explicitly override them.
PRESETS: dict[str, dict[str, Any]] = {
    "paper-linear": {"device": "linear", "tau": 0.6, "dw_min": 0.001, "gamma": 0.1, "transfer_lr": 0.1},
    "paper-power": {"device": "power", "tau": 0.6, "response_gamma": 0.5, "dw_min": 0.001, "gamma": 0.1, "transfer_lr": 0.1},
    "paper-exp": {"device": "exp", "tau": 0.6, "response_gamma": 1.0, "dw_min": 0.001, "gamma": 0.1, "transfer_lr": 0.1},
}

# Value of every option that neither the command line, a resumed checkpoint nor a preset sets.
DEFAULTS: dict[str, Any] = {
    "model": "cnn",
    "dataset": "fashion-mnist",
    "data_root": None,
    "image_size": None,
    "max_train": None,
    "max_test": None,
    "workers": 0,
    "preset": None,
    "algorithm": "rl2",
    "device": "power",
    "tau": 0.6,
    "response_gamma": None,
    "dw_min": 0.001,
    "asymmetry": 0.0,
    "d2d_std": 0.0,
    "c2c_std": 0.0,
    "variation_seed": 0,
    "gamma": 0.1,
    "transfer_lr": 0.1,
    "read_noise": 0.0,
    "weight_scaling": "fit",
    "weight_scaling_omega": 0.95,
    "update": "per-sample",
    "mixed_weight": "transient",
    "epochs": 1,
    "batch_size": 128,
    "lr": 0.05,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "schedule": "none",
    "seed": 0,
    "max_steps": None,
    "amp": "none",
    "compile": False,
    "accelerator": "auto",
    "threads": None,
    "no_progress": False,
    "out": None,
    "overwrite": False,
    "resume": None,
    "checkpoint_every": None,
    "keep_checkpoints": 2,
    "log_every": 50,
    "ddp_timeout": DEFAULT_TIMEOUT_S,
}
# Options that shape the trajectory: a resumed run must use the checkpoint's values.
MUST_MATCH = (
    "model",
    "dataset",
    "image_size",
    "max_train",
    "preset",
    "algorithm",
    "device",
    "tau",
    "response_gamma",
    "dw_min",
    "asymmetry",
    "d2d_std",
    "c2c_std",
    "variation_seed",
    "gamma",
    "transfer_lr",
    "read_noise",
    "weight_scaling",
    "weight_scaling_omega",
    "update",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "schedule",
    "seed",
    "amp",
)
# Options added after runs were saved without them: the value that reproduces those runs.
SAVED_BEFORE = {"update": "batch"}
# Options a resumed run does not take from its checkpoint (they concern this invocation only); every
# other option not given again comes from the checkpoint (--max-steps included), and one given again wins.
NOT_INHERITED = ("resume", "out", "overwrite")


def _int_type(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what} (>= {minimum}), got {value}")
        return value

    return parse


_positive_int = _int_type(1, "a positive integer")
_nonnegative_int = _int_type(0, "an integer >= 0")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _dataset(text: str) -> str:
    if not is_dataset_name(text):
        raise argparse.ArgumentTypeError(
            f"unknown dataset {text!r}: choose one of {', '.join(DATASETS)} or {IMAGEFOLDER_PREFIX}PATH"
        )
    return text


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train`` options to ``parser`` and return it.

    Value options default to None in the parser ("not given"): :func:`run_training` fills them
    from the resumed checkpoint, the preset or ``DEFAULTS``, in that order.
    """
    d = DEFAULTS
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", help=f"cnn, mlp or any timm model name (default: {d['model']})")
    g.add_argument(
        "--dataset",
        type=_dataset,
        metavar="NAME",
        help=f"{', '.join(DATASETS)} or {IMAGEFOLDER_PREFIX}PATH (PATH/train and PATH/val or PATH/test; default: {d['dataset']})",
    )
    g.add_argument(
        "--data-dir",
        "--data-root",
        dest="data_root",
        metavar="DIR",
        help="Fashion-MNIST: the folder of its IDX .gz files (default: /usr/share/datasets/fashion-mnist); "
        "cifar10/cifar100: the folder holding torchvision's cifar-10-batches-py / cifar-100-python (required)",
    )
    g.add_argument(
        "--image-size",
        type=_positive_int,
        metavar="PIXELS",
        help="side of the images the model sees (default: the dataset's; a timm model with a fixed input size gets "
        "that size, and timm models get 3 channels)",
    )
    g.add_argument("--max-train", type=_positive_int, metavar="N", help="train on the first N training samples only")
    g.add_argument("--max-test", type=_positive_int, metavar="N", help="evaluate on the first N test samples only")
    g.add_argument("--workers", type=_nonnegative_int, metavar="N", help="data-loader worker processes (default: 0)")

    g = parser.add_argument_group("analog devices and algorithm")
    g.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="device settings after the paper's response families: "
        + "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()) for name, values in PRESETS.items())
        + " (options given explicitly override them)",
    )
    g.add_argument("--algorithm", choices=ALGORITHMS, help=f"training algorithm (default: {d['algorithm']})")
    g.add_argument("--device", choices=DEVICES, help=f"device response family (default: {d['device']})")
    g.add_argument("--tau", type=_positive_float, help=f"device weight range [-tau, tau], weight units (default: {d['tau']})")
    g.add_argument(
        "--response-gamma",
        type=_positive_float,
        help="shape parameter of the response (default: "
        + ", ".join(f"{v} for {k}" for k, v in DEFAULT_RESPONSE_GAMMA.items())
        + "; unused for "
        + ", ".join(k for k in DEVICES if k not in DEFAULT_RESPONSE_GAMMA)
        + ")",
    )
    g.add_argument(
        "--dw-min", type=_positive_float, help=f"weight change of one pulse at the symmetric point (default: {d['dw_min']})"
    )
    g.add_argument("--asymmetry", type=float, help="up/down asymmetry a of the response, |a| < 1 (default: 0)")
    g.add_argument(
        "--d2d-std", type=_nonnegative_float, help="relative device-to-device spread of the device parameters (default: 0)"
    )
    g.add_argument("--c2c-std", type=_nonnegative_float, help="relative cycle-to-cycle spread of each pulse (default: 0)")
    g.add_argument("--variation-seed", type=_nonnegative_int, help="seed of the device-to-device draw (default: 0)")
    g.add_argument("--gamma", type=_nonnegative_float, help=f"mixing weight of W + gamma*P for rl/rl2 (default: {d['gamma']})")
    g.add_argument(
        "--transfer-lr", type=_positive_float, help=f"step size of the P -> W transfer (default: {d['transfer_lr']})"
    )
    g.add_argument("--read-noise", type=_nonnegative_float, help="std of the read noise of P, weight units (default: 0.0)")
    g.add_argument(
        "--weight-scaling",
        choices=("fit", "channel", "tensor"),
        help="digital per-output-channel scales mapping weights onto the devices: fit (scale only channels that do not fit "
        "the range), channel or tensor (every channel / the whole tensor to omega times the bound) (default: fit)",
    )
    g.add_argument(
        "--weight-scaling-omega",
        type=_positive_float,
        metavar="OMEGA",
        help="largest scaled weight as a fraction of the device bound, in (0, 1) (default: 0.95)",
    )
    g.add_argument(
        "--update",
        choices=UPDATES,
        help="how a mini-batch is written: per-sample (one outer product per sample, as a crossbar and aihwkit do: "
        "opposite pulses of different samples are sent, not cancelled; one more GEMM per layer) or batch (the "
        "mini-batch gradient as one write, the paper's theorem model) (default: per-sample)",
    )
    g.add_argument(
        "--mixed-weight",
        choices=MIXED_WEIGHTS,
        help="how rl/rl2 keep the forward weight W + gamma P: transient (computed in forward and again in backward, no "
        "array kept) or stored (one more array per layer, written by the optimizer step; forward and backward read it). "
        "Both train identically; a resumed run may switch (default: transient)",
    )

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_positive_int, help=f"passes over the training set (default: {d['epochs']})")
    g.add_argument(
        "--batch-size", type=_positive_int, help=f"samples per step, over all ranks together (default: {d['batch_size']})"
    )
    g.add_argument("--lr", type=_positive_float, help=f"learning rate (default: {d['lr']})")
    g.add_argument("--momentum", type=_nonnegative_float, help="SGD momentum, < 1 (default: 0)")
    g.add_argument("--weight-decay", type=_nonnegative_float, help="L2 penalty (default: 0)")
    g.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="lr schedule over all steps of --epochs: cosine (to 0), step (x0.1 at 1/2 and 3/4 of the steps) "
        "or none (default: none)",
    )
    g.add_argument("--seed", type=_nonnegative_int, help="seed of the initialisation, shuffling and pulse noise (default: 0)")
    g.add_argument(
        "--max-steps",
        type=_positive_int,
        metavar="N",
        help="stop after N optimizer steps in all (with a checkpoint); the schedule still spans --epochs. "
        "A resumed run keeps the checkpoint's N unless given again",
    )
    g.add_argument("--amp", choices=AMP_MODES, help="bf16: forward pass and loss under bfloat16 autocast (default: none)")
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the model's forward pass (the first steps take longer; default: off)",
    )

    g = parser.add_argument_group("execution")
    g.add_argument("--accelerator", choices=ACCELERATORS, help="compute device: cuda when available for auto (default: auto)")
    g.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice)")
    g.add_argument(
        "--no-progress",
        action="store_true",
        default=None,
        help="hide the progress bar (on a terminal) and the progress lines (otherwise)",
    )
    g.add_argument(
        "--ddp-timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="under torchrun: how long a collective operation waits for the other ranks before the run ends with "
        f"an error (a rank stopped or hung; default: {d['ddp_timeout']:g})",
    )

    g = parser.add_argument_group("run folder and checkpoints")
    g.add_argument(
        "--out",
        metavar="DIR",
        help=f"run folder (default: {RUNS_ROOT}/<timestamp>-<model>-<algorithm>, or the folder of the resumed checkpoint)",
    )
    g.add_argument("--overwrite", action="store_true", help="replace the run files of an existing --out folder")
    g.add_argument(
        "--resume",
        metavar="PATH",
        help="continue from a checkpoint file, or from the latest checkpoint of a run folder; options not given "
        "are taken from the checkpoint",
    )
    g.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        metavar="N",
        help="also write a checkpoint every N steps (always: at each epoch end and at the end)",
    )
    g.add_argument(
        "--keep-checkpoints",
        type=_positive_int,
        metavar="N",
        help=f"keep the N latest checkpoints (default: {d['keep_checkpoints']})",
    )
    g.add_argument(
        "--log-every", type=_positive_int, metavar="N", help=f"a metrics.csv row every N steps (default: {d['log_every']})"
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """Stand-alone parser of the ``train`` options (the ``fastanalog train`` sub-command uses the same options)."""
    parser = argparse.ArgumentParser(
        prog="fastanalog train", description="Train a model with analog weights and report its test accuracy."
    )
    return add_train_arguments(parser)


def _resolve_args(args: argparse.Namespace | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> argparse.Namespace:
    """Merge ``args`` and ``overrides`` into a namespace of every option; None marks an option not given."""
    ns = argparse.Namespace(**{k: None for k in DEFAULTS})
    given: dict[str, Any] = {}
    if isinstance(args, argparse.Namespace):
        # A parsed namespace may carry entries of the enclosing parser (sub-command name, handler): keep the options only.
        given.update((k, v) for k, v in vars(args).items() if k in DEFAULTS)
    elif args is not None:
        given.update(args)
    given.update(overrides)
    unknown = sorted(k for k in given if k not in DEFAULTS)
    if unknown:
        raise TypeError(f"unknown training option(s) {', '.join(unknown)}; valid: {', '.join(sorted(DEFAULTS))}")
    for k, v in given.items():
        setattr(ns, k, v)
    return ns


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _take_checkpoint_args(ns: argparse.Namespace, saved: Mapping[str, Any], path: Path) -> None:
    """Fill the options not given from the checkpoint's; CheckpointError where a given one contradicts it."""
    saved = {**SAVED_BEFORE, **saved}
    conflicts = [
        f"{_option(k)} {getattr(ns, k)!r} (the checkpoint has {saved.get(k)!r})"
        for k in MUST_MATCH
        if getattr(ns, k) is not None and getattr(ns, k) != saved.get(k)
    ]
    if conflicts:
        raise CheckpointError(
            f"{path} was written by a run with other settings: this run asks for {'; '.join(conflicts)}. "
            "Leave these options out to continue that run, or start a new one without --resume"
        )
    for k in DEFAULTS:
        if k not in NOT_INHERITED and getattr(ns, k) is None and k in saved:
            setattr(ns, k, saved[k])


def _fill_defaults(ns: argparse.Namespace) -> None:
    """Fill the options still unset from the preset, then from ``DEFAULTS``."""
    preset = PRESETS.get(ns.preset, {}) if isinstance(ns.preset, str) else {}
    for k, v in {**DEFAULTS, **preset}.items():
        if getattr(ns, k) is None:
            setattr(ns, k, v)


def _validate(ns: argparse.Namespace) -> None:
    """ValueError naming the option and value when an option is out of range."""

    def check(name: str, ok: bool, need: str) -> None:
        if not ok:
            raise ValueError(f"{name} must be {need}, got {getattr(ns, name)!r}")

    def num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def integer(v: Any, minimum: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= minimum

    def optional_int(name: str, minimum: int = 1) -> None:
        check(name, getattr(ns, name) is None or integer(getattr(ns, name), minimum), f"None or an integer >= {minimum}")

    check("epochs", integer(ns.epochs, 1), "an integer >= 1")
    check("batch_size", integer(ns.batch_size, 1), "an integer >= 1")
    check("lr", num(ns.lr) and ns.lr > 0, "a number > 0")
    check("weight_scaling", ns.weight_scaling in ("fit", "channel", "tensor"), "fit, channel or tensor")
    check("weight_scaling_omega", num(ns.weight_scaling_omega) and 0 < ns.weight_scaling_omega < 1, "a number in (0, 1)")
    check("update", ns.update in UPDATES, " or ".join(UPDATES))
    check("mixed_weight", ns.mixed_weight in MIXED_WEIGHTS, " or ".join(MIXED_WEIGHTS))
    check("momentum", num(ns.momentum) and 0 <= ns.momentum < 1, "a number in [0, 1)")
    check("weight_decay", num(ns.weight_decay) and ns.weight_decay >= 0, "a number >= 0")
    check("tau", num(ns.tau) and ns.tau > 0, "a number > 0")
    check("dw_min", num(ns.dw_min) and ns.dw_min > 0, "a number > 0")
    check("asymmetry", num(ns.asymmetry) and -1 < ns.asymmetry < 1, "a number in (-1, 1)")
    for name in ("gamma", "read_noise", "d2d_std", "c2c_std"):
        check(name, num(getattr(ns, name)) and getattr(ns, name) >= 0, "a number >= 0")
    check("transfer_lr", num(ns.transfer_lr) and ns.transfer_lr > 0, "a number > 0")
    check(
        "response_gamma",
        ns.response_gamma is None or (num(ns.response_gamma) and ns.response_gamma > 0),
        "None or a number > 0",
    )
    for name in ("max_train", "max_test", "threads", "max_steps", "checkpoint_every", "image_size"):
        optional_int(name)
    check("workers", integer(ns.workers, 0), "an integer >= 0")
    check("keep_checkpoints", integer(ns.keep_checkpoints, 1), "an integer >= 1")
    check("log_every", integer(ns.log_every, 1), "an integer >= 1")
    check("seed", integer(ns.seed, 0) and ns.seed < 2**63, "an integer in [0, 2**63)")
    check("variation_seed", integer(ns.variation_seed, 0), "an integer >= 0")
    check("algorithm", ns.algorithm in ALGORITHMS, f"one of {', '.join(ALGORITHMS)}")
    check("device", ns.device in DEVICES, f"one of {', '.join(DEVICES)}")
    check("preset", ns.preset is None or ns.preset in PRESETS, f"None or one of {', '.join(PRESETS)}")
    check("schedule", ns.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}")
    check("amp", ns.amp in AMP_MODES, f"one of {', '.join(AMP_MODES)}")
    check("accelerator", ns.accelerator in ACCELERATORS, f"one of {', '.join(ACCELERATORS)}")
    check(
        "dataset",
        isinstance(ns.dataset, str) and is_dataset_name(ns.dataset),
        f"one of {', '.join(DATASETS)} or {IMAGEFOLDER_PREFIX}PATH",
    )
    check("compile", isinstance(ns.compile, bool), "True or False")
    check("ddp_timeout", num(ns.ddp_timeout) and ns.ddp_timeout > 0, "a number > 0")
    if ns.overwrite and ns.resume is not None:
        raise ValueError("--overwrite starts the run folder afresh and cannot be combined with --resume")


def make_device(
    kind: str,
    tau: float,
    dw_min: float,
    response_gamma: float | None = None,
    asymmetry: float = 0.0,
    d2d_std: float = 0.0,
    c2c_std: float = 0.0,
    variation_seed: int = 0,
) -> ResponseDevice:
    """Build the device of the analog arrays.

    Args:
        kind: a response family of ``DEVICES`` (``linear``, ``power``, ``exp``).
        tau: weight range ``[-tau, tau]``, weight units.
        dw_min: weight change of one pulse at the symmetric point, weight units.
        response_gamma: shape parameter of the response (None: the family's default, ``DEFAULT_RESPONSE_GAMMA``);
            unused for a family without one (linear).
        asymmetry: up/down asymmetry of the response, ``|a| < 1``.
        d2d_std: relative device-to-device spread of the parameters.
        c2c_std: relative cycle-to-cycle spread of each pulse.
        variation_seed: seed of the device-to-device draw.
    """
    common = {
        "tau": tau,
        "dw_min": dw_min,
        "asymmetry": asymmetry,
        "d2d_std": d2d_std,
        "c2c_std": c2c_std,
        "variation_seed": variation_seed,
    }
    cls = _FAMILIES.get(kind)
    if cls is None:
        raise ValueError(f"unknown device {kind!r}: choose one of {', '.join(DEVICES)}")
    if not cls.has_gamma:
        return cls(**common)
    shape = DEFAULT_RESPONSE_GAMMA[kind] if response_gamma is None else response_gamma
    return cls(gamma=shape, **common)


def make_config(ns: argparse.Namespace) -> fa.AnalogConfig:
    """Build the ``AnalogConfig`` of the options in ``ns`` (``digital`` uses the default config of that algorithm)."""
    if ns.algorithm == "digital":
        return fa.AnalogConfig(algorithm="digital")
    device = make_device(
        ns.device,
        ns.tau,
        ns.dw_min,
        ns.response_gamma,
        asymmetry=getattr(ns, "asymmetry", 0.0),
        d2d_std=getattr(ns, "d2d_std", 0.0),
        c2c_std=getattr(ns, "c2c_std", 0.0),
        variation_seed=getattr(ns, "variation_seed", 0),
    )
    return fa.AnalogConfig(
        algorithm=ns.algorithm,
        device=device,
        gamma=ns.gamma,
        transfer_lr=ns.transfer_lr,
        read_noise=ns.read_noise,
        weight_scaling=getattr(ns, "weight_scaling", "fit"),
        weight_scaling_omega=getattr(ns, "weight_scaling_omega", 0.95),
        update=getattr(ns, "update", "per-sample"),
        mixed_weight=getattr(ns, "mixed_weight", "transient"),
    )


def _run_folder_of(checkpoint: Path) -> Path:
    """The run folder of a checkpoint file (the parent of its ``checkpoints/`` folder)."""
    parent = checkpoint.parent
    return parent.parent if parent.name == CHECKPOINT_DIR else parent


def _timestamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def default_run_folder(model: str, algorithm: str) -> Path:
    """``runs/<YYYYmmdd-HHMMSS>-<model>-<algorithm>`` (characters outside ``[A-Za-z0-9._-]`` become ``_``).

    Only the name: :func:`create_run_folder` makes a folder of this name (or a free variant) that no other run shares.
    """
    return Path(RUNS_ROOT) / re.sub(r"[^A-Za-z0-9._-]", "_", f"{_timestamp()}-{model}-{algorithm}")


# Attempts of create_run_folder at a free name (base, base-2, base-3, ...).
MAX_FOLDER_SUFFIX = 10_000


def create_run_folder(model: str, algorithm: str) -> Path:
    """Create and return a new, empty run folder ``runs/<timestamp>-<model>-<algorithm>[-N]``.

    ``os.mkdir`` fails when the folder exists, so two runs started in the same second get two
    folders (the second with ``-2``, ...), never a shared one.
    """
    base = default_run_folder(model, algorithm)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(base.parent, exc, "run folder") from exc
    for n in range(1, MAX_FOLDER_SUFFIX + 1):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            os.mkdir(folder)
        except FileExistsError:
            continue
        except OSError as exc:
            raise write_error(folder, exc, "run folder") from exc
        return folder
    raise FileExistsError(f"{base} and {MAX_FOLDER_SUFFIX - 1} numbered variants exist already: pass --out")


def _load_resume(resume: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``--resume`` names, loaded; a corrupt latest checkpoint of a folder names the older ones."""
    path = resolve_checkpoint(resume)
    try:
        return path, load_checkpoint(path)
    except CheckpointError as exc:
        older = [str(p) for _, p in list_checkpoints(_run_folder_of(path)) if p != path]
        if Path(resume).is_dir() and older:
            raise CheckpointError(f"{exc}. Older checkpoints of this run: {', '.join(older)} (pass one to --resume)") from exc
        raise


def run_training(args: argparse.Namespace | Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Train one model with analog weights and evaluate it on the test split.

    Args:
        args: options as an ``argparse.Namespace`` or a mapping named like the long options
            (``batch_size`` for ``--batch-size``); options left out (or None) come from the resumed
            checkpoint, the ``preset`` or ``DEFAULTS``. Unlike the command line, ``out=None`` (the
            default here) writes no run folder and no checkpoints, unless resuming (then the
            checkpoint's run folder is used).
        **kwargs: more options, overriding ``args``.

    Returns:
        A dict with ``test_accuracy`` (fraction in [0, 1]), ``test_loss``, ``train_loss`` and
        ``train_accuracy`` (means over the last epoch's steps, in training mode), ``wall_time_s``
        (seconds of the training loop, excluding data set-up, evaluation, logging and checkpoints),
        ``eval_time_s`` (seconds of the test evaluations), ``pulses`` (total pulses written to the
        analog arrays), ``steps`` (optimizer steps, counting those before a resume),
        ``train_samples``, ``algorithm``, ``model``, ``dataset``, ``world_size`` and ``run_dir``.

    Raises:
        ValueError: an option is out of range (the message names it and the value); a
            ``CheckpointError`` (a ValueError) when the checkpoint to resume is unreadable or of
            another set-up.
        FileNotFoundError: the data is missing.
        FileExistsError: ``out`` holds a previous run (and neither ``resume`` nor ``overwrite`` is given).
    """
    return _run_training(_resolve_args(args, kwargs), new_folder=False)


def _run_training(ns: argparse.Namespace, new_folder: bool) -> dict[str, Any]:
    """:func:`run_training` of resolved options; ``new_folder``: without ``out`` or ``resume``, train in a new run folder."""
    quiet_cuda_home_note()
    checkpoint = checkpoint_path = None
    if ns.resume is not None:
        checkpoint_path, checkpoint = _load_resume(ns.resume)
        _take_checkpoint_args(ns, checkpoint["args"], checkpoint_path)
    _fill_defaults(ns)
    _validate(ns)
    if ns.threads is not None:
        torch.set_num_threads(ns.threads)
    check_model_name(ns.model)
    info = describe_dataset(ns.dataset, ns.data_root)
    channels, native_size = model_input(ns.model, info.channels, info.image_size)
    if ns.image_size is None:
        ns.image_size = native_size
    config = make_config(ns)
    env = describe_env(ns.accelerator)
    if ns.batch_size % env.world_size:
        raise ValueError(f"batch_size {ns.batch_size} must be a multiple of the world size {env.world_size}")

    run_dir = Path(ns.out) if ns.out is not None else None
    if run_dir is None and checkpoint_path is not None:
        run_dir = _run_folder_of(checkpoint_path)
    new_folder = new_folder and run_dir is None
    if ns.checkpoint_every is not None and run_dir is None and not new_folder:
        raise ValueError("checkpoint_every needs a run folder: pass out")
    if run_dir is not None:
        resuming_here = checkpoint_path is not None and run_dir.resolve() == _run_folder_of(checkpoint_path).resolve()
        check_run_folder(run_dir, resuming_here=resuming_here, overwrite=ns.overwrite)
    splits = load_splits(info, ns.data_root, channels, ns.image_size, ns.seed, ns.max_train, ns.max_test)

    created = init_process_group(env, ns.ddp_timeout)
    made = None
    try:
        if new_folder:
            # Rank 0 makes the folder, the others learn its name (they write nothing there).
            made = create_run_folder(ns.model, ns.algorithm) if env.is_main else None
            run_dir = Path(broadcast_object(None if made is None else str(made), env))
            ns.out = str(run_dir)
        run = Run(ns, config, splits, env, run_dir, checkpoint, checkpoint_path)
        if run_dir is not None and env.is_main:
            start = f"from step {run.step} of {checkpoint_path}" if checkpoint_path is not None else "from scratch"
            print(
                f"fastanalog train: {ns.model} on {ns.dataset} ({splits.channels}x{splits.image_size}x{splits.image_size}), "
                f"{ns.algorithm}, {run.total_steps} steps ({ns.epochs} epoch(s) of {run.steps_per_epoch}), "
                f"world size {env.world_size} on {env.device}, {start}; run folder {run_dir}",
                flush=True,
            )
            if ns.max_steps is not None and run.step >= ns.max_steps:
                print(
                    f"fastanalog train: the run is at step {run.step}, --max-steps is {ns.max_steps}: nothing to train "
                    "(pass a larger --max-steps to go on)",
                    flush=True,
                )
        return run.fit()
    except BaseException as exc:
        if made is not None:
            with contextlib.suppress(OSError):
                made.rmdir()  # only while still empty: nothing of the run is lost
        if env.distributed and not isinstance(exc, CollectiveError) and collective_failure(exc):
            raise CollectiveError(
                f"rank {env.rank} of {env.world_size}: a collective operation failed ({first_line(exc)}): another "
                f"rank stopped, hung for more than --ddp-timeout {ns.ddp_timeout:g} s or died; the run ends here "
                "(resume it from its latest checkpoint)"
            ) from exc
        raise
    finally:
        if created:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def format_result(result: Mapping[str, Any]) -> str:
    """One-line summary: ``test accuracy: XX.XX% | wall time: S.S s | pulses: N``."""
    return f"test accuracy: {100 * result['test_accuracy']:.2f}% | wall time: {result['wall_time_s']:.1f} s | pulses: {result['pulses']}"


def train_command(args: argparse.Namespace) -> int:
    """Run ``fastanalog train`` with parsed options; print the summary line; return the exit status.

    Without ``--out`` (and without ``--resume``) the run folder is a new ``runs/<timestamp>-<model>-<algorithm>``
    (``-2``, ``-3``, ... appended when taken). Only rank 0 of a distributed run prints the summary. Bad options,
    missing data, unusable checkpoints, a file that cannot be written (a full disk) and a failed collective
    operation (another rank stopped) print one error line and return 2.
    """
    try:
        result = _run_training(_resolve_args(args, {}), new_folder=True)
    except (FileNotFoundError, FileExistsError, ValueError, WriteError, CollectiveError) as exc:
        print(f"fastanalog train: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if process_rank() == 0:
        print(format_result(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m fastanalog.train.cli`` (same options as ``fastanalog train``)."""
    return train_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
