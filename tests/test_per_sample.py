"""Per-sample writes (SPEC section 2a): the layers' A = sum_b |g_b|, and what AnalogSGD does with it."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from kernel_harness import cpu_has
from torch import nn

import fastanalog as fa
from fastanalog.nn import layers as layers_mod
from fastanalog.nn.layers import sample_abs_dtype, sample_abs_sums


@pytest.fixture(autouse=True)
def _float32_sums(monkeypatch):
    """Exact float32 sums unless a test asks for the machine's choice."""
    monkeypatch.setenv("FASTANALOG_SAMPLE_DTYPE", "float32")


def _asgd(update="per-sample", **device):
    kw = dict(tau=1.0, dw_min=1e-4)
    kw.update(device)
    return fa.AnalogConfig(algorithm="asgd", device=fa.LinearResponse(**kw), update=update)


def _per_sample_abs_grads(layer, x, loss_of_row):
    """The oracle: sum over rows b of |dL_b/dW| with one backward per row (bias-free, digital twin)."""
    total = torch.zeros_like(layer.weight)
    for b in range(x.shape[0]):
        layer.weight.grad = None
        loss_of_row(layer(x[b : b + 1]), b).backward()
        total += layer.weight.grad.abs()
    layer.weight.grad = None
    return total


def test_linear_A_is_the_sum_of_the_rows_absolute_gradients():
    torch.manual_seed(0)
    layer = fa.AnalogLinear(5, 3, config=_asgd(tau=2.0))
    x = torch.randn(6, 5)
    target = torch.randn(6, 3)

    def loss(y, b):
        return ((y - target[b : b + 1]) ** 2).sum()

    want = _per_sample_abs_grads(copy.deepcopy(layer), x, loss)
    layer(x).sub(target).pow(2).sum().backward()
    assert torch.allclose(layer.sample_abs_grad(), want, rtol=1e-5, atol=1e-6)
    assert (layer.sample_abs_grad() >= layer.weight.grad.abs() - 1e-6).all(), "A >= |S| element by element"


