"""Fused Triton update kernels against the reference: equal pulse counts, arrays to float32 rounding.

On machines without a GPU the kernels run under the Triton interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set here before triton is imported), so sizes stay small.

Every comparison covers both kinds of write (SPEC section 2): odd steps without the excess
input ``A`` (batch mode, no pairs), even steps with it (pairs from stream 1), unless a test
fixes one. Offsets are chosen so that shards start at global indices that are not multiples
of 4 and cross the Philox counter's 2^32 boundary (global element index 2^34).

Tolerances. Pulse counts (net and pairs) must be equal element for element. Stored float32
arrays must agree to ``rtol=1e-6, atol=5e-7`` (weights here are O(0.1-1) with tau = 0.6; one
pulse is 1e-2; a float32 ulp at 0.6 is 6e-8). Both sides do the same float32 operations in
the same order, but float32 transcendentals differ by an ulp or a few between torch's CPU
kernels and numpy (which the interpreter uses): numpy's float32 ``log`` is off by up to
~4 ulps, torch's float32 CPU ``sqrt`` is not correctly rounded, and ``pow``/``expm1``
differ in rare last bits. Through Box-Muller these move device-to-device parameters
(hence clamp bounds and symmetric points) and noise by a few ulps of the weight scale,
so stored values differ by a few ulps of tau, also in small arrays such as the buffer H
that inherit them. Arrays stored in bfloat16/float16 may then round to a neighbour: they
must agree to 2 ulps of their dtype. A real error moves values by a fraction of a pulse
(>= 1e-4 here) and nearly always changes a pulse count as well.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from fastanalog import AnalogConfig, ExpResponse, LinearResponse, PowerResponse, TableResponse  # noqa: E402
from fastanalog.ops import philox  # noqa: E402
from fastanalog.ops.reference import asgd_step_ref, rl2_step_ref, rl_step_ref  # noqa: E402
from fastanalog.ops.triton import asgd_step_triton, common, rl2_step_triton, rl_step_triton  # noqa: E402
from fastanalog.ops.triton import step as triton_step  # noqa: E402
from fastanalog.ops.triton.common import load_f32, store_f32, stream_normal, stream_uniform  # noqa: E402

RTOL = 1e-6
ATOL = 5e-7
SEED = 20250211
# Global offsets: 0, not multiples of 4 (a shard's first block masks the elements before
# it), and across the 2^32 boundary of the Philox counter (call j = i // 4 = 2^32).
CROSSING = 2**34 - 6

# Kernels built for the interpreter run on CPU tensors; compiled ones (a GPU run that
# imported triton without the interpreter) on CUDA tensors.
_INTERPRETED = type(triton_step._step_kernel).__name__ == "InterpretedFunction"
DEVICE = "cpu" if _INTERPRETED else "cuda"
if not _INTERPRETED and not torch.cuda.is_available():
    raise RuntimeError(
        "fastanalog.ops.triton was imported before TRITON_INTERPRET=1 was set and there is no GPU: "
        "set TRITON_INTERPRET=1 in the environment of the test run"
    )

TABLE_UP = tuple(float(v) for v in np.linspace(1.6, 0.0, 9) * (1 + 0.1 * np.sin(np.arange(9))))
TABLE_DOWN = tuple(float(v) for v in np.linspace(0.0, 1.3, 9) * (1 + 0.1 * np.cos(np.arange(9))))
FAMILIES = ("linear", "power", "exp", "table")


def make_device(
    family: str,
    *,
    tau: float = 0.6,
    dw_min: float = 0.01,
    asymmetry: float = 0.0,
    d2d: float = 0.0,
    c2c: float = 0.0,
    seed: int = 7,
):
    kw = dict(tau=tau, dw_min=dw_min, asymmetry=asymmetry, d2d_std=d2d, c2c_std=c2c, variation_seed=seed)
    if family == "linear":
        return LinearResponse(**kw)
    if family == "power":
        return PowerResponse(gamma=0.37, **kw)
    if family == "exp":
        return ExpResponse(gamma=1.7, **kw)
    return TableResponse(up=TABLE_UP, down=TABLE_DOWN, **kw)


# algorithm variants: (config algorithm, extra config keywords, rl transfer flag)
ALGOS = {
    "asgd": ("asgd", {}, None),
    "rl_transfer": ("rl", {}, True),
    "rl_no_transfer": ("rl", {}, False),
    "rl2_acc_t1": ("rl2", dict(buffer="accumulate", threshold=1.0, transfer_lr=0.7), None),
    "rl2_acc_t2": ("rl2", dict(buffer="accumulate", threshold=2.0, transfer_lr=0.7), None),
    "rl2_ema": ("rl2", dict(buffer="ema", transfer_lr=0.4), None),
}


def make_config(
    algo: str,
    family: str,
    *,
    d2d=0.0,
    c2c=0.0,
    read_noise=0.0,
    max_pulses=None,
    asymmetry=0.0,
    zero_shift=True,
    residual_family=None,
    **extra,
):
    algorithm, kw, _ = ALGOS[algo]
    kw = {**kw, **extra}
    device = make_device(family, asymmetry=asymmetry, d2d=d2d, c2c=c2c, seed=11)
    residual = make_device(residual_family or family, asymmetry=-asymmetry, d2d=d2d, c2c=c2c, seed=12)
    return AnalogConfig(
        algorithm=algorithm,
        device=device,
        residual_device=residual,
        gamma=0.3,
        read_noise=read_noise,
        max_pulses=max_pulses,
        zero_shift=zero_shift,
        **kw,
    )


def make_state(config: AnalogConfig, numel: int, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tau = 0.6
    state = {"W": (torch.rand(numel, generator=gen) - 0.5) * tau}
    if config.has_residual:
        state["P"] = (torch.rand(numel, generator=gen) - 0.5) * 0.2 * tau
        state["Wbar"] = torch.zeros(numel)
    if config.has_buffer:
        state["H"] = (torch.rand(numel, generator=gen) - 0.5) * 0.02
    return {k: v.to(device=DEVICE, dtype=dtype) for k, v in state.items()}


def make_excess(g: torch.Tensor, seed: int) -> torch.Tensor:
    """Per-sample |g| sums for ``g``: mostly above |g| (up to ~3 pairs at lr 0.1), a fifth below (no excess)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.clamp(g.float().abs().cpu() + (torch.rand(g.numel(), generator=gen) - 0.2) * 0.6, min=0.0)
    return a.to(device=g.device, dtype=g.dtype)


