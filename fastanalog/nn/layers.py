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
* ``analog_scale``    the digital per-output-channel scale ``s`` (float32; not for ``digital``)
* ``analog_pulses``   int64 ``[pulses to W, pulses to P]`` written so far
* ``analog_last_pulses`` the same for the last step

With ``AnalogConfig(update="per-sample")`` (the default) the layer also has the parameter
``analog_abs``, W's companion: its data is never read, and backward writes into its
``.grad`` the per-element sum over samples of the absolute weight gradients,
``A = sum_b |g_b|`` (SPEC section 2a; for a linear layer ``A = |D|^T |X|`` over all rows,
for a convolution the weight gradient of ``|x|`` and ``|d|``, every output position a
sample), which AnalogSGD turns into the opposite-pulse pairs of the per-sample write.
Being a gradient, A is accumulated over several backward calls, cleared by ``zero_grad``
and reduced by DDP exactly as ``weight.grad`` is. It is not saved in ``state_dict`` (a
gradient is not state) and AnalogSGD does not treat it as a parameter of its own.

Weights in digital units ``w`` are mapped onto the devices as ``W = w / s`` (SPEC
section 7, ``AnalogConfig.weight_scaling``): the layer computes ``y = s * (x @ Wbar^T) + b``
(convolutions likewise, ``s`` per output channel), ``Wbar`` the forward weight above. The
scale is chosen when weights enter a layer: its own initialisation, ``convert_to_analog``,
``load_state_dict`` of a digital checkpoint (a layer's entry with ``weight`` and no
``analog_*`` key) and ``set_digital_weight``; it is not trained. ``weight.grad`` is the
gradient of W in device units, ``s_c`` times the gradient of ``w_c``, so an optimizer step
``-lr * grad`` on W moves ``w_c`` by ``-lr * s_c**2 * dL/dw_c``: a scaled channel trains like
a digital one with learning rate ``lr * s_c**2``. With the default ``"fit"`` every channel
that fits the device range has ``s_c = 1`` and the layer is exactly the unscaled one (forward
then skips the multiplication). An analog state dict restores ``s`` exactly; one saved
before the scale existed loads with ``s = 1``. Weights that leave the device range other
than through AnalogSGD (``load_state_dict`` of an analog state dict, edits under
``torch.no_grad()``, another optimizer) get a warning naming the layer instead of a silent
clip at the next analog update.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AnalogConfig
from ..ops import cpp, dispatch


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


def sample_abs_dtype(device: torch.device, dtype: torch.dtype, conv: bool = False) -> torch.dtype:
    """The dtype of the factors ``|d|`` and ``|x|`` of the per-sample sums ``A`` (``conv``: of a convolution).

    Half-precision activations (autocast, a bf16 model) are used as they are. Otherwise
    bfloat16 on CUDA devices that support it (tensor cores), and for linear layers on CPUs
    with AMX or AVX512-BF16, where A is then the float32 sum of the exact products of the
    bfloat16 factors (oneDNN's micro-kernel, :func:`fastanalog.ops.cpp.abs_outer_bf16`);
    float32 elsewhere (a CPU convolution would round A itself to bfloat16, and then DDP
    ranks would no longer add up to one rank with the whole batch within float rounding;
    the convolutions that :func:`_mixed_conv_wins` picks, 1x1 kernels and few output
    positions, are the exception: on such CPUs their A is the same mixed-precision product
    as a linear layer's, see :func:`sample_abs_sums`). ``FASTANALOG_SAMPLE_DTYPE=float32|bfloat16``
    overrides the choice. A only sets the opposite-pulse pairs ``e`` (relative error 2**-8
    in bfloat16), never the net update.
    """
    forced = _forced_sample_dtype()
    if forced is not None:
        return forced
    if dtype in (torch.bfloat16, torch.float16):
        return dtype
    if dtype != torch.float32:  # a float64 model: float32 sums, as on any machine
        return torch.float32
    if device.type == "cuda" and _cuda_bf16():
        return torch.bfloat16
    if device.type == "cpu" and not conv and _cpu_bf16_gemm():
        return torch.bfloat16
    return torch.float32


def _forced_sample_dtype() -> torch.dtype | None:
    """The dtype ``FASTANALOG_SAMPLE_DTYPE`` asks for, or None."""
    forced = os.environ.get("FASTANALOG_SAMPLE_DTYPE", "").strip().lower()
    if not forced:
        return None
    if forced not in ("float32", "bfloat16"):
        raise ValueError(f"FASTANALOG_SAMPLE_DTYPE={forced!r}: choose float32 or bfloat16")
    return getattr(torch, forced)


