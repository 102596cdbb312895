// Fused CUDA kernels of the analog update (SPEC section 3): asgd, rl, rl2.
//
// The CUDA implementations of the ops that csrc/analog_update.cpp defines
// (torch.ops.fastanalog.{asgd,rl,rl2}_step_cpp_), with the same arguments and the same
// numbers as the reference run on a CUDA device. One thread per element (grid-stride):
// load g, W, P, H; one Philox4x32-10 call for the global element index (plus the second
// stream keyed key ^ STREAM_W_C2C when W has c2c noise); device-to-device parameters
// regenerated from the variation key; the residual write, noisy read, buffer, transfer
// and mix in registers; one store per array.
//
// Bitwise parity with the reference. Each torch op of the reference is its own kernel, so
// nothing there is fused into a multiply-add; here every float multiply, add and divide is
// an explicitly rounded intrinsic (__fmul_rn, __fadd_rn, ...), which the compiler never
// contracts, while log/sqrt/cos/sin/pow/expm1 are the CUDA math-library functions that
// torch's CUDA kernels call. Storage dtype and algorithm are template parameters; the
// response family and the noise options are run-time values that are the same for every
// thread of a launch, so they cost no divergence.
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
  unsigned long long key;
  const void* g;
  void* W;
  void* P;
  void* H;
  void* Wbar;
  int32_t* pulses_first;  // counts per element, or null
  int32_t* pulses_main;
  unsigned long long* total_first;  // sum of |N| over the array (added to), or null
  unsigned long long* total_main;
  float neg_lr, tlr, one_minus_tlr, gamma_mix, read_noise, threshold, max_pulses;
  int g_kind;  // dtype of g: 0 float32, 1 bfloat16, 2 float16
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
__device__ __noinline__ float symmetric_point(const Device& dev, const Params& p) {
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
// ResponseDevice.element_params (kept out of line: only d2d configurations call it).
__device__ __noinline__ Params varied_params(const Device& dev, uint64_t index) {
  Params p;
  const Philox4 r = philox4x32_10(dev.var_key, index);
  float z0, z1, z2, z3, za, unused;
  pair_uniform_to_normal(uint_to_uniform(r.r0), uint_to_uniform(r.r1), z0, z1);
  pair_uniform_to_normal(uint_to_uniform(r.r2), uint_to_uniform(r.r3), z2, z3);
  const Philox4 ra = philox4x32_10(dev.var_key ^ 1ULL, index);
  pair_uniform_to_normal(uint_to_uniform(ra.r0), uint_to_uniform(ra.r1), za, unused);
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
__device__ __forceinline__ float stochastic_count(float n, float u, float max_pulses) {
  const float fl = floorf(n);
  const float c = add(fl, u < sub(n, fl) ? 1.0f : 0.0f);
  return clampf(c, -max_pulses, max_pulses);
}

// Response of a write of `count` pulses at stored value x: only the branch the sign selects.
__device__ float response(const Device& dev, const Params& p, float x, float count) {
  const float w = add(x, p.shift);
  const bool up = count > 0.0f;
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
      return powf(u, p.gamma);
    case kExp:
      return dvd(expm1f(mul(p.gamma, u)), p.denom);
    default:
      return u;
  }
}

// x + (D + c2c*dw*sqrt|N|*z) * q with q = shape * (1 +- a), clamped to the shifted range.
__device__ float apply_write(const Device& dev, const Params& p, float x, float count, float z) {
  const float shape = response(dev, p, x, count);
  const float q = mul(shape, count > 0.0f ? add(1.0f, p.asym) : sub(1.0f, p.asym));
  float step = mul(count, p.dw_min);
  if (dev.c2c_std > 0.f) step = add(step, mul(mul(mul(dev.c2c_std, p.dw_min), sqrtf(fabsf(count))), z));
  const float x_new = add(x, mul(step, q));
  return clampf(x_new, sub(p.tau_min, p.shift), sub(p.tau_max, p.shift));
}

// g in any of the storage dtypes (the same for every thread of a launch).
__device__ __forceinline__ float load_grad(const void* g, int kind, int64_t i) {
  if (kind == 1) return Store<__nv_bfloat16>::load(static_cast<const __nv_bfloat16*>(g)[i]);
  if (kind == 2) return Store<__half>::load(static_cast<const __half*>(g)[i]);
  return static_cast<const float*>(g)[i];
}

// Adds the threads' totals to *total: a warp sum, then one atomic per warp (integer
// addition, so the result does not depend on the order).
__device__ __forceinline__ void add_total(unsigned long long* total, unsigned long long acc) {
  if (total == nullptr) return;
  for (int d = 16; d > 0; d /= 2) acc += __shfl_down_sync(0xffffffffu, acc, d);
  if ((threadIdx.x & 31) == 0 && acc != 0) atomicAdd(total, acc);
}

// ----- the kernel --------------------------------------------------------------------------
template <int ALG, class S>
__global__ void __launch_bounds__(kThreads) step_kernel(const Args a) {

  S* __restrict__ W = static_cast<S*>(a.W);
  S* __restrict__ P = static_cast<S*>(a.P);
  S* __restrict__ H = static_cast<S*>(a.H);
  S* __restrict__ Wbar = static_cast<S*>(a.Wbar);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  unsigned long long acc_first = 0, acc_main = 0;  // this thread's |N| totals
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.numel; i += stride) {
    const uint64_t gi = static_cast<uint64_t>(a.offset + i);
    const Philox4 r = philox4x32_10(a.key, gi);
    const float u0 = uint_to_uniform(r.r0);
    const float u1 = uint_to_uniform(r.r1);
    float n_read = 0.f, n_c2c = 0.f;
    const Device& dev_first = ALG == kAsgd ? a.dev_w : a.dev_p;
    const bool reads = ALG == kRl2 || (ALG == kRl && a.transfer);
    if ((reads && a.read_noise > 0.f) || dev_first.c2c_std > 0.f)
      pair_uniform_to_normal(uint_to_uniform(r.r2), uint_to_uniform(r.r3), n_read, n_c2c);

    // First write: W for asgd, P for rl/rl2.
    const Params pf = element_params(dev_first, gi);
    const float g32 = load_grad(a.g, a.g_kind, i);
    const float count_f = stochastic_count(dvd(mul(a.neg_lr, g32), pf.dw_min), u0, a.max_pulses);
    S* first = ALG == kAsgd ? W : P;
    const S stored_f = Store<S>::store(apply_write(dev_first, pf, Store<S>::load(first[i]), count_f, n_c2c));
    first[i] = stored_f;
    if (a.pulses_first != nullptr) a.pulses_first[i] = static_cast<int32_t>(count_f);
    acc_first += static_cast<unsigned long long>(fabsf(count_f));
    if (ALG == kAsgd) continue;

    const float p32 = Store<S>::load(stored_f);
    if (ALG == kRl && !a.transfer) {
      if (Wbar != nullptr) Wbar[i] = Store<S>::store(add(Store<S>::load(W[i]), mul(a.gamma_mix, p32)));
      continue;
    }
    // Noisy read of P, W's pulses.
    const float p_hat = a.read_noise > 0.f ? add(p32, mul(a.read_noise, n_read)) : p32;
    const Params pw = element_params(a.dev_w, gi);
    float count_w, h = 0.f;
    if (ALG == kRl) {
      count_w = stochastic_count(dvd(mul(a.tlr, p_hat), pw.dw_min), u1, a.max_pulses);
    } else if (a.ema) {
      h = add(mul(a.one_minus_tlr, Store<S>::load(H[i])), mul(a.tlr, p_hat));
      count_w = stochastic_count(dvd(mul(a.tlr, h), pw.dw_min), u1, a.max_pulses);
    } else {
      h = add(Store<S>::load(H[i]), mul(a.tlr, p_hat));
      const float t = truncf(dvd(h, pw.dw_min));
      count_w = clampf(fabsf(h) >= mul(a.threshold, pw.dw_min) ? t : 0.0f, -a.max_pulses, a.max_pulses);
    }
    float z_w = 0.f;
    if (a.dev_w.c2c_std > 0.f) {
      const Philox4 r2 = philox4x32_10(a.key ^ kStreamWC2C, gi);
      float unused;
      pair_uniform_to_normal(uint_to_uniform(r2.r0), uint_to_uniform(r2.r1), z_w, unused);
    }
    const S stored_w = Store<S>::store(apply_write(a.dev_w, pw, Store<S>::load(W[i]), count_w, z_w));
    W[i] = stored_w;
    if (ALG == kRl2) {
      if (!a.ema) h = sub(h, mul(count_w, pw.dw_min));
      H[i] = Store<S>::store(h);
    }
    if (Wbar != nullptr) Wbar[i] = Store<S>::store(add(Store<S>::load(stored_w), mul(a.gamma_mix, p32)));
    if (a.pulses_main != nullptr) a.pulses_main[i] = static_cast<int32_t>(count_w);
    acc_main += static_cast<unsigned long long>(fabsf(count_w));
  }
  add_total(a.total_first, acc_first);
  add_total(a.total_main, acc_main);
}

