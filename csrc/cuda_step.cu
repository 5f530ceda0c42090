// The CUDA C++ backend: one multi-tensor launch steps every tensor of a (device, dtype) group.
//
// The per-element rule is csrc/update_math.h (shared with the CPU backend). The launcher reads
// the same device-side table as the Triton backend (fastopt/backends/triton_backend.py):
//
//   ptrs[t * na + a]   address of array a (param, grad, state roles, ...) of tensor t
//   sizes[t]           its element count
//   chunks[2 c + 0/1]  block c steps elements [start, start + chunk) of tensor t
//
// so every block does the same amount of work however uneven the tensors are, and indices are
// int64 (tensors over 2^31 elements are fine).
//
// Dispatch: a kernel is templated on the packed switches (update_math.h's SwitchShift), so the
// element loop has no branches on them. Only canonical codes are compiled: maximize, the
// gradient scale and decoupled decay are folded into the scalars with exact arithmetic
// (x * 1 == x, x * -s == -(x * s)), and SUM and MEAN denominators share one kernel (they
// differ only in scalars). L2 weight decay is a run-time flag: the kernel forms the rule's
// first line, g * s + p * wd, itself and runs the rule with a scale of 1 (exact) and no L2.
// Storage dtypes are run-time values too: a warp-uniform branch per access costs nothing next
// to the memory traffic. That leaves under two hundred kernels.
#if defined(FASTOPT_CUDA_EMULATION)
#include "cuda_emulation.h"  // the CPU stand-ins of a test build (see that header)
#else
#include <cuda_runtime.h>
// A kernel launch; _SYNCED marks kernels whose threads synchronize (the emulation runs
// those threads concurrently, the others one after another).
#define FASTOPT_LAUNCH(kernel, blocks, threads, stream) kernel<<<blocks, threads, 0, stream>>>
#define FASTOPT_LAUNCH_SYNCED(kernel, blocks, threads, stream) kernel<<<blocks, threads, 0, stream>>>
#endif

#include <cstdint>
#include <utility>

#include "update_math.h"

#ifndef FASTOPT_SHARDS
#define FASTOPT_SHARDS 1
#define FASTOPT_SHARD 0
#endif

