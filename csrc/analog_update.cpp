// Fused CPU kernels of the analog update (SPEC section 3): asgd, rl, rl2; op registration.
//
// The CPU kernel of the ops fastanalog::{asgd,rl,rl2}_step (one op per algorithm, lists of
// tensors; schemas in fastanalog/ops/library.py, reached through fastanalog::_native_step)
// updates a group of tensors of one config in one parallel region, its threads splitting
// the group's blocks, and every tensor's arrays in one pass over memory: every element's g,
// A (when given), W, P, H is read once and W, P, H, Wbar (when asked for) and the pulse
// counts are written once. The work
// is cut into blocks at the multiples of kBlock of the global element index (offset +
// position; a tensor's first and last blocks may be shorter); a thread takes a contiguous
// run of blocks and runs each block through a few short phases on block-sized scratch
// arrays that stay in the L1/L2 cache:
//
//   draws    the streams of SPEC section 4 that the step needs (stream s keyed
//            step_key ^ STREAM_SALT[s]): one Philox4x32-10 call per four consecutive global
//            elements, computed once (AVX2: four calls per vector in 64-bit lanes, so
//            vpmuludq gives the 32x32->64 products; eight per vector where the build has
//            AVX-512; the words are transposed into element order), Triton's uniforms, and
//            Box-Muller normals (one pair of each call's (r0, r1) and (r2, r3)) only for the
//            noise options that are on;
//   params   device-to-device parameters regenerated from the variation key, exactly as
//            ResponseDevice.element_params (only when d2d_std > 0; otherwise the block
//            holds the nominal values, filled once per call);
//   segments the update itself, in two or three branch-free loops per block (pulse counts
//            and response arguments -> responses -> write, read, buffer, transfer, mix),
//            specialised by template parameters (storage dtype, noise options, buffer
//            mode, pairs); the response family is one shape loop per family, picked once
//            per block. Without an excess A only the response the net pulse selects is
//            evaluated; with one, q_up where N_up > 0 and q_down where N_down > 0.
//
// Bitwise parity with the reference (fastanalog/ops/reference.py). All math is float32 in
// the reference's operation order and the build uses -ffp-contract=off, so no multiply-add
// is fused. The transcendental functions are the ones torch's own CPU kernels call, so
// that the reference and these kernels produce the same bits:
//   log, sqrt, cos, sin (float32 and float64), exp (float64): MKL VML in high-accuracy mode
//     (vmsLn, vmsSqrt, ...; torch's at::vml does the same when built with MKL); without MKL
//     the Sleef/std functions at::vml falls back to;
//   pow, expm1: Sleef_powf8_u10 / Sleef_expm1f8_u10 (torch's AVX2 and AVX-512 kernels), or
//     std::pow / std::expm1 when torch runs its DEFAULT kernels.
// The one known difference: torch evaluates the last (numel mod 16) elements of each
// thread's chunk of a float `pow` with std::pow instead of Sleef, which differs in the last
// bit for about 2% of arguments; these kernels use Sleef for every element, so such
// elements may differ by one ulp in the response of the power family.
//
// Instruction sets. The kernel templates below the FA_ISA_BODY guard are compiled twice, by
// including this file into itself: once under `#pragma GCC target("avx2,fma,f16c")` (AVX2
// Philox intrinsics, Sleef vector calls; chosen at run time when the CPU has AVX2 and torch
// runs its AVX2 or AVX-512 kernels) and once for the build's baseline instruction set
// (portable Philox, std::pow/std::expm1; chosen when torch runs its DEFAULT kernels). No
// -march flag is needed for the fast path, so a wheel built for x86-64 stays portable.
#ifndef FA_ISA_BODY

#include <ATen/Config.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <atomic>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define FA_HAVE_AVX2_VARIANT 1
// A loop compiled for AVX-512, AVX2 and the baseline, the CPU choosing at load time.
#define FA_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FA_HAVE_AVX2_VARIANT 0
#define FA_TARGET_CLONES
#endif
// Functions inlined into every caller (the kernels' per-vector helpers, the clones' loop).
#define FA_INLINE inline __attribute__((always_inline))

#include "op_layout.h"
#include "philox.h"

#if AT_MKL_ENABLED() && !defined(__APPLE__)
#define FA_HAVE_MKL 1
// MKL VML, linked into libtorch_cpu. n is MKL_INT (32 or 64 bit: passed as 64 bit, of
// which an LP64 build reads the low half), mode is MKL_INT64.
extern "C" {
void vmsLn(long long n, const float* a, float* r, long long mode);
void vmsSqrt(long long n, const float* a, float* r, long long mode);
void vmsCos(long long n, const float* a, float* r, long long mode);
void vmsSin(long long n, const float* a, float* r, long long mode);
void vmdLn(long long n, const double* a, double* r, long long mode);
void vmdSqrt(long long n, const double* a, double* r, long long mode);
void vmdExp(long long n, const double* a, double* r, long long mode);
// C = alpha op(A) op(B) + beta C with bfloat16 A and B, float32 accumulation and C (MKL's
// cblas_gemm_bf16bf16f32; MKL_INT and the enums passed as 64 bit, as above).
void cblas_gemm_bf16bf16f32(long long layout, long long transa, long long transb, long long m, long long n, long long k,
                            float alpha, const uint16_t* a, long long lda, const uint16_t* b, long long ldb, float beta,
                            float* c, long long ldc);
}
#else
#define FA_HAVE_MKL 0
#endif

namespace fastanalog {
namespace cpu {

// The mode torch's at::vml passes to MKL: VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE.
constexpr long long kVmlMode = 0x00000002LL | 0x00140000LL | 0x00000100LL;

// Elements per block (a multiple of 4: blocks end at the multiples of kBlock of the global
// index). Vector loops of a block run over whole groups of kLanes elements (the AVX2
// Philox of the device-to-device parameters makes 16 at a time); block arrays have room
// for that.
constexpr int kBlock = 256;
constexpr int kLanes = 16;
// Below this many elements per thread, fewer threads are used (a thread start costs more).
constexpr int64_t kMinPerThread = 16384;
// Table bisection (per-element symmetric point of a zero-shifted table device): the
// halvings of TableResponse's inherited ResponseDevice.symmetric_point.
constexpr int kBisectionSteps = 60;

// Family, Algorithm and DeviceField: op_layout.h.
enum Storage : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// One array's device as the kernels use it; floats are the float32 roundings of the
// Python values (as the reference's f32()).
struct Device {
  int family = kLinear;
  float tau_min = -1.f, tau_max = 1.f, gamma = 1.f, dw_min = 1e-3f, asym = 0.f;
  float d2d_std = 0.f, c2c_std = 0.f;
  bool has_gamma = false, zero_shift = false;
  float shift = 0.f;  // symmetric point of the nominal device when zero-shifted (d2d_std == 0)
  uint64_t var_key = 0;
  int table_segments = 0;          // number of table intervals m (m + 1 samples per direction)
  const float* table = nullptr;    // up[0..m] then down[0..m], float32
  const double* table64 = nullptr; // the same samples in float64 (bisection)
  bool d2d() const { return d2d_std > 0.f; }
  bool c2c() const { return c2c_std > 0.f; }
  // A power response of one exponent 0.5 for the whole array: u^0.5 is sqrt(u), as the
  // reference (PowerResponse._shape) computes it; with d2d every element has its own exponent.
  bool root() const { return family == kPower && !d2d() && gamma == 0.5f; }
};

// Everything one call needs; pointers are to the first element of each flat tensor.
struct StepArgs {
  int64_t numel = 0;
  int64_t offset = 0;  // global index of element 0 (shards)
  uint64_t key = 0;
  const void* g = nullptr;
  const void* A = nullptr;  // per-sample |g| sums of the first write (null: no excess, no pairs)
  int a_storage = 0;        // A's dtype (Storage)
  void* W = nullptr;
  void* P = nullptr;
  void* H = nullptr;
  void* Wbar = nullptr;  // mixed weight W + gamma * P; null: not written (computed where it is used)
  // Pulse counts of the first array written (P; asgd: W) and of W, per element (int32, the
  // net N_up - N_down) or as a total of N_up + N_down added to one int64 (either or both may
  // be null: not reported); the first write's pairs min(N_up, N_down) per element (int32;
  // null: not reported).
  int32_t* pulses_first = nullptr;
  int32_t* pairs_first = nullptr;
  int32_t* pulses_main = nullptr;
  int64_t* total_first = nullptr;
  int64_t* total_main = nullptr;
  float lr = 0.f;             // float32(lr)
  float neg_lr = 0.f;         // -float32(lr)
  float tlr = 0.f;            // float32(transfer_lr)
  float one_minus_tlr = 1.f;  // 1 - float32(transfer_lr), in float32
  float gamma_mix = 0.f;      // float32(gamma) of Wbar = W + gamma * P
  float read_noise = 0.f;
  float threshold = 1.f;
  float max_pulses = std::numeric_limits<float>::infinity();  // +inf: no cap
  bool transfer = true;  // rl: this step transfers P to W
  bool ema = false;      // rl2: buffer mode "ema" (else "accumulate")
  Device dev_w, dev_p;
};

// (scratch: the calling thread's per-worker scratch area, see run_parallel)
using RangeFn = void (*)(const StepArgs&, int64_t, int64_t, void* scratch);

}  // namespace cpu
}  // namespace fastanalog

// ---------------------------------------------------------------------------------------
// The kernel templates, once per instruction set.
#define FA_ISA_BODY 1
#define FA_ISA_AVX512 0
#if FA_HAVE_AVX2_VARIANT
#define FA_ISA_AVX2 1
namespace fastanalog {
namespace cpu {
namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "analog_update.cpp"
#pragma GCC pop_options
}  // namespace avx2
}  // namespace cpu
}  // namespace fastanalog
// The same body with AVX-512 enabled (the Philox paths with eight calls per vector; the
// target pragma does not define __AVX512F__, so the body tests FA_ISA_AVX512 too). Chosen at
// run time on CPUs with AVX-512 F/DQ/BW/VL; the AVX2 body stays for the others.
#undef FA_ISA_AVX512
#define FA_ISA_AVX512 1
namespace fastanalog {
namespace cpu {
namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512dq,avx512bw,avx512vl")
#include "analog_update.cpp"
#pragma GCC pop_options
}  // namespace avx512
}  // namespace cpu
}  // namespace fastanalog
#undef FA_ISA_AVX512
#define FA_ISA_AVX512 0
#undef FA_ISA_AVX2
#endif
#define FA_ISA_AVX2 0
namespace fastanalog {
namespace cpu {
namespace generic {
#include "analog_update.cpp"
}  // namespace generic
}  // namespace cpu
}  // namespace fastanalog
#undef FA_ISA_AVX2
#undef FA_ISA_AVX512
#undef FA_ISA_BODY

// ---------------------------------------------------------------------------------------
// Dispatch, argument checks, registration.
namespace fastanalog {
namespace cpu {
namespace {

// The AVX2 variant reproduces torch's AVX2/AVX-512 kernels, the generic one its DEFAULT
// kernels; follow torch's own choice (ATEN_CPU_CAPABILITY included).
bool use_avx2_variant() {
#if FA_HAVE_AVX2_VARIANT
  static const bool use = [] {
    const std::string cap = at::get_cpu_capability();
    const bool torch_vector = cap == "AVX2" || cap == "AVX512";
    const char* forced = std::getenv("FASTANALOG_CPU_ISA");
    if (forced != nullptr && std::string(forced) == "generic") return false;
    __builtin_cpu_init();
    return torch_vector && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return use;
#else
  return false;
#endif
}

// The AVX-512 build of the vector body, where the CPU has it (FASTANALOG_CPU_ISA=avx2 or
// generic asks for a narrower one, e.g. to test it on an AVX-512 machine).
bool use_avx512_variant() {
#if FA_HAVE_AVX2_VARIANT
  static const bool use = [] {
    const char* forced = std::getenv("FASTANALOG_CPU_ISA");
    if (forced != nullptr && (std::string(forced) == "avx2" || std::string(forced) == "generic")) return false;
    __builtin_cpu_init();
    return use_avx2_variant() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  }();
  return use;
#else
  return false;
#endif
}

RangeFn select_range(int algorithm, int storage, bool g_is_f32) {
#if FA_HAVE_AVX2_VARIANT
  if (use_avx512_variant()) return avx512::range_fn(algorithm, storage, g_is_f32);
  if (use_avx2_variant()) return avx2::range_fn(algorithm, storage, g_is_f32);
#endif
  return generic::range_fn(algorithm, storage, g_is_f32);
}

// Bytes of one worker's scratch area: the larger of the two instruction sets' Scratch.
size_t scratch_bytes() {
  static const size_t bytes = std::max(generic::scratch_size(),
#if FA_HAVE_AVX2_VARIANT
                                       std::max(avx2::scratch_size(), avx512::scratch_size())
#else
                                       size_t{0}
#endif
  );
  return bytes;
}

// The workers' scratch areas, allocated on the calling thread (zeroed, 64-byte aligned) and
// kept for its later calls, so that the OpenMP workers never call malloc: allocating them in
// the workers on every call gave each worker a glibc arena of its own, and kept resnet18's
// peak training memory about 10% above that of digital training.
struct ScratchFree {
  void operator()(void* p) const { ::operator delete[](p, std::align_val_t{64}); }
};

void* worker_scratch(int t) {
  thread_local std::vector<std::unique_ptr<void, ScratchFree>> pool;
  while (static_cast<int>(pool.size()) <= t) {
    void* p = ::operator new[](scratch_bytes(), std::align_val_t{64});
    std::memset(p, 0, scratch_bytes());
    pool.emplace_back(p);
  }
  return pool[t].get();
}

int storage_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kF32;
    case at::kBFloat16:
      return kBF16;
    case at::kHalf:
      return kF16;
    default:
      TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return kF32;
}

void check_array(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.numel() == ref.numel(), name, " has ", t.numel(), " elements, expected ", ref.numel());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of W (", ref.scalar_type(), "), got ",
              t.scalar_type());
}

// Where a pulse output goes: an empty tensor reports nothing, a one-element int64 tensor
// receives the total sum of |N| over the array (added to its value), an int32 tensor of the
// array's size receives the count of every element.
void pulses_out(at::Tensor& p, const at::Tensor& ref, const char* name, int32_t*& elements, int64_t*& total) {
  elements = nullptr;
  total = nullptr;
  if (p.numel() == 0) return;
  TORCH_CHECK(p.device().is_cpu() && p.is_contiguous(), name, " must be a contiguous CPU tensor (or empty)");
  if (p.scalar_type() == at::kLong && p.numel() == 1) {
    total = p.data_ptr<int64_t>();
    return;
  }
  TORCH_CHECK(p.scalar_type() == at::kInt, name, " must be int32 (counts per element), a one-element int64 (total) or empty");
  TORCH_CHECK(p.numel() == ref.numel(), name, " has ", p.numel(), " elements, expected ", ref.numel());
  elements = p.data_ptr<int32_t>();
}

// Storage for one device's table samples, kept alive for the duration of a call.
struct TableStore {
  std::vector<float> f32;
  std::vector<double> f64;
};

Device parse_device(c10::ArrayRef<double> d, int64_t var_key, c10::ArrayRef<double> table, TableStore& store) {
  TORCH_CHECK(d.size() == static_cast<size_t>(kDeviceFields), "device description must have ", static_cast<int>(kDeviceFields),
              " entries, got ", d.size());
  Device dev;
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
  dev.var_key = static_cast<uint64_t>(var_key);
  if (dev.family == kTable) {
    TORCH_CHECK(table.size() >= 4 && table.size() % 2 == 0, "a table device needs up and down samples of equal length >= 2");
    store.f64.assign(table.begin(), table.end());
    store.f32.resize(table.size());
    for (size_t i = 0; i < table.size(); ++i) store.f32[i] = static_cast<float>(table[i]);
    dev.table = store.f32.data();
    dev.table64 = store.f64.data();
    dev.table_segments = static_cast<int>(table.size() / 2) - 1;
  }
  return dev;
}

float max_pulses_of(int64_t max_pulses) {
  return max_pulses > 0 ? static_cast<float>(max_pulses) : std::numeric_limits<float>::infinity();
}

// g in float32 or W's dtype; anything else is widened to float32 first.
at::Tensor grad_for(const at::Tensor& g, const at::Tensor& W) {
  TORCH_CHECK(g.device().is_cpu(), "g must be a CPU tensor, got ", g.device());
  TORCH_CHECK(g.numel() == W.numel(), "g has ", g.numel(), " elements, expected ", W.numel());
  TORCH_CHECK(at::isFloatingType(g.scalar_type()), "g must be a floating tensor, got ", g.scalar_type());
  if (g.scalar_type() != at::kFloat && g.scalar_type() != W.scalar_type()) return g.to(at::kFloat).contiguous();
  return g.contiguous();
}

// A, the per-sample |g| sums of the first write (SPEC section 2a): undefined when not given;
// float32, bfloat16 or float16 as given (any of them, whatever W's dtype), other floating
// dtypes widened to float32.
at::Tensor excess_for(const std::optional<at::Tensor>& A, const at::Tensor& W, const char* name) {
  if (!A.has_value() || !A->defined()) return at::Tensor();
  const at::Tensor& t = *A;
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.numel() == W.numel(), name, " has ", t.numel(), " elements, expected ", W.numel());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  const auto st = t.scalar_type();
  if (st != at::kFloat && st != at::kBFloat16 && st != at::kHalf) return t.to(at::kFloat);
  return t;
}

// The first write's inputs, scalars and pulse outputs (shared by the three algorithms). The
// pairs output is used only with an excess and per-element pulses: otherwise left alone.
void first_common(StepArgs& a, at::Tensor& W, const at::Tensor& gc, const at::Tensor& Ac, at::Tensor& pulses, at::Tensor& pairs,
                  const char* pulses_name, double lr, int64_t key, int64_t offset, int64_t max_pulses) {
  TORCH_CHECK(offset >= 0, "offset must be >= 0, got ", offset);
  a.numel = W.numel();
  a.offset = offset;
  a.key = static_cast<uint64_t>(key);
  a.g = gc.data_ptr();
  a.W = W.data_ptr();
  pulses_out(pulses, W, pulses_name, a.pulses_first, a.total_first);
  a.A = nullptr;
  a.pairs_first = nullptr;
  if (Ac.defined()) {
    a.A = Ac.data_ptr();
    a.a_storage = storage_of(Ac, "A");
    if (a.pulses_first != nullptr && pairs.numel() != 0) {
      TORCH_CHECK(pairs.device().is_cpu() && pairs.is_contiguous() && pairs.scalar_type() == at::kInt,
                  "pairs must be a contiguous int32 CPU tensor (or empty)");
      TORCH_CHECK(pairs.numel() == W.numel(), "pairs has ", pairs.numel(), " elements, expected ", W.numel());
      a.pairs_first = pairs.data_ptr<int32_t>();
    }
  }
  a.lr = static_cast<float>(lr);
  a.neg_lr = -a.lr;
  a.max_pulses = max_pulses_of(max_pulses);
}

void residual_common(StepArgs& a, at::Tensor& W, at::Tensor& P, at::Tensor& Wbar, const at::Tensor& gc, const at::Tensor& Ac,
                     at::Tensor& pulses_p, at::Tensor& pairs_p, at::Tensor& pulses_w, double lr, int64_t key, int64_t offset,
                     double gamma, double transfer_lr, double read_noise, int64_t max_pulses) {
  first_common(a, W, gc, Ac, pulses_p, pairs_p, "pulses_p", lr, key, offset, max_pulses);
  a.P = P.data_ptr();
  // An empty Wbar asks for no mixed weight: the layer computes it where forward needs it.
  if (Wbar.numel() != 0 || W.numel() == 0) {
    check_array(Wbar, W, "Wbar");
    a.Wbar = Wbar.data_ptr();
  }
  pulses_out(pulses_w, W, "pulses_w", a.pulses_main, a.total_main);
  a.tlr = static_cast<float>(transfer_lr);
  a.one_minus_tlr = 1.0f - a.tlr;
  a.gamma_mix = static_cast<float>(gamma);
  a.read_noise = static_cast<float>(read_noise);
}

// ----- many tensors in one call ------------------------------------------------------------
// The chunks the threads take in turn: at least kChunkBlocks blocks (4096 elements), about
// kChunksPerThread per thread.
constexpr int64_t kChunkBlocks = 16;
constexpr int64_t kChunksPerThread = 16;

// One step of one algorithm on a group of tensors that share a configuration (their keys,
// offsets, tensor ids and so variation keys apart). The threads split the group's blocks,
// tensor after tensor, in one parallel region: no per-tensor dispatch, thread start or
// barrier, and small tensors run side by side. Every tensor is cut at its own block
// boundaries, so each element sees the arithmetic it would see as the group's only tensor.
//
// A tensor's blocks end at the multiples of kBlock of the global index (offset + position),
// so every block but a tensor's first starts at a multiple of four: its Philox calls serve
// four of its elements each, none is computed twice or for elements of another block.
void run_parallel_multi(const std::vector<RangeFn>& fns, const std::vector<StepArgs>& args) {
  const size_t m = args.size();
  std::vector<int64_t> start(m + 1, 0);  // first block of each tensor in the group's block sequence
  std::vector<int64_t> lead(m, 0);       // elements of the tensor's blocks before its element 0
  int64_t elements = 0;
  for (size_t i = 0; i < m; ++i) {
    lead[i] = args[i].numel > 0 ? args[i].offset % kBlock : 0;
    start[i + 1] = start[i] + (lead[i] + args[i].numel + kBlock - 1) / kBlock;
    elements += args[i].numel;
  }
  const int64_t nblocks = start[m];
  if (nblocks == 0) return;
  auto work = [&](int64_t b0, int64_t b1, void* scratch) {
    size_t i = static_cast<size_t>(std::upper_bound(start.begin(), start.end(), b0) - start.begin()) - 1;
    for (; i < m && start[i] < b1; ++i) {
      const int64_t lo = std::max(b0, start[i]) - start[i], hi = std::min(b1, start[i + 1]) - start[i];
      const int64_t e0 = std::max<int64_t>(0, lo * kBlock - lead[i]);
      const int64_t e1 = std::min(args[i].numel, hi * kBlock - lead[i]);
      if (e0 < e1) fns[i](args[i], e0, e1, scratch);
    }
  };
  const int64_t useful = std::max<int64_t>(1, elements / kMinPerThread);
  const int nt = static_cast<int>(std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), useful, nblocks}));
  if (nt <= 1) {
    work(0, nblocks, worker_scratch(0));
    return;
  }
  std::vector<void*> scratch(nt);
  for (int t = 0; t < nt; ++t) scratch[t] = worker_scratch(t);
  // The threads take chunks of blocks in turn rather than one equal share each: a block of zero
  // gradient costs a fraction of one that pulses, and a fresh ResNet's zero blocks gather in
  // some tensors, so equal shares left one thread waiting for the other. Every block's
  // arithmetic and random numbers are its own, and the totals are integer sums, so which
  // thread takes a chunk changes no result.
  const int64_t chunk = std::max<int64_t>(kChunkBlocks, nblocks / (static_cast<int64_t>(nt) * kChunksPerThread));
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(nt)
  {
    void* s = scratch[omp_get_thread_num()];
    for (;;) {
      const int64_t b0 = next.fetch_add(chunk, std::memory_order_relaxed);
      if (b0 >= nblocks) break;
      work(b0, std::min(nblocks, b0 + chunk), s);
    }
  }
}

