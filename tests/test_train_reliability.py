"""Reliability of the ``fastanalog train`` launcher: checksums, unique run folders, resumed options,
full disks, the last metrics row, stuck ranks and progress output."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import fastanalog as fa
from fastanalog.__main__ import main
from fastanalog.train import checkpoint as checkpoint_module
from fastanalog.train import cli, loop
from fastanalog.train.checkpoint import (
    CheckpointError,
    WriteError,
    atomic_write,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from fastanalog.train.cli import create_run_folder, run_training

REPO = Path(__file__).resolve().parents[1]
# 64 digits in batches of 16: 4 steps per epoch.
SMALL = "--dataset digits --max-train 64 --max-test 64 --batch-size 16 --log-every 2 --threads 1".split()


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str], progress: bool = False) -> tuple[int, str, str]:
    try:
        code = main(["train", *SMALL, *([] if progress else ["--no-progress"]), *argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fastanalog train: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 2 epochs stopped by --max-steps 4 at the end of the first (its checkpoint: step 4)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *SMALL, "--no-progress", "--epochs", "2", "--max-steps", "4", "--out", str(out)]) == 0
    return out


def _copy_run(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out, list_checkpoints(out)[-1][1]


# ---------------------------------------------------------------- 1. checksums and the device range


def test_bit_flip_inside_a_tensor_is_an_error(finished_run: Path, tmp_path: Path, capsys) -> None:
    out, path = _copy_run(finished_run, tmp_path)
    weight = load_checkpoint(path)["model"]["classifier.3.weight"]
    data = bytearray(path.read_bytes())
    at = data.find(weight.numpy().tobytes())
    assert at > 0  # the tensor's bytes lie in the file as they are
    at += weight.numel() * weight.element_size() // 2
    data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["format_version"] == 2  # torch itself reads the file without a word
    before = _snapshot(out)

    with pytest.raises(CheckpointError, match="does not match its SHA-256 checksum"):
        load_checkpoint(path)
    code, _, err = _cli(["--resume", str(out)], capsys)
    line = _one_error_line(err)
    assert code == 2 and str(path) in line and "checksum" in line and "corrupt" in line
    assert _snapshot(out) == before


def _rewrite(path: Path, edit, version: int = 2) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    if version == 2:
        save_checkpoint(state, path)  # a valid checksum over the edited content
    else:
        del state["sha256"]
        state["format_version"] = 1
        torch.save(state, path)


@pytest.mark.parametrize("version", [2, 1])
def test_analog_array_outside_the_device_range_is_an_error(version: int, finished_run: Path, tmp_path: Path, capsys) -> None:
    out, path = _copy_run(finished_run, tmp_path)

    def out_of_range(state):
        state["model"]["features.0.weight"].view(-1)[3] = -1664.0

    _rewrite(path, out_of_range, version)
    code, _, err = _cli(["--resume", str(out), "--tau", "0.6"], capsys)
    line = err.strip().splitlines()[-1]
    assert code == 2 and str(path) in line and "features.0.weight holds -1664" in line and "device range" in line


def test_checkpoint_written_before_checksums_still_resumes(finished_run: Path, tmp_path: Path) -> None:
    out, path = _copy_run(finished_run, tmp_path)
    _rewrite(path, lambda state: None, version=1)
    with pytest.warns(UserWarning, match="written before checkpoints carried a checksum"):
        result = run_training(resume=str(out), max_steps=6, no_progress=True)
    assert result["steps"] == 6
    assert load_checkpoint(list_checkpoints(out)[-1][1])["format_version"] == 2


# ---------------------------------------------------------------- 2. unique run folders


def test_default_run_folders_are_never_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_timestamp", lambda: "20250101-120000")  # every run starts in the same second
    folders: list[Path] = []
    threads = [threading.Thread(target=lambda: folders.append(create_run_folder("cnn", "rl2"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = sorted(p.name for p in folders)
    assert len(set(names)) == 6 and all((tmp_path / "runs" / n).is_dir() for n in names)
    assert "20250101-120000-cnn-rl2" in names and "20250101-120000-cnn-rl2-6" in names

    # Two command-line runs in the same second: two folders, each with its own files.
    for _ in range(2):
        code, out, _ = _cli(["--max-train", "16", "--max-test", "16", "--algorithm", "asgd"], capsys)
        assert code == 0
    runs = sorted((tmp_path / "runs").glob("20250101-120000-cnn-asgd*"))
    assert [p.name for p in runs] == ["20250101-120000-cnn-asgd", "20250101-120000-cnn-asgd-2"]
    for run in runs:
        assert json.loads((run / "config.json").read_text())["args"]["out"] == str(Path("runs") / run.name)
        assert [s for s, _ in list_checkpoints(run)] == [1]
        assert len(list(csv.DictReader((run / "metrics.csv").open()))) == 1


def test_a_failed_start_leaves_no_empty_default_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)

    def no_data(*args, **kwargs):
        raise FileNotFoundError("no data here")

    monkeypatch.setattr(loop.Run, "__init__", no_data)
    code, _, err = _cli([], capsys)
    assert code == 2 and "no data here" in err
    assert list((tmp_path / "runs").iterdir()) == []


# ---------------------------------------------------------------- 3. resumed options


class SimulatedKill(Exception):
    """Stands for a process killed in the middle of a step."""


def test_resume_keeps_max_steps_and_options_given_again_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    out = tmp_path / "run"
    step = fa.AnalogSGD.step

    def killed_at_step_3(self, closure=None):
        if self.step_count == 2:
            raise SimulatedKill
        return step(self, closure)

    monkeypatch.setattr(fa.AnalogSGD, "step", killed_at_step_3)
    with pytest.raises(SimulatedKill):
        main(
            [
                "train",
                *SMALL,
                "--no-progress",
                "--epochs",
                "3",
                "--max-steps",
                "3",
                "--checkpoint-every",
                "1",
                "--out",
                str(out),
            ]
        )
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(out)][-1] == 2

    code, _, _ = _cli(["--resume", str(out)], capsys)  # --max-steps 3 comes from the checkpoint
    assert code == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert [s for s, _ in list_checkpoints(out)][-1] == 3

    code, _, _ = _cli(["--resume", str(out), "--max-steps", "5"], capsys)  # given again: it wins
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["resumed_from_step"] == 3
    final = load_checkpoint(list_checkpoints(out)[-1][1])
    assert final["args"]["max_steps"] == 5 and final["args"]["epochs"] == 3 and final["args"]["log_every"] == 2


# ---------------------------------------------------------------- 4. a full disk


class _FullDisk:
    """A file that takes ``room`` bytes, then fails like a full disk."""

    def __init__(self, file, room: int) -> None:
        self._file, self._room = file, room

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= n
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


def test_full_disk_is_one_clear_line_and_keeps_earlier_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "run"
    open_temporary = checkpoint_module._open_temporary

    def full_at_step_8(fd: int, path: str):
        f = open_temporary(fd, path)
        return _FullDisk(f, 4096) if Path(path).name.startswith(".step-00000008.pt.") else f

    monkeypatch.setattr(checkpoint_module, "_open_temporary", full_at_step_8)
    code, _, err = _cli(["--epochs", "2", "--out", str(out)], capsys)
    monkeypatch.undo()
    line = _one_error_line(err)
    assert code == 2
    assert "cannot write checkpoint" in line and str(out / "checkpoints" / "step-00000008.pt") in line
    assert "No space left on device [ENOSPC]" in line and " free of " in line and "earlier checkpoints are intact" in line
    assert "unexpected pos" not in err and "Traceback" not in err
    assert [s for s, _ in list_checkpoints(out)] == [4]
    assert load_checkpoint(out / "checkpoints" / "step-00000004.pt")["step"] == 4
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]

    # A process killed while writing leaves temporary files: the next start removes them.
    stale = [out / "checkpoints" / ".step-00000008.pt.abcd_123.tmp", out / ".metrics.csv.x1y2z3w4.tmp"]
    mine = out / ".notes.txt.abcdefgh.tmp"  # not a file of the run: left alone
    for p in [*stale, mine]:
        p.write_bytes(b"partial")
    code, _, _ = _cli(["--resume", str(out)], capsys)
    assert code == 0 and not any(p.exists() for p in stale) and mine.exists()
    assert [s for s, _ in list_checkpoints(out)] == [4, 8]


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("old")

    def fails(f) -> None:
        f.write(b"new, half")
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    with pytest.raises(WriteError, match=r"cannot write file .*config.json: .*\[EDQUOT\]; .* free of .* on ") as info:
        atomic_write(path, fails)
    assert info.value.errno == errno.EDQUOT and isinstance(info.value, OSError)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


# ---------------------------------------------------------------- 5. the last metrics row


def test_final_test_result_is_logged_when_max_steps_is_a_multiple_of_log_every(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    plotted: list[list[dict[str, str]]] = []
    plot_curves = loop.plot_curves

    def recording_plot(folder):
        plotted.append(list(csv.DictReader((Path(folder) / "metrics.csv").open())))
        return plot_curves(folder)

    monkeypatch.setattr(loop, "plot_curves", recording_plot)
    result = run_training(
        dataset="digits", max_train=96, max_test=64, batch_size=16, max_steps=4, log_every=2, threads=1,
        no_progress=True, out=str(out),
    )  # fmt: skip
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert not rows[0]["test_acc"] and float(rows[-1]["test_acc"]) == result["test_accuracy"]
    assert float(rows[-1]["test_loss"]) == result["test_loss"]
    assert plotted and plotted[-1] == rows  # curves.png is drawn from the final rows
    assert (out / "curves.png").stat().st_size > 1000


# ---------------------------------------------------------------- 6. stuck ranks and world sizes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Rank 1 stops itself (SIGSTOP) before its second optimizer step, as a rank of a stuck machine would.
STOPPING_RANK = """
import os, signal, sys
import fastanalog as fa
if os.environ["RANK"] == "1":
    step = fa.AnalogSGD.step
    def stop(self, closure=None):
        if self.step_count == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        return step(self, closure)
    fa.AnalogSGD.step = stop