namespace fastopt {
namespace cuda {

// Storage dtype codes (fastopt/backends/cuda_backend.py uses the same numbers).
enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };
// Slots of the optional arrays, in the order of the `slots` argument of launch_step.
enum Slot : int { H = 0, M, V, VMAX, GAVG, U, MASTER, NUM_SLOTS };

namespace detail {

struct StepArgs {
  const int64_t* ptrs;
  const int64_t* sizes;
  const int64_t* chunks;
  int na;
  int slot[NUM_SLOTS];  // column of each optional array in ptrs, or -1
  int dt_p, dt_g, dt_s;
  int aligned;  // every address is 16-byte aligned: vector accesses
  int maximize, decoupled;  // folded into device scalars (host scalars arrive folded)
  int has_l2;  // g = g * grad_scale + p * weight_decay before the rule
  int64_t chunk;
  MathScalars<float> scalars;
  const double* device_scalars;  // or null: StepScalars fields, then the rounding seed
  const float* inv_scale;  // or null: multiplies the gradients
  const float* found_inf;  // or null: nonzero skips the step
  const float* unscale;  // or null: each gradient is stored back times it (AMP's p.grad)
  uint64_t seed;  // nonzero: stochastic rounding of bf16 state
};

struct NormArgs {
  const int64_t* ptrs;
  const int64_t* sizes;
  const int64_t* chunks;
  int64_t n_chunks, chunk;
  int dt;
  float* partials;
  unsigned* counter;
  float* out;
};

using KernelFn = void (*)(const StepArgs);

// Kernels by index into the canonical code list. Each shard fills its own entries when the
// library is loaded (constant zero-initialization comes before any such code runs).
extern KernelFn g_kernels[512];

}  // namespace detail

namespace {

using detail::KernelFn;
using detail::NormArgs;
using detail::StepArgs;

constexpr int kThreads = 256;
constexpr int kVec = 4;  // elements per thread and access: 16 bytes of fp32

// ---- canonical switch codes ------------------------------------------------------------

FASTOPT_HD constexpr uint32_t field(uint32_t code, int shift) { return static_cast<uint32_t>(switch_field(code, shift)); }

// Adam-shaped switches: the only ones a spec (RAdam) runs without its denominator.
FASTOPT_HD constexpr bool radam_shaped(uint32_t c) {
  return field(c, SHIFT_MOMENTUM) == MOMENTUM_CLASSICAL && field(c, SHIFT_MOMENTUM_INPUT) == INPUT_UNSCALED &&
         field(c, SHIFT_DENOMINATOR) == 1 && field(c, SHIFT_NORM) == NORM_L2 && !field(c, SHIFT_EPS_INSIDE) &&
         !field(c, SHIFT_CENTERED) && !field(c, SHIFT_AMSGRAD) && !field(c, SHIFT_ADADELTA);
}

constexpr bool canonical(uint32_t c) {
  const uint32_t mom = field(c, SHIFT_MOMENTUM), in = field(c, SHIFT_MOMENTUM_INPUT);
  const uint32_t den = field(c, SHIFT_DENOMINATOR), norm = field(c, SHIFT_NORM);
  const bool eps = field(c, SHIFT_EPS_INSIDE), cen = field(c, SHIFT_CENTERED);
  const bool ams = field(c, SHIFT_AMSGRAD), hvp = field(c, SHIFT_HVP), ada = field(c, SHIFT_ADADELTA);
  const bool use = field(c, SHIFT_USE_DENOMINATOR);
  if (!field(c, SHIFT_DECOUPLED) || field(c, SHIFT_MAXIMIZE) || !field(c, SHIFT_SCALE_GRAD)) return false;
  if (field(c, SHIFT_HAS_L2)) return false;
  if (mom > 2 || in > 2 || den > 1 || norm < 1 || norm > 3) return false;
  if (mom == 0 && in != 0) return false;
  if (in == INPUT_PRECONDITIONED && den == 0) return false;
  if (den == 0) return norm == NORM_L2 && !eps && !cen && !ams && !hvp && !ada && !use;
  if (cen && norm != NORM_L2) return false;
  if (eps && norm == NORM_L1) return false;
  if (ams && norm == NORM_LINF) return false;
  if (ada && (norm != NORM_L2 || mom != 0)) return false;
  // only RAdam leaves out its denominator (its first steps), and RAdam is Adam-shaped
  return use || radam_shaped(c);
}

struct Codes {
  uint32_t code[512];
  int n;
};

constexpr Codes make_codes() {
  Codes list{};
  const uint32_t fixed = (1u << SHIFT_DECOUPLED) | (1u << SHIFT_SCALE_GRAD);
  // Only the fields that vary, most significant outermost: the codes come out ascending.
  for (uint32_t flags = 0; flags < 64u; ++flags) {  // EPS_INSIDE .. USE_DENOMINATOR, bits 8 to 13
    for (uint32_t norm = 1; norm <= 3; ++norm) {
      for (uint32_t den = 0; den <= 1; ++den) {
        for (uint32_t in = 0; in <= 2; ++in) {
          for (uint32_t mom = 0; mom <= 2; ++mom) {
            const uint32_t c = fixed | (flags << SHIFT_EPS_INSIDE) | (norm << SHIFT_NORM) |
                               (den << SHIFT_DENOMINATOR) | (in << SHIFT_MOMENTUM_INPUT) | (mom << SHIFT_MOMENTUM);
            if (canonical(c)) list.code[list.n++] = c;
          }
        }
      }
    }
  }
  return list;
}

constexpr Codes kCodes = make_codes();
static_assert(kCodes.n > 0 && kCodes.n <= 512, "canonical switch codes");

int find_code(uint32_t code) {
  int lo = 0, hi = kCodes.n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (kCodes.code[mid] < code) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return (lo < kCodes.n && kCodes.code[lo] == code) ? lo : -1;
}

// ---- storage access --------------------------------------------------------------------

__device__ __forceinline__ float load1(const void* base, int dt, int64_t i) {
  if (dt == BF16) return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  if (dt == F16) return half_to_float(static_cast<const uint16_t*>(base)[i]);
  return static_cast<const float*>(base)[i];
}

// Four consecutive elements with one 16-byte (fp32) or 8-byte (16-bit) access; i % 4 == 0.
__device__ __forceinline__ void load4(const void* base, int dt, int64_t i, float out[kVec]) {
  if (dt == F32) {
    const float4 v = *reinterpret_cast<const float4*>(static_cast<const float*>(base) + i);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(base) + i);
    const uint16_t h[kVec] = {static_cast<uint16_t>(v.x), static_cast<uint16_t>(v.x >> 16),
                              static_cast<uint16_t>(v.y), static_cast<uint16_t>(v.y >> 16)};
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = dt == BF16 ? bf16_to_float(h[k]) : half_to_float(h[k]);
  }
}

// murmur3's 64-bit finalizer: a cheap counter-based hash, random enough for rounding.
__device__ __forceinline__ uint32_t mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

__device__ __forceinline__ uint16_t to16(float x, int dt) { return dt == BF16 ? float_to_bf16(x) : float_to_half(x); }

struct Rounding {
  uint64_t key;  // 0: round to nearest even
};

__device__ __forceinline__ void store1(void* base, int dt, int64_t i, float x, const Rounding& r, int role) {
  if (dt == F32) {
    static_cast<float*>(base)[i] = x;
  } else if (dt == BF16 && r.key != 0) {
    static_cast<uint16_t*>(base)[i] = bf16_stochastic(x, mix(r.key ^ (static_cast<uint64_t>(role) << 58) ^ i));
  } else {
    static_cast<uint16_t*>(base)[i] = to16(x, dt);
  }
}

__device__ __forceinline__ void store4(void* base, int dt, int64_t i, const float x[kVec], const Rounding& r,
                                       int role) {
  if (dt == F32) {
    *reinterpret_cast<float4*>(static_cast<float*>(base) + i) = make_float4(x[0], x[1], x[2], x[3]);
    return;
  }
  uint16_t h[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    h[k] = (dt == BF16 && r.key != 0)
               ? bf16_stochastic(x[k], mix(r.key ^ (static_cast<uint64_t>(role) << 58) ^ (i + k)))
               : to16(x[k], dt);
  }
  *reinterpret_cast<uint2*>(static_cast<uint16_t*>(base) + i) =
      make_uint2(h[0] | (static_cast<uint32_t>(h[1]) << 16), h[2] | (static_cast<uint32_t>(h[3]) << 16));
}

// n elements from i: one vector access when whole, else one by one (n < 4 at a tensor's end;
// the remaining lanes get zeros, which the rule may turn into anything, and are not stored).
__device__ __forceinline__ void load(const void* base, int dt, int64_t i, int n, bool whole, float out[kVec]) {
  if (whole) {
    load4(base, dt, i, out);
    return;
  }
#pragma unroll
  for (int k = 0; k < kVec; ++k) out[k] = k < n ? load1(base, dt, i + k) : 0.0f;
}

__device__ __forceinline__ void store(void* base, int dt, int64_t i, int n, bool whole, const float x[kVec],
                                      const Rounding& r, int role) {
  if (whole) {
    store4(base, dt, i, x, r, role);
    return;
  }
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    if (k < n) store1(base, dt, i + k, x[k], r, role);
  }
}

