"""``fastanalog train``: train a model whose weights live on analog resistive devices.

Example::

    fastanalog train --model cnn --dataset fashion-mnist --algorithm rl2 --device power --tau 0.6 --epochs 1

The same training is available from Python through :func:`run_training`, which takes an
``argparse.Namespace``, a mapping or keyword arguments named like the long options
(``batch_size`` for ``--batch-size``) and returns the metrics as a dict.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastanalog as fa

from ..devices import ResponseDevice
from .data import DATASETS, DEFAULT_FASHION_MNIST_ROOT, NUM_CLASSES, get_dataset
from .models import build_model, check_model_name

ALGORITHMS = ("digital", "asgd", "rl", "rl2")
DEVICES = ("linear", "power", "exp")
# Default shape parameter (``gamma`` of the response family) per device when --response-gamma is not given.
DEFAULT_RESPONSE_GAMMA = {"power": 0.5, "exp": 1.0}
# Test-set batch size of the final evaluation, samples.
EVAL_BATCH_SIZE = 1000


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


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


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train`` options to ``parser`` and return it."""
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default="cnn", help="cnn, mlp or any timm model name (default: cnn)")
    g.add_argument("--dataset", default="fashion-mnist", choices=DATASETS, help="dataset (default: fashion-mnist)")
    g.add_argument(
        "--data-root",
        default=DEFAULT_FASHION_MNIST_ROOT,
        help=f"folder with the Fashion-MNIST IDX .gz files (default: {DEFAULT_FASHION_MNIST_ROOT})",
    )
    g.add_argument(
        "--max-train", type=_positive_int, default=None, metavar="N", help="train on the first N training samples only"
    )

    g = parser.add_argument_group("analog training")
    g.add_argument("--algorithm", default="rl2", choices=ALGORITHMS, help="training algorithm (default: rl2)")
    g.add_argument("--device", default="power", choices=DEVICES, help="device response family (default: power)")
    g.add_argument(
        "--tau", type=_positive_float, default=0.6, help="device weight range [-tau, tau], weight units (default: 0.6)"
    )
    g.add_argument(
        "--response-gamma",
        type=_positive_float,
        default=None,
        help="shape parameter of the power/exp response (default: 0.5 for power, 1.0 for exp; unused for linear)",
    )
    g.add_argument(
        "--dw-min",
        type=_positive_float,
        default=0.001,
        help="weight change of one pulse at the symmetric point (default: 0.001)",
    )
    g.add_argument(
        "--gamma", type=_nonnegative_float, default=0.1, help="mixing weight of W + gamma*P for rl/rl2 (default: 0.1)"
    )
    g.add_argument("--transfer-lr", type=_positive_float, default=1.0, help="step size of the P -> W transfer (default: 1.0)")
    g.add_argument(
        "--read-noise", type=_nonnegative_float, default=0.0, help="std of the read noise of P, weight units (default: 0.0)"
    )

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_positive_int, default=1, help="passes over the training set (default: 1)")
    g.add_argument("--batch-size", type=_positive_int, default=128, help="samples per step (default: 128)")
    g.add_argument("--lr", type=_positive_float, default=0.05, help="learning rate (default: 0.05)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initialisation, shuffling and pulse noise (default: 0)")
    g.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """Stand-alone parser of the ``train`` options (the ``fastanalog train`` sub-command uses the same options)."""
    parser = argparse.ArgumentParser(
        prog="fastanalog train", description="Train a model with analog weights and report its test accuracy."
    )
    return add_train_arguments(parser)


