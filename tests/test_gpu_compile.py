"""`fastanalog bench gpu-compile` (static GPU figures without a GPU) and `make gpu-check` without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastanalog.bench import gpu_compile

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_memory_counts_read_widths_vectors_table_loads_and_atomics():
    ptx = """
    ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.v2.b16 { %rs1, %rs2 }, [ %rd2 + 0 ];
    ld.global.b64 %rd9, [ %rd3 + 0 ];
    @%p1 st.global.v4.b32 [ %rd4 + 0 ], { %r5, %r6, %r7, %r8 };
    st.global.b32 [ %rd5 + 0 ], %r9;
    atom.global.add.u64 %rd10, [ %rd6 + 0 ], %rd11;
    red.global.add.u64 [ %rd6 + 0 ], %rd11;
    """
    m = gpu_compile.memory_counts(ptx)
    assert m["load"] == 16 + 4 and m["store"] == 16 + 4
    assert m["loads_vectorised"] and not m["stores_vectorised"]
    assert m["table_loads"] == 1 and m["atomics"] == 2


def test_goal_checks_name_what_is_missed():
    v = gpu_compile.Variant("rl2")
    r = gpu_compile.KernelReport(
        variant=v.name, kernel="k", arch=90, block=1024, num_warps=4, registers=200, spill_bytes=8, stack_bytes=8,
        shared_bytes=0, mulhi_per_element=6.0, load_bytes_per_element=16, store_bytes_per_element=20,
        loads_vectorised=False, stores_vectorised=True, table_loads=0, atomics=2, goal_mulhi=v.goal_mulhi,
    )  # fmt: skip
    text = "; ".join(gpu_compile.problems(r, v))
    for part in ("spill", "registers", "mul.hi", "scalar loads", "per-element counts"):
        assert part in text
    assert gpu_compile.expected_bytes(gpu_compile.Variant("asgd", excess=True)) == (12, 4)
    assert gpu_compile.Variant("rl2", family="power").goal_mulhi is None


def test_quick_run_compiles_for_sm90_and_meets_the_static_goals():
    """The launches the optimizer makes, compiled by Triton's NVIDIA backend and ptxas."""
    out = subprocess.run(
        [sys.executable, "-m", "fastanalog", "bench", "gpu-compile", "--quick", "--json"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    reports = json.loads(out.stdout)
    assert {r["variant"] for r in reports} == {v.name for v in gpu_compile.QUICK}, out.stderr
    for r in reports:
        assert r["registers"] > 0 and r["mulhi_per_element"] > 0 and r["load_bytes_per_element"] > 0, r
        assert r["kernel"] == "_step_kernel", r  # one kernel for every algorithm
        assert r["problems"] == [] and r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r
    assert out.returncode == 0, out.stderr


def test_bad_arch_is_refused():
    out = subprocess.run(
        [sys.executable, "-m", "fastanalog", "bench", "gpu-compile", "--arch", "50"], cwd=REPO, env=_env(), capture_output=True, text=True
    )
    assert out.returncode == 2 and "--arch" in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: gpu-check would run")
def test_gpu_check_without_a_gpu_says_so_and_exits_2():
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "no CUDA GPU" in out.stdout
