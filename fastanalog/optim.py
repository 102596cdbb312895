"""AnalogSGD: the analog update for analog tensors, plain SGD for the rest."""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.optimizer import Optimizer, required

from .config import AnalogConfig
from .nn.layers import module_attr
from .ops import cpp, philox
from .ops.dispatch import StepItem, analog_step_group
from .step_plan import StepPlan, fast_launch

NONFINITE_MODES = ("raise", "skip")


def _layer_of(p: torch.Tensor):
    ref = getattr(p, "_fa_layer", None)
    layer = ref() if ref is not None else None
    if layer is None or module_attr(layer, "weight") is not p:
        return None
    return layer


def _note_version(layer, version: int) -> None:
    """``layer._fa_version = version`` for a layer that has the attribute, without nn.Module's ``__setattr__``.

    The attribute is a plain int, which ``__setattr__`` (a Python call per layer and step) would
    store in the instance's ``__dict__`` all the same; only where it is not there does it go through it.
    """
    if "_fa_version" in layer.__dict__:
        layer.__dict__["_fa_version"] = version
    else:
        layer._fa_version = version


def _is_companion(p) -> bool:
    """Whether ``p`` is an analog layer's ``analog_abs`` (its gradient is A, read through the layer's weight)."""
    return getattr(p, "_fa_companion_of", None) is not None


def _excess_input(layer, grad: torch.Tensor, signal: torch.Tensor) -> torch.Tensor | None:
    """The per-sample sums the kernels take for ``signal`` (SPEC section 2a), or None (a batch write, e = 0).

    The kernels send ``e = lr * max(A - |signal|, 0) / 2`` pairs; with momentum or weight decay the
    signal is not the raw gradient S, and e must still be ``lr * max(A - |S|, 0) / 2``: they get
    ``max(A - |S|, 0) + |signal|`` then.
    """
    A = layer.sample_abs_grad()
    if A is None:
        return None
    if signal is grad:
        return A
    return (A - grad.abs()).clamp_(min=0).add_(signal.abs())


def _step_gradients(param_groups: list[dict]) -> list[torch.Tensor]:
    """The gradients a step checks and uses: those of its param groups' parameters that have one."""
    return [p.grad for g in param_groups for p in g["params"] if p.grad is not None]


def _all_finite(grads: list[torch.Tensor]) -> torch.Tensor | bool:
    """Whether every gradient is finite: a 0-dim bool tensor (on the first gradient's device), or
    a bool when the C++ kernels checked CPU gradients eagerly."""
    if not grads:
        return torch.ones((), dtype=torch.bool)
    where = grads[0].device
    if not torch.compiler.is_compiling() and all(g.device == where for g in grads):
        if where.type == "cpu":
            # One threaded pass of the C++ kernels over every gradient (exponent bits only).
            finite = cpp.all_finite_cpp(grads)
            if finite is not None:
                return finite
        # One fused pass: finite 2-norms prove every element finite. A non-finite norm may
        # also be an overflow of huge finite values, so only then check element by element.
        norms = torch.stack([n.float() for n in torch._foreach_norm(grads, 2)])
        if bool(norms.isfinite().all()):
            return torch.ones((), dtype=torch.bool)
    return torch.stack([torch.isfinite(g).all().to(where) for g in grads]).all()


# What _count_step adds to the counters: a step taken, a step skipped (one op each).
_ONE_STEP = (torch.tensor([1, 0]), torch.tensor([0, 1]))


def _count_step(counters: torch.Tensor, finite: bool, grads: list[torch.Tensor], skip: bool) -> bool:
    """Count a step in ``counters`` (``[steps, skipped steps]``); return whether it updates anything.

    With non-finite gradients the step is counted as skipped if ``skip``, else
    FloatingPointError is raised and nothing is counted.
    """
    if finite:
        counters.add_(_ONE_STEP[0])
        return True
    if skip:
        counters.add_(_ONE_STEP[1])
        return False
    bad = [tuple(g.shape) for g in grads if not torch.isfinite(g).all()]
    raise FloatingPointError(
        f"non-finite gradients in parameters of shapes {bad}; no array was changed. "
        "Fix the loss, or pass nonfinite='skip' to AnalogSGD to skip such steps"
    )


