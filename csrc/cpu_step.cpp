// CPU multi-tensor step: the rule kernels, storage conversions, threading and dispatch.
//
// This file is compiled once per instruction set (setup.py): every build defines the hot
// loops (rule kernels, bf16/fp16 conversions) in its own namespace FASTOPT_ISA_NS, and the
// baseline build (FASTOPT_MAIN=1) also holds the dispatcher, which picks the best build the
// CPU supports at load time. The ISA builds use no standard-library templates, so no inline
// code compiled for AVX2/AVX-512 can be shared with the baseline through the linker.
//
// The rule kernels of a build are split over FASTOPT_KERNEL_SHARDS objects, so that a build
// compiles in parallel on every core: the object of shard k (FASTOPT_KERNEL_SHARD) holds the
// kernels of the canonical codes whose index is k modulo the shard count, and shard 0 also
// holds the rest of its instruction set's build (and, in the baseline, the dispatcher).
//
// Dispatch: a rule kernel is templated on the packed switches, so its loop has no branches.
// Only canonical switch codes are instantiated (see kernel_valid): maximize, the gradient
// scale and decoupled decay are folded into scalars by exact arithmetic (x * 1 == x,
// x * -s == -(x * s)), switches a spec cannot reach are skipped; that leaves a few hundred
// kernels per math type (fp32, fp64, fp32 with bf16 state) instead of the full cross product.
//
// Threading: the concatenated elements of a group are cut into CHUNK-sized chunks, split
// into one contiguous lane per thread; threads steal from other lanes once theirs is done.
// Steps run on OpenMP when built with it (the runtime torch's CPU ops share), else on a
// thread pool of our own. bf16 state of fp32 params ("bf16 optimizer state") is converted
// in registers by its own kernels; other storage than the math type (bf16/fp16 params, an
// fp32 master with a low-precision param) goes through small fp32 buffers per block.
#include "cpu_step.h"

#include <cstddef>
#include <cstdint>
#include <utility>

#ifndef FASTOPT_ISA_NS
#define FASTOPT_ISA_NS isa_base
#endif
#ifndef FASTOPT_MAIN
#define FASTOPT_MAIN 1
#endif
#ifndef FASTOPT_KERNEL_SHARDS
#define FASTOPT_KERNEL_SHARDS 1
#endif
#ifndef FASTOPT_KERNEL_SHARD
#define FASTOPT_KERNEL_SHARD 0
#endif
#if FASTOPT_KERNEL_SHARDS < 1 || FASTOPT_KERNEL_SHARDS > 4 || FASTOPT_KERNEL_SHARD < 0 || \
    FASTOPT_KERNEL_SHARD >= FASTOPT_KERNEL_SHARDS
#error "FASTOPT_KERNEL_SHARDS: 1 to 4; FASTOPT_KERNEL_SHARD: 0 to FASTOPT_KERNEL_SHARDS - 1"
#endif
#if FASTOPT_MAIN && FASTOPT_KERNEL_SHARD != 0
#error "the dispatcher (FASTOPT_MAIN) belongs to shard 0"
#endif
#define FASTOPT_STR2(x) #x
#define FASTOPT_STR(x) FASTOPT_STR2(x)

