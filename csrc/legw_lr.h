// Argument checks shared by the CPU and CUDA implementations of legw_fused::legw_lr.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "legw_schedule.h"

namespace legw_fused {

inline void check_legw_lr_args(const at::Tensor& step, const at::Tensor& schedule) {
  TORCH_CHECK(step.scalar_type() == at::kLong, "legw_lr: step must be an int64 tensor, got ", step.scalar_type());
  TORCH_CHECK(schedule.scalar_type() == at::kDouble && schedule.dim() == 1,
              "legw_lr: schedule must be the 1-D float64 tensor LEGW.packed(device), got ", schedule.scalar_type(),
              " with ", schedule.dim(), " dims");
  TORCH_CHECK(schedule.numel() > kNumMilestones, "legw_lr: schedule has ", schedule.numel(),
              " entries, fewer than the fixed header of ", kNumMilestones + 1);
  TORCH_CHECK(step.device() == schedule.device(), "legw_lr: step (", step.device(), ") and schedule (",
              schedule.device(), ") must be on the same device");
}

// Host-side check of a packed schedule's header (CPU tensors only: reading it on CUDA would sync).
inline void check_packed_schedule_cpu(const at::Tensor& sched, const char* op) {
  TORCH_CHECK(sched.is_contiguous() && sched.numel() > kNumMilestones, op, ": schedule has ", sched.numel(),
              " entries, fewer than the fixed header of ", kNumMilestones + 1);
  const double* s = sched.data_ptr<double>();
  const int64_t n_milestones = static_cast<int64_t>(s[kNumMilestones]);
  TORCH_CHECK(sched.numel() == kFirstMilestone + n_milestones, op, ": schedule holds ", sched.numel(),
              " entries but its header announces ", n_milestones, " milestones");
  TORCH_CHECK(s[kDecay] >= 0 && s[kDecay] < kNumDecays, op, ": unknown decay code ", s[kDecay]);
}

}  // namespace legw_fused
