"""Multi-tensor C++ steps: a group of tensors of one config in one op call, each as it is updated alone.

Uses the helpers and the tolerance of ``test_cpp_step.py``. The group mixes sizes (one
element, less than a block, several blocks and both threads' shares), tensor ids (so
device-to-device parameters differ per tensor) and offsets (shards of larger tensors, at
offsets that are not multiples of four, one across the Philox call counter's 32-bit word).
With two threads the partition cuts the group inside a tensor and across tensors. Cases run
without and with an excess (the per-sample |g| sums ``As``: net counts and pairs).
"""

from __future__ import annotations

import pytest
import torch
from test_cpp_step import ALGORITHMS, SEED, _config, _device, _excess, _gradients, _initial, _tolerance
from torch.utils._python_dispatch import TorchDispatchMode

import fastanalog as fa
from fastanalog.ops import cpp, philox
from fastanalog.ops.reference import asgd_step_ref, rl2_step_ref, rl_step_ref

SIZES = (1, 7, 1000, 70001)
TENSOR_IDS = (0, 3, 4, 9)
OFFSETS = (0, 5, 123_456_789, 2**34 - 6)
LR = 0.004

# The arrays each algorithm's launchers take before g, as indices into _initial's (W, P, H, Wbar).
_ROLES = {"asgd": (0,), "rl": (0, 1, 3), "rl2": (0, 1, 2, 3)}


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    assert cpp.cpp_available(), f"the C++ kernels did not build or load: {cpp._state['error']}"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _group(config, dtype=torch.float32):
    """Per tensor: the list (W, P, H, Wbar), each tensor with its own initial values."""
    return [_initial(config, n, dtype, seed=i) for i, n in enumerate(SIZES)]


def _single(impl: str, config, arrays, g, key, tensor_id, offset, transfer, mixed=True, totals=False, A=None):
    W, P, H, Wbar = arrays
    Wbar = Wbar if mixed else None
    kw = dict(lr=LR, config=config, key=key, tensor_id=tensor_id, offset=offset, A=A)
    if impl == "cpp":
        fns = {"asgd": cpp.asgd_step_cpp, "rl": cpp.rl_step_cpp, "rl2": cpp.rl2_step_cpp}
        kw["totals"] = totals
    else:
        fns = {"asgd": asgd_step_ref, "rl": rl_step_ref, "rl2": rl2_step_ref}
    if config.algorithm == "asgd":
        return fns["asgd"](W, g, **kw)
    if config.algorithm == "rl":
        return fns["rl"](W, P, Wbar, g, transfer=transfer, **kw)
    return fns["rl2"](W, P, H, Wbar, g, **kw)


def _multi(config, group, grads, keys, transfer, mixed=True, totals=False, As=None):
    lists = [[arrays[r] for arrays in group] for r in _ROLES[config.algorithm]]
    if config.algorithm != "asgd" and not mixed:
        lists[-1] = None
    kw = dict(lr=LR, config=config, keys=keys, tensor_ids=list(TENSOR_IDS), offsets=list(OFFSETS), totals=totals, As=As)
    if config.algorithm == "asgd":
        return cpp.asgd_multi_step_cpp(*lists, grads, **kw)
    if config.algorithm == "rl":
        return cpp.rl_multi_step_cpp(*lists, grads, transfer=transfer, **kw)
    return cpp.rl2_multi_step_cpp(*lists, grads, **kw)


def _keys(step: int) -> list[int]:
    return [philox.step_key(SEED, step, t) for t in TENSOR_IDS]


def _grads(step: int, dtype=torch.float32):
    return [_gradients(n, 1, dtype, seed=100 * step + i)[0] for i, n in enumerate(SIZES)]


def _excesses(grads, excess: bool, dtype=None):
    """Each tensor's A (tensor 1's in bfloat16 when the others are float32), or None."""
    if not excess:
        return None
    return [_excess(g, dtype or (torch.bfloat16 if i == 1 else None), seed=i) for i, g in enumerate(grads)]