def test_linear_leading_dimensions_are_samples_and_scales_enter_A():
    """Tokens of a (batch, tokens, features) input are samples; a per-channel digital scale s multiplies A as it does S."""
    torch.manual_seed(1)
    cfg = fa.AnalogConfig(algorithm="asgd", device=fa.LinearResponse(tau=0.5), weight_scaling="channel")
    layer = fa.AnalogLinear(4, 3, bias=False, config=cfg)
    assert not bool((layer.analog_scale == 1).all())
    x = torch.randn(2, 5, 4)
    d = torch.randn(2, 5, 3)
    (layer(x) * d).sum().backward()
    s = layer.analog_scale.view(-1, 1)
    want = (d.reshape(-1, 3).abs() * s.view(1, -1)).t() @ x.reshape(-1, 4).abs()
    assert torch.allclose(layer.sample_abs_grad(), want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(layer.weight.grad, (d.reshape(-1, 3) * s.view(1, -1)).t() @ x.reshape(-1, 4), rtol=1e-5, atol=1e-6)


def _unfold_abs(x, d, conv):
    """The convolution oracle: every (sample, output position) is one outer product |d| x |patch| (any groups)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
        padding = 0
    else:
        padding = conv.padding
    two_d = x.dim() == 4
    if not two_d:  # Conv1d as a 1-high Conv2d
        x, d = x.unsqueeze(2), d.unsqueeze(2)
    k = conv.kernel_size if two_d else (1, conv.kernel_size[0])
    pads = padding if two_d else (0, padding[0] if isinstance(padding, tuple) else padding)
    stride = conv.stride if two_d else (1, conv.stride[0])
    dilation = conv.dilation if two_d else (1, conv.dilation[0])
    cols = F.unfold(x.abs(), k, dilation=dilation, padding=pads, stride=stride)  # (B, C*kh*kw, L)
    B, out = d.shape[0], d.shape[1]
    g = conv.groups
    cin = x.shape[1] // g
    cols = cols.view(B, g, cin * k[0] * k[1], -1)
    dd = d.abs().reshape(B, g, out // g, -1)
    A = torch.einsum("bgol,bgkl->gok", dd, cols).reshape(out, cin * k[0] * k[1])
    return A.view(conv.weight.shape)


@pytest.mark.parametrize(
    "kind,kw",
    [
        ("2d", dict(kernel_size=3)),
        ("2d", dict(kernel_size=3, stride=2, padding=1)),
        ("2d", dict(kernel_size=(2, 3), dilation=2, padding=(1, 2))),
        ("2d", dict(kernel_size=3, groups=2, padding=1)),
        ("2d", dict(kernel_size=4, padding="same")),
        ("2d", dict(kernel_size=3, padding=1, padding_mode="reflect")),
        ("2d", dict(kernel_size=3, padding=2, padding_mode="circular")),
        ("1d", dict(kernel_size=3, stride=2, padding=1, groups=2)),
        ("1d", dict(kernel_size=2, padding="same", padding_mode="replicate")),
    ],
)
def test_conv_A_is_the_sum_over_samples_and_positions(kind, kw):
    torch.manual_seed(2)
    cls = fa.AnalogConv2d if kind == "2d" else fa.AnalogConv1d
    conv = cls(4, 6, config=_asgd(tau=2.0), **kw)
    shape = (3, 4, 9, 8) if kind == "2d" else (3, 4, 11)
    x = torch.randn(shape)
    y = conv(x)
    d = torch.randn_like(y)
    (y * d).sum().backward()
    want = _unfold_abs(x, d, conv)
    assert torch.allclose(conv.sample_abs_grad(), want, rtol=1e-4, atol=1e-5)


def _wide_conv(kind, kw, size):
    """A 128 -> 130 channel analog convolution, an input of 3 samples, its output and an output gradient."""
    torch.manual_seed(5)
    cls = fa.AnalogConv2d if kind == "2d" else fa.AnalogConv1d
    conv = cls(128, 130, config=_asgd(tau=2.0), **kw)
    x = torch.randn((3, 128, size, size) if kind == "2d" else (3, 128, size))
    y = conv(x)
    return conv, x, y, torch.randn_like(y)


@pytest.mark.parametrize(
    "kind,kw,size",
    [
        ("2d", dict(kernel_size=3, padding=1), 2),
        ("2d", dict(kernel_size=3, stride=2, padding=1), 4),
        ("2d", dict(kernel_size=1, stride=2), 3),
        ("2d", dict(kernel_size=(2, 3), dilation=(1, 2), padding=(0, 2)), 2),
        ("2d", dict(kernel_size=3, padding=1, padding_mode="reflect"), 2),
        ("1d", dict(kernel_size=3, stride=2, padding=1), 7),
        ("1d", dict(kernel_size=2, padding="same", padding_mode="replicate"), 3),
    ],
)
def test_wide_conv_with_few_positions_takes_the_unfolded_product(kind, kw, size):
    """Few output positions, many channels: A is one matrix product of the unfolded input, the same sums."""
    conv, x, y, d = _wide_conv(kind, kw, size)
    assert layers_mod._unfold_wins(y, conv.weight.shape, conv.groups)
    (y * d).sum().backward()
    want = _unfold_abs(x.double(), d.double(), conv).float()
    assert torch.allclose(conv.sample_abs_grad(), want, rtol=1e-5, atol=1e-5)
    # and the convolution's own weight gradient gives the same sums
    geometry = conv._sample_geometry()
    direct = torch.ops.aten.convolution_backward(
        d.abs(), x.abs() if geometry[4] is None else F.pad(x.abs(), geometry[4], mode=conv.padding_mode if conv.padding_mode != "zeros" else "constant"),
        conv.weight, None, list(conv.stride), [0] * len(conv.stride) if geometry[4] is not None else list(geometry[1]),
        list(conv.dilation), False, [0] * len(conv.stride), 1, [False, True, False],
    )[1]  # fmt: skip
    assert torch.allclose(conv.sample_abs_grad(), direct, rtol=1e-5, atol=1e-5)


def _bf16_oracle(d, x, kernel, stride, padding, dilation, rounded=True):
    """The weight gradient of the bfloat16 roundings of |x| and |d| (``rounded``; else of |x| and |d|), in float64."""
    db, xb = (d.abs().bfloat16().double(), x.abs().bfloat16().double()) if rounded else (d.abs().double(), x.abs().double())
    if not kernel:
        return db.t() @ xb
    w = torch.zeros(d.shape[1], x.shape[1], *kernel, dtype=torch.float64)
    n = len(kernel)
    return torch.ops.aten.convolution_backward(
        db, xb, w, None, list(stride), list(padding), list(dilation), False, [0] * n, 1, [False, True, False]
    )[1]


_needs_bf16 = pytest.mark.skipif(
    not (fa.ops.cpp.cpp_available() and fa.ops.cpp.bf16_amx_available()), reason="no bfloat16 micro-kernel on this CPU"
)


@pytest.mark.skipif(not fa.ops.cpp.cpp_available(), reason="the C++ kernels are not built")
def test_bf16_micro_kernel_serves_every_cpu_that_has_one():
    """AMX or AVX512-BF16 (AMD Zen 4, Intel Cooper Lake: torch's could_pack says no, its brgemm runs) both
    give the micro-kernel, and then a linear layer's A takes it."""
    if not (cpu_has("avx512_bf16") or cpu_has("amx_bf16")):
        pytest.skip("this CPU has neither AVX512-BF16 nor AMX")
    assert fa.ops.cpp.bf16_amx_available()
    assert layers_mod._cpu_bf16_gemm()
    gen = torch.Generator().manual_seed(3)
    d, x = torch.randn(33, 20, generator=gen), torch.randn(33, 17, generator=gen)
    want = d.abs().bfloat16().double().t() @ x.abs().bfloat16().double()  # exact products of the rounded factors
    assert torch.allclose(fa.ops.cpp.abs_outer_bf16(d, x).double(), want, rtol=33 * 2**-24, atol=0)


@_needs_bf16
@pytest.mark.parametrize(
    "x_shape,out,kernel,stride,padding,dilation",
    [
        ((3, 5, 7, 9), 6, (3, 3), (1, 1), (1, 1), (1, 1)),
        ((2, 7, 11, 6), 9, (3, 2), (2, 1), (0, 2), (2, 1)),
        ((4, 3, 9, 9), 5, (1, 1), (1, 1), (0, 0), (1, 1)),  # pointwise
        ((7, 9, 1, 1), 5, (1, 1), (1, 1), (0, 0), (1, 1)),  # pointwise on 1 x 1 images: the rows of a linear layer
        ((5, 70, 6, 5), 37, (3, 3), (1, 1), (1, 1), (1, 1)),  # two panels of inputs, two tiles of outputs, odd positions
        ((2, 3, 16, 16), 64, (7, 7), (2, 2), (3, 3), (1, 1)),
        ((3, 4, 20), 6, (5,), (2,), (3,), (2,)),  # 1-d
        ((37, 29), 13, (), (), (), ()),  # linear: 37 rows
    ],
)
def test_mixed_product_is_the_weight_gradient_of_the_rounded_factors(x_shape, out, kernel, stride, padding, dilation):
    """abs_sums_bf16: float32 sums of the exact products of the bfloat16 factors, whatever the chunks and threads."""
    torch.manual_seed(12)
    x = torch.randn(x_shape)
    if kernel:
        conv = F.conv2d if len(kernel) == 2 else F.conv1d
        d = torch.randn_like(conv(x, torch.zeros(out, x_shape[1], *kernel), stride=stride, padding=padding, dilation=dilation))
    else:
        d = torch.randn(x_shape[0], out)
    want = _bf16_oracle(d, x, kernel, stride, padding, dilation)
    positions = d.numel() // out
    first = fa.ops.cpp.abs_sums_bf16(d, x, kernel, stride, padding, dilation)
    assert first.dtype == torch.float32 and first.shape == want.shape
    for chunk in (0, 1, 2, 5, 7):
        got = fa.ops.cpp.abs_sums_bf16(d, x, kernel, stride, padding, dilation, chunk)
        assert torch.allclose(got.double(), want, rtol=positions * 2**-23, atol=0), chunk
    # not the float32 product: the factors are rounded
    assert not torch.allclose(first.double(), _bf16_oracle(d, x, kernel, stride, padding, dilation, rounded=False), rtol=1e-5, atol=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fa.ops.cpp.abs_sums_bf16(d, x, kernel, stride, padding, dilation)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, first)
    # DDP: two ranks' sums add up to one rank's with the whole batch, within float32 rounding
    half = x_shape[0] // 2
    parts = [fa.ops.cpp.abs_sums_bf16(d[s], x[s], kernel, stride, padding, dilation) for s in (slice(0, half), slice(half, None))]
    assert torch.allclose((parts[0] + parts[1]).double(), want, rtol=positions * 2**-23, atol=0)
    for dtype in (torch.bfloat16, torch.float16):
        got = fa.ops.cpp.abs_sums_bf16(d.to(dtype), x.to(dtype), kernel, stride, padding, dilation)
        ref = _bf16_oracle(d.to(dtype).float(), x.to(dtype).float(), kernel, stride, padding, dilation)
        assert torch.allclose(got.double(), ref, rtol=positions * 2**-23, atol=0), dtype


@_needs_bf16
def test_mixed_product_checks_its_arguments():
    x, d = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8)
    sums = fa.ops.cpp.abs_sums_bf16
    with pytest.raises(RuntimeError, match="positions in spatial dimension 0"):
        sums(d, x, (3, 3), (1, 1), (0, 0), (1, 1))
    with pytest.raises(RuntimeError, match="same rows"):
        sums(d[:1], x, (3, 3), (1, 1), (1, 1), (1, 1))
    with pytest.raises(RuntimeError, match="one dtype"):
        sums(d.bfloat16(), x, (3, 3), (1, 1), (1, 1), (1, 1))
    with pytest.raises(RuntimeError, match="one length each"):
        sums(d, x, (3, 3), (1,), (1, 1), (1, 1))
    with pytest.raises(RuntimeError, match="chunk"):
        sums(d, x, (3, 3), (1, 1), (1, 1), (1, 1), -1)
    with pytest.raises(RuntimeError, match="4-d"):
        sums(d[0], x[0], (3, 3), (1, 1), (1, 1), (1, 1))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        sums(d.double(), x.double(), (3, 3), (1, 1), (1, 1), (1, 1))
    assert torch.equal(sums(d[:0], x[:0], (3, 3), (1, 1), (1, 1), (1, 1)), torch.zeros(4, 3, 3, 3))
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert sums(d, nan, (3, 3), (1, 1), (1, 1), (1, 1)).isnan().any()


@_needs_bf16
@pytest.mark.parametrize(
    "kind,kw,size",
    [
        ("2d", dict(kernel_size=3, padding=1), 2),
        ("2d", dict(kernel_size=3, stride=2, padding=1), 4),
        ("2d", dict(kernel_size=3, padding=1, padding_mode="reflect"), 2),
        ("1d", dict(kernel_size=2, padding="same", padding_mode="replicate"), 3),
        ("2d", dict(kernel_size=1), 6),  # 1x1 kernels, any number of positions
        ("2d", dict(kernel_size=1, stride=2), 7),
        ("1d", dict(kernel_size=1), 9),
    ],
)
def test_wide_conv_with_few_positions_takes_the_mixed_product(kind, kw, size, monkeypatch):
    """The machine's choice on a CPU with a bfloat16 micro-kernel: the mixed-precision product, padding modes included."""
    monkeypatch.delenv("FASTANALOG_SAMPLE_DTYPE")
    conv, x, y, d = _wide_conv(kind, kw, size)
    assert layers_mod._mixed_conv_wins(y, conv.weight.shape, conv.groups)
    (y * d).sum().backward()
    got = conv.sample_abs_grad().double()
    rounded = _unfold_abs(x.bfloat16().double(), d.bfloat16().double(), conv)
    assert torch.allclose(got, rounded, rtol=1e-5, atol=0)
    assert not torch.allclose(got, _unfold_abs(x.double(), d.double(), conv), rtol=1e-5, atol=0)


def test_mixed_product_only_where_it_wins():
    assert layers_mod._mixed_conv_wins(torch.empty(32, 256, 2, 2), (256, 256, 3, 3), 1)  # few positions
    assert layers_mod._mixed_conv_wins(torch.empty(8, 64, 56, 56), (64, 256, 1, 1), 1)  # 1x1
    assert not layers_mod._mixed_conv_wins(torch.empty(32, 64, 8, 8), (64, 64, 3, 3), 1)  # 3x3, 64 positions: oneDNN
    assert not layers_mod._mixed_conv_wins(torch.empty(8, 64, 56, 56), (64, 32, 1, 1), 2)  # groups: the convolution


def test_unfolded_product_only_where_it_wins():
    w = (256, 256, 3, 3)
    assert layers_mod._unfold_wins(torch.empty(32, 256, 2, 2), w, 1)
    assert not layers_mod._unfold_wins(torch.empty(32, 256, 4, 4), w, 1)  # 16 positions: oneDNN is faster
    assert not layers_mod._unfold_wins(torch.empty(32, 64, 1, 1), (64, 64, 3, 3), 1)  # narrow: oneDNN is faster
    assert not layers_mod._unfold_wins(torch.empty(32, 256, 2, 2), (256, 128, 3, 3), 2)  # groups: the convolution


def test_unbatched_conv_input():
    torch.manual_seed(3)
    conv = fa.AnalogConv2d(2, 3, 3, padding=1, config=_asgd())
    x = torch.randn(2, 5, 5)
    conv(x).sum().backward()
    conv2 = copy.deepcopy(conv)
    conv2.analog_abs.grad = None
    conv2(x.unsqueeze(0)).sum().backward()
    assert torch.allclose(conv.sample_abs_grad(), conv2.sample_abs_grad())


def _cancelling_step(layer_kind: str, update: str):
    """One Analog SGD step whose per-sample gradients cancel: S = 0, A > 0. Returns (dW, lr * A * G(W))."""
    lr, w0 = 0.1, 0.4
    cfg = _asgd(update=update, dw_min=1e-5)
    if layer_kind == "linear":
        layer = fa.AnalogLinear(3, 2, bias=False, config=cfg)
        x = torch.tensor([[1.0, 2.0, 0.5], [1.0, 2.0, 0.5]])

        def loss(y):
            return (y[0] - y[1]).sum()  # sample 0 pushes up, sample 1 down by as much
    else:
        layer = fa.AnalogConv1d(2, 2, 1, bias=False, config=cfg)
        x = torch.tensor([[[1.0, 1.0], [0.5, 0.5]]])  # two output positions with the same patch

        def loss(y):
            return (y[..., 0] - y[..., 1]).sum()  # position 0 up, position 1 down
    with torch.no_grad():
        layer.weight.fill_(w0)
    opt = fa.AnalogSGD(layer.parameters(), lr=lr, seed=3)
    opt.zero_grad()
    loss(layer(x)).backward()
    assert float(layer.weight.grad.abs().max()) == 0.0
    A = layer.sample_abs_grad()
    opt.step()
    G = w0 / 1.0  # linear device, tau 1: G(w) = w / tau
    expected = -lr * (A if A is not None else torch.zeros_like(layer.weight)) * G
    return layer.weight.detach() - w0, expected


@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
def test_cancelling_samples_drift_in_per_sample_mode_only(layer_kind):
    dW, expected = _cancelling_step(layer_kind, "per-sample")
    assert float(expected.abs().min()) > 0
    # Stochastic rounding of lr * A / 2 / dw_min pairs: an error of at most one pair (2 pulses).
    assert torch.allclose(dW, expected, atol=2.5e-5 * 1.4, rtol=0)
    dW, _ = _cancelling_step(layer_kind, "batch")
    assert float(dW.abs().max()) == 0.0


def test_batch_mode_has_no_companion_and_per_sample_differs():
    torch.manual_seed(4)
    batch = fa.AnalogLinear(6, 4, config=_asgd(update="batch"))
    per = fa.AnalogLinear(6, 4, config=_asgd(update="per-sample"))
    per.load_state_dict(batch.state_dict())
    assert batch.analog_abs is None and per.analog_abs is not None
    assert "analog_abs" not in dict(per.named_buffers()) and "analog_abs" not in per.state_dict()
    x = torch.randn(16, 6)
    outs = []
    for layer in (batch, per):
        opt = fa.AnalogSGD(layer.parameters(), lr=0.05, seed=9)
        assert all(p is not layer.analog_abs for g in opt.param_groups for p in g["params"])
        for _ in range(3):
            opt.zero_grad()
            layer(x).pow(2).mean().backward()
            opt.step()
        outs.append(layer.weight.detach().clone())
    assert not torch.equal(outs[0], outs[1])
    assert int(per.analog_pulses[0]) > int(batch.analog_pulses[0]), "per-sample writes send the pairs too"


def test_accumulation_sums_A_and_zero_grad_clears_it():
    torch.manual_seed(5)
    layer = fa.AnalogLinear(4, 3, config=_asgd())
    opt = fa.AnalogSGD(layer.parameters(), lr=0.1)
    x1, x2 = torch.randn(3, 4), torch.randn(5, 4)
    layer(x1).sum().backward()
    a1 = layer.sample_abs_grad().clone()
    layer(x2).sum().backward()
    both = layer.sample_abs_grad().clone()
    layer.analog_abs.grad = None
    layer(x2).sum().backward()
    assert torch.allclose(both, a1 + layer.sample_abs_grad())
    opt.zero_grad()
    assert layer.sample_abs_grad() is None
    layer(x1).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert float(layer.sample_abs_grad().abs().max()) == 0.0
    layer(x1).sum().backward()
    layer.zero_grad()
    assert layer.sample_abs_grad() is None


def test_a_gradient_set_by_hand_is_one_sample():
    """No backward through the layer: no A, e = 0, the batch-mode write."""
    results = []
    for update in ("per-sample", "batch"):
        torch.manual_seed(6)
        layer = fa.AnalogLinear(4, 3, config=_asgd(update=update))
        opt = fa.AnalogSGD(layer.parameters(), lr=0.1, seed=2)
        layer.weight.grad = torch.randn(3, 4)
        layer.bias.grad = torch.randn(3)
        opt.step()
        results.append(layer.weight.detach().clone())
    assert torch.equal(results[0], results[1])


def test_momentum_and_weight_decay_take_e_from_the_raw_gradient(monkeypatch):
    """With momentum the signal is not S; the pairs must still be lr * max(A - |S|, 0) / 2."""
    seen = []
    real = fa.AnalogSGD._analog_update

    def spy(self, analog, lr, **kw):  # what both the planned and the general update take: (p, layer, tid, signal, A)
        seen.extend(analog)
        return real(self, analog, lr, **kw)

    monkeypatch.setattr(fa.AnalogSGD, "_analog_update", spy)
    torch.manual_seed(7)
    layer = fa.AnalogLinear(4, 3, bias=False, config=_asgd())
    opt = fa.AnalogSGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, seed=2)
    x = torch.randn(8, 4)
    for _ in range(2):
        opt.zero_grad()
        layer(x).pow(2).sum().backward()
        S, A = layer.weight.grad.clone(), layer.sample_abs_grad().clone()
        opt.step()
    *_, signal, excess = seen[-1]
    assert excess is not None
    assert not torch.allclose(signal, S)
    assert torch.allclose((excess - signal.abs()).clamp(min=0), (A - S.abs()).clamp(min=0), atol=1e-6)


