"""Tests of the training front end: IDX parsing, datasets, models, CLI validation and one tiny run."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fastanalog.__main__ import main
from fastanalog.train.cli import run_training
from fastanalog.train.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IDXFormatError,
    get_dataset,
    load_digits,
    load_fashion_mnist,
    read_idx,
)
from fastanalog.train.models import MLP, SmallCNN, build_model


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> Path:
    """Write ``array`` as a gzip-compressed IDX file (big-endian header and data)."""
    dtypes = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=dtypes[type_code]).tobytes())
    return path


def write_fake_fashion_mnist(root: Path, n_train: int = 12, n_test: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Write the four Fashion-MNIST files with random 28x28 images; return the training images and labels."""
    rng = np.random.default_rng(1)
    train_x = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    train_y = rng.integers(0, 10, size=n_train, dtype=np.uint8)
    write_idx(root / "train-images-idx3-ubyte.gz", train_x)
    write_idx(root / "train-labels-idx1-ubyte.gz", train_y)
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, size=n_test, dtype=np.uint8))
    return train_x, train_y


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """``--threads`` sets torch's global thread count: put it back after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- IDX parsing and datasets


def test_read_idx_roundtrip_types(tmp_path: Path) -> None:
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a.gz", a)), a)
    b = np.array([[-300, 7], [12345, -1]], dtype=np.int16)
    out = read_idx(write_idx(tmp_path / "b.gz", b, type_code=0x0B))
    np.testing.assert_array_equal(out, b)
    assert out.dtype == np.int16 and out.dtype.isnative
    c = np.array([1.5, -2.25, 3e-3], dtype=np.float32)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "c.gz", c, type_code=0x0D)), c)


def test_fashion_mnist_loader_parses_synthetic_files(tmp_path: Path) -> None:
    train_x, train_y = write_fake_fashion_mnist(tmp_path)
    x, y = load_fashion_mnist(tmp_path, train=True)
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (12,) and y.dtype == torch.int64
    expected = (train_x.astype(np.float32) / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    np.testing.assert_allclose(x[:, 0].numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), train_y)
    x_test, y_test = load_fashion_mnist(tmp_path, train=False)
    assert x_test.shape == (5, 1, 28, 28) and y_test.shape == (5,)
    ds = get_dataset("fashion-mnist", train=False, root=tmp_path)
    assert len(ds) == 5


def test_corrupt_idx_files_raise_naming_the_file(tmp_path: Path) -> None:
    good = np.zeros((3, 28, 28), dtype=np.uint8)
    # Bad magic: the first two bytes must be zero.
    bad_magic = tmp_path / "bad_magic.gz"
    with gzip.open(bad_magic, "wb") as f:
        f.write(bytes([1, 2, 8, 3]) + struct.pack(">3I", 3, 28, 28) + good.tobytes())
    with pytest.raises(IDXFormatError, match="bad_magic.gz.*magic"):
        read_idx(bad_magic)
    # Truncated data: the header promises more bytes than the file holds.
    truncated = tmp_path / "truncated.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 3, 28, 28) + good.tobytes()[:-10])
    with pytest.raises(IDXFormatError, match="truncated.gz.*truncated"):
        read_idx(truncated)
    # Truncated header.
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">I", 3))
    with pytest.raises(IDXFormatError, match="short.gz"):
        read_idx(short)
    # Not gzip at all.
    not_gz = tmp_path / "garbage.gz"
    not_gz.write_bytes(b"this is not a gzip stream")
    with pytest.raises(IDXFormatError, match="garbage.gz"):
        read_idx(not_gz)


def test_fashion_mnist_mismatched_counts_raise(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(7, dtype=np.uint8))
    with pytest.raises(IDXFormatError, match="12 images.*7 labels"):
        load_fashion_mnist(tmp_path, train=True)


def test_fashion_mnist_missing_folder_names_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist(tmp_path / "nowhere")
    assert "nowhere" in str(info.value)


def test_digits_loader_shapes_and_split() -> None:
    x_tr, y_tr = load_digits(train=True)
    x_te, y_te = load_digits(train=False)
    assert x_tr.shape == (1438, 1, 8, 8) and x_te.shape == (359, 1, 8, 8)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert float(x_tr.min()) >= 0.0 and float(x_tr.max()) == 1.0
    assert set(y_tr.tolist()) == set(range(10)) and y_te.shape == (359,)
    # Fixed split: the same samples on every call, and no sample in both splits.
    torch.testing.assert_close(load_digits(train=False)[0], x_te)
    train_rows = {tuple(r) for r in x_tr.flatten(1).tolist()}
    overlap = sum(tuple(r) in train_rows for r in x_te.flatten(1).tolist())
    assert overlap < 5  # the raw data has a handful of exact duplicate images, nothing more


def test_unknown_dataset_names_choices() -> None:
    with pytest.raises(ValueError, match="fashion-mnist.*digits"):
        get_dataset("cifar-10", train=True)


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("size", [28, 8])
def test_model_output_shapes(size: int) -> None:
    x = torch.randn(3, 1, size, size)
    assert SmallCNN(1, 10, image_size=size)(x).shape == (3, 10)
    assert MLP(size * size, 7)(x).shape == (3, 7)
    assert build_model("cnn", 1, 10, size)(x).shape == (3, 10)
    assert build_model("mlp", 1, 10, size)(x).shape == (3, 10)


def test_small_cnn_architecture() -> None:
    m = SmallCNN(1, 10, image_size=28)
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    fcs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(16, (5, 5)), (32, (5, 5))]
    assert [(f.in_features, f.out_features) for f in fcs] == [(32 * 7 * 7, 128), (128, 10)]
    assert [(f.in_features, f.out_features) for f in MLP().modules() if isinstance(f, torch.nn.Linear)] == [
        (784, 256),
        (256, 128),
        (128, 10),
    ]


def test_timm_model_by_name() -> None:
    model = build_model("resnet18", in_channels=1, num_classes=7, image_size=28)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_unknown_model_raises() -> None:
    with pytest.raises(ValueError, match="cnn, mlp.*timm.list_models"):
        build_model("definitely_not_a_model", 1, 10, 28)


# ---------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-0.1"], "--lr"),
        (["--epochs", "0"], "--epochs"),
        (["--max-train", "-5"], "--max-train"),
        (["--algorithm", "sgd"], "--algorithm"),
        (["--dataset", "mnist"], "--dataset"),
        (["--mixed-weight", "cached"], "--mixed-weight"),
    ],
)
def test_cli_rejects_bad_values(argv: list[str], option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", *argv])
    assert info.value.code == 2
    assert option in capsys.readouterr().err


def test_cli_requires_a_command() -> None:
    with pytest.raises(SystemExit):
        main([])


def test_run_training_validates_options() -> None:
    with pytest.raises(ValueError, match="batch_size.*0"):
        run_training(dataset="digits", batch_size=0)
    with pytest.raises(TypeError, match="unknown training option"):
        run_training(dataset="digits", batchsize=4)


def test_cli_missing_dataset_reports_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--data-root", str(tmp_path / "none"), "--no-progress", "--max-train", "8"])
    assert code == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_run_training_digits_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "train",
            "--out",
            str(tmp_path / "run"),
            "--dataset",
            "digits",
            "--max-train",
            "256",
            "--epochs",
            "1",
            "--algorithm",
            "rl2",
            "--batch-size",
            "32",
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("test accuracy: ") and "%" in line and "pulses:" in line

    result = run_training(
        dataset="digits", max_train=256, epochs=1, algorithm="rl2", batch_size=32, no_progress=True, threads=1
    )
    assert result["algorithm"] == "rl2"
    assert result["train_samples"] == 256 and result["steps"] == 8
    assert math.isfinite(result["test_accuracy"]) and 0.0 <= result["test_accuracy"] <= 1.0
    assert math.isfinite(result["train_loss"]) and result["train_loss"] > 0
    assert result["pulses"] > 0
    assert result["wall_time_s"] > 0
    # Same seed, same result: the run is deterministic.
    again = run_training(
        dataset="digits", max_train=256, epochs=1, algorithm="rl2", batch_size=32, no_progress=True, threads=1
    )
    assert again["test_accuracy"] == result["test_accuracy"] and again["pulses"] == result["pulses"]


def test_run_training_fashion_mnist_synthetic(tmp_path: Path) -> None:
    write_fake_fashion_mnist(tmp_path, n_train=16, n_test=6)
    result = run_training(data_root=str(tmp_path), model="mlp", algorithm="digital", batch_size=8, no_progress=True, threads=1)
    assert result["steps"] == 2 and result["pulses"] == 0
    assert 0.0 <= result["test_accuracy"] <= 1.0


def test_device_choices_follow_the_response_families(monkeypatch):
    """--device offers every response family of fastanalog.devices that is a formula (not the table), each
    with its own default shape: a family added there is a choice without editing the command line."""
    import dataclasses
    import importlib
    from typing import ClassVar

    import fastanalog as fa
    from fastanalog import devices
    from fastanalog.train import cli

    assert cli.DEVICES == ("linear", "power", "exp")
    assert cli.DEFAULT_RESPONSE_GAMMA == {"power": 0.5, "exp": 1.0}
    with pytest.raises(ValueError, match="unknown device 'table'"):
        cli.make_device("table", 0.6, 0.001)

    @dataclasses.dataclass(frozen=True)
    class SquareResponse(fa.PowerResponse):
        gamma: float = 2.0
        family: ClassVar[str] = "square"

    monkeypatch.setitem(devices.DEVICE_FAMILIES, "square", SquareResponse)
    try:
        patched = importlib.reload(cli)
        assert patched.DEVICES == ("linear", "power", "exp", "square")
        device = patched.make_device("square", 0.6, 0.001)
        assert type(device) is SquareResponse and device.gamma == 2.0
        assert patched.make_device("square", 0.6, 0.001, response_gamma=3.0).gamma == 3.0
        assert patched.build_parser().parse_args(["--device", "square"]).device == "square"
    finally:
        monkeypatch.undo()
        importlib.reload(cli)


def test_mixed_weight_option_reaches_the_config_and_trains_identically() -> None:
    """--mixed-weight stored keeps the forward weight in a buffer the step writes; the run is the transient one."""
    from fastanalog.train import cli

    ns = cli.build_parser().parse_args(["--mixed-weight", "stored", "--algorithm", "rl"])
    cli._fill_defaults(ns)
    assert cli.make_config(ns).mixed_weight == "stored"
    assert cli.build_parser().parse_args([]).mixed_weight is None  # not given: the default (or a resumed run's value)
    common = dict(dataset="digits", max_train=128, epochs=1, algorithm="rl2", batch_size=32, no_progress=True, threads=1)
    transient = run_training(**common)
    stored = run_training(**common, mixed_weight="stored")
    for key in ("test_accuracy", "train_loss", "pulses"):
        assert stored[key] == transient[key], key