// One array of a call: its tensor, its name, and whether the call writes it.
struct Named {
  const at::Tensor* t;
  std::string name;
  bool written = true;
};

// Every array the call writes in its own memory, apart from every other array (the
// threads of one call write them at once); read-only arrays (A) may share memory among
// themselves.
void check_disjoint(const std::vector<Named>& arrays) {
  struct Span {
    uintptr_t lo, hi;
    const std::string* name;
    bool written;
  };
  std::vector<Span> spans;
  spans.reserve(arrays.size());
  for (const Named& a : arrays) {
    if (a.t->numel() == 0) continue;
    const auto lo = reinterpret_cast<uintptr_t>(a.t->data_ptr());
    spans.push_back(Span{lo, lo + static_cast<uintptr_t>(a.t->numel() * a.t->element_size()), &a.name, a.written});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.lo < b.lo; });
  // Sweep in address order: the furthest end of the spans before, written ones and all.
  const Span* far_all = nullptr;
  const Span* far_written = nullptr;
  for (const Span& sp : spans) {
    const Span* hit = sp.written ? far_all : far_written;
    TORCH_CHECK(hit == nullptr || sp.lo >= hit->hi, *hit->name, " and ", *sp.name,
                " overlap in memory: every array of a multi-tensor step needs its own storage");
    if (far_all == nullptr || sp.hi > far_all->hi) far_all = &sp;
    if (sp.written && (far_written == nullptr || sp.hi > far_written->hi)) far_written = &sp;
  }
}

// The packed arguments of the ops (op_layout.h): the step's scalars, and per array (W, then
// P for rl/rl2) its device description, table samples and variation seed.
struct Packed {
  double lr, gamma, transfer_lr, read_noise, threshold;
  int64_t max_pulses;
  bool flag;
  Device dev_w, dev_p;
  bool d2d_w = false, d2d_p = false;
  uint64_t seed_w = 0, seed_p = 0;
  TableStore tw, tp;
};

void unpack(Packed& out, bool residual, c10::ArrayRef<double> step, c10::ArrayRef<double> devices,
            c10::ArrayRef<double> tables, at::IntArrayRef seeds) {
  TORCH_CHECK(step.size() == static_cast<size_t>(kStepFields), "step must have ", static_cast<int>(kStepFields),
              " scalars (op_layout.h StepField), got ", step.size());
  const size_t k = residual ? 2 : 1;
  TORCH_CHECK(devices.size() == k * kDeviceFields, "devices must hold ", k, " device description(s) of ",
              static_cast<int>(kDeviceFields), " floats (op_layout.h DeviceField), got ", devices.size(), " floats");
  TORCH_CHECK(seeds.size() == k, "seeds must hold ", k, " variation seed(s), got ", seeds.size());
  size_t table_sizes[2] = {0, 0};
  for (size_t a = 0; a < k; ++a) {
    const double n = devices[a * kDeviceFields + kTableSize];
    TORCH_CHECK(n >= 0 && n == std::floor(n), "table size of device ", a, " must be a whole number >= 0, got ", n);
    table_sizes[a] = static_cast<size_t>(n);
  }
  TORCH_CHECK(table_sizes[0] + table_sizes[1] == tables.size(), "the device descriptions' table sizes (", table_sizes[0], ", ",
              table_sizes[1], ") do not add up to the ", tables.size(), " table floats");
  out.lr = step[kStepLr];
  out.gamma = step[kStepGamma];
  out.transfer_lr = step[kStepTransferLr];
  out.read_noise = step[kStepReadNoise];
  out.threshold = step[kStepThreshold];
  out.max_pulses = static_cast<int64_t>(step[kStepMaxPulses]);
  out.flag = step[kStepFlag] != 0.0;
  out.dev_w = parse_device(devices.slice(0, kDeviceFields), 0, tables.slice(0, table_sizes[0]), out.tw);
  out.d2d_w = devices[kD2dStd] > 0.0;
  out.seed_w = static_cast<uint64_t>(seeds[0]);
  if (residual) {
    out.dev_p = parse_device(devices.slice(kDeviceFields, kDeviceFields), 0, tables.slice(table_sizes[0], table_sizes[1]), out.tp);
    out.d2d_p = devices[kDeviceFields + kD2dStd] > 0.0;
    out.seed_p = static_cast<uint64_t>(seeds[1]);
  }
}

// The CPU kernel of the ops fastanalog::{asgd,rl,rl2}_step (schemas: fastanalog/ops/library.py),
// reached through their private twin fastanalog::_native_step. Tensor i is updated as the
// group's only tensor would be.
void native_step_cpu(int64_t algorithm, at::TensorList W, at::TensorList P, at::TensorList H, at::TensorList Wbar,
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
  TORCH_CHECK(!residual || P.size() == m, "rl and rl2 need P for every tensor");
  TORCH_CHECK(algorithm != kRl2 || H.size() == m, "rl2 needs H for every tensor");
  TORCH_CHECK(algorithm != kRl || H.empty(), "rl takes no H");
  Packed pk;
  unpack(pk, residual, step, devices, tables, seeds);
  if (m == 0) return;
  const double lr = pk.lr, gamma = pk.gamma, transfer_lr = pk.transfer_lr, read_noise = pk.read_noise, threshold = pk.threshold;
  const int64_t max_pulses = pk.max_pulses;
  const bool flag = pk.flag;
  const Device& base_w = pk.dev_w;
  const Device& base_p = pk.dev_p;
  const int storage = storage_of(W[0], "W");
  std::vector<at::Tensor> grads(m), excesses(m);
  std::vector<StepArgs> args(m);
  std::vector<RangeFn> fns(m);
  std::vector<Named> arrays;
  arrays.reserve(5 * m);
  for (size_t i = 0; i < m; ++i) {
    at::Tensor w = W[i];
    check_array(w, w, "W");
    TORCH_CHECK(w.scalar_type() == W[0].scalar_type(), "every W of a multi-tensor step must have one dtype");
    grads[i] = grad_for(g[i], w);
    const std::string at_i = "[" + std::to_string(i) + "]";
    if (!A.empty()) excesses[i] = excess_for(std::optional<at::Tensor>(A[i]), w, ("A" + at_i).c_str());
    at::Tensor pf = pulses_first[i], pm = residual ? pulses_main[i] : pf.new_empty(0);
    at::Tensor pr = pairs_first.empty() ? pf.new_empty(0) : pairs_first[i];
    StepArgs& a = args[i];
    arrays.push_back(Named{&W[i], "W" + at_i});
    if (!A.empty()) arrays.push_back(Named{&A[i], "A" + at_i, false});
    if (residual) {
      at::Tensor p = P[i];
      at::Tensor wbar = Wbar.empty() ? w.new_empty(0) : Wbar[i];
      check_array(p, w, "P");
      residual_common(a, w, p, wbar, grads[i], excesses[i], pf, pr, pm, lr, keys[i], offsets[i], gamma, transfer_lr, read_noise,
                      max_pulses);
      arrays.push_back(Named{&P[i], "P" + at_i});
      if (!Wbar.empty()) arrays.push_back(Named{&Wbar[i], "Wbar" + at_i});
      if (algorithm == kRl2) {
        check_array(H[i], w, "H");
        a.H = H[i].data_ptr();
        a.ema = flag;
        a.threshold = static_cast<float>(threshold);
        arrays.push_back(Named{&H[i], "H" + at_i});
      } else {
        a.transfer = flag;
        if (!flag) {
          a.pulses_main = nullptr;
          a.total_main = nullptr;
        }
      }
      a.dev_p = base_p;
      a.dev_p.var_key = pk.d2d_p ? variation_key(pk.seed_p, static_cast<uint64_t>(tensor_ids[i]), 1) : 0;
    } else {
      first_common(a, w, grads[i], excesses[i], pf, pr, "pulses_first", lr, keys[i], offsets[i], max_pulses);
    }
    a.dev_w = base_w;
    a.dev_w.var_key = pk.d2d_w ? variation_key(pk.seed_w, static_cast<uint64_t>(tensor_ids[i]), 0) : 0;
    fns[i] = select_range(static_cast<int>(algorithm), storage, grads[i].scalar_type() == at::kFloat);
  }
  check_disjoint(arrays);
  run_parallel_multi(fns, args);
}

// a = b + s * c over float32 tensors, on the same threads and partition as the kernels:
// the in-process memory-bandwidth yardstick of the benchmarks.
void triad_cpu(at::Tensor& a, const at::Tensor& b, const at::Tensor& c, double s) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && c.scalar_type() == at::kFloat,
              "triad takes float32 tensors");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && c.is_contiguous(), "triad takes contiguous tensors");
  TORCH_CHECK(a.numel() == b.numel() && a.numel() == c.numel(), "triad takes tensors of equal numel");
  float* __restrict__ pa = a.data_ptr<float>();
  const float* __restrict__ pb = b.data_ptr<float>();
  const float* __restrict__ pc = c.data_ptr<float>();
  const float sf = static_cast<float>(s);
  const int64_t n = a.numel();
  const int nt = static_cast<int>(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, n / kMinPerThread)));
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t i = 0; i < n; ++i) pa[i] = pb[i] + sf * pc[i];
}

// out = W + gamma * P, the mixed forward weight of rl/rl2, as the kernels write it: float32
// math, one rounded multiply and one rounded add (no contraction), stored in W's dtype
// (round to nearest even, as tensor.to(dtype)); on the kernels' threads, each thread a
// contiguous share. The share's loop is compiled for AVX-512, AVX2 and the baseline (GCC
// target clones, picked by the CPU at load time): the same IEEE operations in every clone.
template <class T>
static FA_INLINE void mix_share(T* __restrict__ out, const T* __restrict__ w, const T* __restrict__ p, float gamma, int64_t lo,
                                int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) out[i] = static_cast<T>(static_cast<float>(w[i]) + gamma * static_cast<float>(p[i]));
}
FA_TARGET_CLONES static void mix_share32(float* out, const float* w, const float* p, float gamma, int64_t lo, int64_t hi) {
  mix_share(out, w, p, gamma, lo, hi);
}
FA_TARGET_CLONES static void mix_share_bf16(at::BFloat16* out, const at::BFloat16* w, const at::BFloat16* p, float gamma, int64_t lo,
                                            int64_t hi) {
  mix_share(out, w, p, gamma, lo, hi);
}
FA_TARGET_CLONES static void mix_share_f16(at::Half* out, const at::Half* w, const at::Half* p, float gamma, int64_t lo, int64_t hi) {
  mix_share(out, w, p, gamma, lo, hi);
}

void mix_cpu(at::Tensor& out, const at::Tensor& W, const at::Tensor& P, double gamma) {
  check_array(W, W, "W");
  check_array(P, W, "P");
  check_array(out, W, "out");
  storage_of(W, "W");
  const float g = static_cast<float>(gamma);
  const int64_t n = W.numel();
  const int nt = static_cast<int>(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, n / kMinPerThread)));
  const at::ScalarType st = W.scalar_type();
  void* o = out.data_ptr();
  const void* w = W.data_ptr();
  const void* p = P.data_ptr();
#pragma omp parallel num_threads(nt)
  {
    const int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t lo = n * t / T, hi = n * (t + 1) / T;
    switch (st) {
      case at::kFloat:
        mix_share32(static_cast<float*>(o), static_cast<const float*>(w), static_cast<const float*>(p), g, lo, hi);
        break;
      case at::kBFloat16:
        mix_share_bf16(static_cast<at::BFloat16*>(o), static_cast<const at::BFloat16*>(w), static_cast<const at::BFloat16*>(p), g, lo, hi);
        break;
      default:
        mix_share_f16(static_cast<at::Half*>(o), static_cast<const at::Half*>(w), static_cast<const at::Half*>(p), g, lo, hi);
        break;
    }
  }
}

// Whether every element of every tensor is finite: the optimizer's gradient check, one
// pass over all of them on the kernels' threads (memory-bound; no norm arithmetic). Each
// thread takes a contiguous share of the concatenated elements and ORs the "exponent all
// ones" test over its share, which vectorises. Dense tensors (channels_last included) are
// read in memory order; others through a contiguous copy. Integer tensors are finite.
template <class U>
static FA_INLINE bool share_finite(const void* data, int64_t lo, int64_t hi, U mask) {
  const U* __restrict__ x = static_cast<const U*>(data);
  U bad = 0;
  for (int64_t i = lo; i < hi; ++i) bad |= static_cast<U>((x[i] & mask) == mask);
  return bad == 0;
}

// The check of one share per element width, compiled for AVX-512, AVX2 and the baseline
// (GCC target clones, picked by the CPU at load time): the baseline's 16-byte vectors take
// about twice the time of a pass at memory speed.
FA_TARGET_CLONES static bool share_finite32(const void* data, int64_t lo, int64_t hi) {
  return share_finite<uint32_t>(data, lo, hi, 0x7F800000u);
}
FA_TARGET_CLONES static bool share_finite64(const void* data, int64_t lo, int64_t hi) {
  return share_finite<uint64_t>(data, lo, hi, 0x7FF0000000000000ull);
}
FA_TARGET_CLONES static bool share_finite16(const void* data, int64_t lo, int64_t hi, uint16_t mask) {
  return share_finite<uint16_t>(data, lo, hi, mask);
}

bool all_finite_cpu(at::TensorList tensors) {
  struct Part {
    const void* data;
    int64_t begin, numel;  // begin: offset in the concatenation
    int kind;              // 0 float32, 1 float64, 2 bfloat16, 3 float16
  };
  std::vector<at::Tensor> keep;
  std::vector<Part> parts;
  int64_t total = 0;
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "all_finite: every tensor must be on the CPU, got one on ", t.device());
    if (!t.is_floating_point() || t.numel() == 0) continue;
    int kind;
    switch (t.scalar_type()) {
      case at::kFloat: kind = 0; break;
      case at::kDouble: kind = 1; break;
      case at::kBFloat16: kind = 2; break;
      case at::kHalf: kind = 3; break;
      default: TORCH_CHECK(false, "all_finite: unsupported dtype ", t.scalar_type());
    }
    keep.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
    parts.push_back(Part{keep.back().data_ptr(), total, t.numel(), kind});
    total += t.numel();
  }
  if (total == 0) return true;
  const int nt = static_cast<int>(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, total / kMinPerThread)));
  int finite = 1;
#pragma omp parallel num_threads(nt) reduction(&& : finite)
  {
    const int64_t T = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t lo = total * t / T, hi = total * (t + 1) / T;
    for (const Part& p : parts) {
      const int64_t a = std::max(lo, p.begin) - p.begin, b = std::min(hi, p.begin + p.numel) - p.begin;
      if (a >= b) continue;
      bool ok = true;
      switch (p.kind) {
        case 0: ok = share_finite32(p.data, a, b); break;
        case 1: ok = share_finite64(p.data, a, b); break;
        case 2: ok = share_finite16(p.data, a, b, 0x7F80u); break;
        default: ok = share_finite16(p.data, a, b, 0x7C00u); break;
      }
      finite = finite && ok;
    }
  }
  return finite != 0;
}

// bfloat16 bits of |v|, rounded to nearest even as Tensor.to does (a NaN stays a NaN).
static inline uint16_t abs_bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  u &= 0x7FFFFFFFu;
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(u > 0x7F800000u ? 0x7FC0u : r);  // a select, so that loops of it vectorise
}

// Element i of a float32, bfloat16 or float16 tensor's contiguous data, as float.
static inline float elem_f32(const void* p, at::ScalarType st, int64_t i) {
  switch (st) {
    case at::kFloat: return static_cast<const float*>(p)[i];
    case at::kBFloat16: return static_cast<float>(static_cast<const at::BFloat16*>(p)[i]);
    default: return static_cast<float>(static_cast<const at::Half*>(p)[i]);
  }
}

// ----- A of a layer: the weight gradient of |x| and |d| (fastanalog.nn.layers.sample_abs_sums) --
// The geometry of a layer as a 2-d convolution: x is B x C x H x W, d is B x O x OH x OW, the
// weight O x C x KH x KW. A linear layer is the 1 x 1 case (x: rows x I, d: rows x O), a 1-d
// convolution the one of height 1. Every output position of every sample is one position
// k = (b, oh, ow) of the sums, in that order.
struct SumGeometry {
  int64_t B, C, H, W, O, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw;
  int64_t positions() const { return B * OH * OW; }
  int64_t inputs() const { return C * KH * KW; }
  bool pointwise() const { return KH == 1 && KW == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0 && H == OH && W == OW; }
};

// Columns of B per packed panel of the bfloat16 product (oneDNN's packed B holds 16, 32, 48 or 64).
constexpr int64_t kOuterN = 64;
// Rows of A per brgemm call, and rows of A that one fill item writes.
constexpr int64_t kOuterM = 32;
// Positions per chunk when the caller leaves it to us: the unfolded |x| of a chunk holds about
// 2^20 bfloat16 numbers (2 MiB; twice that with A's operand and the tails).
constexpr int64_t kSumChunkElems = int64_t{1} << 20;
constexpr int64_t kSumChunkMax = 4096;

// The factors of positions [k0, k0 + n) in bfloat16: At (O x Kp, row-major) holds |d|^T, Xb the
// receptive fields (|x| in weight order (c, kh, kw), zero outside the image) in panels of kOuterN
// columns, each Kp x kOuterN in VNNI pairs of rows (element (k, j) of panel p at
// p Kp kOuterN + (k / 2) 2 kOuterN + 2 j + k % 2), as oneDNN's bfloat16 micro-kernel takes its
// B. Kp is n rounded up to even; row n (if any) and the columns past I are zero. One work item
// is one sample's run of positions in one panel of Xb, or in kOuterM rows of At; a panel's
// run is written column by column (it stays in the L1 cache), each column reading rows of the
// image in order.
template <class T>
static void fill_bf16(const T* x, const T* d, const SumGeometry& g, int64_t k0, int64_t n, int64_t Kp, uint16_t* At, uint16_t* Xb) {
  const int64_t L = g.OH * g.OW, HW = g.H * g.W, KK = g.KH * g.KW, I = g.inputs(), O = g.O;
  const int64_t panels = (I + kOuterN - 1) / kOuterN, blocks = (O + kOuterM - 1) / kOuterM, per = panels + blocks;
  const bool pointwise = g.pointwise();
  const int64_t b0 = k0 / L, samples = (k0 + n - 1) / L + 1 - b0;
  at::parallel_for(0, samples * per, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = b0 + item / per, part = item % per;
      const int64_t l_lo = std::max<int64_t>(0, k0 - b * L), l_hi = std::min<int64_t>(L, k0 + n - b * L);
      const int64_t r0 = b * L + l_lo - k0, m = l_hi - l_lo;  // the run: positions [r0, r0 + m) of the chunk
      if (part >= panels) {  // rows of At
        const int64_t o1 = std::min(O, (part - panels + 1) * kOuterM);
        for (int64_t o = (part - panels) * kOuterM; o < o1; ++o) {
          const T* src = d + (b * O + o) * L + l_lo;
          uint16_t* dst = At + o * Kp + r0;
          for (int64_t j = 0; j < m; ++j) dst[j] = abs_bf16_bits(static_cast<float>(src[j]));
        }
        continue;
      }
      uint16_t* out = Xb + part * Kp * kOuterN;
      // Position r of the run lands at out[vnni(r0 + r)] + 2 j for column j.
      auto at = [&](int64_t r) { return ((r0 + r) >> 1) * 2 * kOuterN + ((r0 + r) & 1); };
      const int64_t oh_lo = l_lo / g.OW, ow_lo = l_lo % g.OW;
      int64_t i = part * kOuterN, c = i / KK, kh = (i % KK) / g.KW, kw = i % g.KW;
      for (int64_t j = 0; j < kOuterN; ++j, ++i) {
        uint16_t* col = out + 2 * j;
        if (i >= I) {
          for (int64_t r = 0; r < m; ++r) col[at(r)] = 0;
          continue;
        }
        const T* plane = x + (b * g.C + c) * HW;
        if (pointwise) {
          for (int64_t r = 0; r < m; ++r) col[at(r)] = abs_bf16_bits(static_cast<float>(plane[l_lo + r]));
        } else {
          // One output row at a time, from (oh_lo, ow_lo), the first position of the run.
          for (int64_t l = l_lo, oh = oh_lo, ow0 = ow_lo; l < l_hi; ++oh, ow0 = 0) {
            const int64_t ow1 = std::min(g.OW, ow0 + (l_hi - l)), r = l - l_lo;
            const int64_t ih = oh * g.sh - g.ph + kh * g.dh;
            if (ih < 0 || ih >= g.H) {
              for (int64_t ow = ow0; ow < ow1; ++ow) col[at(r + ow - ow0)] = 0;
            } else {
              const T* xr = plane + ih * g.W;
              for (int64_t ow = ow0; ow < ow1; ++ow) {
                const int64_t iw = ow * g.sw - g.pw + kw * g.dw;
                col[at(r + ow - ow0)] = (iw >= 0 && iw < g.W) ? abs_bf16_bits(static_cast<float>(xr[iw])) : 0;
              }
            }
            l += ow1 - ow0;
          }
        }
        if (++kw == g.KW) {
          kw = 0;
          if (++kh == g.KH) kh = 0, ++c;
        }
      }
    }
  });
  if (Kp > n) {  // the zero row that pairs the last one
    for (int64_t o = 0; o < O; ++o) At[o * Kp + n] = 0;
    for (int64_t p = 0; p < panels; ++p)
      for (int64_t j = 0; j < kOuterN; ++j) Xb[p * Kp * kOuterN + (n >> 1) * 2 * kOuterN + 2 * j + 1] = 0;
  }
}