def test_tied_layers_share_one_companion():
    torch.manual_seed(8)
    a = nn.Linear(4, 4, bias=False)
    m = nn.Sequential(a, nn.Tanh(), a)
    m = fa.convert_to_analog(m, _asgd())
    assert m[0] is m[2]
    m2 = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 4, bias=False))
    m2[2].weight = m2[0].weight
    m2 = fa.convert_to_analog(m2, _asgd())
    assert m2[0].analog_abs is m2[2].analog_abs
    x = torch.randn(3, 4)
    m2(x).sum().backward()
    assert m2[0].sample_abs_grad() is not None
    assert sum(1 for _ in m2.parameters()) == 2  # one weight, one companion


def test_inplace_activation_after_the_layer_and_no_grad_forward():
    torch.manual_seed(9)
    m = nn.Sequential(fa.AnalogLinear(4, 5, config=_asgd()), nn.ReLU(inplace=True), fa.AnalogLinear(5, 2, config=_asgd()))
    x = torch.randn(3, 4)
    m(x).sum().backward()
    assert m[0].sample_abs_grad() is not None and m[2].sample_abs_grad() is not None
    with torch.no_grad():
        m(x)


def test_state_dict_round_trip_and_old_layers_load():
    torch.manual_seed(10)
    per = fa.AnalogLinear(4, 3, config=_asgd())
    sd = per.state_dict()
    assert "analog_abs" not in sd
    other = fa.AnalogLinear(4, 3, config=_asgd())
    other.load_state_dict(sd)  # strict
    assert torch.equal(other.weight, per.weight)
    batch = fa.AnalogLinear(4, 3, config=_asgd(update="batch"))
    batch.load_state_dict(sd)
    per.load_state_dict(batch.state_dict())