# (device of W, device of P): families and options that take every kernel path (fused
# linear, packed transcendental responses, tables, d2d parameters per tensor id, c2c noise).
DEVICES = {
    "power_d2d": (_device("power", d2d_std=0.2, variation_seed=3), _device("exp", c2c_std=0.2)),
    "linear": (_device("linear"), _device("linear")),
    "table_c2c": (_device("table", c2c_std=0.3), _device("power", d2d_std=0.1, asymmetry=0.1)),
}


@pytest.mark.parametrize("excess", [False, True])
@pytest.mark.parametrize("devices", list(DEVICES))
@pytest.mark.parametrize("alg", list(ALGORITHMS))
def test_one_call_equals_the_reference_per_tensor(alg, devices, excess):
    dev_w, dev_p = DEVICES[devices]
    config, transfer = _config(alg, dev_w, dev_p, read_noise=0.01, max_pulses=5)
    ref, fast = _group(config), None
    fast = [[t.clone() for t in arrays] for arrays in ref]
    for k in range(1, 3):
        grads, keys = _grads(k), _keys(k)
        As = _excesses(grads, excess)
        expected = [
            _single("ref", config, ref[i], grads[i], keys[i], TENSOR_IDS[i], OFFSETS[i], transfer, A=As and As[i])
            for i in range(len(SIZES))
        ]
        got = _multi(config, fast, grads, keys, transfer, As=As)
        assert len(got) == len(SIZES)
        for i, (r, c) in enumerate(zip(expected, got)):
            assert torch.equal(r.first, c.first), f"step {k}, tensor {i}: pulses of the first array differ"
            assert (r.first_pairs is None) == (c.first_pairs is None) == (not excess)
            if excess:
                assert torch.equal(r.first_pairs, c.first_pairs), f"step {k}, tensor {i}: pairs of the first array differ"
            assert (r.main is None) == (c.main is None)
            if r.main is not None:
                assert torch.equal(r.main, c.main), f"step {k}, tensor {i}: pulses of W differ"
            for name, x, y in zip(("W", "P", "H", "Wbar"), ref[i], fast[i]):
                torch.testing.assert_close(
                    y, x, rtol=0, atol=_tolerance(x, k), msg=lambda m, n=name, i=i: f"tensor {i}, {n}: {m}"
                )
    assert sum(int(r.first.abs().sum()) for r in expected) > 0, "the case must write pulses"
    assert not excess or sum(int(r.first_pairs.sum()) for r in expected) > 0, "the case must write pairs"


@pytest.mark.parametrize("excess", [False, True])
@pytest.mark.parametrize("mixed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alg", list(ALGORITHMS))
def test_one_call_equals_single_calls_bit_for_bit(alg, dtype, mixed, excess):
    config, transfer = _config(alg, _device("power", d2d_std=0.1, c2c_std=0.2, variation_seed=5), read_noise=0.01)
    single = _group(config, dtype)
    multi = [[t.clone() for t in arrays] for arrays in single]
    grads, keys = _grads(1, dtype), _keys(1)
    As = _excesses(grads, excess)
    expected = [
        _single("cpp", config, single[i], grads[i], keys[i], TENSOR_IDS[i], OFFSETS[i], transfer, mixed, True, As and As[i])
        for i in range(len(SIZES))
    ]
    got = _multi(config, multi, grads, keys, transfer, mixed, totals=True, As=As)
    for i, (s, m) in enumerate(zip(expected, got)):
        assert m.first.dtype == torch.int64 and m.first.dim() == 0 and m.first_pairs is None
        assert int(s.first) == int(m.first)
        assert (s.main is None) == (m.main is None) and (s.main is None or int(s.main) == int(m.main))
        for name, x, y in zip(("W", "P", "H", "Wbar"), single[i], multi[i]):
            assert torch.equal(x, y), f"tensor {i}, {name} differs"
    if config.algorithm != "asgd" and not mixed:
        assert not any(arrays[3].any() for arrays in multi), "a mixed weight was written though none was asked for"


