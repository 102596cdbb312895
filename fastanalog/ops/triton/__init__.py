"""Fused Triton kernels of the analog update: one kernel for asgd, rl and rl2 (``step``), its launchers (``ops``).

Each launcher has the signature of its reference twin in ``fastanalog.ops.reference``
(the excess input ``A=None`` included) and returns the same ``StepPulses``; with
``totals=True`` it reports per written array the sum of ``N_up + N_down`` as a 0-d int64
tensor, reduced in the kernel, instead of per-element counts. Random numbers follow SPEC
section 4 (per stream one Philox call per four elements). Its multi-tensor twin
(``*_multi_step_triton``) takes lists, one entry per tensor (``As=None`` for the excess
inputs), and updates all tensors of one config in one launch, each as the single-tensor
launcher would. ``step_triton`` and ``multi_step_triton`` do the same for any algorithm of
``reference.ALGORITHMS`` by name, its arrays by SPEC's names. The launchers are the CUDA implementation of the per-algorithm ops
``fastanalog::{asgd,rl,rl2}_step`` (``fastanalog/ops/library.py``), the ops that
``torch.compile`` traces; they are no ops of their own. Launches run with their tensors' CUDA device
current. On CPU tensors the kernels run only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported); their home is CUDA tensors.
"""

from .ops import (
    asgd_multi_step_triton,
    asgd_step_triton,
    multi_step_triton,
    rl2_multi_step_triton,
    rl2_step_triton,
    rl_multi_step_triton,
    rl_step_triton,
    step_triton,
)

__all__ = [
    "asgd_multi_step_triton",
    "asgd_step_triton",
    "multi_step_triton",
    "rl2_multi_step_triton",
    "rl2_step_triton",
    "rl_multi_step_triton",
    "rl_step_triton",
    "step_triton",
]
