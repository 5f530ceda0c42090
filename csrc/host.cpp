// fastopt._host: a step's per-tensor host work (addresses, sizes, layout checks) in C++.
//
// Read from Python, each of these costs 35 to 70 ns per tensor (an attribute call and a
// boxed result), so a step over a thousand tensors spent a millisecond on them: more than
// an H100 takes to run Adam over 1000 x 64k elements. Here they cost a few ns each.
//
// Unlike fastopt._C this module links libtorch (it reads the tensors themselves), so it is
// built against the installed torch and only used with that torch version (TORCH_VERSION
// below); fastopt falls back to Python (fastopt/tensor_lists.py) where it is missing, fails
// to import or was built for another torch. Every
// function takes a list of tensors and returns None when it cannot answer for all of
// them (a tensor subclass, a tensor without storage): the caller then asks Python.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/version.h>

#include <cstdint>
#include <exception>

namespace {

// The list's items as tensors, or false if one is not a plain torch.Tensor or Parameter
// (subclasses such as DTensor may define sizes, strides and data differently).
bool plain_tensors(PyObject* list, const char* what) {
  if (!PyList_Check(list)) {
    PyErr_Format(PyExc_TypeError, "fastopt._host: %s must be a list of tensors", what);
    return false;
  }
  const Py_ssize_t n = PyList_GET_SIZE(list);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_CheckExact(PyList_GET_ITEM(list, i))) return false;
  }
  return true;
}

const at::Tensor& tensor_at(PyObject* list, Py_ssize_t i) { return THPVariable_Unpack(PyList_GET_ITEM(list, i)); }

// A bytes object of n int64 values, each f(tensor i); None where a tensor cannot answer.
template <typename F>
PyObject* int64_bytes(PyObject* list, F f) {
  if (!plain_tensors(list, "the argument")) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
  }
  const Py_ssize_t n = PyList_GET_SIZE(list);
  PyObject* out = PyBytes_FromStringAndSize(nullptr, n * static_cast<Py_ssize_t>(sizeof(int64_t)));
  if (out == nullptr) return nullptr;
  auto* dst = reinterpret_cast<int64_t*>(PyBytes_AS_STRING(out));
  try {
    for (Py_ssize_t i = 0; i < n; ++i) dst[i] = f(tensor_at(list, i));
  } catch (const std::exception&) {  // e.g. data_ptr() of a tensor without storage
    Py_DECREF(out);
    Py_RETURN_NONE;
  }
  return out;
}

PyObject* addresses(PyObject*, PyObject* list) {
  return int64_bytes(list, [](const at::Tensor& t) { return reinterpret_cast<int64_t>(t.data_ptr()); });
}

PyObject* numels(PyObject*, PyObject* list) {
  return int64_bytes(list, [](const at::Tensor& t) { return static_cast<int64_t>(t.numel()); });
}

// grads(params): each param's .grad as a new list, or None if a param has none or is not a
// plain tensor (the caller then reads them in Python).
PyObject* grads(PyObject*, PyObject* list) {
  if (!plain_tensors(list, "params")) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
  }
  const Py_ssize_t n = PyList_GET_SIZE(list);
  PyObject* out = PyList_New(n);
  if (out == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& grad = tensor_at(list, i).grad();
    if (!grad.defined()) {
      Py_DECREF(out);
      Py_RETURN_NONE;
    }
    PyObject* wrapped = THPVariable_Wrap(grad);  // the grad's own Python object
    if (wrapped == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, i, wrapped);
  }
  return out;
}

PyObject* all_plain(PyObject*, PyObject* list) {
  if (plain_tensors(list, "the argument")) Py_RETURN_TRUE;
  if (PyErr_Occurred()) return nullptr;
  Py_RETURN_FALSE;
}

// Whether key(tensor) is the same for every tensor of the list; None where one is not plain.
template <typename Key>
PyObject* all_same(PyObject* list, Key key) {
  if (!plain_tensors(list, "the argument")) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
  }
  const Py_ssize_t n = PyList_GET_SIZE(list);
  if (n == 0) Py_RETURN_TRUE;
  const auto first = key(tensor_at(list, 0));
  for (Py_ssize_t i = 1; i < n; ++i) {
    if (key(tensor_at(list, i)) != first) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

PyObject* one_device(PyObject*, PyObject* list) {
  return all_same(list, [](const at::Tensor& t) { return t.device(); });
}

PyObject* one_dtype(PyObject*, PyObject* list) {
  return all_same(list, [](const at::Tensor& t) { return t.dtype(); });
}

PyObject* all_contiguous(PyObject*, PyObject* list) {
  if (!plain_tensors(list, "the argument")) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
  }
  const Py_ssize_t n = PyList_GET_SIZE(list);
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!tensor_at(list, i).is_contiguous()) Py_RETURN_FALSE;
    }
  } catch (const std::exception&) {
    Py_RETURN_NONE;
  }
  Py_RETURN_TRUE;
}

