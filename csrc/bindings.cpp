// fastopt._C: the CPU step on raw pointers. Links no libtorch, so it works with any torch:
// Python passes data_ptr()s, sizes and dtype codes, and the step runs without the GIL.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cpu_step.h"

namespace py = pybind11;
using fastopt::StepScalars;
namespace cpu = fastopt::cpu;

namespace {

const char* const SCALAR_FIELDS[] = {"lr",      "weight_decay", "decay_factor", "grad_scale", "m_decay",
                                     "m_weight", "m_out",        "g_out",        "v_decay",    "v_weight",
                                     "v_scale",  "eps",          "use_denominator"};
const char* const ROLE_NAMES[] = {"p", "g", "h", "m", "v", "vmax", "gavg", "u", "master"};

// fastopt.scalars.StepScalars (a tuple, fields in SCALAR_FIELDS order) -> the C++ struct.
StepScalars to_scalars(const py::sequence& s) {
  if (py::len(s) != 13) throw py::value_error("scalars: expected the 13 fields of StepScalars");
  double f[12];
  for (int i = 0; i < 12; ++i) f[i] = s[i].cast<double>();
  return StepScalars{f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11],
                     py::bool_(s[12]).cast<bool>()};
}

// A list of Python ints (addresses) -> uintptr_t, with the C API: this is the per-tensor
// cost of a step, so it stays a tight loop.
void to_addresses(const py::handle& list, std::size_t expected, const char* role, std::vector<uintptr_t>& out) {
  if (!PyList_Check(list.ptr())) throw py::type_error(std::string("pointers of role ") + role + " must be a list");
  const Py_ssize_t n = PyList_GET_SIZE(list.ptr());
  if (static_cast<std::size_t>(n) != expected)
    throw py::value_error(std::string("role ") + role + ": one pointer per tensor expected");
  out.resize(static_cast<std::size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const unsigned long long a = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(list.ptr(), i));
    if (a == static_cast<unsigned long long>(-1) && PyErr_Occurred()) throw py::error_already_set();
    out[static_cast<std::size_t>(i)] = static_cast<uintptr_t>(a);
  }
}

void step(uint32_t switches, const py::sequence& scalars, const py::list& sizes, const py::sequence& ptrs,
          const std::vector<int>& dtypes, int num_threads, std::optional<double> unscale_grads,
          uint32_t rounding_seed) {
  if (py::len(ptrs) != cpu::NUM_ROLES || dtypes.size() != cpu::NUM_ROLES)
    throw py::value_error("ptrs and dtypes need one entry per role (see ROLES)");
  const StepScalars sc = to_scalars(scalars);
  const std::size_t n = static_cast<std::size_t>(py::len(sizes));
  std::vector<int64_t> size_vec(n);
  for (std::size_t i = 0; i < n; ++i) size_vec[i] = PyLong_AsLongLong(PyList_GET_ITEM(sizes.ptr(), i));
  if (PyErr_Occurred()) throw py::error_already_set();
  std::vector<uintptr_t> addr[cpu::NUM_ROLES];
  cpu::Group group{};
  group.num_tensors = static_cast<int64_t>(n);
  group.sizes = size_vec.data();
  for (int r = 0; r < cpu::NUM_ROLES; ++r) {
    py::handle entry = ptrs[static_cast<std::size_t>(r)];
    group.dtypes[r] = dtypes[static_cast<std::size_t>(r)];
    if (entry.is_none()) {
      group.ptrs[r] = nullptr;
      continue;
    }
    to_addresses(entry, n, ROLE_NAMES[r], addr[r]);
    group.ptrs[r] = addr[r].data();
  }
  const char* error;
  {
    py::gil_scoped_release no_gil;
    error = cpu::step(switches, sc, group, num_threads, unscale_grads ? &*unscale_grads : nullptr, rounding_seed);
  }
  if (error != nullptr) throw py::value_error(error);
}

