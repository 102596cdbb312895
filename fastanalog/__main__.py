"""Command-line entry point: ``fastanalog <command>`` or ``python -m fastanalog <command>``.

Commands:
    train   train a model with analog weights and report its test accuracy (``fastanalog train --help``).
    bench   whole-model benchmarks: step, train, aihwkit, kernels (``fastanalog bench --help``).
    reproduce  the paper's experiments, written up as REPORT.md (``fastanalog reproduce --help``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command; each sets ``func`` to its handler."""
    parser = argparse.ArgumentParser(
        prog="fastanalog", description="Fast simulation of neural-network training on analog resistive devices."
    )
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)

    from .train.cli import add_train_arguments, train_command

    train = commands.add_parser(
        "train",
        help="train a model with analog weights",
        description="Train a model with analog weights and report its test accuracy.",
    )
    add_train_arguments(train)
    train.set_defaults(func=train_command)

    from .bench.cli import add_parser as add_bench_parser

    add_bench_parser(commands)

    from .reproduce.cli import add_parser as add_reproduce_parser

    add_reproduce_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the chosen command and return its exit status."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
