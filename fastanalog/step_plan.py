"""What AnalogSGD's eager step learns about its parameters once instead of at every step.

A step looks at every parameter: is it an analog layer's weight, of which layer, with which
config, which tensor id (the analog weights counted over all param groups) keys its random
numbers, and which of a group's analog tensors go into one call of the kernels. On resnet50
(161 tensors) that Python work took a tenth to a fifth of the time of SGD's whole step.
``StepPlan`` keeps the answers; each step first checks, in a pass of identity tests, that
they still hold (the same parameters in the same groups, each still the weight of the same
layer, tagged by the same reference and holding the same config object) and otherwise makes
a new plan.

The plan keeps no array: a step reads each layer's W, P, H and counters where they live, so
replacing or moving them (``.data =``, ``model.to``) needs no invalidation. Where a group's
analog tensors form one call of the compiled kernels (one config, dtype and device,
contiguous arrays of W's shape), :func:`fast_launch` prepares that call, without the
per-tensor checks of ``dispatch.analog_step_group``: the kernels check every array of the
call before they write any (sizes, dtypes, contiguity, overlap). Anything else takes the
general path, which gives the same numbers.
"""

from __future__ import annotations

import functools
import operator

import torch

from .nn.layers import module_attr
from .ops import library, philox, reference
from .ops.dispatch import _counter_views


def _tag(p: torch.Tensor):
    return getattr(p, "_fa_layer", None)


class StepPlan:
    """Per param group: its parameters, the analog ones with their layers and tensor ids, the rest.

    ``analog[i]``: ``(p, layer reference, config, tid)`` of group ``i``'s analog weights, in
    parameter order; ``digital[i]``: ``(p, layer reference or None, config or None)`` of its
    other parameters; ``single[i]``: the group's analog tensors share one config, dtype and
    device (one call of the kernels), so :func:`fast_launch` may serve them. Layers are held
    by the weak references their weights carry, so a plan keeps no replaced layer alive.
    """

    def __init__(self, param_groups: list[dict], layer_of) -> None:
        self.params = [list(g["params"]) for g in param_groups]
        self.tags = [[_tag(p) for p in ps] for ps in self.params]
        self.analog: list[list[tuple]] = []
        self.digital: list[list[tuple]] = []
        self.single: list[bool] = []
        tid = 0
        for ps in self.params:
            analog, digital = [], []
            for p in ps:
                layer = layer_of(p)
                config = None if layer is None else layer.analog_config
                if config is not None and config.is_analog:
                    analog.append((p, _tag(p), config, tid))
                    tid += 1
                else:
                    digital.append((p, _tag(p), config))
            self.analog.append(analog)
            self.digital.append(digital)
            self.single.append(len({(config, p.dtype, p.device) for p, _, config, _ in analog}) == 1)

    def holds(self, param_groups: list[dict]) -> bool:
        """Whether the plan still describes ``param_groups`` (identity tests only, nothing is hashed)."""
        if len(param_groups) != len(self.params):
            return False
        for group, ps, tags in zip(param_groups, self.params, self.tags):
            now = group["params"]
            if len(now) != len(ps) or not all(map(operator.is_, now, ps)) or not all(map(operator.is_, map(_tag, ps), tags)):
                return False
        for entries in (*self.analog, *self.digital):
            for p, ref, config, *_ in entries:
                if ref is None:  # no layer tag then, nor now (the tags are checked above)
                    continue
                layer = ref()
                owned = layer is not None and layer._parameters.get("weight") is p
                if owned != (config is not None) or (owned and layer.__dict__.get("analog_config") is not config):
                    return False
        return True


def fast_launch(entries: list[tuple], lr: float, seed: int, step: int, lasts: list[torch.Tensor]):
    """The analog update of one group's tensors ``(p, layer, tid, signal, A)`` as one call of the compiled kernels,
    ready to run (``lasts``: the layers' ``analog_last_pulses``, into which it adds the pulses); or None.

    None, having written nothing, where that call cannot serve them (another backend, a
    strided or misshapen array); the caller then takes the general path. The arrays go to
    the kernels in their own shapes (they address elements in memory order).
    """
    first = entries[0][1]
    config = first.analog_config
    algorithm = config.algorithm
    states = [layer.analog_state() for _, layer, _, _, _ in entries]  # what the general path reads
    W = [state["main"] for state in states]
    dtype, device = W[0].dtype, W[0].device
    if not all(w.dtype == dtype and w.device == device for w in W) or not library._eager_native(W[0], algorithm):
        return None  # e.g. one layer cast since the plan was made: the general path splits the call
    arrays: dict[str, list[torch.Tensor] | None] = {"main": W, "residual": None, "buffer": None, "weight": None}
    for n in reference.ALGORITHMS[algorithm].op_arrays[1:]:  # W's first
        role = library.STATE_NAMES[n]
        if role == "weight":  # the stored mixed weight, where the config keeps one
            found = [module_attr(layer, "analog_mixed") for _, layer, _, _, _ in entries]
            if all(t is None for t in found):
                continue
        else:
            found = [state[role] for state in states]
        if any(t is None for t in found):
            return None
        arrays[role] = found
    for ts in arrays.values():  # the general path copies strided arrays, and names a misshapen one
        if ts is not None and not all(t.is_contiguous() and t.shape == w.shape for t, w in zip(ts, W)):
            return None
    grads = [g if g.is_contiguous() else g.contiguous() for _, _, _, g, _ in entries]
    has_A = entries[0][4] is not None
    if any((A is not None) != has_A for *_, A in entries):
        return None
    As = [A if A.is_contiguous() else A.contiguous() for *_, A in entries] if has_A else None
    tids = [tid for _, _, tid, _, _ in entries]
    return functools.partial(
        library.step,
        algorithm,
        arrays,
        grads,
        lr=lr,
        config=config,
        keys=philox.step_keys(seed, step, tids),
        tensor_ids=tids,
        flag=reference.ALGORITHMS[algorithm].step_flag(config, step),
        As=As,
        native=True,
        counters=[_counter_views(last) for last in lasts],
    )