@torch.compiler.assume_constant_result
def _cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@torch.compiler.assume_constant_result
def _cpu_bf16_gemm() -> bool:
    """Whether this CPU multiplies bfloat16 fast (oneDNN's AMX or AVX512-BF16 micro-kernel, built here)."""
    return cpp.bf16_amx_available()


def _abs_in(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``|t|`` in ``dtype`` (one new tensor)."""
    cast = t.to(dtype)
    return cast.abs_() if cast is not t else t.abs()


# Input dtypes of the mixed-precision product.
_MIXED_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


def _mixed_fits(d: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether :func:`fastanalog.ops.cpp.abs_outer_bf16` takes these factors (built here, 32-bit sizes)."""
    most = cpp.ABS_OUTER_MAX
    return d.numel() <= most and x.numel() <= most and d.shape[1] * x.shape[1] <= most and _bf16_gemm_built()


@torch.compiler.assume_constant_result
def _bf16_gemm_built() -> bool:
    return cpp.bf16_gemm_available()


def sample_abs_sums(d: torch.Tensor, x: torch.Tensor, weight_shape, geometry, dtype: torch.dtype) -> torch.Tensor:
    """``A = sum_b |g_b|`` of a layer (SPEC section 2a), in ``dtype``: the weight gradient of ``|x|`` and ``|d|``.

    ``d`` is the gradient of the layer's output (bias-free and unscaled: whatever multiplies
    it afterwards is inside ``d``), ``x`` its input; every row of a linear layer and every
    output position of a convolution is a sample. ``geometry`` is None for a linear layer,
    else the convolution's ``(stride, padding, dilation, groups, pad, padding_mode)`` with
    ``pad`` the explicit padding of ``F.pad`` for string paddings and padding modes other
    than zeros (None otherwise).
    """
    if geometry is None:
        d2 = d.reshape(-1, d.shape[-1] if d.dim() else 1)
        x2 = x.reshape(-1, x.shape[-1] if x.dim() else 1)
        if dtype == torch.bfloat16 and d.device.type == "cpu" and x.dtype in _MIXED_INPUTS and d.dtype in _MIXED_INPUTS and _mixed_fits(d2, x2):
            return cpp.abs_outer_bf16(d2, x2)  # float32 sums of the bfloat16 factors
        return _abs_in(d2, dtype).t().mm(_abs_in(x2, dtype))
    stride, padding, dilation, groups, pad, mode = geometry
    spatial = len(stride)
    if x.dim() == spatial + 1:  # an unbatched input
        x, d = x.unsqueeze(0), d.unsqueeze(0)
    if pad is not None:
        x = F.pad(x, pad, mode="constant" if mode == "zeros" else mode)
        padding = (0,) * spatial
    mixed_inputs = dtype != torch.float64 and x.dtype == d.dtype and x.dtype in _MIXED_INPUTS
    if mixed_inputs and _mixed_conv_wins(d, weight_shape, groups) and _conv_bf16_product():
        # float32 sums of the bfloat16 factors, as a linear layer's
        return cpp.abs_sums_bf16(d, x, weight_shape[2:], stride, padding, dilation)
    xa, da = _abs_in(x, dtype), _abs_in(d, dtype)
    if _unfold_wins(d, weight_shape, groups):
        return _unfolded_sums(da, xa, weight_shape, stride, padding, dilation)
    shape_only = xa.new_zeros(()).expand(weight_shape)
    return torch.ops.aten.convolution_backward(
        da, xa, shape_only, None, list(stride), list(padding), list(dilation), False, [0] * spatial, groups, [False, True, False]
    )[1]


# The unfolded product replaces the convolution's weight gradient on the CPU where a sample has at most
# this many output positions and both channel counts are at least _UNFOLD_MIN_CHANNELS (see _unfold_wins).
_UNFOLD_MAX_POSITIONS = 4
_UNFOLD_MIN_CHANNELS = 128


def _unfold_wins(d: torch.Tensor, weight_shape, groups: int) -> bool:
    """Whether one product over (sample, position) beats the CPU convolution's weight gradient for these shapes.

    oneDNN's weight gradient is slow where a sample has few output positions and the layer many
    channels (the last stages of a ResNet on 32x32 images: 4x slower at 512 channels and 1x1
    outputs); there one matrix product of ``|d|`` and the unfolded ``|x|`` is faster, elsewhere
    slower: the mixed-precision product (:func:`fastanalog.ops.cpp.abs_sums_bf16`, which unfolds
    as it goes; see :func:`_mixed_conv_wins`) where the CPU multiplies bfloat16 fast, else
    :func:`_unfolded_sums`. The choice
    depends on the shapes alone, never on timings, so that A is the same in every run of a model
    (resume and DDP ranks take the same summation order).
    """
    positions = 1
    for n in d.shape[2:]:
        positions *= n
    return (
        d.device.type == "cpu"
        and groups == 1
        and d.dim() in (3, 4)
        and positions <= _UNFOLD_MAX_POSITIONS
        and min(weight_shape[0], weight_shape[1]) >= _UNFOLD_MIN_CHANNELS
    )


def _mixed_conv_wins(d: torch.Tensor, weight_shape, groups: int) -> bool:
    """Whether the mixed-precision product (:func:`fastanalog.ops.cpp.abs_sums_bf16`) beats the CPU
    convolution's weight gradient for these shapes, where the CPU multiplies bfloat16 fast.

    It unfolds ``|x|`` into the micro-kernel's operands as it goes, a few nanoseconds an element:
    that pays for the shapes of :func:`_unfold_wins` and for every 1x1 kernel, whose unfolding is
    a copy (at two threads: ResNet-50's 1x1 layers at batch 8 take 0.4-1.0x oneDNN's
    float32 time, 3x3 layers with 64 output positions 2x). Shapes alone decide.
    """
    return (
        d.device.type == "cpu"
        and groups == 1
        and d.dim() in (3, 4)
        and (all(k == 1 for k in weight_shape[2:]) or _unfold_wins(d, weight_shape, groups))
    )


def _conv_bf16_product() -> bool:
    """Whether the convolutions :func:`_mixed_conv_wins` picks take the mixed-precision product here
    (:func:`fastanalog.ops.cpp.abs_sums_bf16`: a CPU with AMX or AVX512-BF16, unless
    ``FASTANALOG_SAMPLE_DTYPE=float32``); else float32 factors."""
    return _forced_sample_dtype() != torch.float32 and _cpu_bf16_gemm()


def _unfolded_sums(da: torch.Tensor, xa: torch.Tensor, weight_shape, stride, padding, dilation) -> torch.Tensor:
    """The weight gradient of ``xa`` and ``da`` (batched, groups 1) as one matrix product over (sample, position)."""
    if da.dim() == 3:  # Conv1d as a 1-high Conv2d
        da, xa = da.unsqueeze(2), xa.unsqueeze(2)
        stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
    kernel = tuple(weight_shape[2:]) if len(weight_shape) == 4 else (1, weight_shape[2])
    cols = F.unfold(xa, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C_in * kh * kw, L)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B * L, C_in * kh * kw)
    outs = da.flatten(2).transpose(0, 1).reshape(da.shape[1], -1)  # (C_out, B * L), the same (b, l) order
    return outs.mm(rows).view(weight_shape)


