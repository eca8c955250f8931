// CUDA implementation of legw_fused::legw_lr: one thread per step count, the schedule read from device memory.
// No host sync: the header is not read back here; LEGW.packed made it, and legw_lr() bounds the milestone reads.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../legw_lr.h"

namespace legw_fused {

__global__ void legw_lr_kernel(const int64_t* __restrict__ step, const double* __restrict__ sched, int64_t sched_len,
                               double* __restrict__ out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = legw_lr(static_cast<double>(step[i]), sched, sched_len);
}

at::Tensor legw_lr_cuda(const at::Tensor& step, const at::Tensor& schedule) {
  check_legw_lr_args(step, schedule);
  const c10::cuda::CUDAGuard guard(step.device());
  const at::Tensor t = step.contiguous();
  const at::Tensor sched = schedule.contiguous();
  at::Tensor out = at::empty(t.sizes(), t.options().dtype(at::kDouble));
  const int64_t n = t.numel();
  if (n == 0) return out;
  constexpr int kThreads = 256;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  legw_lr_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      t.data_ptr<int64_t>(), sched.data_ptr<double>(), sched.numel(), out.data_ptr<double>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(legw_fused, CUDA, m) { m.impl("legw_lr", &legw_lr_cuda); }

}  // namespace legw_fused
