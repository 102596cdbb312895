"""Philox4x32-10 in torch ops: known-answer vectors and bit equality with Triton."""

import os

import pytest
import torch

from fastanalog.ops import philox

# stream 2 of step_key(1, 2, 3); words of elements 2**34 - 2 .. 2**34 + 1 (calls 2**32 - 1 and 2**32).
STREAM_KAT_KEY = 0x78B9392EA705C721
STREAM_KAT_WORDS = [3995614152, 2074628553, 2745719982, 3020929487]

# Known-answer tests of Random123 (kat_vectors, philox4x32 with 10 rounds):
# counter (c0..c3), key (k0, k1) -> output words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_known_answer_vectors(ctr, key, expected):
    c = [torch.tensor([v], dtype=torch.int64) for v in ctr]
    out = philox.philox4x32(key[0] | (key[1] << 32), *c)
    assert tuple(int(o) for o in out) == expected


def test_uniforms_in_unit_interval_and_normals_standard():
    idx = torch.arange(200_000)
    u = torch.cat(philox.rand4x(12345, idx))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.002
    n = torch.cat(philox.randn4x(12345, idx))
    assert abs(float(n.mean())) < 0.005 and abs(float(n.std()) - 1.0) < 0.005


def test_keys_depend_on_every_input_and_fit_int64():
    keys = {philox.step_key(s, k, t) for s in (0, 1) for k in (1, 2) for t in (0, 1)}
    assert len(keys) == 8
    assert all(0 <= k < 2**63 for k in keys)
    assert philox.variation_key(0, 0, 0) != philox.variation_key(0, 0, 1)
    assert philox.step_key(7, 3, 2) == philox.step_key(7, 3, 2)


def test_step_keys_are_the_step_keys_of_each_tensor():
    ids = [0, 1, 2, 53, 54, 1000, 2**31, 2**32 + 7, 2**63 + 5, 2**64 - 1]
    for seed, step in ((0, 1), (1, 2), (2**62, 17), (2**64 - 1, 2**40)):
        assert philox.step_keys(seed, step, ids) == [philox.step_key(seed, step, t) for t in ids]
    assert philox.step_keys(7, 3, range(200)) == [philox.step_key(7, 3, t) for t in range(200)]
    assert philox.step_keys(7, 3, []) == []


def test_high_offsets_use_the_high_counter_word():
    idx = torch.tensor([5, 5 + 2**32], dtype=torch.int64)
    a, b = (w.tolist() for w in philox.randint4x(99, idx)[:2])
    assert a[0] != a[1] or b[0] != b[1]


