"""Helpers shared by the experiments: configs that use the per-sample update when the library has it."""

from __future__ import annotations

import dataclasses
from typing import Any

import fastanalog as fa

# Whether AnalogConfig has the ``update`` field ("per-sample" | "batch", SPEC section 2a).
HAS_UPDATE_MODE = "update" in {f.name for f in dataclasses.fields(fa.AnalogConfig)}
BATCH_MODE_UNAVAILABLE = "batch mode unavailable: this version of fastanalog has no AnalogConfig(update=...)"


def analog_config(algorithm: str, device: fa.ResponseDevice, *, update: str | None = None, **kwargs: Any) -> fa.AnalogConfig:
    """``AnalogConfig(algorithm, device, **kwargs)``; ``update`` is passed only when the library has that field.

    Asking for ``update="batch"`` where the field does not exist raises ValueError.
    """
    if update is not None:
        if not HAS_UPDATE_MODE:
            if update == "batch":
                raise ValueError(BATCH_MODE_UNAVAILABLE)
        else:
            kwargs["update"] = update
    return fa.AnalogConfig(algorithm=algorithm, device=device, **kwargs)


def update_mode_name() -> str:
    """The default update mode of this fastanalog (``per-sample`` or ``batch``)."""
    if HAS_UPDATE_MODE:
        return str(fa.AnalogConfig().update)
    return "batch"
