"""Tests of ``fastanalog bench``: each benchmark writes its CSV, markdown table and plot at --tiny sizes,
the aihwkit comparison exits 0 with or without aihwkit, the kernel scripts are found and called, and bad
options fail with a clear message."""

from __future__ import annotations

import argparse
import csv
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fastanalog.bench import cli
from fastanalog.bench.common import ALGORITHMS, ENV_COLUMNS, measure_interleaved, ratio_stats

# One thread: the smallest models run fastest single-threaded, and a busy machine does not stall them.
TINY = ["--tiny", "--threads", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_outputs(out: Path, name: str, columns: list[str], n_rows: int) -> list[dict[str, str]]:
    """Check ``<name>.csv`` (columns, environment record, row count), ``<name>.md`` and ``<name>.png``; return the rows."""
    with open(out / f"{name}.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    missing = [c for c in [*columns, *ENV_COLUMNS] if c not in header]
    assert not missing, f"{name}.csv lacks columns {missing}"
    assert len(rows) == n_rows
    for row in rows:
        assert row["torch"] == torch.__version__
        assert row["machine"] and row["cpu"] and row["commit"] and row["backend"]
        assert row["threads"] == "1"
    md = (out / f"{name}.md").read_text(encoding="utf-8")
    table_lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(table_lines) == n_rows + 2, "markdown table: header, separator and one line per row"
    png = (out / f"{name}.png").read_bytes()
    assert len(png) > 1000 and png.startswith(PNG_MAGIC)
    return rows


def check_stats(row: dict[str, str], prefix: str) -> float:
    """``prefix``'s median lies in [min, max] and is positive; return it."""
    lo, med, hi = (float(row[f"{prefix}_{k}"]) for k in ("min", "median", "max"))
    assert 0 < lo <= med <= hi
    return med


# ----- step and train ---------------------------------------------------------------------
def test_step_tiny_writes_one_row_per_model_and_algorithm(tmp_path, capsys):
    """One row per model and algorithm, and one more per analog algorithm in batch mode."""
    assert cli.main(["step", *TINY, "--out", str(tmp_path)]) == 0
    rows = check_outputs(tmp_path, "step", ["model", "algorithm", "ratio_median", "ratio_min", "ratio_max", "analog_launches"], 14)
    labels = [a for a in ALGORITHMS] + [f"{a} (batch)" for a in ALGORITHMS if a != "digital"]
    assert {(r["model"], r["algorithm"]) for r in rows} == {(m, a) for m in ("test_resnet-tiny", "test_vit-tiny") for a in labels}
    for r in rows:
        check_stats(r, "analog_ms")
        check_stats(r, "sgd_ms")
        check_stats(r, "ratio")
        check_stats(r, "check_ratio")
        check_stats(r, "unplanned_ratio")
        assert 0.0 <= float(r["zero_grad_fraction"]) < 1.0
        assert int(r["analog_launches"]) > 0 and int(r["sgd_launches"]) > 0
        assert r["analog_launch_kind"] in ("fastanalog:: op calls", "top-level torch ops")
        if r["algorithm"] == "digital":  # no analog update: the C++ gradient check alone, or AnalogSGD's torch ops
            assert r["analog_launch_kind"] == "top-level torch ops" or int(r["analog_launches"]) == 1
    for model in ("test_resnet-tiny", "test_vit-tiny"):  # one backward pass's gradients, whatever the algorithm
        assert len({r["zero_grad_fraction"] for r in rows if r["model"] == model and "(batch)" not in r["algorithm"]}) == 1
    out = capsys.readouterr().out
    assert "| model | params | algorithm |" in out and "step.csv" in out


def test_step_gradients_after_warm_steps(tmp_path):
    """--warm-steps N: each model takes N plain SGD steps before its gradients are made, so that a timm ResNet's
    blocks (whose last batch-norm scale starts at zero) get gradients too: fewer of them are exactly zero."""
    shares = {}
    for steps in (0, 3):
        out = tmp_path / str(steps)
        argv = ["step", *TINY, "--models", "resnet", "--algorithms", "asgd", "--warm-steps", str(steps), "--out", str(out)]
        assert cli.main(argv) == 0
        rows = check_outputs(out, "step", ["warm_steps", "zero_grad_fraction", "check_ratio_median"], 2)
        assert {r["warm_steps"] for r in rows} == {str(steps)}
        assert len({r["zero_grad_fraction"] for r in rows}) == 1  # per sample and batch mode: the same gradients
        shares[steps] = float(rows[0]["zero_grad_fraction"])
        notes = (out / "step.md").read_text(encoding="utf-8")
        assert ("after 3 plain SGD steps" in notes) == (steps == 3)
    assert shares[0] > 0.3 and shares[3] < shares[0] / 2


def test_train_tiny_times_and_measures_memory(tmp_path, capsys):
    assert cli.main(["train", *TINY, "--out", str(tmp_path)]) == 0
    rows = check_outputs(tmp_path, "train", ["model", "algorithm", "ratio_median", "mem_ratio", "analog_peak_mb", "mem_kind"], 12)
    assert {(r["model"], r["algorithm"]) for r in rows} == {
        (m, a) for m in ("linear64", "test_resnet-tiny", "test_vit-tiny") for a in ALGORITHMS
    }
    for r in rows:
        check_stats(r, "ratio")
        check_stats(r, "batch_ratio")
        # where batch mode's time goes: forward and backward, and the optimizer step, over the digital ones
        check_stats(r, "batch_fwdbwd_ratio")
        check_stats(r, "batch_step_ratio")
        # rl and rl2 are timed once more with the stored mixed weight; asgd and digital have none to store
        if r["algorithm"] in ("rl", "rl2"):
            check_stats(r, "stored_ratio")
            check_stats(r, "stored_fwdbwd_ratio")
            check_stats(r, "stored_step_ratio")
            assert float(r["stored_ms_median"]) > 0
        else:
            assert r["stored_ratio_median"] == r["stored_ms_median"] == "" == r["stored_mem_ratio"]
            assert r["stored_fwdbwd_ratio_median"] == r["stored_step_ratio_median"] == ""
        # memory in batch mode (and with the stored mixed weight) is measured for the analog algorithms
        # (sizes of tiny models are noise, see below: what they are is checked, not how large)
        if r["algorithm"] == "digital":
            assert r["batch_mem_ratio"] == ""
        else:
            float(r["batch_mem_ratio"])
        if r["algorithm"] in ("rl", "rl2"):
            float(r["stored_mem_ratio"])
        assert r["mem_kind"] == "cpu peak RSS, fresh process"
        # Tiny models allocate a few pages, so their sizes (peak RSS above a baseline) and the ratio are noise
        # here, even of either sign (the 512x512 test below checks the sizes); what must hold is that the peaks
        # are the process's and the reported ratio is the quotient of the two reported sizes.
        assert float(r["analog_peak_mb"]) > 10 and float(r["digital_peak_mb"]) > 10
        if float(r["digital_mem_mb"]) <= 0:
            assert r["mem_ratio"] == "nan"
            continue
        ratio = float(r["analog_mem_mb"]) / float(r["digital_mem_mb"])
        assert float(r["mem_ratio"]) == pytest.approx(ratio, rel=1e-6)
    out = capsys.readouterr().out
    assert "| model | batch | params |" in out and "| batch / digital | batch, stored / digital |" in out and "batch / batch stored |" in out


def test_train_memory_grows_with_the_layer():
    """The fresh-process peak sees a layer's own data: a 1024x1024 layer's peak exceeds a 64x64 layer's by megabytes.

    (The first step of the measured batch may also allocate a BLAS workspace of a few MiB that the
    two-sample warm-up did not need, in some environments: the sizes are chosen well above it.)
    """
    from fastanalog.bench.common import linear_spec
    from fastanalog.bench.train import measure_memory, memory_job

    cpu = torch.device("cpu")
    jobs = [memory_job(linear_spec(n, 8), "rl2", cpu, 1, steps=1) for n in (64, 1024)]
    small, large, digital = measure_memory([*jobs, memory_job(linear_spec(1024, 8), "torch", cpu, 1, steps=1)], cpu)
    extra = [(r["peak"] - r["baseline"]) / 2**20 for r in (small, large, digital)]
    # rl2 on 1024x1024 writing per sample holds W, P, H, the gradient, the companion analog_abs and its
    # gradient A, six arrays of 4 MiB each (and, during forward and backward, the transient mixed weight);
    # the digital layer W and its gradient.
    assert extra[1] - extra[0] > 8, extra
    assert large["arrays"] == 4 * 1024 * 1024 * 4 and digital["arrays"] == 0
    # Nothing but P, H, the companion and A beyond the digital layer (within a MiB: the allocator's granularity).
    assert abs(extra[1] - extra[2] - 16) < 1.0, extra


def test_train_memory_of_the_batch_and_stored_variants():
    """A memory job builds the configuration its options name: in batch mode rl2 holds P and H beyond the digital
    layer, and with the stored mixed weight Wbar too (no companion, no A)."""
    from fastanalog.bench.common import linear_spec
    from fastanalog.bench.train import MEMORY_VARIANTS, measure_memory, memory_job

    cpu, spec = torch.device("cpu"), linear_spec(1024, 8)
    jobs = [memory_job(spec, "rl2", cpu, 1, steps=1, options=MEMORY_VARIANTS[v]) for v in ("batch", "stored")]
    batch, stored, digital = measure_memory([*jobs, memory_job(spec, "torch", cpu, 1, steps=1)], cpu)
    assert batch["arrays"] == 2 * 1024 * 1024 * 4 and stored["arrays"] == 3 * 1024 * 1024 * 4
    extra = [(r["peak"] - r["baseline"]) / 2**20 for r in (batch, stored, digital)]
    assert abs(extra[0] - extra[2] - 8) < 1.0 and abs(extra[1] - extra[2] - 12) < 1.0, extra


# ----- aihwkit ------------------------------------------------------------------------------
def test_aihwkit_exits_0_as_installed(tmp_path, capsys):
    """Passes whether or not aihwkit is installed here: results when it is, the way to get it when not."""
    assert cli.main(["aihwkit", *TINY, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    try:
        import aihwkit  # noqa: F401
    except ImportError:
        assert "make bench-aihwkit" in out
        assert not (tmp_path / "aihwkit.csv").exists()
    else:
        assert "aihwkit simulates per-sample pulse trains; fastanalog writes per sample too" in out
        check_outputs(tmp_path, "aihwkit", ["aihwkit_config", "aihwkit_reads", "status", "aihwkit_over_fastanalog_median"], 10)


def test_aihwkit_missing_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "aihwkit", None)  # makes `import aihwkit` fail
    assert cli.main(["aihwkit", *TINY, "--out", str(tmp_path)]) == 0
    assert "make bench-aihwkit" in capsys.readouterr().out
    assert not (tmp_path / "aihwkit.csv").exists()


@dataclass
class _IO:
    is_perfect: bool = False


@dataclass
class _Pulsed:
    w_max: float = 0.6
    w_min: float = -0.6
    dw_min: float = 0.001
    dw_min_dtod: float = 0.3
    dw_min_std: float = 0.3
    w_max_dtod: float = 0.3
    w_min_dtod: float = 0.3
    up_down_dtod: float = 0.01


@dataclass
class _PowStep(_Pulsed):
    pow_gamma: float = 1.0
    pow_gamma_dtod: float = 0.1


@dataclass
class _Transfer:
    unit_cell_devices: list = field(default_factory=list)
    transfer_every: float = 1.0
    units_in_mbatch: bool = True
    gamma: float = 0.0
    transfer_forward: _IO = field(default_factory=_IO)


@dataclass
class _RPUConfig:
    device: Any = None
    forward: _IO = field(default_factory=_IO)
    backward: _IO = field(default_factory=_IO)


@dataclass
class _TTv2Preset(_RPUConfig):
    device: Any = field(default_factory=lambda: _Transfer([_Pulsed(), _Pulsed()], gamma=0.0))


def _stand_in_aihwkit(created: list) -> dict[str, types.ModuleType]:
    """A stand-in for aihwkit's Python API (layer, optimizer, configs, one of the two TTv2 presets)."""

    class AnalogLinear(nn.Linear):
        def __init__(self, in_features: int, out_features: int, bias: bool = True, rpu_config: Any = None):
            super().__init__(in_features, out_features, bias=bias)
            created.append(rpu_config)

    class AnalogSGD(torch.optim.SGD):
        def regroup_param_groups(self, model: nn.Module) -> None:
            self.regrouped = model

    mods = {name: types.ModuleType(name) for name in ("aihwkit", "aihwkit.nn", "aihwkit.optim", "aihwkit.simulator", "aihwkit.simulator.configs", "aihwkit.simulator.presets")}
    mods["aihwkit"].__version__ = "0.0-stand-in"
    mods["aihwkit.nn"].AnalogLinear = AnalogLinear
    mods["aihwkit.optim"].AnalogSGD = AnalogSGD
    configs = mods["aihwkit.simulator.configs"]
    configs.SingleRPUConfig = configs.UnitCellRPUConfig = _RPUConfig
    configs.SoftBoundsDevice, configs.PowStepDevice, configs.TransferCompound = _Pulsed, _PowStep, _Transfer
    mods["aihwkit.simulator.presets"].TTv2ReRamSBPreset = _TTv2Preset  # no ChoppedTTv2ReRamSBPreset: it must be skipped
    return mods


def test_aihwkit_comparison_with_a_stand_in(tmp_path, capsys, monkeypatch):
    created: list = []
    for name, module in _stand_in_aihwkit(created).items():
        monkeypatch.setitem(sys.modules, name, module)
    assert cli.main(["aihwkit", *TINY, "--reads", "ideal", "--out", str(tmp_path)]) == 0
    rows = check_outputs(tmp_path, "aihwkit", ["aihwkit_config", "fastanalog_config", "status", "aihwkit_over_digital_median"], 5)
    assert {r["aihwkit_reads"] for r in rows} == {"ideal"}
    status = {r["aihwkit_config"]: r["status"] for r in rows}
    assert list(status.values())[:4] == ["ok"] * 4
    assert status["ChoppedTTv2ReRamSBPreset (c-TTv2)"].startswith("skipped:") and "ChoppedTTv2ReRamSBPreset" in status["ChoppedTTv2ReRamSBPreset (c-TTv2)"]
    pairs = {r["aihwkit_config"]: r["fastanalog_config"] for r in rows}
    assert pairs["SingleRPUConfig(SoftBoundsDevice)"] == "asgd LinearResponse"
    assert pairs["SingleRPUConfig(PowStepDevice)"].startswith("asgd PowerResponse")
    assert pairs["UnitCellRPUConfig(TransferCompound), Tiki-Taka"] == "rl LinearResponse, gamma=0"
    assert pairs["TTv2ReRamSBPreset"].startswith("rl2")
    for r in rows[:4]:
        for prefix in ("aihwkit_over_digital", "fastanalog_over_digital", "aihwkit_over_fastanalog"):
            check_stats(r, prefix)
    assert rows[4]["aihwkit_over_fastanalog_median"] == ""
    # The configurations handed to aihwkit: ideal reads, no variation, the same range and dw_min.
    soft, power, tiki, ttv2 = created
    for cfg in created:
        assert cfg.forward.is_perfect and cfg.backward.is_perfect
    assert (soft.device.w_max, soft.device.w_min, soft.device.dw_min, soft.device.dw_min_dtod, soft.device.dw_min_std) == (0.6, -0.6, 0.001, 0, 0)
    assert power.device.pow_gamma == 0.5 and power.device.pow_gamma_dtod == 0
    assert tiki.device.gamma == 0 and tiki.device.transfer_forward.is_perfect and len(tiki.device.unit_cell_devices) == 2
    assert ttv2.device.transfer_forward.is_perfect
    out = capsys.readouterr().out
    assert "aihwkit simulates per-sample pulse trains; fastanalog writes per sample too" in out
    assert "skipped ChoppedTTv2ReRamSBPreset" in out


def test_aihwkit_reads_as_shipped_and_ideal(tmp_path, monkeypatch):
    """By default each pairing gets two rows: aihwkit's reads as it ships them, then made ideal."""
    created: list = []
    for name, module in _stand_in_aihwkit(created).items():
        monkeypatch.setitem(sys.modules, name, module)
    assert cli.main(["aihwkit", *TINY, "--out", str(tmp_path)]) == 0
    rows = check_outputs(tmp_path, "aihwkit", ["aihwkit_config", "aihwkit_reads", "status"], 10)
    assert [r["aihwkit_reads"] for r in rows] == ["shipped", "ideal"] * 5
    assert [r["status"] for r in rows[:8]] == ["ok"] * 8
    assert [cfg.forward.is_perfect and cfg.backward.is_perfect for cfg in created] == [False, True] * 4
    assert [cfg.device.transfer_forward.is_perfect for cfg in created[4:]] == [False, True, False, True]
    with pytest.raises(SystemExit) as e:
        cli.main(["aihwkit", *TINY, "--reads", "noisy", "--out", str(tmp_path)])
    assert e.value.code == 2


# ----- kernels ------------------------------------------------------------------------------
def test_kernels_says_when_the_scripts_are_absent(tmp_path, capsys):
    assert cli.main(["kernels", "--scripts", str(tmp_path / "nowhere")]) == 0
    out = capsys.readouterr().out
    assert "bench_kernels_cpu.py does not exist" in out and "bench_kernels_triton.py does not exist" in out


def test_kernels_calls_main_with_the_shared_options(tmp_path, capsys):
    (tmp_path / "bench_kernels_cpu.py").write_text(
        "import json, pathlib\n"
        "def main(argv=None):\n"
        "    pathlib.Path(__file__).with_name('argv.json').write_text(json.dumps(argv))\n"
        "    return 0\n"
    )
    (tmp_path / "bench_kernels_triton.py").write_text("import a_module_that_is_not_installed\n")
    out_dir = tmp_path / "res"
    assert cli.main(["kernels", "--scripts", str(tmp_path), "--tiny", "--threads", "1", "--out", str(out_dir)]) == 0
    assert (tmp_path / "argv.json").read_text() == (
        f'["--out", "{out_dir}", "--repeats", "1", "--warmup", "1", "--tiny", "--threads", "1"]'
    )
    assert "bench_kernels_triton.py cannot be imported here" in capsys.readouterr().out


def test_kernels_hands_a_script_only_the_options_its_parser_has(tmp_path):
    (tmp_path / "bench_kernels_cpu.py").write_text(
        "import argparse, json, pathlib\n"
        "def build_parser():\n"
        "    p = argparse.ArgumentParser()\n"
        "    p.add_argument('--csv')\n"
        "    p.add_argument('--smoke', action='store_true')\n"
        "    p.add_argument('--algorithms')\n"
        "    return p\n"
        "def main(argv=None):\n"
        "    build_parser().parse_args(argv)\n"
        "    pathlib.Path(__file__).with_name('argv.json').write_text(json.dumps(argv))\n"
        "    return 0\n"
    )
    out_dir = tmp_path / "res"
    argv = ["kernels", "--which", "cpu", "--scripts", str(tmp_path), "--tiny", "--algorithms", "digital,rl2", "--out", str(out_dir)]
    assert cli.main(argv) == 0
    assert (tmp_path / "argv.json").read_text() == f'["--csv", "{out_dir / "kernels_cpu.csv"}", "--smoke", "--algorithms", "rl2"]'
    assert out_dir.is_dir()


def test_kernels_hands_over_options_after_dashes_and_its_exit_status(tmp_path, capsys):
    (tmp_path / "bench_kernels_cpu.py").write_text(
        "import argparse\n"
        "def main(argv=None):\n"
        "    args = argparse.ArgumentParser().parse_args(argv) if argv != ['--size', '8'] else None\n"
        "    return 3 if args is None else 0\n"
    )
    assert cli.main(["kernels", "--scripts", str(tmp_path), "--which", "cpu", "--", "--size", "8"]) == 3
    assert "exited with status 3" in capsys.readouterr().out
    # The shared options, which this script's parser rejects: its argparse exit is reported, not raised.
    assert cli.main(["kernels", "--scripts", str(tmp_path), "--which", "cpu"]) == 2
    assert "give its own after --" in capsys.readouterr().out


# ----- options and helpers ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["step", "--repeats", "0"], "--repeats must be >= 1, got --repeats 0"),
        (["train", "--warmup", "-1"], "--warmup must be >= 0, got --warmup -1"),
        (["step", "--threads", "two"], "--threads takes an integer, got 'two'"),
        (["step", "--warm-steps", "-1"], "--warm-steps must be >= 0, got --warm-steps -1"),
    ],
)
def test_bad_numbers_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--algorithms", "asgd,sgd"], "unknown algorithm(s) 'sgd' in --algorithms"),
        (["step", "--models", "resnet,bert"], "--models 'resnet,bert' names 'bert'"),
        (["aihwkit", "--algorithms", "digital"], "pairs with no aihwkit configuration"),
    ],
)
def test_bad_values_exit_2_with_a_message(argv, message, tmp_path, capsys):
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_out_must_be_a_folder_and_backend_must_exist(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "file"
    afile.write_text("x")
    assert cli.main(["step", *TINY, "--out", str(afile)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    monkeypatch.setenv("FASTANALOG_BACKEND", "nonsense")
    assert cli.main(["step", *TINY, "--out", str(tmp_path)]) == 2
    assert "FASTANALOG_BACKEND='nonsense'" in capsys.readouterr().err


def test_add_parser_registers_bench_on_a_command_line():
    parser = argparse.ArgumentParser(prog="fastanalog")
    commands = parser.add_subparsers(dest="command", required=True)
    cli.add_parser(commands)
    args = parser.parse_args(["bench", "train", "--tiny", "--models", "linear"])
    assert args.func is cli.run and args.bench_command == "train" and args.tiny and args.models == "linear"


def test_threads_are_restored_after_a_run(tmp_path):
    before = torch.get_num_threads()
    cli.main(["kernels", "--threads", "1", "--scripts", str(tmp_path)])
    assert torch.get_num_threads() == before


def test_interleaved_timing_and_repeat_by_repeat_ratios():
    calls: list[str] = []
    times = measure_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=2, repeats=3)
    assert calls == ["a", "b"] * 5 and len(times["a"]) == len(times["b"]) == 3
    r = ratio_stats([2.0, 4.0, 6.0], [1.0, 1.0, 2.0])
    assert (r.median, r.min, r.max, r.n) == (3.0, 2.0, 4.0, 3)
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        measure_interleaved({"a": lambda: None}, warmup=0, repeats=0)


def test_cpu_kernel_benchmark_runs_on_a_tiny_size(tmp_path, capsys):
    """The real benchmarks/bench_kernels_cpu.py through `fastanalog bench kernels`, every column filled."""
    from fastanalog.ops import cpp

    if not cpp.cpp_available():
        pytest.skip("the C++ kernels are not built")
    args = ["kernels", "--which", "cpu", "--out", str(tmp_path), "--", "--size", "4099", "--repeats", "1", "--no-compiled"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    for column in ("kernel GB/s", "triad GB/s", "of triad", "x eager"):
        assert column in out
    rows = [ln for ln in out.splitlines() if ln.startswith("| asgd") or ln.startswith("| rl")]
    assert len(rows) == 6  # asgd, rl, rl2 x linear, power



def test_cpu_kernel_benchmark_takes_the_shared_options(tmp_path, capsys):
    """`fastanalog bench kernels` without `--` hands the CPU script the shared options, which it accepts."""
    from fastanalog.ops import cpp

    if not cpp.cpp_available():
        pytest.skip("the C++ kernels are not built")
    args = ["kernels", "--which", "cpu", "--tiny", "--warmup", "0", "--algorithms", "digital,asgd", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "'--warmup', '0'" in out and "'--tiny'" in out
    assert "4099 float32 elements" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("| asgd") or ln.startswith("| rl")]
    assert len(rows) == 2 and all(ln.startswith("| asgd") for ln in rows)  # asgd x linear, power
    assert "compiled ref ms" not in out  # --tiny skips the compiled reference
    assert (tmp_path / "bench_kernels_cpu.csv").is_file()
    assert cli.main(["kernels", "--which", "cpu", "--", "--warmup", "-1"]) == 2
    assert "--warmup must be >= 0, got -1" in capsys.readouterr().err


def test_cpu_kernel_benchmark_grad_scale_sets_the_pulsing_share(tmp_path, capsys):
    """--grad-scale 0.0125 gives about a tenth of the elements a pulse (the default: most), as column "pulsing" says."""
    import csv as csv_module

    from fastanalog.ops import cpp

    if not cpp.cpp_available():
        pytest.skip("the C++ kernels are not built")

    def pulsing(*extra: str) -> float:
        args = ["kernels", "--which", "cpu", "--", "--size", "20000", "--repeats", "1", "--no-reference"]
        args += ["--algorithms", "rl2", "--devices", "power", "--out", str(tmp_path), *extra]
        assert cli.main(args) == 0
        with open(tmp_path / "bench_kernels_cpu.csv") as f:
            (row,) = list(csv_module.DictReader(f))
        return float(row["pulsing"])

    assert 0.05 < pulsing("--grad-scale", "0.0125") < 0.15
    assert pulsing() > 0.5
    assert "| pulsing |" in capsys.readouterr().out
    assert cli.main(["kernels", "--which", "cpu", "--", "--grad-scale", "0"]) == 2
    assert "--grad-scale must be a finite number > 0, got 0.0" in capsys.readouterr().err


def test_cpu_kernel_benchmark_times_the_compiled_reference_only_when_asked():
    """Inductor's compilation of the reference can take more than 15 minutes on two cores: opt-in."""
    module = cli._import_file(cli.REPO_ROOT / "benchmarks" / "bench_kernels_cpu.py")
    parser = module.build_parser()
    assert not parser.parse_args([]).compiled
    assert parser.parse_args(["--compiled"]).compiled
    assert parser.parse_args(["--no-compiled"]).no_compiled  # the old option is still accepted
