"""Tests of the ``fastanalog train`` launcher: resume, DDP, bf16/compile, bad input and the run folder."""

from __future__ import annotations

import csv
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastanalog as fa
from fastanalog.__main__ import main
from fastanalog.train import models as train_models
from fastanalog.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from fastanalog.train.cli import run_training
from fastanalog.train.data import BatchAdapter
from fastanalog.train.distributed import state_digest
from fastanalog.train.models import model_input
from fastanalog.train.rundir import DIAGNOSTIC_COLUMNS, METRIC_COLUMNS, plot_curves

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A small conv model trained with rl2, device-to-device variation, cycle-to-cycle and read noise, momentum
# and a cosine schedule. 96 samples in batches of 16: 6 steps per epoch, 12 in all.
NOISY_RL2 = {
    "dataset": "digits",
    "model": "cnn",
    "algorithm": "rl2",
    "max_train": 96,
    "max_test": 64,
    "batch_size": 16,
    "epochs": 2,
    "lr": 0.2,
    "momentum": 0.5,
    "schedule": "cosine",
    "d2d_std": 0.1,
    "c2c_std": 0.2,
    "read_noise": 0.01,
    "log_every": 2,
    "threads": 1,
    "no_progress": True,
}


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """``threads`` sets torch's global thread count: put it back after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _final_checkpoint(run_dir: Path) -> dict:
    return load_checkpoint(list_checkpoints(run_dir)[-1][1])


def _analog_arrays(state: dict) -> dict[str, torch.Tensor]:
    """The analog arrays W, P, H of a model state, read through ``layer.analog_state()``."""
    model = fa.convert_to_analog(train_models.build_model("cnn", 1, 10, 8), fa.AnalogConfig(algorithm="rl2"))
    model.load_state_dict(state)
    return {
        f"{name}.{array}": t
        for name, layer in fa.analog_layers(model)
        for array, t in layer.analog_state().items()
        if t is not None
    }


def _assert_same_state(a, b, where: str = "") -> None:
    """Element-for-element equality of nested dicts/lists of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _assert_same_trajectory(reference: Path, resumed: Path) -> None:
    ref, res = _final_checkpoint(reference), _final_checkpoint(resumed)
    assert ref["step"] == res["step"] == 12
    ref_arrays, res_arrays = _analog_arrays(ref["model"]), _analog_arrays(res["model"])
    assert any(k.endswith(".buffer") for k in ref_arrays) and any(k.endswith(".residual") for k in ref_arrays)
    _assert_same_state(ref_arrays, res_arrays, "arrays")
    _assert_same_state(ref["model"], res["model"], "model")
    _assert_same_state(ref["optimizer"], res["optimizer"], "optimizer")
    _assert_same_state(ref["scheduler"], res["scheduler"], "scheduler")
    assert res["optimizer"]["fastanalog"]["step"] == 12
    assert not any(p.name.endswith(".tmp") for p in (resumed / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run of ``NOISY_RL2`` with checkpoints every 4 steps."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_training(NOISY_RL2, out=str(out), checkpoint_every=4)
    return out


# ---------------------------------------------------------------- resume


def test_stop_at_max_steps_and_resume_matches_uninterrupted_run(reference_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run_training(NOISY_RL2, out=str(out), checkpoint_every=4, max_steps=5)
    assert first["steps"] == 5 and [s for s, _ in list_checkpoints(out)] == [4, 5]
    # Resume from the run folder: every option comes from its latest checkpoint, but --max-steps is given again.
    second = run_training(resume=str(out), max_steps=12, no_progress=True)
    assert second["steps"] == 12
    _assert_same_trajectory(reference_run, out)
    assert second["test_accuracy"] == json.loads((reference_run / "summary.json").read_text())["test_accuracy"]


class SimulatedCrash(Exception):
    """Stands for a process killed in the middle of a step."""


def test_crash_after_checkpoint_and_resume_matches_uninterrupted_run(
    reference_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    step = fa.AnalogSGD.step

    def crash_at_step_11(self, closure=None):
        if self.step_count == 10:
            raise SimulatedCrash
        return step(self, closure)

    monkeypatch.setattr(fa.AnalogSGD, "step", crash_at_step_11)
    with pytest.raises(SimulatedCrash):
        run_training(NOISY_RL2, out=str(out), checkpoint_every=4)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(out)][-1] == 8
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert rows[-1]["step"] == "10"  # logged after the last checkpoint, before the crash

    run_training(resume=str(out), no_progress=True)
    _assert_same_trajectory(reference_run, out)

    # The logs of the resumed run are those of the uninterrupted one (throughput aside): the rows written
    # after the checkpoint were dropped, and the running sums came back from the checkpoint.
    def logged(run: Path, name: str) -> list[dict[str, str]]:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in csv.DictReader((run / name).open())]

    assert logged(out, "metrics.csv") == logged(reference_run, "metrics.csv")
    assert logged(out, "diagnostics.csv") == logged(reference_run, "diagnostics.csv")


# ---------------------------------------------------------------- data-parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_torchrun_two_gloo_ranks_end_identical(tmp_path: Path) -> None:
    launcher = f"-m torch.distributed.run --nnodes 1 --nproc-per-node 2 --master-addr 127.0.0.1 --master-port {_free_port()}"
    train = (
        "-m fastanalog train --dataset digits --max-train 64 --max-test 64 --batch-size 16 --lr 0.2 "
        "--d2d-std 0.1 --read-noise 0.01 --accelerator cpu --threads 1 --no-progress"
    )
    cmd = [sys.executable, *launcher.split(), *train.split()]  # the default run folder: rank 0 makes it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folders = list((tmp_path / "runs").iterdir())
    assert len(folders) == 1 and folders[0].name.endswith("-cnn-rl2")  # one folder for both ranks
    out = folders[0]
    assert proc.stdout.count("test accuracy:") == 1  # rank 0 reports, rank 1 stays quiet
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["pulses"] > 0
    digests = summary["rank_state_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # every array and parameter identical on both ranks
    final = _final_checkpoint(out)
    model = fa.convert_to_analog(train_models.build_model("cnn", 1, 10, 8), fa.AnalogConfig(algorithm="rl2"))
    model.load_state_dict(final["model"])
    assert state_digest(model) == digests[0]
    assert len(final["rng"]) == 2 and final["meta"]["world_size"] == 2


# ---------------------------------------------------------------- bf16 and torch.compile


def _record_logits_dtype(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """Record the dtype of the model's output at every training forward pass."""
    dtypes: list[torch.dtype] = []
    build = train_models.build_model

    def build_and_hook(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype) if m.training else None)
        return model

    monkeypatch.setattr(train_models, "build_model", build_and_hook)
    return dtypes


RESNET18_TINY = {
    "model": "resnet18",
    "dataset": "digits",
    "image_size": 32,
    "max_train": 4,
    "max_test": 4,
    "batch_size": 2,
    "algorithm": "rl2",
    "threads": 2,
    "no_progress": True,
}


def test_amp_bf16_trains_a_timm_resnet18(monkeypatch: pytest.MonkeyPatch) -> None:
    dtypes = _record_logits_dtype(monkeypatch)
    result = run_training(RESNET18_TINY, amp="bf16")
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert result["steps"] == 2 and np.isfinite(result["train_loss"]) and result["pulses"] > 0


def test_compile_trains_the_cnn(tmp_path: Path) -> None:
    result = run_training(
        dataset="digits", max_train=32, max_test=32, batch_size=16, compile=True, threads=2, no_progress=True
    )
    assert result["steps"] == 2 and np.isfinite(result["train_loss"]) and result["pulses"] > 0


@pytest.mark.slow  # inductor compiles resnet18's forward and backward: about 2 minutes on 2 CPU cores
def test_compile_trains_a_timm_resnet18(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_training(RESNET18_TINY, compile=True, out=str(out))
    assert result["steps"] == 2 and np.isfinite(result["train_loss"]) and result["pulses"] > 0
    assert json.loads((out / "config.json").read_text())["args"]["compile"] is True


# ---------------------------------------------------------------- inputs: presets, adapters, datasets


def test_preset_sets_device_and_explicit_options_win() -> None:
    from fastanalog.train.cli import _fill_defaults, _resolve_args, make_config

    ns = _resolve_args({"preset": "paper-exp", "tau": 0.8}, {})
    _fill_defaults(ns)
    cfg = make_config(ns)
    assert isinstance(cfg.device, fa.ExpResponse) and cfg.device.tau_max == 0.8 and cfg.transfer_lr == 0.1


def test_model_input_and_batch_adapter() -> None:
    assert model_input("cnn", 1, 28) == (1, 28)
    assert model_input("resnet18", 1, 28) == (3, 28)  # timm models get 3 channels
    assert model_input("vit_tiny_patch16_224", 1, 28) == (3, 224)  # fixed input size
    x = torch.randn(2, 1, 8, 8)
    y = BatchAdapter(3, 32, 8)(x)
    assert y.shape == (2, 3, 32, 32) and torch.equal(y[:, 0], y[:, 2])


def _write_image_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / split / label / f"{i}.png")


def test_image_folder_trains_with_seeded_augmentation(tmp_path: Path) -> None:
    _write_image_folder(tmp_path / "pets")
    opts = {
        "dataset": f"imagefolder:{tmp_path / 'pets'}",
        "batch_size": 4,
        "algorithm": "asgd",
        "threads": 1,
        "no_progress": True,
    }
    first = run_training(opts)
    assert first["steps"] == 3 and first["train_samples"] == 12
    assert run_training(opts)["pulses"] == first["pulses"]  # random crops and flips are seeded


def test_cifar10_from_a_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [n for n, _ in cifar.CIFAR10.train_list + cifar.CIFAR10.test_list]
    for name in names:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, 4).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)  # the md5 sums are those of the real files
    result = run_training(
        dataset="cifar10", data_root=str(tmp_path), batch_size=10, algorithm="asgd", threads=1, no_progress=True
    )
    assert result["train_samples"] == 20 and result["steps"] == 2


# ---------------------------------------------------------------- bad input


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(["train", "--no-progress", "--threads", "1", *argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no_such_model"], "unknown model 'no_such_model'"),
        (["--dataset", "mnist"], "--dataset: unknown dataset 'mnist'"),
        (["--dataset", "cifar10", "--data-dir", "{tmp}/nowhere"], "cifar10 not found in"),
        (["--dataset", "cifar100"], "pass --data-dir"),
        (["--dataset", "imagefolder:{tmp}/nowhere"], "does not exist"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "-1"], "--lr"),
        (["--resume", "{tmp}/nowhere"], "no such file or folder"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, err = _cli([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--out", str(out)], capsys)
    assert code == 2
    assert message in err
    assert not out.exists()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step digits run with its run folder."""
    out = tmp_path_factory.mktemp("small") / "run"
    argv = "--dataset digits --max-train 64 --max-test 64 --batch-size 16 --log-every 2 --threads 1 --no-progress".split()
    assert main(["train", *argv, "--out", str(out)]) == 0
    return out


def test_existing_run_folder_is_not_clobbered(small_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(small_run)
    code, err = _cli(["--dataset", "digits", "--out", str(small_run)], capsys)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    code, err = _cli(["--resume", str(small_run), "--model", "mlp"], capsys)
    assert code == 2 and "--model 'mlp' (the checkpoint has 'cnn')" in err
    assert _snapshot(small_run) == before


def test_overwrite_replaces_a_run(small_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    (out / "notes.txt").write_text("mine")
    code, _ = _cli(
        ["--dataset", "digits", "--max-train", "32", "--batch-size", "16", "--out", str(out), "--overwrite"], capsys
    )
    assert code == 0
    assert [s for s, _ in list_checkpoints(out)] == [2] and (out / "notes.txt").read_text() == "mine"


def _corrupt(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    else:
        state = torch.load(path, weights_only=True)
        if how == "version":
            state["format_version"] = 99
            torch.save(state, path)
        elif how == "shape":
            state["model"]["classifier.3.weight"] = torch.zeros(3, 3)
            save_checkpoint(state, path)  # with a valid checksum: the shape is what is wrong


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "cannot read the checkpoint"),
        ("garbage", "cannot read the checkpoint"),
        ("version", "format version 99, but this fastanalog reads versions 1, 2"),
        ("shape", "model state does not fit this cnn"),
    ],
)
def test_unusable_checkpoint_is_a_clear_error(
    how: str, message: str, small_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    path = list_checkpoints(out)[-1][1]
    _corrupt(path, how)
    before = _snapshot(out)
    with pytest.raises(CheckpointError, match=message) as info:
        run_training(resume=str(path))
    assert str(path) in str(info.value)
    code, err = _cli(["--resume", str(out)], capsys)
    assert code == 2 and str(path) in err and message in err
    assert _snapshot(out) == before  # never a silent fresh start


# ---------------------------------------------------------------- the run folder


def test_run_folder_contents(small_run: Path) -> None:
    config = json.loads((small_run / "config.json").read_text())
    assert config["args"]["model"] == "cnn" and config["args"]["dataset"] == "digits" and config["args"]["image_size"] == 8
    assert {"torch", "fastanalog", "python"} <= config["versions"].keys() and config["total_steps"] == 4
    rows = list(csv.DictReader((small_run / "metrics.csv").open()))
    assert tuple(rows[0].keys()) == METRIC_COLUMNS
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert rows[-1]["test_acc"] and float(rows[-1]["images_per_s"]) > 0 and int(rows[-1]["pulses"]) > 0
    diagnostics = list(csv.DictReader((small_run / "diagnostics.csv").open()))
    assert tuple(diagnostics[0].keys()) == DIAGNOSTIC_COLUMNS
    assert {r["layer"] for r in diagnostics} == {"features.0", "features.3", "classifier.1", "classifier.3"}
    assert all(float(r["saturation_max"]) > 0 for r in diagnostics)
    for name in ("curves.png", "diagnostics.png"):
        data = (small_run / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    summary = json.loads((small_run / "summary.json").read_text())
    assert summary["steps"] == 4 and 0 <= summary["test_accuracy"] <= 1


def test_plots_are_skipped_with_a_warning_without_matplotlib(small_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert plot_curves(small_run) is None
