"""``fastanalog bench``: whole-model benchmarks.

Benchmarks::

    fastanalog bench step      # AnalogSGD.step / SGD(foreach).step on whole timm models, and launches per step
    fastanalog bench train     # training step and peak memory, analog / digital (Linear, ResNet-18, small ViT)
    fastanalog bench aihwkit   # training step of one layer beside IBM's aihwkit (when installed)
    fastanalog bench aihwkit --crosscheck  # the same devices and algorithms in both: element level, digits MLP, speed
    fastanalog bench kernels   # runs benchmarks/bench_kernels_cpu.py and benchmarks/bench_kernels_triton.py
    fastanalog bench gpu-compile  # the Triton kernels compiled for an NVIDIA GPU (no GPU needed): registers, spills, bytes

Each of step, train and aihwkit writes ``<name>.csv``, ``<name>.md`` and ``<name>.png``
into ``--out`` (default ``results/bench``) and prints its table. ``--tiny`` runs the
smallest sizes with one warm-up step and one repeat (a smoke test, not a measurement).

From Python: :func:`main` takes the arguments after ``bench``; :func:`add_parser`
registers the ``bench`` command on an argparse sub-parsers object (its handler is
:func:`run`).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from .common import (
    ALGORITHMS,
    REPO_ROOT,
    backend_name,
    environment,
    parse_algorithms,
    parse_names,
    prepare_out_dir,
    resolve_device,
    set_threads,
    write_report,
)

DEFAULT_OUT = "results/bench"
# Warm-up steps and timed repeats: full runs, and --tiny runs.
FULL_WARMUP, FULL_REPEATS = 3, 11  # an odd count: the median is a measured repeat
TINY_WARMUP, TINY_REPEATS = 1, 1
KERNEL_SCRIPTS = {"cpu": "bench_kernels_cpu.py", "triton": "bench_kernels_triton.py"}


def _int_at_least(minimum: int, option: str):
    """An argparse type: an integer >= ``minimum``, with an error naming the option, the value and a fix."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} takes an integer, got {text!r} (e.g. {option} {max(minimum, 1)})") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{option} must be >= {minimum}, got {option} {value}: use {option} {max(minimum, 1)} or more")
        return value

    return parse


