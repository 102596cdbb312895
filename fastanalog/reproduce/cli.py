"""``fastanalog reproduce``: run the paper's experiments and write a report.

::

    fastanalog reproduce            # the full report (about 70-80 minutes on 2 cores)
    fastanalog reproduce --quick    # a smaller version in a few minutes (what the tests run)

Writes ``DIR/REPORT.md`` (``--out``, default ``results/reproduce`` or ``results/reproduce-quick``)
with its PNG figures, one CSV per table, ``runs.csv`` (every training run) and
``summary.json`` (the findings as numbers).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

PARTS = ("theory", "tables", "ablations", "defaults")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--quick", action="store_true", help="the small version: digits only, one seed, fewer steps (a few minutes)")
    p.add_argument("--out", default=None, metavar="DIR", help="report folder (default: results/reproduce, with --quick results/reproduce-quick)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="training processes of one torch thread each (default: the CPU count, at most 2 with --quick)",
    )
    p.add_argument(
        "--only",
        default=",".join(PARTS),
        metavar="LIST",
        help=f"comma-separated parts to run: {','.join(PARTS)} (default: all; ablations need tables' learning-rate grid)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="fastanalog reproduce", description="Run the paper's experiments and write REPORT.md."))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "reproduce",
        help="run the paper's experiments and write a report",
        description="Run the paper's theory checks, accuracy tables and ablations with fastanalog and write REPORT.md "
        "with figures and CSV tables.",
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .experiments import full_settings, quick_settings, run_all
    from .report import write_report

    parts = tuple(x.strip() for x in args.only.split(",") if x.strip())
    bad = [x for x in parts if x not in PARTS]
    if bad or not parts:
        print(f"fastanalog reproduce: error: --only takes a comma-separated subset of {','.join(PARTS)}, got {args.only!r}", file=sys.stderr)
        return 2
    cpus = os.cpu_count() or 1
    workers = args.workers if args.workers is not None else (min(2, cpus) if args.quick else cpus)
    if workers < 1:
        print(f"fastanalog reproduce: error: --workers must be >= 1, got {workers}", file=sys.stderr)
        return 2
    settings = quick_settings(workers) if args.quick else full_settings(workers)
    out = Path(args.out or ("results/reproduce-quick" if args.quick else "results/reproduce"))
    if "defaults" in parts or "tables" in parts or "ablations" in parts:
        if any(spec.dataset == "fashion-mnist" for spec in settings.tables) or settings.defaults_dataset == "fashion-mnist":
            from ..train.data import describe_dataset

            try:
                describe_dataset("fashion-mnist")
            except (FileNotFoundError, ValueError) as e:
                print(f"fastanalog reproduce: error: {e}", file=sys.stderr)
                return 2
    t = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t:6.0f} s] {msg}", flush=True)

    say(f"fastanalog reproduce ({settings.name}): writing into {out}")
    res = run_all(settings, say, parts)
    command = "fastanalog reproduce" + (" --quick" if args.quick else "") + (f" --only {args.only}" if parts != PARTS else "")
    path = write_report(res, out, command)
    say(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
