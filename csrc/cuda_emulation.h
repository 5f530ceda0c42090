// Host stand-ins for the CUDA built-ins that csrc/cuda_step.cu uses, so that the very same
// kernel source compiles with a host compiler and runs on the CPU (FASTOPT_CUDA_EMULATION).
// Tests use it where no GPU is present: the kernels' indexing, chunking, vector accesses,
// tails, storage conversions and hooks are then checked against the reference in CI, like
// Triton's kernels under its interpreter. What it cannot check is nvcc's code generation.
//
// A launch runs its blocks one after another. A kernel whose threads never meet (no
// __syncthreads or warp shuffle) runs its threads one after another too (FASTOPT_LAUNCH);
// one whose threads synchronize runs each block's threads as OS threads, with a barrier
// per block and per warp (FASTOPT_LAUNCH_SYNCED). Blocks never run at the same time, so
// `__shared__` variables may be plain statics.
#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

struct float4 {
  float x, y, z, w;
};
struct uint2 {
  unsigned x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};

using cudaStream_t = void*;
enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidDevice = 101 };
// As the runtime's: a failed call's error stays the thread's last error until it is read.
inline cudaError_t& emulated_last_error() {
  thread_local cudaError_t last = cudaSuccess;
  return last;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emulated_last_error();
  emulated_last_error() = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "invalid device ordinal (the emulation has device 0 only)";
}
inline cudaError_t cudaSetDevice(int device) {
  if (device == 0) return cudaSuccess;
  return emulated_last_error() = cudaErrorInvalidDevice;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

namespace fastopt {
namespace emulation {

constexpr unsigned kWarp = 32;

// The running block's synchronization, for the threads of a FASTOPT_LAUNCH_SYNCED launch.
struct Block {
  explicit Block(unsigned threads) : all(threads) {
    for (unsigned w = 0; w < threads / kWarp; ++w) warps[w] = std::make_unique<std::barrier<>>(kWarp);
  }
  std::barrier<> all;
  std::unique_ptr<std::barrier<>> warps[1024 / kWarp];  // one barrier per warp
  float exchange[1024]{};  // a slot per thread for __shfl_down_sync
};

inline thread_local dim3 block_idx, thread_idx, block_dim;
inline thread_local Block* current = nullptr;

[[noreturn]] inline void unsynced() {
  // a kernel launched with FASTOPT_LAUNCH synchronized its threads: it needs _SYNCED
  std::abort();
}

inline void syncthreads() {
  if (current == nullptr) unsynced();
  current->all.arrive_and_wait();
}

inline float shfl_down(float x, unsigned offset) {
  if (current == nullptr) unsynced();
  const unsigned lane = thread_idx.x % kWarp, warp = thread_idx.x / kWarp;
  float* slots = current->exchange + warp * kWarp;
  slots[lane] = x;
  current->warps[warp]->arrive_and_wait();
  const float y = lane + offset < kWarp ? slots[lane + offset] : x;
  current->warps[warp]->arrive_and_wait();  // nobody overwrites a slot before it is read
  return y;
}

// kernel(args...) for every thread of every block, in order.
template <typename Kernel>
auto launch(Kernel kernel, unsigned blocks, unsigned threads) {
  return [=](auto... args) {
    block_dim.x = threads;
    for (unsigned b = 0; b < blocks; ++b) {
      block_idx.x = b;
      for (unsigned t = 0; t < threads; ++t) {
        thread_idx.x = t;
        kernel(args...);
      }
    }
  };
}

// The same with each block's threads running at once, so that they can synchronize.
template <typename Kernel>
auto launch_synced(Kernel kernel, unsigned blocks, unsigned threads) {
  return [=](auto... args) {
    for (unsigned b = 0; b < blocks; ++b) {
      Block block(threads);
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          block_dim.x = threads;
          block_idx.x = b;
          thread_idx.x = t;
          current = &block;
          kernel(args...);
        });
      }
      for (auto& th : pool) th.join();
    }
  };
}

}  // namespace emulation
}  // namespace fastopt

#define blockIdx (::fastopt::emulation::block_idx)
#define threadIdx (::fastopt::emulation::thread_idx)
#define blockDim (::fastopt::emulation::block_dim)

inline void __syncthreads() { ::fastopt::emulation::syncthreads(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline float __shfl_down_sync(unsigned /*mask: always the whole warp here*/, float x, unsigned offset) {
  return ::fastopt::emulation::shfl_down(x, offset);
}
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  return std::atomic_ref<unsigned>(*address).fetch_add(value);
}

#define FASTOPT_LAUNCH(kernel, blocks, threads, stream) ::fastopt::emulation::launch(kernel, blocks, threads)
#define FASTOPT_LAUNCH_SYNCED(kernel, blocks, threads, stream) \
  ::fastopt::emulation::launch_synced(kernel, blocks, threads)
