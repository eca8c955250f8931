// The Python functions of legw_fused._C: the optimizer step's per-tensor host work in C++.
//
// group_params: every step, the optimizer finds the params of each group that have a gradient and buckets them by
// (device, dtype), noting whether they are contiguous (legw_fused/optim.py, _MomentumOptimizer._buckets). In Python
// that was five passes over the params (p.grad, g is None, g.is_sparse, torch's grouping, p.is_contiguous()): 80 us for
// 116 params with warm caches on the 2-core EPYC (the attribute getters cost 0.15-0.2 us each), 150 us cold, a share of
// a CPU step that should take no more time than its memory traffic. Here it is one loop over the tensors' C++ fields.
//
// Only plain tensors take this path: a param or grad of another Python type (DTensor, another subclass), a
// non-strided grad (sparse) or an active torch function mode make it return None, and the optimizer runs its
// Python passes, which give the same buckets (tests/test_optimizer_contract.py compares the two).
#include "step_python.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <exception>
#include <memory>
#include <optional>
#include <vector>

#include "fused_step_args.h"

namespace legw_fused {
namespace {

struct Unref {
  void operator()(PyObject* o) const { Py_XDECREF(o); }
};
using Ref = std::unique_ptr<PyObject, Unref>;  // an owned reference

struct Bucket {
  at::Device device;
  at::ScalarType dtype;
  Ref params;             // list
  Ref grads;              // list
  bool contiguous;        // all params
  bool grads_contiguous;  // all grads
};

// group_params(params) -> [(device, dtype, params, grads, contiguous, grads_contiguous)] | None
//   The params that have a gradient, bucketed by their (device, dtype) in the order of each bucket's first param,
//   with their grads, and whether all of the bucket's params, and all of its grads, are contiguous. None: not
//   plain tensors (see above).
PyObject* group_params(PyObject* /*module*/, PyObject* arg) {
  HANDLE_TH_ERRORS
  Ref seq(PySequence_Fast(arg, "group_params: params must be a sequence of tensors"));
  if (!seq) return nullptr;
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NONE;  // p.grad would run the mode's Python code
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.get());
  PyObject** items = PySequence_Fast_ITEMS(seq.get());
  std::vector<Bucket> buckets;  // few: one per (device, dtype) of the group
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* p = items[i];
    if (!THPVariable_CheckExact(p)) Py_RETURN_NONE;
    const at::Tensor& param = THPVariable_Unpack(p);
    const at::Tensor& grad = param.grad();
    if (!grad.defined()) continue;
    if (grad.layout() != at::kStrided) Py_RETURN_NONE;
    Ref g(THPVariable_Wrap(grad));  // the grad's own Python object, as p.grad returns it
    if (!g) return nullptr;
    if (!THPVariable_CheckExact(g.get())) Py_RETURN_NONE;
    const at::Device device = param.device();
    const at::ScalarType dtype = param.scalar_type();
    Bucket* b = nullptr;
    for (Bucket& c : buckets) {
      if (c.device == device && c.dtype == dtype) b = &c;
    }
    if (b == nullptr) {
      buckets.push_back({device, dtype, Ref(PyList_New(0)), Ref(PyList_New(0)), true, true});
      b = &buckets.back();
      if (!b->params || !b->grads) return nullptr;
    }
    if (PyList_Append(b->params.get(), p) < 0 || PyList_Append(b->grads.get(), g.get()) < 0) return nullptr;
    b->contiguous = b->contiguous && param.is_contiguous();
    b->grads_contiguous = b->grads_contiguous && grad.is_contiguous();
  }
  Ref out(PyList_New(static_cast<Py_ssize_t>(buckets.size())));
  if (!out) return nullptr;
  for (size_t k = 0; k < buckets.size(); ++k) {
    Bucket& b = buckets[k];
    PyObject* device = THPDevice_New(b.device);
    if (device == nullptr) return nullptr;
    PyObject* dtype = reinterpret_cast<PyObject*>(torch::getTHPDtype(b.dtype));
    Py_INCREF(dtype);
    PyObject* entry = PyTuple_Pack(6, device, dtype, b.params.get(), b.grads.get(), b.contiguous ? Py_True : Py_False,
                                   b.grads_contiguous ? Py_True : Py_False);
    Py_DECREF(device);
    Py_DECREF(dtype);
    if (entry == nullptr) return nullptr;
    PyList_SET_ITEM(out.get(), static_cast<Py_ssize_t>(k), entry);  // steals entry
  }
  return out.release();
  END_HANDLE_TH_ERRORS
}

