"""Backend selection for the analog update.

Backends, each a set of launchers with the reference's signatures:

* ``reference`` - ``ops/reference.py``, plain PyTorch, any device (the oracle);
* ``cpp``       - the C++ extension's CPU kernels (``ops/cpp.py``);
* ``cuda``      - the C++ extension's CUDA kernels (``ops/cpp.py``);
* ``triton``    - fused Triton kernels (``ops/triton``), CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``.

Default: CUDA tensors use ``triton`` (else ``cuda``, else ``reference``); CPU tensors
``cpp`` (else ``reference``). ``FASTANALOG_BACKEND`` overrides the choice and fails
with a clear error when the named backend cannot serve a tensor.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import AnalogConfig
from . import reference
from .reference import StepPulses

BACKENDS = ("reference", "cpp", "cuda", "triton")


@dataclass(frozen=True)
class Backend:
    name: str
    asgd: Callable[..., StepPulses]
    rl: Callable[..., StepPulses]
    rl2: Callable[..., StepPulses]
    serves: Callable[[torch.Tensor], bool]


def _load(name: str) -> Backend | None:
    """The backend ``name``, or None where it is not built or not importable here."""
    if name == "reference":
        return Backend("reference", reference.asgd_step_ref, reference.rl_step_ref, reference.rl2_step_ref, lambda t: True)
    try:
        if name in ("cpp", "cuda"):
            mod = importlib.import_module(".cpp", __package__)
            available = mod.cpp_available() if name == "cpp" else mod.cuda_available()
            if not available:
                return None
            want = "cpu" if name == "cpp" else "cuda"
            return Backend(name, mod.asgd_step_cpp, mod.rl_step_cpp, mod.rl2_step_cpp, lambda t: t.device.type == want)
        if name == "triton":
            mod = importlib.import_module(".triton", __package__)
            interpret = os.environ.get("TRITON_INTERPRET") == "1"
            return Backend(
                "triton",
                mod.asgd_step_triton,
                mod.rl_step_triton,
                mod.rl2_step_triton,
                lambda t: t.device.type == "cuda" or (interpret and t.device.type == "cpu"),
            )
    except ImportError:
        return None
    raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


@functools.cache
def get_backend(name: str) -> Backend | None:
    return _load(name)


def available_backends() -> list[str]:
    """Names of the backends importable on this machine."""
    return [n for n in BACKENDS if get_backend(n) is not None]


def choose_backend(tensor: torch.Tensor) -> Backend:
    """The backend for ``tensor``: the ``FASTANALOG_BACKEND`` override, else the default."""
    forced = os.environ.get("FASTANALOG_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"FASTANALOG_BACKEND={forced!r} is not a backend: choose one of {', '.join(BACKENDS)}")
        backend = get_backend(forced)
        if backend is None:
            raise RuntimeError(
                f"FASTANALOG_BACKEND={forced!r} is not available on this machine (available: "
                f"{', '.join(available_backends())}); unset it or build the backend"
            )
        if not backend.serves(tensor):
            raise RuntimeError(
                f"FASTANALOG_BACKEND={forced!r} cannot update a {tensor.device.type} tensor; unset it or move the model"
            )
        return backend
    order = ("triton", "cuda", "reference") if tensor.device.type == "cuda" else ("cpp", "reference")
    for name in order:
        backend = get_backend(name)
        if backend is not None and backend.serves(tensor):
            return backend
    return get_backend("reference")


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
    backend = choose_backend(weight)
    # Flat views in logical (row-major) order: the random counter of an element is its
    # logical index whatever the memory layout (e.g. channels_last), so strided arrays
    # are updated through contiguous copies and written back.
    names = ("main", "residual", "buffer")
    flat = {n: _flat(arrays[n]) for n in names}
    wbar = _flat(weight)
    g = grad.reshape(-1).contiguous()
    common = dict(lr=lr, config=config, key=key, tensor_id=tensor_id)
    if config.algorithm == "asgd":
        out = backend.asgd(flat["main"], g, **common)
    elif config.algorithm == "rl":
        out = backend.rl(flat["main"], flat["residual"], wbar, g, transfer=step % config.transfer_every == 0, **common)
    elif config.algorithm == "rl2":
        out = backend.rl2(flat["main"], flat["residual"], flat["buffer"], wbar, g, **common)
    else:
        raise ValueError(f"analog_step got algorithm {config.algorithm!r}, which has no analog update")
    for n in names:
        _write_back(arrays[n], flat[n])
    _write_back(weight, wbar)
    return out


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    """A flat view of ``t`` if it is contiguous, else a flat contiguous copy."""
    if t is None:
        return None
    return t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)


def _write_back(t: torch.Tensor | None, flat: torch.Tensor | None) -> None:
    if t is not None and not t.is_contiguous():
        t.copy_(flat.view(t.shape))
