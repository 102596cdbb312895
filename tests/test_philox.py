"""Philox4x32-10 in torch ops: known-answer vectors and bit equality with Triton."""

import os

import pytest
import torch

from fastanalog.ops import philox

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


def test_high_offsets_use_the_high_counter_word():
    idx = torch.tensor([5, 5 + 2**32], dtype=torch.int64)
    a, b = (w.tolist() for w in philox.randint4x(99, idx)[:2])
    assert a[0] != a[1] or b[0] != b[1]


triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


@triton.jit
def _philox_probe(out_int, out_uni, out_norm, seed, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    r0, r1, r2, r3 = tl.randint4x(seed, offs.to(tl.int64))
    tl.store(out_int + offs * 4 + 0, r0, mask=mask)
    tl.store(out_int + offs * 4 + 1, r1, mask=mask)
    tl.store(out_int + offs * 4 + 2, r2, mask=mask)
    tl.store(out_int + offs * 4 + 3, r3, mask=mask)
    tl.store(out_uni + offs, tl.rand(seed, offs.to(tl.int64)), mask=mask)
    tl.store(out_norm + offs, tl.randn(seed, offs.to(tl.int64)), mask=mask)


@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 17, philox.step_key(3, 5, 7)])
def test_bitwise_equal_to_triton(seed):
    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    dev = "cuda" if on_gpu else "cpu"
    n = 1000
    out_int = torch.zeros(n * 4, dtype=torch.int32, device=dev)
    out_uni = torch.zeros(n, dtype=torch.float32, device=dev)
    out_norm = torch.zeros(n, dtype=torch.float32, device=dev)
    _philox_probe[(triton.cdiv(n, 256),)](out_int, out_uni, out_norm, seed, n, BLOCK=256)
    idx = torch.arange(n, dtype=torch.int64)
    words = torch.stack(philox.randint4x(seed, idx), dim=1).reshape(-1)
    assert torch.equal(out_int.cpu().to(torch.int64) & philox.MASK32, words)
    # tl.rand is the uniform of word 0, bit for bit.
    assert torch.equal(out_uni.cpu(), philox.uint_to_uniform(words.view(n, 4)[:, 0]))
    # tl.randn is Box-Muller of words 0 and 1 (cosine branch); transcendental
    # functions may differ in the last ulp between libraries.
    u0, u1 = philox.uint_to_uniform(words.view(n, 4)[:, 0]), philox.uint_to_uniform(words.view(n, 4)[:, 1])
    torch.testing.assert_close(out_norm.cpu(), philox.pair_uniform_to_normal(u0, u1)[0], rtol=2e-6, atol=2e-6)
