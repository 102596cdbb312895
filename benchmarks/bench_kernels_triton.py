"""Throughput of the fused Triton update kernels on a CUDA GPU.

For every algorithm and size it prints (as a markdown table, optionally also CSV):

* the kernel time (median of ``triton.testing.do_bench``, L2 flushed between runs);
* the effective bandwidth in GB/s (1e9 bytes/s), counting each array read and each
  array written once at its storage dtype, as a memory-bound kernel ideally moves them:
  asgd reads g, W and writes W (12 B/element at float32); rl (a transfer step) reads
  g, W, P and writes W, P, Wbar (24 B); rl2 reads g, W, P, H and writes W, P, H, Wbar
  (32 B); with ``--excess`` the per-sample ``|g|`` sums ``A`` are read too (one array
  more). The int32 pulse counts the kernels also write per element (4 B per written
  array and element, 4 B more for the pairs with ``--excess``) are not counted there;
  the column "GB/s with pulses" counts them too (they cap the first figure at 12/16 of
  the copy bandwidth for asgd, 24/32 for rl, 32/40 for rl2). With ``--totals`` the
  kernels reduce the pulses in-kernel to one int64 total per array, as the optimizer
  asks them to, and write no counts: both columns agree;
* that bandwidth as a fraction of the device's copy bandwidth measured in the same
  run (``dst.copy_(src)`` on large buffers, reading and writing each byte once) and of
  the nominal peak from a small table keyed by the device name;
* speed-ups over the plain PyTorch reference (``fastanalog.ops.reference``) and over
  ``torch.compile`` of that reference, both timed the same way in the same run;
* at the smallest size, the fraction of pulse counts on which kernel and reference
  disagree after one step from identical state (GPU ``log``/``sin``/``cos`` differ from
  the reference's by an ulp, which can flip a count sitting on a rounding threshold).

Sizes are element counts with optional binary suffixes (``1M`` = 2**20). Without a
CUDA GPU it says so and exits with status 0. ``--smoke`` instead runs a tiny size on
the CPU under the Triton interpreter to check the script itself (its numbers mean
nothing).

    python benchmarks/bench_kernels_triton.py --sizes 1M,16M,256M --algorithms rl2 --csv out.csv
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import torch

ALGORITHMS = ("asgd", "rl", "rl2")
DEFAULT_SIZES = "1M,4M,16M,64M,256M"
# (arrays read, arrays written) per element, g included.
ARRAYS = {
    "asgd": (("g", "W"), ("W",)),
    "rl": (("g", "W", "P"), ("W", "P", "Wbar")),
    "rl2": (("g", "W", "P", "H"), ("W", "P", "H", "Wbar")),
}
# Nominal peak memory bandwidth in GB/s (1e9 B/s), matched as a substring of the device name; first match wins.
NOMINAL_PEAK_GBS = (
    ("GH200", 4000.0),
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L40", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("V100", 900.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("T4", 320.0),
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FAMILIES = ("linear", "power", "exp", "table")


def parse_size(text: str) -> int:
    """``"4M"`` -> 4 * 2**20 elements (suffixes K, M, G are powers of 1024)."""
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in ("K", "M", "G") else text
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be a number of elements like 4096 or 16M, got {text!r}") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"size must be a positive whole number of elements, got {text!r}")
    return int(value)


def parse_sizes(text: str) -> list[int]:
    return [parse_size(s) for s in text.split(",") if s.strip()]


def parse_algorithms(text: str) -> list[str]:
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in ALGORITHMS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown algorithm(s) {bad}: choose from {', '.join(ALGORITHMS)}")
    return names


def nominal_peak_gbs(name: str) -> float | None:
    """Nominal peak bandwidth of a device name from the table (None if unknown)."""
    for key, value in NOMINAL_PEAK_GBS:
        if key.lower() in name.lower():
            return value
    return None


def bytes_per_element(algorithm: str, dtype: torch.dtype, excess: bool = False) -> int:
    """Bytes per element of the arrays read and written once (g, A with ``excess``, and the state arrays)."""
    reads, writes = ARRAYS[algorithm]
    return (len(reads) + len(writes) + int(excess)) * torch.empty((), dtype=dtype).element_size()


def pulse_bytes_per_element(algorithm: str, excess: bool = False, totals: bool = False) -> int:
    """Bytes per element of the int32 pulse counts a step writes (P and W for rl/rl2, W for asgd; pairs with ``excess``).

    None with ``totals``: the kernels then write one int64 total per array.
    """
    if totals:
        return 0
    return (4 if algorithm == "asgd" else 8) + (4 if excess else 0)


def make_config(algorithm: str, family: str, d2d: float, c2c: float, read_noise: float):
    from fastanalog import AnalogConfig, ExpResponse, LinearResponse, PowerResponse, TableResponse

    kw = dict(tau=0.6, dw_min=0.001, d2d_std=d2d, c2c_std=c2c, variation_seed=1)
    device = {
        "linear": lambda: LinearResponse(**kw),
        "power": lambda: PowerResponse(gamma=0.5, **kw),
        "exp": lambda: ExpResponse(gamma=1.5, **kw),
        "table": lambda: TableResponse(up=(2.0, 1.5, 1.0, 0.5, 0.0), down=(0.0, 0.5, 1.0, 1.5, 2.0), **kw),
    }[family]()
    return AnalogConfig(algorithm=algorithm, device=device, read_noise=read_noise)


def make_arrays(
    algorithm: str, numel: int, dtype: torch.dtype, where: str, seed: int = 0, excess: bool = False
) -> dict[str, torch.Tensor]:
    """The state arrays and g; with ``excess`` also ``A`` (per-sample |g| sums: |g| plus up to 1)."""
    gen = torch.Generator(device=where).manual_seed(seed)
    names = (
        ("g", "W", "P", "H", "Wbar") if algorithm == "rl2" else ("g", "W", "P", "Wbar") if algorithm == "rl" else ("g", "W")
    )
    out = {}
    for name in names:
        t = torch.rand(numel, generator=gen, device=where, dtype=torch.float32)
        scale = {"g": 2.0, "W": 0.6, "P": 0.1, "H": 0.002, "Wbar": 0.0}[name]
        out[name] = ((t - 0.5) * scale).to(dtype)
    if excess:
        out["A"] = (out["g"].float().abs() + torch.rand(numel, generator=gen, device=where)).to(dtype)
    return out


def step_fn(impl: Callable, algorithm: str, arrays: dict, config, key: int, totals: bool = False) -> Callable[[], object]:
    """A no-argument callable running one step of ``impl`` on ``arrays`` (in place); ``totals`` for the kernels only."""
    common = dict(lr=0.05, config=config, key=key, tensor_id=0, A=arrays.get("A"))
    if totals:
        common["totals"] = True
    a = arrays
    if algorithm == "asgd":
        return lambda: impl(a["W"], a["g"], **common)
    if algorithm == "rl":
        return lambda: impl(a["W"], a["P"], a["Wbar"], a["g"], transfer=True, **common)
    return lambda: impl(a["W"], a["P"], a["H"], a["Wbar"], a["g"], **common)


def time_ms(fn: Callable[[], object], where: str, rep_ms: int) -> float:
    """Median milliseconds of one call: ``do_bench`` on a GPU, wall clock (3 calls) on the CPU."""
    if where == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=max(rep_ms // 4, 5), rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def measured_copy_gbs(where: str, rep_ms: int, nbytes: int) -> float:
    """Device copy bandwidth in GB/s: ``dst.copy_(src)`` reads and writes ``nbytes`` each."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=where).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), where, rep_ms)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def timed_step(impl: Callable, algorithm: str, arrays: dict, config, key: int, where: str, rep_ms: int) -> float | None:
    """Median ms of one step of ``impl``; None when the device runs out of memory (the reference at large sizes)."""
    try:
        return time_ms(step_fn(impl, algorithm, arrays, config, key), where, rep_ms)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def pulse_mismatch(algorithm: str, numel: int, dtype, where: str, config, key: int, tri, ref, excess: bool = False) -> float:
    """Fraction of pulse counts (all arrays written, pairs included) on which kernel and reference differ after one step."""
    a = make_arrays(algorithm, numel, dtype, where, seed=1, excess=excess)
    b = {k: v.clone() for k, v in a.items()}
    pa = step_fn(tri, algorithm, a, config, key)()
    pb = step_fn(ref, algorithm, b, config, key)()
    diff = int((pa.first != pb.first).sum())
    total = pa.first.numel()
    if pa.first_pairs is not None:
        diff += int((pa.first_pairs != pb.first_pairs).sum())
        total += pa.first_pairs.numel()
    if pa.main is not None:
        diff += int((pa.main != pb.main).sum())
        total += pa.main.numel()
    return diff / max(total, 1)


