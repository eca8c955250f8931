// Argument checks and scalar resolution shared by the CPU and CUDA implementations of legw_fused::fused_step_.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>

#include <type_traits>
#include <utility>
#include <vector>

#include "fused_step.h"
#include "legw_schedule.h"

namespace legw_fused {

// The C++ signature of legw_fused::fused_step_ and fused_step_triton_ (schemas: csrc/legw_fused.cpp): params,
// grads, momentum_buffers, master_params, step, schedule, lr_tensor, lr, momentum, dampening, weight_decay,
// nesterov, maximize, first_step, lars, trust_coefficient, eps, trust_clip, max_trust_ratio, grad_scale,
// found_inf, norms_sq, param_sq, param_sq_cached, advance_step.
using FusedStepFn = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, const at::Tensor&,
                         const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, double, double, double,
                         double, bool, bool, bool, bool, double, double, bool, double, const c10::optional<at::Tensor>&,
                         const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                         const c10::optional<at::Tensor>&, bool, bool);

// LARS norm caches: sums of squares per chunk of kParamSqChunk consecutive elements of one tensor, tensors in call
// order, empty tensors owning no chunk. The CPU and CUDA kernels both work in chunks of this size.
constexpr int64_t kParamSqChunk = 1 << 16;

inline int64_t param_sq_chunks(at::TensorList params) {
  int64_t chunks = 0;
  for (const auto& p : params) chunks += (p.numel() + kParamSqChunk - 1) / kParamSqChunk;
  return chunks;
}

// norms_sq: float32 [2, N]; param_sq: float32 [param_sq_chunks(params)]; both contiguous on the params'
// device. param_sq_cached needs param_sq.
inline void check_norm_args(const char* op, at::TensorList params, const c10::optional<at::Tensor>& norms_sq,
                            const c10::optional<at::Tensor>& param_sq, bool cached) {
  const auto device =
      params.empty() ? (param_sq.has_value() ? param_sq->device() : at::Device(at::kCPU)) : params[0].device();
  if (norms_sq.has_value()) {
    const auto n = static_cast<int64_t>(params.size());
    TORCH_CHECK(norms_sq->scalar_type() == at::kFloat && norms_sq->is_contiguous() && norms_sq->dim() == 2 &&
                    norms_sq->size(0) == 2 && norms_sq->size(1) == n && norms_sq->device() == device,
                op, ": norms_sq must be a contiguous float32 tensor of shape [2, ", n, "] on ", device, ", got ",
                norms_sq->scalar_type(), " ", norms_sq->sizes(), " on ", norms_sq->device());
  }
  TORCH_CHECK(!cached || param_sq.has_value(), op, ": param_sq_cached needs param_sq");
  if (param_sq.has_value()) {
    const int64_t chunks = param_sq_chunks(params);
    TORCH_CHECK(param_sq->scalar_type() == at::kFloat && param_sq->is_contiguous() && param_sq->dim() == 1 &&
                    param_sq->numel() == chunks && param_sq->device() == device,
                op, ": param_sq must be a contiguous 1-D float32 tensor of ", chunks, " elements (one per ",
                kParamSqChunk, "-element chunk of each param) on ", device, ", got ", param_sq->scalar_type(), " ",
                param_sq->sizes(), " on ", param_sq->device());
  }
}