class _SampleAbs(torch.autograd.Function):
    """The layer's output, unchanged; backward passes its gradient ``d`` on and gives the companion the gradient ``A``."""

    @staticmethod
    def forward(ctx, out, x, companion, geometry):
        ctx.save_for_backward(x)
        ctx.geometry = geometry
        ctx.weight_shape = companion.shape
        ctx.mark_dirty(out)  # the output itself, not a view of it: later in-place ops (ReLU(inplace=True)) stay legal
        return out

    @staticmethod
    def backward(ctx, d):
        A = None
        if ctx.needs_input_grad[2]:
            (x,) = ctx.saved_tensors
            dtype = sample_abs_dtype(d.device, d.dtype, conv=ctx.geometry is not None)
            A = sample_abs_sums(d, x, ctx.weight_shape, ctx.geometry, dtype)
        return d, None, A, None


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


_NO_DEFAULT = object()


def module_attr(module: nn.Module, name: str, default=_NO_DEFAULT):
    """``getattr(module, name[, default])``, reading a registered parameter or buffer from its dict directly.

    nn.Module finds those in its Python ``__getattr__``, a microsecond per lookup that the
    optimizer's step would pay several times per layer. The result is the same: nn.Module
    keeps a name in one place only (``__setattr__`` and ``register_*`` move it there or refuse
    it), so a name in ``_parameters`` or ``_buffers`` is in neither the instance's ``__dict__``
    nor its class, and ``__getattr__`` would return that very entry. Any other name (e.g. an
    array set to None, a plain attribute) takes ``getattr``.
    """
    params, buffers = module.__dict__["_parameters"], module.__dict__["_buffers"]
    if name in params:
        return params[name]
    if name in buffers:
        return buffers[name]
    return getattr(module, name) if default is _NO_DEFAULT else getattr(module, name, default)