def _resolve_args(args: argparse.Namespace | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> argparse.Namespace:
    """Merge the parser defaults, ``args`` and ``overrides`` into one namespace and validate it."""
    ns = build_parser().parse_args([])
    given: dict[str, Any] = {}
    if isinstance(args, argparse.Namespace):
        # A parsed namespace may carry entries of the enclosing parser (sub-command name, handler): keep the options only.
        given.update((k, v) for k, v in vars(args).items() if hasattr(ns, k))
    elif args is not None:
        given.update(args)
    given.update(overrides)
    unknown = sorted(k for k in given if not hasattr(ns, k))
    if unknown:
        raise TypeError(f"unknown training option(s) {', '.join(unknown)}; valid: {', '.join(sorted(vars(ns)))}")
    for k, v in given.items():
        setattr(ns, k, v)

    def _check(name: str, ok: bool, need: str) -> None:
        if not ok:
            raise ValueError(f"{name} must be {need}, got {getattr(ns, name)!r}")

    def _is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    _check("epochs", isinstance(ns.epochs, int) and ns.epochs >= 1, "an integer >= 1")
    _check("batch_size", isinstance(ns.batch_size, int) and ns.batch_size >= 1, "an integer >= 1")
    _check("lr", _is_num(ns.lr) and ns.lr > 0, "a number > 0")
    _check("tau", _is_num(ns.tau) and ns.tau > 0, "a number > 0")
    _check("dw_min", _is_num(ns.dw_min) and ns.dw_min > 0, "a number > 0")
    _check("gamma", _is_num(ns.gamma) and ns.gamma >= 0, "a number >= 0")
    _check("transfer_lr", _is_num(ns.transfer_lr) and ns.transfer_lr > 0, "a number > 0")
    _check("read_noise", _is_num(ns.read_noise) and ns.read_noise >= 0, "a number >= 0")
    _check(
        "response_gamma",
        ns.response_gamma is None or (_is_num(ns.response_gamma) and ns.response_gamma > 0),
        "None or a number > 0",
    )
    _check(
        "max_train", ns.max_train is None or (isinstance(ns.max_train, int) and ns.max_train >= 1), "None or an integer >= 1"
    )
    _check("threads", ns.threads is None or (isinstance(ns.threads, int) and ns.threads >= 1), "None or an integer >= 1")
    _check("seed", isinstance(ns.seed, int) and not isinstance(ns.seed, bool), "an integer")
    _check("algorithm", ns.algorithm in ALGORITHMS, f"one of {', '.join(ALGORITHMS)}")
    _check("device", ns.device in DEVICES, f"one of {', '.join(DEVICES)}")
    _check("dataset", ns.dataset in DATASETS, f"one of {', '.join(DATASETS)}")
    return ns


def make_device(kind: str, tau: float, dw_min: float, response_gamma: float | None = None) -> ResponseDevice:
    """Build the device of the analog arrays.

    Args:
        kind: ``linear``, ``power`` or ``exp``.
        tau: weight range ``[-tau, tau]``, weight units.
        dw_min: weight change of one pulse at the symmetric point, weight units.
        response_gamma: shape parameter of the power/exp response (None: 0.5 for power, 1.0 for exp); unused for linear.
    """
    if kind == "linear":
        return fa.LinearResponse(tau=tau, dw_min=dw_min)
    if kind not in DEFAULT_RESPONSE_GAMMA:
        raise ValueError(f"unknown device {kind!r}: choose one of {', '.join(DEVICES)}")
    shape = DEFAULT_RESPONSE_GAMMA[kind] if response_gamma is None else response_gamma
    cls = fa.PowerResponse if kind == "power" else fa.ExpResponse
    return cls(tau=tau, gamma=shape, dw_min=dw_min)


def make_config(ns: argparse.Namespace) -> fa.AnalogConfig:
    """Build the ``AnalogConfig`` of the options in ``ns`` (``digital`` uses the default config of that algorithm)."""
    if ns.algorithm == "digital":
        return fa.AnalogConfig(algorithm="digital")
    device = make_device(ns.device, ns.tau, ns.dw_min, ns.response_gamma)
    return fa.AnalogConfig(
        algorithm=ns.algorithm, device=device, gamma=ns.gamma, transfer_lr=ns.transfer_lr, read_noise=ns.read_noise
    )


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = EVAL_BATCH_SIZE) -> tuple[float, float]:
    """Return ``(accuracy in [0, 1], mean cross-entropy loss)`` of ``model`` on ``dataset`` (eval mode)."""
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
        n += y.numel()
    model.train(was_training)
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return correct / n, loss_sum / n


