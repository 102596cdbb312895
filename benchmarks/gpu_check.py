"""`make gpu-check`: everything worth measuring on the day a GPU is lent, in one report (under 8 minutes).

1. The GPU test subset: ``tests/test_gpu.py`` (every GPU backend against the reference on
   CUDA tensors) and the CUDA cases of the other test files.
2. The kernel benchmark: one optimizer launch of asgd, rl and rl2 (float32, linear and
   power devices, 16M elements, in-kernel pulse totals) per GPU backend, as a fraction of
   the bandwidth of a device-to-device copy measured in the same process.
3. ``fastanalog bench step`` on ResNet-50 (AnalogSGD.step / SGD(foreach).step on CUDA).
4. ``fastanalog bench gpu-compile --quick``: the static figures beside the measured ones.

Writes ``results/gpu-check/REPORT.md`` (``--out``). Without a CUDA GPU it says so and exits 2.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = {"tests": 240, "step": 150, "gpu-compile": 120}


def _run(cmd: list[str], timeout: int, env: dict | None = None) -> tuple[int, str, float]:
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
        return out.returncode, out.stdout + out.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, text + f"\n(timed out after {timeout} s)", time.perf_counter() - start


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def copy_bandwidth(n: int = 1 << 26, repeats: int = 20) -> float:
    """Bytes per second of ``dst.copy_(src)`` on the current GPU (read + write counted)."""
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 4 * repeats / (start.elapsed_time(end) / 1e3)


def kernel_rows(n: int = 1 << 24, repeats: int = 20) -> list[dict]:
    """One row per (backend, algorithm, family): time of a launch and its share of the copy bandwidth."""
    import fastanalog as fa
    from fastanalog.bench.gpu_compile import Variant, expected_bytes
    from fastanalog.ops import dispatch

    copy = copy_bandwidth()
    rows = []
    for name in ("triton", "cuda"):
        if not dispatch.backend_available(name):
            rows.append(dict(backend=name, note="not available"))
            continue
        for alg in ("asgd", "rl", "rl2"):
            for family, device in (("linear", fa.LinearResponse(tau=1.0, dw_min=1e-3)), ("power", fa.PowerResponse(tau=0.6, gamma=0.5, dw_min=1e-3))):
                cfg = fa.AnalogConfig(algorithm=alg, device=device, transfer_lr=0.1)
                arrays = {"main": torch.zeros(n, device="cuda")}
                if cfg.has_residual:
                    arrays["residual"] = torch.zeros(n, device="cuda")
                arrays["buffer"] = torch.zeros(n, device="cuda") if cfg.has_buffer else None
                grad = torch.randn(n, device="cuda") * 0.01
                item = dispatch.StepItem(arrays, None, grad, cfg, 1, 0)
                with dispatch.use_backend(name):
                    for step in range(1, 4):
                        dispatch.analog_step_group([item], lr=0.1, step=step, totals=True)
                    torch.cuda.synchronize()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for step in range(repeats):
                        dispatch.analog_step_group([item], lr=0.1, step=4 + step, totals=True)
                    end.record()
                torch.cuda.synchronize()
                seconds = start.elapsed_time(end) / 1e3 / repeats
                loads, stores = expected_bytes(Variant(alg))
                bandwidth = (loads + stores) * n / seconds
                rows.append(
                    dict(
                        backend=name,
                        algorithm=alg,
                        family=family,
                        ms=round(seconds * 1e3, 3),
                        gbps=round(bandwidth / 1e9, 1),
                        of_copy=round(bandwidth / copy, 3),
                        copy_gbps=round(copy / 1e9, 1),
                    )
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/gpu-check", help="report folder (default: results/gpu-check)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); it needs one. Nothing was run.")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    sections = [
        "# fastanalog GPU check",
        "",
        f"- GPU: {torch.cuda.get_device_name()} (capability {'.'.join(map(str, torch.cuda.get_device_capability()))}), "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, host {platform.node()}",
        "",
    ]

    py = sys.executable
    rc_tests, text, secs = _run(
        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py", "tests/test_cpp_step.py", "-k", "cuda or gpu or test_gpu"],
        BUDGET_S["tests"],
        env,
    )
    sections += ["## GPU tests", "", f"exit status {rc_tests}, {secs:.0f} s", "", "```", _tail(text), "```", ""]

    rows = kernel_rows()
    sections += ["## Kernels (16M float32 elements, one launch with in-kernel totals)", ""]
    sections += ["| backend | algorithm | device | ms | GB/s | of copy bandwidth |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        if "note" in r:
            sections.append(f"| {r['backend']} | {r['note']} | | | | |")
        else:
            sections.append(f"| {r['backend']} | {r['algorithm']} | {r['family']} | {r['ms']} | {r['gbps']} | {r['of_copy']:.0%} |")
    copy_gbps = next((r["copy_gbps"] for r in rows if "copy_gbps" in r), None)
    sections += ["", f"Copy bandwidth measured in this run: {copy_gbps} GB/s (read + write).", ""]

    rc_step, text, secs = _run(
        [py, "-m", "fastanalog", "bench", "step", "--device", "cuda", "--models", "resnet", "--out", str(out / "step")],
        BUDGET_S["step"],
        env,
    )
    sections += ["## ResNet-50 optimizer step (AnalogSGD.step / SGD(foreach).step)", "", f"exit status {rc_step}, {secs:.0f} s", ""]
    sections += ["```", _tail(text, 20), "```", ""]

    rc_static, text, secs = _run([py, "-m", "fastanalog", "bench", "gpu-compile", "--quick"], BUDGET_S["gpu-compile"], env)
    sections += ["## Static (gpu-compile --quick, sm_90)", "", text.strip(), ""]

    sections.append(f"Total: {time.perf_counter() - started:.0f} s.")
    report = out / "REPORT.md"
    report.write_text("\n".join(sections) + "\n")
    print("\n".join(sections))
    print(f"\nwritten: {report}")
    return 0 if rc_tests == 0 and rc_step == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
