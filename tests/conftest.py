"""Test set-up: Triton kernels run under the interpreter on CPU-only machines."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