def _untagged() -> None:
    """What a pickled or deep-copied ``_LayerRef`` becomes: no tag (the layer's ``__setstate__`` tags its weight anew)."""
    return None


class _LayerRef:
    """The reference from an analog layer's weight (and companion) to the layer: called, the layer (or None).

    It holds a weak reference, which cannot be pickled: a plain one made ``torch.save(model)``
    and ``pickle`` of an analog model fail. This one pickles and deep-copies as None, and the
    copied layer tags its own weight when it is restored; a parameter copied without its
    layer is no layer's weight. (A holder rather than a weakref subclass, which
    ``torch.compile`` cannot call.)
    """

    __slots__ = ("ref",)

    def __init__(self, layer) -> None:
        self.ref = weakref.ref(layer)

    def __call__(self):
        return self.ref()

    def __reduce__(self):
        return (_untagged, ())


class AnalogLayerMixin:
    """State and helpers shared by every analog layer."""

    analog_config: AnalogConfig

    def _init_analog(self, config: AnalogConfig | None, share: AnalogLayerMixin | None = None) -> None:
        """Set up the arrays; ``share``: an analog layer whose weight this one is tied to (its arrays are used, not copied)."""
        config = config if config is not None else AnalogConfig()
        if not isinstance(config, AnalogConfig):
            raise TypeError(f"config must be a fastanalog.AnalogConfig, got {config!r}")
        self.analog_config = config
        if "_fa_name" not in self.__dict__:
            self._fa_name = None  # the module path(s), set by convert_to_analog and load_state_dict
        if share is not None:
            self.weight = share.weight
            for name in _ARRAYS:
                t = getattr(share, name)
                if name in share._buffers:
                    self.register_buffer(name, t, persistent=name != "analog_mixed")
                else:
                    setattr(self, name, None)
            self.analog_abs = share.analog_abs
        else:
            weight: nn.Parameter = self.weight
            if config.is_analog:
                scale = _choose_scale(weight.detach(), config)
                with torch.no_grad():
                    _divide_(weight, scale)
                self.register_buffer("analog_scale", scale)
            else:
                self.analog_scale = None
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
            self._init_companion()
        self._note_scale()
        self._fa_version = self.weight._version
        self.register_load_state_dict_pre_hook(_prepare_state_dict)
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self._register_state_dict_hook(_drop_companion)
        self._tag_weight()

    def _init_companion(self) -> None:
        """The parameter ``analog_abs`` whose gradient is A (per-sample configs), or None."""
        weight = self.weight
        if self.analog_config.per_sample:
            self.analog_abs = nn.Parameter(torch.zeros_like(weight.detach()), requires_grad=weight.requires_grad)
        else:
            self.analog_abs = None

    def _note_scale(self) -> None:
        """Remember (a Python bool, so that forward and compiled graphs need no data-dependent branch) whether s is all 1."""
        s = self.analog_scale
        self._fa_unit_scale = s is None or s.is_meta or bool((s == 1).all())

    def _layer_name(self) -> str:
        return self._fa_name or f"{type(self).__name__}{tuple(self.weight.shape)}"

    @torch.no_grad()
    def set_digital_weight(self, w: torch.Tensor) -> None:
        """Set the weights from digital units ``w``: choose the scale (``weight_scaling``) and write ``W = w / s``.

        P and H (rl, rl2) are left as they are; the stored mixed weight is refreshed.
        """
        if tuple(w.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"{self._layer_name()}: weight of shape {tuple(w.shape)} given, the layer has {tuple(self.weight.shape)}"
            )
        self.weight.copy_(w)
        if self.analog_scale is not None:
            scale = _choose_scale(self.weight.detach(), self.analog_config)
            _divide_(self.weight, scale)
            self.analog_scale.copy_(scale)
        self.refresh_weight()
        self._fa_version = self.weight._version

    @torch.no_grad()
    def digital_weight(self) -> torch.Tensor:
        """The forward weight in digital units (a new tensor): ``s * (W + gamma * P)``, the weight of the equivalent nn layer."""
        w = self.forward_weight()
        if self.analog_scale is None:
            return w
        return w * self.analog_scale.view(_channel_shape(w)).to(w.dtype)

    @torch.no_grad()
    def check_range(self, why: str = "") -> int:
        """Warn (naming the layer) if W lies outside its device's range; returns how many elements do."""
        cfg = self.analog_config
        if not cfg.is_analog or self.weight.is_meta:
            return 0
        return _warn_outside(self.weight.detach(), cfg, self._layer_name(), why)

    def _stores_mixed(self) -> bool:
        cfg = self.analog_config
        return cfg.has_residual and cfg.gamma != 0 and cfg.mixed_weight == "stored"

    def _tag_weight(self) -> None:
        # AnalogSGD finds the layer (and so its arrays and config) through the parameter.
        self.weight._fa_layer = _LayerRef(self)
        if getattr(self, "analog_abs", None) is not None:
            self.analog_abs._fa_companion_of = _LayerRef(self)

    def sample_abs_grad(self) -> torch.Tensor | None:
        """A, the per-sample |g| sums of the backward passes since ``zero_grad`` (None: no per-sample write, e = 0)."""
        companion = module_attr(self, "analog_abs", None)
        return None if companion is None else companion.grad

    def __setstate__(self, state):  # pickling and deepcopy make a new Parameter
        super().__setstate__(state)
        # Layers pickled before the scale existed: s = 1.
        if "analog_scale" not in self._buffers and "analog_scale" not in self.__dict__:
            if self.analog_config.is_analog:
                self.register_buffer("analog_scale", torch.ones(self.weight.shape[0], device=self.weight.device))
            else:
                self.analog_scale = None
        self.__dict__.setdefault("_fa_name", None)
        if "analog_abs" not in self._parameters and "analog_abs" not in self.__dict__:
            # Layers pickled before per-sample writes: their config's update is the class default.
            self._init_companion()
        self._note_scale()
        self._fa_version = self.weight._version
        self._tag_weight()

    def analog_state(self) -> dict[str, torch.Tensor | None]:
        """The live arrays (not copies): ``main`` (W, the data of ``weight``), ``residual`` (P or None), ``buffer`` (H or None)."""
        return {"main": module_attr(self, "weight").data, "residual": module_attr(self, "analog_residual"),
                "buffer": module_attr(self, "analog_buffer")}  # fmt: skip

    @torch.no_grad()
    def forward_weight(self) -> torch.Tensor:
        """The weight forward uses (a new tensor): ``W + gamma * P`` for rl/rl2, else W."""
        cfg = self.analog_config
        if not cfg.has_residual or cfg.gamma == 0:
            return self.weight.detach().clone()
        return dispatch.mixed_weight(self.weight.detach(), self.analog_residual, cfg.gamma)

    @torch.no_grad()
    def refresh_weight(self) -> None:
        """Rewrite the stored mixed weight (``mixed_weight="stored"``) from W and P and take note of the scale ``analog_scale``.

        Needed only after editing W, P or ``analog_scale`` by hand.
        """
        if self._stores_mixed():
            self.analog_mixed.copy_(self.forward_weight())
        self._note_scale()

    def _forward_with(self, run, x: torch.Tensor) -> torch.Tensor:
        """``s * run(x, forward weight, None) + bias``; ``weight.grad`` gets the gradient of W (device units)."""
        if self.analog_config.is_analog and not torch.compiler.is_compiling() and self.weight._version != self._fa_version:
            # W was written in place since we last looked, not by AnalogSGD (whose kernels write its data
            # without bumping the version): say so now rather than let the next update clip it silently.
            self._fa_version = self.weight._version
            self.check_range("(W was changed outside AnalogSGD: by hand or by another optimizer)")
        if self._fa_unit_scale:
            return self._per_sample(self._forward_unscaled(lambda x, w: run(x, w, self.bias), x), x)
        out = self._per_sample(self._forward_unscaled(lambda x, w: run(x, w, None), x), x)
        s = self.analog_scale.to(out.dtype).view(_scale_shape(self.weight))
        if self.bias is None:
            return out * s
        return torch.addcmul(self.bias.to(out.dtype).view(s.shape), out, s)

    def _per_sample(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out``, with a backward that also computes A into ``analog_abs.grad`` when this layer writes per sample."""
        companion = self.analog_abs
        if companion is None or not torch.is_grad_enabled() or not companion.requires_grad:
            return out
        return _SampleAbs.apply(out, x, companion, self._sample_geometry())

    def _sample_geometry(self):
        return None

    def _forward_unscaled(self, run, x: torch.Tensor) -> torch.Tensor:
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


_ARRAYS = ("analog_scale", "analog_residual", "analog_buffer", "analog_mixed", "analog_pulses", "analog_last_pulses")


def _scale_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The shape that broadcasts a per-output-channel vector over the output of a layer with this weight."""
    return (-1,) + (1,) * (weight.dim() - 2)


def _channel_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The shape that broadcasts a per-output-channel vector over the weight itself: ``(-1, 1, ...)``."""
    return (-1,) + (1,) * (weight.dim() - 1)


def _choose_scale(w: torch.Tensor, config: AnalogConfig) -> torch.Tensor:
    """The per-output-channel scale ``s`` (float32, on ``w``'s device) of digital weights ``w`` (SPEC section 7)."""
    dev = config.device
    rows = w.detach().reshape(w.shape[0], -1).float() if w.dim() else w.detach().reshape(1, -1).float()
    if rows.shape[1] == 0:
        return torch.ones(rows.shape[0], dtype=torch.float32, device=w.device)
    # How far each channel reaches, in units of its sign's bound (<= 1: it fits).
    reach = torch.maximum(rows.amax(1).clamp(min=0) / float(dev.tau_max), (-rows.amin(1)).clamp(min=0) / -float(dev.tau_min))
    if config.weight_scaling == "tensor":
        reach = reach.amax().expand_as(reach)
    scaled = reach / config.weight_scaling_omega
    one = torch.ones_like(reach)
    if config.weight_scaling == "fit":
        return torch.where(reach > 1, scaled, one).contiguous()
    return torch.where(reach > 0, scaled, one).contiguous()  # an all-zero channel keeps s = 1


def _divide_(weight: torch.Tensor, scale: torch.Tensor) -> None:
    """``weight /= s`` per output channel, in at least float32."""
    div = weight.detach() / scale.view(_channel_shape(weight)).to(torch.promote_types(weight.dtype, torch.float32))
    weight.data.copy_(div)


_SKIP_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(torch.__file__)))


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside this package and torch (a warning then points at the caller)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _warn_outside(w: torch.Tensor, config: AnalogConfig, name: str, why: str) -> int:
    dev = config.device
    outside = int(((w < dev.tau_min) | (w > dev.tau_max)).sum())
    if outside:
        warnings.warn(
            f"{name}: {outside} of {w.numel()} weights lie outside the device range [{dev.tau_min}, {dev.tau_max}]"
            f"{' ' + why if why else ''}; the next analog update clips them. Weights in digital units belong in "
            "layer.set_digital_weight(w) (or a digital checkpoint), which chooses the scale.",
            stacklevel=_user_stacklevel(),
        )
    return outside


