// Python bindings of the CUDA backend (module fastopt._cuda). Links no libtorch: tensors
// arrive as device addresses and the current stream as a handle, both from
// fastopt/backends/cuda_backend.py, which also builds the pointer and chunk table.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "update_math.h"

namespace py = pybind11;

// Defined in csrc/cuda_step.cu.
namespace fastopt {
namespace cuda {
int kernel_count();
uint32_t kernel_code(int i);
bool has_kernel(uint32_t code);
void dtype_codes(int* f32, int* bf16, int* f16);
const char* set_device(int device, int* previous);
const char* launch_step(uint32_t code, const int64_t* ptrs, const int64_t* sizes, const int64_t* chunks,
                        int64_t n_chunks, int na, const int* slots, const int* dtypes, int aligned,
                        int64_t chunk, const double* host_scalars, const double* device_scalars,
                        const float* inv_scale, const float* found_inf, const float* unscale, int maximize,
                        int decoupled, uint64_t seed, void* stream);
const char* launch_global_norm(const int64_t* ptrs, const int64_t* sizes, const int64_t* chunks,
                               int64_t n_chunks, int64_t chunk, int dtype, float* partials, unsigned* counter,
                               float* out, void* stream);
}  // namespace cuda
}  // namespace fastopt

namespace {

template <typename T>
T* address(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}

void check(const char* error) {
  if (error != nullptr) throw std::runtime_error(std::string("fastopt._cuda: ") + error);
}

// Makes the tensors' device current for a launch and the caller's current again after it:
// torch reads the current device from the CUDA runtime, so a device left changed would move
// the caller's later allocations and launches to it.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) { check(fastopt::cuda::set_device(device, &previous_)); }
  ~DeviceGuard() {
    if (previous_ != device_) fastopt::cuda::set_device(previous_, nullptr);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = -1;
};

void step(uint32_t code, int device, uintptr_t stream, uintptr_t ptrs, uintptr_t sizes, uintptr_t chunks,
          int64_t n_chunks, int na, const std::array<int, 7>& slots, const std::array<int, 3>& dtypes,
          bool aligned, int64_t chunk, const std::array<double, 12>& scalars, uintptr_t device_scalars,
          uintptr_t inv_scale, uintptr_t found_inf, uintptr_t unscale, bool maximize, bool decoupled,
          uint64_t seed) {
  const DeviceGuard guard(device);
  check(fastopt::cuda::launch_step(code, address<const int64_t>(ptrs), address<const int64_t>(sizes),
                                   address<const int64_t>(chunks), n_chunks, na, slots.data(), dtypes.data(),
                                   aligned ? 1 : 0, chunk, scalars.data(), address<const double>(device_scalars),
                                   address<const float>(inv_scale), address<const float>(found_inf),
                                   address<const float>(unscale), maximize ? 1 : 0, decoupled ? 1 : 0, seed,
                                   address<void>(stream)));
}

void global_norm(int device, uintptr_t stream, uintptr_t ptrs, uintptr_t sizes, uintptr_t chunks, int64_t n_chunks,
                 int64_t chunk, int dtype, uintptr_t partials, uintptr_t counter, uintptr_t out) {
  const DeviceGuard guard(device);
  check(fastopt::cuda::launch_global_norm(address<const int64_t>(ptrs), address<const int64_t>(sizes),
                                          address<const int64_t>(chunks), n_chunks, chunk, dtype,
                                          address<float>(partials), address<unsigned>(counter), address<float>(out),
                                          address<void>(stream)));
}

std::vector<uint32_t> kernel_codes() {
  std::vector<uint32_t> codes;
  for (int i = 0; i < fastopt::cuda::kernel_count(); ++i) codes.push_back(fastopt::cuda::kernel_code(i));
  return codes;
}

}  // namespace

#if defined(FASTOPT_CUDA_EMULATION)
// its own name: pybind11 hands back a module already made under the same name
PYBIND11_MODULE(_cuda_emulated, mod) {
#else
PYBIND11_MODULE(_cuda, mod) {
#endif
  mod.doc() = "fastopt's CUDA C++ backend: fused multi-tensor optimizer steps (see fastopt.backends.cuda_backend)";
  mod.def("step", &step, py::arg("code"), py::arg("device"), py::arg("stream"), py::arg("ptrs"), py::arg("sizes"),
          py::arg("chunks"), py::arg("n_chunks"), py::arg("na"), py::arg("slots"), py::arg("dtypes"),
          py::arg("aligned"), py::arg("chunk"), py::arg("scalars"), py::arg("device_scalars"), py::arg("inv_scale"),
          py::arg("found_inf"), py::arg("unscale"), py::arg("maximize"), py::arg("decoupled"), py::arg("seed"),
          "One fused step over a pointer table (addresses are integers; 0 means absent).");
  mod.def("global_norm", &global_norm, py::arg("device"), py::arg("stream"), py::arg("ptrs"), py::arg("sizes"),
          py::arg("chunks"), py::arg("n_chunks"), py::arg("chunk"), py::arg("dtype"), py::arg("partials"),
          py::arg("counter"), py::arg("out"), "Global L2 norm of the tensors of a pointer table, into out.");
  mod.def("kernel_count", &fastopt::cuda::kernel_count, "Number of compiled rule kernels.");
  mod.def("kernel_codes", &kernel_codes, "The packed switch codes with a compiled kernel, ascending.");
  mod.def("has_kernel", &fastopt::cuda::has_kernel, py::arg("code"));
  int f32 = 0, bf16 = 0, f16 = 0;
  fastopt::cuda::dtype_codes(&f32, &bf16, &f16);
  py::dict dtypes;
  dtypes["float32"] = f32;
  dtypes["bfloat16"] = bf16;
  dtypes["float16"] = f16;
  mod.attr("DTYPES") = dtypes;
  py::dict shifts;
  shifts["MOMENTUM"] = static_cast<int>(fastopt::SHIFT_MOMENTUM);
  shifts["MOMENTUM_INPUT"] = static_cast<int>(fastopt::SHIFT_MOMENTUM_INPUT);
  shifts["DENOMINATOR"] = static_cast<int>(fastopt::SHIFT_DENOMINATOR);
  shifts["NORM"] = static_cast<int>(fastopt::SHIFT_NORM);
  shifts["EPS_INSIDE"] = static_cast<int>(fastopt::SHIFT_EPS_INSIDE);
  shifts["CENTERED"] = static_cast<int>(fastopt::SHIFT_CENTERED);
  shifts["AMSGRAD"] = static_cast<int>(fastopt::SHIFT_AMSGRAD);
  shifts["HVP"] = static_cast<int>(fastopt::SHIFT_HVP);
  shifts["ADADELTA"] = static_cast<int>(fastopt::SHIFT_ADADELTA);
  shifts["USE_DENOMINATOR"] = static_cast<int>(fastopt::SHIFT_USE_DENOMINATOR);
  shifts["HAS_L2"] = static_cast<int>(fastopt::SHIFT_HAS_L2);
  shifts["DECOUPLED"] = static_cast<int>(fastopt::SHIFT_DECOUPLED);
  shifts["MAXIMIZE"] = static_cast<int>(fastopt::SHIFT_MAXIMIZE);
  shifts["SCALE_GRAD"] = static_cast<int>(fastopt::SHIFT_SCALE_GRAD);
  mod.attr("SWITCH_SHIFTS") = shifts;
#if defined(FASTOPT_CUDA_EMULATION)
  mod.attr("EMULATED") = true;  // kernels run on the CPU (csrc/cuda_emulation.h): a test build
#else
  mod.attr("EMULATED") = false;
#endif
}