def _fmt(x: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec) + unit


def run(args: argparse.Namespace, where: str) -> list[dict]:
    from fastanalog.ops import philox
    from fastanalog.ops.reference import asgd_step_ref, rl2_step_ref, rl_step_ref
    from fastanalog.ops.triton import asgd_step_triton, rl2_step_triton, rl_step_triton

    triton_impl = {"asgd": asgd_step_triton, "rl": rl_step_triton, "rl2": rl2_step_triton}
    ref_impl = {"asgd": asgd_step_ref, "rl": rl_step_ref, "rl2": rl2_step_ref}
    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name() if where == "cuda" else "CPU (Triton interpreter)"
    peak = nominal_peak_gbs(name) if where == "cuda" else None
    copy_gbs = measured_copy_gbs(where, args.rep_ms, args.copy_bytes if where == "cuda" else 2**22)
    print(f"device: {name}")
    print(f"measured copy bandwidth: {copy_gbs:.1f} GB/s; nominal peak: {_fmt(peak, '.0f', ' GB/s')}")
    print(
        f"storage {args.dtype}, family {args.family}, d2d_std {args.d2d}, c2c_std {args.c2c}, read_noise {args.read_noise}, "
        f"excess input A: {'yes' if args.excess else 'no'}, pulses: {'in-kernel totals' if args.totals else 'per element'}"
    )
    print()
    key = philox.step_key(0, 1, 0)
    rows = []
    for algorithm in args.algorithms:
        config = make_config(algorithm, args.family, args.d2d, args.c2c, args.read_noise)
        compiled = {}
        mismatch = pulse_mismatch(
            algorithm, min(args.sizes), dtype, where, config, key, triton_impl[algorithm], ref_impl[algorithm], args.excess
        )
        for numel in args.sizes:
            arrays = make_arrays(algorithm, numel, dtype, where, excess=args.excess)
            bpe = bytes_per_element(algorithm, dtype, args.excess)
            tri_fn = step_fn(triton_impl[algorithm], algorithm, arrays, config, key, totals=args.totals)
            tri_ms = time_ms(tri_fn, where, args.rep_ms)
            ref_ms = None
            if numel <= args.max_ref_size:
                ref_ms = timed_step(ref_impl[algorithm], algorithm, arrays, config, key, where, args.rep_ms)
            comp_ms = None
            if args.compile and numel <= args.max_ref_size:
                if "fn" not in compiled:
                    print(
                        f"[{algorithm}] torch.compile of the reference (first calls compile; this can take minutes)",
                        file=sys.stderr,
                    )
                    compiled["fn"] = torch.compile(ref_impl[algorithm])
                comp_ms = timed_step(compiled["fn"], algorithm, arrays, config, key, where, args.rep_ms)
            gbs = bpe * numel / (tri_ms * 1e-3) / 1e9
            gbs_pulses = (bpe + pulse_bytes_per_element(algorithm, args.excess, args.totals)) * numel / (tri_ms * 1e-3) / 1e9
            rows.append(
                dict(
                    device=name,
                    algorithm=algorithm,
                    family=args.family,
                    dtype=args.dtype,
                    excess=args.excess,
                    totals=args.totals,
                    elements=numel,
                    bytes_per_element=bpe,
                    triton_ms=tri_ms,
                    gbs=gbs,
                    gbs_with_pulses=gbs_pulses,
                    frac_measured=gbs / copy_gbs,
                    frac_nominal=gbs / peak if peak else None,
                    reference_ms=ref_ms,
                    speedup_reference=ref_ms / tri_ms if ref_ms else None,
                    compiled_ms=comp_ms,
                    speedup_compiled=comp_ms / tri_ms if comp_ms else None,
                    pulse_mismatch=mismatch if numel == min(args.sizes) else None,
                )
            )
            del arrays
            if where == "cuda":
                torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    head = (
        "| algorithm | elements | B/elem | Triton ms | GB/s | GB/s with pulses | of copy BW | of nominal peak "
        "| ref ms | vs ref | compiled ms | vs compiled | pulse mismatch |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(
            f"| {r['algorithm']} | {r['elements']:,} | {r['bytes_per_element']} | {r['triton_ms']:.3f} | {r['gbs']:.0f} | {r['gbs_with_pulses']:.0f} | "
            f"{_fmt(r['frac_measured'], '.0%')} | {_fmt(r['frac_nominal'], '.0%')} | {_fmt(r['reference_ms'], '.2f')} | "
            f"{_fmt(r['speedup_reference'], '.1f', 'x')} | {_fmt(r['compiled_ms'], '.2f')} | {_fmt(r['speedup_compiled'], '.1f', 'x')} | "
            f"{_fmt(r['pulse_mismatch'], '.2e')} |"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_kernels_triton", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES), help=f"element counts (default {DEFAULT_SIZES})"
    )
    p.add_argument(
        "--algorithms", type=parse_algorithms, default=list(ALGORITHMS), help="comma-separated subset of asgd,rl,rl2"
    )
    p.add_argument("--family", choices=FAMILIES, default="linear", help="response family of both devices (default linear)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="storage dtype of the arrays and g")
    p.add_argument("--d2d", type=float, default=0.0, help="device-to-device spread d2d_std (default 0)")
    p.add_argument("--c2c", type=float, default=0.0, help="cycle-to-cycle spread c2c_std (default 0)")
    p.add_argument("--read-noise", type=float, default=0.0, help="read noise of P (default 0)")
    p.add_argument("--excess", action="store_true", help="per-sample writes: pass the |g| sums A (pairs, a second stream)")
    p.add_argument("--totals", action="store_true", help="kernels reduce the pulses to one int64 total per array")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition budget per measurement in ms")
    p.add_argument("--copy-bytes", type=parse_size, default=2**31, help="buffer size of the copy-bandwidth probe in bytes")
    p.add_argument("--max-ref-size", type=parse_size, default=2**28, help="largest size at which the reference is timed")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile of the reference")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    p.add_argument("--smoke", action="store_true", help="check the script on the CPU under the Triton interpreter (tiny size)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit status (0 also when no GPU is present)."""
    args = build_parser().parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.sizes = [min(args.sizes[0], 4096)]
        args.compile = False
        where = "cpu"
    elif not torch.cuda.is_available():
        print("bench_kernels_triton: no CUDA GPU here; the Triton kernel benchmark needs one (nothing measured).")
        return 0
    else:
        where = "cuda"
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_kernels_triton: triton is not installed; nothing measured.")
        return 0
    rows = run(args, where)
    print_table(rows)
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"\nwrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
