"""``fastanalog reproduce``: the paper's experiments, run with fastanalog, written up as a report.

- :mod:`.theory`: the scalar experiments (Theorem 1's fixed point, Theorem 3's convergence,
  zero-shift, the mixing weight gamma), run by the engine's own kernels.
- :mod:`.training`: one accuracy run per :class:`~.training.Job`, in worker processes.
- :mod:`.experiments`: the full and ``--quick`` settings and the runner.
- :mod:`.report`: ``REPORT.md``, CSV tables, PNG figures, ``summary.json``.
- :mod:`.cli`: the command line.
"""

from .cli import main

__all__ = ["main"]
