"""``fastanalog bench gpu-compile``: the Triton kernels compiled for a real NVIDIA GPU, with no GPU.

Triton's NVIDIA backend and ``ptxas`` run on any machine, so what a kernel will cost on a
GPU can be read before one is lent: registers, spills, shared memory, and per element the
Philox multiplies (``mul.hi``), the global bytes loaded and stored and whether the loads
are vectorised.

How a variant is compiled: the optimizer's own launch path (``dispatch._launch`` with the
Triton backend, multi-tensor, in-kernel pulse totals) runs on small CPU tensors, with the
launchers' GPU block size, while ``JITFunction.run`` records the kernel and its arguments
instead of launching (the kernels of this process are compiled ones, not the interpreter's). Each
recorded launch is then specialised exactly as Triton's launcher would specialise it
(``create_function_from_signature`` and ``_pack_args`` of the real backend) and compiled
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``. ``ptxas -v``
on the PTX gives registers, spill bytes and the stack frame.

Per-element figures divide a thread's static instruction counts by the elements a thread
handles (``BLOCK / (32 * num_warps)``); the kernels are straight-line per block, so static
counts are executed counts. 64-bit loads (per-tensor pointers and scalars of the
multi-tensor table) and atomics (pulse totals) are counted apart, per thread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

# The static goals the kernels are held to (float32, linear device, no noise options).
MAX_REGISTERS = 128
MAX_MULHI_PER_ELEMENT = 5.5  # one Philox call (20 mul.hi) per four elements, plus slack
MAX_MULHI_PER_ELEMENT_WITH_A = 10.0  # two streams (net and pairs rounding)


@dataclass(frozen=True)
class Variant:
    """One launch the optimizer makes: algorithm, device family, storage dtype and options."""

    algorithm: str
    family: str = "linear"
    dtype: str = "float32"
    excess: bool = False  # per-sample write: the A input
    noise: bool = False  # c2c, read noise and d2d variation on
    odd_sizes: bool = False  # a tensor of the group whose numel is not a multiple of 16

    @property
    def sizes(self) -> tuple[int, ...]:
        """Numels of the launch's tensors: layer sizes as models have them (multiples of 16), or one odd one."""
        return (4096, 1000, 65536) if self.odd_sizes else (4096, 9408, 65536)

    @property
    def name(self) -> str:
        parts = [self.algorithm, self.family, self.dtype]
        if self.excess:
            parts.append("A")
        if self.noise:
            parts.append("noise")
        if self.odd_sizes:
            parts.append("odd-sizes")
        return "-".join(parts)

    @property
    def goal_mulhi(self) -> float | None:
        """The mul.hi-per-element goal of this variant (None: not a goal variant)."""
        if self.family != "linear" or self.dtype != "float32" or self.noise or self.odd_sizes or self.algorithm == "rl":
            return None
        return MAX_MULHI_PER_ELEMENT_WITH_A if self.excess else MAX_MULHI_PER_ELEMENT


QUICK = [Variant("asgd"), Variant("asgd", excess=True), Variant("rl2"), Variant("rl2", excess=True)]
FULL = QUICK + [
    Variant("rl"),
    Variant("rl", excess=True),
    *(Variant(a, family=f) for a in ("asgd", "rl2") for f in ("power", "exp", "table")),
    *(Variant(a, dtype=d) for a in ("asgd", "rl", "rl2") for d in ("bfloat16", "float16")),
    *(Variant(a, noise=True) for a in ("asgd", "rl", "rl2")),
    *(Variant(a, odd_sizes=True) for a in ("asgd", "rl2")),
]


@dataclass
class KernelReport:
    """What one compiled kernel costs on the target (a thread's static counts, per element where stated)."""

    variant: str
    kernel: str
    arch: int
    block: int
    num_warps: int
    registers: int
    spill_bytes: int  # spill stores + spill loads
    stack_bytes: int
    shared_bytes: int
    mulhi_per_element: float
    load_bytes_per_element: float
    store_bytes_per_element: float
    loads_vectorised: bool
    stores_vectorised: bool
    table_loads: int  # 64-bit loads per thread (multi-tensor table)
    atomics: int  # atomics per thread (pulse totals)
    goal_mulhi: float | None = None
    problems: list[str] = field(default_factory=list)


# ----- recording the optimizer's launches ---------------------------------------------------
@contextlib.contextmanager
def _recording() -> Iterator[list]:
    """While active, ``JITFunction.run`` records ``(kernel, args, kwargs)`` instead of launching.

    The launchers accept CPU tensors only for the interpreter, so the interpreter flag is set
    for their checks, and their block size is the GPU's.
    """
    from triton.runtime.jit import JITFunction

    from ..ops.triton import common

    launches: list = []
    original = JITFunction.run
    saved = (os.environ.get("TRITON_INTERPRET"), common.BLOCK_INTERPRETER)

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))
        return None

    JITFunction.run = record
    os.environ["TRITON_INTERPRET"] = "1"
    common.BLOCK_INTERPRETER = common.BLOCK_GPU
    try:
        yield launches
    finally:
        JITFunction.run = original
        common.BLOCK_INTERPRETER = saved[1]
        if saved[0] is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved[0]