def _shared_options() -> argparse.ArgumentParser:
    """Options every benchmark takes (a parent parser)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("shared options")
    g.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"folder for the CSV, markdown and PNG results (default: {DEFAULT_OUT})")
    g.add_argument(
        "--repeats",
        type=_int_at_least(1, "--repeats"),
        default=None,
        metavar="N",
        help=f"timed repeats; figures are medians with min and max (default: {FULL_REPEATS}, --tiny: {TINY_REPEATS})",
    )
    g.add_argument(
        "--warmup",
        type=_int_at_least(0, "--warmup"),
        default=None,
        metavar="N",
        help=f"untimed warm-up steps before the repeats (default: {FULL_WARMUP}, --tiny: {TINY_WARMUP})",
    )
    g.add_argument("--tiny", action="store_true", help="smallest sizes, for tests and smoke runs")
    g.add_argument(
        "--algorithms",
        default=",".join(ALGORITHMS),
        metavar="LIST",
        help=f"comma-separated algorithms to measure (default: {','.join(ALGORITHMS)})",
    )
    g.add_argument("--threads", type=_int_at_least(1, "--threads"), default=None, metavar="N", help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run (default: auto = cuda when available)")
    return p


def _add_benchmarks(sub: argparse._SubParsersAction) -> None:
    shared = _shared_options()
    p = sub.add_parser(
        "step",
        parents=[shared],
        help="optimizer step alone: AnalogSGD / SGD(foreach) on whole timm models",
        description="Time AnalogSGD.step against torch.optim.SGD(foreach=True).step on the same model and gradients, "
        "per algorithm, and count the launches of one step.",
    )
    p.add_argument(
        "--models",
        default=None,
        metavar="LIST",
        help="comma-separated subset of resnet,vit (resnet50 and vit_small_patch16_224 at 32x32; --tiny: timm's test_resnet/test_vit, narrowed)",
    )
    p.add_argument(
        "--warm-steps",
        type=_int_at_least(0, "--warm-steps"),
        default=0,
        metavar="N",
        help="plain SGD steps each model takes on its batch before the gradients are made (default: 0, a fresh model, "
        "whose timm ResNet blocks get no gradient)",
    )
    p = sub.add_parser(
        "train",
        parents=[shared],
        help="training step and peak memory: analog / digital",
        description="Time a whole training step (forward, backward, step) of analog models against their digital twins, "
        "and compare peak memory.",
    )
    p.add_argument(
        "--models",
        default=None,
        metavar="LIST",
        help="comma-separated subset of linear,resnet,vit (Linear(1024,1024) batch 128, resnet18 and vit_tiny patch 4 at 32x32 "
        "batch 32; --tiny: Linear(64,64) batch 8 and narrowed test models at 16x16 batch 2)",
    )
    p = sub.add_parser(
        "aihwkit",
        parents=[shared],
        help="one layer's training step beside IBM's aihwkit (when installed)",
        description="Time the training step of Linear(1024,1024) at batch 128 with aihwkit's nearest configurations "
        "beside fastanalog's. Without aihwkit it says how to get it and exits 0.",
    )
    p.add_argument(
        "--reads",
        default="both",
        choices=("both", "shipped", "ideal"),
        help="aihwkit's forward, backward and transfer reads: as aihwkit ships them (noise, bound management, "
        "quantisation), made ideal (is_perfect, as fastanalog's reads), or both, one row each (default: both)",
    )
    p.add_argument(
        "--crosscheck",
        action="store_true",
        help="compare the numbers, not only the time: single elements under constant and noisy gradients, the digits MLP "
        "table (aihwkit | fastanalog per configuration and seed), and the step time on one thread; writes CROSSCHECK.md "
        "into --out (--tiny: fewer steps, one seed, fewer epochs). Exit 1 when aihwkit is not installed",
    )
    p.add_argument(
        "--seeds", type=_int_at_least(1, "--seeds"), default=3, metavar="N", help="--crosscheck: seeds of the digits MLP table (default: 3)"
    )
    p = sub.add_parser(
        "kernels",
        parents=[shared],
        help="run the kernel benchmarks in benchmarks/",
        description="Run benchmarks/bench_kernels_cpu.py and benchmarks/bench_kernels_triton.py (each main(argv)), "
        "handing them the shared options each accepts (see its build_parser()), or the options given after --.",
    )
    p.add_argument("--which", default="all", choices=("all", *KERNEL_SCRIPTS), help="which kernel benchmark to run (default: all)")
    p.add_argument("--scripts", default=None, metavar="DIR", help=f"folder of the kernel scripts (default: {REPO_ROOT / 'benchmarks'})")
    p.add_argument("kernel_args", nargs="*", metavar="-- OPTIONS", help="options handed to the kernel scripts instead of the shared ones")
    p = sub.add_parser(
        "gpu-compile",
        help="the Triton kernels compiled for an NVIDIA GPU without one: registers, spills, bytes and Philox per element",
        description="Compile the Triton kernel of every launch the optimizer makes for a real NVIDIA target (Triton's backend "
        "and ptxas; no GPU needed) and report registers, spill bytes, shared memory and, per element, Philox multiplies, "
        "global bytes and vectorised access. Exit status 1 when a goal variant (float32, linear device) misses a goal.",
    )
    from .gpu_compile import add_arguments as add_gpu_compile_arguments

    add_gpu_compile_arguments(p)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench`` (with its benchmarks) on ``subparsers``; the parsed namespace's ``func`` is :func:`run`."""
    bench = subparsers.add_parser(
        "bench",
        help="whole-model benchmarks (step, train, aihwkit, kernels)",
        description="Whole-model benchmarks; each writes CSV, markdown and PNG results and prints its table.",
    )
    inner = bench.add_subparsers(dest="bench_command", metavar="benchmark", required=True)
    _add_benchmarks(inner)
    bench.set_defaults(func=run)
    return bench


def build_parser() -> argparse.ArgumentParser:
    """The stand-alone parser of ``fastanalog bench`` (what :func:`main` parses)."""
    parser = argparse.ArgumentParser(prog="fastanalog bench", description="Whole-model benchmarks of fastanalog.")
    sub = parser.add_subparsers(dest="bench_command", metavar="benchmark", required=True)
    _add_benchmarks(sub)
    parser.set_defaults(func=run)
    return parser