def run_step(
    impl: str, algo: str, state: dict, g: torch.Tensor, *, config, key, tensor_id, offset=0, lr=0.1, A=None, totals=False
):
    common_kw = dict(lr=lr, config=config, key=key, tensor_id=tensor_id, offset=offset, A=A)
    if impl != "ref":
        common_kw["totals"] = totals
    transfer = ALGOS[algo][2]
    if config.algorithm == "asgd":
        fn = asgd_step_ref if impl == "ref" else asgd_step_triton
        return fn(state["W"], g, **common_kw)
    if config.algorithm == "rl":
        fn = rl_step_ref if impl == "ref" else rl_step_triton
        return fn(state["W"], state["P"], state["Wbar"], g, transfer=transfer, **common_kw)
    fn = rl2_step_ref if impl == "ref" else rl2_step_triton
    return fn(state["W"], state["P"], state["H"], state["Wbar"], g, **common_kw)


def assert_pulses_equal(a, b, what):
    assert a.dtype == b.dtype == torch.int32, what
    assert a.shape == b.shape, what
    diff = (a != b).nonzero().flatten()
    assert diff.numel() == 0, (
        f"{what}: {diff.numel()} pulse counts differ, first at {diff[:5].tolist()}: {a[diff[:5]].tolist()} vs {b[diff[:5]].tolist()}"
    )


def assert_step_pulses_equal(want, got, what):
    """Per-element StepPulses: net counts of both arrays and the pairs of the first one."""
    assert_pulses_equal(want.first, got.first, f"{what} first array")
    assert (want.main is None) == (got.main is None), what
    if want.main is not None:
        assert_pulses_equal(want.main, got.main, f"{what} W")
    assert (want.first_pairs is None) == (got.first_pairs is None), what
    if want.first_pairs is not None:
        assert_pulses_equal(want.first_pairs, got.first_pairs, f"{what} pairs of the first array")


