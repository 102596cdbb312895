"""Datasets for the training CLI.

* ``fashion-mnist``: IDX ``.gz`` files in a local folder, held in memory as one tensor.
* ``digits``: scikit-learn's bundled 8x8 digits, in memory.
* ``cifar10`` / ``cifar100``: a local folder in torchvision's format (``cifar-10-batches-py`` or
  ``cifar-100-python`` inside it), read with ``torchvision.datasets.CIFAR10/100(download=False)``.
* ``imagefolder:PATH``: ``torchvision.datasets.ImageFolder`` over ``PATH/train`` and ``PATH/val``
  (or ``PATH/test``), one sub-folder per class.

The in-memory loaders return float32 images shaped ``(N, C, H, W)`` and int64 labels shaped
``(N,)``; :func:`load_splits` builds the train and test sets a model sees, with the transforms that
fit the dataset and the model (channels, size, normalisation, augmentation). Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional
from torch.utils.data import Dataset, Subset, TensorDataset

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

# Per-pixel mean and std of the Fashion-MNIST training images after scaling to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

FASHION_MNIST_FILES = {
    True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

DATASETS = ("fashion-mnist", "digits", "cifar10", "cifar100")
# ``imagefolder:PATH`` names a folder of class sub-folders; it is accepted besides the names above.
IMAGEFOLDER_PREFIX = "imagefolder:"
NUM_CLASSES = {"fashion-mnist": 10, "digits": 10, "cifar10": 10, "cifar100": 100}

# Per-channel mean and std of the CIFAR training images (scaled to [0, 1]) and of ImageNet (for image folders).
CIFAR_MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# Image folders: the test images are resized to size / this fraction, then centre-cropped to size.
CENTER_CROP_FRACTION = 0.875

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


def _fashion_mnist_paths(root: str | os.PathLike[str], train: bool) -> tuple[Path, Path]:
    """The image and label files of one Fashion-MNIST split; FileNotFoundError naming the fix if one is missing."""
    root = Path(root)
    image_name, label_name = FASHION_MNIST_FILES[bool(train)]
    image_path, label_path = root / image_name, root / label_name
    missing = [p.name for p in (image_path, label_path) if not p.is_file()]
    if missing:
        where = "folder does not exist" if not root.is_dir() else f"missing {', '.join(missing)}"
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} ({where}). Install it with `apt-get install dataset-fashion-mnist` "
            f"or pass the folder holding the IDX .gz files (--data-dir)."
        )
    return image_path, label_path


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
    image_path, label_path = _fashion_mnist_paths(root, train)
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


def is_dataset_name(name: str) -> bool:
    """True for the names in ``DATASETS`` and for ``imagefolder:PATH`` with a non-empty PATH."""
    return name in DATASETS or (name.startswith(IMAGEFOLDER_PREFIX) and len(name) > len(IMAGEFOLDER_PREFIX))


def _unknown_dataset(name: str) -> ValueError:
    return ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)} or {IMAGEFOLDER_PREFIX}PATH")


def _cifar_class(name: str):
    from torchvision.datasets import CIFAR10, CIFAR100

    return CIFAR10 if name == "cifar10" else CIFAR100


def _cifar_root(name: str, root: str | os.PathLike[str] | None) -> Path:
    """The ``--data-dir`` of a CIFAR dataset, checked to hold torchvision's folder (FileNotFoundError otherwise)."""
    folder = _cifar_class(name).base_folder
    if root is None:
        raise FileNotFoundError(
            f"{name} is read from a local folder: pass --data-dir, the folder that holds {folder}/ (torchvision's format)"
        )
    root = Path(root)
    if not (root / folder).is_dir():
        where = "folder does not exist" if not root.is_dir() else f"no {folder}/ in it"
        raise FileNotFoundError(
            f"{name} not found in {root} ({where}): --data-dir must hold torchvision's {folder}/ "
            f"(e.g. from torchvision.datasets.{_cifar_class(name).__name__}(root, download=True) on a machine with internet)"
        )
    return root


