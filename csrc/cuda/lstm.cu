// CUDA pointwise kernels of one LSTM step (forward and backward); the time loop and the cuBLAS GEMMs are in
// csrc/lstm.cpp. One thread per (row, hidden unit): it reads the four gate preactivations of its unit — four
// coalesced loads H apart — and writes the activated gates, c and h (forward) or the four gate gradients and the
// gradient to c_prev (backward). 64-bit indices: B·4H may exceed 2^31 for large batches.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../lstm.h"

namespace legw_fused {
namespace lstm {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void fwd_kernel(scalar_t* __restrict__ a, const acc_t* __restrict__ bias, const acc_t* __restrict__ c_prev,
                           acc_t* __restrict__ c, scalar_t* __restrict__ h, int64_t B, int64_t H) {
  const int64_t n = B * H;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = k / H, j = k - b * H;
    scalar_t* ar = a + b * 4 * H;
    const Fwd<acc_t> r(acc_t(ar[j]) + bias[j], acc_t(ar[H + j]) + bias[H + j], acc_t(ar[2 * H + j]) + bias[2 * H + j],
                       acc_t(ar[3 * H + j]) + bias[3 * H + j], c_prev[k]);
    ar[j] = scalar_t(r.i);
    ar[H + j] = scalar_t(r.f);
    ar[2 * H + j] = scalar_t(r.g);
    ar[3 * H + j] = scalar_t(r.o);
    c[k] = r.c;
    h[k] = scalar_t(r.h);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bwd_kernel(const scalar_t* __restrict__ act, const acc_t* __restrict__ c_prev,
                           const acc_t* __restrict__ c, const scalar_t* __restrict__ dout,
                           const scalar_t* __restrict__ dh_rec, acc_t* __restrict__ dc, scalar_t* __restrict__ da,
                           int64_t B, int64_t H) {
  const int64_t n = B * H;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = k / H, j = k - b * H;
    const scalar_t* ar = act + b * 4 * H;
    const acc_t dh = acc_t(dh_rec[k]) + (dout ? acc_t(dout[k]) : acc_t(0));
    const Bwd<acc_t> r(acc_t(ar[j]), acc_t(ar[H + j]), acc_t(ar[2 * H + j]), acc_t(ar[3 * H + j]), c_prev[k], c[k], dh,
                       dc[k]);
    scalar_t* dar = da + b * 4 * H;
    dar[j] = scalar_t(r.di);
    dar[H + j] = scalar_t(r.df);
    dar[2 * H + j] = scalar_t(r.dg);
    dar[3 * H + j] = scalar_t(r.do_);
    dc[k] = r.dc_prev;
  }
}

unsigned blocks_for(int64_t n) {
  // Grid-stride loops: enough blocks to cover small steps in one wave, capped for huge ones.
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)));
}

}  // namespace

void pointwise_fwd_cuda(at::Tensor& a, const at::Tensor& bias, const at::Tensor& c_prev, at::Tensor& c, at::Tensor& h) {
  const int64_t B = a.size(0), H = c.size(1);
  if (B * H == 0) return;
  const c10::cuda::CUDAGuard guard(a.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "lstm_pointwise_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fwd_kernel<scalar_t, acc_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
        a.data_ptr<scalar_t>(), bias.data_ptr<acc_t>(), c_prev.data_ptr<acc_t>(), c.data_ptr<acc_t>(),
        h.data_ptr<scalar_t>(), B, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void pointwise_bwd_cuda(const at::Tensor& act, const at::Tensor& c_prev, const at::Tensor& c, const at::Tensor& dout,
                        const at::Tensor& dh_rec, at::Tensor& dc, at::Tensor& da) {
  const int64_t B = act.size(0), H = c.size(1);
  if (B * H == 0) return;
  const c10::cuda::CUDAGuard guard(act.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, act.scalar_type(), "lstm_pointwise_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bwd_kernel<scalar_t, acc_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
        act.data_ptr<scalar_t>(), c_prev.data_ptr<acc_t>(), c.data_ptr<acc_t>(),
        dout.defined() ? dout.data_ptr<scalar_t>() : nullptr, dh_rec.data_ptr<scalar_t>(), dc.data_ptr<acc_t>(),
        da.data_ptr<scalar_t>(), B, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace lstm
}  // namespace legw_fused