from fastanalog.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_ddp_timeout_ends_the_run_when_a_rank_stops(tmp_path: Path) -> None:
    timeout = 10
    port = _free_port()
    argv = [*SMALL, "--no-progress", "--accelerator", "cpu", "--ddp-timeout", str(timeout), "--out", str(tmp_path / "run")]
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", STOPPING_RANK, "train", *argv],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    start = time.monotonic()
    try:
        out, err = procs[0].communicate(timeout=180)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)  # works on a stopped process too
            p.communicate()
    assert procs[0].returncode == 2, out + err
    lines = [line for line in err.splitlines() if line.startswith("fastanalog train: error:")]
    assert len(lines) == 1, err
    assert "rank 0 of 2: a collective operation failed" in lines[0]
    assert f"--ddp-timeout {timeout} s" in lines[0] and "Traceback" not in err
    assert elapsed < 170


def test_resume_on_another_world_size_says_it_is_no_longer_bit_identical(finished_run: Path, tmp_path: Path, capsys) -> None:
    out, path = _copy_run(finished_run, tmp_path)

    def from_two_ranks(state):
        state["meta"]["world_size"] = 2
        state["rng"] = state["rng"] * 2

    _rewrite(path, from_two_ranks)
    code, _, err = _cli(["--resume", str(out), "--max-steps", "5"], capsys)
    assert code == 0
    assert f"{path} was written by a run of world size 2, this run has world size 1" in err
    assert "no longer bit-identical to the uninterrupted one" in err

    code, _, err = _cli(["--resume", str(out), "--max-steps", "6"], capsys)  # same world size: no note
    assert code == 0 and "bit-identical" not in err