@pytest.mark.parametrize("excess", [False, True])
@pytest.mark.parametrize("alg", list(ALGORITHMS))
def test_totals_equal_the_sum_of_the_counts(alg, excess):
    config, transfer = _config(alg, _device("power", c2c_std=0.2), read_noise=0.01, max_pulses=6)
    counted = _group(config)
    summed = [[t.clone() for t in arrays] for arrays in counted]
    grads, keys = _grads(1), _keys(1)
    As = _excesses(grads, excess)
    c = _multi(config, counted, grads, keys, transfer, As=As)
    t = _multi(config, summed, grads, keys, transfer, totals=True, As=As)
    for x, y in zip(c, t):
        pairs = 2 * int(x.first_pairs.sum()) if excess else 0
        assert x.first.dtype == torch.int32 and int(y.first) == int(x.first.abs().sum()) + pairs == int(x.first_total())
        assert (x.main is None) == (y.main is None) and (x.main is None or int(y.main) == int(x.main.abs().sum()))
    assert sum(int(y.first) for y in t) > 0
    for a, b in zip(counted, summed):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_rejects_bad_groups():
    config, transfer = _config("rl2_acc_thr1", _device("linear"))
    group = _group(config)
    grads, keys = _grads(1), _keys(1)
    W, P, H, Wbar = ([arrays[r] for arrays in group] for r in range(4))
    kw = dict(lr=LR, config=config, keys=keys, tensor_ids=list(TENSOR_IDS))
    with pytest.raises(ValueError, match="one length"):
        cpp.rl2_multi_step_cpp(W, P[:2], H, Wbar, grads, **kw)
    with pytest.raises(ValueError, match="offset"):
        cpp.rl2_multi_step_cpp(W, P, H, Wbar, grads, offsets=[0, -1, 0, 0], **kw)
    with pytest.raises(RuntimeError, match="overlap"):  # one array given twice: two tensors would write it at once
        cpp.rl2_multi_step_cpp(W, P, [H[0], H[1], H[2], P[3]], Wbar, grads, **kw)
    with pytest.raises(RuntimeError, match="one dtype"):
        cpp.rl2_multi_step_cpp([W[0], W[1].double(), W[2], W[3]], P, H, Wbar, grads, **kw)
    with pytest.raises(RuntimeError, match="elements"):
        cpp.rl2_multi_step_cpp(W, [P[0], P[1], P[2][:5], P[3]], H, Wbar, grads, **kw)
    with pytest.raises(ValueError, match="CPU or CUDA"):
        cpp.rl2_multi_step_cpp([W[0].to("meta"), *W[1:]], P, H, Wbar, grads, **kw)
    As = [g.abs() + 0.1 for g in grads]
    with pytest.raises(ValueError, match="one length"):
        cpp.rl2_multi_step_cpp(W, P, H, Wbar, grads, As=As[:3], **kw)
    with pytest.raises(ValueError, match=r"As\[2\].*elements"):
        cpp.rl2_multi_step_cpp(W, P, H, Wbar, grads, As=[As[0], As[1], As[2][:5], As[3]], **kw)
    with pytest.raises(ValueError, match=r"As\[0\].*floating"):
        cpp.rl2_multi_step_cpp(W, P, H, Wbar, grads, As=[As[0].int(), *As[1:]], **kw)
    with pytest.raises(ValueError, match=r"As\[3\].*contiguous"):
        cpp.rl2_multi_step_cpp(W, P, H, Wbar, grads, As=[*As[:3], torch.ones(2 * SIZES[3])[::2]], **kw)
    with pytest.raises(RuntimeError, match="overlap"):  # A read where a tensor of the step writes
        cpp.rl2_multi_step_cpp(W, P, H, Wbar, grads, As=[As[0], As[1], H[2], As[3]], **kw)
    shared = torch.rand(max(SIZES)) + 2.0  # read-only arrays may share memory
    cpp.rl2_multi_step_cpp([w.clone() for w in W], [p.clone() for p in P], [h.clone() for h in H], None, grads,
                           As=[shared[: w.numel()] for w in W], **kw)  # fmt: skip
    for arrays, before in zip(group, _group(config)):  # a rejected call changes nothing
        for x, y in zip(arrays, before):
            assert torch.equal(x, y)


