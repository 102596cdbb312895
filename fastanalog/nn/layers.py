"""Analog layers: nn.Linear / nn.Conv1d / nn.Conv2d whose weights live on devices.

Each analog layer is a subclass of its digital twin, so ``repr``, ``torch.compile``,
DDP and every nn argument behave unchanged. The parameter ``weight`` is the main array
W for every algorithm; its gradient is the gradient at the forward weight. For
``asgd`` and ``digital`` forward uses W itself, for ``rl``/``rl2`` the mixed weight
``W + gamma * P``, which ``AnalogConfig.mixed_weight`` keeps in one of two ways:

* ``"transient"`` (default): forward computes it and autograd keeps nothing of it; the
  backward pass that needs it computes it again. Training then holds W, P (and H) and
  nothing else per analog tensor.
* ``"stored"``: AnalogSGD's kernels write it in the same pass as the update, into the
  buffer ``analog_mixed`` (not saved in ``state_dict``: it follows from W and P): one more
  array in memory, no work in forward and backward.

The analog arrays are buffers of the layer, so ``model.state_dict()`` alone restores a
model:

* ``weight``          W (a parameter)
* ``analog_residual`` P, stored zero-shifted (rl, rl2)
* ``analog_buffer``   H, the digital transfer buffer (rl2)
* ``analog_pulses``   int64 ``[pulses to W, pulses to P]`` written so far
* ``analog_last_pulses`` the same for the last step
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AnalogConfig
from ..ops import dispatch


class _Mix(torch.autograd.Function):
    """``W + gamma * P`` as the kernels round it; the gradient goes to W (d(W + gamma P)/dW = 1)."""

    @staticmethod
    def forward(ctx, main, residual, gamma):
        return dispatch.mixed_weight(main, residual, gamma)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _StoredMix(torch.autograd.Function):
    """The stored mixed weight (``analog_mixed``), with its gradient passed to W."""

    @staticmethod
    def forward(ctx, main, mixed):
        return mixed.view_as(mixed)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Recompute:
    """What autograd keeps in place of a saved mixed weight (or a view of it): how to compute it again."""

    __slots__ = ("main", "residual", "gamma", "size", "stride", "offset", "needed")

    def __init__(self, main, residual, gamma, t: torch.Tensor, needed: bool):
        self.main, self.residual, self.gamma = main, residual, gamma
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()
        self.needed = needed

    def tensor(self) -> torch.Tensor:
        if not self.needed:
            # The weight only ever enters the input's gradient, and the input needs none: autograd
            # unpacks it all the same, so hand it a NaN stand-in of the right shape (no work, and
            # loud if anything ever read it).
            return torch.full((), float("nan"), dtype=self.main.dtype, device=self.main.device).expand(self.size)
        if torch.is_grad_enabled():  # double backward: keep the path to W
            mixed = _Mix.apply(self.main, self.residual, self.gamma)
        else:
            mixed = dispatch.mixed_weight(self.main, self.residual, self.gamma)
        return mixed.as_strided(self.size, self.stride, self.offset)


def _run_transient(run, x, main, residual, gamma):
    """``run(x, W + gamma * P)`` with autograd keeping a recipe instead of the mixed weight."""
    mixed = _Mix.apply(main, residual, gamma)
    if not torch.is_grad_enabled() or not mixed.requires_grad:
        return run(x, mixed)
    storage = mixed.untyped_storage().data_ptr()
    needed = x.requires_grad  # the weight enters only the input's gradient (linear and conv alike)

    def pack(t):
        if t.layout == torch.strided and t.device == main.device and t.untyped_storage().data_ptr() == storage:
            return _Recompute(main, residual, gamma, t, needed)
        return t

    def unpack(saved):
        return saved.tensor() if isinstance(saved, _Recompute) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return run(x, mixed)


class AnalogLayerMixin:
    """State and helpers shared by every analog layer."""

    analog_config: AnalogConfig

    def _init_analog(self, config: AnalogConfig | None) -> None:
        config = config if config is not None else AnalogConfig()
        if not isinstance(config, AnalogConfig):
            raise TypeError(f"config must be a fastanalog.AnalogConfig, got {config!r}")
        self.analog_config = config
        weight: nn.Parameter = self.weight
        with torch.no_grad():
            if config.is_analog:
                dev = config.device
                clipped = int(((weight < dev.tau_min) | (weight > dev.tau_max)).sum())
                if clipped:
                    warnings.warn(
                        f"{clipped} of {weight.numel()} weights of {type(self).__name__}{tuple(weight.shape)} lie outside the "
                        f"device range [{dev.tau_min}, {dev.tau_max}] and were clipped to it; use a device with a wider tau",
                        stacklevel=3,
                    )
                    weight.clamp_(dev.tau_min, dev.tau_max)
        if config.has_residual:
            self.register_buffer("analog_residual", torch.zeros_like(weight.detach()))
        else:
            self.analog_residual = None
        if config.has_buffer:
            self.register_buffer("analog_buffer", torch.zeros_like(weight.detach()))
        else:
            self.analog_buffer = None
        if self._stores_mixed():
            self.register_buffer("analog_mixed", torch.empty_like(weight.detach()), persistent=False)
            self.refresh_weight()
        else:
            self.analog_mixed = None
        self.register_buffer("analog_pulses", torch.zeros(2, dtype=torch.int64, device=weight.device))
        self.register_buffer("analog_last_pulses", torch.zeros(2, dtype=torch.int64, device=weight.device))
        self.register_load_state_dict_pre_hook(_upgrade_state_dict)
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self._tag_weight()

    def _stores_mixed(self) -> bool:
        cfg = self.analog_config
        return cfg.has_residual and cfg.gamma != 0 and cfg.mixed_weight == "stored"

    def _tag_weight(self) -> None:
        # AnalogSGD finds the layer (and so its arrays and config) through the parameter.
        self.weight._fa_layer = weakref.ref(self)

    def __setstate__(self, state):  # pickling and deepcopy make a new Parameter
        super().__setstate__(state)
        self._tag_weight()

    def analog_state(self) -> dict[str, torch.Tensor | None]:
        """The live arrays (not copies): ``main`` (W, the data of ``weight``), ``residual`` (P or None), ``buffer`` (H or None)."""
        return {"main": self.weight.data, "residual": self.analog_residual, "buffer": self.analog_buffer}

    @torch.no_grad()
    def forward_weight(self) -> torch.Tensor:
        """The weight forward uses (a new tensor): ``W + gamma * P`` for rl/rl2, else W."""
        cfg = self.analog_config
        if not cfg.has_residual or cfg.gamma == 0:
            return self.weight.detach().clone()
        return dispatch.mixed_weight(self.weight.detach(), self.analog_residual, cfg.gamma)

    @torch.no_grad()
    def refresh_weight(self) -> None:
        """Rewrite the stored mixed weight (``mixed_weight="stored"``) from W and P; needed only after editing them by hand."""
        if self._stores_mixed():
            self.analog_mixed.copy_(self.forward_weight())

    def _forward_with(self, run, x: torch.Tensor) -> torch.Tensor:
        """``run(x, forward weight)``, the gradient at the forward weight landing in ``weight.grad``."""
        cfg = self.analog_config
        if not cfg.has_residual or cfg.gamma == 0:
            return run(x, self.weight)
        if self.analog_mixed is not None:
            return run(x, _StoredMix.apply(self.weight, self.analog_mixed))
        if torch.compiler.is_compiling():
            # Traced: no saved-tensor hooks; the compiler's partitioner chooses what to keep.
            return run(x, _Mix.apply(self.weight, self.analog_residual, cfg.gamma))
        return _run_transient(run, x, self.weight, self.analog_residual, cfg.gamma)

    def extra_repr(self) -> str:
        cfg = self.analog_config
        return f"{super().extra_repr()}, algorithm={cfg.algorithm}, device={type(cfg.device).__name__}"


def _upgrade_state_dict(module, state_dict, prefix, *args) -> None:
    """Read state dicts of the earlier layout (W in ``analog_main``, the mixed weight in ``weight``)."""
    old = prefix + "analog_main"
    if old in state_dict:
        state_dict[prefix + "weight"] = state_dict.pop(old)


def _refresh_after_load(module, incompatible_keys) -> None:
    module.refresh_weight()


class AnalogLinear(AnalogLayerMixin, nn.Linear):
    """``nn.Linear`` on analog devices. ``AnalogLinear(in, out, bias=True, config=AnalogConfig(...))``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, config: AnalogConfig | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_analog(config)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._forward_with(lambda x, w: F.linear(x, w, self.bias), input)