// fill_bf16 for a linear layer (positions are the rows of d and x): Xb two rows at a time,
// each VNNI pair of a column one 32-bit word; At as a transposition in blocks of 16 x 16.
template <class T>
static void fill_bf16_rows(const T* x, const T* d, const SumGeometry& g, int64_t k0, int64_t n, int64_t Kp, uint16_t* At, uint16_t* Xb) {
  const int64_t I = g.C, O = g.O, panels = (I + kOuterN - 1) / kOuterN, pairs = Kp / 2;
  constexpr int64_t kT = 16;
  const int64_t blocks_o = (O + kT - 1) / kT, blocks_k = (n + kT - 1) / kT, xitems = pairs * panels;
  at::parallel_for(0, xitems + blocks_o * blocks_k, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      if (item < xitems) {
        const int64_t kp = item / panels, p = item % panels, w = std::min(kOuterN, I - p * kOuterN);
        const int64_t k = k0 + 2 * kp;
        uint32_t* dst = reinterpret_cast<uint32_t*>(Xb + (p * Kp + 2 * kp) * kOuterN);
        const T* x0 = x + k * I + p * kOuterN;
        if (2 * kp + 1 < n) {
          const T* x1 = x0 + I;
          for (int64_t j = 0; j < w; ++j)
            dst[j] = static_cast<uint32_t>(abs_bf16_bits(static_cast<float>(x0[j]))) |
                     (static_cast<uint32_t>(abs_bf16_bits(static_cast<float>(x1[j]))) << 16);
        } else {  // the last row of an odd chunk, paired with zero
          for (int64_t j = 0; j < w; ++j) dst[j] = abs_bf16_bits(static_cast<float>(x0[j]));
        }
        for (int64_t j = w; j < kOuterN; ++j) dst[j] = 0;
        continue;
      }
      const int64_t t = item - xitems, o0 = (t / blocks_k) * kT, r0 = (t % blocks_k) * kT;
      const int64_t o1 = std::min(O, o0 + kT), r1 = std::min(n, r0 + kT);
      uint16_t block[kT][kT];
      for (int64_t r = r0; r < r1; ++r) {
        const T* src = d + (k0 + r) * O;
        for (int64_t o = o0; o < o1; ++o) block[o - o0][r - r0] = abs_bf16_bits(static_cast<float>(src[o]));
      }
      for (int64_t o = o0; o < o1; ++o) std::memcpy(At + o * Kp + r0, block[o - o0], sizeof(uint16_t) * (r1 - r0));
    }
  });
  if (Kp > n)
    for (int64_t o = 0; o < O; ++o) At[o * Kp + n] = 0;
}

// C (O x I, float32) = sum over the positions of |d| |x|^T from the bfloat16 roundings of the
// factors, on oneDNN's micro-kernel: chunk by chunk of positions, each chunk's factors filled
// (fill_bf16) and then one brgemm call per kOuterM x kOuterN tile of C, adding to what the
// chunks before left there. Every tile is one thread's, and the chunks depend on the shapes
// alone, so C does not depend on the threads. Filling the receptive fields in VNNI pairs costs
// a few nanoseconds an element: this pays where every field meets many output channels and
// the positions are few (the caller's choice, fastanalog.nn.layers._unfold_wins).
template <class T>
static void abs_sums_brgemm(const T* d, const T* x, const SumGeometry& g, float* C, int64_t chunk) {
  const int64_t K = g.positions(), I = g.inputs(), O = g.O;
  const int64_t panels = (I + kOuterN - 1) / kOuterN, tiles_m = (O + kOuterM - 1) / kOuterM;
  int64_t kc = chunk > 0 ? chunk : std::clamp<int64_t>(kSumChunkElems / (panels * kOuterN), 16, kSumChunkMax);
  kc = std::min(kc, K);
  const int64_t kp_max = (kc + 1) / 2 * 2;
  std::unique_ptr<uint16_t[]> At(new uint16_t[O * kp_max]), Xb(new uint16_t[panels * kp_max * kOuterN]);
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t n = std::min(K, k0 + kc) - k0, Kp = (n + 1) / 2 * 2;
    if (g.positions() == g.B && g.pointwise())  // a linear layer
      fill_bf16_rows(x, d, g, k0, n, Kp, At.get(), Xb.get());
    else
      fill_bf16(x, d, g, k0, n, Kp, At.get(), Xb.get());
    at::parallel_for(0, tiles_m * panels, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t tm = t / panels, tn = t % panels, m0 = tm * kOuterM, n0 = tn * kOuterN;
        const int64_t mb = std::min(kOuterM, O - m0), nb = std::min(kOuterN, I - n0);
        at::native::cpublas::brgemm(mb, nb, Kp, Kp, kOuterN, I, k0 > 0, reinterpret_cast<const at::BFloat16*>(At.get() + m0 * Kp),
                                    reinterpret_cast<const at::BFloat16*>(Xb.get() + tn * Kp * kOuterN), C + m0 * I + n0, true);
      }
      at::native::cpublas::brgemm_release(true);
    });
  }
}

// The geometry of abs_sums_bf16's arguments, checked.
static SumGeometry sum_geometry(const at::Tensor& d, const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t s = static_cast<int64_t>(kernel.size());
  TORCH_CHECK(s <= 2, "abs_sums_bf16: 1-d or 2-d kernels only, got ", s, "-d");
  TORCH_CHECK(stride.size() == kernel.size() && padding.size() == kernel.size() && dilation.size() == kernel.size(),
              "abs_sums_bf16: kernel, stride, padding and dilation must have one length each");
  const int64_t dims = s == 0 ? 2 : s + 2;
  TORCH_CHECK(d.dim() == dims && x.dim() == dims, "abs_sums_bf16: d and x must be ", dims, "-d, got ", d.dim(), "-d and ", x.dim(), "-d");
  TORCH_CHECK(d.size(0) == x.size(0), "abs_sums_bf16: d and x must have the same rows (samples), got ", d.size(0), " and ", x.size(0));
  SumGeometry g{x.size(0), x.size(1), 1, 1, d.size(1), 1, 1, 1, 1, 1, 1, 0, 0, 1, 1};
  for (int64_t i = 0; i < s; ++i) {
    TORCH_CHECK(kernel[i] >= 1 && stride[i] >= 1 && dilation[i] >= 1 && padding[i] >= 0,
                "abs_sums_bf16: kernel, stride and dilation must be >= 1 and padding >= 0");
    const int64_t in = x.size(2 + i), out = d.size(2 + i);
    const int64_t want = (in + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) / stride[i] + 1;
    TORCH_CHECK(out == want, "abs_sums_bf16: d has ", out, " positions in spatial dimension ", i, ", the convolution gives ", want);
  }
  if (s > 0) {
    const int64_t a = s - 1;  // the last (width) dimension
    g.W = x.size(2 + a), g.OW = d.size(2 + a), g.KW = kernel[a], g.sw = stride[a], g.pw = padding[a], g.dw = dilation[a];
    if (s == 2) g.H = x.size(2), g.OH = d.size(2), g.KH = kernel[0], g.sh = stride[0], g.ph = padding[0], g.dh = dilation[0];
  }
  const int64_t most = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(g.O * g.inputs() <= most, "abs_sums_bf16: too large for one product (", g.O, " x ", g.inputs(), ")");
  return g;
}

// A 2 x 2 x 2 product through torch's cpublas::brgemm on bfloat16 operands in VNNI pairs, as
// abs_sums_brgemm lays them out: whether it runs here and gives the exact answer (false where it
// throws: a torch built without oneDNN's micro-kernel).
static bool brgemm_bf16_probe() {
  try {
    const at::BFloat16 a[4] = {1.f, 2.f, 3.f, 4.f};  // A = [[1, 2], [3, 4]], row-major
    const at::BFloat16 b[4] = {5.f, 7.f, 6.f, 8.f};  // B = [[5, 6], [7, 8]] in VNNI pairs: b[2 n + k] = B[k][n]
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, b, c, true);
    at::native::cpublas::brgemm_release(true);
    return c[0] == 19.f && c[1] == 22.f && c[2] == 43.f && c[3] == 50.f;
  } catch (...) {
    return false;
  }
}

// Whether oneDNN's bfloat16 micro-kernel (torch's cpublas::brgemm) runs here: on AMX, where torch
// packs operands for it (cpublas::could_pack), or on AVX512-BF16 (AMD Zen 4, Intel Cooper Lake),
// which could_pack does not report but whose brgemm takes the same VNNI pairs, four times
// faster than the float32 product on a Zen 4 core. Decided once per process.
bool bf16_amx() {
  static const bool ok = at::native::cpublas::could_pack(at::kBFloat16)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
                         || (__builtin_cpu_supports("avx512bf16") && brgemm_bf16_probe())
#endif
      ;
  return ok;
}

// A = the sum over samples and output positions of |d| |x|^T in float32 from the bfloat16
// roundings of |d| and |x|: the weight gradient of |x| and |d| of a linear layer (kernel empty;
// d: rows x O, x: rows x I; A: O x I) or of a batched 1-d or 2-d convolution with groups 1
// (kernel, stride, padding, dilation of its spatial dimensions; A: O x C x kernel). Every
// product of two bfloat16 numbers is exact in float32, so A differs from the float32 product of
// the rounded factors only in the order of its sums, and a sum over DDP ranks from one rank's A
// as the float32 product does. oneDNN's AMX/AVX512-BF16 micro-kernel (torch's cpublas::brgemm)
// where it runs (bf16_amx); else, for a linear layer, MKL's cblas_gemm_bf16bf16f32. `chunk`:
// positions per chunk of the micro-kernel's path (0: about 2 MiB of unfolded |x| each); A does
// not depend on it beyond the order of the sums.
at::Tensor abs_sums_bf16(const at::Tensor& d, const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t chunk) {
  TORCH_CHECK(d.device().is_cpu() && x.device().is_cpu(), "abs_sums_bf16: d and x must be on the CPU");
  for (const at::Tensor* t : {&d, &x})
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16 || t->scalar_type() == at::kHalf,
                "abs_sums_bf16: d and x must be float32, bfloat16 or float16, got ", t->scalar_type());
  TORCH_CHECK(d.scalar_type() == x.scalar_type() || kernel.empty(), "abs_sums_bf16: d and x must have one dtype, got ", d.scalar_type(),
              " and ", x.scalar_type());
  TORCH_CHECK(chunk >= 0, "abs_sums_bf16: chunk must be >= 0, got ", chunk);
  const SumGeometry g = sum_geometry(d, x, kernel, stride, padding, dilation);
  std::vector<int64_t> shape{g.O, g.C};
  for (int64_t k : kernel) shape.push_back(k);
  at::Tensor out = at::empty(shape, x.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  if (g.positions() == 0) return out.zero_();
  at::Tensor dc = d.contiguous(), xc = x.contiguous();
  float* C = out.data_ptr<float>();
  if (bf16_amx()) {
    if (dc.scalar_type() != xc.scalar_type()) dc = dc.to(at::kFloat), xc = xc.to(at::kFloat);  // a linear layer's mixed factors (exactly)
    switch (xc.scalar_type()) {
      case at::kFloat:
        abs_sums_brgemm(dc.data_ptr<float>(), xc.data_ptr<float>(), g, C, chunk);
        break;
      case at::kBFloat16:
        abs_sums_brgemm(dc.data_ptr<at::BFloat16>(), xc.data_ptr<at::BFloat16>(), g, C, chunk);
        break;
      default:
        abs_sums_brgemm(dc.data_ptr<at::Half>(), xc.data_ptr<at::Half>(), g, C, chunk);
        break;
    }
    return out;
  }
#if FA_HAVE_MKL
  TORCH_CHECK(kernel.empty(), "abs_sums_bf16: a convolution needs oneDNN's bfloat16 micro-kernel, which does not run here");
  const int64_t rows = g.B, O = g.O, I = g.C;
  const void* dp = dc.data_ptr();
  const void* xp = xc.data_ptr();
  const at::ScalarType dt = dc.scalar_type(), xt = xc.scalar_type();
  std::unique_ptr<uint16_t[]> da(new uint16_t[rows * O]), xa(new uint16_t[rows * I]);
  at::parallel_for(0, rows * O, 1 << 14, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) da[i] = abs_bf16_bits(elem_f32(dp, dt, i));
  });
  at::parallel_for(0, rows * I, 1 << 14, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) xa[i] = abs_bf16_bits(elem_f32(xp, xt, i));
  });
  // Row-major: out (O x I) = da^T (O x rows) xa (rows x I).
  cblas_gemm_bf16bf16f32(101 /* CblasRowMajor */, 112 /* CblasTrans */, 111 /* CblasNoTrans */, O, I, rows, 1.0f, da.get(), O,
                         xa.get(), I, 0.0f, C, I);
  return out;
#else
  TORCH_CHECK(false, "abs_sums_bf16: neither oneDNN's bfloat16 micro-kernel nor MKL is available (bf16_gemm_cpp() is false)");
#endif
}

// abs_sums_bf16 of a linear layer (d: rows x O, x: rows x I): |d|^T |x|.
at::Tensor abs_outer_bf16(const at::Tensor& d, const at::Tensor& x) {
  TORCH_CHECK(d.dim() == 2 && x.dim() == 2, "abs_outer_bf16: d and x must be matrices, got ", d.dim(), "-d and ", x.dim(), "-d");
  TORCH_CHECK(d.size(0) == x.size(0), "abs_outer_bf16: d and x must have the same rows, got ", d.size(0), " and ", x.size(0));
  return abs_sums_bf16(d, x, {}, {}, {}, {}, 0);
}

// Whether abs_outer_bf16 can run here.
bool bf16_gemm() { return bf16_amx() || FA_HAVE_MKL != 0; }

// Which code path the CPU kernels take in this process ("avx2" or "generic").
std::string cpu_variant() { return use_avx512_variant() ? "avx512" : use_avx2_variant() ? "avx2" : "generic"; }

}  // namespace
}  // namespace cpu
}  // namespace fastanalog

// The step ops' schemas (fastanalog::{asgd,rl,rl2}_step and their private twin
// fastanalog::_native_step) are defined in Python (fastanalog/ops/library.py), so that they
// exist without this library; it registers kernels only. The helpers below are this
// library's own.
TORCH_LIBRARY_FRAGMENT(fastanalog, m) {
  m.def("triad_cpp_(Tensor(a!) a, Tensor b, Tensor c, float s) -> ()");
  m.def("mix_cpp_(Tensor(a!) out, Tensor W, Tensor P, float gamma) -> ()");
  m.def("all_finite_cpp(Tensor[] tensors) -> bool");
  m.def("cpu_variant_cpp() -> str", &fastanalog::cpu::cpu_variant);
  m.def("abs_outer_bf16_cpp(Tensor d, Tensor x) -> Tensor");
  m.def("abs_sums_bf16_cpp(Tensor d, Tensor x, int[] kernel, int[] stride, int[] padding, int[] dilation, int chunk=0) -> Tensor");
  m.def("bf16_gemm_cpp() -> bool", &fastanalog::cpu::bf16_gemm);
  m.def("bf16_amx_cpp() -> bool", &fastanalog::cpu::bf16_amx);
}

TORCH_LIBRARY_IMPL(fastanalog, CPU, m) {
  m.impl("_native_step", &fastanalog::cpu::native_step_cpu);
  m.impl("triad_cpp_", &fastanalog::cpu::triad_cpu);
  m.impl("mix_cpp_", &fastanalog::cpu::mix_cpu);
  m.impl("all_finite_cpp", &fastanalog::cpu::all_finite_cpu);
  m.impl("abs_outer_bf16_cpp", &fastanalog::cpu::abs_outer_bf16);
  m.impl("abs_sums_bf16_cpp", &fastanalog::cpu::abs_sums_bf16);
}

#else  // FA_ISA_BODY ====================================================================
// Everything below is compiled once per instruction set (see the top of the file); it
// lives in namespace fastanalog::cpu::avx2 or fastanalog::cpu::generic.

// ----- vector math on blocks -------------------------------------------------------------
// y[j] = f(a[j]) for j < n; n is a multiple of kLanes and the arrays are 64-byte aligned.
#if FA_ISA_AVX2
extern "C" {
__m256 Sleef_powf8_u10(__m256, __m256);
#if FA_ISA_AVX512
__m512 Sleef_powf16_u10(__m512, __m512);
#endif
__m256 Sleef_expm1f8_u10(__m256);
__m256d Sleef_powd4_u10(__m256d, __m256d);
#if !FA_HAVE_MKL
__m256 Sleef_logf8_u10(__m256);
__m256 Sleef_cosf8_u35(__m256);
__m256 Sleef_sinf8_u35(__m256);
__m256d Sleef_logd4_u10(__m256d);
__m256d Sleef_expd4_u10(__m256d);
#endif
}
#endif

static void vm_log(const float* a, float* y, int n) {
#if FA_HAVE_MKL
  vmsLn(n, a, y, kVmlMode);
#elif FA_ISA_AVX2
  for (int j = 0; j < n; j += 8) _mm256_store_ps(y + j, Sleef_logf8_u10(_mm256_load_ps(a + j)));
#else
  for (int j = 0; j < n; ++j) y[j] = std::log(a[j]);
#endif
}

static void vm_sqrt(const float* a, float* y, int n) {
#if FA_HAVE_MKL
  vmsSqrt(n, a, y, kVmlMode);
#else
  for (int j = 0; j < n; ++j) y[j] = std::sqrt(a[j]);
#endif
}

static void vm_cos(const float* a, float* y, int n) {
#if FA_HAVE_MKL
  vmsCos(n, a, y, kVmlMode);
#elif FA_ISA_AVX2
  for (int j = 0; j < n; j += 8) _mm256_store_ps(y + j, Sleef_cosf8_u35(_mm256_load_ps(a + j)));
#else
  for (int j = 0; j < n; ++j) y[j] = std::cos(a[j]);
#endif
}

static void vm_sin(const float* a, float* y, int n) {
#if FA_HAVE_MKL
  vmsSin(n, a, y, kVmlMode);
#elif FA_ISA_AVX2
  for (int j = 0; j < n; j += 8) _mm256_store_ps(y + j, Sleef_sinf8_u35(_mm256_load_ps(a + j)));
#else
  for (int j = 0; j < n; ++j) y[j] = std::sin(a[j]);
#endif
}

static void vm_pow(const float* a, const float* b, float* y, int n) {
#if FA_ISA_AVX2
  for (int j = 0; j < n; j += 8) _mm256_store_ps(y + j, Sleef_powf8_u10(_mm256_load_ps(a + j), _mm256_load_ps(b + j)));
#else
  for (int j = 0; j < n; ++j) y[j] = std::pow(a[j], b[j]);
#endif
}

// y = sqrt(a), correctly rounded (IEEE; PowerResponse._shape's value, which torch.sqrt of
// float32, through MKL, is not always).
static void vm_sqrt_exact(const float* a, float* y, int n) {
#if FA_ISA_AVX2
  for (int j = 0; j < n; j += 8) _mm256_store_ps(y + j, _mm256_sqrt_ps(_mm256_load_ps(a + j)));
#else
  for (int j = 0; j < n; ++j) y[j] = std::sqrt(a[j]);
#endif
}

static void vm_expm1(const float* a, float* y, int n) {
#if FA_ISA_AVX2
  for (int j = 0; j < n; j += 8) _mm256_store_ps(y + j, Sleef_expm1f8_u10(_mm256_load_ps(a + j)));
#else
  for (int j = 0; j < n; ++j) y[j] = std::expm1(a[j]);
#endif
}

static void vm_pow64(const double* a, const double* b, double* y, int n) {
#if FA_ISA_AVX2
  for (int j = 0; j < n; j += 4) _mm256_store_pd(y + j, Sleef_powd4_u10(_mm256_load_pd(a + j), _mm256_load_pd(b + j)));
#else
  for (int j = 0; j < n; ++j) y[j] = std::pow(a[j], b[j]);
#endif
}

static void vm_exp64(const double* a, double* y, int n) {
#if FA_HAVE_MKL
  vmdExp(n, a, y, kVmlMode);
#elif FA_ISA_AVX2
  for (int j = 0; j < n; j += 4) _mm256_store_pd(y + j, Sleef_expd4_u10(_mm256_load_pd(a + j)));
#else
  for (int j = 0; j < n; ++j) y[j] = std::exp(a[j]);
#endif
}

static void vm_log64(const double* a, double* y, int n) {
#if FA_HAVE_MKL
  vmdLn(n, a, y, kVmlMode);
#elif FA_ISA_AVX2
  for (int j = 0; j < n; j += 4) _mm256_store_pd(y + j, Sleef_logd4_u10(_mm256_load_pd(a + j)));
#else
  for (int j = 0; j < n; ++j) y[j] = std::log(a[j]);
#endif
}

static void vm_sqrt64(const double* a, double* y, int n) {
#if FA_HAVE_MKL
  vmdSqrt(n, a, y, kVmlMode);
#else
  for (int j = 0; j < n; ++j) y[j] = std::sqrt(a[j]);
#endif
}

// ----- Philox on blocks ------------------------------------------------------------------
#if FA_ISA_AVX2
// Triton's uint_to_uniform_float on eight words (see philox.h).
static FA_INLINE __m256 uniform8(__m256i x) {
  const __m256i s = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(kUniformScale));
}

// Eight 32-bit words from the low halves of two vectors of four 64-bit lanes, the first
// holding elements 0, 2, 4, 6 and the second elements 1, 3, 5, 7.
static FA_INLINE __m256i interleave8(__m256i even, __m256i odd) {
  return _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// The high word of each 64-bit lane moved to its low half, by a dword shuffle (the shuffle
// port) rather than a 64-bit shift (which shares its ports with the multiplies). The low
// word lands in the high half: Philox keeps its words in the low halves, and neither the
// multiplies nor the outputs read the high ones.
static FA_INLINE __m256i hi_to_lo(__m256i p) { return _mm256_shuffle_epi32(p, _MM_SHUFFLE(2, 3, 0, 1)); }
#endif

// Philox round keys of one key, broadcast to all lanes.
struct PhiloxKeys {
#if FA_ISA_AVX2
  __m256i k0[kPhiloxRounds], k1[kPhiloxRounds];
#endif
  uint64_t key;
};

static FA_INLINE void philox_keys(uint64_t key, PhiloxKeys& k) {
  k.key = key;
#if FA_ISA_AVX2
  const uint32_t key0 = static_cast<uint32_t>(key), key1 = static_cast<uint32_t>(key >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    k.k0[r] = _mm256_set1_epi32(static_cast<int>(key0 + static_cast<uint32_t>(r) * kPhiloxKeyA));
    k.k1[r] = _mm256_set1_epi32(static_cast<int>(key1 + static_cast<uint32_t>(r) * kPhiloxKeyB));
  }
#endif
}

// Device-to-device parameters (ResponseDevice.element_params) draw one call per ELEMENT,
// counter = element index (SPEC v1 layout, kept so that they never change):
// uniforms of randint4x(key, first + j) for the 16 elements j = 0..15: u0 always, u1 if
// U1, u2 and u3 if U23 (the other pointers are not touched).
//
// AVX2: each Philox word lives in the low half of a 64-bit lane, four elements per vector,
// so that vpmuludq yields the full 32x32->64-bit products directly: the high word is one
// shuffle away (hi_to_lo) and the low word is already in place (the upper halves carry junk that no
// later multiply or output reads). The four vectors run interleaved so their 10-round
// dependency chains overlap. Without U23 the last round skips the product that only feeds
// words 2 and 3.
template <bool U1, bool U23>
static FA_INLINE void philox_group16(const PhiloxKeys& k, uint64_t first, float* u0, float* u1, float* u2, float* u3) {
#if FA_ISA_AVX2
  constexpr int kVec = 4;  // elements {0,2,4,6}, {1,3,5,7}, {8,10,12,14}, {9,11,13,15}
  const __m256i ma = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i mb = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  __m256i c0[kVec], c1[kVec], c2[kVec], c3[kVec];
  for (int v = 0; v < kVec; ++v) {
    // 64-bit global indices: the low word is the counter's c0, the high word its c1.
    const __m256i lanes = (v % 2) ? _mm256_setr_epi64x(1, 3, 5, 7) : _mm256_setr_epi64x(0, 2, 4, 6);
    const uint64_t base = first + static_cast<uint64_t>(8 * (v / 2));
    const __m256i idx = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(base)), lanes);
    // Round 1 with c2 = c3 = 0: the product with c2 vanishes.
    const __m256i pa = _mm256_mul_epu32(idx, ma);
    c0[v] = _mm256_xor_si256(_mm256_srli_epi64(idx, 32), k.k0[0]);
    c1[v] = _mm256_setzero_si256();
    c2[v] = _mm256_xor_si256(_mm256_srli_epi64(pa, 32), k.k1[0]);
    c3[v] = pa;
  }
