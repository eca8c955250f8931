// Argument checks and scalar resolution shared by the CPU and CUDA implementations of legw_fused::fused_step_.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <vector>

namespace legw_fused {

// Lists: params [N tensors], grads [N], momentum_buffers [N or 0 when momentum == 0], master_params [N or 0].
// All tensors of one call share a device and the params' dtype (fp32, bf16 or fp16), are contiguous and match
// their param's numel; with master weights, masters and buffers are fp32.
inline void check_fused_step_args(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                                  at::TensorList masters, const at::Tensor& step,
                                  const c10::optional<at::Tensor>& schedule, double momentum) {
  const auto n = params.size();
  TORCH_CHECK(grads.size() == n, "fused_step_: ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK(bufs.size() == (momentum != 0 ? n : 0), "fused_step_: momentum_buffers must hold one tensor per "
              "param when momentum != 0 and none otherwise; got ", bufs.size(), " for ", n, " params");
  TORCH_CHECK(masters.empty() || masters.size() == n, "fused_step_: master_params must be empty or one per param");
  TORCH_CHECK(step.scalar_type() == at::kLong && step.numel() == 1, "fused_step_: step must be a one-element "
              "int64 tensor");
  if (schedule.has_value()) {
    TORCH_CHECK(schedule->scalar_type() == at::kDouble && schedule->dim() == 1,
                "fused_step_: schedule must be the 1-D float64 tensor LEGW.packed(device)");
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
    TORCH_CHECK(p.scalar_type() == dtype && p.device() == device, "fused_step_: param ", i, " is ",
                p.scalar_type(), " on ", p.device(), "; the call's params are ", dtype, " on ", device);
    TORCH_CHECK(p.is_contiguous(), "fused_step_: param ", i, " is not contiguous");
    TORCH_CHECK(grads[i].scalar_type() == dtype && grads[i].device() == device &&
                    grads[i].numel() == p.numel() && grads[i].is_contiguous(),
                "fused_step_: grad ", i, " must be a contiguous ", dtype, " tensor of ", p.numel(),
                " elements on ", device);
    if (!bufs.empty()) {
      TORCH_CHECK(bufs[i].scalar_type() == buf_dtype && bufs[i].device() == device &&
                      bufs[i].numel() == p.numel() && bufs[i].is_contiguous(),
                  "fused_step_: momentum buffer ", i, " must be a contiguous ", buf_dtype, " tensor of ",
                  p.numel(), " elements on ", device);
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
}

}  // namespace legw_fused