// fused_step_unboxed(*args): legw_fused::fused_step_ entered through the dispatcher's typed entry instead of
// torch.ops. The same op and dispatch (ADInplaceOrView's version bumps, Python dispatch modes, fake and meta
// tensors, every device's kernel): only the way in differs. torch.ops parses every argument into a boxed stack and
// destroys it with the GIL released, taking the GIL back once per tensor to hand its Python object back; here the
// lists become vectors of Tensors with the GIL held, reach the kernel by reference (the ADInplaceOrView kernel is
// typed, csrc/legw_fused.cpp) and are released with the GIL held. Positional arguments exactly as the schema's
// (csrc/legw_fused.cpp), all 25: anything it would not take as it is (another count, a bool given as an int, a
// tensor subclass, which may override __torch_function__) returns NotImplemented, and the caller takes torch.ops,
// which then runs the call or raises its own error. Not traceable by torch.compile: the caller uses torch.ops.

// A list of exact tensors into `out`; false (nothing raised) if `obj` is not a list or holds anything else.
bool tensors_from_list(PyObject* obj, std::vector<at::Tensor>& out) {
  if (!PyList_Check(obj)) return false;
  const Py_ssize_t n = PyList_GET_SIZE(obj);
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(obj, i);
    if (!THPVariable_CheckExact(item)) return false;
    out.push_back(THPVariable_Unpack(item));
  }
  return true;
}

// None or an exact tensor into `out`; false if neither.
bool optional_tensor(PyObject* obj, c10::optional<at::Tensor>& out) {
  if (obj == Py_None) return true;
  if (!THPVariable_CheckExact(obj)) return false;
  out = THPVariable_Unpack(obj);
  return true;
}

// A Python float or int as the schema's float; false for anything else (bool included).
bool as_double(PyObject* obj, double& out) {
  if (!PyFloat_CheckExact(obj) && !PyLong_CheckExact(obj)) return false;
  out = PyFloat_AsDouble(obj);
  return !PyErr_Occurred();
}

bool as_bool(PyObject* obj, bool& out) {
  if (!PyBool_Check(obj)) return false;
  out = obj == Py_True;
  return true;
}

// The GIL released for a scope, and taken back however the scope ends (a kernel may throw).
struct GilReleased {
  PyThreadState* state = PyEval_SaveThread();
  ~GilReleased() { PyEval_RestoreThread(state); }
};

PyObject* fused_step_unboxed(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  constexpr Py_ssize_t kArgs = 25;
  if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) != kArgs) Py_RETURN_NOTIMPLEMENTED;
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;  // torch.ops would run the mode
  const auto arg = [&](int i) { return PyTuple_GET_ITEM(args, i); };
  std::vector<at::Tensor> params, grads, bufs, masters;
  c10::optional<at::Tensor> schedule, lr_tensor, grad_scale, found_inf, norms_sq, param_sq;
  double lr, momentum, dampening, weight_decay, trust_coefficient, eps, max_trust_ratio;
  bool nesterov, maximize, first_step, lars, trust_clip, param_sq_cached, advance_step;
  const bool taken =
      tensors_from_list(arg(0), params) && tensors_from_list(arg(1), grads) && tensors_from_list(arg(2), bufs) &&
      tensors_from_list(arg(3), masters) && THPVariable_CheckExact(arg(4)) && optional_tensor(arg(5), schedule) &&
      optional_tensor(arg(6), lr_tensor) && as_double(arg(7), lr) && as_double(arg(8), momentum) &&
      as_double(arg(9), dampening) && as_double(arg(10), weight_decay) && as_bool(arg(11), nesterov) &&
      as_bool(arg(12), maximize) && as_bool(arg(13), first_step) && as_bool(arg(14), lars) &&
      as_double(arg(15), trust_coefficient) && as_double(arg(16), eps) && as_bool(arg(17), trust_clip) &&
      as_double(arg(18), max_trust_ratio) && optional_tensor(arg(19), grad_scale) &&
      optional_tensor(arg(20), found_inf) && optional_tensor(arg(21), norms_sq) && optional_tensor(arg(22), param_sq) &&
      as_bool(arg(23), param_sq_cached) && as_bool(arg(24), advance_step);
  if (!taken) {
    PyErr_Clear();  // an int too large for a double: torch.ops says so itself
    Py_RETURN_NOTIMPLEMENTED;
  }
  const at::Tensor& step = THPVariable_Unpack(arg(4));
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("legw_fused::fused_step_", "").typed<FusedStepFn>();
  {
    const GilReleased no_gil;
    op.call(params, grads, bufs, masters, step, schedule, lr_tensor, lr, momentum, dampening, weight_decay, nesterov,
            maximize, first_step, lars, trust_coefficient, eps, trust_clip, max_trust_ratio, grad_scale, found_inf,
            norms_sq, param_sq, param_sq_cached, advance_step);
  }
  Py_RETURN_NONE;  // the vectors are released here, with the GIL held
  END_HANDLE_TH_ERRORS
}