def _config(variant: Variant):
    from .. import devices
    from ..config import AnalogConfig

    noise = dict(c2c_std=0.1, d2d_std=0.1) if variant.noise else {}
    if variant.family == "linear":
        device = devices.LinearResponse(tau=1.0, dw_min=1e-3, **noise)
    elif variant.family == "power":
        device = devices.PowerResponse(tau=0.6, gamma=0.5, dw_min=1e-3, **noise)
    elif variant.family == "exp":
        device = devices.ExpResponse(tau=0.6, gamma=2.0, dw_min=1e-3, **noise)
    else:
        grid = [i / 32 for i in range(33)]  # a soft-bounds curve sampled on 33 points
        up = tuple(1.0 - x for x in grid)
        device = devices.TableResponse(tau=1.0, dw_min=1e-3, up=up, down=up[::-1], **noise)
    return AnalogConfig(algorithm=variant.algorithm, device=device, read_noise=0.01 if variant.noise else 0.0, gamma=0.1, transfer_lr=0.1)


def record_launches(variant: Variant) -> list:
    """The Triton launches of one optimizer step of ``variant`` on a group of tensors of ``variant.sizes``."""
    from ..ops import dispatch

    if not dispatch.backend_available("triton"):
        raise RuntimeError("the Triton backend is not importable here (is triton installed?)")
    config = _config(variant)
    dtype = getattr(torch, variant.dtype)
    items = []
    for tid, n in enumerate(variant.sizes):
        arrays = {"main": torch.empty(n, dtype=dtype, device="cpu")}
        if config.has_residual:
            arrays["residual"] = torch.empty(n, dtype=dtype, device="cpu")
        arrays["buffer"] = torch.empty(n, dtype=dtype, device="cpu") if config.has_buffer else None
        grad = torch.empty(n, dtype=dtype, device="cpu")
        A = torch.empty(n, dtype=dtype, device="cpu") if variant.excess else None
        items.append(dispatch.StepItem(arrays, None, grad, config, key=12345 + tid, tensor_id=tid, A=A))
    with _recording() as launches, dispatch.use_backend("triton"):
        dispatch.analog_step_group(items, lr=0.01, step=1, totals=True)
    if not launches:
        raise RuntimeError(f"{variant.name}: the Triton launcher made no kernel launch")
    return launches


# ----- compiling and reading the result -----------------------------------------------------
def compile_launch(kernel, args: tuple, kwargs: dict, arch: int):
    """Compile one recorded launch for ``cuda:arch`` as Triton's launcher would specialise it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__), bound


def ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers, spill and stack bytes of ``ptx`` from ``ptxas -v`` (Triton's own ptxas)."""
    from triton import knobs

    ptxas = knobs.nvidia.ptxas.path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}", src, "-o", src + ".o"],
            capture_output=True,
            text=True,
            check=True,
        )
    log = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if regs is None:
        raise RuntimeError(f"could not read ptxas -v output:\n{log}")
    return {
        "registers": int(regs.group(1)),
        "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else 0,
        "stack_bytes": int(stack.group(1)) if stack else 0,
    }


_WIDTH = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "b32": 4, "u32": 4, "s32": 4, "f32": 4}
_MEM = re.compile(r"\b(ld|st)\.global((?:\.[a-z0-9]+)*)\s")


def memory_counts(ptx: str) -> dict[str, float]:
    """Per-thread global bytes of element data loaded and stored, vector use, 64-bit loads and atomics."""
    load = store = 0
    scalar_loads = scalar_stores = vector_loads = vector_stores = table_loads = 0
    for op, mods in _MEM.findall(ptx):
        parts = mods.strip(".").split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        width = next((_WIDTH[p] for p in parts if p in _WIDTH), None)
        if width is None:  # 64-bit: table pointers and per-tensor scalars
            table_loads += op == "ld"
            continue
        if op == "ld":
            load += vec * width
            vector_loads += vec > 1
            scalar_loads += vec == 1
        else:
            store += vec * width
            vector_stores += vec > 1
            scalar_stores += vec == 1
    atomics = len(re.findall(r"\b(?:atom|red)\.global", ptx))
    return dict(
        load=load,
        store=store,
        loads_vectorised=vector_loads > 0 and scalar_loads == 0,
        stores_vectorised=vector_stores > 0 and scalar_stores == 0,
        table_loads=table_loads,
        atomics=atomics,
    )


