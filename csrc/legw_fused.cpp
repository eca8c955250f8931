// Op schemas of the legw_fused library: every op is defined here, once, and implemented per device beside its
// kernels: csrc/<op>.cpp (CPU), csrc/cuda/<op>.cu (CUDA), and the Triton ops in legw_fused/ops/fused_step.py.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <string>

#include "fused_step_args.h"
#include "lstm.h"
#include "step_python.h"

extern "C" {
// Importing legw_fused._C loads this shared library, which registers the ops below with the dispatcher; its Python
// functions do the optimizer step's per-tensor host work (csrc/step_python.cpp). No pybind11: it would only add
// compile time.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, legw_fused::python_methods()};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef LEGW_FUSED_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  PyModule_AddIntConstant(m, "LSTM_CPU_SEQUENCE", legw_fused::lstm::cpu_sequence_kernel() ? 1 : 0);
  PyModule_AddStringConstant(m, "LSTM_CPU_ROWS", legw_fused::lstm::cpu_rows_isa());
  try {
    PyModule_AddStringConstant(m, "LSTM_CPU_GEMM", legw_fused::lstm::cpu_sequence_gemm());
    PyModule_AddIntConstant(m, "LSTM_CPU_BLAS", legw_fused::lstm::cpu_blas_sgemm() ? 1 : 0);
  } catch (const c10::Error& e) {  // a bad LEGW_FUSED_LSTM_CPU_GEMM: the import fails with the reason
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
}

TORCH_LIBRARY(legw_fused, m) {
  // LEGW learning rate of every step count in `step` (an int64 tensor of any shape), read from the packed
  // float64 schedule (LEGW.packed). Returns float64 of step's shape. The fused step kernels inline the same math.
  m.def("legw_lr(Tensor step, Tensor schedule) -> Tensor");

  // One SGD/LARS step over lists of same-device, same-dtype tensors (the math: legw_fused/ops/fused_step_reference.py).
  // LR: schedule(step) when `schedule` (LEGW.packed) is given, else lr_tensor, else lr. With advance_step the call
  // then adds 1 to `step` (not when found_inf skips it): the optimizer's last call on a device advances the count
  // that its other calls only read (on a CPU a separate add_ costs a cold step ~0.1 ms). With found_inf != 0 nothing
  // is written; grads are
  // multiplied by 1/grad_scale as they are read and never written (and negated with maximize). master_params
  // (fp32, optional) are the values updated for bf16/fp16 params, which then receive their rounding.
  // LARS: the trust ratio is clamped to at most max_trust_ratio (+inf: no clamp), then clipped by trust_clip.
  // LARS norms (float32 sums of squares): with `norms_sq` ([2, N]: row 0 sum p^2, row 1 sum (g/grad_scale)^2, e.g.
  // all-reduced over the ranks of a sharded model) the trust ratios come from it and no norm pass is made.
  // `param_sq`, the |p|^2 cache (one float per chunk of kParamSqChunk elements, tensors in order,
  // csrc/fused_step_args.h), receives the sum of squares of every chunk's stored values after the call (the fp32
  // master where there is one; the unchanged values when found_inf skips the step); with `param_sq_cached` the
  // call first reads it as the chunk sums of the current params instead of reading the params for their norm.
  // fused_step_triton_ is the same op on the Triton kernels (kernels/fused_step.py; registered from Python):
  // an op of its own because backend= chooses between the two kinds of kernel on one device.
  for (const char* name : {"fused_step_", "fused_step_triton_"}) {
    m.def((std::string(name) +
           "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] master_params, "
           "Tensor(e!) step, Tensor? schedule, Tensor? lr_tensor, float lr, float momentum, float dampening, "
           "float weight_decay, bool nesterov, bool maximize, bool first_step, bool lars, float trust_coefficient, "
           "float eps, bool trust_clip, float max_trust_ratio, Tensor? grad_scale, Tensor? found_inf, "
           "Tensor? norms_sq, Tensor(d!)? param_sq, bool param_sq_cached, bool advance_step=False) -> ()")
              .c_str());
  }

  // Per-tensor sums of squares, float32 [2, N]: row 0 of the params (of the fp32 masters where given; summed from
  // `param_sq`, fused_step_'s |p|^2 cache, where given, without reading the params), row 1 of the grads
  // multiplied by 1/grad_scale. The local half of LARS's norms under sharding, reduced over ranks by the caller.
  for (const char* name : {"sum_squares", "sum_squares_triton"}) {
    m.def((std::string(name) +
           "(Tensor[] params, Tensor[] grads, Tensor[] master_params, Tensor? param_sq, Tensor? grad_scale) -> "
           "Tensor")
              .c_str());
  }

  // One LSTM layer, one direction (csrc/lstm.cpp). Returns (out [T,B,H], h_n [B,H], c_n [B,H], gates [T,B,4H]
  // (activated, for backward), cs [T,B,H] (cell states in fp32/fp64, for backward)).
  m.def(
      "lstm_layer_fwd(Tensor x, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor h0, Tensor c0, "
      "bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Its backward: gradients of out/h_n/c_n in (any may be absent), returns (dx, dw_ih, dw_hh, db, dh0, dc0);
  // db is the gradient of both b_ih and b_hh; dx is empty ([0]) unless compute_dx.
  m.def(
      "lstm_layer_bwd(Tensor? dout, Tensor? dh_n, Tensor? dc_n, Tensor x, Tensor w_ih, Tensor w_hh, Tensor h0, "
      "Tensor c0, Tensor out, Tensor gates, Tensor cs, bool reverse, bool compute_dx) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The forward where no gradient will be taken (CPU): (out, h_n, c_n), keeping nothing for a backward.
  m.def(
      "lstm_layer_infer(Tensor x, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor h0, Tensor c0, "
      "bool reverse) -> (Tensor, Tensor, Tensor)");
}

// fused_step_ writes its params, buffers, masters, |p|^2 chunk sums and step count in place, so like any in-place
// op it must bump their version counters: autograd then refuses a backward through a graph that saved the old values
// (instead of silently using the new ones), and the optimizer's |p|^2 cache sees the writes. Custom ops get no such
// kernel by default, and torch's boxed fallback (autogradNotImplementedInplaceOrViewFallback) bumps only written
// tensors that are also returned: this op returns nothing. So: run the kernel, then bump every argument the schema
// marks as written (Tensor(a!)[] params, Tensor(b!)[] momentum_buffers, Tensor(c!)[] master_params, Tensor(d!)?
// param_sq, Tensor(e!) step); a kernel that raises has changed nothing and bumps nothing. Typed, not boxed: the
// lists reach the device kernel by reference instead of being copied into a stack and out of it again (each copy
// of a tensor that has a Python object touches its reference counts).
namespace {
template <const char* kOp>
void fused_step_inplace(c10::DispatchKeySet keys, at::TensorList params, at::TensorList grads, at::TensorList bufs,
                        at::TensorList masters, const at::Tensor& step, const c10::optional<at::Tensor>& schedule,
                        const c10::optional<at::Tensor>& lr_tensor, double lr, double momentum, double dampening,
                        double weight_decay, bool nesterov, bool maximize, bool first_step, bool lars,
                        double trust_coefficient, double eps, bool trust_clip, double max_trust_ratio,
                        const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                        const c10::optional<at::Tensor>& norms_sq, const c10::optional<at::Tensor>& param_sq,
                        bool param_sq_cached, bool advance_step) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(kOp, "").typed<legw_fused::FusedStepFn>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, params, grads, bufs, masters, step, schedule, lr_tensor, lr,
                  momentum, dampening, weight_decay, nesterov, maximize, first_step, lars, trust_coefficient, eps,
                  trust_clip, max_trust_ratio, grad_scale, found_inf, norms_sq, param_sq, param_sq_cached,
                  advance_step);
  }
  for (const at::TensorList list : {params, bufs, masters}) {
    for (const at::Tensor& t : list) {
      if (t.defined()) torch::autograd::impl::bump_version(t);
    }
  }
  if (param_sq.has_value()) torch::autograd::impl::bump_version(*param_sq);
  torch::autograd::impl::bump_version(step);
}

constexpr char kFusedStep[] = "legw_fused::fused_step_";
constexpr char kFusedStepTriton[] = "legw_fused::fused_step_triton_";
}  // namespace

TORCH_LIBRARY_IMPL(legw_fused, ADInplaceOrView, m) {
  m.impl("fused_step_", TORCH_FN(fused_step_inplace<kFusedStep>));
  m.impl("fused_step_triton_", TORCH_FN(fused_step_inplace<kFusedStepTriton>));
}