#pragma GCC unroll 8
  for (int r = 1; r < kPhiloxRounds - 1; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kVec; ++v) {
      const __m256i pb = _mm256_mul_epu32(c2[v], mb);
      const __m256i pa = _mm256_mul_epu32(c0[v], ma);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi_to_lo(pb), c1[v]), k.k0[r]);
      c1[v] = pb;
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi_to_lo(pa), c3[v]), k.k1[r]);
      c3[v] = pa;
    }
  }
  constexpr int r = kPhiloxRounds - 1;
#pragma GCC unroll 4
  for (int v = 0; v < kVec; ++v) {
    const __m256i pb = _mm256_mul_epu32(c2[v], mb);
    if constexpr (U23) {
      const __m256i pa = _mm256_mul_epu32(c0[v], ma);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi_to_lo(pa), c3[v]), k.k1[r]);
      c3[v] = pa;
    }
    c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi_to_lo(pb), c1[v]), k.k0[r]);
    c1[v] = pb;
  }
  for (int h = 0; h < 2; ++h) {
    _mm256_store_ps(u0 + 8 * h, uniform8(interleave8(c0[2 * h], c0[2 * h + 1])));
    if constexpr (U1) _mm256_store_ps(u1 + 8 * h, uniform8(interleave8(c1[2 * h], c1[2 * h + 1])));
    if constexpr (U23) {
      _mm256_store_ps(u2 + 8 * h, uniform8(interleave8(c2[2 * h], c2[2 * h + 1])));
      _mm256_store_ps(u3 + 8 * h, uniform8(interleave8(c3[2 * h], c3[2 * h + 1])));
    }
  }
#else
  for (int j = 0; j < 16; ++j) {
    const Philox4 r = philox4x32_10(k.key, first + static_cast<uint64_t>(j));
    u0[j] = uint_to_uniform(r.r0);
    if constexpr (U1) u1[j] = uint_to_uniform(r.r1);
    if constexpr (U23) {
      u2[j] = uint_to_uniform(r.r2);
      u3[j] = uint_to_uniform(r.r3);
    }
  }
#endif
}

// philox_group16 over j < n (n a multiple of kLanes = 16).
template <bool U1, bool U23>
static void philox_uniform_block(uint64_t key, uint64_t first, int n, float* u0, float* u1, float* u2, float* u3) {
  PhiloxKeys k;
  philox_keys(key, k);
  for (int j = 0; j < n; j += 16)
    philox_group16<U1, U23>(k, first + static_cast<uint64_t>(j), u0 + j, U1 ? u1 + j : u1, U23 ? u2 + j : u2, U23 ? u3 + j : u3);
}

// ----- the streams of a step: one Philox call per four elements ----------------------------
// In stream s (key step_key ^ STREAM_SALT[s]) global element i takes word i % 4 of the call
// with counter i / 4. The calls below are computed once each and their words written in
// element order, so that element i's uniform lies at out[i - 4 * j0].
#if FA_ISA_AVX2
// Uniforms of the 4V calls j0 .. j0 + 4V - 1, in element order. Each vector holds four
// consecutive calls in its 64-bit lanes (the words in the low halves, as philox_group16);
// the V vectors run interleaved so their 10-round dependency chains overlap. At the end
// the words (r0, r1) and (r2, r3) of each call are paired into 64-bit lanes and the
// 128-bit halves transposed, so that each call's four words are consecutive.
template <int V>
static FA_INLINE void philox_calls(const PhiloxKeys& k, uint64_t j0, float* __restrict__ out) {
  const __m256i ma = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m256i mb = _mm256_set1_epi32(static_cast<int>(kPhiloxRoundB));
  __m256i c0[V], c1[V], c2[V], c3[V];
  for (int v = 0; v < V; ++v) {
    // 64-bit call indices: the low word is the counter's c0, the high word its c1.
    const __m256i idx = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(j0 + static_cast<uint64_t>(4 * v))),
                                         _mm256_setr_epi64x(0, 1, 2, 3));
    // Round 1 with c2 = c3 = 0: the product with c2 vanishes.
    const __m256i pa = _mm256_mul_epu32(idx, ma);
    c0[v] = _mm256_xor_si256(_mm256_srli_epi64(idx, 32), k.k0[0]);
    c1[v] = _mm256_setzero_si256();
    c2[v] = _mm256_xor_si256(_mm256_srli_epi64(pa, 32), k.k1[0]);
    c3[v] = pa;
  }
#pragma GCC unroll 9
  for (int r = 1; r < kPhiloxRounds; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const __m256i pb = _mm256_mul_epu32(c2[v], mb);
      const __m256i pa = _mm256_mul_epu32(c0[v], ma);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi_to_lo(pb), c1[v]), k.k0[r]);
      c1[v] = pb;
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi_to_lo(pa), c3[v]), k.k1[r]);
      c3[v] = pa;
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    const __m256i w01 = interleave8(c0[v], c1[v]);         // (r0, r1) of calls 0..3
    const __m256i w23 = interleave8(c2[v], c3[v]);         // (r2, r3)
    const __m256i lo = _mm256_unpacklo_epi64(w01, w23);    // call 0 | call 2
    const __m256i hi = _mm256_unpackhi_epi64(w01, w23);    // call 1 | call 3
    _mm256_store_ps(out + 16 * v, uniform8(_mm256_permute2x128_si256(lo, hi, 0x20)));
    _mm256_store_ps(out + 16 * v + 8, uniform8(_mm256_permute2x128_si256(lo, hi, 0x31)));
  }
}
#endif

#if FA_ISA_AVX2 && (defined(__AVX512F__) || FA_ISA_AVX512)
// The same with AVX-512 (a build for a CPU that has it, e.g. the JIT build's -march=native):
// eight calls per vector, three-way XORs in one vpternlogq, and the transposition of the
// 128-bit quarters by two two-source permutes.
template <int V>
static FA_INLINE void philox_calls8(const __m512i* k0, const __m512i* k1, uint64_t j0, float* __restrict__ out) {
  const __m512i ma = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m512i mb = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundB));
  __m512i c0[V], c1[V], c2[V], c3[V];
  for (int v = 0; v < V; ++v) {
    const __m512i idx = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(j0 + static_cast<uint64_t>(8 * v))),
                                         _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
    const __m512i pa = _mm512_mul_epu32(idx, ma);
    c0[v] = _mm512_xor_si512(_mm512_srli_epi64(idx, 32), k0[0]);
    c1[v] = _mm512_setzero_si512();
    c2[v] = _mm512_xor_si512(_mm512_srli_epi64(pa, 32), k1[0]);
    c3[v] = pa;
  }
#pragma GCC unroll 9
  for (int r = 1; r < kPhiloxRounds; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const __m512i pb = _mm512_mul_epu32(c2[v], mb);
      const __m512i pa = _mm512_mul_epu32(c0[v], ma);
      c0[v] = _mm512_ternarylogic_epi64(_mm512_shuffle_epi32(pb, _MM_PERM_CDAB), c1[v], k0[r], 0x96);
      c1[v] = pb;
      c2[v] = _mm512_ternarylogic_epi64(_mm512_shuffle_epi32(pa, _MM_PERM_CDAB), c3[v], k1[r], 0x96);
      c3[v] = pa;
    }
  }
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);   // calls 0..3
  const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);  // calls 4..7
  const __m512 scale = _mm512_set1_ps(kUniformScale);
  auto uniform16 = [&](__m512i x) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_xor_si512(x, _mm512_srai_epi32(x, 31))), scale);
  };
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    const __m512i w01 = _mm512_mask_blend_epi32(0xAAAA, c0[v], _mm512_slli_epi64(c1[v], 32));  // (r0, r1) per call
    const __m512i w23 = _mm512_mask_blend_epi32(0xAAAA, c2[v], _mm512_slli_epi64(c3[v], 32));  // (r2, r3)
    const __m512i lo = _mm512_unpacklo_epi64(w01, w23);  // calls 0 | 2 | 4 | 6
    const __m512i hi = _mm512_unpackhi_epi64(w01, w23);  // calls 1 | 3 | 5 | 7
    _mm512_store_ps(out + 32 * v, uniform16(_mm512_permutex2var_epi64(lo, first, hi)));
    _mm512_store_ps(out + 32 * v + 16, uniform16(_mm512_permutex2var_epi64(lo, second, hi)));
  }
}
#endif

// Uniforms of the calls j0 .. j0 + nc - 1 (nc a multiple of 4) in element order (out: 4 nc
// floats, 64-byte aligned).
static void stream_uniform_words(uint64_t key, uint64_t j0, int nc, float* __restrict__ out) {
#if FA_ISA_AVX2
  PhiloxKeys k;
  philox_keys(key, k);
  int c = 0;
#if defined(__AVX512F__) || FA_ISA_AVX512
  if (nc >= 8) {
    __m512i k0[kPhiloxRounds], k1[kPhiloxRounds];
    for (int r = 0; r < kPhiloxRounds; ++r) {
      k0[r] = _mm512_broadcast_i64x4(k.k0[r]);
      k1[r] = _mm512_broadcast_i64x4(k.k1[r]);
    }
    for (; c + 32 <= nc; c += 32) philox_calls8<4>(k0, k1, j0 + static_cast<uint64_t>(c), out + 4 * c);
    for (; c + 8 <= nc; c += 8) philox_calls8<1>(k0, k1, j0 + static_cast<uint64_t>(c), out + 4 * c);
  }
#endif
  for (; c + 16 <= nc; c += 16) philox_calls<4>(k, j0 + static_cast<uint64_t>(c), out + 4 * c);
  for (; c < nc; c += 4) philox_calls<1>(k, j0 + static_cast<uint64_t>(c), out + 4 * c);
#else
  for (int c = 0; c < nc; ++c) {
    const Philox4 r = philox4x32_10(key, j0 + static_cast<uint64_t>(c));
    out[4 * c] = uint_to_uniform(r.r0);
    out[4 * c + 1] = uint_to_uniform(r.r1);
    out[4 * c + 2] = uint_to_uniform(r.r2);
    out[4 * c + 3] = uint_to_uniform(r.r3);
  }
#endif
}

// Buffer of one stream's numbers for one block: the calls of the block's elements, rounded
// to whole vectors of four calls, plus room for reads of padded lanes.
constexpr int kStreamBuf = kBlock + 32;

// The calls serving global elements g .. g + n - 1 (n >= 1): the first, and how many
// rounded up to a multiple of 4.
static FA_INLINE void stream_calls(uint64_t g, int n, uint64_t& j0, int& nc) {
  j0 = g >> 2;
  nc = static_cast<int>(((g + static_cast<uint64_t>(n) + 3) >> 2) - j0);
  nc = (nc + 3) & ~3;
}

// Uniforms of global elements g .. g + n - 1 of the stream keyed `key`; returns element g's
// (buf + g % 4). A block lies in one aligned window of kBlock elements, so the calls fill
// at most kBlock floats of buf.
static const float* stream_uniforms(uint64_t key, uint64_t g, int n, float* buf) {
  uint64_t j0;
  int nc;
  stream_calls(g, n, j0, nc);
  stream_uniform_words(key, j0, nc, buf);
  return buf + (g & 3);
}

// ----- per-thread scratch ----------------------------------------------------------------
// Per-element device parameters of one array for one block (float32, as element_params).
struct alignas(64) ParamBlock {
  alignas(64) float tau_min[kBlock];
  alignas(64) float tau_max[kBlock];
  alignas(64) float gamma[kBlock];
  alignas(64) float dw_min[kBlock];
  alignas(64) float asym[kBlock];
  alignas(64) float denom[kBlock];  // exp family: expm1(gamma)
  alignas(64) float shift[kBlock];  // symmetric point (zero-shifted array), else 0
};

// The state of one array's write inside a block: stored value x, net pulse count, response
// argument (without pairs u_up or u_down as the sign of the count selects; with pairs
// u_up), physical weight w = x + shift, shape of the response (with pairs: of the up
// pulses), the c2c noise's sqrt(var); with pairs also N_up, N_down, u_down and the shape of
// the down pulses (shape_down points to it, or to u_down for a linear response).
struct alignas(64) WriteBlock {
  alignas(64) float x[kBlock];
  alignas(64) float count[kBlock];
  alignas(64) float u[kBlock];
  alignas(64) float w[kBlock];
  alignas(64) float shape[kBlock];
  alignas(64) float sd[kBlock];
  alignas(64) float up[kBlock];
  alignas(64) float down[kBlock];
  alignas(64) float u_down[kBlock];
  alignas(64) float shape_dn[kBlock];
  const float* shape_down;
};

constexpr int kTemps = 12;

// Packing the lanes that pulse. A lane without pulses needs no response (x + 0 * q = x
// for any finite q), so the power and exp shapes, whose vector-math calls cost the most,
// are evaluated only on the lanes with a nonzero count: pack(...) gathers their u, gamma
// and denominator densely (keeping the order), the shape is evaluated on the packed
// arrays, and unpack(...) spreads the results back, with 0 in the other lanes.
struct Packed {
  alignas(64) float u[kBlock + 8];
  alignas(64) float gamma[kBlock + 8];
  alignas(64) float denom[kBlock + 8];
  alignas(64) float shape[kBlock + 8];
  alignas(64) float tmp[kBlock + 8];
  alignas(64) int32_t index[kBlock + 8];
  int masks[kBlock / 8];
};

struct alignas(64) Scratch {
  // The block's numbers of each stream the step draws (SPEC section 4), in the calls'
  // element order: the pointers below point at the block's first element in them.
  alignas(64) float r_round[kStreamBuf];  // stream 0
  alignas(64) float r_pairs[kStreamBuf];  // stream 1
  alignas(64) float r_w[kStreamBuf];      // stream 2
  alignas(64) float r_c2c[kStreamBuf];    // stream 3
  alignas(64) float r_read[kStreamBuf];   // stream 4
  alignas(64) float r_c2c_w[kStreamBuf];  // stream 5
  alignas(64) float zeros[kStreamBuf];    // never written: the uniforms of a block without pulses
  const float* u0;      // uniforms: net rounding of the first array written
  const float* u_pair;  // uniforms: pair rounding of the first array (with an excess)
  const float* u1;      // uniforms: rounding of W's transfer (rl; rl2 "ema")
  const float* n_c2c;   // normals: c2c noise of the first array
  const float* n_read;  // normals: read noise of P
  const float* z_w;     // normals: c2c noise of W
  const float* av;                      // A of the block as float32: A itself, or a32 (with an excess)
  alignas(64) float a32[kBlock];        // A widened to float32 (with an excess, unless float32)
  alignas(64) float p32[kBlock];        // P after its write, as stored, widened
  alignas(64) float h[kBlock];          // rl2 buffer after the read of P
  alignas(64) float t[kTemps][kBlock];  // temporaries
  alignas(64) double d[4][kBlock];      // float64 temporaries (per-element symmetric points)
  ParamBlock pw, pp;                    // device parameters of W and of P
  WriteBlock first, second;             // the array written first (P; asgd: W) and W
  Packed packed;                        // pulsing lanes of a power or exp write
};

// ----- Box-Muller and device-to-device parameters ----------------------------------------
// Triton's pair_uniform_to_normal on blocks: n1 = r cos(th) and n2 = r sin(th) (either may
// be null) with r = sqrt(-2 log(max(a, 1e-7))), th = b * 2pi. t: three temporaries.
static void box_muller_block(const float* __restrict__ a, const float* __restrict__ b, int n, float* __restrict__ n1,
                             float* __restrict__ n2, float (*t)[kBlock]) {
  float* __restrict__ r = t[0];
  float* __restrict__ th = t[1];
  float* __restrict__ lg = t[2];
  for (int j = 0; j < n; ++j) {
    r[j] = a[j] < kMinUniform ? kMinUniform : a[j];
    th[j] = b[j] * kTwoPi;
  }
  vm_log(r, lg, n);
  for (int j = 0; j < n; ++j) lg[j] = -2.0f * lg[j];
  vm_sqrt(lg, r, n);
  if (n1 != nullptr) {
    vm_cos(th, n1, n);
    for (int j = 0; j < n; ++j) n1[j] = r[j] * n1[j];
  }
  if (n2 != nullptr) {
    vm_sin(th, n2, n);
    for (int j = 0; j < n; ++j) n2[j] = r[j] * n2[j];
  }
}

// Normals of global elements g .. g + n - 1 of the stream keyed `key` (philox.stream_normal):
// call j gives elements 4j, 4j+1 the Box-Muller pair (cosine, sine) of its (r0, r1) and
// elements 4j+2, 4j+3 that of (r2, r3); every pair's log, sqrt, cos and sin computed once.
// Returns element g's (buf + g % 4); t: seven temporaries.
static const float* stream_normals(uint64_t key, uint64_t g, int n, float* __restrict__ buf, float (*t)[kBlock]) {
  uint64_t j0;
  int nc;
  stream_calls(g, n, j0, nc);
  float* __restrict__ words = t[0];
  stream_uniform_words(key, j0, nc, words);
  const int np = 2 * nc;  // Box-Muller pairs (a multiple of 8)
  float* __restrict__ a = t[1];
  float* __restrict__ th = t[2];
  float* __restrict__ lg = t[3];
  float* __restrict__ r = t[4];
  float* __restrict__ c = t[5];
  float* __restrict__ sn = t[6];
  for (int k = 0; k < np; ++k) {
    const float u = words[2 * k];
    a[k] = u < kMinUniform ? kMinUniform : u;
    th[k] = words[2 * k + 1] * kTwoPi;
  }
  vm_log(a, lg, np);
  for (int k = 0; k < np; ++k) lg[k] = -2.0f * lg[k];
  vm_sqrt(lg, r, np);
  vm_cos(th, c, np);
  vm_sin(th, sn, np);
  for (int k = 0; k < np; ++k) {
    buf[2 * k] = r[k] * c[k];
    buf[2 * k + 1] = r[k] * sn[k];
  }
  return buf + (g & 3);
}

// factor = max(1 + d2d_std * clamp(z, -3, 3), 0.05), each step a float32 rounding.
static FA_INLINE float d2d_factor(float z, float d2d_std) {
  const float zc = std::min(std::max(z, -3.0f), 3.0f);
  return std::max(1.0f + d2d_std * zc, 0.05f);
}

static FA_INLINE float clampf(float v, float lo, float hi) { return std::min(std::max(v, lo), hi); }

// The nominal parameters in every slot of a block (no device-to-device variation).
static void fill_nominal(const Device& dev, ParamBlock& p) {
  for (int j = 0; j < kBlock; ++j) {
    p.tau_min[j] = dev.tau_min;
    p.tau_max[j] = dev.tau_max;
    p.gamma[j] = dev.gamma;
    p.dw_min[j] = dev.dw_min;
    p.asym[j] = dev.asym;
    p.shift[j] = dev.zero_shift ? dev.shift : 0.0f;
    p.denom[j] = 1.0f;
  }
  if (dev.family == kExp) vm_expm1(p.gamma, p.denom, kBlock);
}

// G = (q_down - q_up) / 2 of a table device in float64, as TableResponse._interp.
static FA_INLINE double table_g64(const double* tab, int m, double w, double tmin, double tmax, double asym) {
  double x = (w - tmin) / (tmax - tmin);
  x = std::min(std::max(x, 0.0), 1.0) * static_cast<double>(m);
  double i = std::floor(x);
  i = std::min(i, static_cast<double>(m - 1));
  i = i >= 0.0 ? i : 0.0;
  const int k = static_cast<int>(i);
  const double frac = x - i;
  const double* up = tab;
  const double* down = tab + (m + 1);
  const double q_up = (up[k] + (up[k + 1] - up[k]) * frac) * (1.0 + asym);
  const double q_down = (down[k] + (down[k + 1] - down[k]) * frac) * (1.0 - asym);
  return (q_down - q_up) / 2.0;
}