# ----- running ---------------------------------------------------------------------------
def _import_file(path: Path) -> ModuleType:
    """Import the Python file ``path`` as a module (its folder on ``sys.path`` while it loads)."""
    name = f"_fastanalog_bench_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path.remove(str(path.parent))
    return module


def _accepted_options(module: ModuleType) -> set[str] | None:
    """The option strings of the script's ``build_parser()``, or None when it has no such function."""
    build = getattr(module, "build_parser", None)
    if not callable(build):
        return None
    parser = build()
    if not isinstance(parser, argparse.ArgumentParser):
        return None
    return {opt for action in parser._actions for opt in action.option_strings}


def kernel_argv(args: argparse.Namespace, module: ModuleType, which: str) -> list[str]:
    """The arguments handed to a kernel script's ``main``.

    The options after ``--`` when given. Otherwise the shared options the script
    accepts (read from its ``build_parser()``; all of them when it has none):
    ``--out DIR`` (or else ``--csv DIR/kernels_<which>.csv``), ``--repeats``,
    ``--warmup``, ``--tiny`` (or else ``--smoke``), ``--threads``, and the analog
    algorithms of ``--algorithms``.
    """
    if args.kernel_args:
        return list(args.kernel_args)
    accepted = _accepted_options(module)
    argv: list[str] = []

    def give(option: str, *values: str) -> bool:
        if accepted is not None and option not in accepted:
            return False
        argv.extend([option, *values])
        return True

    if not give("--out", str(args.out)):
        give("--csv", str(Path(args.out) / f"kernels_{which}.csv"))
    give("--repeats", str(args.repeats))
    give("--warmup", str(args.warmup))
    if args.tiny and not give("--tiny"):
        give("--smoke")
    if args.threads is not None:
        give("--threads", str(args.threads))
    analog = [a for a in args.algorithms_list if a != "digital"]
    if accepted is not None and analog:
        give("--algorithms", ",".join(analog))
    return argv


def run_kernels(args: argparse.Namespace) -> int:
    """Run the kernel benchmark scripts; a missing or unimportable script is reported and skipped."""
    folder = Path(args.scripts) if args.scripts else REPO_ROOT / "benchmarks"
    status = 0
    ran = 0
    for which in KERNEL_SCRIPTS if args.which == "all" else (args.which,):
        path = folder / KERNEL_SCRIPTS[which]
        if not path.is_file():
            print(f"kernels ({which}): {path} does not exist, so the {which} kernel benchmark did not run")
            continue
        try:
            module = _import_file(path)
        except ImportError as e:
            print(f"kernels ({which}): {path} cannot be imported here ({type(e).__name__}: {e}), so it did not run")
            continue
        except Exception as e:
            print(f"kernels ({which}): importing {path} failed: {type(e).__name__}: {e}")
            status = status or 1
            continue
        entry = getattr(module, "main", None)
        if not callable(entry):
            print(f"kernels ({which}): {path} defines no main(argv), so it did not run")
            status = status or 1
            continue
        argv = kernel_argv(args, module, which)
        print(f"kernels ({which}): {path.name} main({argv})", flush=True)
        try:
            rc = entry(argv)
        except SystemExit as e:  # the script's own argparse rejecting an option exits 2
            rc = e.code
        rc = 0 if rc is None else rc if isinstance(rc, int) else 1
        ran += 1
        if rc != 0:
            print(
                f"kernels ({which}): {path.name} exited with status {rc}; if it rejected the options {argv}, "
                f"give its own after --: fastanalog bench kernels --which {which} -- OPTIONS"
            )
            status = status or rc
    if ran == 0 and status == 0:
        print(f"kernels: no kernel benchmark ran (looked in {folder} for {', '.join(KERNEL_SCRIPTS.values())})")
    return status