namespace fastopt {
namespace cpu {

// Stochastic rounding of bf16 state in a kernel call; key 0 rounds to nearest even. A bf16
// rounding takes 16 random bits, so one hash serves two state roles: element i draws
// w_j = mix32(pair_key(key, j) ^ (first + i)) for j = 0, 1, 2, and the state role of rank s
// among those the rule stores (M, V, VMAX, GAVG, U, in that order) rounds with the low half
// of w_{s/2} when s is even, the high half when odd. Hashing is most of what stochastic
// rounding adds to rounding to nearest: a hash per role made Adam's bf16-state step 14-20%
// longer (2-core AMD EPYC, AVX2 build), where that step is bound by instructions, not memory.
struct Rounding {
  uint32_t key;
  uint32_t first;  // the low half of the index of the call's first element in its tensor
};

// A rule kernel: math type T, state stored as S (T, or bf16 bits for fp32 math).
template <typename T, typename S = T>
using KernelFn = void (*)(int64_t n, T* p, const T* g, const T* h, S* m, S* v, S* vmax, S* gavg, S* u,
                          const MathScalars<T>* sc, Rounding rnd);

// What one instruction-set build provides to the dispatcher.
struct IsaImpl {
  const char* name;
  KernelFn<float> (*find_f32)(uint32_t code);
  KernelFn<double> (*find_f64)(uint32_t code);
  KernelFn<float, uint16_t> (*find_f32_bf16_state)(uint32_t code);
  int (*kernel_count)();
  void (*to_float)(int dtype, const void* src, float* dst, int64_t n);
  void (*from_float)(int dtype, const float* src, void* dst, int64_t n);
  void (*to_bf16_stochastic)(const float* lo_src, uint16_t* lo_dst, const float* hi_src, uint16_t* hi_dst,
                             int64_t n, uint32_t key, int64_t first);
};

// Everything outside FASTOPT_ISA_NS has internal linkage, so that no ISA build's copy of it
// can stand in for another's.
namespace {

// Canonical switch codes: those a kernel is compiled for.
constexpr uint32_t field(uint32_t code, int shift) { return static_cast<uint32_t>(switch_field(code, shift)); }

// The rounding key of a tensor's pair j of state roles (see Rounding) from the tensor's.
constexpr uint32_t pair_key(uint32_t key, int j) { return key ^ (static_cast<uint32_t>(j) * 0x9e3779b9u); }

// The random bits of the state role of rank `rank` (see Rounding) from its pair's hash.
constexpr int rank_shift(int rank) { return 16 * (rank % 2); }

constexpr bool kernel_valid(uint32_t c) {
  const uint32_t mom = field(c, SHIFT_MOMENTUM), in = field(c, SHIFT_MOMENTUM_INPUT);
  const uint32_t den = field(c, SHIFT_DENOMINATOR), norm = field(c, SHIFT_NORM);
  const bool eps = field(c, SHIFT_EPS_INSIDE), cen = field(c, SHIFT_CENTERED);
  const bool ams = field(c, SHIFT_AMSGRAD), hvp = field(c, SHIFT_HVP), ada = field(c, SHIFT_ADADELTA);
  const bool use = field(c, SHIFT_USE_DENOMINATOR);
  if (mom > 2 || in > 2 || den > 1 || norm < 1 || norm > 3) return false;
  // folded into the scalars (canonicalize): always applied, with neutral values when off
  if (!field(c, SHIFT_DECOUPLED) || field(c, SHIFT_MAXIMIZE) || !field(c, SHIFT_SCALE_GRAD)) return false;
  if (mom == 0 && in != 0) return false;
  if (in == INPUT_PRECONDITIONED && den == 0) return false;
  if (den == 0) return norm == NORM_L2 && !eps && !cen && !ams && !hvp && !ada && !use;
  if (cen && norm != NORM_L2) return false;
  if (eps && norm == NORM_L1) return false;
  if (ams && norm == NORM_LINF) return false;
  if (ada && (norm != NORM_L2 || mom != 0)) return false;
  // only RAdam skips its denominator (early steps): Adam-shaped switches
  if (!use && !(mom == MOMENTUM_CLASSICAL && in == INPUT_UNSCALED && norm == NORM_L2 && !eps && !cen &&
                !ams && !ada))
    return false;
  return true;
}

struct CodeList {
  uint32_t code[1024];
  int n;
};

// Every canonical code, ascending (for binary search).
constexpr CodeList make_codes() {
  CodeList list{};
  // the varying fields: momentum, input, denominator, norm and seven flags
  for (uint32_t i = 0; i < 3u * 3u * 2u * 3u * 128u; ++i) {
    uint32_t r = i;
    const uint32_t mom = r % 3, in = (r / 3) % 3, den = (r / 9) % 2, norm = 1 + (r / 18) % 3;
    const uint32_t flags = r / 54;
    uint32_t c = (mom << SHIFT_MOMENTUM) | (in << SHIFT_MOMENTUM_INPUT) | (den << SHIFT_DENOMINATOR) |
                 (norm << SHIFT_NORM) | ((flags & 127u) << SHIFT_EPS_INSIDE) | (1u << SHIFT_DECOUPLED) |
                 (1u << SHIFT_SCALE_GRAD);
    if (kernel_valid(c)) list.code[list.n++] = c;
  }
  for (int a = 1; a < list.n; ++a) {  // insertion sort
    uint32_t x = list.code[a];
    int b = a - 1;
    while (b >= 0 && list.code[b] > x) {
      list.code[b + 1] = list.code[b];
      --b;
    }
    list.code[b + 1] = x;
  }
  return list;
}

constexpr CodeList kCodes = make_codes();
static_assert(kCodes.n > 0 && kCodes.n < 1024, "canonical switch codes");

[[maybe_unused]] int find_code(uint32_t code) {  // (used by shard 0 only)
  int lo = 0, hi = kCodes.n;
  while (lo < hi) {
    int mid = (lo + hi) / 2;
    if (kCodes.code[mid] < code) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return (lo < kCodes.n && kCodes.code[lo] == code) ? lo : -1;
}

}  // namespace

namespace FASTOPT_ISA_NS {

// ---- rule kernels ----------------------------------------------------------------------

// How state is stored: as the math type, or as bf16 (uint16_t) for fp32 math, converted
// in registers. Params, gradients and H u are always of the math type here.
// With SR (bf16 only) a store rounds stochastically with the low 16 of `bits`.
template <typename T, typename S>
struct State {
  static T load(const S* s, int64_t i) { return s[i]; }
  template <bool SR>
  static void store(S* s, int64_t i, T x, uint32_t) {
    s[i] = x;
  }
};

template <>
struct State<float, uint16_t> {
  static float load(const uint16_t* s, int64_t i) { return bf16_to_float(s[i]); }
  template <bool SR>
  static void store(uint16_t* s, int64_t i, float x, uint32_t bits) {
    if constexpr (SR) {
      s[i] = bf16_stochastic(x, bits);
    } else {
      s[i] = float_to_bf16(x);
    }
  }
};

// The random bits of the state role of rank R, from the element's pair hashes w0, w1, w2.
template <int R>
FASTOPT_INLINE uint32_t rank_bits(uint32_t w0, uint32_t w1, uint32_t w2) {
  return (R < 2 ? w0 : (R < 4 ? w1 : w2)) >> rank_shift(R);
}

// One rule over n elements in place. Pointers of roles the switches do not use are never
// touched. `__restrict` lets the compiler vectorize without runtime alias checks: the roles
// are distinct tensors (h may equal g, both read-only). SR: the loop that rounds bf16 state
// stochastically, a loop of its own (a choice inside the loop kept it from vectorizing).
template <typename T, uint32_t SW, typename S, bool SR>
FASTOPT_INLINE void rule_loop(int64_t n, T* __restrict p, const T* __restrict g, const T* __restrict h,
                              S* __restrict m, S* __restrict v, S* __restrict vmax, S* __restrict gavg,
                              S* __restrict u, const MathScalars<T>& sc, Rounding rnd) {
  constexpr bool MOM = switch_field(SW, SHIFT_MOMENTUM) != 0;
  constexpr bool DEN = switch_field(SW, SHIFT_DENOMINATOR) != 0;
  constexpr bool AMS = DEN && switch_field(SW, SHIFT_AMSGRAD) != 0;
  constexpr bool CEN = DEN && switch_field(SW, SHIFT_CENTERED) != 0;
  constexpr bool HVP = switch_field(SW, SHIFT_HVP) != 0;
  constexpr bool ADA = switch_field(SW, SHIFT_ADADELTA) != 0;
  using St = State<T, S>;
  // the ranks of the stored state roles, and how many there are (see Rounding)
  constexpr int RM = 0, RV = RM + MOM, RX = RV + DEN, RA = RX + AMS, RU = RA + CEN, RANKS = RU + ADA;
  const uint32_t k0 = pair_key(rnd.key, 0), k1 = pair_key(rnd.key, 1), k2 = pair_key(rnd.key, 2);
  // a 32-bit counter of its own: derived from the 64-bit i, it cost a dozen vector
  // instructions per 16 elements
  uint32_t c = rnd.first;
  for (int64_t i = 0; i < n; ++i, ++c) {
    uint32_t w0 = 0, w1 = 0, w2 = 0;
    if constexpr (SR) {
      w0 = mix32(k0 ^ c);
      if constexpr (RANKS > 2) w1 = mix32(k1 ^ c);
      if constexpr (RANKS > 4) w2 = mix32(k2 ^ c);
    }
    T pi = p[i], hi = T(0), mi = T(0), vi = T(0), vmi = T(0), gai = T(0), ui = T(0);
    if constexpr (HVP) hi = h[i];
    if constexpr (MOM) mi = St::load(m, i);
    if constexpr (DEN) vi = St::load(v, i);
    if constexpr (AMS) vmi = St::load(vmax, i);
    if constexpr (CEN) gai = St::load(gavg, i);
    if constexpr (ADA) ui = St::load(u, i);
    update_packed<T, SW>(pi, g[i], hi, mi, vi, vmi, gai, ui, sc);
    p[i] = pi;
    if constexpr (MOM) St::template store<SR>(m, i, mi, rank_bits<RM>(w0, w1, w2));
    if constexpr (DEN) St::template store<SR>(v, i, vi, rank_bits<RV>(w0, w1, w2));
    if constexpr (AMS) St::template store<SR>(vmax, i, vmi, rank_bits<RX>(w0, w1, w2));
    if constexpr (CEN) St::template store<SR>(gavg, i, gai, rank_bits<RA>(w0, w1, w2));
    if constexpr (ADA) St::template store<SR>(u, i, ui, rank_bits<RU>(w0, w1, w2));
  }
}

template <typename T, uint32_t SW, typename S>
void kernel(int64_t n, T* p, const T* g, const T* h, S* m, S* v, S* vmax, S* gavg, S* u, const MathScalars<T>* scp,
            Rounding rnd) {
  const MathScalars<T> sc = *scp;  // a local copy: provably not aliased by the stores
  if constexpr (sizeof(S) == 2) {  // bf16 state: rounded stochastically where a key is given
    if (rnd.key != 0) {
      rule_loop<T, SW, S, true>(n, p, g, h, m, v, vmax, gavg, u, sc, rnd);
      return;
    }
  }
  rule_loop<T, SW, S, false>(n, p, g, h, m, v, vmax, gavg, u, sc, rnd);
}

// The kernels of one shard, by their index j there (code index shard + shards * j).
struct ShardKernels {
  const KernelFn<float>* f32;
  const KernelFn<double>* f64;
  const KernelFn<float, uint16_t>* f32_bf16_state;
};

template <int K>
const ShardKernels* shard_kernels();  // defined in the object of shard K

namespace {  // internal: each shard's tables have the same template arguments, other contents
template <typename T, typename S, std::size_t... J>
const KernelFn<T, S>* shard_table(std::index_sequence<J...>) {
  static const KernelFn<T, S> table[] = {
      &kernel<T, kCodes.code[FASTOPT_KERNEL_SHARD + FASTOPT_KERNEL_SHARDS * J], S>...};
  return table;
}
}  // namespace

template <>
const ShardKernels* shard_kernels<FASTOPT_KERNEL_SHARD>() {
  constexpr int size = (kCodes.n - FASTOPT_KERNEL_SHARD + FASTOPT_KERNEL_SHARDS - 1) / FASTOPT_KERNEL_SHARDS;
  constexpr auto mine = std::make_index_sequence<static_cast<std::size_t>(size)>();
  static const ShardKernels kernels = {shard_table<float, float>(mine), shard_table<double, double>(mine),
                                       shard_table<float, uint16_t>(mine)};
  return &kernels;
}

#if FASTOPT_KERNEL_SHARD == 0
// the other shards' kernels, defined in their objects
#if FASTOPT_KERNEL_SHARDS > 1
template <>
const ShardKernels* shard_kernels<1>();
#endif
#if FASTOPT_KERNEL_SHARDS > 2
template <>
const ShardKernels* shard_kernels<2>();
#endif
#if FASTOPT_KERNEL_SHARDS > 3
template <>
const ShardKernels* shard_kernels<3>();
#endif

template <std::size_t... K>
const ShardKernels* shard_of(int k, std::index_sequence<K...>) {
  static const ShardKernels* const shards[] = {shard_kernels<static_cast<int>(K)>()...};
  return shards[k];
}

// The kernel of a canonical code (its table in the shard that holds it), or null.
template <typename T, typename S>
KernelFn<T, S> lookup(uint32_t code, const KernelFn<T, S>* ShardKernels::*table) {
  const int at = find_code(code);
  if (at < 0) return nullptr;
  const ShardKernels* shard =
      shard_of(at % FASTOPT_KERNEL_SHARDS, std::make_index_sequence<FASTOPT_KERNEL_SHARDS>());
  return (shard->*table)[at / FASTOPT_KERNEL_SHARDS];
}

KernelFn<float> find_f32(uint32_t code) { return lookup(code, &ShardKernels::f32); }

KernelFn<double> find_f64(uint32_t code) { return lookup(code, &ShardKernels::f64); }

KernelFn<float, uint16_t> find_f32_bf16_state(uint32_t code) {
  return lookup(code, &ShardKernels::f32_bf16_state);
}

int count() { return kCodes.n; }

// ---- storage conversions ---------------------------------------------------------------

void to_float(int dtype, const void* src, float* __restrict dst, int64_t n) {
  if (dtype == BF16) {
    const uint16_t* __restrict s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
  } else if (dtype == F16) {
    const uint16_t* __restrict s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(s[i]);
  } else {
    const float* __restrict s = static_cast<const float*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = s[i];
  }
}

void from_float(int dtype, const float* __restrict src, void* dst, int64_t n) {
  if (dtype == BF16) {
    uint16_t* __restrict d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
  } else if (dtype == F16) {
    uint16_t* __restrict d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_half(src[i]);
  } else {
    float* __restrict d = static_cast<float*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = src[i];
  }
}

// bf16 with stochastic rounding of the two state roles of a pair (see Rounding), `lo` and
// `hi` (one of them may be null): element i's random bits hash `key` (the launch's seed, the
// tensor and the pair) with its index first + i in the tensor, so they do not depend on how
// the step is cut into chunks and threads. One hash rounds both roles' elements i.
void to_bf16_stochastic(const float* lo_src, uint16_t* lo_dst, const float* hi_src, uint16_t* hi_dst, int64_t n,
                        uint32_t key, int64_t first) {
  // 32-bit counters, so that the loops vectorize (the caller's key holds the high half)
  const uint32_t c0 = static_cast<uint32_t>(first);
  const float* __restrict a = lo_src;
  const float* __restrict b = hi_src;
  uint16_t* __restrict x = lo_dst;
  uint16_t* __restrict y = hi_dst;
  if (x != nullptr && y != nullptr) {
    uint32_t c = c0;
    for (int64_t i = 0; i < n; ++i, ++c) {
      const uint32_t w = mix32(key ^ c);
      x[i] = bf16_stochastic(a[i], w);
      y[i] = bf16_stochastic(b[i], w >> 16);
    }
  } else if (x != nullptr) {
    uint32_t c = c0;
    for (int64_t i = 0; i < n; ++i, ++c) x[i] = bf16_stochastic(a[i], mix32(key ^ c));
  } else if (y != nullptr) {
    uint32_t c = c0;
    for (int64_t i = 0; i < n; ++i, ++c) y[i] = bf16_stochastic(b[i], mix32(key ^ c) >> 16);
  }
}

const IsaImpl* impl() {
  static const IsaImpl table = {FASTOPT_STR(FASTOPT_ISA_NS), &find_f32, &find_f64, &find_f32_bf16_state,
                                &count, &to_float, &from_float, &to_bf16_stochastic};
  return &table;
}
#endif  // FASTOPT_KERNEL_SHARD == 0

}  // namespace FASTOPT_ISA_NS
}  // namespace cpu
}  // namespace fastopt


#if FASTOPT_MAIN
// ---- the dispatcher (baseline build only) ---------------------------------------------------

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fastopt {
namespace cpu {

#if defined(FASTOPT_HAVE_AVX2)
namespace isa_avx2 {
const IsaImpl* impl();
}
#endif
#if defined(FASTOPT_HAVE_AVX512)
namespace isa_avx512 {
const IsaImpl* impl();
}
#endif

namespace {

// ---- instruction set --------------------------------------------------------------------

bool cpu_has(const char* isa_name) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (std::strcmp(isa_name, "isa_avx2") == 0) return __builtin_cpu_supports("avx2");
  if (std::strcmp(isa_name, "isa_avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  return std::strcmp(isa_name, "isa_base") == 0;
}

// Builds in order of preference; the baseline always runs.
std::vector<const IsaImpl*> usable_isas() {
  std::vector<const IsaImpl*> all;
#if defined(FASTOPT_HAVE_AVX512)
  all.push_back(isa_avx512::impl());
#endif
#if defined(FASTOPT_HAVE_AVX2)
  all.push_back(isa_avx2::impl());
#endif
  all.push_back(isa_base::impl());
  std::vector<const IsaImpl*> usable;
  for (const IsaImpl* i : all)
    if (cpu_has(i->name)) usable.push_back(i);
  return usable;
}

std::atomic<const IsaImpl*> g_isa{nullptr};

const IsaImpl* current_isa() {
  const IsaImpl* isa = g_isa.load(std::memory_order_acquire);
  if (isa == nullptr) {
    isa = usable_isas().front();
    g_isa.store(isa, std::memory_order_release);
  }
  return isa;
}

// ---- thread pool ------------------------------------------------------------------------

// Persistent workers, woken per step. The tasks (chunks) are split into one contiguous lane
// per thread, so each thread streams through its own region of memory; a thread that
// finishes its lane helps with the others (claiming from the same per-lane counters), so a
// thread preempted on a busy machine does not hold up the step. Which thread runs a chunk
// never changes its arithmetic, so results do not depend on it.
class Pool {
 public:
  static constexpr int MAX_THREADS = 256;

  void run(int threads, int64_t tasks, const std::function<void(int64_t)>& fn) {
    std::lock_guard<std::mutex> one_run_at_a_time(run_mu_);
    const int64_t lanes = std::min<int64_t>(std::min(threads, MAX_THREADS), tasks);
    if (lanes <= 1) {
      for (int64_t i = 0; i < tasks; ++i) fn(i);
      return;
    }
    const int helpers = static_cast<int>(lanes) - 1;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (static_cast<int>(workers_.size()) < helpers) {
        const int index = static_cast<int>(workers_.size());
        workers_.emplace_back([this, index] { work(index); });
      }
      fn_ = &fn;
      lanes_ = static_cast<int>(lanes);
      for (int64_t l = 0; l < lanes; ++l) {
        next_[l].value.store(l * tasks / lanes, std::memory_order_relaxed);
        end_[l] = (l + 1) * tasks / lanes;
      }
      wanted_ = helpers;
      open_ = true;
      ++generation_;
    }
    wake_.notify_all();
    drain(0);
    // Every chunk is claimed: close the run, so helpers that have not woken up yet (on a
    // busy machine they may wait a whole time slice) skip it, and wait only for those
    // still running a chunk.
    std::unique_lock<std::mutex> lock(mu_);
    open_ = false;
    done_.wait(lock, [this] { return active_ == 0; });
    fn_ = nullptr;
  }

 private:
  // Own lane first, then the others' remainders.
  void drain(int lane) {
    for (int k = 0; k < lanes_; ++k) {
      const int l = (lane + k) % lanes_;
      for (int64_t i; (i = next_[l].value.fetch_add(1, std::memory_order_relaxed)) < end_[l];) (*fn_)(i);
    }
  }

  void work(int index) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= wanted_ || !open_) continue;  // not needed, or too late
        ++active_;
      }
      drain(index + 1);
      std::lock_guard<std::mutex> lock(mu_);
      if (--active_ == 0) done_.notify_one();
    }
  }

