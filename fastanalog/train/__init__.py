"""Training front end: datasets, reference models and the ``fastanalog train`` launcher (loop, checkpoints, DDP, run folder)."""

from .data import get_dataset, load_digits, load_fashion_mnist, read_idx
from .models import MLP, SmallCNN, build_model

__all__ = ["MLP", "SmallCNN", "build_model", "get_dataset", "load_digits", "load_fashion_mnist", "read_idx"]
