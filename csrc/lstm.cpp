// legw_fused::lstm_layer_fwd / lstm_layer_bwd: one LSTM layer in one direction, forward and backward, on CPU
// and CUDA. The time loop lives here, on the host, for both devices: the GEMMs go through ATen (MKL/oneDNN on the
// CPU, cuBLAS on CUDA) and each step's pointwise part is one fused kernel per device (lstm.h).
//
// Shapes: T steps, B batch, I input, H hidden, G = 4H. Forward:
//   X = x·W_ihᵀ + b_ih + b_hh for all steps in one GEMM [T·B, G]; per step X[t] += h·W_hhᵀ (in place), then the
//   pointwise kernel turns X[t] into the activated gates (kept for backward) and writes c[t] and h[t] = out[t].
// Backward, per step in reverse processing order: the pointwise kernel gives dA[t] and the gradient to c_{t-1};
// dh_{t-1} = dA[t]·W_hh. After the loop the weight gradients are three large GEMMs over all T·B rows at once
// (dW_ih = dAᵀ·x, dW_hh = dAᵀ·h_prev, db = Σ dA) and dx = dA·W_ih — instead of T small ones.
// Saved for backward: the activated gates [T,B,G] (param dtype) and the cell states [T,B,H] (fp32 for bf16/fp16,
// carried in fp32 across steps too); x, h0, c0 and the output are the caller's tensors.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <tuple>

#include "cpu_isa.h"
#include "lstm.h"

namespace legw_fused {
namespace lstm {

namespace {

// Rows per parallel task: ~4K elements (each a few dozen vector instructions), so that a batch of 128 already
// keeps two cores busy while tiny steps do not pay thread start-up.
int64_t grain_rows(int64_t H) { return std::max<int64_t>(1, (1 << 12) / std::max<int64_t>(H, 1)); }

namespace base {
#include "lstm_rows.inc"
}  // namespace base

// The same loops for CPUs with AVX2 + FMA (8-wide instead of SSE2's 4-wide; the build targets baseline x86-64 so
// that the wheel runs anywhere). The polynomial exp in lstm.h is what makes these loops vectorisable at all.
#ifdef LEGW_FUSED_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "lstm_rows.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

}  // namespace

void pointwise_fwd_cpu(at::Tensor& a, const at::Tensor& bias, const at::Tensor& c_prev, at::Tensor& c, at::Tensor& h) {
  const int64_t B = a.size(0), H = c.size(1);
  const bool wide = cpu_has_avx2_fma();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "lstm_pointwise_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* ap = a.data_ptr<scalar_t>();
    const acc_t* bp = bias.data_ptr<acc_t>();
    const acc_t* cpp = c_prev.data_ptr<acc_t>();
    acc_t* cp = c.data_ptr<acc_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_rows(H), [&](int64_t b0, int64_t b1) {
#ifdef LEGW_FUSED_AVX2
      if (wide) return avx2::fwd_rows(ap, bp, cpp, cp, hp, b0, b1, H);
#endif
      base::fwd_rows(ap, bp, cpp, cp, hp, b0, b1, H);
    });
  });
}

void pointwise_bwd_cpu(const at::Tensor& act, const at::Tensor& c_prev, const at::Tensor& c, const at::Tensor& dout,
                       const at::Tensor& dh_rec, at::Tensor& dc, at::Tensor& da) {
  const int64_t B = act.size(0), H = c.size(1);
  const bool wide = cpu_has_avx2_fma();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, act.scalar_type(), "lstm_pointwise_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = act.data_ptr<scalar_t>();
    const acc_t* cpp = c_prev.data_ptr<acc_t>();
    const acc_t* cp = c.data_ptr<acc_t>();
    const scalar_t* gop = dout.defined() ? dout.data_ptr<scalar_t>() : nullptr;
    const scalar_t* ghp = dh_rec.data_ptr<scalar_t>();
    acc_t* dcp = dc.data_ptr<acc_t>();
    scalar_t* dap = da.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_rows(H), [&](int64_t b0, int64_t b1) {
#ifdef LEGW_FUSED_AVX2
      if (wide) return avx2::bwd_rows(ap, cpp, cp, gop, ghp, dcp, dap, b0, b1, H);
#endif
      base::bwd_rows(ap, cpp, cp, gop, ghp, dcp, dap, b0, b1, H);
    });
  });
}