def _imagefolder_splits(name: str) -> tuple[Path, Path]:
    """``(train folder, test folder)`` of ``imagefolder:PATH``: ``PATH/train`` and ``PATH/val`` (or ``PATH/test``)."""
    root = Path(name[len(IMAGEFOLDER_PREFIX) :]).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: folder {root} does not exist")
    train = root / "train"
    test = next((root / sub for sub in ("val", "test") if (root / sub).is_dir()), None)
    if not train.is_dir() or test is None:
        raise FileNotFoundError(
            f"{name}: {root} must hold train/ and val/ (or test/) sub-folders, one folder per class in each"
        )
    return train, test


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset holds: ``channels`` and side ``image_size`` of its images (None: they vary), ``num_classes``."""

    name: str
    channels: int
    image_size: int | None
    num_classes: int


def describe_dataset(name: str, root: str | os.PathLike[str] | None = None) -> DatasetInfo:
    """Check that the files of dataset ``name`` are where they should be and describe its images.

    Args:
        name: a name in ``DATASETS`` or ``imagefolder:PATH``.
        root: the data folder (``--data-dir``): Fashion-MNIST's IDX files (default
            ``/usr/share/datasets/fashion-mnist``) or the folder holding torchvision's CIFAR folder;
            unused for digits and image folders.

    Raises:
        ValueError: unknown name, or an image folder whose train and test classes differ.
        FileNotFoundError: the data is missing (the message says what to pass or install).
    """
    if name == "fashion-mnist":
        for train in (True, False):
            _fashion_mnist_paths(root if root is not None else DEFAULT_FASHION_MNIST_ROOT, train)
        return DatasetInfo(name, 1, 28, NUM_CLASSES[name])
    if name == "digits":
        return DatasetInfo(name, 1, 8, NUM_CLASSES[name])
    if name in CIFAR_MEAN_STD:
        _cifar_root(name, root)
        return DatasetInfo(name, 3, 32, NUM_CLASSES[name])
    if not is_dataset_name(name):
        raise _unknown_dataset(name)
    train, test = _imagefolder_splits(name)
    classes = _class_folders(train)
    if not classes:
        raise FileNotFoundError(f"{name}: {train} holds no class sub-folders")
    if _class_folders(test) != classes:
        raise ValueError(
            f"{name}: the class folders of {test} ({', '.join(_class_folders(test)) or 'none'}) differ from those of {train} "
            f"({', '.join(classes)}); both splits need the same classes"
        )
    return DatasetInfo(name, 3, None, len(classes))


def get_dataset(
    name: str, train: bool, root: str | os.PathLike[str] | None = None, transform: Callable | None = None
) -> Dataset:
    """Return one split of a dataset.

    Args:
        name: ``fashion-mnist``, ``digits``, ``cifar10``, ``cifar100`` or ``imagefolder:PATH``.
        train: training split (True) or test split (False).
        root: the data folder (see :func:`describe_dataset`).
        transform: the per-image transform of the torchvision datasets (CIFAR, image folders);
            None gives plain tensors in [0, 1]. The in-memory datasets take none.

    Returns:
        A ``TensorDataset`` of ``(images, labels)`` for Fashion-MNIST and digits (images already
        normalised), else the torchvision dataset.

    Raises:
        ValueError: unknown ``name``, or a transform for an in-memory dataset.
        FileNotFoundError: the data is missing.
    """
    if name in ("fashion-mnist", "digits"):
        if transform is not None:
            raise ValueError(f"{name} is held in memory as tensors and takes no per-image transform")
        if name == "fashion-mnist":
            x, y = load_fashion_mnist(root if root is not None else DEFAULT_FASHION_MNIST_ROOT, train=train)
        else:
            x, y = load_digits(train=train)
        return TensorDataset(x, y)
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    transform = transform if transform is not None else T.ToTensor()
    if name in CIFAR_MEAN_STD:
        root = _cifar_root(name, root)
        try:
            return _cifar_class(name)(str(root), train=train, transform=transform, download=False)
        except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted" (a file is missing or its md5 differs)
            raise ValueError(f"{root / _cifar_class(name).base_folder}: torchvision cannot read {name}: {exc}") from exc
    if not is_dataset_name(name):
        raise _unknown_dataset(name)
    train_dir, test_dir = _imagefolder_splits(name)
    return ImageFolder(str(train_dir if train else test_dir), transform=transform)


class BatchAdapter:
    """Fit a batch of in-memory images to the model: repeat a grey channel ``channels`` times, resize to ``size``.

    Applied to whole batches on the compute device (bilinear resizing, anti-aliased when shrinking).
    """

    def __init__(self, channels: int, size: int, source_size: int) -> None:
        self.channels = channels
        self.size = size
        self.source_size = source_size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        if self.size != self.source_size:
            x = functional.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=self.size < self.source_size
            )
        return x


class EpochSeededDataset(Dataset):
    """A dataset whose random per-image transform draws from a seed of ``(seed, epoch, index)``.

    The augmentation of every image is thus fixed by the run's seed, the epoch and the index
    alone: the same whichever worker process loads it and however many batches came before,
    so a resumed run sees the very images an uninterrupted one would. The global torch
    generator is left as it was (``torch.random.fork_rng``). Call :meth:`set_epoch` before
    each epoch.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1, np.uint64)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.dataset[index]


