"""Throughput of the fused C++ analog-update kernels on CPU, against memory bandwidth and the reference.

For each algorithm (and device family) at ``--size`` float32 elements this measures, in one
process and on the same threads (``--threads``; torch's intra-op threads otherwise):

* the kernel alone (``torch.ops.fastanalog._native_step``, the C++ kernel of the op
  ``fastanalog::<alg>_step``, with empty pulse tensors, so no pulse counts are written): GB/s with the bytes the step must move, every array read and
  written once: asgd 12 B/element (g, W in; W out), rl 28 (g, W, P in; W, P, Wbar out; a
  transfer every step), rl2 32 (g, W, P, H in; W, P, H, Wbar out); with ``--excess`` the
  per-sample writes, whose float32 excess input ``A`` adds 4 B;
* the same with int32 pulse counts written (+4 B per written array: asgd 16, rl 36, rl2 40;
  with ``--excess`` +4 B more for the pairs of the first array);
* the triad ``a = b + s * c`` (12 B/element) on the same threads, in C++ in the extension:
  the kernel's share of it is the "of triad" column;
* the full launcher (``<alg>_step_cpp`` with in-kernel pulse totals, as the optimizer calls it) against
  the eager reference (``<alg>_step_ref``) and, with ``--compiled``, against ``torch.compile`` of
  the reference: speed-ups of medians over repeats after warm-up (compilation excluded). The
  compiled reference is off by default: on a 2-core machine Inductor had not compiled one of
  them after 15 minutes (``--no-compiled``, the default, is still accepted).

``python benchmarks/bench_kernels_cpu.py [--size N] [--algorithms asgd,rl,rl2] [--devices
linear,power] [--threads T] [--repeats R] [--warmup W] [--tiny] [--grad-scale S] [--excess]
[--no-reference] [--compiled] [--out DIR]`` prints a markdown table (column "pulsing": the
share of elements whose first write, W of asgd and P of rl/rl2, got a pulse in the last call);
with ``--out`` it also writes ``bench_kernels_cpu.csv`` and ``.md`` there.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import fastanalog as fa
from fastanalog.ops import cpp, packing
from fastanalog.ops.reference import asgd_step_ref, rl2_step_ref, rl_step_ref

ARRAY_BYTES = {"asgd": 12, "rl": 28, "rl2": 32}
PULSE_BYTES = {"asgd": 4, "rl": 8, "rl2": 8}
EXCESS_BYTES = 4  # A in float32 (in), and with pulse counts the int32 pairs (out)
TRIAD_BYTES = 12
DEVICES = {
    "linear": lambda: fa.LinearResponse(tau=0.6, dw_min=0.001),
    "power": lambda: fa.PowerResponse(tau=0.6, gamma=0.5, dw_min=0.001),
    "exp": lambda: fa.ExpResponse(tau=0.6, gamma=1.0, dw_min=0.001),
    "table": lambda: fa.TableResponse(tau=0.6, dw_min=0.001, up=(2.0, 1.0, 0.0), down=(0.0, 1.0, 2.0)),
}
KEY = 0x1234_5678_9ABC
LR = 0.01
# g ~ N(0, GRAD_SCALE^2): lr * g / dw_min ~ N(0, 1), so most elements pulse; --grad-scale 0.0125
# gives about 10% of them a pulse, training's case.
GRAD_SCALE = 0.1


def _median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _arrays(n: int, excess: bool = False, grad_scale: float = GRAD_SCALE):
    gen = torch.Generator().manual_seed(0)
    W = torch.rand(n, generator=gen) * 0.8 - 0.4
    P = torch.randn(n, generator=gen) * 0.01
    H = torch.zeros(n)
    Wbar = torch.zeros(n)
    g = torch.randn(n, generator=gen) * grad_scale  # lr * g / dw_min ~ N(0, (grad_scale / 0.1)^2)
    # Per-sample |g| sums: the excess lr * (A - |g|) / 2 / dw_min ~ U(0, 0.5) pairs.
    A = g.abs() + torch.rand(n, generator=gen) * 0.1 if excess else None
    return W, P, H, Wbar, g, A


def _kernel_call(alg: str, config: fa.AnalogConfig, arrays, pulses: bool):
    """The C++ kernel's op on the arrays: with or without int32 pulse outputs (and pairs, with an excess)."""
    W, P, H, Wbar, g, A = arrays
    n = W.numel()

    def out(written: bool = True):
        return [torch.empty(n if pulses and written else 0, dtype=torch.int32)]

    packed = packing.pack_op_config(config)
    common = ([KEY], [0], [0], packing.step_floats(config, LR, True), list(packed.devices), list(packed.tables),
              list(packed.seeds))  # fmt: skip
    residual = alg != "asgd"
    first = out()
    args = (
        packing.ALGORITHM_IDS[alg], [W], [P] if residual else [], [H] if alg == "rl2" else [], [Wbar] if residual else [], [g],
        [A] if A is not None else [], first, out(A is not None), out() if residual else [], *common,
    )  # fmt: skip

    def call():
        torch.ops.fastanalog._native_step(*args)

    call.first_pulses = first[0]  # the first array's net pulses of the last call (with pulses)
    return call