def assert_totals_equal(want, got, what):
    """Totals-mode StepPulses ``got`` against per-element ``want``: sum(N_up + N_down) per array, 0-d int64."""
    assert got.first.dtype == torch.int64 and got.first.dim() == 0, what
    assert got.first_pairs is None, what
    assert int(got.first) == int(want.first_total()), (
        f"{what}: first array total {int(got.first)} != {int(want.first_total())}"
    )
    assert (want.main is None) == (got.main is None), what
    if want.main is not None:
        assert got.main.dtype == torch.int64 and got.main.dim() == 0, what
        assert int(got.main) == int(want.main_total()), f"{what}: W total {int(got.main)} != {int(want.main_total())}"


def assert_arrays_close(got, want, what, rtol=RTOL, atol=ATOL):
    """float32 arrays to ``rtol``/``atol``; bfloat16/float16 arrays to 2 ulps of their dtype (see the module doc)."""
    assert got.dtype == want.dtype, what
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
        return
    mag = want.abs()
    ulp = (torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag).float()
    diff = (got.float() - want.float()).abs()
    bad = (diff > 2 * ulp + atol).nonzero().flatten()
    assert bad.numel() == 0, f"{what}: {bad.numel()} values differ by more than 2 ulps, first {bad[:5].tolist()}"


def compare(
    algo: str,
    config: AnalogConfig,
    numel: int,
    *,
    steps: int = 3,
    dtype=torch.float32,
    tensor_id: int = 3,
    offset: int = 0,
    rtol: float = RTOL,
    atol: float = ATOL,
    excess: bool | None = None,
    totals: bool = False,
) -> list:
    """Run reference and Triton side by side on identical copies; assert agreement after every step.

    ``excess`` None: odd steps without ``A``, even steps with it; True/False: every step.
    ``totals``: also run the kernel in totals mode on a third copy, which must report the
    reference's sums and store bit for bit what the per-element launch stores.
    """
    ref = make_state(config, numel, dtype)
    tri = {k: v.clone() for k, v in ref.items()}
    tot = {k: v.clone() for k, v in ref.items()}
    gen = torch.Generator().manual_seed(numel + 1)
    applied = []
    for step in range(1, steps + 1):
        g = torch.randn(numel, generator=gen).to(device=DEVICE, dtype=dtype)
        with_a = (step % 2 == 0) if excess is None else excess
        A = make_excess(g, step) if with_a else None
        key = philox.step_key(SEED, step, tensor_id)
        kw = dict(config=config, key=key, tensor_id=tensor_id, offset=offset, A=A)
        a = run_step("ref", algo, ref, g, **kw)
        b = run_step("tri", algo, tri, g, **kw)
        assert_step_pulses_equal(a, b, f"step {step}")
        for name in ref:
            assert tri[name].dtype == dtype
            assert_arrays_close(tri[name], ref[name], f"{name} step {step}", rtol, atol)
        if totals:
            c = run_step("tri", algo, tot, g, totals=True, **kw)
            assert_totals_equal(a, c, f"step {step} totals")
            for name in tri:
                assert torch.equal(tot[name], tri[name]), f"{name} step {step}: totals mode stored other values"
            tot = {k: v.clone() for k, v in tri.items()}
        applied.append(b)
    return applied


# ---------------------------------------------------------------------------------------------
# Every algorithm x every family, all non-idealities on (and zero shift) / all off.
# ---------------------------------------------------------------------------------------------
FAMILY_OFFSETS = {"linear": 0, "power": 5, "exp": 4097 + 3, "table": CROSSING}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("algo", list(ALGOS))
def test_all_nonidealities(algo, family):
    config = make_config(algo, family, d2d=0.2, c2c=0.3, read_noise=0.02, max_pulses=4, asymmetry=0.15, zero_shift=True)
    applied = compare(algo, config, 1023, offset=FAMILY_OFFSETS[family])
    counts = torch.cat([p.first for p in applied])
    assert counts.abs().max() == 4, "the cap must bind somewhere in this set-up"
    assert (counts != 0).float().mean() > 0.5, "most elements must be written"
    pairs = applied[1].first_pairs
    assert pairs is not None and (pairs > 0).float().mean() > 0.3, "the excess must make pairs"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("algo", list(ALGOS))