class AnalogConv1d(AnalogLayerMixin, nn.Conv1d):
    """``nn.Conv1d`` on analog devices; all nn.Conv1d arguments plus ``config``."""

    def __init__(self, *args, config: AnalogConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_analog(config)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._forward_with(lambda x, w: self._conv_forward(x, w, self.bias), input)


class AnalogConv2d(AnalogLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` on analog devices; all nn.Conv2d arguments plus ``config``."""

    def __init__(self, *args, config: AnalogConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_analog(config)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._forward_with(lambda x, w: self._conv_forward(x, w, self.bias), input)


# Subclasses whose forward differs only in scripting details, converted like their base.
_EQUIVALENT_SUBCLASSES = {"timm.layers.linear.Linear"}
_DIGITAL_TO_ANALOG = {nn.Linear: AnalogLinear, nn.Conv1d: AnalogConv1d, nn.Conv2d: AnalogConv2d}


def _analog_class(module: nn.Module):
    """The analog class for ``module``, or None. Subclasses qualify only if they keep the base forward."""
    if isinstance(module, AnalogLayerMixin):
        return None
    for base, analog in _DIGITAL_TO_ANALOG.items():
        if isinstance(module, base):
            cls = type(module)
            if cls.forward is base.forward or f"{cls.__module__}.{cls.__qualname__}" in _EQUIVALENT_SUBCLASSES:
                return analog
            return False
    return None


def _convert_one(module: nn.Module, config: AnalogConfig) -> nn.Module:
    cls = _analog_class(module)
    w = module.weight
    if cls is AnalogLinear:
        new = AnalogLinear.__new__(AnalogLinear)
        nn.Linear.__init__(new, module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    else:
        new = cls.__new__(cls)
        base = nn.Conv1d if cls is AnalogConv1d else nn.Conv2d
        base.__init__(
            new,
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            device="meta",
        )
    # Keep the original tensors' values, dtype and device; fresh Parameters so the
    # original model is left untouched.
    new.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
    if module.bias is not None:
        new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
    new.train(module.training)
    new._init_analog(config)
    return new


def _matches(name: str, patterns) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def convert_to_analog(
    model: nn.Module, config: AnalogConfig | None = None, include: list[str] | None = None, exclude: list[str] | None = None
) -> nn.Module:
    """Swap every nn.Linear / nn.Conv1d / nn.Conv2d of ``model`` for its analog twin, in place.

    Weights are kept (clipped to the device range, with a warning, where they exceed
    it); biases, norms and everything else stay digital. ``include``/``exclude`` are
    lists of glob patterns on module names (``"head"``, ``"blocks.*.attn.*"``); a layer
    is converted when it matches some include pattern (all, if None) and no exclude
    pattern. A subclass that overrides forward (e.g. a "same"-padding conv) is left
    digital with a warning. Returns ``model`` (or the new layer if ``model`` itself is one).
    """
    config = config if config is not None else AnalogConfig()
    if not isinstance(config, AnalogConfig):
        raise TypeError(f"config must be a fastanalog.AnalogConfig, got {config!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for kind, pats in (("include", include), ("exclude", exclude)):
        if pats is not None and (isinstance(pats, str) or not all(isinstance(p, str) for p in pats)):
            raise TypeError(f"{kind} must be a list of glob patterns (strings), got {pats!r}")

    def wanted(name: str) -> bool:
        if include is not None and not _matches(name, include):
            return False
        return not (exclude is not None and _matches(name, exclude))

    if _analog_class(model) and wanted(""):
        return _convert_one(model, config)
    skipped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            cls = _analog_class(child)
            if cls is None or not wanted(full):
                continue
            if cls is False:
                skipped.append(f"{full} ({type(child).__name__})")
                continue
            setattr(parent, child_name, _convert_one(child, config))
    if skipped:
        warnings.warn(
            "left digital because their class overrides forward: " + ", ".join(skipped) + "; exclude them to silence this",
            stacklevel=2,
        )
    return model


def analog_layers(model: nn.Module):
    """Yield ``(name, layer)`` for every analog layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AnalogLayerMixin):
            yield name, module


def total_pulses(model: nn.Module) -> int:
    """Pulses written to all analog arrays of ``model`` so far (a proxy for write energy)."""
    return int(sum(int(layer.analog_pulses.sum()) for _, layer in analog_layers(model)))