def test_bf16_autocast_and_bf16_sums(monkeypatch):
    torch.manual_seed(11)
    layer = fa.AnalogLinear(16, 8, config=_asgd())
    x = torch.randn(32, 16)
    layer(x).pow(2).sum().backward()
    exact = layer.sample_abs_grad().clone()
    layer.analog_abs.grad = None
    monkeypatch.setenv("FASTANALOG_SAMPLE_DTYPE", "bfloat16")
    layer(x).pow(2).sum().backward()
    assert layer.sample_abs_grad().dtype == torch.float32
    assert torch.allclose(layer.sample_abs_grad(), exact, rtol=2e-2, atol=1e-3)
    layer.analog_abs.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().pow(2).sum().backward()
    assert torch.isfinite(layer.sample_abs_grad()).all()
    assert torch.allclose(layer.sample_abs_grad(), exact, rtol=5e-2, atol=1e-2)


def test_sample_dtype_choice(monkeypatch):
    monkeypatch.delenv("FASTANALOG_SAMPLE_DTYPE")
    cpu = torch.device("cpu")
    assert sample_abs_dtype(cpu, torch.bfloat16) == torch.bfloat16
    assert sample_abs_dtype(cpu, torch.float32, conv=True) == torch.float32
    fast = layers_mod._cpu_bf16_gemm()
    assert sample_abs_dtype(cpu, torch.float32) == (torch.bfloat16 if fast else torch.float32)
    monkeypatch.setenv("FASTANALOG_SAMPLE_DTYPE", "float16")
    with pytest.raises(ValueError, match="FASTANALOG_SAMPLE_DTYPE"):
        sample_abs_dtype(cpu, torch.float32)