def test_ideal_devices(algo, family):
    config = make_config(algo, family, zero_shift=False)
    compare(algo, config, 7, offset=FAMILY_OFFSETS[family], totals=family in ("linear", "table"))


# One non-ideality at a time (rl2 accumulate and rl with transfer touch every code path).
TOGGLES = {
    "d2d": dict(d2d=0.3),
    "c2c": dict(c2c=0.5),
    "read_noise": dict(read_noise=0.05),
    "max_pulses": dict(max_pulses=2),
    "asymmetry": dict(asymmetry=-0.3),
    "asym_zero_shift_off": dict(asymmetry=0.25, zero_shift=False),
    "d2d_zero_shift_off": dict(d2d=0.3, asymmetry=0.2, zero_shift=False),
    "d2d_zero_shift_on": dict(d2d=0.3, asymmetry=0.2, zero_shift=True),
}


@pytest.mark.parametrize("family", ["power", "table"])
@pytest.mark.parametrize("toggle", list(TOGGLES))
@pytest.mark.parametrize("algo", ["rl_transfer", "rl2_acc_t1"])
def test_single_nonideality(algo, toggle, family):
    compare(algo, make_config(algo, family, **TOGGLES[toggle]), 255, steps=2, offset=3)


@pytest.mark.parametrize("algo", ["asgd", "rl2_ema"])
@pytest.mark.parametrize("numel", [1, 7])
def test_tiny_sizes(algo, numel):
    config = make_config(algo, "exp", d2d=0.2, c2c=0.2, read_noise=0.01, asymmetry=0.1)
    compare(algo, config, numel, offset=2**34 - 2 if numel == 7 else 2**34 - 1)


@pytest.mark.parametrize(
    "algo,family,extra",
    [
        ("asgd", "power", dict(d2d=0.2)),
        # without d2d: regenerating the variation doubles the (slow, interpreted) Philox work
        ("rl2_acc_t2", "table", dict(zero_shift=True)),
    ],
)
def test_large(algo, family, extra):
    config = make_config(algo, family, c2c=0.3, read_noise=0.02, max_pulses=5, asymmetry=0.1, **extra)
    compare(algo, config, 65537, steps=2, offset=6)


# Offsets of every residue mod 4, one of them across the counter's 2^32 boundary.
BLOCK_OFFSETS = {
    "asgd": 1,
    "rl_transfer": 4097 + 2,
    "rl_no_transfer": CROSSING + 1,
    "rl2_acc_t1": 3,
    "rl2_acc_t2": CROSSING,
    "rl2_ema": CROSSING + 3,
}


@pytest.mark.parametrize("algo", list(ALGOS))
def test_many_blocks(algo, monkeypatch):
    """Small blocks: several programs, each aligned to the global index, at an offset that is not a multiple of 4.

    Totals add up over the programs (one atomic add each) and pairs follow the blocks too.
    """
    monkeypatch.setattr(common, "BLOCK_INTERPRETER", 16)
    config = make_config(algo, "linear", c2c=0.2, read_noise=0.02, max_pulses=3, asymmetry=0.1)
    compare(algo, config, 37, steps=1, offset=BLOCK_OFFSETS[algo], excess=True, totals=True)


def test_mixed_families_and_offset():
    """W and P on different families, a non-zero global offset and tensor id."""
    config = make_config("rl2_ema", "linear", residual_family="exp", d2d=0.25, c2c=0.1, read_noise=0.03, asymmetry=0.2)
    compare("rl2_ema", config, 1000, offset=123_456_789_012, tensor_id=17)