// Per-element symmetric point of a zero-shifted array with d2d variation, as the family's
// symmetric_point on per-element float32 parameters.
static void symmetric_point_block(const Device& dev, ParamBlock& p, int n, Scratch& s) {
  switch (dev.family) {
    case kLinear:
      // (1 + a)(tau_max - w) = (1 - a)(w - tau_min), in float32.
      for (int j = 0; j < n; ++j)
        p.shift[j] = ((1.0f + p.asym[j]) * p.tau_max[j] + (1.0f - p.asym[j]) * p.tau_min[j]) / 2.0f;
      break;
    case kPower: {
      // (1+a) u_up^g = (1-a) u_down^g, u_up + u_down = 2, in float64:
      // ratio = ((1-a)/(1+a))^(1/g), u_down = 2 / (1 + ratio).
      double* base = s.d[0];
      double* expo = s.d[1];
      double* ratio = s.d[2];
      for (int j = 0; j < n; ++j) {
        const double a = p.asym[j];
        base[j] = (1.0 - a) / (1.0 + a);
        expo[j] = 1.0 / static_cast<double>(p.gamma[j]);
      }
      vm_pow64(base, expo, ratio, n);
      for (int j = 0; j < n; ++j) {
        const double u_down = 2.0 / (1.0 + ratio[j]);
        const double tmin = p.tau_min[j], tmax = p.tau_max[j];
        p.shift[j] = static_cast<float>(tmin + (tmax - tmin) / 2.0 * u_down);
      }
      break;
    }
    case kExp: {
      // x = e^{g u_down} solves (1-a) x^2 + 2a x - (1+a) e^{2g} = 0 (positive root), in float64.
      double* e2g = s.d[0];
      double* root = s.d[1];
      double* x = s.d[2];
      for (int j = 0; j < n; ++j) x[j] = 2.0 * static_cast<double>(p.gamma[j]);
      vm_exp64(x, e2g, n);
      for (int j = 0; j < n; ++j) {
        const double a = p.asym[j];
        x[j] = a * a + (1.0 - a * a) * e2g[j];
      }
      vm_sqrt64(x, root, n);
      for (int j = 0; j < n; ++j) {
        const double a = p.asym[j];
        x[j] = (-a + root[j]) / (1.0 - a);
      }
      vm_log64(x, root, n);
      for (int j = 0; j < n; ++j) {
        const double u_down = root[j] / static_cast<double>(p.gamma[j]);
        const double tmin = p.tau_min[j], tmax = p.tau_max[j];
        p.shift[j] = static_cast<float>(tmin + (tmax - tmin) / 2.0 * u_down);
      }
      break;
    }
    default:
      // Bisection on G (< 0 at tau_min, > 0 at tau_max) in float64; costs kBisectionSteps
      // table evaluations per element.
      for (int j = 0; j < n; ++j) {
        const double tmin = p.tau_min[j], tmax = p.tau_max[j], a = p.asym[j];
        double lo = tmin, hi = tmax;
        for (int it = 0; it < kBisectionSteps; ++it) {
          const double mid = (lo + hi) / 2.0;
          const bool pos = table_g64(dev.table64, dev.table_segments, mid, tmin, tmax, a) > 0.0;
          lo = pos ? lo : mid;
          hi = pos ? mid : hi;
        }
        p.shift[j] = static_cast<float>((lo + hi) / 2.0);
      }
      break;
  }
}

// Device-to-device parameters of elements first .. first+n-1 (ResponseDevice.element_params):
// normals (z0, z1, z2, z3) = randn4x(var_key, i) for (tau_min, tau_max, gamma, dw_min), the
// first normal of randn4x(var_key ^ 1, i) for the asymmetry.
static void d2d_params_block(const Device& dev, uint64_t first, int n, ParamBlock& p, Scratch& s) {
  float* a0 = s.t[0];
  float* a1 = s.t[1];
  float* a2 = s.t[2];
  float* a3 = s.t[3];
  float* z0 = s.t[4];
  float* z1 = s.t[5];
  float* z2 = s.t[6];
  float* z3 = s.t[7];
  float* za = s.t[8];
  float(*bm)[kBlock] = s.t + 9;
  philox_uniform_block<true, true>(dev.var_key, first, n, a0, a1, a2, a3);
  box_muller_block(a0, a1, n, z0, z1, bm);
  box_muller_block(a2, a3, n, z2, z3, bm);
  philox_uniform_block<true, false>(dev.var_key ^ 1ULL, first, n, a0, a1, a2, a3);
  box_muller_block(a0, a1, n, za, nullptr, bm);
  const float sd = dev.d2d_std;
  // A family without a shape parameter keeps gamma: a factor with std 0 is exactly 1.
  const float sd_gamma = dev.has_gamma ? sd : 0.0f;
  const float tmin = dev.tau_min, tmax = dev.tau_max, gamma = dev.gamma, dw = dev.dw_min, asym = dev.asym;
  float* __restrict__ o_tmin = p.tau_min;
  float* __restrict__ o_tmax = p.tau_max;
  float* __restrict__ o_gamma = p.gamma;
  float* __restrict__ o_dw = p.dw_min;
  float* __restrict__ o_asym = p.asym;
  for (int j = 0; j < n; ++j) {
    o_tmin[j] = tmin * d2d_factor(z0[j], sd);
    o_tmax[j] = tmax * d2d_factor(z1[j], sd);
    o_gamma[j] = gamma * d2d_factor(z2[j], sd_gamma);
    o_dw[j] = dw * d2d_factor(z3[j], sd);
    o_asym[j] = clampf(asym * d2d_factor(za[j], sd), -0.99f, 0.99f);
  }
  if (dev.family == kExp) vm_expm1(p.gamma, p.denom, n);
  if (dev.zero_shift) {
    symmetric_point_block(dev, p, n, s);
  } else {
    for (int j = 0; j < n; ++j) p.shift[j] = 0.0f;
  }
}

// ----- storage dtypes --------------------------------------------------------------------
static FA_INLINE float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
static FA_INLINE uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// load: the stored value widened to float32 (exact); store: float32 rounded to nearest
// even, bit for bit as tensor.to(dtype) (c10's conversions).
struct StoreF32 {
  using T = float;
  static FA_INLINE float load(T v) { return v; }
  static FA_INLINE T store(float v) { return v; }
};

struct StoreBF16 {
  using T = uint16_t;
  static FA_INLINE float load(T v) { return bits_to_float(static_cast<uint32_t>(v) << 16); }
  static FA_INLINE T store(float v) {
    const uint32_t u = float_to_bits(v);
    const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    return static_cast<T>(v != v ? 0x7FC0u : rounded);  // NaN -> canonical quiet NaN
  }
};

struct StoreF16 {
  using T = uint16_t;
  // c10's fp16_ieee_to_fp32_value: exact, branch-free.
  static FA_INLINE float load(T h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t result = sign | (two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized));
    return bits_to_float(result);
  }
  // c10's fp16_ieee_from_fp32_value (round to nearest even, NaN -> 0x7E00).
  static FA_INLINE T store(float f) {
    float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = float_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = bits_to_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = float_to_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return static_cast<T>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
};

// ----- the pieces of one write (SPEC section 2) ------------------------------------------
// Stochastic rounding N = floor(n) + (u < n - floor(n)), then the max_pulses cap.
static FA_INLINE float stochastic_count(float n, float u, float max_pulses) {
  const float fl = std::floor(n);
  const float c = fl + (u < n - fl ? 1.0f : 0.0f);
  return clampf(c, -max_pulses, max_pulses);
}

// One element's device parameters with the derived quantities a write uses, each the same
// float32 operation as in the reference (so precomputing them changes no bit).
struct Elem {
  float tau_min, tau_max, half, dw, up, down, shift, lo, hi;
};

static FA_INLINE Elem make_elem(float tmin, float tmax, float dw, float asym, float shift) {
  Elem e;
  e.tau_min = tmin;
  e.tau_max = tmax;
  e.half = (tmax - tmin) / 2.0f;  // tau_max - c = c - tau_min
  e.dw = dw;
  e.up = 1.0f + asym;    // q_up scale
  e.down = 1.0f - asym;  // q_down scale
  e.shift = shift;
  e.lo = tmin - shift;  // the stored range of a zero-shifted array
  e.hi = tmax - shift;
  return e;
}

static FA_INLINE Elem elem_at(const ParamBlock& p, int j) {
  return make_elem(p.tau_min[j], p.tau_max[j], p.dw_min[j], p.asym[j], p.shift[j]);
}

static Elem nominal_elem(const Device& dev) {
  return make_elem(dev.tau_min, dev.tau_max, dev.dw_min, dev.asym, dev.zero_shift ? dev.shift : 0.0f);
}

// An array's device parameters inside a segment loop: per element from the block's
// ParamBlock, or with NOM (no device-to-device variation) the nominal ones, a local
// computed before the loop, so that the loop sees invariant scalars instead of five loads
// and the derived quantities per element. fill_nominal puts the same values in every slot,
// so both give the same numbers.
// (A reference to the nominal local, since a copy of the whole struct inside the loop stops
// GCC's vectoriser.)
template <bool NOM>
static FA_INLINE std::conditional_t<NOM, const Elem&, Elem> param_at(const ParamBlock& p, const Elem& nominal, int j) {
  if constexpr (NOM) {
    return nominal;
  } else {
    return elem_at(p, j);
  }
}

// Response argument of a write of `count` pulses at stored value x: with w = x + shift,
// u_up = clamp((tau_max - w)/half, 0, 2) for count > 0, else u_down = clamp((w - tau_min)/half,
// 0, 2). Only the selected branch is evaluated: dividing the selected numerator is the same
// rounding as selecting after dividing.
static FA_INLINE void response_arg(float x, float count, const Elem& e, float& u, float& w) {
  w = x + e.shift;
  const float num = count > 0.0f ? e.tau_max - w : w - e.tau_min;
  u = clampf(num / e.half, 0.0f, 2.0f);
}

// Stored value after a write of `count` net pulses and no pairs (reference apply_pulses with
// one of N_up, N_down zero): x + (N dw) q + ((c2c dw) sd) z, clamped to the device range
// (shifted by the zero shift), with q = shape (1 + a) for N > 0, shape (1 - a) otherwise and
// sd = sqrt((|N| q) q) (c2c_sd). (N dw) q is the reference's up - 0 or 0 - down bit for bit:
// a product of a negated factor is the negated product.
template <bool C2C>
static FA_INLINE float apply_write(float x, float count, float shape, float sd, float z, float c2c, const Elem& e) {
  const float q = shape * (count > 0.0f ? e.up : e.down);
  float delta = (count * e.dw) * q;
  if constexpr (C2C) delta = delta + ((c2c * e.dw) * sd) * z;
  return clampf(x + delta, e.lo, e.hi);
}

// Stored value after N_up up and N_down down pulses (reference apply_pulses):
// x + (N_up dw) q_up - (N_down dw) q_down (a term 0 where its count is 0) + ((c2c dw) sd) z,
// clamped, with sd = sqrt((N_up q_up) q_up + (N_down q_down) q_down) (c2c_sd).
template <bool C2C>
static FA_INLINE float apply_pairs(float x, float up, float down, float shape_up, float shape_down, float sd, float z, float c2c,
                                   const Elem& e) {
  const float vu = up > 0.0f ? (up * e.dw) * (shape_up * e.up) : 0.0f;
  const float vd = down > 0.0f ? (down * e.dw) * (shape_down * e.down) : 0.0f;
  float delta = vu - vd;
  if constexpr (C2C) delta = delta + ((c2c * e.dw) * sd) * z;
  return clampf(x + delta, e.lo, e.hi);
}

// The pulse counts of a write with an excess (reference directional_counts): net
// N = floor(n) + (u0 < n - floor(n)) with n = (-lr g) / dw, pairs M likewise from
// m = ((lr max(A - |g|, 0)) 0.5) / dw and u1; N_up = min(M + max(N, 0), cap),
// N_down = min(M + max(-N, 0), cap).
static FA_INLINE void pair_counts(float gv, float av, float u0, float u1, float lr, float neg_lr, float dw, float cap, float& up,
                                  float& down) {
  const float n = (neg_lr * gv) / dw;
  const float fl = std::floor(n);
  const float net = fl + (u0 < n - fl ? 1.0f : 0.0f);
  const float m = ((lr * std::max(0.0f, av - std::fabs(gv))) * 0.5f) / dw;  // a NaN A: no pairs (fmax)
  const float flm = std::floor(m);
  const float pairs = flm + (u1 < m - flm ? 1.0f : 0.0f);
  up = std::min(pairs + std::max(net, 0.0f), cap);
  down = std::min(pairs + std::max(-net, 0.0f), cap);
}


#if FA_ISA_AVX2
// For each 8-bit lane mask: the lanes with their bit set, in order (compress), and for each
// lane its rank among them (expand).
struct PackTables {
  alignas(32) int32_t compress[256][8];
  alignas(32) int32_t expand[256][8];
  PackTables() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int l = 0; l < 8; ++l) {
        compress[m][l] = 0;
        expand[m][l] = 0;
      }
      for (int l = 0; l < 8; ++l)
        if (m & (1 << l)) {
          compress[m][k] = l;
          expand[m][l] = k;
          ++k;
        }
    }
  }
};
static const PackTables kPackTables;
#endif

// Gathers the lanes j < n (n a multiple of 8) with count != 0; returns how many. AVX2: the
// lanes are those of pk.masks, which transcendental_shape has filled from count.
static int pack(const float* __restrict__ count, const float* __restrict__ u, const float* __restrict__ gamma,
                const float* __restrict__ denom, int n, Packed& pk) {
  int k = 0;
#if FA_ISA_AVX2
  (void)count;
  for (int j = 0; j < n; j += 8) {
    const int m = pk.masks[j / 8];
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPackTables.compress[m]));
    _mm256_storeu_ps(pk.u + k, _mm256_permutevar8x32_ps(_mm256_load_ps(u + j), perm));
    _mm256_storeu_ps(pk.gamma + k, _mm256_permutevar8x32_ps(_mm256_load_ps(gamma + j), perm));
    _mm256_storeu_ps(pk.denom + k, _mm256_permutevar8x32_ps(_mm256_load_ps(denom + j), perm));
    k += __builtin_popcount(static_cast<unsigned>(m));
  }
#else
  for (int j = 0; j < n; ++j) {
    pk.index[k] = j;
    pk.u[k] = u[j];
    pk.gamma[k] = gamma[j];
    pk.denom[k] = denom[j];
    k += count[j] != 0.0f ? 1 : 0;
  }
#endif
  return k;
}

// shape[j] for j < n from the packed results, 0 where count == 0.
static void unpack(const Packed& pk, int n, float* __restrict__ shape) {
#if FA_ISA_AVX2
  int k = 0;
  for (int j = 0; j < n; j += 8) {
    const int m = pk.masks[j / 8];
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPackTables.expand[m]));
    const __m256i bits = _mm256_and_si256(_mm256_set1_epi32(m), _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128));
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bits, _mm256_setzero_si256()));
    const __m256 v = _mm256_permutevar8x32_ps(_mm256_loadu_ps(pk.shape + k), perm);
    _mm256_store_ps(shape + j, _mm256_andnot_ps(keep, v));
    k += __builtin_popcount(static_cast<unsigned>(m));
  }
#else
  const int k = 0;
  (void)k;
  for (int j = 0; j < n; ++j) shape[j] = 0.0f;
#endif
}

// shape[j] = f(u[j], gamma[j], denom[j]) for the power or exp family on lanes j < n:
// densely when at least 7/8 of the lanes pulse, else on the packed pulsing lanes.
// root: the power is the square root (Device::root).
template <int F>
static void transcendental_shape(const float* __restrict__ u, const float* __restrict__ gamma, const float* __restrict__ denom,
                                 const float* __restrict__ count, float* __restrict__ shape, int n, Scratch& s, bool root = false) {
  auto eval = [root](const float* uu, const float* gg, const float* dd, float* out, float* tmp, int m) {
    if constexpr (F == kPower) {
      if (root)
        vm_sqrt_exact(uu, out, m);
      else
        vm_pow(uu, gg, out, m);
    } else {
      for (int j = 0; j < m; ++j) tmp[j] = gg[j] * uu[j];
      vm_expm1(tmp, out, m);
      for (int j = 0; j < m; ++j) out[j] = out[j] / dd[j];
    }
  };
  Packed& pk = s.packed;
#if FA_ISA_AVX2
  // Where the pulsing lanes are: per vector of 8, and in all.
  const __m256 zero = _mm256_setzero_ps();
  int k = 0, busy = 0;
  for (int j = 0; j < n; j += 8) {
    const int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_load_ps(count + j), zero, _CMP_NEQ_OQ));
    pk.masks[j / 8] = m;
    k += __builtin_popcount(static_cast<unsigned>(m));
    busy += m != 0;
  }
  if (8 * k >= 7 * n) {
    eval(u, gamma, denom, shape, pk.tmp, n);
    return;
  }
  // Few vectors with a pulsing lane (the common case of training, where most elements get
  // no pulse): evaluate those vectors in place, 0 elsewhere. Packing the pulsing lanes
  // costs about kPackCost vector evaluations per block, so it only pays when the pulsing
  // lanes are spread thinly over many vectors.
  constexpr int kPackCost = kBlock / 8 / 6;
  if (busy <= (k + 7) / 8 + kPackCost) {
    for (int j = 0; j < n; j += 8) {
      if (pk.masks[j / 8] != 0)
        eval(u + j, gamma + j, denom + j, shape + j, pk.tmp, 8);
      else
        _mm256_store_ps(shape + j, zero);
    }
    return;
  }
#endif
  const int k_packed = pack(count, u, gamma, denom, n, pk);
#if !FA_ISA_AVX2
  if (8 * k_packed >= 7 * n) {
    eval(u, gamma, denom, shape, pk.tmp, n);
    return;
  }
#endif
  const int kp = (k_packed + 7) / 8 * 8;
  for (int i = k_packed; i < kp; ++i) {  // whole vectors of valid arguments
    pk.u[i] = 1.0f;
    pk.gamma[i] = 1.0f;
    pk.denom[i] = 1.0f;
  }
  if (kp > 0) eval(pk.u, pk.gamma, pk.denom, pk.shape, pk.tmp, kp);
  unpack(pk, n, shape);
#if !FA_ISA_AVX2
  for (int i = 0; i < k_packed; ++i) shape[pk.index[i]] = pk.shape[i];
#endif
}

// The response shape of a write for the array's family at argument u (physical weight w):
// linear u, power u^g, exp expm1(g u)/expm1(g), table piecewise-linear in w
// (TableResponse._interp). Needed only where count != 0 (elsewhere any finite value).
// dir 0: the up response where count > 0, the down one elsewhere (a write without pairs);
// dir +1 / -1: the up / down response (count = N_up / N_down of a write with pairs).
// Returns out, or u for a linear response.
static const float* response_shape(const Device& dev, const ParamBlock& p, const float* count, const float* u, const float* w,
                                   float* out, int dir, int n, Scratch& s) {
  switch (dev.family) {
    case kPower:
      transcendental_shape<kPower>(u, p.gamma, p.denom, count, out, n, s, dev.root());
      return out;
    case kExp:
      transcendental_shape<kExp>(u, p.gamma, p.denom, count, out, n, s);
      return out;
    case kTable: {
      const int m = dev.table_segments;
      const float mf = static_cast<float>(m);
      const float last = static_cast<float>(m - 1);
      const float* __restrict__ tab = dev.table;
      const float* __restrict__ ww = w;
      const float* __restrict__ cnt = count;
      const float* __restrict__ tmin = p.tau_min;
      const float* __restrict__ tmax = p.tau_max;
      float* __restrict__ sh = out;
      for (int j = 0; j < n; ++j) {
        const float x = clampf((ww[j] - tmin[j]) / (tmax[j] - tmin[j]), 0.0f, 1.0f) * mf;
        float i = std::min(std::floor(x), last);
        i = i >= 0.0f ? i : 0.0f;  // a NaN weight reads sample 0 instead of out of bounds
        const bool up = dir == 0 ? cnt[j] > 0.0f : dir > 0;
        const int k = static_cast<int>(i) + (up ? 0 : m + 1);
        const float frac = x - i;
        sh[j] = tab[k] + (tab[k + 1] - tab[k]) * frac;
      }
      return out;
    }
    default:
      return u;  // linear: the shape is the argument itself
  }
}

// sd = sqrt(var) of a write's c2c noise for j < n, var as the reference's apply_pulses:
// (N_up q_up) q_up + (N_down q_down) q_down, a term 0 where its count is 0 (without pairs
// just (|N| q) q for the selected q), through the same sqrt as torch.sqrt (MKL's is not
// always correctly rounded). shape_down: the down shape with pairs, else unused.
static void c2c_sd(WriteBlock& b, const ParamBlock& p, const float* __restrict__ shape, const float* __restrict__ shape_down,
                   bool pairs, int n, float* __restrict__ var) {
  const float* __restrict__ asym = p.asym;
  if (!pairs) {
    const float* __restrict__ cnt = b.count;
    for (int j = 0; j < n; ++j) {
      const float c = cnt[j];
      const float q = shape[j] * (c > 0.0f ? 1.0f + asym[j] : 1.0f - asym[j]);
      var[j] = c != 0.0f ? (std::fabs(c) * q) * q : 0.0f;
    }
  } else {
    const float* __restrict__ up = b.up;
    const float* __restrict__ down = b.down;
    for (int j = 0; j < n; ++j) {
      const float qu = shape[j] * (1.0f + asym[j]);
      const float qd = shape_down[j] * (1.0f - asym[j]);
      const float tu = up[j] > 0.0f ? (up[j] * qu) * qu : 0.0f;
      const float td = down[j] > 0.0f ? (down[j] * qd) * qd : 0.0f;
      var[j] = tu + td;
    }
  }
  vm_sqrt(var, b.sd, n);
}

// Reports a block's pulse counts (integers held in floats, |N| < 2**31): per element into
// dst, and/or |N| summed into acc. Integer sums vectorise (their order does not matter).
static void write_pulses(int32_t* dst, bool total, int64_t& acc, int64_t b, int n, const float* __restrict__ count) {
  if (dst != nullptr) {
    int32_t* __restrict__ d = dst + b;
    for (int j = 0; j < n; ++j) d[j] = static_cast<int32_t>(count[j]);
  }
  if (total) {
    int64_t sum = 0;
    for (int j = 0; j < n; ++j) sum += static_cast<int64_t>(std::abs(static_cast<int32_t>(count[j])));
    acc += sum;
  }
}

// A block of no pulse: zero counts (and pairs) where they are reported per element; nothing to
// add to the totals.
static void write_no_pulses(int32_t* dst, int32_t* dst_pairs, int64_t b, int n) {
  if (dst != nullptr) std::memset(dst + b, 0, static_cast<size_t>(n) * sizeof(int32_t));
  if (dst_pairs != nullptr) std::memset(dst_pairs + b, 0, static_cast<size_t>(n) * sizeof(int32_t));
}

// The same for a write with pairs: the net N_up - N_down and the pairs min(N_up, N_down)
// per element, and/or N_up + N_down summed into acc.
static void write_pulses_pairs(int32_t* dst, int32_t* dst_pairs, bool total, int64_t& acc, int64_t b, int n,
                               const float* __restrict__ up, const float* __restrict__ down) {
  if (dst != nullptr) {
    int32_t* __restrict__ d = dst + b;
    for (int j = 0; j < n; ++j) d[j] = static_cast<int32_t>(up[j]) - static_cast<int32_t>(down[j]);
  }
  if (dst_pairs != nullptr) {
    int32_t* __restrict__ d = dst_pairs + b;
    for (int j = 0; j < n; ++j) d[j] = static_cast<int32_t>(std::min(up[j], down[j]));
  }
  if (total) {
    int64_t sum = 0;
    for (int j = 0; j < n; ++j) sum += static_cast<int64_t>(static_cast<int32_t>(up[j])) + static_cast<int32_t>(down[j]);
    acc += sum;
  }
}

// A of elements b .. b+n-1 widened to float32 (exact) into out.
// A of elements b .. b+n-1 as float32: A itself when it is float32, else widened into out.
static const float* excess_f32(const StepArgs& a, int64_t b, int n, float* __restrict__ out);