@pytest.mark.parametrize("alg", ["asgd", "rl_transfer", "rl_hold", "rl2_acc_thr1"])
def test_opcheck_schema_and_fake(alg):
    from fastanalog.ops import packing

    config, transfer = _config(alg, _device("power", c2c_std=0.1), _device("table", d2d_std=0.1))
    group = [_initial(config, n, torch.float32, seed=i) for i, n in enumerate((33, 5, 300))]
    W, P, H, Wbar = ([arrays[r] for arrays in group] for r in range(4))
    grads = [torch.randn(t.numel()) for t in W]
    As = [g.abs() + 0.3 for g in grads]
    first = [torch.empty(t.numel(), dtype=torch.int32) for t in W]
    pairs = [torch.empty(t.numel(), dtype=torch.int32) for t in W]
    main = [torch.empty(t.numel() if transfer is not False else 0, dtype=torch.int32) for t in W]
    packed = packing.pack_op_config(config)
    common = ([5, 6, 7], [0, 3, 1], [1, 2, 3], packing.step_floats(config, LR, bool(transfer)), list(packed.devices),
              list(packed.tables), list(packed.seeds))  # fmt: skip
    op = getattr(torch.ops.fastanalog, f"{config.algorithm}_step").default
    for excess in (As, []):
        p = pairs if excess else []
        if config.algorithm == "asgd":
            args = (W, grads, excess, first, p, *common)
        elif config.algorithm == "rl":
            args = (W, P, Wbar, grads, excess, first, p, main, *common)
        else:
            args = (W, P, H, [], grads, excess, first, p, main, *common)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        native = (packing.ALGORITHM_IDS[config.algorithm], W, P if config.has_residual else [],
                  H if config.algorithm == "rl2" else [], [], grads, excess, first, p,
                  main if config.has_residual else [], *common)  # fmt: skip
        torch.library.opcheck(torch.ops.fastanalog._native_step.default, native, test_utils=("test_schema", "test_faketensor"))


class OpCounter(TorchDispatchMode):
    """Counts the fastanalog ops called under it."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if func.namespace == "fastanalog":
            self.calls[name.split(".")[0]] = self.calls.get(name.split(".")[0], 0) + 1
        return func(*args, **(kwargs or {}))


def test_optimizer_steps_each_config_in_one_call(monkeypatch):
    monkeypatch.setenv("FASTANALOG_BACKEND", "cpp")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(5 * 6 * 6, 7), torch.nn.Linear(7, 3)
    )
    net = fa.convert_to_analog(net, fa.AnalogConfig(algorithm="rl2", device=_device("power"), gamma=0.2))
    net[4] = fa.convert_to_analog(torch.nn.Linear(7, 3), fa.AnalogConfig(algorithm="asgd", device=_device("linear")))
    opt = fa.AnalogSGD(net.parameters(), lr=0.05, seed=9)
    torch.nn.functional.cross_entropy(net(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 0])).backward()
    from fastanalog.ops import library

    native_calls = []
    native = library._native
    monkeypatch.setattr(library, "_native", lambda algorithm, a: (native_calls.append(algorithm), native(algorithm, a)))
    with OpCounter() as ops:
        opt.step()
    steps = {k: v for k, v in ops.calls.items() if "step" in k}
    # One call of each config's op, whose CPU kernel ran the C++ kernels once.
    assert steps == {"rl2_step": 1, "asgd_step": 1}, f"one call per config, got {steps}"
    assert sorted(native_calls) == ["asgd", "rl2"]
    assert fa.total_pulses(net) > 0