def _prepare_state_dict(module, state_dict, prefix, *args) -> None:
    """Before a layer loads: read earlier layouts, map a digital checkpoint's weights, check the range.

    * W in ``analog_main`` (the layout before the mixed weight became transient) moves to ``weight``.
    * An analog entry without ``analog_scale`` (saved before it existed) loads with ``s = 1``.
    * A digital entry (``weight``, maybe ``bias``, and no ``analog_*`` key: an ``nn.Linear``/``nn.Conv``
      checkpoint) holds digital units: the scale is chosen as at conversion, P and H start at 0.
    * An analog ``weight`` outside the device range is loaded as it is, with a warning naming the layer.
    """
    old = prefix + "analog_main"
    if old in state_dict:
        state_dict[prefix + "weight"] = state_dict.pop(old)
    if prefix and module._fa_name is None:
        module._fa_name = prefix[:-1]
    if getattr(module, "analog_abs", None) is not None:
        # Never saved (a gradient, not state): the layer's own value, so that strict loading finds it.
        state_dict.setdefault(prefix + "analog_abs", module.analog_abs.detach())
    cfg = module.analog_config
    key = prefix + "weight"
    if not cfg.is_analog or key not in state_dict:
        return
    analog = any(
        k.startswith(prefix + "analog_") and "." not in k[len(prefix) :] and k != prefix + "analog_abs" for k in state_dict
    )
    if not analog:
        w = state_dict[key]
        scale = _choose_scale(w, cfg)
        div = w.detach() / scale.view(_channel_shape(w)).to(torch.promote_types(w.dtype, torch.float32))
        state_dict[key] = div.to(w.dtype)
        state_dict[prefix + "analog_scale"] = scale
        for name in ("analog_residual", "analog_buffer"):
            if getattr(module, name) is not None:
                state_dict[prefix + name] = torch.zeros_like(getattr(module, name))
        for name in ("analog_pulses", "analog_last_pulses"):
            state_dict[prefix + name] = getattr(module, name).clone()
        return
    if prefix + "analog_scale" not in state_dict:
        state_dict[prefix + "analog_scale"] = torch.ones_like(module.analog_scale)
    w = state_dict[key]
    if isinstance(w, torch.Tensor) and not w.is_meta:
        _warn_outside(w.detach(), cfg, module._layer_name(), "(in the state dict being loaded)")


