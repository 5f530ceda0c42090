// The CPU multi-tensor step: one call steps every tensor of a (device, dtype) group.
//
// The caller passes raw pointers per role; the work is cut into fixed-size chunks over the
// concatenation of all tensors and spread over a thread pool. Each element's arithmetic is
// the same whatever the chunking or thread count, so results are bit-identical.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "update_math.h"

namespace fastopt {
namespace cpu {

// Storage dtypes of a role (the binding exports these codes).
enum DType : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3, NUM_DTYPES = 4 };

// Roles, in the order of the pointer and dtype arrays of Group. P is the param; with MASTER
// present the rule steps the master (fp32) and P receives it rounded to its own dtype.
enum Role : int { P = 0, G, H, M, V, VMAX, GAVG, U, MASTER, NUM_ROLES };

struct Group {
  int64_t num_tensors;
  const int64_t* sizes;              // elements per tensor
  const uintptr_t* ptrs[NUM_ROLES];  // per role: num_tensors addresses, or null when unused
  int dtypes[NUM_ROLES];             // per role: a DType (ignored when the role is unused)
};

// Steps the group. `switches` is fastopt.rule.switches() packed by SwitchShift. With
// `unscale_grads` set, every gradient element is also written back times *unscale_grads
// (AMP's inverse loss scale) in the gradient's dtype, right after the step has read it:
// the unscaling torch's fused optimizers leave in p.grad, without a second pass over memory.
// The gradients must then not share memory. A nonzero `rounding_seed` rounds bf16 state
// stochastically where the weights stepped are fp32 or fp16 (a master, or the params),
// with random bits that depend on the seed, the tensor, the role and the element only.
// Returns null on success, else a static message saying why nothing was done.
const char* step(uint32_t switches, const StepScalars& scalars, const Group& group, int num_threads,
                 const double* unscale_grads = nullptr, uint32_t rounding_seed = 0);

// Whether a kernel is compiled for these switches and math in fp64 (else fp32).
bool has_kernel(uint32_t switches, bool fp64);

// Number of compiled rule kernels per math type.
int kernel_count();

// Instruction-set builds: the one in use (the best this CPU runs, picked at first use), all
// this CPU can run (best first), and a switch between them (false if unknown or unusable).
const char* isa();
std::vector<std::string> available_isas();
bool set_isa(const char* name);

// Threading of the step: "openmp" (the default when built with OpenMP) or "pool" (a
// thread pool of our own); set_threading returns false for an unknown or unbuilt one.
const char* threading();
bool set_threading(const char* name);

// Elements per work chunk; tensors are concatenated, then cut at multiples of this.
constexpr int64_t CHUNK = 1 << 15;

// The sum of the squares of every element of `num_tensors` tensors of one dtype, in float64,
// into *out (gradient clipping's global norm). Cut into CHUNKs like a step, and the chunks'
// sums added in order: the result does not depend on the thread count. Returns null on
// success, else a static message saying why nothing was done.
const char* sum_of_squares(int dtype, int64_t num_tensors, const int64_t* sizes, const uintptr_t* ptrs,
                           int num_threads, double* out);

// Element-wise storage conversions (exposed for tests of the rounding).
void to_float(int dtype, const void* src, float* dst, int64_t n);
void from_float(int dtype, const float* src, void* dst, int64_t n);

}  // namespace cpu
}  // namespace fastopt
