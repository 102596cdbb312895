"""The compiled kernels (fastanalog.ops.cpp) against the reference update rules.

Every case runs the reference and the C++ kernel on identical copies of the arrays for a
few optimizer steps with fresh step keys and requires:

* pulse counts equal element for element, every step: the net counts of every written array
  and, with an excess ``A`` (per-sample |g| sums), the pairs of the first array;
* arrays within ``_tolerance``. The kernels call the same vector-math functions as torch's
  CPU kernels, so the arrays are normally bit-identical; the one allowed difference is
  torch's scalar ``std::pow`` on the last (numel mod 16) elements of each of its thread
  chunks where the kernels use Sleef, which may change the response of a power-family
  element by one ulp (relative 2**-24). That moves a written value by at most about one
  ulp of the stored value per step, so the tolerance is two ulps of the storage dtype at
  the arrays' scale per step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from kernel_harness import cpu_has

import fastanalog as fa
from fastanalog.ops import cpp, philox
from fastanalog.ops.reference import asgd_step_ref, rl2_step_ref, rl_step_ref

SEED = 1234
TENSOR_ID = 3
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    assert cpp.cpp_available(), f"the C++ kernels did not build or load: {cpp._state['error']}"


# ----- devices, configurations, algorithms ---------------------------------------------------
def _device(family: str, **opts) -> fa.ResponseDevice:
    if family == "linear":
        return fa.LinearResponse(tau_min=-0.5, tau_max=0.7, dw_min=0.002, **opts)
    if family == "power":
        return fa.PowerResponse(tau=0.6, gamma=0.6, dw_min=0.001, **opts)
    if family == "sqrt":  # gamma 0.5 (the default): the square root where the exponent is one number
        return fa.PowerResponse(tau=0.6, gamma=0.5, dw_min=0.001, **opts)
    if family == "exp":
        return fa.ExpResponse(tau=0.8, gamma=1.5, dw_min=0.001, **opts)
    if family == "exp_neg":
        return fa.ExpResponse(tau=0.8, gamma=-1.2, dw_min=0.001, **opts)
    if family == "table":
        up = (2.0, 1.6, 1.1, 0.7, 0.0)
        down = (0.0, 0.5, 0.9, 1.4, 1.9)
        return fa.TableResponse(tau=0.6, dw_min=0.001, up=up, down=down, **opts)
    raise ValueError(family)


FAMILIES = ("linear", "power", "sqrt", "exp", "table")

# Device options and config options of each option set.
OPTION_SETS = {
    "plain": ({}, {}),
    "d2d": ({"d2d_std": 0.2, "variation_seed": 3}, {}),
    "c2c": ({"c2c_std": 0.3}, {}),
    "asym_read_cap": ({"asymmetry": 0.15}, {"read_noise": 0.01, "max_pulses": 3}),
    "all_unshifted": (
        {"d2d_std": 0.1, "c2c_std": 0.2, "asymmetry": -0.1, "variation_seed": 8},
        {"read_noise": 0.02, "max_pulses": 4, "zero_shift": False},
    ),
}

# name -> (algorithm, config options, rl transfer flag)
ALGORITHMS = {
    "asgd": ("asgd", {}, None),
    "rl_transfer": ("rl", {"transfer_lr": 0.3}, True),
    "rl_hold": ("rl", {"transfer_lr": 0.3}, False),
    "rl2_acc_thr1": ("rl2", {"transfer_lr": 0.2}, None),
    "rl2_acc_thr2": ("rl2", {"transfer_lr": 0.2, "threshold": 2.0}, None),
    "rl2_ema": ("rl2", {"transfer_lr": 0.4, "buffer": "ema"}, None),
}


def _config(
    alg: str, device: fa.ResponseDevice, residual: fa.ResponseDevice | None = None, **extra
) -> tuple[fa.AnalogConfig, bool | None]:
    algorithm, opts, transfer = ALGORITHMS[alg]
    return fa.AnalogConfig(algorithm=algorithm, device=device, residual_device=residual, gamma=0.2, **opts, **extra), transfer


# ----- running both implementations ---------------------------------------------------------------
def _initial(config: fa.AnalogConfig, n: int, dtype: torch.dtype, seed: int = 0):
    """W inside the range, small P and H, float32 values rounded to the storage dtype."""
    gen = torch.Generator().manual_seed(seed)
    dev = config.device
    W = torch.rand(n, generator=gen) * (0.8 * dev.tau_max - 0.8 * dev.tau_min) + 0.8 * dev.tau_min
    P = (torch.randn(n, generator=gen) * 0.05).clamp(-0.3, 0.3)
    H = torch.randn(n, generator=gen) * 2e-3
    Wbar = torch.zeros(n)
    return [t.to(dtype) for t in (W, P, H, Wbar)]


def _gradients(n: int, steps: int, dtype: torch.dtype, seed: int = 1, scale: float = 1.5):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=gen) * scale).to(dtype) for _ in range(steps)]


def _excess(g: torch.Tensor, dtype: torch.dtype | None = None, seed: int = 2) -> torch.Tensor:
    """Per-sample |g| sums for gradient g: about 70% of the elements A >= |g| (pairs up to a few
    pulses), 20% A = |g| (no excess) and 10% A < |g| (an inconsistent input: e = 0)."""
    gen = torch.Generator().manual_seed(seed)
    g32 = g.float().abs()
    r = torch.rand(g.numel(), generator=gen)
    extra = torch.rand(g.numel(), generator=gen) * 3.0
    A = torch.where(r < 0.7, g32 + extra, torch.where(r < 0.9, g32, g32 * 0.5))
    return A.to(dtype or g.dtype)


def _step(impl: str, alg: str, arrays, g, config, transfer, key: int, offset: int, mixed: bool = True, A=None):
    W, P, H, Wbar = arrays
    Wbar = Wbar if mixed else None
    kw = dict(lr=0.004, config=config, key=key, tensor_id=TENSOR_ID, offset=offset, A=A)
    algorithm = config.algorithm
    if impl == "ref":
        fns = {"asgd": asgd_step_ref, "rl": rl_step_ref, "rl2": rl2_step_ref}
    else:
        fns = {"asgd": cpp.asgd_step_cpp, "rl": cpp.rl_step_cpp, "rl2": cpp.rl2_step_cpp}
    if algorithm == "asgd":
        return fns["asgd"](W, g, **kw)
    if algorithm == "rl":
        return fns["rl"](W, P, Wbar, g, transfer=transfer, **kw)
    return fns["rl2"](W, P, H, Wbar, g, **kw)


def _tolerance(expected: torch.Tensor, steps: int) -> float:
    scale = max(1.0, float(expected.float().abs().max())) if expected.numel() else 1.0
    return 2 * steps * torch.finfo(expected.dtype).eps * scale


def _compare(
    alg: str,
    config,
    transfer,
    n: int,
    dtype=torch.float32,
    steps: int = STEPS,
    offset: int = 0,
    g_dtype=None,
    g_scale: float = 1.5,
    mixed: bool = True,
    excess: bool = False,
    a_dtype=None,
):
    """Both implementations over ``steps`` steps; ``mixed=False``: the C++ kernels write no mixed weight;
    ``excess``: the steps take an ``A`` (in ``a_dtype``, default g's dtype)."""
    ref_arrays = _initial(config, n, dtype)
    cpp_arrays = [t.clone() for t in ref_arrays]
    pairs = 0
    for k, g in enumerate(_gradients(n, steps, g_dtype or dtype, scale=g_scale), start=1):
        key = philox.step_key(SEED, k, TENSOR_ID)
        A = _excess(g, a_dtype, seed=k) if excess else None
        r = _step("ref", alg, ref_arrays, g, config, transfer, key, offset, A=A)
        c = _step("cpp", alg, cpp_arrays, g, config, transfer, key, offset, mixed, A=A)
        assert c.first.dtype == torch.int32
        assert torch.equal(r.first, c.first), (
            f"step {k}: pulses of the first array differ at {int((r.first != c.first).sum())} elements"
        )
        if A is None:
            assert r.first_pairs is None and c.first_pairs is None
        else:
            assert c.first_pairs is not None and c.first_pairs.dtype == torch.int32
            assert torch.equal(r.first_pairs, c.first_pairs), (
                f"step {k}: pairs of the first array differ at {int((r.first_pairs != c.first_pairs).sum())} elements"
            )
            pairs += int(r.first_pairs.sum())
        if r.main is None:
            assert c.main is None
        else:
            assert torch.equal(r.main, c.main), f"step {k}: pulses of W differ at {int((r.main != c.main).sum())} elements"
        for name, x, y in zip(("W", "P", "H", "Wbar"), ref_arrays, cpp_arrays):
            if name == "Wbar" and not mixed:
                assert not y.any(), "a mixed weight was written though none was asked for"
                continue
            torch.testing.assert_close(
                y, x, rtol=0, atol=_tolerance(x, k), msg=lambda m, name=name, k=k: f"step {k}, {name}: {m}"
            )
    if excess and n > 100:
        assert pairs > 0, "the case must write pairs"
    return ref_arrays, cpp_arrays


# ----- the extension ---------------------------------------------------------------------------
def test_ops_registered_for_cpu():
    # One op per algorithm, a kernel per device; the compiled library registers the CPU kernel of
    # their private twin, and no op of the old per-backend family exists.
    for name in ("asgd_step", "rl_step", "rl2_step"):
        for key in ("CPU", "CUDA", "CompositeExplicitAutograd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastanalog::{name}", key), (name, key)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastanalog::_native_step", "CPU")
    for name in ("asgd_step_cpp_", "rl_step_cpp_", "rl2_step_cpp_", "multi_step_cpp_"):
        assert not hasattr(torch.ops.fastanalog, name), name
    assert cpp.cpu_variant() in ("avx512", "avx2", "generic")


def _cuda_toolkit() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return os.path.exists(os.path.join(home, "bin", "nvcc"))


@pytest.mark.skipif(
    torch.version.cuda is None or not _cuda_toolkit(), reason="no CUDA toolkit: the CUDA kernels are not built"
)
def test_cuda_kernels_registered_when_built():
    if cpp._state["source"] == "jit":
        pytest.skip("the prebuilt library is absent (JIT build of the CPU kernels only)")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastanalog::_native_step", "CUDA")
    assert cpp.cuda_kernels_registered()
    assert cpp.cuda_available() == torch.cuda.is_available()


# ----- equivalence with the reference ------------------------------------------------------------
@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("alg", list(ALGORITHMS))
def test_matches_reference(alg, family, options):
    dev_opts, cfg_opts = OPTION_SETS[options]
    config, transfer = _config(alg, _device(family, **dev_opts), **cfg_opts)
    _compare(alg, config, transfer, n=1023)


@pytest.mark.parametrize("options", ["plain", "c2c", "asym_read_cap", "all_unshifted"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("alg", list(ALGORITHMS))
def test_matches_reference_with_excess(alg, family, options):
    # Per-sample writes: N_up and N_down of the first array, pairs (capped by max_pulses in
    # two option sets), both responses where both directions pulse, c2c noise of both.
    dev_opts, cfg_opts = OPTION_SETS[options]
    config, transfer = _config(alg, _device(family, **dev_opts), **cfg_opts)
    _compare(alg, config, transfer, n=1023, excess=True)


@pytest.mark.parametrize("a_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alg", ["asgd", "rl_transfer", "rl2_acc_thr1"])
def test_excess_in_reduced_precision(alg, a_dtype):
    # A in bf16 or f16 beside float32 arrays and gradients (the kernels widen it as they read it).
    config, transfer = _config(alg, _device("power", c2c_std=0.2, asymmetry=0.1), read_noise=0.01)
    _compare(alg, config, transfer, n=2053, excess=True, a_dtype=a_dtype)


# Gradient scales giving about 1%, 10% and 100% of the first array's elements a pulse: the
# power and exp responses are then evaluated on the few vectors holding a pulsing element,
# on the packed pulsing elements, and on every element (three code paths).
@pytest.mark.parametrize("excess", [False, True])
@pytest.mark.parametrize("g_scale", [0.003, 0.04, 1.5])
@pytest.mark.parametrize("family", ["power", "sqrt", "exp"])
@pytest.mark.parametrize("alg", ["asgd", "rl_transfer", "rl2_acc_thr1", "rl2_ema"])
def test_pulse_density(alg, family, g_scale, excess):
    config, transfer = _config(alg, _device(family))
    ref, _ = _compare(alg, config, transfer, n=4096, g_scale=g_scale, excess=excess and g_scale > 0.01)
    first = ref[0] if alg == "asgd" else ref[1]
    assert not torch.equal(first, _initial(config, 4096, torch.float32)[0 if alg == "asgd" else 1]), "no element was written"


@pytest.mark.parametrize("excess", [False, True])
@pytest.mark.parametrize("options", ["plain", "c2c"])
@pytest.mark.parametrize("family", ["linear", "power"])
@pytest.mark.parametrize("alg", ["rl_transfer", "rl_hold", "rl2_acc_thr1", "rl2_ema"])
def test_without_mixed_weight(alg, family, options, excess):
    """With no mixed weight asked for (an empty Wbar), W, P and H are updated exactly as with one (fused and segment paths)."""
    dev_opts, cfg_opts = OPTION_SETS[options]
    config, transfer = _config(alg, _device(family, **dev_opts), **cfg_opts)
    _compare(alg, config, transfer, n=1023, mixed=False, excess=excess)


def test_mix_matches_reference():
    from fastanalog.ops.reference import mixed_weight

    gen = torch.Generator().manual_seed(5)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 6.5e4, -6.5e4, 3e38, 1e-40, -1e-45])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        W, P = (torch.randn(100003, generator=gen).to(dtype) for _ in range(2))
        # NaN, infinities, signed zeros, sums that overflow the dtype and subnormals, across vector lanes
        W[40:50], P[40:50] = special.to(dtype), special.flip(0).to(dtype)
        W[50:60], P[50:60] = special.to(dtype), special.to(dtype)
        got, want = cpp.mix_cpp(W, P, 0.3), mixed_weight(W, P, 0.3)
        nan = want.isnan()
        assert nan[40:60].any() and torch.equal(got.isnan(), nan), dtype
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(got[~nan].view(bits), want[~nan].view(bits)), dtype  # bit for bit: signed zeros, infinities
    # ... and as the step kernels write it
    config, transfer = _config("rl2_acc_thr1", _device("power"))
    arrays = _initial(config, 4099, torch.float32)
    _step("cpp", "rl2_acc_thr1", arrays, _gradients(4099, 1, torch.float32)[0], config, transfer, key=9, offset=0)
    W, P, _, Wbar = arrays
    assert torch.equal(Wbar, cpp.mix_cpp(W, P, config.gamma))


@pytest.mark.parametrize("excess", [False, True])
@pytest.mark.parametrize("n", [1, 7, 65537])
@pytest.mark.parametrize("alg", list(ALGORITHMS))
def test_sizes(alg, n, excess):
    # W and P on different families, with everything switched on.
    w_dev = _device("power", d2d_std=0.15, c2c_std=0.2, asymmetry=0.1, variation_seed=4)
    p_dev = _device("exp_neg", d2d_std=0.1, c2c_std=0.1, variation_seed=6)
    config, transfer = _config(alg, w_dev, residual=p_dev, read_noise=0.01)
    _compare(alg, config, transfer, n=n, excess=excess)


@pytest.mark.parametrize("alg", ["rl_transfer", "rl_hold", "rl2_acc_thr1", "rl2_ema"])
def test_distinct_nominal_devices(alg):
    # W and P on different devices without variation: each array's write must use its own
    # nominal parameters (the kernels hold them as loop invariants in this case).
    w_dev = fa.PowerResponse(tau=0.5, gamma=0.7, dw_min=0.002, asymmetry=0.1)
    p_dev = _device("exp_neg", c2c_std=0.1)
    config, transfer = _config(alg, w_dev, residual=p_dev, read_noise=0.01)
    _compare(alg, config, transfer, n=2053)


@pytest.mark.parametrize("excess", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alg", list(ALGORITHMS))
def test_narrow_storage(alg, dtype, excess):
    config, transfer = _config(alg, _device("power", c2c_std=0.2, d2d_std=0.1), read_noise=0.01)
    _compare(alg, config, transfer, n=4099, dtype=dtype, excess=excess)


@pytest.mark.parametrize("excess", [False, True])
@pytest.mark.parametrize("alg", ["asgd", "rl2_acc_thr1"])
def test_float32_gradient_with_narrow_storage(alg, excess):
    config, transfer = _config(alg, _device("linear", c2c_std=0.1))
    _compare(alg, config, transfer, n=1023, dtype=torch.bfloat16, g_dtype=torch.float32, excess=excess)


# Offsets: not multiples of four (a tensor's first and last Philox calls serve elements
# outside it); 2**32 - 600: the element counter of the device-to-device parameters crosses
# its 32-bit word; 2**34 - 6: the call counter of the streams (element index / 4) does.
OFFSETS = [5, 4097 + 3, 2**32 - 600, 2**34 - 6]


@pytest.mark.parametrize("excess", [False, True])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("alg", list(ALGORITHMS))
def test_offsets(alg, offset, excess):
    config, transfer = _config(alg, _device("table", d2d_std=0.1, c2c_std=0.2), read_noise=0.01, max_pulses=4)
    _compare(alg, config, transfer, n=1023, offset=offset, steps=2, excess=excess)


@pytest.mark.parametrize("offset", [3, 2**34 - 6])
@pytest.mark.parametrize("alg", ["asgd", "rl2_acc_thr1", "rl2_ema"])
def test_offsets_fused_paths(alg, offset):
    # Nominal linear and power devices without c2c noise take the one-loop paths.
    for family in ("linear", "power"):
        config, transfer = _config(alg, _device(family), read_noise=0.01)
        _compare(alg, config, transfer, n=1029, offset=offset, steps=2)


@pytest.mark.parametrize("excess", [False, True])
@pytest.mark.parametrize("alg", list(ALGORITHMS))
def test_shards_equal_the_unsharded_run(alg, excess):
    # A tensor cut into shards, each updated with its global offset, equals the whole.
    config, transfer = _config(alg, _device("power", d2d_std=0.2, c2c_std=0.2, asymmetry=0.1), read_noise=0.02)
    n, cuts = 4099, (0, 1000, 1001, 2900, 4099)
    whole = _initial(config, n, torch.float32)
    parts = [t.clone() for t in whole]
    for k, g in enumerate(_gradients(n, STEPS, torch.float32), start=1):
        key = philox.step_key(SEED, k, TENSOR_ID)
        A = _excess(g, seed=k) if excess else None
        full = _step("cpp", alg, whole, g, config, transfer, key, 0, A=A)
        for a, b in zip(cuts[:-1], cuts[1:]):
            shard = _step(
                "cpp", alg, [t[a:b] for t in parts], g[a:b], config, transfer, key, a, A=None if A is None else A[a:b]
            )
            assert torch.equal(shard.first, full.first[a:b]), f"step {k}, shard {a}:{b}: pulses of the first array differ"
            if full.first_pairs is not None:
                assert torch.equal(shard.first_pairs, full.first_pairs[a:b]), f"step {k}, shard {a}:{b}: pairs differ"
            if full.main is not None:
                assert torch.equal(shard.main, full.main[a:b]), f"step {k}, shard {a}:{b}: pulses of W differ"
        for name, x, y in zip(("W", "P", "H", "Wbar"), whole, parts):
            assert torch.equal(x, y), f"step {k}: {name} of the shards differs from the unsharded run"


def test_streams_not_needed_are_not_drawn():
    # The same step with and without the options that open streams 1-5: the net rounding of
    # the first array (stream 0) gives the same counts where A adds no pairs (A = |g|).
    config, _ = _config("asgd", _device("linear"))
    n = 4096
    g = _gradients(n, 1, torch.float32)[0]
    W0 = _initial(config, n, torch.float32)[0]
    key = philox.step_key(SEED, 1, TENSOR_ID)
    plain = cpp.asgd_step_cpp(W0.clone(), g, lr=0.004, config=config, key=key, tensor_id=TENSOR_ID)
    no_pairs = cpp.asgd_step_cpp(W0.clone(), g, lr=0.004, config=config, key=key, tensor_id=TENSOR_ID, A=g.abs())
    assert torch.equal(plain.first, no_pairs.first) and not no_pairs.first_pairs.any()
    # ... and the net rounding uses the words of stream 0, one call per four elements.
    u0 = philox.stream_uniform(philox.stream_key(key, philox.STREAM_ROUND_FIRST), 0, n)
    n_req = (-torch.tensor(0.004, dtype=torch.float32) * g) / torch.tensor(config.device.dw_min, dtype=torch.float32)
    expected = (torch.floor(n_req) + (u0 < n_req - torch.floor(n_req)).float()).to(torch.int32)
    assert torch.equal(plain.first, expected)


def test_steps_change_the_draws():
    # The same step twice from the same state gives the same pulses; a new key gives new ones.
    config, transfer = _config("rl2_ema", _device("linear"))
    start = _initial(config, 4096, torch.float32)
    g = _gradients(4096, 1, torch.float32)[0]
    runs = []
    for step in (1, 1, 2):
        arrays = [t.clone() for t in start]
        runs.append(_step("cpp", "rl2_ema", arrays, g, config, transfer, philox.step_key(SEED, step, TENSOR_ID), 0).first)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


# ----- the narrower instruction-set paths ----------------------------------------------------------
@pytest.mark.parametrize("variant", ["generic", "avx2"])
def test_narrower_paths_match_reference(variant):
    """The generic body (torch's DEFAULT kernels: ATEN_CPU_CAPABILITY=default) and, on an AVX-512
    machine, the AVX2 body (FASTANALOG_CPU_ISA=avx2), which the default run does not take there."""
    if variant == "avx2" and not cpu_has("avx2"):
        pytest.skip("this CPU has no AVX2")
    script = textwrap.dedent(
        """
        import torch, fastanalog as fa
        from fastanalog.ops import cpp, philox
        from fastanalog.ops.reference import rl2_step_ref, asgd_step_ref
        import sys
        assert cpp.cpu_variant() == sys.argv[1], cpp.cpu_variant()
        devs = [
            fa.PowerResponse(tau=0.6, gamma=0.6, dw_min=0.001, d2d_std=0.1, c2c_std=0.2, asymmetry=0.1),
            fa.PowerResponse(tau=0.6, gamma=0.6, dw_min=0.001),  # the fused power paths
            fa.LinearResponse(tau=0.6, dw_min=0.001),  # the fused linear paths
        ]
        for alg, dev in ((a, d) for a in ("asgd", "rl2") for d in devs):
            cfg = fa.AnalogConfig(algorithm=alg, device=dev, read_noise=0.01, transfer_lr=0.3)
            gen = torch.Generator().manual_seed(0)
            n = 2051 + 2 * 256
            offset = 2**34 - 6
            A = [torch.rand(n, generator=gen) * 0.8 - 0.4, torch.randn(n, generator=gen) * 0.05, torch.zeros(n), torch.zeros(n)]
            B = [t.clone() for t in A]
            for k in range(1, 4):
                g = torch.randn(n, generator=gen)
                kw = dict(lr=0.004, config=cfg, key=philox.step_key(5, k, 0), tensor_id=0, offset=offset)
                kw["A"] = None if k == 1 else g.abs() + torch.rand(n, generator=gen) * 2  # k > 1: with pairs
                if alg == "asgd":
                    r, c = asgd_step_ref(A[0], g, **kw), cpp.asgd_step_cpp(B[0], g, **kw)
                else:
                    r, c = rl2_step_ref(*A, g, **kw), cpp.rl2_step_cpp(*B, g, **kw)
                assert torch.equal(r.first, c.first) and (r.main is None or torch.equal(r.main, c.main)), (alg, k)
                assert (r.first_pairs is None) == (c.first_pairs is None), (alg, k)
                assert r.first_pairs is None or torch.equal(r.first_pairs, c.first_pairs), (alg, k)
                for x, y in zip(A, B):
                    torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
        print("variant ok")
        """
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default") if variant == "generic" else dict(os.environ, FASTANALOG_CPU_ISA="avx2")
    out = subprocess.run([sys.executable, "-c", script, variant], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "variant ok" in out.stdout, out.stderr[-3000:]


_ONE_PASS_SCRIPT = """
import sys, torch, fastanalog as fa
from fastanalog.ops import cpp
assert cpp.cpu_variant() == sys.argv[1], cpp.cpu_variant()
out = {}
for gamma in (0.5, 0.7):  # the square root and Sleef's power
    dev = fa.PowerResponse(tau=0.6, gamma=gamma, dw_min=0.001)
    for alg, ema in (("asgd", False), ("rl", False), ("rl2", False), ("rl2", True)):
        for excess in (False, True):
            for n in (1, 15, 17, 255, 1000, 4099):
                cfg = fa.AnalogConfig(algorithm=alg, device=dev, buffer="ema" if ema else "accumulate", read_noise=0.01,
                                      transfer_lr=0.5 if ema else 0.1)
                gen = torch.Generator().manual_seed(n)
                W = (torch.rand(n, generator=gen) - 0.5) * 1.3  # some outside the range
                W[::7] = -0.0
                W[::11] = 0.0
                P = (torch.rand(n, generator=gen) - 0.5) * 0.2
                H = (torch.rand(n, generator=gen) - 0.5) * 0.01
                g = torch.randn(n, generator=gen) * 0.05
                g[::5] = 0.0
                g[::13] = -0.0
                A = g.abs() + torch.rand(n, generator=gen) * 0.2 if excess else None
                Wbar = torch.zeros(n)
                kw = dict(lr=0.05, config=cfg, key=9, tensor_id=1, A=A)
                if alg == "asgd":
                    p = cpp.asgd_step_cpp(W, g, **kw)
                elif alg == "rl":
                    p = cpp.rl_step_cpp(W, P, Wbar, g, transfer=True, **kw)
                else:
                    p = cpp.rl2_step_cpp(W, P, H, Wbar, g, **kw)
                counts = [c for c in (p.first, p.main, p.first_pairs) if c is not None]
                out[f"{gamma}-{alg}-{ema}-{excess}-{n}"] = [t.view(torch.int32) for t in (W, P, H, Wbar)] + counts
torch.save(out, sys.argv[2])
"""


def test_avx512_one_pass_power_kernels_are_the_avx2_ones_bit_for_bit(tmp_path):
    """The AVX-512 build runs the one-pass power kernels on sixteen lanes, the AVX2 build on eight:
    the same arrays and counts bit for bit (signed zeros, values outside the range, pairs, tails)."""
    if not (cpu_has("avx512f") and cpu_has("avx512dq") and cpu_has("avx512bw") and cpu_has("avx512vl")):
        pytest.skip("this CPU has no AVX-512: both runs would take the AVX2 build")
    results = {}
    for variant, env in (("avx512", dict(os.environ)), ("avx2", dict(os.environ, FASTANALOG_CPU_ISA="avx2"))):
        env.pop("FASTANALOG_BACKEND", None)
        path = tmp_path / f"{variant}.pt"
        done = subprocess.run([sys.executable, "-c", _ONE_PASS_SCRIPT, variant, str(path)], env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        results[variant] = torch.load(path)
    assert results["avx512"].keys() == results["avx2"].keys() and len(results["avx2"]) == 96
    for case, wide in results["avx512"].items():
        for i, (x, y) in enumerate(zip(wide, results["avx2"][case])):
            assert torch.equal(x, y), f"{case}: output {i} differs"


# ----- op contract -------------------------------------------------------------------------------------
def _op_args(alg: str, config, n: int, excess: bool, totals: bool = False, seed: int = 0):
    """Arguments of ``alg``'s op (``fastanalog.ops.library``) for one tensor of ``n`` elements of ``config``."""
    from fastanalog.ops import packing

    W, P, H, Wbar = _initial(config, n, torch.float32, seed=seed)
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    A = [g.abs() + 0.5] if excess else []
    out = lambda: torch.zeros(1, dtype=torch.int64) if totals else torch.empty(n, dtype=torch.int32)  # noqa: E731
    pairs = [torch.empty(n, dtype=torch.int32)] if excess and not totals else []
    packed = packing.pack_op_config(config)
    common = ([77], [5], [TENSOR_ID], packing.step_floats(config, 0.004, True), list(packed.devices), list(packed.tables),
              list(packed.seeds))  # fmt: skip
    if config.algorithm == "asgd":
        return ([W], [g], A, [out()], pairs, *common)
    if config.algorithm == "rl":
        return ([W], [P], [Wbar], [g], A, [out()], pairs, [out()], *common)
    return ([W], [P], [H], [Wbar], [g], A, [out()], pairs, [out()], *common)


@pytest.mark.parametrize("totals", [False, True])
@pytest.mark.parametrize("excess", [False, True])
@pytest.mark.parametrize("alg", ["asgd", "rl_transfer", "rl2_ema"])
def test_opcheck_schema_and_fake(alg, excess, totals):
    config, _ = _config(alg, _device("power", c2c_std=0.1, d2d_std=0.1))
    op = getattr(torch.ops.fastanalog, f"{config.algorithm}_step").default
    torch.library.opcheck(op, _op_args(alg, config, 257, excess, totals), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("alg", ["asgd", "rl_transfer", "rl2_ema"])
def test_the_op_equals_the_reference(alg):
    """The op on CPU float32 tensors (the C++ kernel) gives the reference's counts and arrays."""
    config, _ = _config(alg, _device("table", d2d_std=0.1, variation_seed=5), read_noise=0.01)
    args = _op_args(alg, config, 3000, excess=True)
    ref_args = [[t.clone() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else a for a in args]
    getattr(torch.ops.fastanalog, f"{config.algorithm}_step")(*args)
    from fastanalog.ops import library

    with library.use_backend("reference"):
        getattr(torch.ops.fastanalog, f"{config.algorithm}_step")(*ref_args)
    for a, b in zip(args, ref_args):
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            for x, y in zip(a, b):
                if x.is_floating_point():
                    torch.testing.assert_close(x, y, rtol=0, atol=_tolerance(y, 1))
                else:
                    assert torch.equal(x, y)
    first = args[{"asgd": 3, "rl": 5, "rl2": 6}[config.algorithm]][0]
    assert int(first.abs().sum()) > 0


def test_fake_checks_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    config, _ = _config("rl2_ema", _device("linear"))
    args = list(_op_args("rl2_ema", config, 64, excess=False))
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.ops.fastanalog.rl2_step(*args)  # consistent: nothing to say
        bad = list(args)
        bad[1] = [torch.empty(10)]
        with pytest.raises(RuntimeError, match=r"P\[0\] has 10 elements but W\[0\] has 64"):
            torch.ops.fastanalog.rl2_step(*bad)
        bad = list(args)
        bad[9] = [1, 2]
        with pytest.raises(RuntimeError, match="keys has 2 entries for 1 tensors"):
            torch.ops.fastanalog.rl2_step(*bad)
        bad = list(args)
        bad[12] = args[12][:3]
        with pytest.raises(RuntimeError, match="step must have 7 scalars"):
            torch.ops.fastanalog.rl2_step(*bad)


def test_rejects_a_bad_layout():
    config, _ = _config("rl2_ema", _device("linear"))
    args = list(_op_args("rl2_ema", config, 64, excess=False))
    bad = list(args)
    bad[13] = args[13][:-1]
    with pytest.raises(RuntimeError, match="device description"):
        torch.ops.fastanalog.rl2_step(*bad)
    bad = list(args)
    bad[15] = args[15][:1]
    with pytest.raises(RuntimeError, match="variation seed"):
        torch.ops.fastanalog.rl2_step(*bad)
    bad = list(args)
    bad[14] = [1.0, 2.0]
    with pytest.raises(RuntimeError, match="table"):
        torch.ops.fastanalog.rl2_step(*bad)


_LOAD_ORDER_SCRIPT = """
import sys, warnings
import torch
order = sys.argv[1]
if order == "library_first":
    import glob, os
    import fastanalog
    path = glob.glob(os.path.join(os.path.dirname(fastanalog.__file__), "_C*.so"))[0]
    torch.ops.load_library(path)  # kernels registered before their schemas exist
import fastanalog as fa
from fastanalog.ops import cpp, dispatch
if order == "no_library":
    cpp._prebuilt = lambda stem: None
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    W = torch.zeros(1000)
    out = dispatch.analog_step({"main": W}, None, torch.randn(1000), lr=1.0, config=fa.AnalogConfig(algorithm="asgd"),
                               key=5, tensor_id=0, step=1)
unavailable = [w for w in caught if "C++ kernels are unavailable" in str(w.message)]
print(dispatch.backend_for(W), cpp.cpp_available(), len(unavailable), int(out.first.abs().sum()) > 0)
"""


@pytest.mark.parametrize(
    "order, expected",
    [("python_first", "cpp True 0 True"), ("library_first", "cpp True 0 True"), ("no_library", "reference False 1 True")],
)
def test_load_orders(order, expected):
    """The compiled library may be loaded before or after the ops' Python schemas; without it the
    reference serves CPU tensors, after one warning."""
    env = dict(os.environ, FASTANALOG_NO_JIT="1")
    env.pop("FASTANALOG_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", _LOAD_ORDER_SCRIPT, order], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == expected


def test_pulses_can_be_skipped():
    # Empty pulse tensors: the arrays are updated exactly the same, no counts are written.
    config, _ = _config("rl2_acc_thr1", _device("linear"))
    a = _op_args("rl2_acc_thr1", config, 1000, excess=True)
    b = [[t.clone() for t in x] if isinstance(x, list) and x and isinstance(x[0], torch.Tensor) else x for x in a]
    empty = [torch.empty(0, dtype=torch.int32)]
    b[6:9] = [empty, empty, empty]
    torch.ops.fastanalog.rl2_step(*a)
    torch.ops.fastanalog.rl2_step(*b)
    for x, y in zip(a[:4], b[:4]):
        assert torch.equal(x[0], y[0])
    assert a[7][0].sum() > 0  # pairs were written


def test_rejects_bad_arrays():
    config, _ = _config("rl2_acc_thr1", _device("linear"))
    W, P, H, Wbar = _initial(config, 64, torch.float32)
    g = torch.randn(64)
    kw = dict(lr=0.01, config=config, key=1, tensor_id=0)
    with pytest.raises(ValueError, match="dtype"):
        cpp.rl2_step_cpp(W, P.double(), H, Wbar, g, **kw)
    with pytest.raises(ValueError, match="overlap"):
        cpp.rl2_step_cpp(W, W, H, Wbar, g, **kw)
    with pytest.raises(ValueError, match="elements"):
        cpp.rl2_step_cpp(W, P[:10], H, Wbar, g, **kw)
    with pytest.raises(ValueError, match="offset"):
        cpp.rl2_step_cpp(W, P, H, Wbar, g, offset=-1, **kw)


def test_rejects_bad_excess():
    config, _ = _config("rl2_acc_thr1", _device("linear"))
    W, P, H, Wbar = _initial(config, 64, torch.float32)
    g = torch.randn(64)
    kw = dict(lr=0.01, config=config, key=1, tensor_id=0)
    before = [t.clone() for t in (W, P, H, Wbar)]
    with pytest.raises(ValueError, match="A .* elements"):
        cpp.rl2_step_cpp(W, P, H, Wbar, g, A=g.abs()[:10], **kw)
    with pytest.raises(ValueError, match="floating"):
        cpp.rl2_step_cpp(W, P, H, Wbar, g, A=torch.ones(64, dtype=torch.int32), **kw)
    with pytest.raises(ValueError, match="contiguous"):
        cpp.rl2_step_cpp(W, P, H, Wbar, g, A=torch.ones(128)[::2], **kw)
    with pytest.raises(ValueError, match="device|meta"):
        cpp.asgd_step_cpp(W, g, A=torch.ones(64, device="meta"), **kw)
    with pytest.raises(ValueError, match="overlap"):
        cpp.rl2_step_cpp(W, P, H, Wbar, g, A=H, **kw)
    for x, y in zip((W, P, H, Wbar), before):  # a rejected call changes nothing
        assert torch.equal(x, y)
    # float64 A is widened to float32 (exactly as the reference reads it)
    A = g.abs().double() + 0.25
    c = cpp.asgd_step_cpp(W.clone(), g, A=A, **kw)
    r = asgd_step_ref(W.clone(), g, A=A, **kw)
    assert torch.equal(c.first, r.first) and torch.equal(c.first_pairs, r.first_pairs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("alg", list(ALGORITHMS))
def test_cuda_matches_reference(alg):
    config, transfer = _config(alg, _device("power", d2d_std=0.1, c2c_std=0.2, asymmetry=0.1), read_noise=0.01)
    ref = _initial(config, 65537, torch.float32)
    dev = [t.cuda() for t in ref]
    ref = [t.cuda() for t in ref]
    for k, g in enumerate(_gradients(65537, STEPS, torch.float32), start=1):
        key = philox.step_key(SEED, k, TENSOR_ID)
        r = _step("ref", alg, ref, g.cuda(), config, transfer, key, 0)
        c = _step("cpp", alg, dev, g.cuda(), config, transfer, key, 0)
        assert torch.equal(r.first, c.first)
        assert (r.main is None) == (c.main is None) and (r.main is None or torch.equal(r.main, c.main))
        for x, y in zip(ref, dev):
            torch.testing.assert_close(y, x, rtol=0, atol=_tolerance(x, k))


# ----- through the optimizer: several tensors per step ------------------------------------------------
def _train_small_model(algorithm: str, backend: str, monkeypatch) -> list[torch.Tensor]:
    """Four AnalogSGD steps of a conv + two linear layers (odd sizes) on one backend; the analog arrays."""
    monkeypatch.setenv("FASTANALOG_BACKEND", backend)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(5 * 6 * 6, 7), torch.nn.Linear(7, 3)
    )
    device = _device("power", d2d_std=0.1, c2c_std=0.2, asymmetry=0.1, variation_seed=2)
    config = fa.AnalogConfig(algorithm=algorithm, device=device, gamma=0.2, transfer_lr=0.3, transfer_every=2, read_noise=0.01)
    net = fa.convert_to_analog(net, config)
    opt = fa.AnalogSGD(net.parameters(), lr=0.05, seed=9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    layers = [m for m in net.modules() if hasattr(m, "analog_state")]
    assert len(layers) == 3
    arrays = [t.clone() for m in layers for t in m.analog_state().values() if t is not None]
    return arrays + [m.analog_pulses.clone() for m in layers]  # pulse counters: totals from the kernels vs counts


@pytest.mark.parametrize("algorithm", ["asgd", "rl", "rl2"])
def test_optimizer_steps_several_tensors_like_the_reference(algorithm, monkeypatch):
    ref = _train_small_model(algorithm, "reference", monkeypatch)
    fast = _train_small_model(algorithm, "cpp", monkeypatch)
    assert len(ref) == len(fast) == 3 * ({"asgd": 1, "rl": 2, "rl2": 3}[algorithm] + 1)
    for x, y in zip(ref, fast):
        if x.is_floating_point():
            torch.testing.assert_close(y, x, rtol=0, atol=_tolerance(x, 4))
        else:
            assert torch.equal(x, y) and int(x.sum()) > 0


@pytest.mark.parametrize("excess", [False, True])
@pytest.mark.parametrize("alg", list(ALGORITHMS))
def test_pulse_totals_equal_the_sum_of_the_counts(alg, excess):
    # totals=True: the same arrays, and each written array's sum(N_up + N_down) = sum(|net| + 2 pairs)
    # instead of the counts.
    config, transfer = _config(alg, _device("power", d2d_std=0.1, c2c_std=0.2), read_noise=0.01, max_pulses=6)
    n = 70001  # several blocks per thread, a ragged tail
    counts = _initial(config, n, torch.float32)
    totals = [t.clone() for t in counts]
    g = _gradients(n, 1, torch.float32)[0]
    key = philox.step_key(SEED, 1, TENSOR_ID)
    fns = {"asgd": cpp.asgd_step_cpp, "rl": cpp.rl_step_cpp, "rl2": cpp.rl2_step_cpp}
    kw = dict(lr=0.004, config=config, key=key, tensor_id=TENSOR_ID, offset=7, A=_excess(g) if excess else None)
    if config.algorithm == "rl":
        kw["transfer"] = transfer
    arrays = {"asgd": slice(0, 1), "rl": [0, 1, 3], "rl2": slice(0, 4)}[config.algorithm]
    pick = (lambda a: a[arrays]) if isinstance(arrays, slice) else (lambda a: [a[i] for i in arrays])
    c = fns[config.algorithm](*pick(counts), g, **kw)
    t = fns[config.algorithm](*pick(totals), g, totals=True, **kw)
    assert t.first.dtype == torch.int64 and t.first.dim() == 0
    assert t.first_pairs is None and (c.first_pairs is not None) == excess
    assert int(t.first) == int(c.first_total()) > 0
    if excess:
        assert int(t.first) == int(c.first.abs().sum()) + 2 * int(c.first_pairs.sum()) > int(c.first.abs().sum())
    assert (t.main is None) == (c.main is None)
    if c.main is not None:
        assert int(t.main) == int(c.main.abs().sum())
    for x, y in zip(counts, totals):
        assert torch.equal(x, y)


# ----- the optimizer's gradient check --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite(dtype, bad):
    gen = torch.Generator().manual_seed(0)
    big = (torch.randn(70001, generator=gen) * 1e3).to(dtype)  # spans both threads' shares
    conv = torch.randn(8, 5, 3, 3, generator=gen).to(dtype).to(memory_format=torch.channels_last)
    strided = torch.randn(40, 30, generator=gen).to(dtype).t()  # neither contiguous nor dense-in-order
    others = [torch.zeros(0, dtype=dtype), torch.arange(7), torch.full((3,), torch.finfo(dtype).max, dtype=dtype)]
    tensors = [big, conv, strided, *others]
    assert cpp.all_finite_cpp(tensors) is True
    for t, index in ((big, (0,)), (big, (35000,)), (big, (70000,)), (conv, (7, 4, 2, 1)), (strided, (29, 39))):
        saved = t[index].clone()
        t[index] = bad
        assert cpp.all_finite_cpp(tensors) is False, (tuple(t.shape), index)
        t[index] = saved
    assert cpp.all_finite_cpp(tensors) is True
    assert cpp.all_finite_cpp([]) is True
    z = torch.zeros(5, dtype=torch.complex64)
    assert cpp.all_finite_cpp([z]) is True
    z[3] = complex(0.0, bad)
    assert cpp.all_finite_cpp([z]) is False
    assert cpp.all_finite_cpp([big, torch.zeros(3).to(torch.float8_e4m3fn)]) is None  # left to the generic check


def _sparse_excess(g: torch.Tensor, seed: int = 3) -> torch.Tensor:
    """Per-sample sums as training has them: 90% of the elements A = |g|, 9% a tiny excess (pairs'
    mean 1e-7 to 1e-3 pulses: almost never a pair), 1% up to a few pulses."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.rand(g.numel(), generator=gen)
    tiny = 10.0 ** (-7 + 4 * torch.rand(g.numel(), generator=gen))
    big = torch.rand(g.numel(), generator=gen) * 3.0
    return g.abs() + torch.where(r < 0.9, 0.0, torch.where(r < 0.99, tiny, big))


@pytest.mark.parametrize("family", ["sqrt", "power"])
@pytest.mark.parametrize("alg", ["asgd", "rl2_acc_thr1"])
def test_one_pass_writes_with_sparse_pairs_are_bit_exact(alg, family):
    # Training's per-sample sums: most 8-lane vectors of the one-pass power kernels have no
    # pair in any lane, some have one lane with pairs beside lanes pulsing one way.
    config, transfer = _config(alg, _device(family))
    n = 4099
    arrays = _initial(config, n, torch.float32)
    g = _gradients(n, 1, torch.float32, scale=0.5)[0]
    A = _sparse_excess(g)
    ref = [t.clone() for t in arrays]
    got = [t.clone() for t in arrays]
    want = _step("ref", alg, ref, g, config, transfer, key=78, offset=0, A=A)
    have = _step("cpp", alg, got, g, config, transfer, key=78, offset=0, A=A)
    for r, c in zip(ref, got):
        assert torch.equal(r, c)
    assert torch.equal(want.first, have.first) and torch.equal(want.first_pairs, have.first_pairs)
    assert 0 < int((want.first_pairs > 0).sum()) < n // 20  # some pairs, few
    changed = (ref[1] if alg != "asgd" else ref[0]) != arrays[1 if alg != "asgd" else 0]
    assert int(changed.sum()) > n // 4  # the writes happened


@pytest.mark.parametrize("family", ["sqrt", "power"])
@pytest.mark.parametrize("alg", ["asgd", "rl_transfer", "rl2_acc_thr1"])
def test_one_pass_writes_of_sparse_pulses_are_bit_exact(alg, family):
    # Training's batch-mode writes: about 1% of the elements pulse and 1% of rl2's buffer reach
    # the threshold, so most 8-lane vectors of the one-pass power kernels skip the response
    # (and rl2 the division of its transfer) and write x + 0 clamped: -0 becomes +0, values
    # outside the range are clamped, bit for bit as the reference.
    config, transfer = _config(alg, _device(family))
    n = 4099
    arrays = _initial(config, n, torch.float32)
    arrays[1].mul_(0.002)
    arrays[2].mul_(0.2)
    g = _gradients(n, 1, torch.float32, scale=0.003)[0]
    # Vectors that do not pulse holding special values: W's (P = H = 0 there: no transfer), then P's.
    special = torch.tensor([-0.0, 0.0, 0.75, -0.75, 0.6, -0.6, 1e-30, -1e-30]).repeat(8)
    g[:128] = 0.0
    arrays[0][:64] = special
    arrays[1][:64] = 0.0
    arrays[2][:64] = 0.0
    arrays[1][64:128] = special
    ref = [t.clone() for t in arrays]
    got = [t.clone() for t in arrays]
    want = _step("ref", alg, ref, g, config, transfer, key=79, offset=0)
    have = _step("cpp", alg, got, g, config, transfer, key=79, offset=0)
    for r, c in zip(ref, got):
        assert torch.equal(r.view(torch.int32), c.view(torch.int32))
    assert torch.equal(want.first, have.first)
    assert 0 < int((want.first != 0).sum()) < n // 20  # a few elements pulse
    first = ref[0][:64] if alg == "asgd" else ref[1][64:128]
    assert first[0].item() == 0.0 and not first[0].signbit() and first[2].item() == pytest.approx(0.6)
    assert not ref[0][0].signbit() and ref[0][2].item() == pytest.approx(0.6)
    if want.main is not None:
        assert torch.equal(want.main, have.main)
        assert 0 < int((want.main != 0).sum()) < n // 20  # a few transfers


@pytest.mark.parametrize("excess", [False, True])
@pytest.mark.parametrize("alg", ["asgd", "rl_transfer", "rl2_acc_thr1"])
def test_square_root_response_is_bit_exact(alg, excess):
    # gamma 0.5 without device-to-device variation: every backend takes the correctly rounded
    # square root (PowerResponse._shape), so the kernels equal the reference bit for bit, on
    # the one-pass and the general paths (c2c noise takes the general one).
    for opts in ({}, {"c2c_std": 0.2}):
        config, transfer = _config(alg, _device("sqrt", **opts))
        n = 4099
        arrays = _initial(config, n, torch.float32)
        g = _gradients(n, 1, torch.float32, scale=1.5)[0]
        A = _excess(g) if excess else None
        ref = [t.clone() for t in arrays]
        got = [t.clone() for t in arrays]
        _step("ref", alg, ref, g, config, transfer, key=77, offset=0, A=A)
        _step("cpp", alg, got, g, config, transfer, key=77, offset=0, A=A)
        for r, c in zip(ref, got):
            assert torch.equal(r, c)