def test_shards_equal_whole():
    """A tensor split in shards at cuts that are not multiples of 4 draws the same pulses as the whole tensor."""
    config = make_config("rl_transfer", "power", d2d=0.2, c2c=0.2, read_noise=0.02, asymmetry=0.1)
    n, cuts = 900, (0, 377, 379, 900)
    whole = make_state(config, n)
    parts = {k: v.clone() for k, v in whole.items()}
    totals = {k: v.clone() for k, v in whole.items()}
    g = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    A = make_excess(g, 6)
    key = philox.step_key(SEED, 1, 2)
    kw = dict(lr=0.1, config=config, key=key, tensor_id=2, transfer=True)
    full = rl_step_triton(whole["W"], whole["P"], whole["Wbar"], g, A=A, **kw)
    pieces, sums = [], []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        shard = dict(offset=lo, A=A[lo:hi], **kw)
        pieces.append(rl_step_triton(parts["W"][lo:hi], parts["P"][lo:hi], parts["Wbar"][lo:hi], g[lo:hi], **shard))
        sums.append(
            rl_step_triton(totals["W"][lo:hi], totals["P"][lo:hi], totals["Wbar"][lo:hi], g[lo:hi], totals=True, **shard)
        )
    assert torch.equal(full.first, torch.cat([p.first for p in pieces]))
    assert torch.equal(full.main, torch.cat([p.main for p in pieces]))
    assert torch.equal(full.first_pairs, torch.cat([p.first_pairs for p in pieces]))
    assert int(full.first_total()) == sum(int(s.first) for s in sums)
    assert int(full.main_total()) == sum(int(s.main) for s in sums)
    for name in whole:
        assert torch.equal(whole[name], parts[name]), name
        assert torch.equal(whole[name], totals[name]), name


# ---------------------------------------------------------------------------------------------
# The random streams themselves (SPEC section 4): one Philox call per four elements.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _streams_kernel(u_ptr, z_ptr, key, offset, lead, numel, BLOCK: tl.constexpr):
    local, mask, _, call0 = common.block_range(tl.program_id(0), offset, lead, numel, BLOCK)
    tl.store(u_ptr + local, stream_uniform(key, call0, common.SALT_ROUND_W, BLOCK), mask=mask)
    tl.store(z_ptr + local, stream_normal(key, call0, common.SALT_C2C_W, BLOCK), mask=mask)


@pytest.mark.parametrize("offset", [0, 1, 6, CROSSING])
def test_streams_match_philox(offset):
    """Uniforms and normals of a block at any offset are the reference's streams 2 and 5 element for element."""
    key, n, block = philox.step_key(SEED, 4, 1), 45, 16
    u = torch.empty(n, device=DEVICE)
    z = torch.empty(n, device=DEVICE)
    _streams_kernel[(triton.cdiv(n + offset % 4, block),)](u, z, key, offset, offset % 4, n, BLOCK=block)
    want_u = philox.stream_uniform(philox.stream_key(key, philox.STREAM_ROUND_W), offset, n)
    want_z = philox.stream_normal(philox.stream_key(key, philox.STREAM_C2C_W), offset, n)
    assert torch.equal(u.cpu(), want_u)
    torch.testing.assert_close(z.cpu(), want_z, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Narrow storage: bf16 / fp16 arrays (math in float32, round-to-nearest-even writes).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "algo,family,dtype",
    [("rl2_acc_t1", "power", torch.bfloat16), ("asgd", "table", torch.bfloat16), ("rl_transfer", "exp", torch.float16)],
)
def test_narrow_storage(algo, family, dtype):
    # dw_min 0.01 is a few bf16 ulps at |w| ~ 0.3, so rounding decides many writes.
    config = make_config(algo, family, d2d=0.2, c2c=0.2, read_noise=0.02, asymmetry=0.1)
    compare(algo, config, 1023, dtype=dtype, offset=7)