// first_mismatch(tensors, like): the index of the first tensor that is not a strided
// tensor with the dtype, device and shape of the same index of `like` (-1 if none).
PyObject* first_mismatch(PyObject*, PyObject* args) {
  PyObject *list = nullptr, *like = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &list, &like)) return nullptr;
  if (!plain_tensors(list, "tensors") || !plain_tensors(like, "like")) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
  }
  const Py_ssize_t n = PyList_GET_SIZE(list);
  if (PyList_GET_SIZE(like) != n) Py_RETURN_NONE;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      const at::Tensor& t = tensor_at(list, i);
      const at::Tensor& ref = tensor_at(like, i);
      if (t.layout() != c10::kStrided || t.scalar_type() != ref.scalar_type() || t.device() != ref.device() ||
          t.sizes() != ref.sizes()) {
        return PyLong_FromSsize_t(i);
      }
    }
  } catch (const std::exception&) {
    Py_RETURN_NONE;
  }
  return PyLong_FromLong(-1);
}

// cpu_addresses(tensors, numels): each tensor's data_ptr() as a list of ints when every
// tensor is a contiguous CPU tensor with the first one's dtype and the number of elements
// given for its index (numels: int64 bytes as numels() returns, or None to skip that check);
// else None, and the caller looks at them in Python (to copy or to say what is wrong). The
// CPU backend's checks of one role of a step in one call, not five passes.
PyObject* cpu_addresses(PyObject*, PyObject* args) {
  PyObject *list = nullptr, *sizes = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &list, &sizes)) return nullptr;
  if (!plain_tensors(list, "tensors")) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
  }
  const Py_ssize_t n = PyList_GET_SIZE(list);
  const int64_t* expected = nullptr;
  if (sizes != Py_None) {
    if (!PyBytes_Check(sizes) || PyBytes_GET_SIZE(sizes) != n * static_cast<Py_ssize_t>(sizeof(int64_t))) {
      Py_RETURN_NONE;
    }
    expected = reinterpret_cast<const int64_t*>(PyBytes_AS_STRING(sizes));
  }
  PyObject* out = PyList_New(n);
  if (out == nullptr) return nullptr;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      const at::Tensor& t = tensor_at(list, i);
      const bool fits = t.layout() == c10::kStrided && t.device().is_cpu() && t.is_contiguous() &&
                        t.scalar_type() == tensor_at(list, 0).scalar_type() &&
                        (expected == nullptr || t.numel() == expected[i]);
      PyObject* address = fits ? PyLong_FromVoidPtr(t.data_ptr()) : nullptr;
      if (address == nullptr) {
        Py_DECREF(out);
        if (PyErr_Occurred()) return nullptr;
        Py_RETURN_NONE;
      }
      PyList_SET_ITEM(out, i, address);
    }
  } catch (const std::exception&) {  // a tensor without storage
    Py_DECREF(out);
    Py_RETURN_NONE;
  }
  return out;
}

PyMethodDef methods[] = {
    {"addresses", addresses, METH_O, "data_ptr() of each tensor, as int64 bytes (None: ask Python)."},
    {"numels", numels, METH_O, "numel() of each tensor, as int64 bytes (None: ask Python)."},
    {"grads", grads, METH_O, "Each param's .grad, or None if one has none (or is not a plain tensor)."},
    {"all_plain", all_plain, METH_O, "Whether every item is a torch.Tensor or Parameter (no subclass)."},
    {"one_device", one_device, METH_O, "Whether every tensor is on the first one's device (None: ask Python)."},
    {"one_dtype", one_dtype, METH_O, "Whether every tensor has the first one's dtype (None: ask Python)."},
    {"all_contiguous", all_contiguous, METH_O, "Whether every tensor is contiguous (None: ask Python)."},
    {"first_mismatch", first_mismatch, METH_VARARGS,
     "first_mismatch(tensors, like): the first index whose tensor is not strided with like's dtype,\n"
     "device and shape; -1 if none (None: ask Python)."},
    {"cpu_addresses", cpu_addresses, METH_VARARGS,
     "cpu_addresses(tensors, numels): data_ptr() of each, when all are contiguous CPU tensors of one\n"
     "dtype with the given element counts (int64 bytes, or None); else None."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_host", "A step's per-tensor host work, read in C++.", -1, methods};

}  // namespace

// The torch this module was compiled against: the Python side uses it only with that very
// torch, since the tensor layouts its inlined accessors read may change between versions.
#define FASTOPT_STR2(x) #x
#define FASTOPT_STR(x) FASTOPT_STR2(x)

PyMODINIT_FUNC PyInit__host() {
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  const char* built_for =
      FASTOPT_STR(TORCH_VERSION_MAJOR) "." FASTOPT_STR(TORCH_VERSION_MINOR) "." FASTOPT_STR(TORCH_VERSION_PATCH);
  if (PyModule_AddStringConstant(m, "TORCH_VERSION", built_for) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