def _stepped_with_counters(launch, lasts: list[torch.Tensor], totals: list[torch.Tensor]) -> None:
    """Run ``launch()``, a step whose kernels add their pulses into ``lasts`` (the layers' ``analog_last_pulses``,
    zeroed first: index 0 W, 1 P), then add this step's pulses to ``totals`` (``analog_pulses``)."""
    torch._foreach_zero_(lasts)
    launch()
    torch._foreach_add_(totals, lasts)


# ----- the compiled step's ops ---------------------------------------------------------------
# Under torch.compile the step must not depend on Python values that change from step to
# step (the graph would be recompiled each step), nor branch on tensor values. So the
# gradient check and the analog update (whose Philox keys depend on the step number) run
# in two custom ops that read the step counter and the finite flag at run time.
_CONFIGS: list[AnalogConfig] = []
_HANDLES: dict[AnalogConfig, int] = {}


@torch.compiler.assume_constant_result
def _config_handle(config: AnalogConfig) -> int:
    """A small int naming ``config`` (equal configs, equal handles): ops take no Python objects."""
    handle = _HANDLES.get(config)
    if handle is None:
        handle = _HANDLES[config] = len(_CONFIGS)
        _CONFIGS.append(config)
    return handle


@torch.library.custom_op("fastanalog::analog_sgd_check_", mutates_args=("counters",))
def _check_op(finite: torch.Tensor, counters: torch.Tensor, grads: list[torch.Tensor], skip: bool) -> None:
    """The compiled step's gradient check: counts the step or the skipped step in ``counters``, or raises."""
    _count_step(counters, bool(finite), grads, skip)


@_check_op.register_fake
def _(finite, counters, grads, skip) -> None:
    return None


@torch.library.custom_op(
    "fastanalog::analog_sgd_update_", mutates_args=("main", "residual", "buffer", "weight", "last_pulses", "pulses")
)
def _update_op(
    main: list[torch.Tensor],
    residual: list[torch.Tensor],
    buffer: list[torch.Tensor],
    weight: list[torch.Tensor],
    signal: list[torch.Tensor],
    sums: list[torch.Tensor],
    last_pulses: list[torch.Tensor],
    pulses: list[torch.Tensor],
    counters: torch.Tensor,
    finite: torch.Tensor,
    config: int,
    tensor_ids: list[int],
    lr: float,
    seed: int,
) -> None:
    """The compiled step's analog update of tensors of one config (``config``: its handle); nothing unless ``finite``.

    Tensor ``i`` has arrays ``main[i]`` (W), ``residual[i]`` (P), ``buffer[i]`` (H) and
    stored mixed weight ``weight[i]`` where its algorithm and config have them (the lists
    are empty otherwise), gradient signal ``signal[i]``, per-sample sums ``sums[i]`` (an empty
    tensor: none, e = 0) and its layer's pulse counters; its key is
    ``step_key(seed, step, tensor_ids[i])`` with the step read from ``counters``. ``seed``
    comes as a signed 64-bit int.
    """
    if not bool(finite):
        return
    cfg = _CONFIGS[config]
    step = int(counters[0])
    keys = philox.step_keys(seed & philox.MASK64, step, tensor_ids)
    items = [
        StepItem(
            {"main": main[i], "residual": residual[i] if residual else None, "buffer": buffer[i] if buffer else None},
            weight[i] if weight else None,
            signal[i],
            cfg,
            keys[i],
            tid,
            sums[i] if sums[i].numel() else None,
            last_pulses[i],
        )
        for i, tid in enumerate(tensor_ids)
    ]
    _stepped_with_counters(functools.partial(analog_step_group, items, lr=lr, step=step, totals=True), list(last_pulses), list(pulses))


@_update_op.register_fake
def _(main, residual, buffer, weight, signal, sums, last_pulses, pulses, counters, finite, config, tensor_ids, lr, seed) -> None:
    return None


