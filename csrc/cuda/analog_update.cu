// Fused CUDA kernels of the analog update (SPEC v2 section 3): asgd, rl, rl2.
//
// The CUDA kernel of the ops fastanalog::{asgd,rl,rl2}_step (schemas in
// fastanalog/ops/library.py), registered for their private twin fastanalog::_native_step with
// the arguments of the CPU kernel, giving the numbers of the reference
// (fastanalog/ops/reference.py) run on a CUDA device.
//
// Work split (SPEC section 4). Global element i (= shard offset + position) takes word
// i % 4 of the Philox4x32-10 call with counter j = i / 4 of each stream, so one thread
// handles the four consecutive global elements 4j .. 4j+3 of one call (grid-stride over j):
// it computes each stream's call once, then updates those of its four elements that lie
// in the shard [offset, offset + numel) (the offset need not be a multiple of 4). Streams,
// keyed stream_key(step_key, s) = step_key ^ STREAM_SALT[s] (philox.h):
//   0 uniforms, net rounding of the first array written (W for asgd, P for rl/rl2);
//   1 uniforms, rounding of that array's opposite-pulse pairs (only when A is given);
//   2 uniforms, rounding of the W transfer (rl with transfer; rl2 "ema");
//   3 normals, c2c noise of the first array;  4 normals, read noise of P;
//   5 normals, c2c noise of W (rl with transfer; rl2).
// A stream the launch does not need is not drawn. Per element: load g (and A), W, P, H;
// device-to-device parameters regenerated from the variation key; the residual write,
// noisy read, buffer, transfer and mix in registers; one store per array.
//
// Bitwise parity with the reference. Each torch op of the reference is its own kernel, so
// nothing there is fused into a multiply-add; here every float multiply, add and divide is
// an explicitly rounded intrinsic (__fmul_rn, __fadd_rn, ...), which the compiler never
// contracts, while log/sqrt/cos/sin/pow/expm1 are the CUDA math-library functions that
// torch's CUDA kernels call. Storage dtype and algorithm are template parameters; the
// response family and the noise options are run-time values that are the same for every
// thread of a launch, so they cost no divergence.
//
// The argument block is a __grid_constant__ kernel parameter: threads read it in place
// (parameter memory), no thread copies it to local memory.
//
// Build time: the device code needs no torch header. The kernels are instantiated
// explicitly below, and the host glue (argument checks, op registration) with its torch
// headers sits in a `#ifndef __CUDA_ARCH__` section, which the device compilation passes
// (one per GPU architecture) never see.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../op_layout.h"
#include "../philox.h"