// Lists: params [N tensors], grads [N], momentum_buffers [N or 0 when momentum == 0], master_params [N or 0].
// All tensors of one call share a device and the params' dtype (fp32, bf16 or fp16), are contiguous and match
// their param's numel; with master weights, masters and buffers are fp32. lr_tensor, grad_scale, found_inf: one
// value each. norms_sq, param_sq: see check_norm_args.
inline void check_fused_step_args(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                                  at::TensorList masters, const at::Tensor& step,
                                  const c10::optional<at::Tensor>& schedule, double momentum,
                                  const c10::optional<at::Tensor>& lr_tensor,
                                  const c10::optional<at::Tensor>& grad_scale,
                                  const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& norms_sq,
                                  const c10::optional<at::Tensor>& param_sq, bool param_sq_cached) {
  check_norm_args("fused_step_", params, norms_sq, param_sq, param_sq_cached);
  const auto n = params.size();
  TORCH_CHECK(grads.size() == n, "fused_step_: ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK(bufs.size() == (momentum != 0 ? n : 0),
              "fused_step_: momentum_buffers must hold one tensor per "
              "param when momentum != 0 and none otherwise; got ",
              bufs.size(), " for ", n, " params");
  TORCH_CHECK(masters.empty() || masters.size() == n, "fused_step_: master_params must be empty or one per param");
  TORCH_CHECK(step.scalar_type() == at::kLong && step.numel() == 1,
              "fused_step_: step must be a one-element "
              "int64 tensor");
  if (schedule.has_value()) {
    TORCH_CHECK(schedule->scalar_type() == at::kDouble && schedule->dim() == 1 && schedule->is_contiguous() &&
                    schedule->numel() > kNumMilestones,
                "fused_step_: schedule must be the contiguous 1-D float64 tensor LEGW.packed(device)");
  }
  if (n == 0) return;
  const auto dtype = params[0].scalar_type();
  const auto device = params[0].device();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fused_step_: params must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(masters.empty() || dtype != at::kFloat, "fused_step_: master weights are for bf16/fp16 params");
  const auto buf_dtype = masters.empty() ? dtype : at::kFloat;
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.scalar_type() == dtype && p.device() == device, "fused_step_: param ", i, " is ", p.scalar_type(),
                " on ", p.device(), "; the call's params are ", dtype, " on ", device);
    TORCH_CHECK(p.is_contiguous(), "fused_step_: param ", i, " is not contiguous");
    TORCH_CHECK(grads[i].scalar_type() == dtype && grads[i].device() == device && grads[i].numel() == p.numel() &&
                    grads[i].is_contiguous(),
                "fused_step_: grad ", i, " must be a contiguous ", dtype, " tensor of ", p.numel(), " elements on ",
                device);
    if (!bufs.empty()) {
      TORCH_CHECK(bufs[i].scalar_type() == buf_dtype && bufs[i].device() == device && bufs[i].numel() == p.numel() &&
                      bufs[i].is_contiguous(),
                  "fused_step_: momentum buffer ", i, " must be a contiguous ", buf_dtype, " tensor of ", p.numel(),
                  " elements on ", device);
    }
    if (!masters.empty()) {
      TORCH_CHECK(masters[i].scalar_type() == at::kFloat && masters[i].device() == device &&
                      masters[i].numel() == p.numel() && masters[i].is_contiguous(),
                  "fused_step_: master param ", i, " must be a contiguous float32 tensor of ", p.numel(),
                  " elements on ", device);
    }
  }
  TORCH_CHECK(step.device() == device, "fused_step_: step is on ", step.device(), ", params on ", device);
  TORCH_CHECK(!schedule.has_value() || schedule->device() == device, "fused_step_: schedule must be on ", device);
  const std::pair<const char*, const c10::optional<at::Tensor>*> scalars[] = {
      {"lr_tensor", &lr_tensor}, {"grad_scale", &grad_scale}, {"found_inf", &found_inf}};
  for (const auto& [name, t] : scalars) {  // one value each, read by the kernels
    TORCH_CHECK(!t->has_value() || ((*t)->numel() == 1 && (*t)->device() == device), "fused_step_: ", name,
                " must be a one-element tensor on ", device);
  }
}

// legw_fused::sum_squares: params [N], grads [N] of the params' dtype (fp32, bf16, fp16), masters [N fp32 or 0];
// contiguous, one device, matching numels; param_sq: see check_norm_args.
inline void check_sum_squares_args(at::TensorList params, at::TensorList grads, at::TensorList masters,
                                   const c10::optional<at::Tensor>& param_sq,
                                   const c10::optional<at::Tensor>& grad_scale) {
  check_norm_args("sum_squares", params, c10::nullopt, param_sq, false);
  const auto n = params.size();
  TORCH_CHECK(grads.size() == n, "sum_squares: ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK(masters.empty() || masters.size() == n, "sum_squares: master_params must be empty or one per param");
  if (n == 0) return;
  const auto dtype = params[0].scalar_type();
  const auto device = params[0].device();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "sum_squares: params must be float32, bfloat16 or float16, got ", dtype);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(params[i].scalar_type() == dtype && params[i].device() == device && params[i].is_contiguous(),
                "sum_squares: param ", i, " must be a contiguous ", dtype, " tensor on ", device);
    TORCH_CHECK(grads[i].scalar_type() == dtype && grads[i].device() == device && grads[i].is_contiguous() &&
                    grads[i].numel() == params[i].numel(),
                "sum_squares: grad ", i, " must be a contiguous ", dtype, " tensor of ", params[i].numel(),
                " elements on ", device);
    TORCH_CHECK(masters.empty() || (masters[i].scalar_type() == at::kFloat && masters[i].device() == device &&
                                    masters[i].is_contiguous() && masters[i].numel() == params[i].numel()),
                "sum_squares: master param ", i, " must be a contiguous float32 tensor of ", params[i].numel(),
                " elements on ", device);
  }
  TORCH_CHECK(!grad_scale.has_value() || (grad_scale->numel() == 1 && grad_scale->device() == device),
              "sum_squares: grad_scale must be a one-element tensor on ", device);
}

// Calls f(P{}) with P the C++ type of the params' dtype (float, c10::BFloat16, c10::Half).
template <typename F>
void dispatch_param_type(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    case at::kHalf:
      return f(c10::Half{});
    default:
      TORCH_CHECK(false, "fused_step_: unsupported param dtype ", type);
  }
}

// The update's scalars as torch.optim.SGD passes them to its ops: each Python double rounded once to fp32.
inline StepConfig step_config(double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                              bool first_step) {
  return StepConfig{static_cast<float>(momentum),
                    static_cast<float>(1.0 - dampening),
                    static_cast<float>(weight_decay),
                    nesterov,
                    maximize,
                    first_step};
}

// Calls f(std::bool_constant<flags>{}...): run-time flags as compile-time ones, to pick a kernel instantiation.
template <typename F>
void with_constants(F&& f) {
  f();
}

template <typename F, typename... Rest>
void with_constants(F&& f, bool flag, Rest... rest) {
  const auto bind = [&](auto constant) {
    with_constants([&](auto... constants) { f(constant, constants...); }, rest...);
  };
  flag ? bind(std::true_type{}) : bind(std::false_type{});
}

}  // namespace legw_fused