def test_stream_keys_are_the_step_key_xor_a_fixed_salt():
    key = philox.step_key(3, 5, 7)
    assert philox.stream_key(key, 0) == key
    keys = {philox.stream_key(key, s) for s in range(philox.N_STREAMS)}
    assert len(keys) == philox.N_STREAMS and all(0 <= k < 2**63 for k in keys)
    assert philox.stream_key(key, 4) == key ^ ((4 * 0x9E3779B97F4A7C15) & philox.MASK63)
    with pytest.raises(ValueError, match="stream"):
        philox.stream_key(key, 6)


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4, 4099, 2**34 - 7])
def test_one_call_serves_four_consecutive_elements(offset):
    """Element i takes word i mod 4 of the call with counter i div 4 (SPEC v2, section 4)."""
    key, n = 0x1234_5678_9ABC_DEF, 23
    words = philox.stream_words(key, offset, n)
    for k in range(n):
        i = offset + k
        call = philox.randint4x(key, torch.tensor([i // 4]))
        assert int(words[k]) == int(call[i % 4][0]), i
    assert torch.equal(philox.stream_uniform(key, offset, n), philox.uint_to_uniform(words))


def test_normals_are_box_muller_pairs_of_one_call():
    key = 99
    normals = philox.stream_normal(key, 6, 10)  # elements 6..15: calls 1, 2, 3
    for j in (2, 3):
        u = [philox.uint_to_uniform(w) for w in philox.randint4x(key, torch.tensor([j]))]
        n0, n1 = philox.pair_uniform_to_normal(u[0], u[1])
        n2, n3 = philox.pair_uniform_to_normal(u[2], u[3])
        expected = torch.cat([n0, n1, n2, n3])
        assert torch.equal(normals[4 * j - 6 : 4 * j - 2], expected)
    u = [philox.uint_to_uniform(w) for w in philox.randint4x(key, torch.tensor([1]))]
    assert torch.equal(normals[:2], torch.cat(philox.pair_uniform_to_normal(u[2], u[3])))


def test_a_range_of_a_stream_is_a_slice_of_the_whole():
    key = philox.step_key(1, 1, 1)
    whole = philox.stream_normal(key, 0, 1000)
    for lo, hi in ((0, 1), (3, 9), (5, 1000), (998, 1000)):
        assert torch.equal(philox.stream_normal(key, lo, hi - lo), whole[lo:hi])
    assert philox.stream_words(key, 17, 0).numel() == 0


def test_stream_known_answers():
    """Fixed values of the v2 layout (computed from the Random123-checked Philox above):
    a change of key mixing, salts or word order changes them."""
    key = philox.stream_key(philox.step_key(1, 2, 3), 2)
    assert key == STREAM_KAT_KEY
    assert philox.stream_words(key, 2**34 - 2, 4).tolist() == STREAM_KAT_WORDS


triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


@triton.jit
def _philox_probe(out_int, out_uni, out_norm, seed, n, base, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    r0, r1, r2, r3 = tl.randint4x(seed, offs.to(tl.int64) + base)
    tl.store(out_int + offs * 4 + 0, r0, mask=mask)
    tl.store(out_int + offs * 4 + 1, r1, mask=mask)
    tl.store(out_int + offs * 4 + 2, r2, mask=mask)
    tl.store(out_int + offs * 4 + 3, r3, mask=mask)
    tl.store(out_uni + offs, tl.rand(seed, offs.to(tl.int64) + base), mask=mask)
    tl.store(out_norm + offs, tl.randn(seed, offs.to(tl.int64) + base), mask=mask)


@pytest.mark.parametrize("base", [0, 2**32 - 500])
@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 17, philox.step_key(3, 5, 7)])
def test_bitwise_equal_to_triton(seed, base):
    """Triton's randint4x is the spec's generator, including the counter's high word (base
    2**32 - 500 crosses it): the reason for the minimum Triton version the package checks."""
    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    dev = "cuda" if on_gpu else "cpu"
    n = 1000
    out_int = torch.zeros(n * 4, dtype=torch.int32, device=dev)
    out_uni = torch.zeros(n, dtype=torch.float32, device=dev)
    out_norm = torch.zeros(n, dtype=torch.float32, device=dev)
    _philox_probe[(triton.cdiv(n, 256),)](out_int, out_uni, out_norm, seed, n, base, BLOCK=256)
    idx = torch.arange(n, dtype=torch.int64) + base
    words = torch.stack(philox.randint4x(seed, idx), dim=1).reshape(-1)
    assert torch.equal(out_int.cpu().to(torch.int64) & philox.MASK32, words)
    # tl.rand is the uniform of word 0, bit for bit.
    assert torch.equal(out_uni.cpu(), philox.uint_to_uniform(words.view(n, 4)[:, 0]))
    # tl.randn is Box-Muller of words 0 and 1 (cosine branch); transcendental
    # functions may differ in the last ulp between libraries.
    u0, u1 = philox.uint_to_uniform(words.view(n, 4)[:, 0]), philox.uint_to_uniform(words.view(n, 4)[:, 1])
    torch.testing.assert_close(out_norm.cpu(), philox.pair_uniform_to_normal(u0, u1)[0], rtol=2e-6, atol=2e-6)


def test_minimum_triton_version_is_enforced(monkeypatch):
    from fastanalog.ops import dispatch

    assert dispatch.triton_version_ok(triton.__version__)
    assert dispatch.triton_version_ok("3.0.0") and dispatch.triton_version_ok("3.10.1+git1234")
    assert not dispatch.triton_version_ok("2.3.1") and not dispatch.triton_version_ok("2.1.0")
    dispatch.triton_usable.cache_clear()
    monkeypatch.setattr(triton, "__version__", "2.3.1")
    try:
        with pytest.warns(RuntimeWarning, match="older than 3.0"):
            assert not dispatch.backend_available("triton")
        assert "triton" not in dispatch.available_backends()
    finally:
        dispatch.triton_usable.cache_clear()