def test_ddp_timeout_option_is_validated(tmp_path: Path, capsys) -> None:
    code, _, err = _cli(["--ddp-timeout", "0", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "--ddp-timeout" in err


# ---------------------------------------------------------------- 7. output


def test_progress_lines_when_output_is_not_a_terminal(tmp_path: Path, capsys) -> None:
    code, out, _ = _cli(["--out", str(tmp_path / "run")], capsys, progress=True)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("fastanalog train: cnn on digits")
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in progress] == ["step 2/4", "step 4/4"]
    assert "train loss" in progress[0] and "test loss" not in progress[0] and "test loss" in progress[1]
    assert lines[-1].startswith("test accuracy: ")

    code, out, _ = _cli(["--out", str(tmp_path / "quiet")], capsys)  # --no-progress: no lines
    assert code == 0 and not [line for line in out.splitlines() if line.startswith("step ")]


def test_no_cuda_runtime_note_is_dropped_and_other_records_pass() -> None:
    loop.quiet_cuda_home_note()
    logger = logging.getLogger("torch.utils.cpp_extension")
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Collect()
    logger.addHandler(handler)
    try:
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("Error building extension: %s", "something real")
    finally:
        logger.removeHandler(handler)
    if torch.cuda.is_available():
        assert len(seen) == 2  # with a GPU the filter is not installed
    else:
        assert seen == ["Error building extension: something real"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the note appears only without a CUDA device")
def test_cpp_extension_import_prints_no_cuda_note_under_the_launcher() -> None:
    # What torch.compile's inductor does on a CPU-only machine: import torch.utils.cpp_extension.
    code = "import sys, torch{}; import torch.utils.cpp_extension"
    quiet = "; from fastanalog.train.loop import quiet_cuda_home_note; quiet_cuda_home_note()"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    plain = subprocess.run([sys.executable, "-c", code.format("")], capture_output=True, text=True, env=env, timeout=120)
    if "No CUDA runtime is found" not in plain.stderr:
        pytest.skip("no CUDA toolkit on this machine: torch prints no note to silence")
    launcher = subprocess.run([sys.executable, "-c", code.format(quiet)], capture_output=True, text=True, env=env, timeout=120)
    assert launcher.returncode == 0 and "No CUDA runtime is found" not in launcher.stderr


def test_weight_scaling_options_reach_the_config_and_are_validated():
    from fastanalog.train import cli

    ns = cli._resolve_args({"weight_scaling": "channel", "weight_scaling_omega": 0.8}, {})
    cli._fill_defaults(ns)
    cli._validate(ns)
    cfg = cli.make_config(ns)
    assert cfg.weight_scaling == "channel" and cfg.weight_scaling_omega == 0.8
    ns.weight_scaling_omega = 1.5
    with pytest.raises(ValueError, match="weight_scaling_omega"):
        cli._validate(ns)


# ---------------------------------------------------------------- per-sample writes and older runs


def test_runs_record_the_update_mode_and_older_runs_resume_in_batch_mode(finished_run: Path, tmp_path: Path, capsys) -> None:
    """A run saved before --update existed wrote its mini-batches as one write: it continues in batch mode."""
    assert load_checkpoint(list_checkpoints(finished_run)[-1][1])["args"]["update"] == "per-sample"
    out, path = _copy_run(finished_run, tmp_path)
    _rewrite(path, lambda state: state["args"].pop("update"))
    code, _, err = _cli(["--resume", str(out), "--update", "per-sample"], capsys)
    assert code == 2 and "--update 'per-sample' (the checkpoint has 'batch')" in err
    result = run_training(resume=str(out), max_steps=6, no_progress=True)
    assert result["steps"] == 6
    assert load_checkpoint(list_checkpoints(out)[-1][1])["args"]["update"] == "batch"


def test_a_run_resumes_with_the_other_mixed_weight_on_the_same_trajectory(finished_run: Path, tmp_path: Path, capsys) -> None:
    """--mixed-weight does not shape the trajectory: a transient run resumed with the stored mixed weight ends where
    resuming it transient does, bit for bit, and its later checkpoints record the new choice."""
    assert load_checkpoint(list_checkpoints(finished_run)[-1][1])["args"]["mixed_weight"] == "transient"
    finals = {}
    for mixed in ("transient", "stored"):
        out, _ = _copy_run(finished_run, tmp_path / mixed)
        code, _, err = _cli(["--resume", str(out), "--max-steps", "8", "--mixed-weight", mixed], capsys)
        assert code == 0, err
        finals[mixed] = load_checkpoint(list_checkpoints(out)[-1][1])
        assert finals[mixed]["args"]["mixed_weight"] == mixed and finals[mixed]["step"] == 8
    transient, stored = (finals[m]["model"] for m in ("transient", "stored"))
    assert transient.keys() == stored.keys() and any(k.endswith("analog_residual") for k in transient)
    for key in transient:
        assert torch.equal(transient[key], stored[key]), key