  struct alignas(64) Counter {  // one cache line each: lanes do not contend
    std::atomic<int64_t> value{0};
  };

  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  Counter next_[MAX_THREADS];
  int64_t end_[MAX_THREADS] = {};
  int lanes_ = 0;
  uint64_t generation_ = 0;
  int wanted_ = 0;
  int active_ = 0;     // helpers inside the current run
  bool open_ = false;  // whether helpers may still join the current run
};

// The pool is never destroyed: its workers block forever and die with the process, and a
// forked child (whose copy has no threads behind it) simply starts a new one.
std::atomic<Pool*> g_pool{nullptr};

#if defined(__unix__) || defined(__APPLE__)
void forget_pool_in_child() { g_pool.store(nullptr); }
#endif

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p == nullptr) {
#if defined(__unix__) || defined(__APPLE__)
    static const int registered = pthread_atfork(nullptr, nullptr, &forget_pool_in_child);
    (void)registered;
#endif
    Pool* fresh = new Pool();
    if (g_pool.compare_exchange_strong(p, fresh)) {
      p = fresh;
    } else {
      delete fresh;
    }
  }
  return *p;
}

// Whether steps run on OpenMP (when compiled with it) or on Pool.
std::atomic<bool> g_use_openmp{
#if defined(_OPENMP)
    true
#else
    false
#endif
};

