"""Datasets for the training CLI: Fashion-MNIST (IDX files on disk) and scikit-learn's 8x8 digits.

Every loader returns float32 images shaped ``(N, C, H, W)`` and int64 labels shaped ``(N,)``.
Nothing is downloaded: Fashion-MNIST is read from a local folder of IDX ``.gz`` files and the
digits come bundled with scikit-learn.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

# Per-pixel mean and std of the Fashion-MNIST training images after scaling to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

FASHION_MNIST_FILES = {
    True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

DATASETS = ("fashion-mnist", "digits")
NUM_CLASSES = {"fashion-mnist": 10, "digits": 10}

# Fraction of the 1797 digits held out as the test split, and the seed of the split's permutation.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

# IDX element type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IDXFormatError(ValueError):
    """An IDX file is malformed: bad magic number, truncated data or unexpected shape."""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzip-compressed when the name ends in ``.gz``) into a numpy array.

    The header is ``0x00 0x00 <type code> <ndim>`` followed by ``ndim`` big-endian uint32
    dimension sizes, then the elements in row-major order.

    Args:
        path: the file to read.

    Returns:
        An array of the file's dimensions, in native byte order.

    Raises:
        FileNotFoundError: the file does not exist.
        IDXFormatError: bad magic number, unknown type code, truncated or oversized data.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise IDXFormatError(
            f"{path}: cannot decompress/read the file ({exc}); the file is corrupt, download it again"
        ) from exc

    if len(raw) < 4:
        raise IDXFormatError(f"{path}: file is {len(raw)} bytes, too short for an IDX header (needs at least 4)")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0:
        raise IDXFormatError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (must start with two zero bytes); not an IDX file"
        )
    if type_code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise IDXFormatError(f"{path}: unknown IDX element type code 0x{type_code:02X} (known: {known})")
    if ndim == 0:
        raise IDXFormatError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IDXFormatError(f"{path}: truncated IDX header ({len(raw)} bytes, the {ndim} dimensions need {header_len})")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header_len
    if got < expected:
        raise IDXFormatError(
            f"{path}: truncated IDX data: header declares shape {dims} ({expected} bytes), file holds {got} bytes"
        )
    if got > expected:
        raise IDXFormatError(f"{path}: {got - expected} unexpected trailing bytes after the IDX data of shape {dims}")
    data = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    return data.reshape(dims).astype(dtype.newbyteorder("="))


def load_fashion_mnist(
    root: str | os.PathLike[str] = DEFAULT_FASHION_MNIST_ROOT, train: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load Fashion-MNIST from the IDX ``.gz`` files in ``root``.

    Args:
        root: folder holding ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
            ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``.
        train: the 60k training split (True) or the 10k test split (False).

    Returns:
        ``(images, labels)``: float32 images ``(N, 1, 28, 28)``, pixel values scaled to [0, 1]
        then normalised to ``(x - 0.2860) / 0.3530``; int64 labels ``(N,)`` in 0..9.

    Raises:
        FileNotFoundError: the folder or a file is missing (the message names the install command).
        IDXFormatError: a file is corrupt or the images and labels do not match.
    """
    root = Path(root)
    image_name, label_name = FASHION_MNIST_FILES[bool(train)]
    image_path, label_path = root / image_name, root / label_name
    missing = [p.name for p in (image_path, label_path) if not p.is_file()]
    if missing:
        where = "folder does not exist" if not root.is_dir() else f"missing {', '.join(missing)}"
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} ({where}). Install it with `apt-get install dataset-fashion-mnist` "
            f"or pass the folder holding the IDX .gz files (--data-root)."
        )
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.ndim != 3:
        raise IDXFormatError(f"{image_path}: expected a 3-D image array (N, rows, cols), got shape {images.shape}")
    if labels.ndim != 1:
        raise IDXFormatError(f"{label_path}: expected a 1-D label array (N,), got shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(f"{image_path} holds {images.shape[0]} images but {label_path} holds {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES["fashion-mnist"]):
        raise IDXFormatError(f"{label_path}: labels must lie in 0..9, got range {labels.min()}..{labels.max()}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_digits(train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Load scikit-learn's bundled 8x8 handwritten digits (1797 images, no download).

    The split is fixed: a permutation seeded with ``DIGITS_SPLIT_SEED`` puts the last 20% of
    the samples (359) in the test split and the rest (1438) in the training split.

    Args:
        train: the training split (True) or the test split (False).

    Returns:
        ``(images, labels)``: float32 images ``(N, 1, 8, 8)`` with pixel values scaled from
        0..16 to [0, 1]; int64 labels ``(N,)`` in 0..9.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
    n_test = int(len(labels) * DIGITS_TEST_FRACTION)
    idx = perm[: len(labels) - n_test] if train else perm[len(labels) - n_test :]
    x = torch.from_numpy(images[idx]).unsqueeze(1)
    y = torch.from_numpy(labels[idx])
    return x, y


def get_dataset(name: str, train: bool, root: str | os.PathLike[str] | None = None) -> TensorDataset:
    """Return a dataset split as a ``TensorDataset`` of ``(images, labels)``.

    Args:
        name: ``fashion-mnist`` or ``digits``.
        train: training split (True) or test split (False).
        root: Fashion-MNIST folder (default ``/usr/share/datasets/fashion-mnist``); unused for digits.

    Raises:
        ValueError: unknown ``name``.
    """
    if name == "fashion-mnist":
        x, y = load_fashion_mnist(root if root is not None else DEFAULT_FASHION_MNIST_ROOT, train=train)
    elif name == "digits":
        x, y = load_digits(train=train)
    else:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return TensorDataset(x, y)