namespace fastanalog {
namespace cuda {

// Family, Algorithm and DeviceField: op_layout.h.
constexpr int kBisectionSteps = 60;
constexpr int kThreads = 256;

// The streams of a step (Stream, stream_key) and the generator: philox.h.
static_assert(stream_key(0, kStreamRoundFirst) == 0ULL && stream_key(0, kStreamPairsFirst) == 0x1E3779B97F4A7C15ULL,
              "stream keys as philox.STREAM_SALT");

struct Device {
  int family;
  float tau_min, tau_max, gamma, dw_min, asym, d2d_std, c2c_std, shift;
  bool has_gamma, zero_shift;
  unsigned long long var_key;
  int table_segments;
  const float* table;      // device memory: up[0..m], down[0..m]
  const double* table64;   // the same in float64
};

struct Args {
  int64_t numel, offset;
  unsigned long long key;  // the step key
  const void* g;
  const void* A;  // per-element sum of the samples' |g| (SPEC 2a), or null: no excess, no pairs
  void* W;
  void* P;
  void* H;
  void* Wbar;
  int32_t* pulses_first;  // net counts N_up - N_down per element, or null
  int32_t* pairs_first;   // pairs min(N_up, N_down) per element, or null
  int32_t* pulses_main;
  unsigned long long* total_first;  // sum of N_up + N_down over the array (added to), or null
  unsigned long long* total_main;
  float lr, neg_lr, tlr, one_minus_tlr, gamma_mix, read_noise, threshold, max_pulses;
  int g_kind, a_kind;  // dtypes of g and A: 0 float32, 1 bfloat16, 2 float16
  bool transfer, ema;
  Device dev_w, dev_p;
};

// ----- float32 arithmetic without contraction --------------------------------------------
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float dvd(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double dvd(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float clampf(float v, float lo, float hi) { return fminf(fmaxf(v, lo), hi); }

// Storage conversions: load widens exactly, store rounds to nearest even (tensor.to(dtype)).
template <class T>
struct Store;
template <>
struct Store<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Store<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Store<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

// ----- random numbers (SPEC section 4) ------------------------------------------------------
// Box-Muller as philox.h's pair_uniform_to_normal (Triton's, the reference's), the same
// operations, plus one fact for the compiler: the angle u2 * 2pi (u2 in [0, 1]) is far below
// 105615, where CUDA's cosf/sinf switch to their exact (Payne-Hanek) range reduction. That
// path is dead here; without the assumption its scratch array would give every kernel a
// local-memory stack frame.
__device__ __forceinline__ void normal_pair(float u1, float u2, float& n1, float& n2) {
  u1 = fmaxf(u1, kMinUniform);
  const float th = __fmul_rn(u2, kTwoPi);
  __builtin_assume(!(fabsf(th) >= 105615.0f));
  const float r = sqrtf(__fmul_rn(-2.0f, logf(u1)));
  n1 = __fmul_rn(r, cosf(th));
  n2 = __fmul_rn(r, sinf(th));
}

// The four values one Philox call gives elements 4j .. 4j+3 of a stream.
struct Quad {
  float v0, v1, v2, v3;
};

// Element k (0..3) of a call's four values: selects, not an indexed array (which would
// live in local memory).
__device__ __forceinline__ float pick(const Quad& q, int k) {
  return k == 0 ? q.v0 : (k == 1 ? q.v1 : (k == 2 ? q.v2 : q.v3));
}

// Uniforms of call j of stream s: word k becomes element 4j + k's uniform.
__device__ __forceinline__ Quad stream_uniforms(unsigned long long step_key, Stream s, uint64_t j) {
  const Philox4 r = philox4x32_10(stream_key(step_key, s), j);
  return Quad{uint_to_uniform(r.r0), uint_to_uniform(r.r1), uint_to_uniform(r.r2), uint_to_uniform(r.r3)};
}

// Normals of call j of stream s: elements 4j, 4j+1 the Box-Muller pair of (r0, r1),
// elements 4j+2, 4j+3 that of (r2, r3), cosine output first.
__device__ __forceinline__ Quad stream_normals(unsigned long long step_key, Stream s, uint64_t j) {
  const Philox4 r = philox4x32_10(stream_key(step_key, s), j);
  Quad q;
  normal_pair(uint_to_uniform(r.r0), uint_to_uniform(r.r1), q.v0, q.v1);
  normal_pair(uint_to_uniform(r.r2), uint_to_uniform(r.r3), q.v2, q.v3);
  return q;
}

// ----- device parameters of one element ----------------------------------------------------
struct Params {
  float tau_min, tau_max, gamma, dw_min, asym, denom, shift;
};

__device__ __forceinline__ float d2d_factor(float z, float sd) {
  return fmaxf(add(1.0f, mul(sd, clampf(z, -3.0f, 3.0f))), 0.05f);
}

__device__ __noinline__ double table_g64(const double* tab, int m, double w, double tmin, double tmax, double asym) {
  double x = dvd(sub(w, tmin), sub(tmax, tmin));
  x = mul(fmin(fmax(x, 0.0), 1.0), static_cast<double>(m));
  double i = fmin(floor(x), static_cast<double>(m - 1));
  i = i >= 0.0 ? i : 0.0;
  const int k = static_cast<int>(i);
  const double frac = sub(x, i);
  const double* up = tab;
  const double* down = tab + (m + 1);
  const double q_up = mul(add(up[k], mul(sub(up[k + 1], up[k]), frac)), add(1.0, asym));
  const double q_down = mul(add(down[k], mul(sub(down[k + 1], down[k]), frac)), sub(1.0, asym));
  return dvd(sub(q_down, q_up), 2.0);
}

// The symmetric point of an element's device (per-element parameters), as the family's
// symmetric_point: closed forms for linear (float32), power and exp (float64), bisection
// for tables (float64).
__device__ __noinline__ float symmetric_point(const Device& dev, const Params p) {
  const double tmin = p.tau_min, tmax = p.tau_max, a = p.asym, g = p.gamma;
  double u_down;
  switch (dev.family) {
    case kLinear:
      return dvd(add(mul(add(1.0f, p.asym), p.tau_max), mul(sub(1.0f, p.asym), p.tau_min)), 2.0f);
    case kPower: {
      const double ratio = pow(dvd(sub(1.0, a), add(1.0, a)), dvd(1.0, g));
      u_down = dvd(2.0, add(1.0, ratio));
      break;
    }
    case kExp: {
      const double root = sqrt(add(mul(a, a), mul(sub(1.0, mul(a, a)), exp(mul(2.0, g)))));
      const double x = dvd(add(-a, root), sub(1.0, a));
      u_down = dvd(log(x), g);
      break;
    }
    default: {
      double lo = tmin, hi = tmax;
      for (int it = 0; it < kBisectionSteps; ++it) {
        const double mid = dvd(add(lo, hi), 2.0);
        const bool pos = table_g64(dev.table64, dev.table_segments, mid, tmin, tmax, a) > 0.0;
        lo = pos ? lo : mid;
        hi = pos ? mid : hi;
      }
      return static_cast<float>(dvd(add(lo, hi), 2.0));
    }
  }
  return static_cast<float>(add(tmin, mul(dvd(sub(tmax, tmin), 2.0), u_down)));
}

// Per-element parameters regenerated from the variation key exactly as
// ResponseDevice.element_params (one call per element index, unchanged by the v2 streams;
// kept out of line: only d2d configurations call it).
__device__ __noinline__ Params varied_params(const Device& dev, uint64_t index) {
  Params p;
  const Philox4 r = philox4x32_10(dev.var_key, index);
  float z0, z1, z2, z3, za, unused;
  normal_pair(uint_to_uniform(r.r0), uint_to_uniform(r.r1), z0, z1);
  normal_pair(uint_to_uniform(r.r2), uint_to_uniform(r.r3), z2, z3);
  const Philox4 ra = philox4x32_10(dev.var_key ^ 1ULL, index);
  normal_pair(uint_to_uniform(ra.r0), uint_to_uniform(ra.r1), za, unused);
  const float sd = dev.d2d_std;
  p.tau_min = mul(dev.tau_min, d2d_factor(z0, sd));
  p.tau_max = mul(dev.tau_max, d2d_factor(z1, sd));
  p.gamma = dev.has_gamma ? mul(dev.gamma, d2d_factor(z2, sd)) : dev.gamma;
  p.dw_min = mul(dev.dw_min, d2d_factor(z3, sd));
  p.asym = clampf(mul(dev.asym, d2d_factor(za, sd)), -0.99f, 0.99f);
  p.denom = dev.family == kExp ? expm1f(p.gamma) : 1.0f;
  p.shift = dev.zero_shift ? symmetric_point(dev, p) : 0.0f;
  return p;
}

// The nominal parameters, or the element's own under device-to-device variation.
__device__ __forceinline__ Params element_params(const Device& dev, uint64_t index) {
  if (dev.d2d_std > 0.f) return varied_params(dev, index);
  Params p;
  p.tau_min = dev.tau_min;
  p.tau_max = dev.tau_max;
  p.gamma = dev.gamma;
  p.dw_min = dev.dw_min;
  p.asym = dev.asym;
  p.denom = dev.family == kExp ? expm1f(dev.gamma) : 1.0f;
  p.shift = dev.zero_shift ? dev.shift : 0.0f;
  return p;
}

// ----- one write (SPEC section 2) -----------------------------------------------------------
// Stochastic rounding floor(n) + (u < n - floor(n)), float32.
__device__ __forceinline__ float stochastic_round(float n, float u) {
  const float fl = floorf(n);
  return add(fl, u < sub(n, fl) ? 1.0f : 0.0f);
}

// max(v, 0) as torch.clamp(v, min=0) (NaN stays NaN).
__device__ __forceinline__ float clamp_min0(float v) { return v > 0.0f ? v : 0.0f; }  // NaN: 0 (fmax)

// Pulses per direction of a write: net N and M pairs give N_up = M + max(N, 0) and
// N_down = M + max(-N, 0), each capped at max_pulses (infinity when there is no cap).
struct Pulses {
  float up, down;
};

__device__ __forceinline__ Pulses directional(float net, float max_pulses) {
  return Pulses{fminf(clamp_min0(net), max_pulses), fminf(clamp_min0(-net), max_pulses)};
}

__device__ __forceinline__ Pulses directional(float net, float pairs, float max_pulses) {
  return Pulses{fminf(add(pairs, clamp_min0(net)), max_pulses), fminf(add(pairs, clamp_min0(-net)), max_pulses)};
}

// Shape of the response (before the asymmetry factor) of an up or a down pulse at
// physical weight w.
__device__ float shape(const Device& dev, const Params& p, float w, bool up) {
  if (dev.family == kTable) {
    const int m = dev.table_segments;
    const float xx = mul(clampf(dvd(sub(w, p.tau_min), sub(p.tau_max, p.tau_min)), 0.0f, 1.0f), static_cast<float>(m));
    float i = fminf(floorf(xx), static_cast<float>(m - 1));
    i = i >= 0.0f ? i : 0.0f;
    const int k = static_cast<int>(i) + (up ? 0 : m + 1);
    const float frac = sub(xx, i);
    const float t0 = dev.table[k], t1 = dev.table[k + 1];
    return add(t0, mul(sub(t1, t0), frac));
  }
  const float half = dvd(sub(p.tau_max, p.tau_min), 2.0f);
  const float u = clampf(dvd(up ? sub(p.tau_max, w) : sub(w, p.tau_min), half), 0.0f, 2.0f);
  switch (dev.family) {
    case kPower:
      return p.gamma == 0.5f ? sqrtf(u) : powf(u, p.gamma);  // the square root, correctly rounded (PowerResponse._shape)
    case kExp:
      return dvd(expm1f(mul(p.gamma, u)), p.denom);
    default:
      return u;
  }
}

// The stored value x after n.up up and n.down down pulses (SPEC section 2 steps 2-4, the
// float32 order of reference.apply_pulses):
//   up    = (N_up * dw) * q_up(w)        (0 where N_up = 0)
//   down  = (N_down * dw) * q_down(w)    (0 where N_down = 0)
//   delta = up - down  [+ ((c2c * dw) * sqrt((N_up * q_up) * q_up + (N_down * q_down) * q_down)) * z]
//   clamp(x + delta, tau_min - shift, tau_max - shift)
// A direction without pulses evaluates no response (without pairs only one is needed).
__device__ float apply_pulses(const Device& dev, const Params& p, float x, Pulses n, float z) {
  const float w = add(x, p.shift);
  const bool has_up = n.up > 0.0f, has_down = n.down > 0.0f;
  const float q_up = has_up ? mul(shape(dev, p, w, true), add(1.0f, p.asym)) : 0.0f;
  const float q_down = has_down ? mul(shape(dev, p, w, false), sub(1.0f, p.asym)) : 0.0f;
  float delta = sub(has_up ? mul(mul(n.up, p.dw_min), q_up) : 0.0f, has_down ? mul(mul(n.down, p.dw_min), q_down) : 0.0f);
  if (dev.c2c_std > 0.f) {
    const float var = add(has_up ? mul(mul(n.up, q_up), q_up) : 0.0f, has_down ? mul(mul(n.down, q_down), q_down) : 0.0f);
    delta = add(delta, mul(mul(mul(dev.c2c_std, p.dw_min), sqrtf(var)), z));
  }
  return clampf(add(x, delta), sub(p.tau_min, p.shift), sub(p.tau_max, p.shift));
}

// g or A in any of the storage dtypes (the same for every thread of a launch).
__device__ __forceinline__ float load_input(const void* v, int kind, int64_t i) {
  if (kind == 1) return Store<__nv_bfloat16>::load(static_cast<const __nv_bfloat16*>(v)[i]);
  if (kind == 2) return Store<__half>::load(static_cast<const __half*>(v)[i]);
  return static_cast<const float*>(v)[i];
}

// |net| + 2 * pairs of one element, as reference.pulse_total counts them.
__device__ __forceinline__ unsigned long long pulses_of(int32_t net, int32_t pairs) {
  return static_cast<unsigned long long>(net < 0 ? -static_cast<int64_t>(net) : static_cast<int64_t>(net)) +
         2ULL * static_cast<unsigned long long>(pairs);
}

// Adds the threads' totals to *total: a warp sum, then one atomic per warp (integer
// addition, so the result does not depend on the order).
__device__ __forceinline__ void add_total(unsigned long long* total, unsigned long long acc) {
  if (total == nullptr) return;
  for (int d = 16; d > 0; d /= 2) acc += __shfl_down_sync(0xffffffffu, acc, d);
  if ((threadIdx.x & 31) == 0 && acc != 0) atomicAdd(total, acc);
}

// ----- the kernel --------------------------------------------------------------------------
// Blocks of 256 threads per SM that the register budget must allow. On sm_90 and older,
// asgd fits 80 registers without spilling (3 blocks) and rl, rl2 about 110 (2 blocks); the
// sm_100+ compiler needs about 115 registers for asgd (2 blocks) and caps rl, rl2 at 128.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000
constexpr int kMinBlocksAsgd = 2;
#else
constexpr int kMinBlocksAsgd = 3;
#endif
template <int ALG>
constexpr int kMinBlocks = ALG == kAsgd ? kMinBlocksAsgd : 2;

template <int ALG, class S>
__global__ void __launch_bounds__(kThreads, kMinBlocks<ALG>) step_kernel(const __grid_constant__ Args a) {
  S* __restrict__ W = static_cast<S*>(a.W);
  S* __restrict__ P = static_cast<S*>(a.P);
  S* __restrict__ H = static_cast<S*>(a.H);
  S* __restrict__ Wbar = static_cast<S*>(a.Wbar);
  S* __restrict__ first = ALG == kAsgd ? W : P;
  const Device& dev_first = ALG == kAsgd ? a.dev_w : a.dev_p;
  // What this launch draws and writes (the same for every thread).
  const bool has_pairs = a.A != nullptr;
  const bool writes_w = ALG == kRl2 || (ALG == kRl && a.transfer);
  const bool rounds_w = (ALG == kRl && a.transfer) || (ALG == kRl2 && a.ema);
  const bool c2c_first = dev_first.c2c_std > 0.f;
  const bool read_noise = writes_w && a.read_noise != 0.f;
  const bool c2c_w = writes_w && a.dev_w.c2c_std > 0.f;

  const uint64_t begin = static_cast<uint64_t>(a.offset);
  const uint64_t end = begin + static_cast<uint64_t>(a.numel);
  const uint64_t first_call = begin / 4;
  const uint64_t calls = (end + 3) / 4 - first_call;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  unsigned long long acc_first = 0, acc_main = 0;  // this thread's pulse totals
  for (uint64_t t = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < calls; t += stride) {
    const uint64_t j = first_call + t;
    // Each needed stream's call j, once for the four elements.
    const Quad u0 = stream_uniforms(a.key, kStreamRoundFirst, j);
    Quad u1{}, u2{}, z_first{}, z_read{}, z_w{};
    if (has_pairs) u1 = stream_uniforms(a.key, kStreamPairsFirst, j);
    if (rounds_w) u2 = stream_uniforms(a.key, kStreamRoundW, j);
    if (c2c_first) z_first = stream_normals(a.key, kStreamC2CFirst, j);
    if (read_noise) z_read = stream_normals(a.key, kStreamReadP, j);
    if (c2c_w) z_w = stream_normals(a.key, kStreamC2CW, j);

#pragma unroll 1
    for (int k = 0; k < 4; ++k) {
      const uint64_t gi = 4 * j + static_cast<uint64_t>(k);  // global element index
      if (gi < begin || gi >= end) continue;
      const int64_t i = static_cast<int64_t>(gi - begin);  // position in the shard

      // First write: W for asgd, P for rl/rl2; pairs from the excess when A is given.
      const Params pf = element_params(dev_first, gi);
      const float g32 = load_input(a.g, a.g_kind, i);
      const float net_f = stochastic_round(dvd(mul(a.neg_lr, g32), pf.dw_min), pick(u0, k));
      Pulses nf;
      if (has_pairs) {
        const float a32 = load_input(a.A, a.a_kind, i);
        const float e = mul(mul(a.lr, clamp_min0(sub(a32, fabsf(g32)))), 0.5f);
        nf = directional(net_f, stochastic_round(dvd(e, pf.dw_min), pick(u1, k)), a.max_pulses);
      } else {
        nf = directional(net_f, a.max_pulses);
      }
      const S stored_f = Store<S>::store(apply_pulses(dev_first, pf, Store<S>::load(first[i]), nf, pick(z_first, k)));
      first[i] = stored_f;
      const int32_t net_first = static_cast<int32_t>(sub(nf.up, nf.down));
      const int32_t pairs_first = static_cast<int32_t>(fminf(nf.up, nf.down));
      if (a.pulses_first != nullptr) a.pulses_first[i] = net_first;
      if (a.pairs_first != nullptr) a.pairs_first[i] = pairs_first;
      acc_first += pulses_of(net_first, pairs_first);
      if (ALG == kAsgd) continue;

      const float p32 = Store<S>::load(stored_f);
      if (!writes_w) {  // rl without transfer: only the mix
        if (Wbar != nullptr) Wbar[i] = Store<S>::store(add(Store<S>::load(W[i]), mul(a.gamma_mix, p32)));
        continue;
      }
      // Noisy read of P, W's pulses (no pairs: a transfer is one read vector).
      const float p_hat = read_noise ? add(p32, mul(a.read_noise, pick(z_read, k))) : p32;
      const Params pw = element_params(a.dev_w, gi);
      float net_w, h = 0.f;
      if (ALG == kRl) {
        net_w = stochastic_round(dvd(mul(a.tlr, p_hat), pw.dw_min), pick(u2, k));
      } else if (a.ema) {
        h = add(mul(a.one_minus_tlr, Store<S>::load(H[i])), mul(a.tlr, p_hat));
        net_w = stochastic_round(dvd(mul(a.tlr, h), pw.dw_min), pick(u2, k));
      } else {
        h = add(Store<S>::load(H[i]), mul(a.tlr, p_hat));
        net_w = fabsf(h) >= mul(a.threshold, pw.dw_min) ? truncf(dvd(h, pw.dw_min)) : 0.0f;
      }
      const Pulses nw = directional(net_w, a.max_pulses);
      const S stored_w = Store<S>::store(apply_pulses(a.dev_w, pw, Store<S>::load(W[i]), nw, pick(z_w, k)));
      W[i] = stored_w;
      const float applied_w = sub(nw.up, nw.down);
      if (ALG == kRl2) {
        if (!a.ema) h = sub(h, mul(applied_w, pw.dw_min));
        H[i] = Store<S>::store(h);
      }
      if (Wbar != nullptr) Wbar[i] = Store<S>::store(add(Store<S>::load(stored_w), mul(a.gamma_mix, p32)));
      const int32_t net_main = static_cast<int32_t>(applied_w);
      if (a.pulses_main != nullptr) a.pulses_main[i] = net_main;
      acc_main += pulses_of(net_main, 0);
    }
  }
  add_total(a.total_first, acc_first);
  add_total(a.total_main, acc_main);
}

// Every kernel the host side launches: algorithm x storage dtype.
template __global__ void step_kernel<kAsgd, float>(const __grid_constant__ Args);
template __global__ void step_kernel<kAsgd, __nv_bfloat16>(const __grid_constant__ Args);
template __global__ void step_kernel<kAsgd, __half>(const __grid_constant__ Args);
template __global__ void step_kernel<kRl, float>(const __grid_constant__ Args);
template __global__ void step_kernel<kRl, __nv_bfloat16>(const __grid_constant__ Args);
template __global__ void step_kernel<kRl, __half>(const __grid_constant__ Args);
template __global__ void step_kernel<kRl2, float>(const __grid_constant__ Args);
template __global__ void step_kernel<kRl2, __nv_bfloat16>(const __grid_constant__ Args);
template __global__ void step_kernel<kRl2, __half>(const __grid_constant__ Args);

}  // namespace cuda
}  // namespace fastanalog
#ifndef __CUDA_ARCH__
// ----- host side -----------------------------------------------------------------------------
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

namespace fastanalog {
namespace cuda {

// Table samples copied to the device for one call (stream-ordered caching-allocator memory).
struct TableStore {
  c10::DataPtr f32, f64;
};

Device parse_device(c10::ArrayRef<double> d, int64_t var_key, c10::ArrayRef<double> table, TableStore& store,
                    cudaStream_t stream) {
  TORCH_CHECK(d.size() == static_cast<size_t>(kDeviceFields), "device description must have ", static_cast<int>(kDeviceFields),
              " entries, got ", d.size());
  Device dev{};
  dev.family = static_cast<int>(d[kFamily]);
  TORCH_CHECK(dev.family >= kLinear && dev.family <= kTable, "unknown response family id ", dev.family);
  dev.tau_min = static_cast<float>(d[kTauMin]);
  dev.tau_max = static_cast<float>(d[kTauMax]);
  dev.gamma = static_cast<float>(d[kGamma]);
  dev.dw_min = static_cast<float>(d[kDwMin]);
  dev.asym = static_cast<float>(d[kAsym]);
  dev.d2d_std = static_cast<float>(d[kD2dStd]);
  dev.c2c_std = static_cast<float>(d[kC2cStd]);
  dev.has_gamma = d[kHasGamma] != 0.0;
  dev.zero_shift = d[kZeroShift] != 0.0;
  dev.shift = static_cast<float>(d[kShift]);
  dev.var_key = static_cast<unsigned long long>(var_key);
  if (dev.family == kTable) {
    TORCH_CHECK(table.size() >= 4 && table.size() % 2 == 0, "a table device needs up and down samples of equal length >= 2");
    const std::vector<double> s64(table.begin(), table.end());
    std::vector<float> s32(table.size());
    for (size_t i = 0; i < table.size(); ++i) s32[i] = static_cast<float>(table[i]);
    auto* alloc = c10::cuda::CUDACachingAllocator::get();
    store.f64 = alloc->allocate(s64.size() * sizeof(double));
    store.f32 = alloc->allocate(s32.size() * sizeof(float));
    // From pageable host memory the copies complete before returning, so the vectors may go.
    C10_CUDA_CHECK(cudaMemcpyAsync(store.f64.get(), s64.data(), s64.size() * sizeof(double), cudaMemcpyHostToDevice, stream));
    C10_CUDA_CHECK(cudaMemcpyAsync(store.f32.get(), s32.data(), s32.size() * sizeof(float), cudaMemcpyHostToDevice, stream));
    dev.table = static_cast<const float*>(store.f32.get());
    dev.table64 = static_cast<const double*>(store.f64.get());
    dev.table_segments = static_cast<int>(table.size() / 2) - 1;
  }
  return dev;
}

void check_array(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.numel() == ref.numel(), name, " has ", t.numel(), " elements, expected ", ref.numel());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of W");
}

// Where a pulse output goes (as on CPU): nothing for an empty tensor, the total of
// N_up + N_down over the array added to a one-element int64 tensor, the per-element net
// counts N_up - N_down into an int32 tensor of W's size.
void pulses_out(at::Tensor& p, const at::Tensor& ref, const char* name, int32_t*& elements, unsigned long long*& total) {
  elements = nullptr;
  total = nullptr;
  if (p.numel() == 0) return;
  TORCH_CHECK(p.device() == ref.device() && p.is_contiguous(), name, " must be a contiguous tensor on W's device (or empty)");
  if (p.scalar_type() == at::kLong && p.numel() == 1) {
    total = reinterpret_cast<unsigned long long*>(p.data_ptr<int64_t>());
    return;
  }
  TORCH_CHECK(p.scalar_type() == at::kInt, name, " must be int32 (counts per element), a one-element int64 (total) or empty");
  TORCH_CHECK(p.numel() == ref.numel(), name, " has ", p.numel(), " elements, expected ", ref.numel());
  elements = p.data_ptr<int32_t>();
}

// Where the pairs min(N_up, N_down) of the first array go: nowhere for an empty tensor, else
// into an int32 tensor of W's size (zeros when there is no A: no pairs).
int32_t* pairs_out(at::Tensor& p, const at::Tensor& ref, const char* name) {
  if (p.numel() == 0) return nullptr;
  TORCH_CHECK(p.device() == ref.device() && p.is_contiguous(), name, " must be a contiguous tensor on W's device (or empty)");
  TORCH_CHECK(p.scalar_type() == at::kInt, name, " must be int32 (pairs per element) or empty");
  TORCH_CHECK(p.numel() == ref.numel(), name, " has ", p.numel(), " elements, expected ", ref.numel());
  return p.data_ptr<int32_t>();
}

// The dtype id of an input beside W (g, A): 0 float32, 1 bfloat16, 2 float16.
int input_kind(const at::Tensor& v, const at::Tensor& W, const char* name) {
  TORCH_CHECK(v.device() == W.device(), name, " must be on ", W.device(), ", got ", v.device());
  TORCH_CHECK(v.numel() == W.numel(), name, " has ", v.numel(), " elements, expected ", W.numel());
  TORCH_CHECK(v.is_contiguous(), name, " must be contiguous");
  switch (v.scalar_type()) {
    case at::kFloat:
      return 0;
    case at::kBFloat16:
      return 1;
    case at::kHalf:
      return 2;
    default:
      TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", v.scalar_type());
  }
  return 0;
}

template <int ALG, class S>
void launch_typed(const Args& a, cudaStream_t stream) {
  // One thread per Philox call: the calls j = i / 4 that the shard's elements i touch.
  const int64_t calls = (a.offset + a.numel + 3) / 4 - a.offset / 4;
  const int64_t blocks_needed = (calls + kThreads - 1) / kThreads;
  int device = 0, sms = 1;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int blocks = static_cast<int>(std::min<int64_t>(blocks_needed, static_cast<int64_t>(sms) * 16));
  step_kernel<ALG, S><<<blocks, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int ALG>
void launch(const Args& a, at::ScalarType storage, cudaStream_t stream) {
  if (a.numel == 0) return;
  switch (storage) {
    case at::kBFloat16:
      launch_typed<ALG, __nv_bfloat16>(a, stream);
      break;
    case at::kHalf:
      launch_typed<ALG, __half>(a, stream);
      break;
    case at::kFloat:
      launch_typed<ALG, float>(a, stream);
      break;
    default:
      TORCH_CHECK(false, "W must be float32, bfloat16 or float16, got ", storage);
  }
}

float max_pulses_of(int64_t max_pulses) {
  return max_pulses > 0 ? static_cast<float>(max_pulses) : std::numeric_limits<float>::infinity();
}

// The inputs of the first write: g, the optional excess input A, the step's scalars.
void fill_common(Args& a, const at::Tensor& W, const at::Tensor& g, const std::optional<at::Tensor>& A, double lr, int64_t key,
                 int64_t offset, int64_t max_pulses) {
  TORCH_CHECK(offset >= 0, "offset must be >= 0, got ", offset);
  TORCH_CHECK(offset <= std::numeric_limits<int64_t>::max() - W.numel() - 4, "offset ", offset, " is too large");
  a.numel = W.numel();
  a.offset = offset;
  a.key = static_cast<unsigned long long>(key);
  a.g = g.data_ptr();
  a.g_kind = input_kind(g, W, "g");
  if (A.has_value() && A->defined()) {
    a.A = A->data_ptr();
    a.a_kind = input_kind(*A, W, "A");
  }
  a.lr = static_cast<float>(lr);
  a.neg_lr = -a.lr;
  a.max_pulses = max_pulses_of(max_pulses);
}

// The mixed weight's output: null for an empty Wbar, which asks for none (the layer computes
// W + gamma * P where forward needs it).
void* mixed_out(const at::Tensor& Wbar, const at::Tensor& W) {
  if (Wbar.numel() == 0 && W.numel() != 0) return nullptr;
  check_array(Wbar, W, "Wbar");
  return Wbar.data_ptr();
}

// The CUDA kernels of the ops fastanalog::{asgd,rl,rl2}_step (schemas in
// fastanalog/ops/library.py), reached through their private twin fastanalog::_native_step:
// the arguments and layout of the CPU kernel (csrc/analog_update.cpp, op_layout.h); one
// launch per tensor, in order, on the current stream of W[0]'s device.
void native_step_cuda(int64_t algorithm, at::TensorList W, at::TensorList P, at::TensorList H, at::TensorList Wbar,
                      at::TensorList g, at::TensorList A, at::TensorList pulses_first, at::TensorList pairs_first,
                      at::TensorList pulses_main, at::IntArrayRef keys, at::IntArrayRef offsets, at::IntArrayRef tensor_ids,
                      c10::ArrayRef<double> step, c10::ArrayRef<double> devices, c10::ArrayRef<double> tables,
                      at::IntArrayRef seeds) {
  TORCH_CHECK(algorithm == kAsgd || algorithm == kRl || algorithm == kRl2, "unknown algorithm id ", algorithm);
  const bool residual = algorithm != kAsgd;
  const size_t m = W.size();
  auto sized = [m](size_t size, const char* name, bool optional) {
    TORCH_CHECK(size == m || (optional && size == 0), name, " has ", size, " entries for ", m, " tensors");
  };
  sized(g.size(), "g", false);
  sized(A.size(), "A", true);
  sized(pulses_first.size(), "pulses_first", false);
  sized(pairs_first.size(), "pairs_first", true);
  sized(pulses_main.size(), "pulses_main", !residual);
  sized(keys.size(), "keys", false);
  sized(offsets.size(), "offsets", false);
  sized(tensor_ids.size(), "tensor_ids", false);
  sized(P.size(), "P", !residual);
  sized(H.size(), "H", algorithm != kRl2);
  sized(Wbar.size(), "Wbar", true);
  TORCH_CHECK(residual || (P.empty() && H.empty() && Wbar.empty() && pulses_main.empty()), "asgd takes no P, H, Wbar or pulses_main");
  TORCH_CHECK(algorithm != kRl || H.empty(), "rl takes no H");
  TORCH_CHECK(step.size() == static_cast<size_t>(kStepFields), "step must have ", static_cast<int>(kStepFields),
              " scalars (op_layout.h StepField), got ", step.size());
  const size_t k = residual ? 2 : 1;
  TORCH_CHECK(devices.size() == k * kDeviceFields, "devices must hold ", k, " device description(s) of ",
              static_cast<int>(kDeviceFields), " floats (op_layout.h DeviceField), got ", devices.size(), " floats");
  TORCH_CHECK(seeds.size() == k, "seeds must hold ", k, " variation seed(s), got ", seeds.size());
  size_t table_sizes[2] = {0, 0};
  for (size_t a = 0; a < k; ++a) {
    const double n = devices[a * kDeviceFields + kTableSize];
    TORCH_CHECK(n >= 0 && n == static_cast<double>(static_cast<int64_t>(n)), "table size of device ", a,
                " must be a whole number >= 0, got ", n);
    table_sizes[a] = static_cast<size_t>(n);
  }
  TORCH_CHECK(table_sizes[0] + table_sizes[1] == tables.size(), "the device descriptions' table sizes do not add up to the ",
              tables.size(), " table floats");
  if (m == 0) return;
  const c10::cuda::CUDAGuard guard(W[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TableStore tw, tp;
  const Device base_w = parse_device(devices.slice(0, kDeviceFields), 0, tables.slice(0, table_sizes[0]), tw, stream);
  const Device base_p = residual ? parse_device(devices.slice(kDeviceFields, kDeviceFields), 0,
                                                tables.slice(table_sizes[0], table_sizes[1]), tp, stream)
                                 : Device{};
  const bool d2d_w = devices[kD2dStd] > 0.0, d2d_p = residual && devices[kDeviceFields + kD2dStd] > 0.0;
  const bool flag = step[kStepFlag] != 0.0;
  for (size_t i = 0; i < m; ++i) {
    const at::Tensor& w = W[i];
    check_array(w, W[0], "W");
    const uint64_t tid = static_cast<uint64_t>(tensor_ids[i]);
    Args a{};
    const std::optional<at::Tensor> excess = A.empty() ? std::nullopt : std::optional<at::Tensor>(A[i]);
    fill_common(a, w, g[i], excess, step[kStepLr], keys[i], offsets[i], static_cast<int64_t>(step[kStepMaxPulses]));
    a.W = w.data_ptr();
    at::Tensor pf = pulses_first[i];
    pulses_out(pf, w, "pulses_first", a.pulses_first, a.total_first);
    if (!pairs_first.empty()) {
      at::Tensor pr = pairs_first[i];
      a.pairs_first = pairs_out(pr, w, "pairs_first");
    }
    a.dev_w = base_w;
    a.dev_w.var_key = d2d_w ? variation_key(static_cast<uint64_t>(seeds[0]), tid, 0) : 0;
    if (residual) {
      check_array(P[i], w, "P");
      a.P = P[i].data_ptr();
      a.Wbar = Wbar.empty() ? nullptr : mixed_out(Wbar[i], w);
      at::Tensor pm = pulses_main[i];
      pulses_out(pm, w, "pulses_main", a.pulses_main, a.total_main);
      a.tlr = static_cast<float>(step[kStepTransferLr]);
      a.one_minus_tlr = 1.0f - a.tlr;
      a.gamma_mix = static_cast<float>(step[kStepGamma]);
      a.read_noise = static_cast<float>(step[kStepReadNoise]);
      a.dev_p = base_p;
      a.dev_p.var_key = d2d_p ? variation_key(static_cast<uint64_t>(seeds[1]), tid, 1) : 0;
    }
    if (algorithm == kAsgd) {
      launch<kAsgd>(a, w.scalar_type(), stream);
    } else if (algorithm == kRl) {
      a.transfer = flag;
      if (!flag) {
        a.pulses_main = nullptr;
        a.total_main = nullptr;
      }
      launch<kRl>(a, w.scalar_type(), stream);
    } else {
      check_array(H[i], w, "H");
      a.H = H[i].data_ptr();
      a.transfer = true;
      a.ema = flag;
      a.threshold = static_cast<float>(step[kStepThreshold]);
      launch<kRl2>(a, w.scalar_type(), stream);
    }
  }
}

}  // namespace cuda
}  // namespace fastanalog

TORCH_LIBRARY_IMPL(fastanalog, CUDA, m) { m.impl("_native_step", &fastanalog::cuda::native_step_cuda); }
#endif  // __CUDA_ARCH__