// Runs fn(0 .. tasks-1) on up to `threads` threads. With OpenMP this is the process's one
// OpenMP runtime, which torch's CPU ops use too (its wheel ships libgomp.so.1, which our
// libgomp.so.1 dependency resolves to): the step reuses the threads torch's last op left
// spinning instead of competing with them for the cores. Lanes and stealing as in Pool.
void parallel_chunks(int threads, int64_t tasks, const std::function<void(int64_t)>& fn) {
#if defined(_OPENMP)
  const int64_t lanes = std::min<int64_t>(std::min(threads, Pool::MAX_THREADS), tasks);
  if (lanes > 1 && g_use_openmp.load(std::memory_order_relaxed)) {
    struct alignas(64) Lane {
      std::atomic<int64_t> next;
      int64_t end;
    };
    std::vector<Lane> lane(static_cast<std::size_t>(lanes));
    for (int64_t l = 0; l < lanes; ++l) {
      lane[static_cast<std::size_t>(l)].next.store(l * tasks / lanes, std::memory_order_relaxed);
      lane[static_cast<std::size_t>(l)].end = (l + 1) * tasks / lanes;
    }
#pragma omp parallel num_threads(static_cast<int>(lanes))
    {
      // a smaller team than asked for (nested parallelism, limits) still finishes every lane
      const int64_t me = omp_get_thread_num();
      for (int64_t k = 0; k < lanes; ++k) {
        Lane& ln = lane[static_cast<std::size_t>((me + k) % lanes)];
        for (int64_t i; (i = ln.next.fetch_add(1, std::memory_order_relaxed)) < ln.end;) fn(i);
      }
    }
    return;
  }
#endif
  pool().run(threads, tasks, fn);
}