// Every kernel the host side launches: algorithm x storage dtype.
template __global__ void step_kernel<kAsgd, float>(const Args);
template __global__ void step_kernel<kAsgd, __nv_bfloat16>(const Args);
template __global__ void step_kernel<kAsgd, __half>(const Args);
template __global__ void step_kernel<kRl, float>(const Args);
template __global__ void step_kernel<kRl, __nv_bfloat16>(const Args);
template __global__ void step_kernel<kRl, __half>(const Args);
template __global__ void step_kernel<kRl2, float>(const Args);
template __global__ void step_kernel<kRl2, __nv_bfloat16>(const Args);
template __global__ void step_kernel<kRl2, __half>(const Args);

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

// Where a pulse output goes (as on CPU): nothing for an empty tensor, the total of |N| added
// to a one-element int64 tensor, the per-element counts into an int32 tensor of W's size.
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

int grad_kind(const at::Tensor& g, const at::Tensor& W) {
  TORCH_CHECK(g.device() == W.device(), "g must be on ", W.device(), ", got ", g.device());
  TORCH_CHECK(g.numel() == W.numel(), "g has ", g.numel(), " elements, expected ", W.numel());
  TORCH_CHECK(g.is_contiguous(), "g must be contiguous");
  switch (g.scalar_type()) {
    case at::kFloat:
      return 0;
    case at::kBFloat16:
      return 1;
    case at::kHalf:
      return 2;
    default:
      TORCH_CHECK(false, "g must be float32, bfloat16 or float16, got ", g.scalar_type());
  }
  return 0;
}