static void widen_excess(const StepArgs& a, int64_t b, int n, float* __restrict__ out) {
  switch (a.a_storage) {
    case kBF16: {
      const uint16_t* __restrict__ x = static_cast<const uint16_t*>(a.A) + b;
      for (int j = 0; j < n; ++j) out[j] = StoreBF16::load(x[j]);
      break;
    }
    case kF16: {
      const uint16_t* __restrict__ x = static_cast<const uint16_t*>(a.A) + b;
      for (int j = 0; j < n; ++j) out[j] = StoreF16::load(x[j]);
      break;
    }
    default: {
      const float* __restrict__ x = static_cast<const float*>(a.A) + b;
      for (int j = 0; j < n; ++j) out[j] = x[j];
      break;
    }
  }
}

static const float* excess_f32(const StepArgs& a, int64_t b, int n, float* __restrict__ out) {
  if (a.a_storage == kF32) return static_cast<const float*>(a.A) + b;
  widen_excess(a, b, n, out);
  return out;
}

// Adds a thread's pulse total to the shared one (integer addition: any order gives the same).
static void add_total(int64_t* total, int64_t acc) {
  if (total != nullptr) __atomic_fetch_add(total, acc, __ATOMIC_RELAXED);
}

// ----- segments: the update of one block, between the response evaluations ---------------
// All take (args, block start b, valid elements n, scratch, shape of the write they finish).
using SegFn = void (*)(const StepArgs&, int64_t, int, Scratch&, const float*);

// The segment loops below read the step's numbers through pointers into the scratch area
// (s.u0, ...) and write other scratch arrays and the tensors: all disjoint (the launchers
// check the tensors), which `ivdep` tells GCC, so that it vectorises them without runtime
// alias checks (too many of them otherwise: it would leave the loops scalar).
//
// First write (W for asgd, P for rl/rl2): without pairs N = round_stochastic(-lr * g /
// dw_min) with u0 (capped) and the response argument the sign selects; with pairs (an
// excess A, as float32 at s.av) N_up, N_down (pair_counts) and both arguments.
template <class S, class G, bool RESIDUAL, bool NOM, bool PAIRS>
static void seg_first(const StepArgs& a, int64_t b, int n, Scratch& s, const float*) {
  using ST = typename S::T;
  using GT = typename G::T;
  const GT* __restrict__ g = static_cast<const GT*>(a.g) + b;
  const ST* __restrict__ x = static_cast<const ST*>(RESIDUAL ? a.P : a.W) + b;
  const ParamBlock& p = RESIDUAL ? s.pp : s.pw;
  const Elem pn = nominal_elem(RESIDUAL ? a.dev_p : a.dev_w);
  const float* __restrict__ u0 = s.u0;
  WriteBlock& f = s.first;
  float* __restrict__ xo = f.x;
  float* __restrict__ co = f.count;
  float* __restrict__ uo = f.u;
  float* __restrict__ wo = f.w;
  const float neg_lr = a.neg_lr, lr = a.lr, mp = a.max_pulses;
  if constexpr (!PAIRS) {
#pragma GCC ivdep
    for (int j = 0; j < n; ++j) {
      const auto& e = param_at<NOM>(p, pn, j);
      const float xv = S::load(x[j]);
      const float cnt = stochastic_count((neg_lr * G::load(g[j])) / e.dw, u0[j], mp);
      float u, w;
      response_arg(xv, cnt, e, u, w);
      xo[j] = xv;
      co[j] = cnt;
      uo[j] = u;
      wo[j] = w;
    }
  } else {
    const float* __restrict__ u1 = s.u_pair;
    const float* __restrict__ av = s.av;
    float* __restrict__ upo = f.up;
    float* __restrict__ dno = f.down;
    float* __restrict__ udo = f.u_down;
#pragma GCC ivdep
    for (int j = 0; j < n; ++j) {
      const auto& e = param_at<NOM>(p, pn, j);
      const float xv = S::load(x[j]);
      float up, down;
      pair_counts(G::load(g[j]), av[j], u0[j], u1[j], lr, neg_lr, e.dw, mp, up, down);
      const float w = xv + e.shift;
      xo[j] = xv;
      co[j] = up - down;
      upo[j] = up;
      dno[j] = down;
      uo[j] = clampf((e.tau_max - w) / e.half, 0.0f, 2.0f);
      udo[j] = clampf((w - e.tau_min) / e.half, 0.0f, 2.0f);
      wo[j] = w;
    }
  }
}

// The stored value after the write `wb` of element j (apply_write or apply_pairs), with the
// c2c normals z (read only with C2C) and the array's parameters.
template <bool C2C, bool PAIRS, bool NOM>
static FA_INLINE float write_value(const WriteBlock& wb, const float* __restrict__ shape, const float* __restrict__ z, float c2c,
                                   const ParamBlock& p, const Elem& pn, int j) {
  const auto& e = param_at<NOM>(p, pn, j);
  const float sd = C2C ? wb.sd[j] : 0.0f;
  const float zz = C2C ? z[j] : 0.0f;
  if constexpr (PAIRS) {
    return apply_pairs<C2C>(wb.x[j], wb.up[j], wb.down[j], shape[j], wb.shape_down[j], sd, zz, c2c, e);
  } else {
    return apply_write<C2C>(wb.x[j], wb.count[j], shape[j], sd, zz, c2c, e);
  }
}

// asgd: finish the write of W.
template <class S, bool C2C, bool NOM, bool PAIRS>
static void asgd_last(const StepArgs& a, int64_t b, int n, Scratch& s, const float* __restrict__ shape) {
  using ST = typename S::T;
  ST* __restrict__ W = static_cast<ST*>(a.W) + b;
  const WriteBlock& f = s.first;
  const ParamBlock& p = s.pw;
  const Elem pn = nominal_elem(a.dev_w);
  const float c2c = a.dev_w.c2c_std;
#pragma GCC ivdep
  for (int j = 0; j < n; ++j) W[j] = S::store(write_value<C2C, PAIRS, NOM>(f, shape, s.n_c2c, c2c, p, pn, j));
}

// rl, transfer step: finish P, read it (noisy), N_W = round_stochastic(transfer_lr * P_hat
// / dw_min_W) with stream 2, and W's response argument.
template <class S, bool C2C, bool READ, bool NOM, bool PAIRS>
static void rl_mid(const StepArgs& a, int64_t b, int n, Scratch& s, const float* __restrict__ shape) {
  using ST = typename S::T;
  ST* __restrict__ P = static_cast<ST*>(a.P) + b;
  const ST* __restrict__ W = static_cast<const ST*>(a.W) + b;
  const WriteBlock& f = s.first;
  WriteBlock& sec = s.second;
  const ParamBlock& pp = s.pp;
  const Elem ppn = nominal_elem(a.dev_p);
  const ParamBlock& pw = s.pw;
  const Elem pwn = nominal_elem(a.dev_w);
  const float c2c = a.dev_p.c2c_std, rn = a.read_noise, tlr = a.tlr, mp = a.max_pulses;
  const float* __restrict__ n_read = s.n_read;
  const float* __restrict__ u1 = s.u1;
#pragma GCC ivdep
  for (int j = 0; j < n; ++j) {
    const ST ps = S::store(write_value<C2C, PAIRS, NOM>(f, shape, s.n_c2c, c2c, pp, ppn, j));
    P[j] = ps;
    const float p32 = S::load(ps);
    float p_hat = p32;
    if constexpr (READ) p_hat = p32 + rn * n_read[j];
    const auto& e = param_at<NOM>(pw, pwn, j);
    const float cnt = stochastic_count((tlr * p_hat) / e.dw, u1[j], mp);
    const float xw = S::load(W[j]);
    float u, w;
    response_arg(xw, cnt, e, u, w);
    s.p32[j] = p32;
    sec.x[j] = xw;
    sec.count[j] = cnt;
    sec.u[j] = u;
    sec.w[j] = w;
  }
}

// The mixed weight's output from element b on, or null when this step writes none (the loops
// below test it once per element; GCC unswitches them).
template <class ST>
static FA_INLINE ST* mixed_out(const StepArgs& a, int64_t b) {
  return a.Wbar != nullptr ? static_cast<ST*>(a.Wbar) + b : nullptr;
}

// rl, step without transfer: finish P, Wbar = W + gamma * P.
template <class S, bool C2C, bool NOM, bool PAIRS>
static void rl_hold(const StepArgs& a, int64_t b, int n, Scratch& s, const float* __restrict__ shape) {
  using ST = typename S::T;
  ST* __restrict__ P = static_cast<ST*>(a.P) + b;
  const ST* __restrict__ W = static_cast<const ST*>(a.W) + b;
  ST* __restrict__ Wbar = mixed_out<ST>(a, b);
  const WriteBlock& f = s.first;
  const ParamBlock& pp = s.pp;
  const Elem ppn = nominal_elem(a.dev_p);
  const float c2c = a.dev_p.c2c_std, gm = a.gamma_mix;
#pragma GCC ivdep
  for (int j = 0; j < n; ++j) {
    const ST ps = S::store(write_value<C2C, PAIRS, NOM>(f, shape, s.n_c2c, c2c, pp, ppn, j));
    P[j] = ps;
    if (Wbar) Wbar[j] = S::store(S::load(W[j]) + gm * S::load(ps));
  }
}

// rl, transfer step: finish W, Wbar = W + gamma * P.
template <class S, bool C2C, bool NOM>
static void rl_last(const StepArgs& a, int64_t b, int n, Scratch& s, const float* __restrict__ shape) {
  using ST = typename S::T;
  ST* __restrict__ W = static_cast<ST*>(a.W) + b;
  ST* __restrict__ Wbar = mixed_out<ST>(a, b);
  const WriteBlock& sec = s.second;
  const ParamBlock& pw = s.pw;
  const Elem pwn = nominal_elem(a.dev_w);
  const float c2c = a.dev_w.c2c_std, gm = a.gamma_mix;
#pragma GCC ivdep
  for (int j = 0; j < n; ++j) {
    const ST ws = S::store(write_value<C2C, false, NOM>(sec, shape, s.z_w, c2c, pw, pwn, j));
    W[j] = ws;
    if (Wbar) Wbar[j] = S::store(S::load(ws) + gm * s.p32[j]);
  }
}

// rl2: finish P, read it (noisy), update the buffer and choose W's pulses:
//   accumulate: H += transfer_lr * P_hat; N = trunc(H / dw) where |H| >= threshold * dw
//   ema:        H = (1 - transfer_lr) H + transfer_lr P_hat; N = round_stochastic(transfer_lr * H / dw) with stream 2
template <class S, bool C2C, bool READ, bool EMA, bool NOM, bool PAIRS>
static void rl2_mid(const StepArgs& a, int64_t b, int n, Scratch& s, const float* __restrict__ shape) {
  using ST = typename S::T;
  ST* __restrict__ P = static_cast<ST*>(a.P) + b;
  const ST* __restrict__ W = static_cast<const ST*>(a.W) + b;
  const ST* __restrict__ H = static_cast<const ST*>(a.H) + b;
  const WriteBlock& f = s.first;
  WriteBlock& sec = s.second;
  const ParamBlock& pp = s.pp;
  const Elem ppn = nominal_elem(a.dev_p);
  const ParamBlock& pw = s.pw;
  const Elem pwn = nominal_elem(a.dev_w);
  const float c2c = a.dev_p.c2c_std, rn = a.read_noise, tlr = a.tlr, omt = a.one_minus_tlr, thr = a.threshold;
  const float mp = a.max_pulses;
  const float* __restrict__ n_read = s.n_read;
  const float* __restrict__ u1 = s.u1;
#pragma GCC ivdep
  for (int j = 0; j < n; ++j) {
    const ST ps = S::store(write_value<C2C, PAIRS, NOM>(f, shape, s.n_c2c, c2c, pp, ppn, j));
    P[j] = ps;
    const float p32 = S::load(ps);
    float p_hat = p32;
    if constexpr (READ) p_hat = p32 + rn * n_read[j];
    const float h0 = S::load(H[j]);
    const auto& e = param_at<NOM>(pw, pwn, j);
    const float dw = e.dw;
    float h, cnt;
    if constexpr (EMA) {
      h = omt * h0 + tlr * p_hat;
      cnt = stochastic_count((tlr * h) / dw, u1[j], mp);
    } else {
      h = h0 + tlr * p_hat;
      const float t = std::trunc(h / dw);
      cnt = clampf(std::fabs(h) >= thr * dw ? t : 0.0f, -mp, mp);
    }
    const float xw = S::load(W[j]);
    float u, w;
    response_arg(xw, cnt, e, u, w);
    s.p32[j] = p32;
    s.h[j] = h;
    sec.x[j] = xw;
    sec.count[j] = cnt;
    sec.u[j] = u;
    sec.w[j] = w;
  }
}

// rl2: finish W, drain the buffer (accumulate: H -= N * dw), Wbar = W + gamma * P.
template <class S, bool C2C, bool EMA, bool NOM>
static void rl2_last(const StepArgs& a, int64_t b, int n, Scratch& s, const float* __restrict__ shape) {
  using ST = typename S::T;
  ST* __restrict__ W = static_cast<ST*>(a.W) + b;
  ST* __restrict__ H = static_cast<ST*>(a.H) + b;
  ST* __restrict__ Wbar = mixed_out<ST>(a, b);
  const WriteBlock& sec = s.second;
  const ParamBlock& pw = s.pw;
  const Elem pwn = nominal_elem(a.dev_w);
  const float c2c = a.dev_w.c2c_std, gm = a.gamma_mix;
#pragma GCC ivdep
  for (int j = 0; j < n; ++j) {
    const ST ws = S::store(write_value<C2C, false, NOM>(sec, shape, s.z_w, c2c, pw, pwn, j));
    W[j] = ws;
    float h = s.h[j];
    if constexpr (!EMA) h = h - sec.count[j] * param_at<NOM>(pw, pwn, j).dw;
    H[j] = S::store(h);
    if (Wbar) Wbar[j] = S::store(S::load(ws) + gm * s.p32[j]);
  }
}

// ----- fused paths: the common case in one loop ---------------------------------------------
// When every array written this step has a linear response, nominal parameters and no c2c
// noise, no vector-math call is needed between an element's pulse count and its write, and
// its whole update runs in one loop with the device parameters as scalars. Same operations,
// same order as the segments above. With power responses (asgd and rl2, float32, AVX2) the
// loop runs over vectors of eight lanes and calls the power only for vectors that pulse.

// The write of a linear array without c2c noise; returns the stored value. The response
// argument is response_arg's: the numerator the sign selects, divided (one division per
// element; the loops are bound by the divider's throughput, not by its latency).
template <class S>
static FA_INLINE typename S::T linear_write(float x, float count, const Elem& e) {
  float u, w;
  response_arg(x, count, e, u, w);
  return S::store(apply_write<false>(x, count, u, 0.0f, 0.0f, 0.0f, e));
}

// Scalars of a fused update, as float32.
struct FusedScalars {
  float neg_lr, max_pulses, read_noise, tlr, one_minus_tlr, gamma_mix, threshold;
};

static FusedScalars fused_scalars(const StepArgs& a) {
  return FusedScalars{a.neg_lr, a.max_pulses, a.read_noise, a.tlr, a.one_minus_tlr, a.gamma_mix, a.threshold};
}

// asgd on elements j < n.
template <class S, class G>
static FA_INLINE void asgd_elements(int n, const typename G::T* __restrict__ g, typename S::T* __restrict__ W,
                                    const float* __restrict__ u0, float* __restrict__ count_w, const FusedScalars c, const Elem ew) {
  for (int j = 0; j < n; ++j) {
    const float cnt = stochastic_count((c.neg_lr * G::load(g[j])) / ew.dw, u0[j], c.max_pulses);
    W[j] = linear_write<S>(S::load(W[j]), cnt, ew);
    count_w[j] = cnt;
  }
}

// rl with a transfer on elements j < n.
template <class S, class G, bool READ>
static FA_INLINE void rl_elements(int n, const typename G::T* __restrict__ g, typename S::T* __restrict__ W,
                                  typename S::T* __restrict__ P, typename S::T* __restrict__ Wbar, const float* __restrict__ u0,
                                  const float* __restrict__ u1, const float* __restrict__ n_read, float* __restrict__ count_p,
                                  float* __restrict__ count_w, const FusedScalars c, const Elem ew, const Elem ep) {
  using ST = typename S::T;
  for (int j = 0; j < n; ++j) {
    const float cp = stochastic_count((c.neg_lr * G::load(g[j])) / ep.dw, u0[j], c.max_pulses);
    const ST ps = linear_write<S>(S::load(P[j]), cp, ep);
    P[j] = ps;
    const float p32 = S::load(ps);
    float p_hat = p32;
    if constexpr (READ) p_hat = p32 + c.read_noise * n_read[j];
    const float cw = stochastic_count((c.tlr * p_hat) / ew.dw, u1[j], c.max_pulses);
    const ST ws = linear_write<S>(S::load(W[j]), cw, ew);
    W[j] = ws;
    if (Wbar) Wbar[j] = S::store(S::load(ws) + c.gamma_mix * p32);
    count_p[j] = cp;
    count_w[j] = cw;
  }
}

// rl without a transfer on elements j < n.
template <class S, class G>
static FA_INLINE void rl_hold_elements(int n, const typename G::T* __restrict__ g, const typename S::T* __restrict__ W,
                                       typename S::T* __restrict__ P, typename S::T* __restrict__ Wbar,
                                       const float* __restrict__ u0, float* __restrict__ count_p, const FusedScalars c,
                                       const Elem ep) {
  using ST = typename S::T;
  for (int j = 0; j < n; ++j) {
    const float cp = stochastic_count((c.neg_lr * G::load(g[j])) / ep.dw, u0[j], c.max_pulses);
    const ST ps = linear_write<S>(S::load(P[j]), cp, ep);
    P[j] = ps;
    if (Wbar) Wbar[j] = S::store(S::load(W[j]) + c.gamma_mix * S::load(ps));
    count_p[j] = cp;
  }
}

// rl2 on elements j < n.
template <class S, class G, bool READ, bool EMA>
static FA_INLINE void rl2_elements(int n, const typename G::T* __restrict__ g, typename S::T* __restrict__ W,
                                   typename S::T* __restrict__ P, typename S::T* __restrict__ H, typename S::T* __restrict__ Wbar,
                                   const float* __restrict__ u0, const float* __restrict__ u1, const float* __restrict__ n_read,
                                   float* __restrict__ count_p, float* __restrict__ count_w, const FusedScalars c, const Elem ew,
                                   const Elem ep) {
  using ST = typename S::T;
  const float thr_dw = c.threshold * ew.dw;
  for (int j = 0; j < n; ++j) {
    const float cp = stochastic_count((c.neg_lr * G::load(g[j])) / ep.dw, u0[j], c.max_pulses);
    const ST ps = linear_write<S>(S::load(P[j]), cp, ep);
    P[j] = ps;
    const float p32 = S::load(ps);
    float p_hat = p32;
    if constexpr (READ) p_hat = p32 + c.read_noise * n_read[j];
    const float h0 = S::load(H[j]);
    float h, cw;
    if constexpr (EMA) {
      h = c.one_minus_tlr * h0 + c.tlr * p_hat;
      cw = stochastic_count((c.tlr * h) / ew.dw, u1[j], c.max_pulses);
    } else {
      h = h0 + c.tlr * p_hat;
      const float t = std::trunc(h / ew.dw);
      cw = clampf(std::fabs(h) >= thr_dw ? t : 0.0f, -c.max_pulses, c.max_pulses);
    }
    const ST ws = linear_write<S>(S::load(W[j]), cw, ew);
    W[j] = ws;
    if constexpr (!EMA) h = h - cw * ew.dw;
    H[j] = S::store(h);
    if (Wbar) Wbar[j] = S::store(S::load(ws) + c.gamma_mix * p32);
    count_p[j] = cp;
    count_w[j] = cw;
  }
}

// The fused update of one block, elements b .. b+n-1 (block_draws drew the uniforms and
// the read-noise normals).
template <class S, class G, bool READ, bool EMA>
static __attribute__((noinline)) void rl2_fused(const StepArgs& a, int64_t b, int n, Scratch& s, const Elem ew, const Elem ep) {
  using ST = typename S::T;
  using GT = typename G::T;
  const GT* g = static_cast<const GT*>(a.g) + b;
  ST* W = static_cast<ST*>(a.W) + b;
  ST* P = static_cast<ST*>(a.P) + b;
  ST* H = static_cast<ST*>(a.H) + b;
  ST* Wbar = mixed_out<ST>(a, b);
  const FusedScalars c = fused_scalars(a);
  rl2_elements<S, G, READ, EMA>(n, g, W, P, H, Wbar, s.u0, s.u1, s.n_read, s.first.count, s.second.count, c, ew, ep);
}

template <class S, class G, bool READ>
static __attribute__((noinline)) void rl_fused(const StepArgs& a, int64_t b, int n, Scratch& s, const Elem ew, const Elem ep) {
  using ST = typename S::T;
  using GT = typename G::T;
  const GT* g = static_cast<const GT*>(a.g) + b;
  ST* W = static_cast<ST*>(a.W) + b;
  ST* P = static_cast<ST*>(a.P) + b;
  ST* Wbar = mixed_out<ST>(a, b);
  const FusedScalars c = fused_scalars(a);
  rl_elements<S, G, READ>(n, g, W, P, Wbar, s.u0, s.u1, s.n_read, s.first.count, s.second.count, c, ew, ep);
}

template <class S, class G>
static __attribute__((noinline)) void rl_hold_fused(const StepArgs& a, int64_t b, int n, Scratch& s, const Elem, const Elem ep) {
  using ST = typename S::T;
  using GT = typename G::T;
  const GT* g = static_cast<const GT*>(a.g) + b;
  const ST* W = static_cast<const ST*>(a.W) + b;
  ST* P = static_cast<ST*>(a.P) + b;
  ST* Wbar = mixed_out<ST>(a, b);
  const FusedScalars c = fused_scalars(a);
  rl_hold_elements<S, G>(n, g, W, P, Wbar, s.u0, s.first.count, c, ep);
}

template <class S, class G>
static __attribute__((noinline)) void asgd_fused(const StepArgs& a, int64_t b, int n, Scratch& s, const Elem ew, const Elem) {
  using ST = typename S::T;
  using GT = typename G::T;
  const GT* g = static_cast<const GT*>(a.g) + b;
  ST* W = static_cast<ST*>(a.W) + b;
  const FusedScalars c = fused_scalars(a);
  asgd_elements<S, G>(n, g, W, s.u0, s.first.count, c, ew);
}

using FusedFn = void (*)(const StepArgs&, int64_t, int, Scratch&, Elem, Elem);