// ---- the step kernel -------------------------------------------------------------------

template <uint32_t SW>
__device__ __forceinline__ void rule(float& p, float g, float h, float& m, float& v, float& vmax, float& gavg,
                                     float& u, const MathScalars<float>& sc, bool use_denominator) {
  if constexpr (radam_shaped(SW) && field(SW, SHIFT_USE_DENOMINATOR) != 0) {
    // RAdam with device scalars (a CUDA graph): the rectified form switches on at run time
    if (!use_denominator) {
      update_packed<float, SW & ~(1u << SHIFT_USE_DENOMINATOR)>(p, g, h, m, v, vmax, gavg, u, sc);
      return;
    }
  }
  update_packed<float, SW>(p, g, h, m, v, vmax, gavg, u, sc);
}

template <uint32_t SW>
__global__ void __launch_bounds__(kThreads) step_kernel(const StepArgs a) {
  constexpr bool MOM = field(SW, SHIFT_MOMENTUM) != 0;
  constexpr bool DEN = field(SW, SHIFT_DENOMINATOR) != 0;
  constexpr bool AMS = DEN && field(SW, SHIFT_AMSGRAD) != 0;
  constexpr bool CEN = DEN && field(SW, SHIFT_CENTERED) != 0;
  constexpr bool HVP = field(SW, SHIFT_HVP) != 0;
  constexpr bool ADA = field(SW, SHIFT_ADADELTA) != 0;

  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // skipped AMP step: no host sync
  const int64_t c = blockIdx.x;
  const int64_t t = a.chunks[2 * c];
  const int64_t start = a.chunks[2 * c + 1];
  const int64_t size = a.sizes[t];
  const int64_t stop = size < start + a.chunk ? size : start + a.chunk;

  MathScalars<float> sc = a.scalars;
  bool use_denominator = true;
  Rounding rnd{a.seed};
  if (a.device_scalars != nullptr) {
    const double* d = a.device_scalars;
    sc = MathScalars<float>{float(d[0]), float(d[1]), float(d[2]), float(d[3]),  float(d[4]),  float(d[5]),
                            float(d[6]), float(d[7]), float(d[8]), float(d[9]), float(d[10]), float(d[11])};
    if (a.maximize) sc.grad_scale = -sc.grad_scale;
    if (!a.decoupled) sc.decay_factor = 1.0f;
    use_denominator = d[12] != 0.0;
    // the key an eager launch gets for that seed (cuda_backend._rounding_key: 2 * seed + 1),
    // so that capturable=True rounds as capturable=False does
    if (rnd.key != 0) rnd.key = static_cast<uint64_t>(d[13]) * 2 + 1;
  }
  if (a.inv_scale != nullptr) sc.grad_scale *= *a.inv_scale;
  const float unscale = a.unscale != nullptr ? *a.unscale : 1.0f;
  MathScalars<float> rule_sc = sc;
  if (a.has_l2) rule_sc.grad_scale = 1.0f;  // applied below with the L2 term
  if (rnd.key != 0) rnd.key ^= static_cast<uint64_t>(t) << 40;

  const int64_t* row = a.ptrs + t * a.na;
  void* p = reinterpret_cast<void*>(row[0]);
  const void* g = reinterpret_cast<const void*>(row[1]);
  float* w = a.slot[MASTER] >= 0 ? reinterpret_cast<float*>(row[a.slot[MASTER]]) : nullptr;
  const void* h = HVP ? reinterpret_cast<const void*>(row[a.slot[H]]) : nullptr;
  void* m = MOM ? reinterpret_cast<void*>(row[a.slot[M]]) : nullptr;
  void* v = DEN ? reinterpret_cast<void*>(row[a.slot[V]]) : nullptr;
  void* vmax = AMS ? reinterpret_cast<void*>(row[a.slot[VMAX]]) : nullptr;
  void* gavg = CEN ? reinterpret_cast<void*>(row[a.slot[GAVG]]) : nullptr;
  void* u = ADA ? reinterpret_cast<void*>(row[a.slot[U]]) : nullptr;
  const int dp = w != nullptr ? F32 : a.dt_p, ds = a.dt_s, dg = a.dt_g;
  void* pw = w != nullptr ? static_cast<void*>(w) : p;
  void* g_out = a.unscale != nullptr ? const_cast<void*>(g) : nullptr;

  for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * kVec; i < stop;
       i += static_cast<int64_t>(blockDim.x) * kVec) {
    // four elements per thread: one vector access per array when aligned and whole,
    // element by element at the end of a tensor
    const bool whole = a.aligned && i + kVec <= stop;
    const int n = whole ? kVec : static_cast<int>(stop - i);
    float rp[kVec], rg[kVec], rh[kVec], rm[kVec], rv[kVec], rvm[kVec], rga[kVec], ru[kVec];
    load(pw, dp, i, n, whole, rp);
    load(g, dg, i, n, whole, rg);
    if constexpr (HVP) load(h, dg, i, n, whole, rh);
    if constexpr (MOM) load(m, ds, i, n, whole, rm);
    if constexpr (DEN) load(v, ds, i, n, whole, rv);
    if constexpr (AMS) load(vmax, ds, i, n, whole, rvm);
    if constexpr (CEN) load(gavg, ds, i, n, whole, rga);
    if constexpr (ADA) load(u, ds, i, n, whole, ru);
    if (g_out != nullptr) {  // read above, by this thread only: written back unscaled
      float rs[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) rs[k] = rg[k] * unscale;
      store(g_out, dg, i, n, whole, rs, Rounding{0}, 0);
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (a.has_l2) rg[k] = rg[k] * sc.grad_scale + rp[k] * sc.weight_decay;  // the rule's first lines
      rule<SW>(rp[k], rg[k], HVP ? rh[k] : rg[k], rm[k], rv[k], rvm[k], rga[k], ru[k], rule_sc, use_denominator);
    }
    store(pw, dp, i, n, whole, rp, Rounding{0}, 0);
    if (w != nullptr) store(p, a.dt_p, i, n, whole, rp, Rounding{0}, 0);
    if constexpr (MOM) store(m, ds, i, n, whole, rm, rnd, 1);
    if constexpr (DEN) store(v, ds, i, n, whole, rv, rnd, 2);
    if constexpr (AMS) store(vmax, ds, i, n, whole, rvm, rnd, 3);
    if constexpr (CEN) store(gavg, ds, i, n, whole, rga, rnd, 4);
    if constexpr (ADA) store(u, ds, i, n, whole, ru, rnd, 5);
  }
}