class AnalogSGD(Optimizer):
    """SGD whose analog parameters are written through their devices (SPEC section 3).

    Args:
        params: parameters or param groups, as for ``torch.optim.SGD``. The ``weight``
            of an analog layer gets its layer's configured analog update; every other
            parameter (and analog layers with ``algorithm="digital"``) plain SGD.
        lr: learning rate (> 0); read from the param group at each step, so lr
            schedulers work.
        momentum: momentum factor (>= 0). For analog tensors it shapes the gradient
            signal fed to the devices (a digital momentum buffer per tensor).
        weight_decay: L2 penalty (>= 0), added to the gradient of every parameter
            (for analog tensors: of the forward weight).
        seed: 64-bit seed of the pulse randomness; None draws one from torch's global
            generator (so ``torch.manual_seed`` makes runs repeatable).
        nonfinite: what a NaN/Inf gradient does: ``"raise"`` (default) raises
            ``FloatingPointError`` before any array or parameter is touched;
            ``"skip"`` skips that whole step (no array, counter or random stream
            advances) and counts it in ``skipped_steps``.

    Per-sample writes (``AnalogConfig(update="per-sample")``, the default; SPEC section 2a):
    the layer's backward leaves ``A = sum_b |g_b|`` in the gradient of its companion
    parameter ``analog_abs``, and the gradient-driven write carries the opposite-pulse pairs
    ``e = lr * max(A - |S|, 0) / 2`` on top of the net pulses (with momentum or weight decay,
    from the raw gradient S). Companions passed in ``params`` are left out of the param
    groups (they are read through their layer's weight), and ``zero_grad`` clears them. A
    weight whose gradient was set by hand, with no backward through its layer, has no A:
    its write has no pairs.

    The random stream of analog tensor ``t`` (its position among the analog weights,
    in param-group order) at step ``k`` (counting from 1) is keyed by
    ``step_key(seed, k, t)``; ``state_dict`` holds seed and step, so a resumed run
    continues the exact trajectory. The analog tensors of a param group are updated
    together (``dispatch.analog_step_group``): one launch per config, device and dtype
    where the backend has a multi-tensor launcher (C++ on CPU, Triton), and the pulse
    counters of all their layers in two foreach ops.

    ``torch.compile(..., fullgraph=True)`` can trace a whole training step with
    ``step()`` in it (dynamo needs ``torch._dynamo.config.trace_autograd_ops = True``
    to trace ``loss.backward()``; call ``zero_grad()`` outside). Traced, the step never
    branches on tensor values or on the step number: the gradient check is a flag
    tensor, every digital and momentum write is ``torch.where(finite, new, old)``, and
    two custom ops do at run time what the eager step does in Python:
    ``fastanalog::analog_sgd_check_`` counts the step (or the skipped step) in a counter
    tensor or raises the same ``FloatingPointError``, ``fastanalog::analog_sgd_update_``
    updates the analog tensors of one config with the keys of the counted step, or
    nothing on a skipped step. So ``nonfinite`` behaves as in eager mode and the step
    number never recompiles the graph (a new ``lr`` does, as for ``torch.optim`` with
    float learning rates, and so does the first step that creates momentum buffers).
    The analog arrays equal the eager run's; digital parameters may differ in the last
    bit, as compiled gradients do.
    """

    def __init__(self, params, lr=required, momentum: float = 0.0, weight_decay: float = 0.0, seed: int | None = None, nonfinite: str = "raise"):
        if lr is not required and (not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.seed = seed
        self.nonfinite = nonfinite
        # [steps taken, steps skipped]: a tensor, so that a compiled step reads and counts them at run time.
        self._counters = torch.zeros(2, dtype=torch.int64)
        self._planned = True  # False: every eager step takes the general path (benchmarks time the plan against it)

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; an analog layer's ``analog_abs`` (whose gradient is A,
        which the step reads through the layer's weight) is left out: it is not a parameter to update."""
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        else:
            params = list(params)
        kept = [p for p in params if not _is_companion(p)]
        if len(kept) != len(params) and not kept:
            return  # a group of companions only: nothing to update
        super().add_param_group({**param_group, "params": kept})

    def _analog_layers(self) -> list:
        """The analog layers whose weights this optimizer updates (each once)."""
        layers, seen = [], set()
        for group in self.param_groups:
            for p in group["params"]:
                layer = _layer_of(p)
                if layer is not None and layer.analog_config.is_analog and id(layer.weight) not in seen:
                    seen.add(id(layer.weight))
                    layers.append(layer)
        return layers

    def _sample_sums(self) -> list:
        """A of each analog layer (None where it has none)."""
        return [layer.sample_abs_grad() for layer in self._analog_layers()]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; also clears A (``analog_abs.grad``) of the analog layers."""
        super().zero_grad(set_to_none=set_to_none)
        for layer in self._analog_layers():
            companion = getattr(layer, "analog_abs", None)
            if companion is None or companion.grad is None:
                continue
            if set_to_none:
                companion.grad = None
            else:
                companion.grad.detach_().zero_()

    @property
    def step_count(self) -> int:
        """Steps taken (skipped steps not counted); the step key of the next step uses ``step_count + 1``."""
        return int(self._counters[0])

    @step_count.setter
    def step_count(self, value: int) -> None:
        self._counters[0] = int(value)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (``nonfinite="skip"``)."""
        return int(self._counters[1])

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._counters[1] = int(value)

    # ----- bookkeeping -----------------------------------------------------------------
    def _signal(self, p: torch.Tensor, layer, group, finite: torch.Tensor | None) -> torch.Tensor:
        """The gradient signal of ``p`` after weight decay and momentum (``finite``: the compiled step's flag).

        Weight decay of an analog tensor is the L2 penalty of its forward weight (``W + gamma * P`` for rl/rl2).
        """
        d_p = p.grad
        if group["weight_decay"] != 0:
            decayed = layer.forward_weight() if layer is not None and layer.analog_config.has_residual else p.detach()
            d_p = d_p.add(decayed, alpha=group["weight_decay"])
        if group["momentum"] != 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = d_p.detach().clone() if finite is None else torch.where(finite, d_p, torch.zeros_like(d_p))
                state["momentum_buffer"] = buf
            elif finite is None:
                buf.mul_(group["momentum"]).add_(d_p)
            else:
                buf.copy_(torch.where(finite, buf * group["momentum"] + d_p, buf))
            d_p = buf
        return d_p

    # ----- the step --------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # A (the per-sample sums) is not checked: it is finite wherever the gradient is (a NaN
        # product is NaN in the gradient too), except where a sum of finite products overflows,
        # and a write takes an infinite A as capped pairs and a NaN one (set by hand) as none.
        grads = _step_gradients(self.param_groups)
        skip = self.nonfinite == "skip"
        if torch.compiler.is_compiling():
            finite = _all_finite(grads)
            torch.ops.fastanalog.analog_sgd_check_(finite, self._counters, grads, skip)
        else:
            finite = None
            if not _count_step(self._counters, bool(_all_finite(grads)), grads, skip):
                return loss
        tid = 0
        plan = self._step_plan() if finite is None else None
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            analog, digital, signals = [], [], []
            if plan is not None:
                self._planned_signals(plan, gi, group, analog, digital, signals)
            else:
                for p in group["params"]:
                    layer = _layer_of(p)
                    is_analog = layer is not None and layer.analog_config.is_analog
                    grad = p.grad
                    if grad is not None:
                        d_p = self._signal(p, layer, group, finite)
                        if is_analog:
                            analog.append((p, layer, tid, d_p, _excess_input(layer, grad, d_p)))
                        elif finite is None:
                            digital.append(p)
                            signals.append(d_p)
                        else:
                            p.copy_(torch.where(finite, p.add(d_p, alpha=-lr), p))
                    tid += is_analog
            if digital:
                if lr > 65504.0 and any(p.dtype == torch.float16 for p in digital):
                    # alpha must be representable in the tensors' dtype; multiply first (overflow is then inf, as in SGD's math).
                    torch._foreach_add_(digital, torch._foreach_mul(signals, -lr))
                else:
                    torch._foreach_add_(digital, signals, alpha=-lr)
            if not analog:
                continue
            if finite is None:
                self._analog_update(analog, lr, single=plan is not None and plan.single[gi])
            else:
                self._traced_analog_update(analog, lr, finite)
        return loss

    def _step_plan(self) -> StepPlan | None:
        """The plan of the eager step (see ``fastanalog.step_plan``), made anew where the parameters changed;
        None where ``_planned`` is off."""
        if not getattr(self, "_planned", True):
            return None
        plan = getattr(self, "_plan", None)
        if plan is None or not plan.holds(self.param_groups):
            plan = self._plan = StepPlan(self.param_groups, _layer_of)
        return plan

    def _planned_signals(self, plan: StepPlan, gi: int, group: dict, analog: list, digital: list, signals: list) -> None:
        """The eager step's loop over group ``gi``'s parameters that have a gradient, from the plan: the analog
        tensors ``(param, layer, tensor id, signal, A)`` into ``analog``, the others and their signals into
        ``digital`` and ``signals``."""
        plain = group["weight_decay"] == 0 and group["momentum"] == 0
        for p, ref, _, tid in plan.analog[gi]:
            grad = p.grad
            if grad is not None:
                layer = ref()
                d_p = grad if plain else self._signal(p, layer, group, None)
                analog.append((p, layer, tid, d_p, _excess_input(layer, grad, d_p)))
        for p, ref, config in plan.digital[gi]:
            grad = p.grad
            if grad is not None:
                digital.append(p)
                signals.append(grad if plain else self._signal(p, None if config is None else ref(), group, None))

    def _analog_update(self, analog: list, lr: float, single: bool = False) -> None:
        """The analog tensors ``(param, layer, tensor id, signal, A)`` of one param group, eagerly (``single``:
        they share one config, dtype and device, so that one call of the kernels may serve them)."""
        k = self.step_count
        layers = [entry[1] for entry in analog]
        for layer in layers:
            version = module_attr(layer, "weight")._version
            if getattr(layer, "_fa_version", None) not in (None, version):
                # W was written since the layer's last forward, not by us: say so before the update clips it.
                _note_version(layer, version)
                layer.check_range("(W was changed outside AnalogSGD: by hand or by another optimizer)")
        # The layers' counters, each looked up once (``module_attr``: no nn.Module.__getattr__).
        lasts = [module_attr(layer, "analog_last_pulses") for layer in layers]
        totals = [module_attr(layer, "analog_pulses") for layer in layers]
        launch = fast_launch(analog, lr, self.seed, k, lasts) if single else None
        if launch is None:
            keys = philox.step_keys(self.seed, k, [entry[2] for entry in analog])
            items = [
                StepItem(layer.analog_state(), module_attr(layer, "analog_mixed"), d_p, layer.analog_config, key, tid, A, last)
                for (_, layer, tid, d_p, A), key, last in zip(analog, keys, lasts)
            ]
            launch = functools.partial(analog_step_group, items, lr=lr, step=k, totals=True)
        _stepped_with_counters(launch, lasts, totals)
        for layer in layers:
            # Our own writes (a backend may write through copy_) are not edits by someone else.
            if hasattr(layer, "_fa_version"):
                _note_version(layer, module_attr(layer, "weight")._version)

    def _traced_analog_update(self, analog: list, lr: float, finite: torch.Tensor) -> None:
        """The same under torch.compile: one ``fastanalog::analog_sgd_update_`` per config of the group."""
        by_config: dict[int, list] = {}
        for entry in analog:
            by_config.setdefault(_config_handle(entry[1].analog_config), []).append(entry)
        seed = self.seed - 2**64 if self.seed >= 2**63 else self.seed
        for handle, entries in by_config.items():
            config = entries[0][1].analog_config
            states = [entry[1].analog_state() for entry in entries]
            torch.ops.fastanalog.analog_sgd_update_(
                [s["main"] for s in states],
                [s["residual"] for s in states] if config.has_residual else [],
                [s["buffer"] for s in states] if config.has_buffer else [],
                [entry[1].analog_mixed for entry in entries] if entries[0][1].analog_mixed is not None else [],
                [entry[3] for entry in entries],
                [entry[4] if entry[4] is not None else entry[3].new_empty(0) for entry in entries],
                [entry[1].analog_last_pulses for entry in entries],
                [entry[1].analog_pulses for entry in entries],
                self._counters,
                finite,
                handle,
                [entry[2] for entry in entries],
                lr,
                seed,
            )

    # ----- checkpoints ----------------------------------------------------------------
    def __getstate__(self):
        """torch's Optimizer pickles its defaults, state and groups only; the seed, the step counters and
        ``nonfinite`` go along (``copy.deepcopy`` and ``pickle`` of an AnalogSGD continue its trajectory)."""
        return {**super().__getstate__(), "seed": self.seed, "nonfinite": self.nonfinite, "_counters": self._counters}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite", "raise")
        self.__dict__.setdefault("_counters", torch.zeros(2, dtype=torch.int64))
        self._plan = None

    def state_dict(self):
        sd = super().state_dict()
        sd["fastanalog"] = {"seed": self.seed, "step": self.step_count, "skipped_steps": self.skipped_steps}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("fastanalog", None)
        if extra is None:
            raise ValueError("this optimizer state_dict has no 'fastanalog' entry: it was not saved by AnalogSGD")
        super().load_state_dict(state_dict)
        self.seed = int(extra["seed"])
        self.step_count = int(extra["step"])
        self.skipped_steps = int(extra.get("skipped_steps", 0))