@dataclass
class Splits:
    """The data a training run sees.

    Attributes:
        train: training set; an :class:`EpochSeededDataset` where its transform is random.
        test: test set.
        num_classes: classes (logits of the model).
        channels: channels of the images the model sees.
        image_size: side of the square images the model sees, pixels.
        batch_adapter: transform of every batch on the compute device (in-memory datasets that need
            more channels or another size), or None.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    channels: int
    image_size: int
    batch_adapter: BatchAdapter | None


def _first(dataset: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(dataset):
        return dataset
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[:n] for t in dataset.tensors))
    return Subset(dataset, range(n))


def load_splits(
    info: DatasetInfo,
    root: str | os.PathLike[str] | None,
    channels: int,
    image_size: int,
    seed: int,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Splits:
    """Build the train and test sets of ``info`` for a model that takes ``channels`` x ``image_size`` x ``image_size``.

    Transforms:
        * Fashion-MNIST, digits: normalised tensors in memory; a :class:`BatchAdapter` repeats the
          grey channel and resizes when the model needs it.
        * CIFAR: train ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip``, both splits
          resized to ``image_size`` when it is not 32, then normalised with the dataset's mean and std.
        * image folders (RGB): train ``RandomResizedCrop(image_size)`` and ``RandomHorizontalFlip``;
          test resized to ``image_size / 0.875`` and centre-cropped; ImageNet mean and std.

    Random train transforms draw from ``(seed, epoch, index)`` (:class:`EpochSeededDataset`).
    ``max_train`` / ``max_test`` keep the first N samples of each split.
    """
    if info.name in ("fashion-mnist", "digits"):
        train = get_dataset(info.name, train=True, root=root)
        test = get_dataset(info.name, train=False, root=root)
        adapter = None  # both are grey-scale: the adapter repeats their one channel where the model takes more
        if channels != info.channels or image_size != info.image_size:
            adapter = BatchAdapter(channels, image_size, info.image_size)
        return Splits(_first(train, max_train), _first(test, max_test), info.num_classes, channels, image_size, adapter)

    from torchvision import transforms as T

    if channels != 3:
        raise ValueError(f"{info.name} has RGB images; the model must take 3 channels, not {channels}")
    if info.name in CIFAR_MEAN_STD:
        mean, std = CIFAR_MEAN_STD[info.name]
        resize = [T.Resize(image_size, antialias=True)] if image_size != info.image_size else []
        train_tf = T.Compose(
            [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *resize, T.ToTensor(), T.Normalize(mean, std)]
        )
        test_tf = T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])
    else:
        mean, std = IMAGENET_MEAN_STD
        train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
        test_tf = T.Compose(
            [
                T.Resize(round(image_size / CENTER_CROP_FRACTION), antialias=True),
                T.CenterCrop(image_size),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )
    train = EpochSeededDataset(_first(get_dataset(info.name, True, root, train_tf), max_train), seed)
    test = _first(get_dataset(info.name, False, root, test_tf), max_test)
    return Splits(train, test, info.num_classes, channels, image_size, None)