// This shard's kernels: every FASTOPT_SHARDS-th code from FASTOPT_SHARD (see build_cuda.py,
// which compiles shards in parallel; a plain nvcc build of this file is one shard of all).
template <std::size_t I>
KernelFn pick() {
  if constexpr (I % FASTOPT_SHARDS == FASTOPT_SHARD) {
    return &step_kernel<kCodes.code[I]>;
  } else {
    return nullptr;
  }
}

template <std::size_t... I>
bool register_kernels(std::index_sequence<I...>) {
  const KernelFn mine[] = {pick<I>()...};
  for (std::size_t k = 0; k < sizeof...(I); ++k) {
    if (mine[k] != nullptr) detail::g_kernels[k] = mine[k];
  }
  return true;
}

[[maybe_unused]] const bool kRegistered = register_kernels(std::make_index_sequence<static_cast<std::size_t>(kCodes.n)>());

#if FASTOPT_SHARD == 0
// ---- global L2 norm --------------------------------------------------------------------

__device__ __forceinline__ float block_sum(float x) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_down_sync(0xffffffffu, x, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = x;
  __syncthreads();
  x = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0f;
  if (threadIdx.x < 32) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) x += __shfl_down_sync(0xffffffffu, x, o);
  }
  return x;  // valid in thread 0
}