def test_sample_abs_sums_linear_matches_matmul():
    d, x = torch.randn(7, 3), torch.randn(7, 5)
    assert torch.allclose(sample_abs_sums(d, x, (3, 5), None, torch.float32), d.abs().t() @ x.abs())


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("algorithm", ["asgd", "rl", "rl2"])
def test_backends_agree_in_per_sample_mode(backend, algorithm, monkeypatch):
    """A few training steps of a small model: every backend gives the default backend's arrays."""
    if backend == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")

    def run():
        torch.manual_seed(12)
        cfg = fa.AnalogConfig(algorithm=algorithm, device=fa.PowerResponse(tau=0.6, gamma=0.5, dw_min=0.002), gamma=0.1, transfer_lr=0.1)
        m = fa.convert_to_analog(nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)), cfg)
        opt = fa.AnalogSGD(m.parameters(), lr=0.3, seed=5)
        x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 2, (4,))
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        return m.state_dict()

    want = run()
    monkeypatch.setenv("FASTANALOG_BACKEND", backend)
    got = run()
    for k in want:
        if want[k].is_floating_point():
            assert torch.allclose(got[k], want[k], rtol=0, atol=2e-7), k
        else:
            assert torch.equal(got[k], want[k]), k


def test_compiled_step_equals_eager_in_per_sample_mode():
    torch._dynamo.reset()

    def make():
        torch.manual_seed(13)
        m = fa.convert_to_analog(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), _asgd(dw_min=0.001))
        return m, fa.AnalogSGD(m.parameters(), lr=0.2, seed=4)

    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))

    def step(m, opt):
        F.cross_entropy(m(x), y).backward()
        opt.step()

    eager_m, eager_opt = make()
    comp_m, comp_opt = make()
    compiled = torch.compile(step)
    for _ in range(3):
        eager_opt.zero_grad()
        step(eager_m, eager_opt)
        comp_opt.zero_grad()
        compiled(comp_m, comp_opt)
    for k, v in eager_m.state_dict().items():
        assert torch.allclose(comp_m.state_dict()[k], v, rtol=0, atol=1e-6), k
    assert torch.equal(comp_m[0].analog_pulses, eager_m[0].analog_pulses)


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
@pytest.mark.parametrize("algorithm", ["asgd", "rl2"])
def test_non_finite_sums_with_a_finite_gradient(backend, algorithm, monkeypatch):
    """A is not part of the gradient check: a NaN A (set by hand) sends no pairs, an infinite one
    the capped pairs, on every backend alike, and the step goes through with finite arrays."""
    if backend == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    if backend == "cpp" and not fa.ops.cpp.cpp_available():
        pytest.skip("C++ kernels not built")
    monkeypatch.setenv("FASTANALOG_BACKEND", backend)
    torch.manual_seed(3)
    g = torch.randn(6, 8) * 0.05
    A = g.abs() * 3
    A[0, :3] = float("nan")
    A[1, :3] = float("inf")
    out = {}
    same = torch.where(A.isnan(), g.abs(), torch.where(A.isinf(), torch.full_like(A, 1e30), A))
    for name, sums in (("given", A), ("no excess for NaN, a huge one for inf", same)):
        torch.manual_seed(4)
        dev = fa.PowerResponse(tau=0.6, gamma=0.5, dw_min=0.01)
        layer = fa.AnalogLinear(8, 6, bias=False, config=fa.AnalogConfig(algorithm=algorithm, device=dev, gamma=0.1, max_pulses=5))
        opt = fa.AnalogSGD(layer.parameters(), lr=0.5, seed=1)
        layer.weight.grad = g.clone()
        layer.analog_abs.grad = sums.clone()
        opt.step()
        out[name] = layer.analog_state()
    for key, value in out["given"].items():
        if value is None:
            continue
        assert torch.isfinite(value).all(), key
        assert torch.equal(value, out["no excess for NaN, a huge one for inf"][key]), key


