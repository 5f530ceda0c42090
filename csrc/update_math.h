// The per-element update rule of fastopt/rule.py, written once for every C++ backend.
//
// `update` below mirrors fastopt.rule.update line for line: same statements, same order of
// operations (so fp64 results agree with the torch backend to rounding), with the rule's
// switches as template parameters so that a loop over elements has no branches left.
// Everything here compiles for the host (g++/clang++) and for CUDA (nvcc, where
// FASTOPT_HD = __host__ __device__): no exceptions, no containers, no threading.
//
// Enum values equal those of fastopt/spec.py; the Python binding exports them and a test
// checks that the two sides agree.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FASTOPT_HD __host__ __device__
#else
#define FASTOPT_HD
#endif

// Linkage of the functions below. A translation unit compiled for another instruction set
// (one object per ISA, picked at run time) defines it as `static inline` to keep its own
// copies: with plain `inline` the linker would keep one arbitrary copy for every object.
#ifndef FASTOPT_INLINE
#define FASTOPT_INLINE inline
#endif

namespace fastopt {

// ---- switches: the integer codes of fastopt/spec.py --------------------------------------

enum Momentum : int { MOMENTUM_NONE = 0, MOMENTUM_CLASSICAL = 1, MOMENTUM_NESTEROV = 2 };
enum MomentumInput : int { INPUT_UNSCALED = 0, INPUT_SCALED = 1, INPUT_PRECONDITIONED = 2 };
enum Accumulation : int { ACCUMULATION_MEAN = 0, ACCUMULATION_SUM = 1 };
enum Denominator : int { DENOMINATOR_NONE = 0, DENOMINATOR_SUM = 1, DENOMINATOR_MEAN = 2 };
enum Norm : int { NORM_L1 = 1, NORM_L2 = 2, NORM_LINF = 3 };
enum Eps : int { EPS_OUTSIDE = 0, EPS_INSIDE_ROOT = 1 };
enum Curvature : int { CURVATURE_GRADIENT = 0, CURVATURE_HVP = 1 };
enum Schedule : int {
  SCHEDULE_CONSTANT = 0,
  SCHEDULE_BIAS_CORRECTION = 1,
  SCHEDULE_TRUE_MEAN = 2,
  SCHEDULE_INCREASING = 3,
  SCHEDULE_NADAM = 4
};
enum WeightDecay : int { WEIGHT_DECAY_L2 = 0, WEIGHT_DECAY_DECOUPLED = 1 };
enum Extra : int { EXTRA_NONE = 0, EXTRA_ADADELTA = 1, EXTRA_RADAM = 2 };

// The switches of fastopt.rule.switches() packed into one integer, so that a kernel can be
// templated on a single value. Two bits for the three-valued switches, one for the flags.
enum SwitchShift : int {
  SHIFT_MOMENTUM = 0,
  SHIFT_MOMENTUM_INPUT = 2,
  SHIFT_DENOMINATOR = 4,
  SHIFT_NORM = 6,
  SHIFT_EPS_INSIDE = 8,
  SHIFT_CENTERED = 9,
  SHIFT_AMSGRAD = 10,
  SHIFT_HVP = 11,
  SHIFT_ADADELTA = 12,
  SHIFT_USE_DENOMINATOR = 13,
  SHIFT_HAS_L2 = 14,
  SHIFT_DECOUPLED = 15,
  SHIFT_MAXIMIZE = 16,
  SHIFT_SCALE_GRAD = 17,
  SWITCH_BITS = 18
};

FASTOPT_HD constexpr int switch_field(uint32_t code, int shift) {
  return static_cast<int>((code >> shift) & ((shift < SHIFT_EPS_INSIDE) ? 3u : 1u));
}

// ---- per-step scalars: the fields of fastopt.scalars.StepScalars --------------------------

struct StepScalars {
  double lr;
  double weight_decay;
  double decay_factor;
  double grad_scale;
  double m_decay;
  double m_weight;
  double m_out;
  double g_out;
  double v_decay;
  double v_weight;
  double v_scale;
  double eps;
  bool use_denominator;
};

// The same scalars rounded once to the math type, as torch does with a Python scalar.
template <typename T>
struct MathScalars {
  T lr, weight_decay, decay_factor, grad_scale, m_decay, m_weight, m_out, g_out, v_decay, v_weight,
      v_scale, eps;
};

template <typename T>
FASTOPT_HD FASTOPT_INLINE MathScalars<T> math_scalars(const StepScalars& s) {
  return MathScalars<T>{T(s.lr),      T(s.weight_decay), T(s.decay_factor), T(s.grad_scale),
                        T(s.m_decay), T(s.m_weight),     T(s.m_out),        T(s.g_out),
                        T(s.v_decay), T(s.v_weight),     T(s.v_scale),      T(s.eps)};
}

// ---- the helpers of fastopt/rule.py -------------------------------------------------------
// (its divide is plain `/` here: C++, and nvcc without fast math, round the quotient correctly)

FASTOPT_HD FASTOPT_INLINE float fo_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

FASTOPT_HD FASTOPT_INLINE double fo_sqrt(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

FASTOPT_HD FASTOPT_INLINE float fo_abs(float x) {
#if defined(__CUDA_ARCH__)
  return fabsf(x);
#else
  return std::fabs(x);
#endif
}

FASTOPT_HD FASTOPT_INLINE double fo_abs(double x) {
#if defined(__CUDA_ARCH__)
  return ::fabs(x);
#else
  return std::fabs(x);
#endif
}

// torch.maximum: NaN when either input is NaN (std::max and fmax both drop a NaN), else the
// larger, the first on ties. Every comparison is evaluated unconditionally so that a loop
// over elements compiles to compares and blends; a + b is a NaN whenever one of them is.
template <typename T>
FASTOPT_HD FASTOPT_INLINE T fo_maximum(T a, T b) {
  T larger = (a < b) ? b : a;
  bool nan = (a != a) | (b != b);
  return nan ? a + b : larger;
}

// ---- the rule -----------------------------------------------------------------------------

// One step for one element, in place on p, m, v, vmax, gavg, u; returns nothing (the
// Python version returns the six values). Inputs a spec does not use are left untouched.
template <typename T, int MOMENTUM, int MOMENTUM_INPUT, int DENOMINATOR, int NORM, bool EPS_INSIDE,
          bool CENTERED, bool AMSGRAD, bool HVP, bool ADADELTA, bool USE_DENOMINATOR, bool HAS_L2,
          bool DECOUPLED, bool MAXIMIZE, bool SCALE_GRAD>
FASTOPT_HD FASTOPT_INLINE void update(T& p, T g, T h, T& m, T& v, T& vmax, T& gavg, T& u,
                              const MathScalars<T>& sc) {
  if constexpr (SCALE_GRAD) g = g * sc.grad_scale;
  if constexpr (MAXIMIZE) g = -g;
  if constexpr (HAS_L2) g = g + p * sc.weight_decay;
  if constexpr (DECOUPLED) p = p * sc.decay_factor;
  // curvature source of the denominator: the gradient or a Hessian-vector product
  T c;
  if constexpr (HVP) {
    c = h;
  } else {
    c = g;
  }
  (void)h;

  // adaptive denominator -> precond = 1 / vbar (times Adadelta's numerator)
  T precond = g;  // placeholder, overwritten whenever it is used
  if constexpr (DENOMINATOR != 0) {
    T a;
    if constexpr (NORM == 3) {
      a = fo_abs(c);
      if constexpr (EPS_INSIDE) a = a + sc.eps;
      v = fo_maximum(v * sc.v_decay, a);
    } else {
      // the weight first, as torch's addcmul: (w c) c is finite up to |c| ~ sqrt(max / w)
      if constexpr (NORM == 2) {
        a = c * sc.v_weight * c;
      } else {
        a = fo_abs(c) * sc.v_weight;
      }
      v = v * sc.v_decay + a;
    }
    if constexpr (CENTERED) gavg = gavg * sc.v_decay + c * sc.v_weight;
    T w;
    if constexpr (AMSGRAD) {
      vmax = fo_maximum(vmax, v);
      w = vmax;
    } else {
      w = v;
    }
    T x = w * sc.v_scale;
    if constexpr (CENTERED) {
      T mean = gavg * sc.v_scale;
      x = x - mean * mean;
    }
    T root;
    if constexpr (NORM == 2) {
      if constexpr (EPS_INSIDE) {
        root = fo_sqrt(x + sc.eps);
      } else if constexpr (CENTERED) {
        root = fo_sqrt(x) + sc.eps;
      } else {
        // the root before the bias correction's scale, as torch's Adam: v * v_scale
        // overflows fp32 for gradients sqrt(v_scale) times smaller
        root = fo_sqrt(w) * fo_sqrt(sc.v_scale) + sc.eps;
      }
    } else if constexpr (NORM == 3) {
      if constexpr (EPS_INSIDE) {
        root = x;
      } else {
        root = x + sc.eps;
      }
    } else {
      root = x + sc.eps;
    }
    if constexpr (ADADELTA) {
      precond = fo_sqrt(u * sc.v_scale + sc.eps) / root;
    } else {
      precond = T(1) / root;
    }
  }

  // momentum, then the step
  constexpr bool DIVIDE = DENOMINATOR != 0 && USE_DENOMINATOR;
  T s;
  if constexpr (DIVIDE) {
    s = g * precond;
  } else {
    s = g;
  }
  T step;
  if constexpr (MOMENTUM != 0) {
    T x_in;
    if constexpr (MOMENTUM_INPUT == 0) {
      x_in = g;
    } else if constexpr (MOMENTUM_INPUT == 2) {
      x_in = s;
    } else {
      x_in = s * sc.lr;
    }
    m = m * sc.m_decay + x_in * sc.m_weight;
    T mbar;
    if constexpr (MOMENTUM == 2) {
      mbar = m * sc.m_out + x_in * sc.g_out;
    } else {
      mbar = m * sc.m_out;
    }
    if constexpr (MOMENTUM_INPUT == 0) {
      if constexpr (DIVIDE) {
        step = mbar * precond * sc.lr;
      } else {
        step = mbar * sc.lr;
      }
    } else if constexpr (MOMENTUM_INPUT == 2) {
      step = mbar * sc.lr;
    } else {
      step = mbar;
    }
  } else {
    step = s * sc.lr;
  }
  if constexpr (ADADELTA) u = u * sc.v_decay + s * sc.v_weight * s;
  p = p - step;
}

// The same rule with the switches packed into one code (see SwitchShift).
template <typename T, uint32_t SW>
FASTOPT_HD FASTOPT_INLINE void update_packed(T& p, T g, T h, T& m, T& v, T& vmax, T& gavg, T& u,
                                     const MathScalars<T>& sc) {
  update<T, switch_field(SW, SHIFT_MOMENTUM), switch_field(SW, SHIFT_MOMENTUM_INPUT),
         switch_field(SW, SHIFT_DENOMINATOR), switch_field(SW, SHIFT_NORM),
         switch_field(SW, SHIFT_EPS_INSIDE) != 0, switch_field(SW, SHIFT_CENTERED) != 0,
         switch_field(SW, SHIFT_AMSGRAD) != 0, switch_field(SW, SHIFT_HVP) != 0,
         switch_field(SW, SHIFT_ADADELTA) != 0, switch_field(SW, SHIFT_USE_DENOMINATOR) != 0,
         switch_field(SW, SHIFT_HAS_L2) != 0, switch_field(SW, SHIFT_DECOUPLED) != 0,
         switch_field(SW, SHIFT_MAXIMIZE) != 0, switch_field(SW, SHIFT_SCALE_GRAD) != 0>(
      p, g, h, m, v, vmax, gavg, u, sc);
}

// ---- storage conversions: bf16 and fp16 by hand, round to nearest even ---------------------
// Branch-free (selects only) so that conversion loops vectorize; NaNs become the canonical
// quiet NaNs torch produces (bf16 0x7FC0; fp16 0x7E00 keeping the sign).

FASTOPT_HD FASTOPT_INLINE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

FASTOPT_HD FASTOPT_INLINE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FASTOPT_HD FASTOPT_INLINE float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

FASTOPT_HD FASTOPT_INLINE uint16_t float_to_bf16(float f) {
  uint32_t x = float_bits(f);
  // add just under half an ulp of bf16, plus one when the kept lsb is odd: ties go to even
  uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(((x & 0x7fffffffu) > 0x7f800000u) ? 0x7fc0u : rounded);
}

// fp32 -> bf16 bits with stochastic rounding: adding 16 random low bits before truncating
// rounds up with probability equal to the discarded fraction (zero-mean rounding error).
// NaN stays NaN; a value within one bf16 ulp of the largest may round up to infinity.
FASTOPT_HD FASTOPT_INLINE uint16_t bf16_stochastic(float x, uint32_t bits) {
  const uint32_t raw = float_bits(x);
  if ((raw & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
  return static_cast<uint16_t>((raw + (bits & 0xffffu)) >> 16);
}

// murmur3's 32-bit finalizer: random bits for stochastic rounding from a counter. 32-bit
// multiplies only, so that a loop over elements vectorizes on the CPU.
FASTOPT_HD FASTOPT_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}

FASTOPT_HD FASTOPT_INLINE float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  // normal: rebias the exponent from 15 to 127; Inf/NaN: all-ones exponent, payload kept
  uint32_t normal = (em << 13) + ((127u - 15u) << 23);
  uint32_t infnan = (em << 13) | 0x7f800000u;
  // zero and subnormals, m * 2^-24: 0.5f has an ulp of 2^-24, so (0.5f with m as its
  // mantissa) - 0.5f is exactly m * 2^-24
  uint32_t sub = float_bits(bits_float(0x3f000000u | em) - 0.5f);
  uint32_t mag = (em >= 0x7c00u) ? infnan : ((em >= 0x0400u) ? normal : sub);
  return bits_float(sign | mag);
}

FASTOPT_HD FASTOPT_INLINE uint16_t float_to_half(float f) {
  uint32_t x = float_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t a = x & 0x7fffffffu;
  // normal halves: rebias, then drop 13 mantissa bits rounding to nearest even; a carry
  // out of the mantissa correctly bumps the exponent
  uint32_t normal = (a - ((127u - 15u) << 23) + 0x0fffu + ((a >> 13) & 1u)) >> 13;
  // below 2^-14 the half grid is 2^-24, the ulp of 0.5f: the FPU's own round-to-nearest-even
  // of |f| + 0.5f lands on it, and the mantissa difference is the subnormal half
  uint32_t sub = float_bits(bits_float(a) + 0.5f) - 0x3f000000u;
  // 65520 = 0x477ff000 is halfway between the largest half (65504) and 2^16: ties to even
  // round it up, so everything from there on is infinity
  uint32_t mag = (a > 0x7f800000u) ? 0x7e00u
                                   : ((a >= 0x477ff000u) ? 0x7c00u : ((a >= 0x38800000u) ? normal : sub));
  return static_cast<uint16_t>(sign | mag);
}

}  // namespace fastopt