def run_training(args: argparse.Namespace | Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Train one model with analog weights and evaluate it on the test split.

    Args:
        args: options as an ``argparse.Namespace`` or a mapping named like the long options
            (``batch_size`` for ``--batch-size``); missing options take the CLI defaults.
        **kwargs: more options, overriding ``args``.

    Returns:
        A dict with ``test_accuracy`` (fraction in [0, 1]), ``test_loss``, ``train_loss`` and
        ``train_accuracy`` (means over the last epoch's steps, in training mode), ``wall_time_s``
        (seconds of the training loop, excluding data loading and the test evaluation),
        ``eval_time_s`` (seconds of the test evaluation), ``pulses`` (total pulses written to the
        analog arrays), ``steps`` (optimizer steps), ``train_samples``, ``algorithm``, ``model``
        and ``dataset``.

    Raises:
        ValueError: an option is out of range (the message names it and the value).
    """
    ns = _resolve_args(args, kwargs)
    if ns.threads is not None:
        torch.set_num_threads(ns.threads)
    check_model_name(ns.model)
    seed_everything(ns.seed)

    train_set = get_dataset(ns.dataset, train=True, root=ns.data_root)
    test_set = get_dataset(ns.dataset, train=False, root=ns.data_root)
    if ns.max_train is not None and ns.max_train < len(train_set):
        train_set = TensorDataset(*(t[: ns.max_train] for t in train_set.tensors))
    _, in_channels, image_size, _ = train_set.tensors[0].shape

    model = build_model(ns.model, in_channels=in_channels, num_classes=NUM_CLASSES[ns.dataset], image_size=image_size)
    model = fa.convert_to_analog(model, make_config(ns))
    opt = fa.AnalogSGD(model.parameters(), lr=ns.lr, seed=ns.seed)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(ns.seed)
    loader = DataLoader(train_set, batch_size=ns.batch_size, shuffle=True, generator=generator)

    from tqdm.auto import tqdm

    steps = 0
    train_loss = train_acc = float("nan")
    model.train()
    start = time.perf_counter()
    for epoch in range(ns.epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(
            loader,
            desc=f"{ns.algorithm} epoch {epoch + 1}/{ns.epochs}",
            disable=True if ns.no_progress else None,
            leave=False,
            dynamic_ncols=True,
        )
        for x, y in bar:
            logits = model(x)
            loss = loss_fn(logits, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            steps += 1
            loss_sum += loss.item() * y.numel()
            correct += (logits.detach().argmax(dim=1) == y).sum().item()
            seen += y.numel()
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.2%}", refresh=False)
        bar.close()
        train_loss, train_acc = loss_sum / seen, correct / seen
    wall_time = time.perf_counter() - start

    eval_start = time.perf_counter()
    test_acc, test_loss = evaluate(model, test_set)
    eval_time = time.perf_counter() - eval_start

    return {
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "wall_time_s": wall_time,
        "eval_time_s": eval_time,
        "pulses": int(fa.total_pulses(model)),
        "steps": steps,
        "train_samples": len(train_set),
        "algorithm": ns.algorithm,
        "model": ns.model,
        "dataset": ns.dataset,
    }


def format_result(result: Mapping[str, Any]) -> str:
    """One-line summary: ``test accuracy: XX.XX% | wall time: S.S s | pulses: N``."""
    return f"test accuracy: {100 * result['test_accuracy']:.2f}% | wall time: {result['wall_time_s']:.1f} s | pulses: {result['pulses']}"


def train_command(args: argparse.Namespace) -> int:
    """Run ``fastanalog train`` with parsed options; print the summary line; return the exit status."""
    try:
        result = run_training(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fastanalog train: error: {exc}", file=sys.stderr)
        return 2
    print(format_result(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m fastanalog.train.cli`` (same options as ``fastanalog train``)."""
    return train_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