// ---- one step ---------------------------------------------------------------------------

constexpr int64_t BLOCK = 512;  // elements per conversion block (buffers stay in L1)
constexpr int KERNEL_ROLES[] = {P, G, H, M, V, VMAX, GAVG, U};
constexpr int STATE_ROLES[] = {M, V, VMAX, GAVG, U};  // in the order of their ranks (Rounding)

int64_t dtype_size(int dtype) { return dtype == F64 ? 8 : (dtype == F32 ? 4 : 2); }

// Maps switches to the canonical code a kernel exists for, folding maximize, the gradient
// scale and decoupled decay into scalars that reproduce them exactly.
uint32_t canonicalize(uint32_t sw, const StepScalars& in, StepScalars* out) {
  *out = in;
  const double scale = field(sw, SHIFT_SCALE_GRAD) ? in.grad_scale : 1.0;
  out->grad_scale = field(sw, SHIFT_MAXIMIZE) ? -scale : scale;
  if (!field(sw, SHIFT_DECOUPLED)) out->decay_factor = 1.0;
  uint32_t code = sw & ((1u << SHIFT_DECOUPLED) - 1u);
  if (field(sw, SHIFT_DENOMINATOR) != 0) {
    code = (code & ~(3u << SHIFT_DENOMINATOR)) | (1u << SHIFT_DENOMINATOR);
  }
  return code | (1u << SHIFT_DECOUPLED) | (1u << SHIFT_SCALE_GRAD);
}

struct Plan {
  const Group* group;
  const IsaImpl* isa;
  std::vector<int64_t> offsets;  // first global element of each tensor, then the total
  bool used[NUM_ROLES];
  bool fp64;
  bool direct;      // float math and every used role already fp32, no master: no conversions
  bool bf16_state;  // fp32 params, gradients and H u with bf16 state, no master: converted in registers
  KernelFn<float> kf;
  KernelFn<double> kd;
  KernelFn<float, uint16_t> kb;
  MathScalars<float> sf;
  MathScalars<double> sd;
  uint32_t seed;  // nonzero: bf16 state of fp32 (or fp16, or master) weights rounded stochastically
  bool unscale;   // write the gradients back times unscale_f (unscale_d for fp64)
  float unscale_f;
  double unscale_d;
};

// The stochastic-rounding key of tensor t in a launch seeded `seed`, for elements whose
// index in the tensor has the high half of `index`'s (the counters are its low half). Odd:
// a kernel takes key 0 for rounding to nearest.
uint32_t tensor_key(uint32_t seed, int64_t t, int64_t index) {
  const uint64_t ut = static_cast<uint64_t>(t), ui = static_cast<uint64_t>(index);
  return mix32(mix32(seed) ^ mix32(static_cast<uint32_t>(ut) * 0x9e3779b9u + static_cast<uint32_t>(ut >> 32)) ^
               mix32(static_cast<uint32_t>(ui >> 32))) |
         1u;
}