namespace {

using PointwiseFwd = void (*)(at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&);
using PointwiseBwd = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, at::Tensor&, at::Tensor&);

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Runs fn(b0, n) over batch row slices [b0, b0 + n). On the CPU, one slice per thread, each running its whole time
// loop with single-threaded GEMMs (ATen's nested parallel regions run inline): a step's GEMM of a few hundred rows
// splits badly over threads and would pay two thread hand-offs per step, while the slices need no synchronisation
// at all. One step (T = 1: an LSTMCell call) runs as one slice: the hand-off to the slices' threads would then be
// paid once per step anyway, and the GEMM's and the pointwise kernel's own threading serve it better (measured:
// 0.60x nn.LSTMCell forward at B 97, H 51, fp64 with slices). On CUDA one slice: the GPU parallelises each step.
template <typename F>
void for_batch_slices(const at::Tensor& like, int64_t T, int64_t B, const F& fn) {
  constexpr int64_t kMinRows = 32;  // below this a GEMM per slice is mostly overhead
  const int64_t slices =
      like.is_cpu() && T > 1 ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B / kMinRows)) : 1;
  if (slices <= 1 || B == 0) {
    fn(0, B);
    return;
  }
  at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
    // Worker threads do not inherit the caller's dispatch state: run below autograd, as the op itself does.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t sl = s0; sl < s1; ++sl) {
      const int64_t b0 = B * sl / slices, b1 = B * (sl + 1) / slices;
      fn(b0, b1 - b0);
    }
  });
}

