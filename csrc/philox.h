// Philox4x32-10, Triton's uniform conversion and Box-Muller, shared by the C++ and CUDA kernels.
//
// This is the generator of SPEC section 4, bit for bit as Triton's tl.randint4x and as
// fastanalog/ops/philox.py (the reference):
//
//   key     (k0, k1)         = low and high 32 bits of the 64-bit key
//   counter (c0, c1, c2, c3) = (index low 32 bits, index high 32 bits, 0, 0)
//   10 rounds of
//       (hi_b, lo_b) = 0xCD9E8D57 * c2        (32x32 -> 64-bit product, split)
//       (hi_a, lo_a) = 0xD2511F53 * c0
//       (c0, c1, c2, c3) = (hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a)
//       k0 += 0x9E3779B9,  k1 += 0xBB67AE85    (mod 2^32)
//
// A word x becomes a float32 uniform as Triton's uint_to_uniform_float: reinterpret as
// int32, map negative s to -s - 1 (= ~s, so the result lies in [0, 2^31 - 1]), convert to
// float32 (round to nearest) and multiply by 4.6566127342e-10f (= 2^-31 in float32).
//
// Box-Muller as Triton's pair_uniform_to_normal, in float32:
//   u1 = max(u1, 1e-7f);  th = u2 * 6.2831855f;  r = sqrt(-2 * log(u1))
//   (n1, n2) = (r * cos(th), r * sin(th))
//
// Everything here is usable from host C++ and CUDA device code. The CPU kernels call the
// scalar parts only outside their hot loops; their vectorised Philox lives beside the
// kernels (csrc/analog_update.cpp), and their log/sqrt/cos/sin are the vector-math calls
// torch itself makes, so that they reproduce the reference bit for bit.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FA_HD __host__ __device__ __forceinline__
#else
#define FA_HD inline
#endif

namespace fastanalog {

// Philox constants (Salmon et al. 2011; the values Triton uses).
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;    // Weyl increment of k0 per round
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;    // Weyl increment of k1 per round
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;  // multiplier of c0
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;  // multiplier of c2
constexpr int kPhiloxRounds = 10;

// XOR-ed into a step key to open the second stream of a step (c2c noise of W) in the
// SPEC v1 layout of the draws; the v2 streams below replace it.
constexpr uint64_t kStreamWC2C = 0x5DEECE66DULL;

// The streams of one step (SPEC v2 section 4), as philox.STREAM_* in the reference. In
// stream s, global element i takes word r(i % 4) of the call with counter i / 4, keyed
// stream_key(step_key, s); normals: elements 4j, 4j+1 are the Box-Muller pair of (r0, r1)
// of call j, elements 4j+2, 4j+3 that of (r2, r3).
enum Stream : int {
  kStreamRoundFirst = 0,  // uniforms: net rounding u0 of the first array written (P; asgd: W)
  kStreamPairsFirst = 1,  // uniforms: rounding u1 of that array's opposite-pulse pairs (with an excess)
  kStreamRoundW = 2,      // uniforms: rounding of the W transfer (rl; rl2 "ema")
  kStreamC2CFirst = 3,    // normals: cycle-to-cycle noise of the first array
  kStreamReadP = 4,       // normals: read noise of P
  kStreamC2CW = 5,        // normals: cycle-to-cycle noise of W (rl, rl2)
  kStreams = 6
};

// STREAM_SALT[s] = (s * 0x9E3779B97F4A7C15) mod 2^63: s times the 64-bit golden ratio,
// kept to 63 bits, so that a stream key stays a non-negative int64 like the step key.
FA_HD constexpr uint64_t stream_salt(int s) {
  return (static_cast<uint64_t>(s) * 0x9E3779B97F4A7C15ULL) & 0x7FFFFFFFFFFFFFFFULL;
}
constexpr uint64_t kStreamSalt[kStreams] = {stream_salt(0), stream_salt(1), stream_salt(2),
                                            stream_salt(3), stream_salt(4), stream_salt(5)};

// The Philox key of stream s of a step: step_key ^ STREAM_SALT[s] (host and device code).
FA_HD constexpr uint64_t stream_key(uint64_t key, int s) { return key ^ stream_salt(s); }

// The key mixer of fastanalog/ops/philox.py (SplitMix64 chained over its inputs, 63 bits
// kept): variation_key(seed, tensor_id, array) keys the device-to-device draw of one array
// (array 0: W, 1: P). The ops take the variation seeds and tensor ids and derive the keys.
FA_HD constexpr uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}
constexpr uint64_t kVariationDomain = 0x13198A2E03707344ULL;
FA_HD constexpr uint64_t variation_key(uint64_t seed, uint64_t tensor_id, uint64_t array) {
  return splitmix64(splitmix64(splitmix64(splitmix64(0 ^ kVariationDomain) ^ seed) ^ tensor_id) ^ array) &
         0x7FFFFFFFFFFFFFFFULL;
}

// Triton's uint_to_uniform_float scale for 32-bit words: float32(4.6566127342e-10) = 2^-31.
constexpr float kUniformScale = 4.6566127342e-10f;
// Box-Muller constants, rounded to float32 as the float32 tensor ops of the reference do.
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniform = 1.0e-7f;

// High and low 32-bit words of the 64-bit product a * b.
FA_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// Four 32-bit words for global element index `index` under a 64-bit key (tl.randint4x).
struct Philox4 {
  uint32_t r0, r1, r2, r3;
};

FA_HD Philox4 philox4x32_10(uint64_t key, uint64_t index) {
  uint32_t c0 = static_cast<uint32_t>(index);
  uint32_t c1 = static_cast<uint32_t>(index >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(key);
  uint32_t k1 = static_cast<uint32_t>(key >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    uint32_t hi_b, lo_b, hi_a, lo_a;
    mulhilo32(kPhiloxRoundB, c2, hi_b, lo_b);
    mulhilo32(kPhiloxRoundA, c0, hi_a, lo_a);
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Philox4{c0, c1, c2, c3};
}

// Triton's uint_to_uniform_float: a float32 in [0, 1] (1.0 only for the two words that
// round up, exactly as Triton and the reference).
FA_HD float uint_to_uniform(uint32_t x) {
  int32_t s = static_cast<int32_t>(x);
  s ^= (s >> 31);  // negative s -> -s - 1 (two's complement: ~s)
  return static_cast<float>(s) * kUniformScale;
}

#if defined(__CUDACC__)
// Triton's pair_uniform_to_normal with the CUDA float32 math library (what torch's CUDA
// log/sqrt/cos/sin call). Multiplies and adds are separate roundings, as in the reference.
__device__ __forceinline__ void pair_uniform_to_normal(float u1, float u2, float& n1, float& n2) {
  u1 = fmaxf(u1, kMinUniform);
  const float th = __fmul_rn(u2, kTwoPi);
  const float r = sqrtf(__fmul_rn(-2.0f, logf(u1)));
  n1 = __fmul_rn(r, cosf(th));
  n2 = __fmul_rn(r, sinf(th));
}
#endif

}  // namespace fastanalog