template <typename T>
T* role_ptr(const Plan& pl, int role, int64_t t, int64_t begin) {
  if (!pl.used[role]) return nullptr;
  return reinterpret_cast<T*>(pl.group->ptrs[role][t]) + begin;
}

// Rounds the elements [at, at + len) of tensor t of pair j's state roles `lo` and `hi` (-1:
// not rounded so) to bf16 stochastically, from their fp32 buffers. 32-bit counters: a run
// that crosses into the next 2^32 elements of its tensor is two, each with its own key.
void store_stochastic(const Plan& pl, int64_t t, int64_t at, int64_t len, int j, int lo, int hi,
                      const float (*buf)[BLOCK], char* const* base) {
  for (int64_t done = 0; done < len;) {
    const int64_t first = at + done;
    const int64_t room = static_cast<int64_t>((uint64_t{1} << 32) - static_cast<uint32_t>(first));
    const int64_t k = std::min(len - done, room);
    auto src = [&](int role) { return role < 0 ? nullptr : buf[role] + done; };
    auto dst = [&](int role) { return role < 0 ? nullptr : reinterpret_cast<uint16_t*>(base[role]) + done; };
    pl.isa->to_bf16_stochastic(src(lo), dst(lo), src(hi), dst(hi), k, pair_key(tensor_key(pl.seed, t, first), j),
                               first);
    done += k;
  }
}

void run_blocks(const Plan& pl, int64_t t, int64_t begin, int64_t n) {
  const Group& grp = *pl.group;
  const bool master = pl.used[MASTER];
  alignas(64) float buf[NUM_ROLES][BLOCK];
  for (int64_t b = 0; b < n; b += BLOCK) {
    const int64_t len = std::min(BLOCK, n - b);
    float* arg[NUM_ROLES] = {};
    char* base[NUM_ROLES] = {};
    for (int role = 0; role < NUM_ROLES; ++role) {
      if (!pl.used[role]) continue;
      const int dt = grp.dtypes[role];
      base[role] = reinterpret_cast<char*>(grp.ptrs[role][t]) + (begin + b) * dtype_size(dt);
      if (role == P && master) continue;  // written from the master below, never read
      if (dt == F32) {
        arg[role] = reinterpret_cast<float*>(base[role]);
      } else {
        pl.isa->to_float(dt, base[role], buf[role], len);
        arg[role] = buf[role];
      }
    }
    float* p = master ? arg[MASTER] : arg[P];
    pl.kf(len, p, arg[G], arg[H], arg[M], arg[V], arg[VMAX], arg[GAVG], arg[U], &pl.sf, Rounding{0, 0});
    // the state: rounded to nearest, or to bf16 stochastically by pairs of ranks (Rounding)
    int stochastic[NUM_ROLES];  // by rank: the role, where it is rounded stochastically, else -1
    int ranks = 0;
    for (int role : STATE_ROLES) {
      if (!pl.used[role]) continue;
      const int dt = grp.dtypes[role];
      const bool sr = pl.seed != 0 && dt == BF16;
      stochastic[ranks++] = sr ? role : -1;
      if (dt != F32 && !sr) pl.isa->from_float(dt, buf[role], base[role], len);
    }
    for (int r = 0; r < ranks; r += 2) {
      const int lo = stochastic[r], hi = r + 1 < ranks ? stochastic[r + 1] : -1;
      if (lo >= 0 || hi >= 0) store_stochastic(pl, t, begin + b, len, r / 2, lo, hi, buf, base);
    }
    // the param: from the master, or its buffer (never rounded stochastically)
    if (master) {
      pl.isa->from_float(grp.dtypes[P], arg[MASTER], base[P], len);
    } else if (grp.dtypes[P] != F32) {
      pl.isa->from_float(grp.dtypes[P], buf[P], base[P], len);
    }
  }
}

// Steps elements [begin, begin + n) of tensor t.
void step_piece(const Plan& pl, int64_t t, int64_t begin, int64_t n) {
  if (pl.fp64) {
    pl.kd(n, role_ptr<double>(pl, P, t, begin), role_ptr<double>(pl, G, t, begin),
          role_ptr<double>(pl, H, t, begin), role_ptr<double>(pl, M, t, begin), role_ptr<double>(pl, V, t, begin),
          role_ptr<double>(pl, VMAX, t, begin), role_ptr<double>(pl, GAVG, t, begin),
          role_ptr<double>(pl, U, t, begin), &pl.sd, Rounding{0, 0});
  } else if (pl.direct) {
    pl.kf(n, role_ptr<float>(pl, P, t, begin), role_ptr<float>(pl, G, t, begin), role_ptr<float>(pl, H, t, begin),
          role_ptr<float>(pl, M, t, begin), role_ptr<float>(pl, V, t, begin), role_ptr<float>(pl, VMAX, t, begin),
          role_ptr<float>(pl, GAVG, t, begin), role_ptr<float>(pl, U, t, begin), &pl.sf, Rounding{0, 0});
  } else if (pl.bf16_state) {
    // the counters are 32-bit: a piece that crosses into the next 2^32 elements of its
    // tensor is two calls, each with its own key
    const int64_t room = static_cast<int64_t>((uint64_t{1} << 32) - static_cast<uint32_t>(begin));
    if (pl.seed != 0 && n > room) {
      step_piece(pl, t, begin, room);
      step_piece(pl, t, begin + room, n - room);
      return;
    }
    const Rounding rnd{pl.seed != 0 ? tensor_key(pl.seed, t, begin) : 0u, static_cast<uint32_t>(begin)};
    pl.kb(n, role_ptr<float>(pl, P, t, begin), role_ptr<float>(pl, G, t, begin), role_ptr<float>(pl, H, t, begin),
          role_ptr<uint16_t>(pl, M, t, begin), role_ptr<uint16_t>(pl, V, t, begin),
          role_ptr<uint16_t>(pl, VMAX, t, begin), role_ptr<uint16_t>(pl, GAVG, t, begin),
          role_ptr<uint16_t>(pl, U, t, begin), &pl.sf, rnd);
  } else {
    run_blocks(pl, t, begin, n);
  }
}