#if FA_ISA_AVX2
// ----- the one-pass power kernels ----------------------------------------------------------------
// asgd, rl and rl2 on float32 arrays of nominal power devices (no d2d, no c2c), in one pass
// over a block, a vector at a time: the pulse count, the response argument, and the write,
// with the power evaluated (Sleef, as response_shape does) only for the vectors where a lane
// pulses. Elsewhere the count is +0, so the write x + (0 * dw) * q = x + 0 takes the same
// value for any finite q, and q = 0 stands in. Each operation is the scalar segments' own, in
// their order: std::max(v, lo) is vmaxps(lo, v) and std::min(v, hi) is vminps(hi, v), NaNs
// included.
//
// The kernels are written once over a vector type V: V8 (AVX2, eight lanes; masks are
// vectors, a block's tail is read with maskload) or, in the AVX-512 build, V16 (sixteen
// lanes; masks are __mmask16), where the loops are bound by issue width and half the
// instructions do the same work. Each operation of V is one instruction of its width, chosen
// so that both give the same bits: a lane that maskz clears is +0 (vandps with the mask on
// eight lanes, maskz_mov on sixteen), select takes its second operand where the mask is set,
// min and max return their second operand where either is NaN, floor and trunc are the
// roundings of that mode, pow is Sleef's powf (its 8- and 16-lane versions are one
// algorithm). test_avx512_one_pass_power_kernels_are_the_avx2_ones_bit_for_bit compares the two.
struct V8 {
  using F = __m256;
  using M = __m256;  // a lane mask: all ones where set
  // The lanes of a vector that lie in the block: all (whole), or those of `valid`.
  struct Tail {
    bool whole;
    __m256i valid;
  };
  static FA_INLINE F set1(float v) { return _mm256_set1_ps(v); }
  static FA_INLINE F zero() { return _mm256_setzero_ps(); }
  static FA_INLINE F add(F a, F b) { return _mm256_add_ps(a, b); }
  static FA_INLINE F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static FA_INLINE F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static FA_INLINE F div(F a, F b) { return _mm256_div_ps(a, b); }
  static FA_INLINE F min(F a, F b) { return _mm256_min_ps(a, b); }
  static FA_INLINE F max(F a, F b) { return _mm256_max_ps(a, b); }
  static FA_INLINE F floor(F a) { return _mm256_floor_ps(a); }
  static FA_INLINE F trunc(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC); }
  static FA_INLINE F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static FA_INLINE F pow(F a, F b) { return Sleef_powf8_u10(a, b); }
  static FA_INLINE F abs(F a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static FA_INLINE F neg(F a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
  static FA_INLINE M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static FA_INLINE M gt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static FA_INLINE M ge(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static FA_INLINE M ne(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_NEQ_OQ); }
  static FA_INLINE M either(M a, M b) { return _mm256_or_ps(a, b); }
  static FA_INLINE bool any(M m) { return _mm256_movemask_ps(m) != 0; }
  static FA_INLINE bool all(M m) { return _mm256_movemask_ps(m) == 0xFF; }
  static FA_INLINE F select(M m, F a, F b) { return _mm256_blendv_ps(a, b, m); }  // b where m, else a
  static FA_INLINE F maskz(M m, F a) { return _mm256_and_ps(m, a); }              // a where m, else +0
  static FA_INLINE F load(const float* p, Tail t) { return t.whole ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, t.valid); }
  static FA_INLINE void store(float* p, Tail t, F v) {
    if (t.whole)
      _mm256_storeu_ps(p, v);
    else
      _mm256_maskstore_ps(p, t.valid, v);
  }
  // A whole vector of the block's scratch (u0 + j: any alignment; it has room past the block).
  static FA_INLINE F scratch(const float* p) { return _mm256_loadu_ps(p); }
  static FA_INLINE void scratch_store(float* p, F v) { _mm256_store_ps(p, v); }  // a count: aligned
  // body(j, tail) for the vectors of lanes j .. j+7 of a block of n elements: the whole
  // vectors in a loop of their own (whole a constant true there, so the loads and stores take
  // no mask and the loop computes none), then the tail, if any, with its lane mask.
  template <class Body>
  static FA_INLINE void for_vectors(int n, const Body& body) {
    int j = 0;
    for (; j + 8 <= n; j += 8) body(j, Tail{true, _mm256_set1_epi32(-1)});
    if (j < n) body(j, Tail{false, _mm256_cmpgt_epi32(_mm256_set1_epi32(n - j), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))});
  }
};

#if FA_ISA_AVX512
struct V16 {
  using F = __m512;
  using M = __mmask16;
  using Tail = __mmask16;  // the lanes in the block
  static FA_INLINE F set1(float v) { return _mm512_set1_ps(v); }
  static FA_INLINE F zero() { return _mm512_setzero_ps(); }
  static FA_INLINE F add(F a, F b) { return _mm512_add_ps(a, b); }
  static FA_INLINE F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static FA_INLINE F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static FA_INLINE F div(F a, F b) { return _mm512_div_ps(a, b); }
  static FA_INLINE F min(F a, F b) { return _mm512_min_ps(a, b); }
  static FA_INLINE F max(F a, F b) { return _mm512_max_ps(a, b); }
  static FA_INLINE F floor(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static FA_INLINE F trunc(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC); }
  static FA_INLINE F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static FA_INLINE F pow(F a, F b) { return Sleef_powf16_u10(a, b); }
  static FA_INLINE F abs(F a) { return _mm512_abs_ps(a); }
  static FA_INLINE F neg(F a) { return _mm512_xor_ps(a, _mm512_set1_ps(-0.0f)); }
  static FA_INLINE M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static FA_INLINE M gt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static FA_INLINE M ge(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static FA_INLINE M ne(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_OQ); }
  static FA_INLINE M either(M a, M b) { return static_cast<M>(a | b); }
  static FA_INLINE bool any(M m) { return m != 0; }
  static FA_INLINE bool all(M m) { return m == 0xFFFF; }
  static FA_INLINE F select(M m, F a, F b) { return _mm512_mask_blend_ps(m, a, b); }
  static FA_INLINE F maskz(M m, F a) { return _mm512_maskz_mov_ps(m, a); }
  static FA_INLINE F load(const float* p, Tail t) { return _mm512_maskz_loadu_ps(t, p); }
  static FA_INLINE void store(float* p, Tail t, F v) { _mm512_mask_storeu_ps(p, t, v); }
  static FA_INLINE F scratch(const float* p) { return _mm512_loadu_ps(p); }
  static FA_INLINE void scratch_store(float* p, F v) { _mm512_store_ps(p, v); }
  template <class Body>
  static FA_INLINE void for_vectors(int n, const Body& body) {
    int j = 0;
    for (; j + 16 <= n; j += 16) body(j, static_cast<Tail>(0xFFFF));
    if (j < n) body(j, static_cast<Tail>((1u << (n - j)) - 1u));
  }
};
// The width of this build's one-pass kernels.
using VPower = V16;
#else
using VPower = V8;
#endif

template <class V>
static FA_INLINE typename V::F clamp(typename V::F v, typename V::F lo, typename V::F hi) {
  return V::min(hi, V::max(lo, v));
}

// The constants of a power write, broadcast.
template <class V>
struct Power {
  using F = typename V::F;
  F dw, tmax, tmin, half, shift, up, down, lo, hi, gamma;
  F rcp_hi;   // pair_counts' factor: 1 / dw rounded, raised by 2^-20
  bool root;  // the power is the square root (Device::root)
};

template <class V>
static FA_INLINE Power<V> power(const Elem& e, const Device& dev) {
  // (1 / dw) (1 + 2^-20) in double, rounded once: above 1 / dw by more than 2^-21 relative.
  const float rcp_hi = static_cast<float>((1.0 / static_cast<double>(e.dw)) * (1.0 + 0x1p-20));
  return Power<V>{V::set1(e.dw), V::set1(e.tau_max), V::set1(e.tau_min), V::set1(e.half),     V::set1(e.shift), V::set1(e.up),
                  V::set1(e.down), V::set1(e.lo),   V::set1(e.hi),       V::set1(dev.gamma), V::set1(rcp_hi),  dev.root()};
}

// u^gamma: vm_pow's Sleef power, or the square root (vm_sqrt_exact's).
template <class V>
static FA_INLINE typename V::F power_shape(typename V::F u, const Power<V>& e) {
  return e.root ? V::sqrt(u) : V::pow(u, e.gamma);
}

// stochastic_count: floor(n), plus one where u < n - floor(n) (+0 elsewhere), clamped.
template <class V>
static FA_INLINE typename V::F stochastic_count_v(typename V::F n, typename V::F u, typename V::F neg_cap, typename V::F cap) {
  const typename V::F fl = V::floor(n);
  return clamp<V>(V::add(fl, V::maskz(V::lt(u, V::sub(n, fl)), V::set1(1.0f))), neg_cap, cap);
}

// response_arg, the power response and apply_write (no c2c). Where no lane pulses, the write
// is x + (0 dw) q = x + 0 (q >= 0 and finite, or NaN only where x is), so neither the division
// of the response argument nor the power is evaluated: the common case in training, where a
// few elements in a hundred pulse.
template <class V>
static FA_INLINE typename V::F power_write(typename V::F x, typename V::F cnt, const Power<V>& e) {
  using F = typename V::F;
  const F zero = V::zero();
  if (!V::any(V::ne(cnt, zero))) return clamp<V>(V::add(x, zero), e.lo, e.hi);
  const typename V::M pos = V::gt(cnt, zero);
  const F w = V::add(x, e.shift);
  const F num = V::select(pos, V::sub(w, e.tmin), V::sub(e.tmax, w));
  const F u = clamp<V>(V::div(num, e.half), zero, V::set1(2.0f));
  const F q = V::mul(power_shape<V>(u, e), V::select(pos, e.down, e.up));
  const F step = V::mul(cnt, e.dw);
  return clamp<V>(V::add(x, V::mul(step, q)), e.lo, e.hi);
}

// pair_counts: N_up and N_down of a write with an excess (av: A widened).
// std::max(v, 0) is vmaxps(0, v) and std::min(v, cap) vminps(cap, v), NaNs included.
// Returns whether some lane may get pairs; when none can, the pairs' mean m is not divided
// out: m = RN(t / dw) with t = RN(lr * excess / 2) is at most t * rcp_hi (rounded), whose
// factor exceeds 1 / dw by more than the three roundings can take away, so t * rcp_hi < u1
// gives m < u1 < 1, and then pairs = floor(m) + (u1 < m - floor(m)) = 0 in every lane (a
// product that underflows leaves m below any u1 > 0 too; u1 = 0 never passes the test).
template <class V>
static FA_INLINE bool pair_counts(typename V::F gv, typename V::F av, typename V::F u0, typename V::F u1, typename V::F lr,
                                  typename V::F neg_lr, const Power<V>& e, typename V::F cap, typename V::F& up,
                                  typename V::F& down) {
  using F = typename V::F;
  const F zero = V::zero(), one = V::set1(1.0f);
  const F nv = V::div(V::mul(neg_lr, gv), e.dw);
  const F fl = V::floor(nv);
  const F net = V::add(fl, V::maskz(V::lt(u0, V::sub(nv, fl)), one));
  const F excess = V::max(V::sub(av, V::abs(gv)), zero);  // NaN: 0 (fmax)
  const F t = V::mul(V::mul(lr, excess), V::set1(0.5f));
  F pairs = zero;
  const bool some = !V::all(V::lt(V::mul(t, e.rcp_hi), u1));
  if (some) {
    const F m = V::div(t, e.dw);
    const F flm = V::floor(m);
    pairs = V::add(flm, V::maskz(V::lt(u1, V::sub(m, flm)), one));
  }
  up = V::min(cap, V::add(pairs, V::max(zero, net)));
  down = V::min(cap, V::add(pairs, V::max(zero, V::neg(net))));
  return some;
}

// apply_pairs (no c2c) of a power write, each direction's power evaluated only for the
// vectors where a lane sends pulses that way.
template <class V>
static FA_INLINE typename V::F power_pairs_write(typename V::F x, typename V::F up, typename V::F down, const Power<V>& e) {
  using F = typename V::F;
  const F zero = V::zero(), two = V::set1(2.0f);
  const F w = V::add(x, e.shift);
  const typename V::M has_up = V::gt(up, zero);
  const typename V::M has_down = V::gt(down, zero);
  F vu = zero, vd = zero;
  if (V::any(has_up)) {
    const F u = clamp<V>(V::div(V::sub(e.tmax, w), e.half), zero, two);
    const F q = V::mul(power_shape<V>(u, e), e.up);
    vu = V::maskz(has_up, V::mul(V::mul(up, e.dw), q));
  }
  if (V::any(has_down)) {
    const F u = clamp<V>(V::div(V::sub(w, e.tmin), e.half), zero, two);
    const F q = V::mul(power_shape<V>(u, e), e.down);
    vd = V::maskz(has_down, V::mul(V::mul(down, e.dw), q));
  }
  return clamp<V>(V::add(x, V::sub(vu, vd)), e.lo, e.hi);
}

// power_pairs_write where no lane pulses both ways: one response per lane, the one its
// pulses take (as power_write), with power_pairs_write's operations on each lane, so the
// same numbers for half the divisions and powers.
template <class V>
static FA_INLINE typename V::F power_one_way_write(typename V::F x, typename V::F up, typename V::F down, const Power<V>& e) {
  using F = typename V::F;
  const F zero = V::zero(), two = V::set1(2.0f);
  const F w = V::add(x, e.shift);
  const typename V::M has_up = V::gt(up, zero);
  const typename V::M has_down = V::gt(down, zero);
  if (!V::any(V::either(has_up, has_down))) return clamp<V>(V::add(x, zero), e.lo, e.hi);  // x + (0 - 0)
  const F num = V::select(has_up, V::sub(w, e.tmin), V::sub(e.tmax, w));
  const F u = clamp<V>(V::div(num, e.half), zero, two);
  const F q = V::mul(power_shape<V>(u, e), V::select(has_up, e.down, e.up));
  const F v = V::mul(V::mul(V::select(has_up, down, up), e.dw), q);
  return clamp<V>(V::add(x, V::sub(V::maskz(has_up, v), V::maskz(has_down, v))), e.lo, e.hi);
}

// Asks for the line of p[j + kBlock], kBlock elements further on (in a run of whole blocks the
// same lanes of the next block; WRITE: of an array the step writes), once per 64-byte line. A
// block first draws its random numbers (computation, no memory traffic) and then updates its
// elements (memory, little computation). The hardware prefetcher follows demand misses, so it
// leaves the memory idle during the draws, and the update then waits for its loads; asked for
// one block ahead, the lines arrive during the next block's draws. Past the end of an array it
// asks for lines that are never read (a prefetch does not fault).
template <class V, bool WRITE>
static FA_INLINE void prefetch_next(const float* p, int j) {
  if constexpr (sizeof(typename V::F) < 64) {
    if (j % 16 != 0) return;
  }
  __builtin_prefetch(p + j + kBlock, WRITE ? 1 : 0, 3);
}

// The operands of the first write in a block, broadcast and read once before its loop (the
// stores of the loop are floats, as StepArgs' scalars are, so the compiler would read those
// again at every vector).
template <class V>
struct First {
  typename V::F lr, neg_lr, cap, neg_cap;
  const float *u0, *u_pair, *av;
  float *count, *up, *down;
};

template <class V>
static FA_INLINE First<V> first_operands(const StepArgs& a, Scratch& s) {
  return First<V>{V::set1(a.lr), V::set1(a.neg_lr), V::set1(a.max_pulses), V::set1(-a.max_pulses), s.u0,
                  s.u_pair,      s.av,              s.first.count,          s.first.up,             s.first.down};
}

// The first write (W of asgd, P of rl/rl2) on the lanes j .. of `tail`: with PAIRS (A as
// float32 at k.av, pair uniforms drawn) N_up and N_down into k.up / k.down, else the count
// into k.count. Stores and returns the new X.
template <class V, bool PAIRS>
static FA_INLINE typename V::F power_first_write(const First<V>& k, int j, typename V::Tail tail, const float* g, float* X,
                                                 const Power<V>& e) {
  using F = typename V::F;
  prefetch_next<V, false>(g, j);
  prefetch_next<V, true>(X, j);
  const F x = V::load(X + j, tail), gv = V::load(g + j, tail);
  F x_new;
  if constexpr (PAIRS) {
    F up, down;
    x_new = pair_counts<V>(gv, V::load(k.av + j, tail), V::scratch(k.u0 + j), V::scratch(k.u_pair + j), k.lr, k.neg_lr, e, k.cap,
                           up, down)
                ? power_pairs_write<V>(x, up, down, e)
                : power_one_way_write<V>(x, up, down, e);
    V::scratch_store(k.up + j, up);
    V::scratch_store(k.down + j, down);
  } else {
    const F cnt = stochastic_count_v<V>(V::div(V::mul(k.neg_lr, gv), e.dw), V::scratch(k.u0 + j), k.neg_cap, k.cap);
    x_new = power_write<V>(x, cnt, e);
    V::scratch_store(k.count + j, cnt);
  }
  V::store(X + j, tail, x_new);
  return x_new;
}

// asgd: the first write, on W. With PAIRS N_up and N_down go to s.first.up / s.first.down
// for the pulse report, else the count to s.first.count.
template <class V, bool PAIRS>
static __attribute__((noinline)) void asgd_power_fused(const StepArgs& a, int64_t b, int n, Scratch& s, const Elem ew, const Elem) {
  const float* g = static_cast<const float*>(a.g) + b;
  float* W = static_cast<float*>(a.W) + b;
  const Power<V> e = power<V>(ew, a.dev_w);
  const First<V> k = first_operands<V>(a, s);
  V::for_vectors(n, [&](int j, typename V::Tail tail) { power_first_write<V, PAIRS>(k, j, tail, g, W, e); });
}

// rl2 with power devices for P and W: rl2_elements with power_write in place of
// linear_write; with PAIRS P's write sends N_up and N_down, reported through s.first.up /
// s.first.down.
template <class V, bool READ, bool EMA, bool PAIRS>
static __attribute__((noinline)) void rl2_power_fused(const StepArgs& a, int64_t b, int n, Scratch& s, const Elem ew, const Elem ep) {
  using F = typename V::F;
  const float* g = static_cast<const float*>(a.g) + b;
  float* W = static_cast<float*>(a.W) + b;
  float* P = static_cast<float*>(a.P) + b;
  float* H = static_cast<float*>(a.H) + b;
  float* Wbar = mixed_out<float>(a, b);
  const F rn = V::set1(a.read_noise), tlr = V::set1(a.tlr), omt = V::set1(a.one_minus_tlr);
  const F gm = V::set1(a.gamma_mix), thr_dw = V::set1(a.threshold * ew.dw), zero = V::zero();
  const Power<V> e_w = power<V>(ew, a.dev_w), e_p = power<V>(ep, a.dev_p);
  const First<V> k = first_operands<V>(a, s);
  const float *u1 = s.u1, *n_read = s.n_read;
  float* count_w = s.second.count;
  V::for_vectors(n, [&](int j, typename V::Tail tail) {
    prefetch_next<V, true>(W, j);
    prefetch_next<V, true>(H, j);
    if (Wbar) prefetch_next<V, true>(Wbar, j);
    const F p32 = power_first_write<V, PAIRS>(k, j, tail, g, P, e_p);
    F p_hat = p32;
    if constexpr (READ) p_hat = V::add(p32, V::mul(rn, V::scratch(n_read + j)));
    const F h0 = V::load(H + j, tail);
    F h, cw;
    if constexpr (EMA) {
      h = V::add(V::mul(omt, h0), V::mul(tlr, p_hat));
      cw = stochastic_count_v<V>(V::div(V::mul(tlr, h), e_w.dw), V::scratch(u1 + j), k.neg_cap, k.cap);
    } else {
      h = V::add(h0, V::mul(tlr, p_hat));
      const typename V::M over = V::ge(V::abs(h), thr_dw);
      cw = zero;  // clamp(0) where no lane reaches the threshold: the division only where one does
      if (V::any(over)) cw = clamp<V>(V::maskz(over, V::trunc(V::div(h, e_w.dw))), k.neg_cap, k.cap);
    }
    const F ws = power_write<V>(V::load(W + j, tail), cw, e_w);
    V::store(W + j, tail, ws);
    if constexpr (!EMA) h = V::sub(h, V::mul(cw, e_w.dw));
    V::store(H + j, tail, h);
    if (Wbar) V::store(Wbar + j, tail, V::add(ws, V::mul(gm, p32)));
    V::scratch_store(count_w + j, cw);
  });
}

// rl with power devices: rl_elements (TRANSFER) or rl_hold_elements with power_write in
// place of linear_write; with PAIRS P's write is rl2_power_fused's.
template <class V, bool TRANSFER, bool READ, bool PAIRS>
static __attribute__((noinline)) void rl_power_fused(const StepArgs& a, int64_t b, int n, Scratch& s, const Elem ew, const Elem ep) {
  using F = typename V::F;
  const float* g = static_cast<const float*>(a.g) + b;
  float* W = static_cast<float*>(a.W) + b;
  float* P = static_cast<float*>(a.P) + b;
  float* Wbar = mixed_out<float>(a, b);
  const F rn = V::set1(a.read_noise), tlr = V::set1(a.tlr), gm = V::set1(a.gamma_mix);
  const Power<V> e_w = power<V>(ew, a.dev_w), e_p = power<V>(ep, a.dev_p);
  const First<V> k = first_operands<V>(a, s);
  const float *u1 = s.u1, *n_read = s.n_read;
  float* count_w = s.second.count;
  V::for_vectors(n, [&](int j, typename V::Tail tail) {
    if (TRANSFER || Wbar) prefetch_next<V, TRANSFER>(W, j);  // read by the transfer or the mixed weight
    if (Wbar) prefetch_next<V, true>(Wbar, j);
    const F p32 = power_first_write<V, PAIRS>(k, j, tail, g, P, e_p);
    if constexpr (TRANSFER) {
      F p_hat = p32;
      if constexpr (READ) p_hat = V::add(p32, V::mul(rn, V::scratch(n_read + j)));
      const F cw = stochastic_count_v<V>(V::div(V::mul(tlr, p_hat), e_w.dw), V::scratch(u1 + j), k.neg_cap, k.cap);
      const F ws = power_write<V>(V::load(W + j, tail), cw, e_w);
      V::store(W + j, tail, ws);
      if (Wbar) V::store(Wbar + j, tail, V::add(ws, V::mul(gm, p32)));
      V::scratch_store(count_w + j, cw);
    } else {
      if (Wbar) V::store(Wbar + j, tail, V::add(V::load(W + j, tail), V::mul(gm, p32)));
    }
  });
}