@triton.jit
def _storage_roundtrip_kernel(src_ptr, dst_ptr, stored_ptr, reloaded_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(src_ptr + offs, mask=mask, other=0.0)
    stored = store_f32(dst_ptr, offs, x, mask)
    tl.store(stored_ptr + offs, stored, mask=mask)
    tl.store(reloaded_ptr + offs, load_f32(dst_ptr, offs, mask), mask=mask)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_storage_rounding_matches_torch(dtype):
    """store_f32 rounds like tensor.to(dtype) (nearest, ties to even), load_f32 widens exactly."""
    gen = torch.Generator().manual_seed(1)
    bits = torch.randint(-(2**31), 2**31 - 1, (3000,), generator=gen, dtype=torch.int64).to(torch.int32)
    ties = (bits & ~0xFFFF) | 0x8000  # exactly half-way between two bf16 neighbours
    x = torch.cat([bits.view(torch.float32), ties.view(torch.float32)])
    special = torch.tensor(
        [
            0.0,
            -0.0,
            1.0,
            1.0 + 2.0**-8,
            1.0 + 3 * 2.0**-8,
            -(1.0 + 2.0**-8),
            float("inf"),
            float("-inf"),
            float("nan"),
            1e-40,
            -3e-39,
            3.3895e38,
            65520.0,
            2.0**-25,
        ]
    )
    x = torch.cat([x[torch.isfinite(x) | torch.isinf(x)], special]).to(DEVICE)
    n = x.numel()
    dst = torch.empty(n, dtype=dtype, device=DEVICE)
    stored = torch.empty(n, device=DEVICE)
    reloaded = torch.empty(n, device=DEVICE)
    _storage_roundtrip_kernel[(1,)](x, dst, stored, reloaded, n, BLOCK=triton.next_power_of_2(n))
    expected = x.to(dtype)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(dst), nan)
    width = torch.int16 if dtype != torch.float32 else torch.int32
    assert torch.equal(dst[~nan].view(width), expected[~nan].view(width)), "rounding differs from tensor.to(dtype)"
    assert torch.equal(stored[~nan].view(torch.int32), expected[~nan].float().view(torch.int32))
    assert torch.equal(reloaded[~nan].view(torch.int32), expected[~nan].float().view(torch.int32))