// Each block squares and sums its chunk; the last block to finish adds the partial sums in
// block order (deterministic) and writes the square root. `counter` is zero before and after.
__global__ void __launch_bounds__(kThreads) sumsq_kernel(const NormArgs a) {
  const int64_t c = blockIdx.x;
  const int64_t t = a.chunks[2 * c];
  const int64_t start = a.chunks[2 * c + 1];
  const int64_t size = a.sizes[t];
  const int64_t stop = size < start + a.chunk ? size : start + a.chunk;
  const void* x = reinterpret_cast<const void*>(a.ptrs[t]);
  float acc = 0.0f;
  for (int64_t i = start + threadIdx.x; i < stop; i += blockDim.x) {
    const float e = load1(x, a.dt, i);
    acc += e * e;
  }
  acc = block_sum(acc);
  __shared__ bool last;
  if (threadIdx.x == 0) {
    a.partials[c] = acc;
    __threadfence();  // the partial is visible device-wide before the counter says so
    last = atomicAdd(a.counter, 1u) == static_cast<unsigned>(a.n_chunks - 1);
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  float total = 0.0f;
  for (int64_t k = threadIdx.x; k < a.n_chunks; k += blockDim.x) total += a.partials[k];
  total = block_sum(total);
  if (threadIdx.x == 0) {
    *a.out = sqrtf(total);
    *a.counter = 0;  // ready for the next launch and for CUDA graph replays
  }
}

#endif  // FASTOPT_SHARD == 0

}  // namespace

#if FASTOPT_SHARD == 0
// ---- the interface used by csrc/cuda_bindings.cpp (plain arguments, no shared structs) ----

namespace detail {
KernelFn g_kernels[512] = {};
}  // namespace detail