template <bool PAIRS>
static FusedFn pick_rl_power_fused(bool transfer, bool read) {
  if (!transfer) return &rl_power_fused<VPower, false, false, PAIRS>;
  return read ? &rl_power_fused<VPower, true, true, PAIRS> : &rl_power_fused<VPower, true, false, PAIRS>;
}

template <bool PAIRS>
static FusedFn pick_rl2_power_fused(bool read, bool ema) {
  if (ema) return read ? &rl2_power_fused<VPower, true, true, PAIRS> : &rl2_power_fused<VPower, false, true, PAIRS>;
  return read ? &rl2_power_fused<VPower, true, false, PAIRS> : &rl2_power_fused<VPower, false, false, PAIRS>;
}
#endif

// Whether `dev`'s writes can take a fused path.
static bool fusable(const Device& dev) { return dev.family == kLinear && !dev.d2d() && !dev.c2c(); }
// Whether `dev`'s writes can take the fused power path (AVX2, float32 arrays and gradients).
[[maybe_unused]] static bool power_fusable(const Device& dev) { return FA_ISA_AVX2 && dev.family == kPower && !dev.d2d() && !dev.c2c(); }

// ----- picking instantiations once per call ------------------------------------------------
// NOM: no array of the step has device-to-device variation (see param_at); PAIRS: the
// first write has an excess.
template <class S, bool NOM, bool PAIRS>
static SegFn pick_asgd_last(bool c2c) {
  return c2c ? &asgd_last<S, true, NOM, PAIRS> : &asgd_last<S, false, NOM, PAIRS>;
}
template <class S, bool NOM, bool PAIRS>
static SegFn pick_rl_mid(bool c2c, bool read) {
  if (c2c) return read ? &rl_mid<S, true, true, NOM, PAIRS> : &rl_mid<S, true, false, NOM, PAIRS>;
  return read ? &rl_mid<S, false, true, NOM, PAIRS> : &rl_mid<S, false, false, NOM, PAIRS>;
}
template <class S, bool NOM, bool PAIRS>
static SegFn pick_rl_hold(bool c2c) {
  return c2c ? &rl_hold<S, true, NOM, PAIRS> : &rl_hold<S, false, NOM, PAIRS>;
}
template <class S, bool NOM>
static SegFn pick_rl_last(bool c2c) {
  return c2c ? &rl_last<S, true, NOM> : &rl_last<S, false, NOM>;
}
template <class S, bool NOM, bool PAIRS>
static SegFn pick_rl2_mid(bool c2c, bool read, bool ema) {
  if (ema) {
    if (c2c) return read ? &rl2_mid<S, true, true, true, NOM, PAIRS> : &rl2_mid<S, true, false, true, NOM, PAIRS>;
    return read ? &rl2_mid<S, false, true, true, NOM, PAIRS> : &rl2_mid<S, false, false, true, NOM, PAIRS>;
  }
  if (c2c) return read ? &rl2_mid<S, true, true, false, NOM, PAIRS> : &rl2_mid<S, true, false, false, NOM, PAIRS>;
  return read ? &rl2_mid<S, false, true, false, NOM, PAIRS> : &rl2_mid<S, false, false, false, NOM, PAIRS>;
}
template <class S, bool NOM>
static SegFn pick_rl2_last(bool c2c, bool ema) {
  if (ema) return c2c ? &rl2_last<S, true, true, NOM> : &rl2_last<S, false, true, NOM>;
  return c2c ? &rl2_last<S, true, false, NOM> : &rl2_last<S, false, false, NOM>;
}
// The first write's segment.
template <class S, class G, bool RESIDUAL>
static SegFn pick_first(bool nom, bool pairs) {
  if (nom) return pairs ? &seg_first<S, G, RESIDUAL, true, true> : &seg_first<S, G, RESIDUAL, true, false>;
  return pairs ? &seg_first<S, G, RESIDUAL, false, true> : &seg_first<S, G, RESIDUAL, false, false>;
}
// pick<S, NOM, PAIRS>(args...) for the runtime nom and pairs.
#define FA_PICK_NP(pick, nom, pairs, ...)                                                               \
  ((nom) ? ((pairs) ? pick<S, true, true>(__VA_ARGS__) : pick<S, true, false>(__VA_ARGS__))          \
         : ((pairs) ? pick<S, false, true>(__VA_ARGS__) : pick<S, false, false>(__VA_ARGS__)))

template <class S, class G>
static FusedFn pick_rl_fused(bool transfer, bool read) {
  if (!transfer) return &rl_hold_fused<S, G>;
  return read ? &rl_fused<S, G, true> : &rl_fused<S, G, false>;
}
template <class S, class G>
static FusedFn pick_rl2_fused(bool read, bool ema) {
  if (ema) return read ? &rl2_fused<S, G, true, true> : &rl2_fused<S, G, false, true>;
  return read ? &rl2_fused<S, G, true, false> : &rl2_fused<S, G, false, false>;
}

// ----- one thread's run of blocks ----------------------------------------------------------
// The streams a step draws (SPEC section 4; a stream it does not need is not drawn) and the
// d2d parameters of the arrays it writes.
struct BlockPlan {
  bool pairs = false;      // stream 1: the first write has an excess
  bool u_w = false;        // stream 2: W is rounded stochastically (rl transfer; rl2 "ema")
  bool c2c_first = false;  // stream 3: c2c noise of the first array
  bool read = false;       // stream 4: read noise of P
  bool c2c_w = false;      // stream 5: c2c noise of W in rl/rl2
  bool d2d_first = false;
  bool d2d_w = false;  // rl/rl2: W's parameters vary and W is written
};

// Elements of the block starting at element b of a tensor (global index offset + b): up to
// the next multiple of kBlock of the global index, or to `end`.
static FA_INLINE int block_len(int64_t offset, int64_t b, int64_t end) {
  const int64_t g = offset + b;
  return static_cast<int>(std::min<int64_t>(end - b, kBlock - g % kBlock));
}

static FA_INLINE int padded(int n) { return (n + kLanes - 1) / kLanes * kLanes; }

// Whether elements b .. b+n-1 of an array of 16- or 32-bit floats are +-0 throughout (raw
// bits; NaN and Inf are not zero). One OR over the block's bits, sign masked at the end: a
// reduction without exits, which the compiler vectorises (the block is at most kBlock
// elements, and a block that is not quiet is read next anyway). An exit at the first nonzero
// 64 bytes, as before, kept the loop scalar: three instructions an element, the most of the
// time asgd spent in the zero blocks of a fresh ResNet's gradients.
template <class U>
static FA_INLINE bool zero_bits(const void* x, int64_t b, int n) {
  constexpr U kMagnitude = static_cast<U>(~U(0) >> 1);
  const U* __restrict__ p = static_cast<const U*>(x) + b;
  U acc = 0;
  for (int j = 0; j < n; ++j) acc |= p[j];
  return (acc & kMagnitude) == 0;
}

// Whether the first write sends no pulse to elements b .. b+n-1 whatever its rounding
// uniforms are: the gradient is zero there (N = floor(0) + (u < 0) = 0) and so is A where
// the write has an excess (no pairs). block_draws then does not draw those uniforms: the
// streams are counter-based, so no other element's numbers change.
template <class G>
static FA_INLINE bool quiet_block(const StepArgs& a, bool pairs, int64_t b, int n) {
  using T = typename G::T;
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "a gradient element is 16 or 32 bits");
  const bool zero_g = sizeof(T) == 4 ? zero_bits<uint32_t>(a.g, b, n) : zero_bits<uint16_t>(a.g, b, n);
  if (!zero_g || !pairs) return zero_g;
  return a.a_storage == kBF16 || a.a_storage == kF16 ? zero_bits<uint16_t>(a.A, b, n) : zero_bits<uint32_t>(a.A, b, n);
}

// Whether a write of no pulse leaves elements b .. b+n-1 of X bit for bit as they are, on the
// one-pass paths (linear, or power on a nominal device), where that write is
// clamp(x + 0, lo, hi): each element in [lo, hi] (so not NaN) and none -0 (-0 + 0 is +0).
template <class S>
static FA_INLINE bool kept_without_pulses(const void* X, int64_t b, int n, const Elem& e) {
  const typename S::T* x = static_cast<const typename S::T*>(X) + b;
  int kept = 1;
  for (int j = 0; j < n; ++j) {
    const float v = S::load(x[j]);
    kept &= static_cast<int>(v >= e.lo) & static_cast<int>(v <= e.hi) & static_cast<int>(float_to_bits(v) != 0x80000000u);
  }
  return kept != 0;
}

// quiet: the first write sends no pulse in the block (quiet_block); its uniforms are not drawn.
static void block_draws(const StepArgs& a, const BlockPlan& plan, const Device& dev_first, ParamBlock& p_first, int64_t b, int n,
                        Scratch& s, bool quiet) {
  const uint64_t g = static_cast<uint64_t>(a.offset + b);
  s.u0 = quiet ? s.zeros : stream_uniforms(stream_key(a.key, kStreamRoundFirst), g, n, s.r_round);
  if (plan.pairs) s.u_pair = quiet ? s.zeros : stream_uniforms(stream_key(a.key, kStreamPairsFirst), g, n, s.r_pairs);
  if (plan.u_w) s.u1 = stream_uniforms(stream_key(a.key, kStreamRoundW), g, n, s.r_w);
  if (plan.c2c_first) s.n_c2c = stream_normals(stream_key(a.key, kStreamC2CFirst), g, n, s.r_c2c, s.t);
  if (plan.read) s.n_read = stream_normals(stream_key(a.key, kStreamReadP), g, n, s.r_read, s.t);
  if (plan.c2c_w) s.z_w = stream_normals(stream_key(a.key, kStreamC2CW), g, n, s.r_c2c_w, s.t);
  const int nv = padded(n);
  if (plan.d2d_first) d2d_params_block(dev_first, g, nv, p_first, s);
  if (plan.d2d_w) d2d_params_block(a.dev_w, g, nv, s.pw, s);
}

// The responses of the block's first write (after seg_first) and its c2c sd; returns the
// shape (of the up pulses with pairs; s.first.shape_down then holds the down one).
static const float* first_responses(const Device& dev, const ParamBlock& p, const BlockPlan& plan, int nv, Scratch& s) {
  WriteBlock& f = s.first;
  const float* shape;
  if (plan.pairs) {
    shape = response_shape(dev, p, f.up, f.u, f.w, f.shape, +1, nv, s);
    f.shape_down = response_shape(dev, p, f.down, f.u_down, f.w, f.shape_dn, -1, nv, s);
  } else {
    shape = response_shape(dev, p, f.count, f.u, f.w, f.shape, 0, nv, s);
  }
  if (plan.c2c_first) c2c_sd(f, p, shape, f.shape_down, plan.pairs, nv, s.t[0]);
  return shape;
}

// The response of W's transfer write and its c2c sd.
static const float* w_responses(const Device& dev, const BlockPlan& plan, int nv, Scratch& s) {
  WriteBlock& sec = s.second;
  const float* shape = response_shape(dev, s.pw, sec.count, sec.u, sec.w, sec.shape, 0, nv, s);
  if (plan.c2c_w) c2c_sd(sec, s.pw, shape, nullptr, false, nv, s.t[0]);
  return shape;
}

// The first write's pulses of a block: per element, pairs, and/or the total.
static void report_first(const StepArgs& a, const BlockPlan& plan, int64_t& acc, int64_t b, int n, const WriteBlock& f) {
  if (plan.pairs)
    write_pulses_pairs(a.pulses_first, a.pairs_first, a.total_first != nullptr, acc, b, n, f.up, f.down);
  else
    write_pulses(a.pulses_first, a.total_first != nullptr, acc, b, n, f.count);
}

template <class S, class G>
static void asgd_range(const StepArgs& a, int64_t begin, int64_t end, void* scratch) {
  int64_t acc_first = 0, acc_main = 0;
  Scratch& s = *static_cast<Scratch*>(scratch);
  const Device& dw = a.dev_w;
  if (!dw.d2d()) fill_nominal(dw, s.pw);
  BlockPlan plan;
  plan.pairs = a.A != nullptr;
  plan.c2c_first = dw.c2c();
  plan.d2d_first = dw.d2d();
  const bool nom = !dw.d2d();
  const SegFn first_fn = pick_first<S, G, false>(nom, plan.pairs);
  const SegFn last = FA_PICK_NP(pick_asgd_last, nom, plan.pairs, dw.c2c());
  bool fused = !plan.pairs && fusable(dw);
  FusedFn fused_fn = &asgd_fused<S, G>;
  [[maybe_unused]] bool fused_pairs = false;
#if FA_ISA_AVX2
  if constexpr (std::is_same_v<S, StoreF32> && std::is_same_v<G, StoreF32>) {
    if (!plan.pairs && power_fusable(dw)) {
      fused = true;
      fused_fn = &asgd_power_fused<VPower, false>;
    }
    fused_pairs = plan.pairs && power_fusable(dw);
  }
#endif
  const Elem ew = nominal_elem(dw);
  int n = 0;
  for (int64_t b = begin; b < end; b += n) {
    n = block_len(a.offset, b, end);
    const int nv = padded(n);
    const bool quiet = quiet_block<G>(a, plan.pairs, b, n);
    if (quiet && (fused || fused_pairs) && kept_without_pulses<S>(a.W, b, n, ew)) {
      // No pulse, and the write would store W as it is: nothing drawn or stored (W and g
      // read, of the 12 bytes per element that a write moves).
      write_no_pulses(a.pulses_first, plan.pairs ? a.pairs_first : nullptr, b, n);
      continue;
    }
    block_draws(a, plan, dw, s.pw, b, n, s, quiet);
    if (fused) {
      fused_fn(a, b, n, s, ew, ew);
      write_pulses(a.pulses_first, a.total_first != nullptr, acc_first, b, n, s.first.count);
      continue;
    }
    if (plan.pairs) s.av = excess_f32(a, b, n, s.a32);
#if FA_ISA_AVX2
    if (fused_pairs) {
      asgd_power_fused<VPower, true>(a, b, n, s, ew, ew);
      write_pulses_pairs(a.pulses_first, a.pairs_first, a.total_first != nullptr, acc_first, b, n, s.first.up, s.first.down);
      continue;
    }
#endif
    first_fn(a, b, n, s, nullptr);
    const float* shape = first_responses(dw, s.pw, plan, nv, s);
    last(a, b, n, s, shape);
    report_first(a, plan, acc_first, b, n, s.first);
  }
  add_total(a.total_first, acc_first);
  add_total(a.total_main, acc_main);
}

template <class S, class G>
static void rl_range(const StepArgs& a, int64_t begin, int64_t end, void* scratch) {
  int64_t acc_first = 0, acc_main = 0;
  Scratch& s = *static_cast<Scratch*>(scratch);
  const Device& dw = a.dev_w;
  const Device& dp = a.dev_p;
  if (!dw.d2d()) fill_nominal(dw, s.pw);
  if (!dp.d2d()) fill_nominal(dp, s.pp);
  BlockPlan plan;
  plan.pairs = a.A != nullptr;
  plan.u_w = a.transfer;
  plan.read = a.transfer && a.read_noise > 0.f;
  plan.c2c_first = dp.c2c();
  plan.c2c_w = a.transfer && dw.c2c();
  plan.d2d_first = dp.d2d();
  plan.d2d_w = a.transfer && dw.d2d();
  const bool nom = !dw.d2d() && !dp.d2d();
  const SegFn first_fn = pick_first<S, G, true>(nom, plan.pairs);
  const SegFn mid = a.transfer ? FA_PICK_NP(pick_rl_mid, nom, plan.pairs, dp.c2c(), plan.read)
                               : FA_PICK_NP(pick_rl_hold, nom, plan.pairs, dp.c2c());
  const SegFn last = nom ? pick_rl_last<S, true>(plan.c2c_w) : pick_rl_last<S, false>(plan.c2c_w);
  bool fused = !plan.pairs && fusable(dp) && (!a.transfer || fusable(dw));
  FusedFn fused_fn = pick_rl_fused<S, G>(a.transfer, plan.read);
  [[maybe_unused]] FusedFn fused_pairs = nullptr;
#if FA_ISA_AVX2
  if constexpr (std::is_same_v<S, StoreF32> && std::is_same_v<G, StoreF32>) {
    if (power_fusable(dp) && (!a.transfer || power_fusable(dw))) {
      if (plan.pairs) {
        fused_pairs = pick_rl_power_fused<true>(a.transfer, plan.read);
      } else {
        fused = true;
        fused_fn = pick_rl_power_fused<false>(a.transfer, plan.read);
      }
    }
  }
#endif
  const Elem ew = nominal_elem(dw), ep = nominal_elem(dp);
  int n = 0;
  for (int64_t b = begin; b < end; b += n) {
    n = block_len(a.offset, b, end);
    const int nv = padded(n);
    block_draws(a, plan, dp, s.pp, b, n, s, quiet_block<G>(a, plan.pairs, b, n));
    if (fused) {
      fused_fn(a, b, n, s, ew, ep);
      write_pulses(a.pulses_first, a.total_first != nullptr, acc_first, b, n, s.first.count);
      if (a.transfer) write_pulses(a.pulses_main, a.total_main != nullptr, acc_main, b, n, s.second.count);
      continue;
    }
    if (plan.pairs) s.av = excess_f32(a, b, n, s.a32);
    if (fused_pairs != nullptr) {
      fused_pairs(a, b, n, s, ew, ep);
      write_pulses_pairs(a.pulses_first, a.pairs_first, a.total_first != nullptr, acc_first, b, n, s.first.up, s.first.down);
      if (a.transfer) write_pulses(a.pulses_main, a.total_main != nullptr, acc_main, b, n, s.second.count);
      continue;
    }
    first_fn(a, b, n, s, nullptr);
    const float* shape_p = first_responses(dp, s.pp, plan, nv, s);
    mid(a, b, n, s, shape_p);
    report_first(a, plan, acc_first, b, n, s.first);
    if (a.transfer) {
      const float* shape_w = w_responses(dw, plan, nv, s);
      last(a, b, n, s, shape_w);
      write_pulses(a.pulses_main, a.total_main != nullptr, acc_main, b, n, s.second.count);
    }
  }
  add_total(a.total_first, acc_first);
  add_total(a.total_main, acc_main);
}

template <class S, class G>
static void rl2_range(const StepArgs& a, int64_t begin, int64_t end, void* scratch) {
  int64_t acc_first = 0, acc_main = 0;
  Scratch& s = *static_cast<Scratch*>(scratch);
  const Device& dw = a.dev_w;
  const Device& dp = a.dev_p;
  if (!dw.d2d()) fill_nominal(dw, s.pw);
  if (!dp.d2d()) fill_nominal(dp, s.pp);
  BlockPlan plan;
  plan.pairs = a.A != nullptr;
  plan.u_w = a.ema;
  plan.read = a.read_noise > 0.f;
  plan.c2c_first = dp.c2c();
  plan.c2c_w = dw.c2c();
  plan.d2d_first = dp.d2d();
  plan.d2d_w = dw.d2d();
  const bool nom = !dw.d2d() && !dp.d2d();
  const SegFn first_fn = pick_first<S, G, true>(nom, plan.pairs);
  const SegFn mid = FA_PICK_NP(pick_rl2_mid, nom, plan.pairs, dp.c2c(), plan.read, a.ema);
  const SegFn last = nom ? pick_rl2_last<S, true>(dw.c2c(), a.ema) : pick_rl2_last<S, false>(dw.c2c(), a.ema);
  bool fused = !plan.pairs && fusable(dp) && fusable(dw);
  FusedFn fused_fn = pick_rl2_fused<S, G>(plan.read, a.ema);
  [[maybe_unused]] FusedFn fused_pairs = nullptr;
#if FA_ISA_AVX2
  if constexpr (std::is_same_v<S, StoreF32> && std::is_same_v<G, StoreF32>) {
    if (!plan.pairs && power_fusable(dp) && power_fusable(dw)) {
      fused = true;
      fused_fn = pick_rl2_power_fused<false>(plan.read, a.ema);
    }
    if (plan.pairs && power_fusable(dp) && power_fusable(dw)) {
      fused_pairs = pick_rl2_power_fused<true>(plan.read, a.ema);
    }
  }
#endif
  const Elem ew = nominal_elem(dw), ep = nominal_elem(dp);
  int n = 0;
  for (int64_t b = begin; b < end; b += n) {
    n = block_len(a.offset, b, end);
    const int nv = padded(n);
    block_draws(a, plan, dp, s.pp, b, n, s, quiet_block<G>(a, plan.pairs, b, n));
    if (fused) {
      fused_fn(a, b, n, s, ew, ep);
      write_pulses(a.pulses_first, a.total_first != nullptr, acc_first, b, n, s.first.count);
      write_pulses(a.pulses_main, a.total_main != nullptr, acc_main, b, n, s.second.count);
      continue;
    }
    if (plan.pairs) s.av = excess_f32(a, b, n, s.a32);
    if (fused_pairs != nullptr) {
      fused_pairs(a, b, n, s, ew, ep);
      write_pulses_pairs(a.pulses_first, a.pairs_first, a.total_first != nullptr, acc_first, b, n, s.first.up, s.first.down);
      write_pulses(a.pulses_main, a.total_main != nullptr, acc_main, b, n, s.second.count);
      continue;
    }
    first_fn(a, b, n, s, nullptr);
    const float* shape_p = first_responses(dp, s.pp, plan, nv, s);
    mid(a, b, n, s, shape_p);
    const float* shape_w = w_responses(dw, plan, nv, s);
    last(a, b, n, s, shape_w);
    report_first(a, plan, acc_first, b, n, s.first);
    write_pulses(a.pulses_main, a.total_main != nullptr, acc_main, b, n, s.second.count);
  }
  add_total(a.total_first, acc_first);
  add_total(a.total_main, acc_main);
}
#undef FA_PICK_NP

template <class S, class G>
static RangeFn range_for(int algorithm) {
  switch (algorithm) {
    case kAsgd:
      return &asgd_range<S, G>;
    case kRl:
      return &rl_range<S, G>;
    default:
      return &rl2_range<S, G>;
  }
}

// Bytes of this instruction set's Scratch (run_parallel allocates it).
static size_t scratch_size() { return sizeof(Scratch); }

// The run-of-blocks function for an algorithm, storage dtype and gradient dtype (float32,
// or the storage dtype).
static RangeFn range_fn(int algorithm, int storage, bool g_is_f32) {
  switch (storage) {
    case kBF16:
      return g_is_f32 ? range_for<StoreBF16, StoreF32>(algorithm) : range_for<StoreBF16, StoreBF16>(algorithm);
    case kF16:
      return g_is_f32 ? range_for<StoreF16, StoreF32>(algorithm) : range_for<StoreF16, StoreF16>(algorithm);
    default:
      return range_for<StoreF32, StoreF32>(algorithm);
  }
}

#endif  // FA_ISA_BODY
