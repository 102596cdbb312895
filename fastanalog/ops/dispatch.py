"""Backend selection for the analog update of one tensor.

``analog_step`` applies one optimizer step of one analog tensor in place. The
backend is chosen per tensor: ``FASTANALOG_BACKEND`` (``reference``, or a fast
backend once built) overrides the default, with a clear error when the chosen
backend cannot serve the tensor.
"""

from __future__ import annotations

import os

import torch

from ..config import AnalogConfig
from .reference import StepPulses, asgd_step_ref, rl2_step_ref, rl_step_ref

BACKENDS = ("reference",)


def choose_backend(tensor: torch.Tensor) -> str:
    """The backend for ``tensor``: the ``FASTANALOG_BACKEND`` override, else the default."""
    name = os.environ.get("FASTANALOG_BACKEND", "").strip().lower() or "reference"
    if name not in BACKENDS:
        raise ValueError(f"FASTANALOG_BACKEND={name!r} is not available here: choose one of {', '.join(BACKENDS)}")
    return name


def analog_step(
    arrays: dict[str, torch.Tensor | None],
    weight: torch.Tensor,
    grad: torch.Tensor,
    *,
    lr: float,
    config: AnalogConfig,
    key: int,
    tensor_id: int,
    step: int,
) -> StepPulses:
    """One step of ``config.algorithm`` on one tensor; arrays are updated in place.

    ``arrays`` is a layer's ``analog_state()``; ``weight`` the forward weight
    (written with ``W + gamma * P`` for rl/rl2); ``step`` counts from 1.
    """
    choose_backend(weight)
    g = grad.reshape(-1)
    W = arrays["main"].view(-1)
    common = dict(lr=lr, config=config, key=key, tensor_id=tensor_id)
    if config.algorithm == "asgd":
        return asgd_step_ref(W, g, **common)
    P = arrays["residual"].view(-1)
    Wbar = weight.view(-1)
    if config.algorithm == "rl":
        return rl_step_ref(W, P, Wbar, g, transfer=step % config.transfer_every == 0, **common)
    if config.algorithm == "rl2":
        return rl2_step_ref(W, P, arrays["buffer"].view(-1), Wbar, g, **common)
    raise ValueError(f"analog_step got algorithm {config.algorithm!r}, which has no analog update")