def analyse(variant: Variant, kernel, args: tuple, kwargs: dict, arch: int) -> KernelReport:
    """Compile one launch of ``variant`` and report its cost."""
    compiled, bound = compile_launch(kernel, args, kwargs, arch)
    ptx = compiled.asm["ptx"]
    num_warps = compiled.metadata.num_warps
    block = next((int(v) for k, v in bound.items() if k.upper() == "BLOCK"), None)
    if block is None:
        raise RuntimeError(f"{kernel.__name__} has no BLOCK constexpr: cannot count per element")
    per_thread = block / (32 * num_warps)
    usage = ptxas_usage(ptx, arch)
    mem = memory_counts(ptx)
    mulhi = len(re.findall(r"\bmul\.hi\.", ptx)) / per_thread
    report = KernelReport(
        variant=variant.name,
        kernel=kernel.__name__,
        arch=arch,
        block=block,
        num_warps=num_warps,
        registers=usage["registers"],
        spill_bytes=usage["spill_bytes"],
        stack_bytes=usage["stack_bytes"],
        shared_bytes=int(compiled.metadata.shared),
        mulhi_per_element=round(mulhi, 3),
        load_bytes_per_element=round(mem["load"] / per_thread, 3),
        store_bytes_per_element=round(mem["store"] / per_thread, 3),
        loads_vectorised=mem["loads_vectorised"],
        stores_vectorised=mem["stores_vectorised"],
        table_loads=mem["table_loads"],
        atomics=mem["atomics"],
        goal_mulhi=variant.goal_mulhi,
    )
    report.problems = problems(report, variant)
    return report


def expected_bytes(variant: Variant) -> tuple[int, int]:
    """(bytes loaded, bytes stored) per element that the arrays themselves need (no per-element counts)."""
    size = torch.empty((), dtype=getattr(torch, variant.dtype)).element_size()
    arrays = {"asgd": 1, "rl": 2, "rl2": 3}[variant.algorithm]
    inputs = arrays + 1 + (1 if variant.excess else 0)  # the arrays, g and A
    return inputs * size, arrays * size


def problems(r: KernelReport, variant: Variant) -> list[str]:
    """The goals a goal variant misses (float32, linear device, no noise); none for other variants."""
    out = []
    if r.spill_bytes:
        out.append(f"{r.spill_bytes} spill bytes")
    if r.goal_mulhi is None:
        return out
    if r.registers > MAX_REGISTERS:
        out.append(f"{r.registers} registers > {MAX_REGISTERS}")
    if r.mulhi_per_element > r.goal_mulhi:
        out.append(f"{r.mulhi_per_element} mul.hi per element > {r.goal_mulhi}")
    if not r.loads_vectorised:
        out.append("scalar loads of element data")
    _, stored = expected_bytes(variant)
    if r.store_bytes_per_element > stored:
        out.append(f"stores {r.store_bytes_per_element} bytes per element, the arrays need {stored} (per-element counts?)")
    return out


def run_variants(variants: list[Variant], arch: int) -> list[KernelReport]:
    reports = []
    for variant in variants:
        for kernel, args, kwargs in record_launches(variant):
            reports.append(analyse(variant, kernel, args, kwargs, arch))
    return reports


def markdown(reports: list[KernelReport]) -> str:
    head = "| variant | kernel | regs | spill B | stack B | mul.hi/elem (goal) | load B/elem | store B/elem | vector ld/st | problems |"
    rows = [head, "|" + "---|" * 10]
    for r in reports:
        goal = f" ({r.goal_mulhi:g})" if r.goal_mulhi is not None else ""
        vec = f"{'yes' if r.loads_vectorised else 'no'}/{'yes' if r.stores_vectorised else 'no'}"
        rows.append(
            f"| {r.variant} | {r.kernel} | {r.registers} | {r.spill_bytes} | {r.stack_bytes} | {r.mulhi_per_element:g}{goal} | "
            f"{r.load_bytes_per_element:g} | {r.store_bytes_per_element:g} | {vec} | {'; '.join(r.problems) or 'ok'} |"
        )
    return "\n".join(rows)


# ----- command line -------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", type=int, default=90, help="compute capability to compile for, e.g. 90 (H100/H200) or 80 (A100); default 90")
    p.add_argument("--quick", action="store_true", help="only asgd and rl2, float32, linear device, with and without A")
    p.add_argument("--json", action="store_true", help="print the reports as JSON instead of a markdown table")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the markdown table (or JSON with --json) to FILE")


def run(args: argparse.Namespace) -> int:
    """Compile and report; exit status 1 if a goal variant misses a goal, 2 on bad input or a missing toolchain."""
    if args.arch < 70:
        print(f"fastanalog bench gpu-compile: error: --arch must be >= 70, got {args.arch}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The kernels were built for the interpreter in this process: compile in a fresh one.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = [sys.executable, "-m", "fastanalog", "bench", "gpu-compile", "--arch", str(args.arch)]
        argv += ["--quick"] * args.quick + ["--json"] * args.json + (["--out", args.out] if args.out else [])
        return subprocess.run(argv, env=env).returncode
    try:
        import triton  # noqa: F401
    except ImportError:
        print("fastanalog bench gpu-compile: error: triton is not installed", file=sys.stderr)
        return 2
    reports = run_variants(QUICK if args.quick else FULL, args.arch)
    text = json.dumps([asdict(r) for r in reports], indent=1) if args.json else markdown(reports)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if any(r.problems for r in reports) else 0