# ---------------------------------------------------------------------------------------------
# The tests can fail: other keys, other devices, other seeds change the pulses.
# ---------------------------------------------------------------------------------------------
def test_different_key_gives_different_pulses():
    config = make_config("rl2_ema", "power", d2d=0.2, c2c=0.2, read_noise=0.02)
    s1 = make_state(config, 1023)
    s2 = {k: v.clone() for k, v in s1.items()}
    g = torch.randn(1023, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    a = rl2_step_triton(
        s1["W"], s1["P"], s1["H"], s1["Wbar"], g, lr=0.1, config=config, key=philox.step_key(SEED, 1, 0), tensor_id=0
    )
    b = rl2_step_triton(
        s2["W"], s2["P"], s2["H"], s2["Wbar"], g, lr=0.1, config=config, key=philox.step_key(SEED, 2, 0), tensor_id=0
    )
    assert (a.first != b.first).float().mean() > 0.2
    assert (a.main != b.main).float().mean() > 0.05
    assert not torch.equal(s1["P"], s2["P"])


def test_variation_seed_changes_parameters():
    """Another variation seed (d2d draw) changes the result; the same seed reproduces it."""
    results = []
    for seed in (1, 1, 2):
        device = PowerResponse(tau=0.6, gamma=0.5, dw_min=0.01, d2d_std=0.3, variation_seed=seed)
        config = AnalogConfig(algorithm="asgd", device=device)
        W = torch.full((2048,), 0.1, device=DEVICE)
        g = torch.full((2048,), -1.0, device=DEVICE)
        asgd_step_triton(W, g, lr=0.05, config=config, key=philox.step_key(SEED, 1, 0), tensor_id=0)
        results.append(W)
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_pulses_move_weights_by_the_device_response():
    """Hand math: n = 0.5 * 2^-6 / 2^-7 = 1 pulse up; on a linear device at w = 0, q_up = 1, so w becomes 2^-7."""
    config = AnalogConfig(algorithm="asgd", device=LinearResponse(tau=1.0, dw_min=2.0**-7))
    W = torch.zeros(5, device=DEVICE)
    g = torch.full((5,), -(2.0**-6), device=DEVICE)
    out = asgd_step_triton(W, g, lr=0.5, config=config, key=philox.step_key(SEED, 1, 0), tensor_id=0)
    assert out.first.tolist() == [1] * 5
    assert out.first_pairs is None
    assert torch.equal(W, torch.full((5,), 2.0**-7, device=DEVICE))


def test_pairs_drift_toward_the_symmetric_point():
    """Hand math: g = 0, A = 2^-5, lr = 0.5: e = (0.5 * 2^-5) * 0.5 = 2^-7 = one pair of dw_min = 2^-7.

    One up and one down pulse on a linear device with asymmetry 0.25 at w = 0: q_up = 1.25,
    q_down = 0.75, so w becomes 2^-7 * (1.25 - 0.75) = 2^-8; net 0, pairs 1, total 2.
    """
    config = AnalogConfig(algorithm="asgd", device=LinearResponse(tau=1.0, dw_min=2.0**-7, asymmetry=0.25))
    kw = dict(lr=0.5, config=config, key=philox.step_key(SEED, 1, 0), tensor_id=0, offset=3)
    W = torch.zeros(6, device=DEVICE)
    g = torch.zeros(6, device=DEVICE)
    A = torch.full((6,), 2.0**-5, device=DEVICE)
    out = asgd_step_triton(W, g, A=A, **kw)
    assert out.first.tolist() == [0] * 6 and out.first_pairs.tolist() == [1] * 6
    assert torch.equal(W, torch.full((6,), 2.0**-8, device=DEVICE))
    W2 = torch.zeros(6, device=DEVICE)
    total = asgd_step_triton(W2, g, A=A, totals=True, **kw)
    assert total.first.dim() == 0 and int(total.first) == 12 and total.first_pairs is None
    assert torch.equal(W2, W)


# ---------------------------------------------------------------------------------------------
# Input checks, devices and the torch.library ops.
# ---------------------------------------------------------------------------------------------
def test_rejects_bad_inputs():
    config = AnalogConfig(algorithm="asgd")
    W = torch.zeros(8, device=DEVICE)
    g = torch.zeros(8, device=DEVICE)
    with pytest.raises(ValueError, match="elements"):
        asgd_step_triton(W, torch.zeros(7, device=DEVICE), lr=0.1, config=config, key=1, tensor_id=0)
    with pytest.raises(ValueError, match="1-D"):
        asgd_step_triton(
            torch.zeros(2, 4, device=DEVICE), torch.zeros(2, 4, device=DEVICE), lr=0.1, config=config, key=1, tensor_id=0
        )
    with pytest.raises(ValueError, match="dtype"):
        asgd_step_triton(W.double(), g, lr=0.1, config=config, key=1, tensor_id=0)
    with pytest.raises(ValueError, match="shape"):
        asgd_step_triton(W, g, A=torch.zeros(7, device=DEVICE), lr=0.1, config=config, key=1, tensor_id=0)
    with pytest.raises(ValueError, match="dtype"):
        asgd_step_triton(W, g, A=g.double(), lr=0.1, config=config, key=1, tensor_id=0)
    with pytest.raises(ValueError, match="offset"):
        asgd_step_triton(W, g, lr=0.1, config=config, key=1, tensor_id=0, offset=-1)


@pytest.mark.parametrize("totals", [False, True])
def test_empty_tensor(totals):
    config = make_config("rl2_acc_t1", "linear")
    s = make_state(config, 0)
    out = rl2_step_triton(
        s["W"],
        s["P"],
        s["H"],
        s["Wbar"],
        torch.zeros(0, device=DEVICE),
        lr=0.1,
        config=config,
        key=5,
        tensor_id=0,
        totals=totals,
    )
    if totals:
        assert int(out.first) == 0 and int(out.main) == 0
    else:
        assert out.first.numel() == 0 and out.main.numel() == 0


def test_device_guard_is_a_no_op_on_cpu():
    with common.device_guard(torch.device("cpu")):
        pass


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device_while_the_first_is_current():
    """Tensors on cuda:1 update correctly while cuda:0 is the current device (the launch guards its device)."""
    config = make_config("rl2_ema", "power", c2c=0.2, read_noise=0.02)
    ref = {k: v.to("cuda:1") for k, v in make_state(config, 1000).items()}
    tri = {k: v.clone() for k, v in ref.items()}
    g = torch.randn(1000, generator=torch.Generator().manual_seed(4)).to("cuda:1")
    kw = dict(config=config, key=philox.step_key(SEED, 1, 0), tensor_id=0, A=make_excess(g, 1))
    with torch.cuda.device(0):
        want = run_step("ref", "rl2_ema", ref, g, **kw)
        got = run_step("tri", "rl2_ema", tri, g, **kw)
        torch.cuda.synchronize(1)
    assert (got.first != want.first).float().mean() < 1e-3
    for name in ref:
        torch.testing.assert_close(tri[name], ref[name], rtol=1e-4, atol=1e-5)