def test_mixed_precision_sums_of_a_linear_layer():
    """bfloat16 factors with float32 sums (the CPU's bf16 product): A equals the float32 product of
    the rounded factors within float32 rounding, and the layer uses it when asked for bfloat16."""
    if not fa.ops.cpp.bf16_gemm_available():
        pytest.skip("no mixed-precision product in this build")
    torch.manual_seed(8)
    # one tile with an odd row count; several tiles of rows and columns with tails; bf16 inputs
    for rows, n_out, n_in, dtype in ((37, 5, 11, torch.float32), (130, 70, 150, torch.float32), (64, 33, 65, torch.bfloat16)):
        d, x = torch.randn(rows, n_out).to(dtype), torch.randn(rows, n_in).to(dtype)
        got = fa.ops.cpp.abs_outer_bf16(d, x)
        want = d.abs().bfloat16().double().t() @ x.abs().bfloat16().double()
        assert got.dtype == torch.float32 and got.shape == (n_out, n_in)
        assert torch.allclose(got.double(), want, rtol=rows * 2**-24, atol=0), (rows, n_out, n_in)
        assert not torch.allclose(got.double(), d.double().abs().t() @ x.double().abs(), rtol=1e-6, atol=0) or dtype != torch.float32
    d, x = torch.randn(37, 5), torch.randn(37, 11)
    got = fa.ops.cpp.abs_outer_bf16(d, x)
    assert torch.equal(fa.ops.cpp.abs_outer_bf16(d[:0], x[:0]), torch.zeros(5, 11))
    assert torch.equal(sample_abs_sums(d, x, (5, 11), None, torch.bfloat16), got)
    with pytest.raises(RuntimeError, match="same rows"):
        fa.ops.cpp.abs_outer_bf16(d, x[:3])
