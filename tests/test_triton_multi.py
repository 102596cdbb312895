"""Multi-tensor Triton launches: many tensors of one config in one launch, each as the reference updates it alone.

Runs under the Triton interpreter on CPU tensors like ``test_triton_step.py``, whose
helpers, tolerances (``RTOL``, ``ATOL``, explained there) and configurations it uses.
Launches alternate between steps without and with the excess inputs ``As``; shard offsets
are not multiples of 4 and one crosses the Philox counter's 2^32 boundary.
"""

from __future__ import annotations

import pytest
import torch
from test_triton_step import (
    ALGOS,
    ATOL,
    CROSSING,
    DEVICE,
    RTOL,
    SEED,
    assert_arrays_close,
    assert_step_pulses_equal,
    assert_totals_equal,
    make_config,
    make_excess,
    make_state,
    run_step,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastanalog as fa
from fastanalog.ops import philox
from fastanalog.ops.triton import common
from fastanalog.ops.triton import ops as triton_ops
from fastanalog.ops.triton import step as triton_step
from fastanalog.ops.triton.common import block_size

# Odd sizes: a single element, less than a warp, a block's worth, and more than one block.
SIZES = (1, 7, 1023, block_size() + 5)
TENSOR_IDS = (0, 3, 4, 9)
OFFSETS = (0, 5, 123_456_789, CROSSING)  # shards of larger tensors

# Per variant: (family of W, family of P). asgd has no P.
FAMILIES = {
    "asgd": ("exp", None),
    "rl_transfer": ("linear", "power"),
    "rl_no_transfer": ("table", "exp"),
    "rl2_acc_t1": ("exp", "power"),
    "rl2_ema": ("table", "linear"),
}


def _array_lists(algo: str, states: list[dict]) -> list[list[torch.Tensor]]:
    names = {"asgd": ("W",), "rl": ("W", "P", "Wbar"), "rl2": ("W", "P", "H", "Wbar")}[ALGOS[algo][0]]
    return [[s[n] for s in states] for n in names]


def run_multi(algo: str, states: list[dict], grads: list[torch.Tensor], **kw):
    """One multi-tensor launch over ``states`` (one dict of arrays per tensor)."""
    algorithm, _, transfer = ALGOS[algo]
    arrays = _array_lists(algo, states)
    if algorithm == "asgd":
        return triton_ops.asgd_multi_step_triton(*arrays, grads, **kw)
    if algorithm == "rl":
        return triton_ops.rl_multi_step_triton(*arrays, grads, transfer=transfer, **kw)
    return triton_ops.rl2_multi_step_triton(*arrays, grads, **kw)


class LaunchCounter:
    """Wraps a Triton kernel and counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _count_kernel_launches(monkeypatch) -> LaunchCounter:
    counter = LaunchCounter(triton_step._step_kernel)
    monkeypatch.setattr(triton_step, "_step_kernel", counter)
    return counter


@pytest.mark.parametrize("algo", list(FAMILIES))
def test_one_launch_equals_the_reference_per_tensor(algo, monkeypatch):
    family, residual_family = FAMILIES[algo]
    config = make_config(
        algo, family, residual_family=residual_family, d2d=0.2, c2c=0.3, read_noise=0.02, max_pulses=4, asymmetry=0.15
    )
    ref = [make_state(config, n, seed=i) for i, n in enumerate(SIZES)]
    tri = [{k: v.clone() for k, v in s.items()} for s in ref]
    gen = torch.Generator().manual_seed(1)
    counter = _count_kernel_launches(monkeypatch)
    for step in range(1, 3):  # without, then with the excess inputs
        grads = [torch.randn(n, generator=gen).to(DEVICE) for n in SIZES]
        As = [make_excess(g, step + i) for i, g in enumerate(grads)] if step % 2 == 0 else None
        keys = [philox.step_key(SEED, step, tid) for tid in TENSOR_IDS]
        launches = counter.launches
        got = run_multi(algo, tri, grads, lr=0.1, config=config, keys=keys, tensor_ids=TENSOR_IDS, offsets=OFFSETS, As=As)
        assert counter.launches == launches + 1, "all tensors must go in one launch"
        for i, n in enumerate(SIZES):
            want = run_step(
                "ref",
                algo,
                ref[i],
                grads[i],
                config=config,
                key=keys[i],
                tensor_id=TENSOR_IDS[i],
                offset=OFFSETS[i],
                A=As[i] if As else None,
            )
            assert_step_pulses_equal(want, got[i], f"step {step} tensor {n}")
            for name in ref[i]:
                assert_arrays_close(tri[i][name], ref[i][name], f"{name} of {n} step {step}", RTOL, ATOL)


@pytest.mark.parametrize("totals", [False, True])
def test_one_launch_equals_single_launches_bit_for_bit(totals):
    """Narrow storage, gradients in another dtype, excess inputs and an empty tensor: the multi-tensor path changes no bit."""
    config = make_config("rl2_acc_t1", "power", residual_family="exp", d2d=0.2, c2c=0.2, read_noise=0.02, asymmetry=0.1)
    sizes = (0, *SIZES)
    tids = (7, *TENSOR_IDS)
    offsets = (3, *OFFSETS)
    multi = [make_state(config, n, dtype=torch.bfloat16, seed=i) for i, n in enumerate(sizes)]
    single = [{k: v.clone() for k, v in s.items()} for s in multi]
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(n)).to(DEVICE) for n in sizes]
    As = [make_excess(g, i).to(torch.float16) for i, g in enumerate(grads)]
    keys = [philox.step_key(SEED, 1, tid) for tid in tids]
    kw = dict(lr=0.1, config=config, totals=totals)
    got = run_multi("rl2_acc_t1", multi, grads, keys=keys, tensor_ids=tids, offsets=offsets, As=As, **kw)
    for i in range(len(sizes)):
        s = single[i]
        want = triton_ops.rl2_step_triton(
            s["W"], s["P"], s["H"], s["Wbar"], grads[i], key=keys[i], tensor_id=tids[i], offset=offsets[i], A=As[i], **kw
        )
        for field in ("first", "main", "first_pairs"):
            a, b = getattr(want, field), getattr(got[i], field)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (field, sizes[i])
        assert (got[i].first_pairs is None) == totals
        for name in s:
            assert torch.equal(s[name], multi[i][name]), (name, sizes[i])


def test_totals_of_one_launch():
    """Totals mode of a multi-tensor launch: per tensor the sums of the per-element launch, the same arrays."""
    config = make_config("rl_transfer", "table", residual_family="exp", c2c=0.2, read_noise=0.02, max_pulses=3)
    sizes = SIZES[:3]
    per_element = [make_state(config, n, seed=i) for i, n in enumerate(sizes)]
    totals = [{k: v.clone() for k, v in s.items()} for s in per_element]
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(n)).to(DEVICE) for n in sizes]
    As = [make_excess(g, i) for i, g in enumerate(grads)]
    kw = dict(lr=0.1, config=config, keys=[philox.step_key(SEED, 2, t) for t in TENSOR_IDS[:3]], tensor_ids=TENSOR_IDS[:3])
    kw.update(offsets=OFFSETS[:3], As=As)
    want = run_multi("rl_transfer", per_element, grads, **kw)
    got = run_multi("rl_transfer", totals, grads, totals=True, **kw)
    for i in range(len(sizes)):
        assert_totals_equal(want[i], got[i], f"tensor {i}")
        for name in per_element[i]:
            assert torch.equal(per_element[i][name], totals[i][name]), (name, i)


@pytest.mark.parametrize(
    "sizes,offsets,shift,flags",
    [
        ((16, 48, 32), (0, 4, CROSSING - 2), 0, (True, True)),  # aligned: vector accesses, lead 0
        ((16, 48, 32), (0, 4, 8), 1, (False, True)),  # one array starts 4 bytes into its storage
        ((16, 47, 32), (0, 4, 8), 0, (True, False)),  # a numel that is not a multiple of 16
    ],
)
def test_alignment_facts_of_one_launch(sizes, offsets, shift, flags, monkeypatch):
    """The launcher tells the kernel only true alignment facts, and every combination updates like single launches."""
    monkeypatch.setattr(common, "BLOCK_INTERPRETER", 16)
    config = make_config("rl2_ema", "linear")
    multi = [make_state(config, n + (shift if i == 1 else 0), seed=i) for i, n in enumerate(sizes)]
    multi[1] = {k: v[shift:] for k, v in multi[1].items()}
    single = [{k: v.clone() for k, v in s.items()} for s in multi]
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(n)).to(DEVICE) for n in sizes]
    As = [make_excess(g, i) for i, g in enumerate(grads)]
    keys = [philox.step_key(SEED, 1, t) for t in TENSOR_IDS[:3]]
    seen = []
    original = common.tensor_launch

    def spy(*args, **kwargs):
        launch = original(*args, **kwargs)
        seen.append((launch[1]["ALIGNED"], launch[1]["NUMEL16"]))
        return launch

    monkeypatch.setattr(triton_step, "tensor_launch", spy)
    kw = dict(lr=0.1, config=config)
    got = run_multi("rl2_ema", multi, grads, keys=keys, tensor_ids=TENSOR_IDS[:3], offsets=offsets, As=As, **kw)
    assert seen == [flags]
    for i, s in enumerate(single):
        want = triton_ops.rl2_step_triton(
            s["W"], s["P"], s["H"], s["Wbar"], grads[i], key=keys[i], tensor_id=TENSOR_IDS[i], offset=offsets[i], A=As[i], **kw
        )
        assert torch.equal(want.first, got[i].first) and torch.equal(want.main, got[i].main), i
        for name in s:
            assert torch.equal(s[name], multi[i][name]), (name, i)


def test_tensor_table_is_copied_once_per_set_of_tensors(monkeypatch):
    """Step after step on the same tensors only the step table (keys, pulse outputs) goes to the device."""
    config = make_config("asgd", "power", c2c=0.2)
    states = [make_state(config, n, seed=i) for i, n in enumerate(SIZES[:3])]
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(n)).to(DEVICE) for n in SIZES[:3]]
    copies = []
    original = common.device_table
    monkeypatch.setattr(common, "device_table", lambda values, where: copies.append(len(values)) or original(values, where))
    monkeypatch.setattr(common, "_TABLE_CACHE", type(common._TABLE_CACHE)())
    kw = dict(lr=0.1, config=config, tensor_ids=TENSOR_IDS[:3], offsets=OFFSETS[:3])
    for step in (1, 2):
        keys = [philox.step_key(SEED, step, t) for t in TENSOR_IDS[:3]]
        ref = [{"W": s["W"].clone()} for s in states]
        got = run_multi("asgd", states, grads, keys=keys, **kw)
        for i, s in enumerate(states):
            kw_ref = dict(config=config, key=keys[i], tensor_id=TENSOR_IDS[i], offset=OFFSETS[i])
            assert_step_pulses_equal(run_step("ref", "asgd", ref[i], grads[i], **kw_ref), got[i], f"step {step} tensor {i}")
            assert_arrays_close(s["W"], ref[i]["W"], f"W of {i} step {step}")
    # the tensor table once (first blocks, six scalar rows, six array rows); keys and three outputs every step
    assert copies == [4 + 3 * 6 + 3 * 6, 3 * 4, 3 * 4], copies
    other = [torch.randn(n, generator=torch.Generator().manual_seed(n)).to(DEVICE) for n in SIZES[:3]]
    run_multi("asgd", states, other, keys=keys, **kw)
    assert len(copies) == 5, "new gradient arrays are a new table"


@pytest.mark.parametrize("algo", ["rl_transfer", "rl_no_transfer", "rl2_ema"])
def test_without_mixed_weight_updates_the_arrays_alike(algo):
    """Wbar None (single and multi-tensor launches) updates W, P, H as a launch with a mixed weight does."""
    algorithm, _, transfer = ALGOS[algo]
    family, residual_family = FAMILIES[algo]
    config = make_config(algo, family, residual_family=residual_family, c2c=0.2, read_noise=0.02)
    sizes, tids = SIZES[:3], TENSOR_IDS[:3]
    with_mix = [make_state(config, n, seed=i) for i, n in enumerate(sizes)]
    single = [{k: v.clone() for k, v in s.items() if k != "Wbar"} for s in with_mix]
    multi = [{k: v.clone() for k, v in s.items() if k != "Wbar"} for s in with_mix]
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(n)).to(DEVICE) for n in sizes]
    keys = [philox.step_key(SEED, 1, tid) for tid in tids]
    kw = dict(lr=0.1, config=config, keys=keys, tensor_ids=tids)
    run_multi(algo, with_mix, grads, **kw)
    launch = triton_ops.rl_multi_step_triton if algorithm == "rl" else triton_ops.rl2_multi_step_triton
    extra = {"transfer": transfer} if algorithm == "rl" else {}
    names = ("W", "P") if algorithm == "rl" else ("W", "P", "H")
    launch(*[[s[n] for s in multi] for n in names], None, grads, **kw, **extra)
    single_launch = triton_ops.rl_step_triton if algorithm == "rl" else triton_ops.rl2_step_triton
    for i, s in enumerate(single):
        single_launch(*[s[n] for n in names], None, grads[i], lr=0.1, config=config, key=keys[i], tensor_id=tids[i], **extra)
        for name in names:
            assert torch.equal(s[name], with_mix[i][name]) and torch.equal(multi[i][name], with_mix[i][name]), (name, i)
        torch.testing.assert_close(with_mix[i]["Wbar"], with_mix[i]["W"] + config.gamma * with_mix[i]["P"])


def test_rejects_mixed_dtypes_and_lengths():
    config = make_config("asgd", "linear")
    W = [torch.zeros(4, device=DEVICE), torch.zeros(5, device=DEVICE, dtype=torch.bfloat16)]
    g = [torch.zeros(4, device=DEVICE), torch.zeros(5, device=DEVICE)]
    with pytest.raises(ValueError, match="share dtype"):
        triton_ops.asgd_multi_step_triton(W, g, lr=0.1, config=config, keys=[1, 2], tensor_ids=[0, 1])
    with pytest.raises(ValueError, match="one length"):
        triton_ops.asgd_multi_step_triton(W[:1], g[:1], lr=0.1, config=config, keys=[1, 2], tensor_ids=[0, 1])


# ---------------------------------------------------------------------------------------------
# AnalogSGD: one launch per group of tensors.
# ---------------------------------------------------------------------------------------------
class OpCounter(TorchDispatchMode):
    """Counts the ``fastanalog`` ops called under it."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastanalog":
            name = func.__name__.split(".")[0]
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _updates(ops: OpCounter) -> dict[str, int]:
    """The update launches among the counted fastanalog ops; the gradient check (one C++ pass over
    every gradient on CPU, when the C++ kernels are built) runs at most once per step beside them."""
    assert ops.calls.get("all_finite_cpp", 0) <= 1, ops.calls
    return {name: n for name, n in ops.calls.items() if name != "all_finite_cpp"}


def _five_layer_model(config: fa.AnalogConfig) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 9),
        nn.Tanh(),
        nn.Linear(9, 7),
        nn.Linear(7, 3),
    )
    return fa.convert_to_analog(m, config).to(DEVICE)


