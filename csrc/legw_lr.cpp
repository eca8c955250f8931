// CPU implementation of legw_fused::legw_lr.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "legw_lr.h"

namespace legw_fused {

at::Tensor legw_lr_cpu(const at::Tensor& step, const at::Tensor& schedule) {
  check_legw_lr_args(step, schedule);
  const at::Tensor sched = schedule.contiguous();
  check_packed_schedule_cpu(sched, "legw_lr");
  const double* s = sched.data_ptr<double>();

  const at::Tensor t = step.contiguous();
  at::Tensor out = at::empty(t.sizes(), t.options().dtype(at::kDouble));
  const int64_t* tp = t.data_ptr<int64_t>();
  double* op = out.data_ptr<double>();
  at::parallel_for(0, t.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) op[i] = legw_lr(static_cast<double>(tp[i]), s, sched.numel());
  });
  return out;
}

TORCH_LIBRARY_IMPL(legw_fused, CPU, m) { m.impl("legw_lr", &legw_lr_cpu); }

}  // namespace legw_fused
