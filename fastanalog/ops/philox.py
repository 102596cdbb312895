"""Philox4x32-10 in plain torch integer ops, identical to Triton's ``tl.randint4x``.

Every backend draws its random numbers from this generator (SPEC section 4), so the
reference can replay exactly what a fused kernel drew. Words are carried in int64
tensors holding values in ``[0, 2**32)``; 32x32->64 products are split into 16-bit
halves so that no intermediate overflows int64.

Keys
----
``step_key(seed, step, tensor_id)`` is the one mixing function every backend uses:
SplitMix64 chained over the three inputs, truncated to 63 bits so the key passes to
a kernel as a non-negative int64 (``step_keys`` gives the keys of many tensors of one
step at once). ``variation_key(variation_seed, tensor_id, array)`` keys device-to-device
parameters (``array`` is 0 for the main array W and 1 for the residual array P); it
depends on no step, so those parameters never change.

Streams (SPEC v2, section 4)
----------------------------
Each purpose of a step draws from its own stream ``s`` keyed
``stream_key(step_key, s) = step_key ^ STREAM_SALT[s]`` (a XOR with a fixed 63-bit
constant, so a kernel derives it from the step key with one instruction). In a
stream, global element ``i`` takes word ``r(i mod 4)`` of the Philox call whose
counter is ``j = i div 4``: one call serves four consecutive elements. Normals
come in Box-Muller pairs of one call: elements ``4j, 4j+1`` are the cosine and
sine outputs of ``(r0, r1)``, elements ``4j+2, 4j+3`` those of ``(r2, r3)``.
See :func:`stream_words`, :func:`stream_uniform` and :func:`stream_normal`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
MASK63 = 0x7FFFFFFFFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10

# The streams of one step (SPEC section 4): what each draws, for which array.
STREAM_ROUND_FIRST = 0  # uniforms: net rounding u0 of the first array written (P for rl/rl2, W for asgd)
STREAM_PAIRS_FIRST = 1  # uniforms: rounding u1 of the opposite-pulse pairs of that array (per-sample writes)
STREAM_ROUND_W = 2  # uniforms: rounding of the W transfer (rl, rl2 "ema")
STREAM_C2C_FIRST = 3  # normals: cycle-to-cycle noise of the first array
STREAM_READ_P = 4  # normals: read noise of P
STREAM_C2C_W = 5  # normals: cycle-to-cycle noise of W (rl, rl2)
N_STREAMS = 6
# stream_key(k, s) = k ^ STREAM_SALT[s]: s times the 64-bit golden ratio, kept to 63 bits.
STREAM_SALT = tuple((s * 0x9E3779B97F4A7C15) & 0x7FFFFFFFFFFFFFFF for s in range(N_STREAMS))
# Domain separators for the key mixer, so step and variation keys never collide.
_STEP_DOMAIN = 0x243F6A8885A308D3
_VARIATION_DOMAIN = 0x13198A2E03707344
# Scale of Triton's ``uint_to_uniform_float`` for 32-bit words.
UNIFORM_SCALE = 4.6566127342e-10


def splitmix64(x: int) -> int:
    """SplitMix64 finaliser of a 64-bit integer (Python int in, Python int out)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def _chain(*values: int) -> int:
    """SplitMix64 chained over ``values`` from 0: the 64-bit state after the last."""
    h = 0
    for v in values:
        h = splitmix64(h ^ (int(v) & MASK64))
    return h


def _mix(*values: int) -> int:
    return _chain(*values) & MASK63


def step_key(seed: int, step: int, tensor_id: int) -> int:
    """The 63-bit Philox key of one optimizer step of one analog tensor."""
    return _mix(_STEP_DOMAIN, seed, step, tensor_id)


def step_keys(seed: int, step: int, tensor_ids: Iterable[int]) -> list[int]:
    """``[step_key(seed, step, t) for t in tensor_ids]``, the chain over (domain, seed, step) mixed once.

    The optimizer keys every analog tensor of a step: this spends one SplitMix64 per tensor
    instead of four.
    """
    h = _chain(_STEP_DOMAIN, seed, step)
    return [splitmix64(h ^ (int(t) & MASK64)) & MASK63 for t in tensor_ids]


def variation_key(variation_seed: int, tensor_id: int, array: int) -> int:
    """The 63-bit Philox key of the device-to-device parameters of one array."""
    return _mix(_VARIATION_DOMAIN, variation_seed, tensor_id, array)