// param_states(state, params, step) -> (states, momentum_buffers) | None
//   Per param, its state dict `state[p]` (made by `state`'s default factory where missing, as torch.optim's
//   defaultdict does), with state["step"] = step set, and its state's "momentum_buffer" (None where absent). None
//   unless all params are exact tensors (a subclass may define its own __hash__).
PyObject* param_states(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *state = nullptr, *params = nullptr, *step = nullptr;
  if (!PyArg_ParseTuple(args, "OOO", &state, &params, &step)) return nullptr;
  static PyObject* const kStep = PyUnicode_InternFromString("step");
  static PyObject* const kMomentumBuffer = PyUnicode_InternFromString("momentum_buffer");
  if (kStep == nullptr || kMomentumBuffer == nullptr) return nullptr;
  Ref seq(PySequence_Fast(params, "param_states: params must be a sequence of tensors"));
  if (!seq) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.get());
  PyObject** items = PySequence_Fast_ITEMS(seq.get());
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_CheckExact(items[i])) Py_RETURN_NONE;
  }
  Ref states(PyList_New(n)), bufs(PyList_New(n));
  if (!states || !bufs) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* st = PyObject_GetItem(state, items[i]);  // new reference; a defaultdict makes a missing entry
    if (st == nullptr) return nullptr;
    PyList_SET_ITEM(states.get(), i, st);
    if (!PyDict_Check(st)) Py_RETURN_NONE;  // not torch.optim's state: the caller's Python handles it
    if (PyDict_SetItem(st, kStep, step) < 0) return nullptr;
    PyObject* buf = PyDict_GetItemWithError(st, kMomentumBuffer);  // borrowed
    if (buf == nullptr && PyErr_Occurred()) return nullptr;
    PyList_SET_ITEM(bufs.get(), i, Py_NewRef(buf == nullptr ? Py_None : buf));
  }
  return PyTuple_Pack(2, states.get(), bufs.get());
  END_HANDLE_TH_ERRORS
}

// tensor_versions(tensors, data_ptrs) -> ([t._version], [t.data_ptr()] if data_ptrs else None) | None
//   What LARS's |p|^2 cache checks every step, per tensor, in one pass (for ~100 tensors a map over the Python
//   getters costs ~20 us each, warm). None unless all are exact tensors (a subclass may route these getters
//   through __torch_function__): the caller then maps the getters.
PyObject* tensor_versions(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* tensors = nullptr;
  int with_ptrs = 0;
  if (!PyArg_ParseTuple(args, "Op", &tensors, &with_ptrs)) return nullptr;
  Ref seq(PySequence_Fast(tensors, "tensor_versions: tensors must be a sequence of tensors"));
  if (!seq) return nullptr;
  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NONE;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.get());
  PyObject** items = PySequence_Fast_ITEMS(seq.get());
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_CheckExact(items[i])) Py_RETURN_NONE;
  }
  Ref versions(PyList_New(n)), ptrs(with_ptrs ? PyList_New(n) : Py_NewRef(Py_None));
  if (!versions || !ptrs) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& t = THPVariable_Unpack(items[i]);
    PyObject* v = PyLong_FromLongLong(t._version());  // raises for inference tensors, as t._version does
    if (v == nullptr) return nullptr;
    PyList_SET_ITEM(versions.get(), i, v);
    if (with_ptrs) {
      PyObject* ptr = PyLong_FromVoidPtr(t.data_ptr());
      if (ptr == nullptr) return nullptr;
      PyList_SET_ITEM(ptrs.get(), i, ptr);
    }
  }
  return PyTuple_Pack(2, versions.get(), ptrs.get());
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"group_params", group_params, METH_O,
     "group_params(params) -> [(device, dtype, params, grads, contiguous, grads_contiguous)] | None: the params "
     "with a gradient, bucketed by (device, dtype) in the order of each bucket's first param (None unless all are "
     "plain tensors with strided grads)."},
    {"fused_step_unboxed", fused_step_unboxed, METH_VARARGS,
     "fused_step_unboxed(*args): legw_fused::fused_step_ through the dispatcher's typed entry (the schema's 25 "
     "positional arguments); NotImplemented for anything but exact tensors and the schema's scalar types."},
    {"param_states", param_states, METH_VARARGS,
     "param_states(state, params, step) -> (states, momentum_buffers) | None: state[p] per param with its 'step' "
     "set to step, and its 'momentum_buffer' or None (None unless all are exact tensors)."},
    {"tensor_versions", tensor_versions, METH_VARARGS,
     "tensor_versions(tensors, data_ptrs) -> ([t._version], [t.data_ptr()] or None) | None (None unless all are "
     "exact tensors)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* python_methods() { return methods; }

}  // namespace legw_fused