template <int ALG, class S>
void launch_typed(const Args& a, cudaStream_t stream) {
  const int64_t blocks_needed = (a.numel + kThreads - 1) / kThreads;
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

void fill_common(Args& a, const at::Tensor& W, const at::Tensor& g, double lr, int64_t key, int64_t offset, int64_t max_pulses) {
  TORCH_CHECK(offset >= 0, "offset must be >= 0, got ", offset);
  a.numel = W.numel();
  a.offset = offset;
  a.key = static_cast<unsigned long long>(key);
  a.g = g.data_ptr();
  a.g_kind = grad_kind(g, W);
  a.neg_lr = -static_cast<float>(lr);
  a.max_pulses = max_pulses_of(max_pulses);
}

void asgd_step_cuda(at::Tensor& W, const at::Tensor& g, at::Tensor& pulses, double lr, int64_t key, int64_t offset,
                    c10::ArrayRef<double> dev_w, int64_t var_key_w, c10::ArrayRef<double> table_w, int64_t max_pulses) {
  const c10::cuda::CUDAGuard guard(W.device());
  check_array(W, W, "W");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TableStore tw;
  Args a{};
  fill_common(a, W, g, lr, key, offset, max_pulses);
  a.W = W.data_ptr();
  pulses_out(pulses, W, "pulses", a.pulses_first, a.total_first);
  a.dev_w = parse_device(dev_w, var_key_w, table_w, tw, stream);
  launch<kAsgd>(a, W.scalar_type(), stream);
}

// The mixed weight's output: null for an empty Wbar, which asks for none (the layer computes
// W + gamma * P where forward needs it).
void* mixed_out(at::Tensor& Wbar, const at::Tensor& W) {
  if (Wbar.numel() == 0 && W.numel() != 0) return nullptr;
  check_array(Wbar, W, "Wbar");
  return Wbar.data_ptr();
}

void rl_step_cuda(at::Tensor& W, at::Tensor& P, at::Tensor& Wbar, const at::Tensor& g, at::Tensor& pulses_p, at::Tensor& pulses_w,
                  double lr, int64_t key, int64_t offset, bool transfer, double gamma, double transfer_lr, double read_noise,
                  int64_t max_pulses, c10::ArrayRef<double> dev_w, int64_t var_key_w, c10::ArrayRef<double> table_w,
                  c10::ArrayRef<double> dev_p, int64_t var_key_p, c10::ArrayRef<double> table_p) {
  const c10::cuda::CUDAGuard guard(W.device());
  check_array(W, W, "W");
  check_array(P, W, "P");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TableStore tw, tp;
  Args a{};
  fill_common(a, W, g, lr, key, offset, max_pulses);
  a.W = W.data_ptr();
  a.P = P.data_ptr();
  a.Wbar = mixed_out(Wbar, W);
  pulses_out(pulses_p, W, "pulses_p", a.pulses_first, a.total_first);
  pulses_out(pulses_w, W, "pulses_w", a.pulses_main, a.total_main);
  if (!transfer) {
    a.pulses_main = nullptr;
    a.total_main = nullptr;
  }
  a.transfer = transfer;
  a.tlr = static_cast<float>(transfer_lr);
  a.one_minus_tlr = 1.0f - a.tlr;
  a.gamma_mix = static_cast<float>(gamma);
  a.read_noise = static_cast<float>(read_noise);
  a.dev_w = parse_device(dev_w, var_key_w, table_w, tw, stream);
  a.dev_p = parse_device(dev_p, var_key_p, table_p, tp, stream);
  launch<kRl>(a, W.scalar_type(), stream);
}

void rl2_step_cuda(at::Tensor& W, at::Tensor& P, at::Tensor& H, at::Tensor& Wbar, const at::Tensor& g, at::Tensor& pulses_p,
                   at::Tensor& pulses_w, double lr, int64_t key, int64_t offset, bool ema, double gamma, double transfer_lr,
                   double read_noise, double threshold, int64_t max_pulses, c10::ArrayRef<double> dev_w, int64_t var_key_w,
                   c10::ArrayRef<double> table_w, c10::ArrayRef<double> dev_p, int64_t var_key_p, c10::ArrayRef<double> table_p) {
  const c10::cuda::CUDAGuard guard(W.device());
  check_array(W, W, "W");
  check_array(P, W, "P");
  check_array(H, W, "H");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TableStore tw, tp;
  Args a{};
  fill_common(a, W, g, lr, key, offset, max_pulses);
  a.W = W.data_ptr();
  a.P = P.data_ptr();
  a.H = H.data_ptr();
  a.Wbar = mixed_out(Wbar, W);
  pulses_out(pulses_p, W, "pulses_p", a.pulses_first, a.total_first);
  pulses_out(pulses_w, W, "pulses_w", a.pulses_main, a.total_main);
  a.transfer = true;
  a.ema = ema;
  a.tlr = static_cast<float>(transfer_lr);
  a.one_minus_tlr = 1.0f - a.tlr;
  a.gamma_mix = static_cast<float>(gamma);
  a.read_noise = static_cast<float>(read_noise);
  a.threshold = static_cast<float>(threshold);
  a.dev_w = parse_device(dev_w, var_key_w, table_w, tw, stream);
  a.dev_p = parse_device(dev_p, var_key_p, table_p, tp, stream);
  launch<kRl2>(a, W.scalar_type(), stream);
}

}  // namespace cuda
}  // namespace fastanalog

TORCH_LIBRARY_IMPL(fastanalog, CUDA, m) {
  m.impl("asgd_step_cpp_", &fastanalog::cuda::asgd_step_cuda);
  m.impl("rl_step_cpp_", &fastanalog::cuda::rl_step_cuda);
  m.impl("rl2_step_cpp_", &fastanalog::cuda::rl2_step_cuda);
}
#endif  // __CUDA_ARCH__