def stream_key(step_key: int, stream: int) -> int:
    """The 63-bit Philox key of stream ``stream`` (0..5) of a step: ``step_key ^ STREAM_SALT[stream]``."""
    if not 0 <= stream < N_STREAMS:
        raise ValueError(f"stream must be in [0, {N_STREAMS}), got {stream}")
    return (int(step_key) ^ STREAM_SALT[stream]) & MASK63


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of constant ``a`` and words ``b``."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    t = b_lo * a  # < 2**48
    u = b_hi * a + (t >> 16)  # < 2**48 + 2**32
    lo = ((u & 0xFFFF) << 16) | (t & 0xFFFF)
    hi = u >> 16
    return hi, lo


def philox4x32(key: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor):
    """Philox4x32 with ``N_ROUNDS`` rounds; counters are int64 tensors of 32-bit words."""
    k0 = key & MASK32
    k1 = (key >> 32) & MASK32
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mul32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def randint4x(key: int, offset: torch.Tensor):
    """Four 32-bit words (int64 tensors) per element, as ``tl.randint4x(key, offset)``.

    ``offset`` is the global element index (an integer tensor); the counter is
    ``(offset low 32 bits, offset high 32 bits, 0, 0)``.
    """
    offset = offset.to(torch.int64)
    lo = offset & MASK32
    hi = (offset >> 32) & MASK32
    zero = torch.zeros_like(lo)
    return philox4x32(key, lo, hi, zero, zero)


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit words: float32 in ``[0, 1)``."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def pair_uniform_to_normal(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's Box-Muller transform of two float32 uniforms into two normals."""
    u1 = torch.clamp(u1, min=1.0e-7)
    th = u2 * 6.283185307179586
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def rand4x(key: int, offset: torch.Tensor):
    """Four float32 uniforms per element, as ``tl.rand4x``."""
    return tuple(uint_to_uniform(w) for w in randint4x(key, offset))


def randn4x(key: int, offset: torch.Tensor):
    """Four float32 normals per element, as ``tl.randn4x``."""
    u0, u1, u2, u3 = rand4x(key, offset)
    n0, n1 = pair_uniform_to_normal(u0, u1)
    n2, n3 = pair_uniform_to_normal(u2, u3)
    return n0, n1, n2, n3


def _calls(key: int, offset: int, numel: int, where) -> tuple[tuple[torch.Tensor, ...], int]:
    """The Philox calls covering elements ``[offset, offset + numel)``: their words and the first call's index."""
    if offset < 0 or numel < 0:
        raise ValueError(f"offset and numel must be >= 0, got {offset} and {numel}")
    first = offset // 4
    last = (offset + numel + 3) // 4
    j = torch.arange(first, last, dtype=torch.int64, device=where)
    return randint4x(key, j), first


def _per_element(values: tuple[torch.Tensor, ...], first: int, offset: int, numel: int) -> torch.Tensor:
    """Interleave four per-call values into per-element values (element ``4j + k`` gets value ``k`` of call ``j``)."""
    flat = torch.stack(values, dim=1).reshape(-1)
    start = offset - 4 * first
    return flat[start : start + numel]


def stream_words(key: int, offset: int, numel: int, where=None) -> torch.Tensor:
    """The 32-bit words (int64 tensor) of elements ``[offset, offset + numel)`` of the stream keyed ``key``.

    Element ``i`` takes word ``i mod 4`` of ``randint4x(key, i div 4)``.
    """
    words, first = _calls(key, offset, numel, where)
    return _per_element(words, first, offset, numel)


def stream_uniform(key: int, offset: int, numel: int, where=None) -> torch.Tensor:
    """Float32 uniforms in ``[0, 1)`` of elements ``[offset, offset + numel)`` of the stream keyed ``key``."""
    return uint_to_uniform(stream_words(key, offset, numel, where))


def stream_normal(key: int, offset: int, numel: int, where=None) -> torch.Tensor:
    """Float32 normals of elements ``[offset, offset + numel)`` of the stream keyed ``key``.

    Call ``j`` gives elements ``4j, 4j+1`` the Box-Muller pair of its words ``(r0, r1)``
    and elements ``4j+2, 4j+3`` the pair of ``(r2, r3)`` (cosine output first).
    """
    words, first = _calls(key, offset, numel, where)
    u0, u1, u2, u3 = (uint_to_uniform(w) for w in words)
    n0, n1 = pair_uniform_to_normal(u0, u1)
    n2, n3 = pair_uniform_to_normal(u2, u3)
    return _per_element((n0, n1, n2, n3), first, offset, numel)
