"""Whole-model benchmarks: ``fastanalog bench step|train|aihwkit|kernels`` (see :mod:`fastanalog.bench.cli`).

``add_parser``, ``build_parser``, ``main`` and ``run`` are those of :mod:`fastanalog.bench.cli`,
imported on first use (so ``python -m fastanalog.bench.cli`` runs the module fresh).
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_parser", "build_parser", "main", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import cli

        return getattr(cli, name)
    raise AttributeError(f"module 'fastanalog.bench' has no attribute {name!r}")