void check_layer_args(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh,
                      const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                      const at::Tensor& h0, const at::Tensor& c0) {
  TORCH_CHECK(x.dim() == 3, "lstm_layer: x must be [T, B, I], got ", x.sizes());
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1);
  TORCH_CHECK(T > 0, "lstm_layer: x must have at least one step");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * H, "lstm_layer: weight_hh must be [4H, H], got ", w_hh.sizes());
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) == 4 * H && w_ih.size(1) == I, "lstm_layer: weight_ih must be [", 4 * H,
              ", ", I, "], got ", w_ih.sizes());
  for (const auto* b : {&b_ih, &b_hh}) {
    TORCH_CHECK(!b->has_value() || ((*b)->dim() == 1 && (*b)->size(0) == 4 * H), "lstm_layer: biases must be [", 4 * H,
                "]");
  }
  TORCH_CHECK(h0.sizes() == at::IntArrayRef({B, H}) && c0.sizes() == at::IntArrayRef({B, H}),
              "lstm_layer: h0 and c0 must be [", B, ", ", H, "], got ", h0.sizes(), " and ", c0.sizes());
  for (const at::Tensor* t : {&w_ih, &w_hh, &h0, &c0}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "lstm_layer: all tensors must have x's dtype and device");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_fwd(
    PointwiseFwd pointwise, const at::Tensor& x_in, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0_in,
    const at::Tensor& c0_in, bool reverse) {
  check_layer_args(x_in, w_ih, w_hh, b_ih, b_hh, h0_in, c0_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1), G = 4 * H;
  const at::Tensor w_hh_t = w_hh.t();
  // The input projection of every step in one GEMM [T, B, G]: preactivations, then (step by step) the activated
  // gates. The combined bias (fp32) is added by the pointwise kernel, which reads every preactivation anyway: an
  // addmm would first broadcast it over the whole [T, B, G] output, one more pass over memory.
  at::Tensor gates = at::mm(x.view({T * B, I}), w_ih.t()).view({T, B, G});
  const auto acc = acc_type(x.scalar_type());
  at::Tensor bias = at::zeros({G}, x.options().dtype(acc));
  if (b_ih.has_value()) bias.add_(*b_ih);
  if (b_hh.has_value()) bias.add_(*b_hh);
  at::Tensor out = at::empty({T, B, H}, x.options());
  at::Tensor cs = at::empty({T, B, H}, x.options().dtype(acc));
  const at::Tensor h0 = h0_in.contiguous();
  const at::Tensor c0 = c0_in.to(acc).contiguous();
  // The whole time loop for batch rows [b0, b1): rows never interact, so each slice runs on its own.
  for_batch_slices(x, T, B, [&](int64_t b0, int64_t n) {
    at::Tensor h = h0.narrow(0, b0, n), c = c0.narrow(0, b0, n);
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? T - 1 - s : s;
      at::Tensor a = gates[t].narrow(0, b0, n);
      a.addmm_(h, w_hh_t);  // the recurrent GEMM, accumulated into this step's input projection
      at::Tensor c_t = cs[t].narrow(0, b0, n), h_t = out[t].narrow(0, b0, n);
      pointwise(a, bias, c, c_t, h_t);
      h = h_t;
      c = c_t;
    }
  });
  const int64_t last = reverse ? 0 : T - 1;
  const at::Tensor h = out[last], c = cs[last];
  // Outputs of an op may not alias each other: h_n and c_n are copies of the last step's rows.
  return {out, h.clone(), c.to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true), gates, cs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_bwd(
    PointwiseBwd pointwise, const c10::optional<at::Tensor>& dout_in, const c10::optional<at::Tensor>& dh_n,
    const c10::optional<at::Tensor>& dc_n, const at::Tensor& x_in, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& out, const at::Tensor& act, const at::Tensor& cs,
    bool reverse, bool compute_dx) {
  const at::Tensor x = x_in.contiguous();
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1), G = 4 * H;
  const auto acc = acc_type(x.scalar_type());
  TORCH_CHECK(act.sizes() == at::IntArrayRef({T, B, G}) && cs.sizes() == at::IntArrayRef({T, B, H}) &&
                  out.sizes() == at::IntArrayRef({T, B, H}),
              "lstm_layer_bwd: saved tensors do not match x's shape");
  const at::Tensor dout = dout_in.has_value() ? dout_in->contiguous() : at::Tensor();
  at::Tensor dh = dh_n.has_value() ? dh_n->contiguous().clone() : at::zeros({B, H}, x.options());
  at::Tensor dc = dc_n.has_value() ? dc_n->to(acc).contiguous().clone() : at::zeros({B, H}, x.options().dtype(acc));
  const at::Tensor c0_acc = c0.to(acc).contiguous();
  at::Tensor da = at::empty({T, B, G}, x.options());
  for_batch_slices(x, T, B, [&](int64_t b0, int64_t n) {
    at::Tensor dh_s = dh.narrow(0, b0, n), dc_s = dc.narrow(0, b0, n);
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = reverse ? T - 1 - s : s;
      const int64_t t_prev = reverse ? t + 1 : t - 1;  // the step processed before t
      const at::Tensor c_prev = (s == 0 ? c0_acc : cs[t_prev]).narrow(0, b0, n);
      at::Tensor da_t = da[t].narrow(0, b0, n);
      pointwise(act[t].narrow(0, b0, n), c_prev, cs[t].narrow(0, b0, n),
                dout.defined() ? dout[t].narrow(0, b0, n) : at::Tensor(), dh_s, dc_s, da_t);
      // The gradient reaching h_{t_prev} through the recurrence, written into this slice's rows of dh.
      at::mm_out(dh_s, da_t, w_hh);
    }
  });
  const at::Tensor da2 = da.view({T * B, G});
  at::Tensor dw_ih = at::mm(da2.t(), x.view({T * B, I}));
  // dW_hh = Σ_t dA[t]ᵀ·h_prev[t], where h_prev[t] is out[t∓1] or h0: one GEMM over the T-1 steps that read an
  // output row, plus the one step that read h0 (no [T, B, H] concatenation).
  at::Tensor dw_hh;
  if (T == 1) {
    dw_hh = at::mm(da[0].t(), h0);
  } else {
    const int64_t first = reverse ? T - 1 : 0;  // the step that read h0
    const at::Tensor da_rest = (reverse ? da.slice(0, 0, T - 1) : da.slice(0, 1)).reshape({(T - 1) * B, G});
    const at::Tensor h_rest = (reverse ? out.slice(0, 1) : out.slice(0, 0, T - 1)).reshape({(T - 1) * B, H});
    dw_hh = at::addmm(at::mm(da[first].t(), h0), da_rest.t(), h_rest);
  }
  at::Tensor db = at::sum(da2, {0}, /*keepdim=*/false, acc).to(x.scalar_type());
  // The input gradient only when asked for: a network's first layer reads data that needs none.
  at::Tensor dx = compute_dx ? at::mm(da2, w_ih).view({T, B, I}) : at::empty({0}, x.options());
  return {dx, dw_ih, dw_hh, db, dh, dc.to(x.scalar_type())};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cpu(
    const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0, const at::Tensor& c0, bool reverse) {
  return layer_fwd(pointwise_fwd_cpu, x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cpu(
    const c10::optional<at::Tensor>& dout, const c10::optional<at::Tensor>& dh_n, const c10::optional<at::Tensor>& dc_n,
    const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& out, const at::Tensor& act, const at::Tensor& cs, bool reverse, bool compute_dx) {
  return layer_bwd(pointwise_bwd_cpu, dout, dh_n, dc_n, x, w_ih, w_hh, h0, c0, out, act, cs, reverse, compute_dx);
}

#ifdef LEGW_FUSED_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cuda(
    const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0, const at::Tensor& c0, bool reverse) {
  return layer_fwd(pointwise_fwd_cuda, x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cuda(
    const c10::optional<at::Tensor>& dout, const c10::optional<at::Tensor>& dh_n, const c10::optional<at::Tensor>& dc_n,
    const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& out, const at::Tensor& act, const at::Tensor& cs, bool reverse, bool compute_dx) {
  return layer_bwd(pointwise_bwd_cuda, dout, dh_n, dc_n, x, w_ih, w_hh, h0, c0, out, act, cs, reverse, compute_dx);
}
#endif

}  // namespace lstm
}  // namespace legw_fused

// The LSTM ops are a fragment of the legw_fused library (the optimizer ops are defined in legw_fused.cpp).
TORCH_LIBRARY_IMPL(legw_fused, CPU, m) {
  m.impl("lstm_layer_fwd", &legw_fused::lstm::lstm_layer_fwd_cpu);
  m.impl("lstm_layer_bwd", &legw_fused::lstm::lstm_layer_bwd_cpu);
}

#ifdef LEGW_FUSED_WITH_CUDA
TORCH_LIBRARY_IMPL(legw_fused, CUDA, m) {
  m.impl("lstm_layer_fwd", &legw_fused::lstm::lstm_layer_fwd_cuda);
  m.impl("lstm_layer_bwd", &legw_fused::lstm::lstm_layer_bwd_cuda);
}
#endif