namespace {
// cudaGetLastError() reports the last error of any runtime call on this thread, not only of
// the launch before it, and this module links its own copy of the runtime: an error left
// unread (a failed cudaSetDevice) would be reported by the next good launch. Errors are read
// where they happen, and a launch starts from none. A sticky error (a kernel fault) is not
// cleared by this and still comes back from the launch.
void clear_stale_error() { (void)cudaGetLastError(); }

const char* failed(cudaError_t err) {
  (void)cudaGetLastError();
  return cudaGetErrorString(err);
}
}  // namespace

int kernel_count() { return kCodes.n; }

uint32_t kernel_code(int i) { return (i >= 0 && i < kCodes.n) ? kCodes.code[i] : 0u; }

bool has_kernel(uint32_t code) { return find_code(code & ~(1u << SHIFT_HAS_L2)) >= 0; }

void dtype_codes(int* f32, int* bf16, int* f16) {
  *f32 = F32;
  *bf16 = BF16;
  *f16 = F16;
}

const char* launch_step(uint32_t code, const int64_t* ptrs, const int64_t* sizes, const int64_t* chunks,
                        int64_t n_chunks, int na, const int* slots, const int* dtypes, int aligned,
                        int64_t chunk, const double* host_scalars, const double* device_scalars,
                        const float* inv_scale, const float* found_inf, const float* unscale, int maximize,
                        int decoupled, uint64_t seed, void* stream) {
  const int at = find_code(code & ~(1u << SHIFT_HAS_L2));
  if (at < 0) return "no CUDA kernel is compiled for these switches";
  if (n_chunks <= 0) return nullptr;
  if (n_chunks > 0x7fffffffLL) return "too many chunks for one launch";
  StepArgs a{};
  a.ptrs = ptrs;
  a.sizes = sizes;
  a.chunks = chunks;
  a.na = na;
  for (int k = 0; k < NUM_SLOTS; ++k) a.slot[k] = slots[k];
  a.dt_p = dtypes[0];
  a.dt_g = dtypes[1];
  a.dt_s = dtypes[2];
  a.aligned = aligned;
  a.maximize = maximize;
  a.decoupled = decoupled;
  a.has_l2 = field(code, SHIFT_HAS_L2) != 0;
  a.chunk = chunk;
  const double* h = host_scalars;
  a.scalars = MathScalars<float>{float(h[0]), float(h[1]), float(h[2]),  float(h[3]),
                                 float(h[4]), float(h[5]), float(h[6]),  float(h[7]),
                                 float(h[8]), float(h[9]), float(h[10]), float(h[11])};
  a.device_scalars = device_scalars;
  a.inv_scale = inv_scale;
  a.found_inf = found_inf;
  a.unscale = unscale;
  a.seed = seed;
  const KernelFn fn = detail::g_kernels[at];
  if (fn == nullptr) return "a CUDA kernel shard is missing from this build";
  clear_stale_error();
  FASTOPT_LAUNCH(fn, static_cast<unsigned>(n_chunks), kThreads, static_cast<cudaStream_t>(stream))(a);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* launch_global_norm(const int64_t* ptrs, const int64_t* sizes, const int64_t* chunks,
                               int64_t n_chunks, int64_t chunk, int dtype, float* partials, unsigned* counter,
                               float* out, void* stream) {
  if (n_chunks <= 0) return nullptr;
  if (n_chunks > 0x7fffffffLL) return "too many chunks for one launch";
  const NormArgs a{ptrs, sizes, chunks, n_chunks, chunk, dtype, partials, counter, out};
  clear_stale_error();
  FASTOPT_LAUNCH_SYNCED(sumsq_kernel, static_cast<unsigned>(n_chunks), kThreads, static_cast<cudaStream_t>(stream))(a);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Makes `device` current; `previous`, when given, receives the device that was current.
const char* set_device(int device, int* previous) {
  if (previous != nullptr) {
    const cudaError_t got = cudaGetDevice(previous);
    if (got != cudaSuccess) return failed(got);
    if (*previous == device) return nullptr;
  }
  const cudaError_t err = cudaSetDevice(device);
  return err == cudaSuccess ? nullptr : failed(err);
}

#endif  // FASTOPT_SHARD == 0

}  // namespace cuda
}  // namespace fastopt