def _resolve(args: argparse.Namespace) -> None:
    """Validate and fill in the shared options in place (ValueError names the bad value and the fix)."""
    args.algorithms_list = parse_algorithms(args.algorithms)
    args.device_obj = resolve_device(args.device)
    if args.repeats is None:
        args.repeats = TINY_REPEATS if args.tiny else FULL_REPEATS
    if args.warmup is None:
        args.warmup = TINY_WARMUP if args.tiny else FULL_WARMUP
    set_threads(args.threads)
    if args.bench_command == "step":
        from .step import STEP_MODELS

        args.models_list = parse_names(args.models, list(STEP_MODELS), "--models")
    elif args.bench_command == "train":
        from .train import TRAIN_MODELS

        args.models_list = parse_names(args.models, list(TRAIN_MODELS), "--models")
    elif args.bench_command == "aihwkit":
        from .aihwkit_cmp import select_pairings

        select_pairings(args.algorithms_list)
    prepare_out_dir(args.out)
    if args.bench_command != "kernels":
        backend_name(args.device_obj)  # an invalid FASTANALOG_BACKEND fails here, before any measurement


def run(args: argparse.Namespace) -> int:
    """Run the benchmark chosen in ``args`` (parsed by :func:`build_parser` or :func:`add_parser`); return the exit status.

    torch's thread count is restored afterwards, so ``--threads`` does not outlive the call.
    """
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    if args.bench_command == "gpu-compile":
        from .gpu_compile import run as run_gpu_compile

        return run_gpu_compile(args)
    try:
        _resolve(args)
    except ValueError as e:
        print(f"fastanalog bench {args.bench_command}: error: {e}", file=sys.stderr)
        return 2
    if args.bench_command == "kernels":
        return run_kernels(args)

    common = dict(algorithms=args.algorithms_list, device=args.device_obj, warmup=args.warmup, repeats=args.repeats, tiny=args.tiny)
    if args.bench_command == "aihwkit":
        from .aihwkit_cmp import INSTALL_HINT, READS_MODES, aihwkit_has_cuda, load_aihwkit, run_aihwkit

        ak = load_aihwkit()
        if ak is None:
            print(INSTALL_HINT)
            return 1 if args.crosscheck else 0
        if args.crosscheck:
            return _crosscheck(args, ak, common)
        if args.device_obj.type == "cuda" and not aihwkit_has_cuda():
            print("the installed aihwkit was built without CUDA, so the comparison runs on the CPU")
            common["device"] = torch.device("cpu")
        env = environment(common["device"])
        report = run_aihwkit(ak, reads=READS_MODES[args.reads], **common)
    elif args.bench_command == "step":
        from .step import run_step

        env = environment(args.device_obj)
        report = run_step(models=args.models_list, warm_steps=args.warm_steps, **common)
    else:
        from .train import run_train

        env = environment(args.device_obj)
        report = run_train(models=args.models_list, threads=args.threads, **common)
    write_report(args.out, report, env)
    return 0


def _crosscheck(args: argparse.Namespace, ak, common: dict) -> int:
    """``fastanalog bench aihwkit --crosscheck``: numbers side by side, then the single-thread step time."""
    import time

    from ..reproduce.crosscheck import device_level, mlp_table, write_crosscheck
    from .aihwkit_cmp import run_aihwkit

    t0 = time.perf_counter()
    threads = args.threads or 1
    torch.set_num_threads(threads)

    def say(msg: str) -> None:
        print(msg, flush=True)

    say(f"crosscheck against aihwkit {ak.version} ({threads} thread(s)): device level")
    device_rows, extra = device_level(ak, quick=args.tiny, say=say)
    say("crosscheck: digits MLP")
    mlp_rows = mlp_table(ak, seeds=1 if args.tiny else args.seeds, epochs=3 if args.tiny else 30, say=say)
    say("crosscheck: step time, one thread, ideal reads")
    cpu = dict(common, device=torch.device("cpu"))
    report = run_aihwkit(ak, reads=("ideal",), **cpu)
    written = write_report(args.out, report, environment(torch.device("cpu")))
    speed_md = Path(written["md"]).read_text() if "md" in written else None
    path = write_crosscheck(Path(args.out), device_rows, extra, mlp_rows, speed_md, ak.version, (time.perf_counter() - t0) / 60)
    say(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``fastanalog bench`` from Python: parse ``argv`` (the arguments after ``bench``), run, return the exit status."""
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