// Multiplies gradient elements [begin, begin + n) of tensor t by the unscale factor in the
// gradient's dtype, as torch's in-place multiply does: fp32 math for fp32/bf16/fp16 (then
// rounded to nearest even), fp64 for fp64.
void unscale_piece(const Plan& pl, int64_t t, int64_t begin, int64_t n) {
  const int dt = pl.group->dtypes[G];
  char* base = reinterpret_cast<char*>(pl.group->ptrs[G][t]) + begin * dtype_size(dt);
  // the factors in locals: a store through g could otherwise alias them, which would keep
  // the loops from vectorizing
  const double ud = pl.unscale_d;
  const float uf = pl.unscale_f;
  if (dt == F64) {
    double* __restrict g = reinterpret_cast<double*>(base);
    for (int64_t i = 0; i < n; ++i) g[i] *= ud;
  } else if (dt == F32) {
    float* __restrict g = reinterpret_cast<float*>(base);
    for (int64_t i = 0; i < n; ++i) g[i] *= uf;
  } else {
    alignas(64) float buf[BLOCK];
    for (int64_t b = 0; b < n; b += BLOCK) {
      const int64_t len = std::min(BLOCK, n - b);
      char* at = base + b * dtype_size(dt);
      pl.isa->to_float(dt, at, buf, len);
      for (int64_t i = 0; i < len; ++i) buf[i] *= uf;
      pl.isa->from_float(dt, buf, at, len);
    }
  }
}

// Elements per piece when the gradients are written back: the step has just read a piece's
// gradient, which is still in cache when it is multiplied and stored.
constexpr int64_t UNSCALE_PIECE = 4096;

void run_piece(const Plan& pl, int64_t t, int64_t begin, int64_t n) {
  if (!pl.unscale) {
    step_piece(pl, t, begin, n);
    return;
  }
  for (int64_t b = 0; b < n; b += UNSCALE_PIECE) {
    const int64_t len = std::min(UNSCALE_PIECE, n - b);
    step_piece(pl, t, begin + b, len);
    unscale_piece(pl, t, begin + b, len);
  }
}

// Steps global elements [chunk * CHUNK, (chunk + 1) * CHUNK), across tensor boundaries.
void run_chunk(const Plan& pl, int64_t chunk) {
  const std::vector<int64_t>& off = pl.offsets;
  const int64_t lo = chunk * CHUNK, hi = std::min(lo + CHUNK, off.back());
  // the tensor holding element lo: the last offset <= lo (skipping empty tensors)
  int64_t t = std::upper_bound(off.begin(), off.end() - 1, lo) - off.begin() - 1;
  for (int64_t at = lo; at < hi; ++t) {
    const int64_t end = std::min(hi, off[t + 1]);
    if (end > at) run_piece(pl, t, at - off[t], end - at);
    at = std::max(at, end);
  }
}

// ---- sum of squares (the global gradient norm) ----------------------------------------------

// Adds the squares of n elements to eight running sums, element i to sums[i % 8]: a fixed
// order of additions (the compiler may vectorize across the sums, never reassociate).
template <typename T>
void add_squares(const T* x, int64_t n, double sums[8]) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) {
      const double v = static_cast<double>(x[i + k]);
      sums[k] += v * v;
    }
  }
  for (int k = 0; i < n; ++i, ++k) {
    const double v = static_cast<double>(x[i]);
    sums[k] += v * v;
  }
}

// The sum of squares of global elements [chunk * CHUNK, (chunk + 1) * CHUNK).
double chunk_sum_of_squares(int dtype, const std::vector<int64_t>& off, const uintptr_t* ptrs, const IsaImpl* isa,
                            int64_t chunk) {
  const int64_t lo = chunk * CHUNK, hi = std::min(lo + CHUNK, off.back());
  double sums[8] = {};
  alignas(64) float buf[BLOCK];
  int64_t t = std::upper_bound(off.begin(), off.end() - 1, lo) - off.begin() - 1;
  for (int64_t at = lo; at < hi; ++t) {
    const int64_t end = std::min(hi, off[t + 1]);
    if (end > at) {
      const int64_t n = end - at;
      const char* base = reinterpret_cast<const char*>(ptrs[t]) + (at - off[t]) * dtype_size(dtype);
      if (dtype == F64) {
        add_squares(reinterpret_cast<const double*>(base), n, sums);
      } else if (dtype == F32) {
        add_squares(reinterpret_cast<const float*>(base), n, sums);
      } else {  // bf16, fp16: widened a block at a time (exactly: every value is a float)
        for (int64_t b = 0; b < n; b += BLOCK) {
          const int64_t len = std::min(BLOCK, n - b);
          isa->to_float(dtype, base + b * dtype_size(dtype), buf, len);
          add_squares(buf, len, sums);
        }
      }
    }
    at = std::max(at, end);
  }
  double s = 0.0;
  for (double part : sums) s += part;
  return s;
}

}  // namespace

const char* sum_of_squares(int dtype, int64_t num_tensors, const int64_t* sizes, const uintptr_t* ptrs,
                           int num_threads, double* out) {
  if (dtype < 0 || dtype >= NUM_DTYPES) return "unknown dtype code";
  std::vector<int64_t> off(static_cast<std::size_t>(num_tensors) + 1);
  int64_t total = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    if (sizes[t] < 0) return "negative tensor size";
    off[static_cast<std::size_t>(t)] = total;
    total += sizes[t];
  }
  off.back() = total;
  *out = 0.0;
  if (total == 0) return nullptr;
  const int64_t chunks = (total + CHUNK - 1) / CHUNK;
  std::vector<double> partial(static_cast<std::size_t>(chunks));
  const IsaImpl* isa = current_isa();
  const int threads = num_threads > 0 ? num_threads : static_cast<int>(std::thread::hardware_concurrency());
  const std::function<void(int64_t)> fn = [&](int64_t chunk) {
    partial[static_cast<std::size_t>(chunk)] = chunk_sum_of_squares(dtype, off, ptrs, isa, chunk);
  };
  parallel_chunks(std::max(threads, 1), chunks, fn);
  double s = 0.0;
  for (double part : partial) s += part;
  *out = s;
  return nullptr;
}