double sum_of_squares(int dtype, const py::list& sizes, const py::list& ptrs, int num_threads) {
  const std::size_t n = static_cast<std::size_t>(py::len(sizes));
  std::vector<int64_t> size_vec(n);
  for (std::size_t i = 0; i < n; ++i) size_vec[i] = PyLong_AsLongLong(PyList_GET_ITEM(sizes.ptr(), i));
  if (PyErr_Occurred()) throw py::error_already_set();
  std::vector<uintptr_t> addr;
  to_addresses(ptrs, n, "g", addr);
  double out = 0.0;
  const char* error;
  {
    py::gil_scoped_release no_gil;
    error = cpu::sum_of_squares(dtype, static_cast<int64_t>(n), size_vec.data(), addr.data(), num_threads, &out);
  }
  if (error != nullptr) throw py::value_error(error);
  return out;
}

py::dict enum_dict(std::initializer_list<std::pair<const char*, int>> items) {
  py::dict d;
  for (const auto& kv : items) d[kv.first] = kv.second;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "fastopt's C++ CPU kernels: one fused multi-tensor step per (device, dtype) group";

  mod.def("step", &step, py::arg("switches"), py::arg("scalars"), py::arg("sizes"), py::arg("ptrs"),
          py::arg("dtypes"), py::arg("num_threads"), py::arg("unscale_grads") = py::none(),
          py::arg("rounding_seed") = 0,
          "One step of the rule for every tensor of a group, in place.\n\n"
          "switches: fastopt.rule.switches() packed by SWITCH_SHIFTS; scalars: a StepScalars;\n"
          "sizes: elements per tensor; ptrs: per role of ROLES a list of addresses or None;\n"
          "dtypes: per role a DTYPES code; num_threads <= 0 means all cores; unscale_grads:\n"
          "None, or a factor the gradients are written back times after the step read them\n"
          "(AMP's inverse loss scale; the gradients must not share memory); rounding_seed:\n"
          "nonzero rounds bf16 state of fp32/fp16/master weights stochastically.");
  mod.def("sum_of_squares", &sum_of_squares, py::arg("dtype"), py::arg("sizes"), py::arg("ptrs"),
          py::arg("num_threads"),
          "The sum of the squares of every element of the tensors at ptrs (sizes elements each, one\n"
          "DTYPES code), in float64, independent of num_threads (<= 0: all cores).");
  mod.def("has_kernel", &cpu::has_kernel, py::arg("switches"), py::arg("fp64"),
          "Whether a kernel is compiled for these packed switches (math in fp64 or fp32).");
  mod.def("kernel_count", &cpu::kernel_count, "Rule kernels compiled per math type.");
  mod.def("isa", &cpu::isa, "The instruction-set build in use.");
  mod.def("available_isas", &cpu::available_isas, "Instruction-set builds this CPU can run, best first.");
  mod.def("set_isa", &cpu::set_isa, py::arg("name"), "Use another instruction-set build (for tests).");
  mod.def("threading", &cpu::threading, "Threading of the step: 'openmp' or 'pool'.");
  mod.def("set_threading", &cpu::set_threading, py::arg("name"),
          "Run steps on 'openmp' (if built with it) or on fastopt's own thread 'pool'.");
  mod.def(
      "to_float",
      [](int dtype, uintptr_t src, uintptr_t dst, int64_t n) {
        py::gil_scoped_release no_gil;
        cpu::to_float(dtype, reinterpret_cast<const void*>(src), reinterpret_cast<float*>(dst), n);
      },
      py::arg("dtype"), py::arg("src"), py::arg("dst"), py::arg("n"), "Converts n elements of a dtype to fp32.");
  mod.def(
      "from_float",
      [](int dtype, uintptr_t src, uintptr_t dst, int64_t n) {
        py::gil_scoped_release no_gil;
        cpu::from_float(dtype, reinterpret_cast<const float*>(src), reinterpret_cast<void*>(dst), n);
      },
      py::arg("dtype"), py::arg("src"), py::arg("dst"), py::arg("n"),
      "Rounds n fp32 elements to a dtype (nearest even).");

  py::dict enums;
  enums["Momentum"] = enum_dict({{"NONE", fastopt::MOMENTUM_NONE},
                                 {"CLASSICAL", fastopt::MOMENTUM_CLASSICAL},
                                 {"NESTEROV", fastopt::MOMENTUM_NESTEROV}});
  enums["MomentumInput"] = enum_dict({{"UNSCALED", fastopt::INPUT_UNSCALED},
                                      {"SCALED", fastopt::INPUT_SCALED},
                                      {"PRECONDITIONED", fastopt::INPUT_PRECONDITIONED}});
  enums["Accumulation"] = enum_dict({{"MEAN", fastopt::ACCUMULATION_MEAN}, {"SUM", fastopt::ACCUMULATION_SUM}});
  enums["Denominator"] = enum_dict({{"NONE", fastopt::DENOMINATOR_NONE},
                                    {"SUM", fastopt::DENOMINATOR_SUM},
                                    {"MEAN", fastopt::DENOMINATOR_MEAN}});
  enums["Norm"] = enum_dict({{"L1", fastopt::NORM_L1}, {"L2", fastopt::NORM_L2}, {"LINF", fastopt::NORM_LINF}});
  enums["Eps"] = enum_dict({{"OUTSIDE", fastopt::EPS_OUTSIDE}, {"INSIDE", fastopt::EPS_INSIDE_ROOT}});
  enums["Curvature"] = enum_dict({{"GRADIENT", fastopt::CURVATURE_GRADIENT}, {"HVP", fastopt::CURVATURE_HVP}});
  enums["Schedule"] = enum_dict({{"CONSTANT", fastopt::SCHEDULE_CONSTANT},
                                 {"BIAS_CORRECTION", fastopt::SCHEDULE_BIAS_CORRECTION},
                                 {"TRUE_MEAN", fastopt::SCHEDULE_TRUE_MEAN},
                                 {"INCREASING", fastopt::SCHEDULE_INCREASING},
                                 {"NADAM", fastopt::SCHEDULE_NADAM}});
  enums["WeightDecay"] = enum_dict({{"L2", fastopt::WEIGHT_DECAY_L2}, {"DECOUPLED", fastopt::WEIGHT_DECAY_DECOUPLED}});
  enums["Extra"] = enum_dict(
      {{"NONE", fastopt::EXTRA_NONE}, {"ADADELTA", fastopt::EXTRA_ADADELTA}, {"RADAM", fastopt::EXTRA_RADAM}});
  mod.attr("ENUMS") = enums;

  mod.attr("SWITCH_SHIFTS") = enum_dict({{"MOMENTUM", fastopt::SHIFT_MOMENTUM},
                                         {"MOMENTUM_INPUT", fastopt::SHIFT_MOMENTUM_INPUT},
                                         {"DENOMINATOR", fastopt::SHIFT_DENOMINATOR},
                                         {"NORM", fastopt::SHIFT_NORM},
                                         {"EPS_INSIDE", fastopt::SHIFT_EPS_INSIDE},
                                         {"CENTERED", fastopt::SHIFT_CENTERED},
                                         {"AMSGRAD", fastopt::SHIFT_AMSGRAD},
                                         {"HVP", fastopt::SHIFT_HVP},
                                         {"ADADELTA", fastopt::SHIFT_ADADELTA},
                                         {"USE_DENOMINATOR", fastopt::SHIFT_USE_DENOMINATOR},
                                         {"HAS_L2", fastopt::SHIFT_HAS_L2},
                                         {"DECOUPLED", fastopt::SHIFT_DECOUPLED},
                                         {"MAXIMIZE", fastopt::SHIFT_MAXIMIZE},
                                         {"SCALE_GRAD", fastopt::SHIFT_SCALE_GRAD}});
  mod.attr("DTYPES") = enum_dict({{"float32", cpu::F32}, {"float64", cpu::F64}, {"bfloat16", cpu::BF16},
                                  {"float16", cpu::F16}});
  py::list roles, fields;
  for (const char* r : ROLE_NAMES) roles.append(r);
  for (const char* f : SCALAR_FIELDS) fields.append(f);
  mod.attr("ROLES") = py::tuple(roles);
  mod.attr("SCALAR_FIELDS") = py::tuple(fields);
  mod.attr("CHUNK") = cpu::CHUNK;
}