def _step_call(fn, alg: str, config: fa.AnalogConfig, arrays, **extra):
    """A launcher with the reference signature (reference, compiled reference or C++)."""
    W, P, H, Wbar, g, A = arrays
    kw = dict(lr=LR, config=config, key=KEY, tensor_id=0, A=A, **extra)
    if alg == "asgd":
        return lambda: fn(W, g, **kw)
    if alg == "rl":
        return lambda: fn(W, P, Wbar, g, transfer=True, **kw)
    return lambda: fn(W, P, H, Wbar, g, **kw)


def bench(
    size: int,
    algorithms: list[str],
    devices: list[str],
    repeats: int,
    reference: bool,
    compiled: bool = False,
    excess: bool = False,
    warmup: int = 1,
    grad_scale: float = GRAD_SCALE,
) -> list[dict]:
    if not cpp.cpp_available():
        raise SystemExit(f"the C++ kernels are unavailable: {cpp._state['error']}")
    a, b, c = torch.empty(size), torch.rand(size), torch.rand(size)
    triad_times = []

    def triad() -> float:
        t = _median_seconds(lambda: cpp.triad_cpp(a, b, c, 0.5), repeats, warmup)
        triad_times.append(t)
        return TRIAD_BYTES * size / t / 1e9

    refs = {"asgd": asgd_step_ref, "rl": rl_step_ref, "rl2": rl2_step_ref}
    launchers = {"asgd": cpp.asgd_step_cpp, "rl": cpp.rl_step_cpp, "rl2": cpp.rl2_step_cpp}
    rows = []
    for alg in algorithms:
        for dev in devices:
            config = fa.AnalogConfig(algorithm=alg, device=DEVICES[dev]())
            arrays = _arrays(size, excess, grad_scale)
            triad_gbs = triad()
            array_bytes = ARRAY_BYTES[alg] + (EXCESS_BYTES if excess else 0)
            pulse_bytes = PULSE_BYTES[alg] + (EXCESS_BYTES if excess else 0)
            t_kernel = _median_seconds(_kernel_call(alg, config, arrays, pulses=False), repeats, warmup)
            with_pulses = _kernel_call(alg, config, arrays, pulses=True)
            t_pulses = _median_seconds(with_pulses, repeats, warmup)
            # As AnalogSGD calls it: pulse totals reduced in the kernel.
            t_launch = _median_seconds(_step_call(launchers[alg], alg, config, arrays, totals=True), repeats, warmup)
            row = {
                "algorithm": alg,
                "device": dev,
                "excess": excess,
                "size": size,
                "grad_scale": grad_scale,
                "pulsing": float(with_pulses.first_pulses.ne(0).float().mean()),
                "threads": torch.get_num_threads(),
                "kernel_ms": 1e3 * t_kernel,
                "kernel_GBps": array_bytes * size / t_kernel / 1e9,
                "triad_GBps": triad_gbs,
                "of_triad": array_bytes * size / t_kernel / 1e9 / triad_gbs,
                "with_pulses_ms": 1e3 * t_pulses,
                "with_pulses_GBps": (array_bytes + pulse_bytes) * size / t_pulses / 1e9,
                "launcher_ms": 1e3 * t_launch,
            }
            if reference:
                ref_arrays = _arrays(size, excess, grad_scale)
                t_eager = _median_seconds(_step_call(refs[alg], alg, config, ref_arrays), max(1, repeats // 2), warmup)
                row.update(eager_ms=1e3 * t_eager, speedup_eager=t_eager / t_launch)
            if reference and compiled:
                compiled_ref = torch.compile(refs[alg])
                t_compiled = _median_seconds(_step_call(compiled_ref, alg, config, ref_arrays), repeats, max(2, warmup))
                row.update(compiled_ms=1e3 * t_compiled, speedup_compiled=t_compiled / t_launch)
            rows.append(row)
            print(_row_line(row), file=sys.stderr, flush=True)
    return rows


COLUMNS = [
    ("algorithm", "algorithm", "{}"),
    ("device", "device", "{}"),
    ("pulsing", "pulsing", "{:.0%}"),
    ("kernel_ms", "kernel ms", "{:.1f}"),
    ("kernel_GBps", "kernel GB/s", "{:.2f}"),
    ("triad_GBps", "triad GB/s", "{:.2f}"),
    ("of_triad", "of triad", "{:.0%}"),
    ("with_pulses_GBps", "GB/s with pulses", "{:.2f}"),
    ("launcher_ms", "launcher ms", "{:.1f}"),
    ("eager_ms", "eager ref ms", "{:.0f}"),
    ("speedup_eager", "x eager", "{:.1f}"),
    ("compiled_ms", "compiled ref ms", "{:.0f}"),
    ("speedup_compiled", "x compiled", "{:.1f}"),
]


def _row_line(row: dict) -> str:
    return "  ".join(f"{title}={fmt.format(row[key])}" for key, title, fmt in COLUMNS if key in row)


def markdown(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(t for _, t, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[k]) if k in r else "" for k, _, fmt in cols) + " |")
    return "\n".join(lines)


TINY_SIZE = 4099  # --tiny: odd, and past one kernel block


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_kernels_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None, help=f"elements per tensor (default 16M; --tiny: {TINY_SIZE})")
    parser.add_argument("--algorithms", default="asgd,rl,rl2", help="comma-separated subset of asgd,rl,rl2")
    parser.add_argument("--devices", default="linear,power", help=f"comma-separated device families of {','.join(DEVICES)}")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: torch's intra-op threads)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before each measurement's repeats (default 1)")
    parser.add_argument("--tiny", action="store_true", help=f"a smoke run: {TINY_SIZE} elements, no compiled reference")
    parser.add_argument(
        "--grad-scale", type=float, default=GRAD_SCALE,
        help=f"standard deviation of g (default {GRAD_SCALE}: most elements pulse; 0.0125: about 10%% do)",
    )  # fmt: skip
    parser.add_argument("--excess", action="store_true", help="per-sample writes: pass an excess input A (pairs)")
    parser.add_argument("--no-reference", action="store_true", help="skip the eager and compiled reference")
    parser.add_argument(
        "--compiled", action="store_true",
        help="also time torch.compile of the reference (its compilation can take well over 15 minutes on two cores)",
    )  # fmt: skip
    parser.add_argument("--no-compiled", action="store_true", help="do not time the compiled reference (the default)")
    parser.add_argument("--out", type=Path, default=None, help="directory for bench_kernels_cpu.csv and .md")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = TINY_SIZE if args.tiny else 16 * 2**20
    for option, value, least in (("--size", args.size, 1), ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0)):
        if value < least:
            parser.error(f"{option} must be >= {least}, got {value}")
    if not (args.grad_scale > 0 and math.isfinite(args.grad_scale)):
        parser.error(f"--grad-scale must be a finite number > 0, got {args.grad_scale}")
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    for a in algorithms:
        if a not in ARRAY_BYTES:
            parser.error(f"unknown algorithm {a!r}: choose from asgd, rl, rl2")
    for d in devices:
        if d not in DEVICES:
            parser.error(f"unknown device {d!r}: choose from {', '.join(DEVICES)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = bench(
        args.size, algorithms, devices, args.repeats, not args.no_reference, args.compiled and not (args.no_compiled or args.tiny), args.excess,
        warmup=args.warmup, grad_scale=args.grad_scale,
    )  # fmt: skip
    table = markdown(rows)
    header = (
        f"{args.size} float32 elements, {torch.get_num_threads()} threads, CPU kernels: {cpp.cpu_variant()} "
        f"({torch.backends.cpu.get_cpu_capability()}), gradient scale {args.grad_scale:g}"
        f"{', per-sample writes (excess A)' if args.excess else ''}"
    )
    print(header)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "bench_kernels_cpu.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            writer.writeheader()
            writer.writerows(rows)
        (args.out / "bench_kernels_cpu.md").write_text(header + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