const char* step(uint32_t switches, const StepScalars& scalars, const Group& group, int num_threads,
                 const double* unscale_grads, uint32_t rounding_seed) {
  Plan pl;
  pl.unscale = unscale_grads != nullptr;
  pl.unscale_d = pl.unscale ? *unscale_grads : 1.0;
  pl.unscale_f = static_cast<float>(pl.unscale_d);
  StepScalars sc;
  const uint32_t code = canonicalize(switches, scalars, &sc);
  const bool den = field(code, SHIFT_DENOMINATOR) != 0;
  pl.group = &group;
  pl.isa = current_isa();
  for (bool& u : pl.used) u = false;
  pl.used[P] = pl.used[G] = true;
  pl.used[H] = field(code, SHIFT_HVP) != 0;
  pl.used[M] = field(code, SHIFT_MOMENTUM) != 0;
  pl.used[V] = den;
  pl.used[VMAX] = den && field(code, SHIFT_AMSGRAD);
  pl.used[GAVG] = den && field(code, SHIFT_CENTERED);
  pl.used[U] = field(code, SHIFT_ADADELTA) != 0;
  pl.used[MASTER] = group.ptrs[MASTER] != nullptr;
  for (int role = 0; role < NUM_ROLES; ++role) {
    if (!pl.used[role]) continue;
    if (group.ptrs[role] == nullptr) return "a role these switches use has no tensors";
    if (group.dtypes[role] < 0 || group.dtypes[role] >= NUM_DTYPES) return "unknown dtype code";
  }
  pl.fp64 = group.dtypes[P] == F64;
  pl.direct = !pl.used[MASTER];
  pl.bf16_state = !pl.used[MASTER];
  for (int role = 0; role < NUM_ROLES; ++role) {
    if (!pl.used[role]) continue;
    const int dt = group.dtypes[role];
    if (pl.fp64 != (dt == F64)) return "fp64 params need fp64 grads and state, and only they can have them";
    if (dt != F32) pl.direct = false;
    if (dt != ((role == P || role == G || role == H) ? F32 : BF16)) pl.bf16_state = false;
  }
  if (pl.used[MASTER] && group.dtypes[MASTER] != F32) return "master weights must be fp32";
  // stochastic rounding of bf16 state where the weights stepped are finer than bf16 (bf16
  // weights round to nearest, state as params): in the bf16-state kernels' stores, or in
  // the block path's conversions
  const int weights = pl.used[MASTER] ? F32 : group.dtypes[P];
  pl.seed = (weights == F32 || weights == F16) ? rounding_seed : 0;
  pl.kf = nullptr;
  pl.kd = nullptr;
  pl.kb = nullptr;
  if (pl.fp64) {
    pl.kd = pl.isa->find_f64(code);
    pl.sd = math_scalars<double>(sc);
  } else {
    pl.kf = pl.isa->find_f32(code);
    if (pl.bf16_state) pl.kb = pl.isa->find_f32_bf16_state(code);
    pl.bf16_state = pl.kb != nullptr;
    pl.sf = math_scalars<float>(sc);
  }
  if (pl.kf == nullptr && pl.kd == nullptr) return "no kernel is compiled for these switches";

  pl.offsets.resize(static_cast<std::size_t>(group.num_tensors) + 1);
  int64_t total = 0;
  for (int64_t t = 0; t < group.num_tensors; ++t) {
    if (group.sizes[t] < 0) return "negative tensor size";
    pl.offsets[static_cast<std::size_t>(t)] = total;
    total += group.sizes[t];
  }
  pl.offsets.back() = total;
  if (total == 0) return nullptr;
  const int64_t chunks = (total + CHUNK - 1) / CHUNK;
  int threads = num_threads > 0 ? num_threads : static_cast<int>(std::thread::hardware_concurrency());
  const std::function<void(int64_t)> fn = [&pl](int64_t chunk) { run_chunk(pl, chunk); };
  parallel_chunks(std::max(threads, 1), chunks, fn);
  return nullptr;
}

bool has_kernel(uint32_t switches, bool fp64) {
  StepScalars unused{};
  const uint32_t code = canonicalize(switches, unused, &unused);
  const IsaImpl* isa = current_isa();
  return fp64 ? isa->find_f64(code) != nullptr : isa->find_f32(code) != nullptr;
}

int kernel_count() { return current_isa()->kernel_count(); }

const char* isa() { return current_isa()->name; }

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const IsaImpl* i : usable_isas()) names.emplace_back(i->name);
  return names;
}

const char* threading() { return g_use_openmp.load() ? "openmp" : "pool"; }

bool set_threading(const char* name) {
  if (std::strcmp(name, "pool") == 0) {
    g_use_openmp.store(false);
    return true;
  }
#if defined(_OPENMP)
  if (std::strcmp(name, "openmp") == 0) {
    g_use_openmp.store(true);
    return true;
  }
#endif
  return false;
}

bool set_isa(const char* name) {
  for (const IsaImpl* i : usable_isas()) {
    if (std::strcmp(i->name, name) == 0) {
      g_isa.store(i, std::memory_order_release);
      return true;
    }
  }
  return false;
}

void to_float(int dtype, const void* src, float* dst, int64_t n) { current_isa()->to_float(dtype, src, dst, n); }

void from_float(int dtype, const float* src, void* dst, int64_t n) {
  current_isa()->from_float(dtype, src, dst, n);
}

}  // namespace cpu
}  // namespace fastopt
#endif  // FASTOPT_MAIN