def _grads(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = (0.3 * torch.randn(p.shape, generator=gen)).to(device=DEVICE, dtype=p.dtype)


def test_optimizer_step_is_one_launch_and_equals_the_reference(monkeypatch):
    device = fa.PowerResponse(tau=0.6, gamma=0.5, dw_min=0.01, d2d_std=0.1, c2c_std=0.1)
    config = fa.AnalogConfig(
        algorithm="rl2", device=device, residual_device=fa.ExpResponse(tau=0.5, gamma=1.2, dw_min=0.01), read_noise=0.02
    )
    models = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("FASTANALOG_BACKEND", backend)
        model = models[backend] = _five_layer_model(config)
        assert sum(1 for _ in fa.analog_layers(model)) == 5
        opt = fa.AnalogSGD(model.parameters(), lr=0.2, momentum=0.3, seed=11)
        for step in range(1, 3):
            _grads(model, step)
            with OpCounter() as ops:
                opt.step()
            if backend == "triton":
                assert _updates(ops) == {"rl2_step": 1}, "one launch for the five analog tensors"
    tri, ref = models["triton"].state_dict(), models["reference"].state_dict()
    for name in ref:
        if "pulses" in name:
            assert torch.equal(tri[name], ref[name]), name
        else:
            torch.testing.assert_close(tri[name], ref[name], rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
    assert fa.total_pulses(models["triton"]) > 0


def test_optimizer_launches_once_per_config_and_dtype(monkeypatch):
    """Tensors of another config or storage dtype form their own launch; digital parameters none."""
    monkeypatch.setenv("FASTANALOG_BACKEND", "triton")
    model = _five_layer_model(fa.AnalogConfig(algorithm="asgd", device=fa.LinearResponse(tau=1.0, dw_min=0.01)))
    model[7] = fa.convert_to_analog(nn.Linear(7, 3), fa.AnalogConfig(algorithm="rl", device=fa.LinearResponse(tau=1.0)))
    model[6].to(torch.bfloat16)
    opt = fa.AnalogSGD(model.parameters(), lr=0.2, seed=1)
    _grads(model, 1)
    with OpCounter() as ops:
        opt.step()
    assert _updates(ops) == {"asgd_step": 2, "rl_step": 1}