def _drop_companion(module, state_dict, prefix, local_metadata) -> None:
    """``analog_abs`` holds a gradient, not state: keep it out of ``state_dict`` (loading fills it in)."""
    state_dict.pop(prefix + "analog_abs", None)


def _refresh_after_load(module, incompatible_keys) -> None:
    module.refresh_weight()
    module._fa_version = module.weight._version


class AnalogLinear(AnalogLayerMixin, nn.Linear):
    """``nn.Linear`` on analog devices. ``AnalogLinear(in, out, bias=True, config=AnalogConfig(...))``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, config: AnalogConfig | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_analog(config)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._forward_with(F.linear, input)


class _ConvSamples:
    """The geometry :func:`sample_abs_sums` needs of a convolution."""

    def _sample_geometry(self):
        pad = None
        if isinstance(self.padding, str) or self.padding_mode != "zeros":
            pad = tuple(self._reversed_padding_repeated_twice)
        padding = (0,) * len(self.stride) if isinstance(self.padding, str) else tuple(self.padding)
        return (tuple(self.stride), padding, tuple(self.dilation), self.groups, pad, self.padding_mode)


class AnalogConv1d(_ConvSamples, AnalogLayerMixin, nn.Conv1d):
    """``nn.Conv1d`` on analog devices; all nn.Conv1d arguments plus ``config``."""

    def __init__(self, *args, config: AnalogConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_analog(config)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._forward_with(self._conv_forward, input)


class AnalogConv2d(_ConvSamples, AnalogLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` on analog devices; all nn.Conv2d arguments plus ``config``."""

    def __init__(self, *args, config: AnalogConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_analog(config)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._forward_with(self._conv_forward, input)


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


def _new_layer(module: nn.Module, cls) -> nn.Module:
    """An empty ``cls`` with ``module``'s arguments (its tensors still to be set)."""
    new = cls.__new__(cls)
    if cls is AnalogLinear:
        nn.Linear.__init__(new, module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    else:
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
    return new


def _fresh(p: nn.Parameter, memo: dict[int, nn.Parameter]) -> nn.Parameter:
    """A new Parameter with ``p``'s values (one per original: parameters tied before stay tied)."""
    new = memo.get(id(p))
    if new is None:
        new = memo[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    return new


def _convert_one(module: nn.Module, config: AnalogConfig, memo: dict | None = None, share=None) -> nn.Module:
    """The analog twin of ``module`` (weights mapped per ``config.weight_scaling``), or, with ``share``,
    a twin that uses ``share``'s weight and arrays (``module``'s weight is tied to ``share``'s original one)."""
    memo = {} if memo is None else memo
    new = _new_layer(module, _analog_class(module))
    # Keep the original tensors' values, dtype and device; fresh Parameters so the
    # original model is left untouched.
    if share is None:
        new.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=module.weight.requires_grad)
    else:
        new.weight = share.weight
    if module.bias is not None:
        new.bias = _fresh(module.bias, memo)
    new.train(module.training)
    new._init_analog(config, share=share)
    return new


def _matches(name: str, patterns) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def convert_to_analog(
    model: nn.Module, config: AnalogConfig | None = None, include: list[str] | None = None, exclude: list[str] | None = None
) -> nn.Module:
    """Swap every nn.Linear / nn.Conv1d / nn.Conv2d of ``model`` for its analog twin, in place.

    Weights are mapped onto the devices per ``config.weight_scaling`` (default ``"fit"``:
    unchanged where they fit the device range, else scaled by a digital per-channel
    factor), so the converted model computes the original outputs; biases, norms and
    everything else stay digital. ``include``/``exclude`` are lists of glob patterns on
    module names (``"head"``, ``"blocks.*.attn.*"``); a layer is converted when one of
    its names matches some include pattern (all, if None) and none matches an exclude
    pattern. A subclass that overrides forward (e.g. a "same"-padding conv) is left
    digital with a warning. Returns ``model`` (or the new layer if ``model`` itself is one).

    Sharing is kept: a module that appears under several names becomes one analog
    module; layers whose weight is one tied Parameter become analog layers sharing one
    weight and one set of arrays (P, H, scale, pulse counters), if they are all
    converted to the same class; otherwise (a weight tied to an ``nn.Embedding``, to a
    layer left digital or excluded, or to a layer of another kind) they stay digital,
    still tied, with one warning naming every place of the weight. Other tied
    parameters (biases) stay tied.
    """
    config = config if config is not None else AnalogConfig()
    if not isinstance(config, AnalogConfig):
        raise TypeError(f"config must be a fastanalog.AnalogConfig, got {config!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for kind, pats in (("include", include), ("exclude", exclude)):
        if pats is not None and (isinstance(pats, str) or not all(isinstance(p, str) for p in pats)):
            raise TypeError(f"{kind} must be a list of glob patterns (strings), got {pats!r}")

    def wanted(names: list[str]) -> bool:
        if include is not None and not any(_matches(n, include) for n in names):
            return False
        return not (exclude is not None and any(_matches(n, exclude) for n in names))

    if _analog_class(model) and wanted([""]):
        new = _convert_one(model, config)
        new._fa_name = None
        return new

    # Every name of every module (a shared module has several), and every place of every parameter.
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
        modules[id(mod)] = mod
    places: dict[int, list[tuple[int, str]]] = {}  # id(param) -> [(id(module), attribute)]
    for mid, mod in modules.items():
        for attr, p in mod._parameters.items():
            if p is not None:
                places.setdefault(id(p), []).append((mid, attr))

    def where(mid: int, attr: str) -> str:
        mod = modules[mid]
        return " = ".join(f"{n}.{attr}" if n else attr for n in names[mid]) + f" ({type(mod).__name__})"

    candidates, skipped = {}, []
    for mid, mod in modules.items():
        cls = _analog_class(mod)
        if cls is None or mid == id(model) or not wanted(names[mid]):
            continue
        if cls is False:
            skipped.append(f"{names[mid][0]} ({type(mod).__name__})")
            continue
        candidates[mid] = cls

    # Tied weights: analog together (one weight, one set of arrays) or digital together.
    owner_of: dict[int, int] = {}  # module id -> id of the module whose new arrays it shares
    untied_warnings = []
    if config.is_analog:
        for mid in list(candidates):
            if mid not in candidates or mid in owner_of:
                continue
            users = places.get(id(modules[mid].weight), [])
            if len(users) <= 1:
                continue
            ok = all(u in candidates and attr == "weight" and candidates[u] is candidates[mid] for u, attr in users)
            if ok:
                for u, _ in users:
                    owner_of[u] = users[0][0]
            else:
                for u, _ in users:
                    candidates.pop(u, None)
                untied_warnings.append(", ".join(where(u, attr) for u, attr in users))

    memo: dict[int, nn.Parameter] = {}
    converted: dict[int, nn.Module] = {}
    for mid in candidates:
        owner = owner_of.get(mid, mid)
        share = None
        if owner != mid:
            if owner not in converted:
                converted[owner] = _convert_one(modules[owner], config, memo)
            share = converted[owner]
        if mid not in converted:
            converted[mid] = _convert_one(modules[mid], config, memo, share=share)
        converted[mid]._fa_name = ", ".join(names[mid])
    if not config.is_analog:
        # Digital layers keep their weights as they are: keep every tie of them too.
        for mid, new in converted.items():
            old = modules[mid].weight
            if id(old) in memo:
                new.weight = memo[id(old)]
                new._tag_weight()
            else:
                memo[id(old)] = new.weight
    # Put the new modules in every place of the old ones, and the new Parameters in every place of tied ones.
    for mid, mod in modules.items():
        for child_name, child in list(mod._modules.items()):
            if child is not None and id(child) in converted:
                mod._modules[child_name] = converted[id(child)]
        if mid not in converted:
            for attr, p in list(mod._parameters.items()):
                if p is not None and id(p) in memo:
                    mod._parameters[attr] = memo[id(p)]
    if skipped:
        warnings.warn(
            "left digital because their class overrides forward: " + ", ".join(skipped) + "; exclude them to silence this",
            stacklevel=2,
        )
    if untied_warnings:
        warnings.warn(
            "left digital because their weight is one Parameter tied to places that cannot share an analog array "
            "(another kind of module, or one left digital): " + "; ".join(untied_warnings) + ". They stay tied. "
            "To make them analog, untie them first (e.g. b.weight = nn.Parameter(a.weight.detach().clone())).",
            stacklevel=2,
        )
    return model


def analog_layers(model: nn.Module):
    """Yield ``(name, layer)`` for every analog layer of ``model``, one per weight.

    A shared module comes once (under its first name); of layers whose weight is tied
    (one Parameter, one set of arrays) only the first, as in ``model.parameters()``.
    """
    seen = set()
    for name, module in model.named_modules():
        if isinstance(module, AnalogLayerMixin) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            yield name, module


def total_pulses(model: nn.Module) -> int:
    """Pulses written to all analog arrays of ``model`` so far (a proxy for write energy)."""
    return int(sum(int(layer.analog_pulses.sum()) for _, layer in analog_layers(model)))
