// Op schemas of the legw_fused library: every op is defined here, once, and implemented per device beside its
// kernels: csrc/<op>.cpp (CPU), csrc/cuda/<op>.cu (CUDA), and the Triton ops in legw_fused/ops/fused_step.py.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <string>

#include "lstm.h"

extern "C" {
// Importing legw_fused._C loads this shared library, which registers the ops below with the dispatcher.
// No pybind11: it would only add compile time.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef LEGW_FUSED_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  PyModule_AddIntConstant(m, "LSTM_CPU_SEQUENCE", legw_fused::lstm::cpu_sequence_kernel() ? 1 : 0);
  PyModule_AddStringConstant(m, "LSTM_CPU_ROWS", legw_fused::lstm::cpu_rows_isa());
  return m;
}
}

TORCH_LIBRARY(legw_fused, m) {
  // LEGW learning rate of every step count in `step` (an int64 tensor of any shape), read from the packed
  // float64 schedule (LEGW.packed). Returns float64 of step's shape. The fused step kernels inline the same math.
  m.def("legw_lr(Tensor step, Tensor schedule) -> Tensor");

  // One SGD/LARS step over lists of same-device, same-dtype tensors (the math: legw_fused/ops/fused_step_reference.py).
  // LR: schedule(step) when `schedule` (LEGW.packed) is given, else lr_tensor, else lr. `step` is only read:
  // the optimizer advances it after all of a step's calls. With found_inf != 0 nothing is written; grads are
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
           "Tensor step, Tensor? schedule, Tensor? lr_tensor, float lr, float momentum, float dampening, "
           "float weight_decay, bool nesterov, bool maximize, bool first_step, bool lars, float trust_coefficient, "
           "float eps, bool trust_clip, float max_trust_ratio, Tensor? grad_scale, Tensor? found_inf, "
           "Tensor? norms_sq, Tensor(d!)? param_sq, bool param_sq_cached) -> ()")
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

// fused_step_ writes its params, buffers, masters and |p|^2 chunk sums in place, so like any in-place op it must bump
// their version counters: autograd then refuses a backward through a graph that saved the old values (instead of
// silently using the new ones), and the optimizer's |p|^2 cache sees the writes. Custom ops get no such kernel by
// default, and torch's boxed fallback (autogradNotImplementedInplaceOrViewFallback) bumps only written tensors that
// are also returned: this op returns nothing. So: run the kernel, then bump every argument the schema marks as
// written (Tensor(a!), Tensor(a!)[] and Tensor(a!)?); a kernel that raises has changed nothing and bumps nothing.
namespace {
void bump_written_after(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t start = stack->size() - args.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i].alias_info() == nullptr || !args[i].alias_info()->isWrite()) continue;
    const c10::IValue& v = (*stack)[start + i];
    if (v.isTensor()) {
      written.push_back(v.toTensor());
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorVector()) written.push_back(t);
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) {
    if (t.defined()) torch::autograd::impl::bump_version(t);
  }
}
}  // namespace

TORCH_LIBRARY_IMPL(legw_fused, ADInplaceOrView, m) {
  m.impl("fused_step_", torch::CppFunction::makeFromBoxedFunction<&bump_written_after>());
  m.impl("fused_step_triton_", torch::CppFunction::makeFromBoxedFunction<&bump_written_after>());
}
