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
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

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
// that the wheel runs anywhere), and with AVX-512 (16-wide, 32 vector registers: the polynomials' constants stay in
// registers instead of being re-broadcast from memory, as the AVX2 loop must with its 16). The polynomial exp in
// lstm.h is what makes these loops vectorisable at all.
#ifdef LEGW_FUSED_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "lstm_rows.inc"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
namespace avx512 {
#include "lstm_rows.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif

// The row loops' build for this process: ATen's CPU capability (ATEN_CPU_CAPABILITY may lower it, which is how the
// tests run every build on one machine) and what the CPU itself supports.
enum class RowIsa { base, avx2, avx512 };

RowIsa row_isa() {
  static const RowIsa isa = [] {
    const std::string cap = at::get_cpu_capability();
    if (cap.rfind("AVX512", 0) == 0 && cpu_has_avx512()) return RowIsa::avx512;
    if (cap != "DEFAULT" && cpu_has_avx2_fma()) return RowIsa::avx2;
    return RowIsa::base;
  }();
  return isa;
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void fwd_rows_any(scalar_t* a, const acc_t* bias, const acc_t* c_prev, acc_t* c, scalar_t* h, int64_t b0, int64_t b1,
                  int64_t H) {
#ifdef LEGW_FUSED_AVX2
  switch (row_isa()) {
    case RowIsa::avx512:
      return avx512::fwd_rows(a, bias, c_prev, c, h, b0, b1, H);
    case RowIsa::avx2:
      return avx2::fwd_rows(a, bias, c_prev, c, h, b0, b1, H);
    case RowIsa::base:
      break;
  }
#endif
  base::fwd_rows(a, bias, c_prev, c, h, b0, b1, H);
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void bwd_rows_any(const scalar_t* act, const acc_t* c_prev, const acc_t* c, const scalar_t* dout,
                  const scalar_t* dh_rec, acc_t* dc, scalar_t* da, acc_t* db, int64_t b0, int64_t b1, int64_t H) {
#ifdef LEGW_FUSED_AVX2
  switch (row_isa()) {
    case RowIsa::avx512:
      return avx512::bwd_rows(act, c_prev, c, dout, dh_rec, dc, da, db, b0, b1, H);
    case RowIsa::avx2:
      return avx2::bwd_rows(act, c_prev, c, dout, dh_rec, dc, da, db, b0, b1, H);
    case RowIsa::base:
      break;
  }
#endif
  base::bwd_rows(act, c_prev, c, dout, dh_rec, dc, da, db, b0, b1, H);
}

}  // namespace

void pointwise_fwd_cpu(at::Tensor& a, const at::Tensor& bias, const at::Tensor& c_prev, at::Tensor& c, at::Tensor& h) {
  const int64_t B = a.size(0), H = c.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "lstm_pointwise_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* ap = a.data_ptr<scalar_t>();
    const acc_t* bp = bias.data_ptr<acc_t>();
    const acc_t* cpp = c_prev.data_ptr<acc_t>();
    acc_t* cp = c.data_ptr<acc_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_rows(H),
                     [&](int64_t b0, int64_t b1) { fwd_rows_any(ap, bp, cpp, cp, hp, b0, b1, H); });
  });
}

void pointwise_bwd_cpu(const at::Tensor& act, const at::Tensor& c_prev, const at::Tensor& c, const at::Tensor& dout,
                       const at::Tensor& dh_rec, at::Tensor& dc, at::Tensor& da) {
  const int64_t B = act.size(0), H = c.size(1);
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
      bwd_rows_any(ap, cpp, cp, gop, ghp, dcp, dap, static_cast<acc_t*>(nullptr), b0, b1, H);
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
int64_t num_batch_slices(const at::Tensor& like, int64_t T, int64_t B) {
  constexpr int64_t kMinRows = 32;  // below this a GEMM per slice is mostly overhead
  return like.is_cpu() && T > 1 ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B / kMinRows)) : 1;
}

// fn(slice, b0, n) for slice = 0 .. num_batch_slices - 1.
template <typename F>
void for_batch_slices(const at::Tensor& like, int64_t T, int64_t B, const F& fn) {
  const int64_t slices = num_batch_slices(like, T, B);
  if (slices <= 1 || B == 0) {
    fn(0, 0, B);
    return;
  }
  at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
    // Worker threads do not inherit the caller's dispatch state: run below autograd, as the op itself does.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t sl = s0; sl < s1; ++sl) {
      const int64_t b0 = B * sl / slices, b1 = B * (sl + 1) / slices;
      fn(sl, b0, b1 - b0);
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
  for_batch_slices(x, T, B, [&](int64_t, int64_t b0, int64_t n) {
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
  for_batch_slices(x, T, B, [&](int64_t, int64_t b0, int64_t n) {
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

// ---- fp32 on the CPU: each batch slice's whole time loop on raw rows, with oneDNN's brgemm micro-kernel ----------
//
// at::native::cpublas::brgemm (fp32: oneDNN's JIT micro-kernel on AVX2 and up, torch's gemm below that) ran a
// step's GEMM [64, 156]·[156, 512] at 110 GFLOP/s on one Zen 4 core where MKL's sgemm (at::mm) ran 82 (MKL takes
// no AVX-512 path on AMD CPUs; bench/NOTES.md, session 9). A brgemm multiplies row-major A [M, K] by row-major
// B [K, N] into C [M, N], C overwritten or accumulated; no transposes. So, with K = I + H and per slice of n rows:
//   forward, per step:  A_t = [x_t | h_{t-1}] [n, K] · W_catᵀ [K, G], W_cat = [W_ih | W_hh] [G, K]: the input
//                       projection rides on the recurrent GEMM (K = 28 alone runs a GEMM far below peak), and the
//                       preactivations land in the saved gates buffer, where the pointwise kernel activates them;
//   backward, per step: dA_t [n, G] from the pointwise kernel (one step's rows, kept in L1/L2, never the whole
//                       [T, B, G]); dh_{t-1} = dA_t · W_hh and dx_t = dA_t · W_ih; the slice's dW_catᵀ [K, G] +=
//                       A_tᵀ · dA_t (A_tᵀ rebuilt from x_t and h_{t-1}); db += Σ_rows dA_t (in the row loop). The
//                       slices' partial weight gradients are summed once at the end.
// The preactivations differ from the per-op path's in rounding only (one K-long dot product instead of x·W_ihᵀ
// then + h·W_hhᵀ).
//
// The GEMMs run on brgemm or on the BLAS sgemm that ATen itself calls (MKL in the x86-64 wheels), chosen once per
// process (seq_gemm()): neither wins on every CPU. One core, a step's shapes at n = 64, GFLOP/s (bench/NOTES.md):
//   Zen 4, AVX-512:  brgemm 110 (forward) / 111 (dh), MKL 82 / 75 (MKL takes no AVX-512 path on AMD CPUs);
//   Zen 3, AVX2:     brgemm 60 / 63 / 66 (forward / dh / dW), MKL 78 / 84 / 84: brgemm stays at ~65 however its
//                    calls are blocked over N and K, so this is its AVX2 micro-kernel, not the 512 KiB L2.
// With BLAS the weights and A_t need no transposes (sgemm takes them as stored): the forward's B operand is W_cat
// [G, K] itself, and the slice's weight gradient accumulates as dW_catᵀ [K, G] += [x_t | h_{t-1}]ᵀ · dA_t, as with
// brgemm: MKL ran that orientation 11% faster than dW_cat [G, K] += dA_tᵀ · [x_t | h_{t-1}] (one core, n = 64,
// Zen 3: 130–162 vs 147–181 µs a step; the layer's backward at B 128 0.92x the time, bench/NOTES.md session 14).
#ifdef CPUBLAS_BRGEMM_F32F32F32
#define LEGW_FUSED_SEQ_F32 1

// The Fortran sgemm of the BLAS that libtorch_cpu links and exports (MKL in the x86-64 wheels, OpenBLAS in the
// aarch64 ones), with the 32-bit integers ATen's own calls use. Weak: where no loaded library exports it the
// extension still loads, and the sequence kernel runs on brgemm alone.
#if defined(__GNUC__) && defined(__ELF__)
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
bool blas_sgemm_found() { return &sgemm_ != nullptr; }
#else
bool blas_sgemm_found() { return false; }
#endif

enum class SeqGemm { brgemm, blas };

// LEGW_FUSED_LSTM_CPU_GEMM=brgemm|blas chooses (how the tests run both on one machine); unset or "auto": brgemm
// where ATen runs AVX-512 code (row_isa()), BLAS elsewhere when it is found. Read once: the choice changes rounding,
// so a process keeps one.
SeqGemm seq_gemm() {
  static const SeqGemm gemm = [] {
    const char* env = std::getenv("LEGW_FUSED_LSTM_CPU_GEMM");
    const std::string want = env == nullptr ? "auto" : env;
    TORCH_CHECK_VALUE(want == "auto" || want == "brgemm" || want == "blas",
                      "LEGW_FUSED_LSTM_CPU_GEMM must be auto, brgemm or blas, got '", want, "'");
    TORCH_CHECK_VALUE(want != "blas" || blas_sgemm_found(),
                      "LEGW_FUSED_LSTM_CPU_GEMM=blas, but torch's libraries export no BLAS sgemm_");
    if (want == "brgemm" || (want == "auto" && (row_isa() == RowIsa::avx512 || !blas_sgemm_found()))) {
      return SeqGemm::brgemm;
    }
    return SeqGemm::blas;
  }();
  return gemm;
}

// Row-major C [M, N] = (or += with add_c) op(A) · op(B) through the Fortran (column-major) sgemm: a row-major
// matrix is its transpose in column-major order, so this is Cᵀ = op(B)ᵀ · op(A)ᵀ. trans_a: A is stored [K, M]
// (row stride ld_a) and used transposed; trans_b: B is stored [N, K].
void blas_sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* a, int64_t ld_a,
                const float* b, int64_t ld_b, bool add_c, float* c, int64_t ld_c) {
  TORCH_CHECK(std::max({M, N, K, ld_a, ld_b, ld_c}) <= INT_MAX, "lstm_layer: a GEMM dimension beyond the BLAS's ",
              "32-bit integers (LEGW_FUSED_LSTM_CPU_GEMM=brgemm has no such limit)");
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int lda = static_cast<int>(ld_b), ldb = static_cast<int>(ld_a), ldc = static_cast<int>(ld_c);
  const float alpha = 1.f, beta = add_c ? 1.f : 0.f;
#if defined(__GNUC__) && defined(__ELF__)
  sgemm_(trans_b ? "T" : "N", trans_a ? "T" : "N", &m, &n, &k, &alpha, b, &lda, a, &ldb, &beta, c, &ldc);
#else
  TORCH_CHECK(false, "lstm_layer: this build has no BLAS sgemm_");  // unreachable: seq_gemm() never picks it
#endif
}

// fp32 sequences (T > 1); one step (an LSTMCell call) keeps the per-op path, whose GEMM and pointwise kernel are
// threaded within the step.
bool use_seq_f32(const at::Tensor& x) { return x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(0) > 1; }

// n rows of `cols` floats, src row stride ld_src, dst row stride ld_dst.
void copy_rows(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t n, int64_t cols) {
  for (int64_t r = 0; r < n; ++r) std::memcpy(dst + r * ld_dst, src + r * ld_src, cols * sizeof(float));
}

// dst [cols, n] (row stride ld_dst) = src [n, cols] (row stride ld_src) transposed, in 8x8 tiles so that both sides
// touch whole cache lines.
void transpose_rows(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t n, int64_t cols) {
  constexpr int64_t kTile = 8;
  for (int64_t r0 = 0; r0 < n; r0 += kTile) {
    const int64_t r1 = std::min(n, r0 + kTile);
    for (int64_t k0 = 0; k0 < cols; k0 += kTile) {
      const int64_t k1 = std::min(cols, k0 + kTile);
      for (int64_t k = k0; k < k1; ++k) {
        for (int64_t r = r0; r < r1; ++r) dst[k * ld_dst + r] = src[r * ld_src + k];
      }
    }
  }
}

void brgemm_f32(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c, bool add_c, const float* a,
                const float* b, float* c) {
  at::native::cpublas::brgemm(M, N, K, ld_a, ld_b, ld_c, add_c, a, b, c, /*is_vnni=*/false);
}

// Row-major C [M, N] = (or +=) A [M, K] · B [K, N], all as stored, on the process's GEMM; a product narrower than 64
// columns on brgemm either way: MKL's blocking suits it badly (one core, M 64, K 512 on Zen 3: N 28 brgemm 62 vs
// MKL 46 GFLOP/s, N 32 86 vs 74; N 64 61 vs 75). Only dx = dA·W_ih is that narrow at usual sizes (N = I).
void gemm_nn(SeqGemm gemm, int64_t M, int64_t N, int64_t K, const float* a, int64_t ld_a, const float* b, int64_t ld_b,
             bool add_c, float* c, int64_t ld_c) {
  if (gemm == SeqGemm::blas && N >= 64) {
    blas_sgemm(false, false, M, N, K, a, ld_a, b, ld_b, add_c, c, ld_c);
  } else {
    brgemm_f32(M, N, K, ld_a, ld_b, ld_c, add_c, a, b, c);
  }
}

// [W_ih | W_hh]ᵀ [K, G], the forward GEMM's B operand. Each slice builds its own copy: duplicated work (K·G
// floats), but on the slice's own core and cache, and no serial section for the other cores to wait out.
void concat_weights_t(const float* w_ih, const float* w_hh, int64_t I, int64_t H, float* dst) {
  const int64_t G = 4 * H;
  transpose_rows(w_ih, I, dst, G, G, I);
  transpose_rows(w_hh, H, dst + I * G, G, G, H);
}

// keep: the activated gates [T, B, G] and cell states [T, B, H] for a backward (returned as the 4th and 5th
// outputs). Without it (inference) each slice keeps one step's gates [n, G] and two cell-state rows [n, H] in scratch
// that stays in its core's cache: the [T, B, G] buffer was 58 MB at B 1024, most of a no-grad forward's time in
// page faults and writes; the 4th and 5th outputs are then empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_fwd_seq_f32(
    const at::Tensor& x_in, const at::Tensor& w_ih_in, const at::Tensor& w_hh_in, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0_in, const at::Tensor& c0_in, bool reverse, bool keep) {
  const at::Tensor x = x_in.contiguous(), w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1), G = 4 * H, K = I + H;
  at::Tensor bias = at::zeros({G}, x.options());
  if (b_ih.has_value()) bias.add_(*b_ih);
  if (b_hh.has_value()) bias.add_(*b_hh);
  at::Tensor gates = keep ? at::empty({T, B, G}, x.options()) : at::empty({0}, x.options());
  at::Tensor cs = keep ? at::empty({T, B, H}, x.options()) : at::empty({0}, x.options());
  at::Tensor out = at::empty({T, B, H}, x.options());
  at::Tensor h_n = at::empty({B, H}, x.options()), c_n = at::empty({B, H}, x.options());
  const at::Tensor h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const float *xp = x.const_data_ptr<float>(), *w_ihp = w_ih.const_data_ptr<float>(),
              *w_hhp = w_hh.const_data_ptr<float>(), *biasp = bias.const_data_ptr<float>(),
              *h0p = h0.const_data_ptr<float>(), *c0p = c0.const_data_ptr<float>();
  float *gp = keep ? gates.data_ptr<float>() : nullptr, *csp = keep ? cs.data_ptr<float>() : nullptr,
        *outp = out.data_ptr<float>(), *h_np = h_n.data_ptr<float>(), *c_np = c_n.data_ptr<float>();
  const SeqGemm gemm = seq_gemm();
  for_batch_slices(x, T, B, [&](int64_t, int64_t b0, int64_t n) {
    // The B operand (W_catᵀ [K, G] for brgemm, W_cat [G, K] for BLAS); [x_t | h_{t-1}] of this slice's rows;
    // without keep, one step's gates and two cell states.
    std::vector<float> w(K * G), xh(n * K), scratch(keep ? 0 : n * (G + 2 * H));
    if (gemm == SeqGemm::blas) {
      copy_rows(w_ihp, I, w.data(), K, G, I);
      copy_rows(w_hhp, H, w.data() + I, K, G, H);
    } else {
      concat_weights_t(w_ihp, w_hhp, I, H, w.data());
    }
    copy_rows(h0p + b0 * H, H, xh.data() + I, K, n, H);
    // Pointers to this slice's first row: the row loops run over rows 0 .. n.
    const float* c_prev = c0p + b0 * H;
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? T - 1 - s : s;
      copy_rows(xp + (t * B + b0) * I, I, xh.data(), K, n, I);
      float* g_t = keep ? gp + (t * B + b0) * G : scratch.data();
      float* c_t = keep ? csp + (t * B + b0) * H : scratch.data() + n * G + (s % 2) * n * H;
      float* h_t = outp + (t * B + b0) * H;
      if (gemm == SeqGemm::blas) {
        blas_sgemm(false, true, n, G, K, xh.data(), K, w.data(), K, /*add_c=*/false, g_t, G);
      } else {
        brgemm_f32(n, G, K, K, G, G, /*add_c=*/false, xh.data(), w.data(), g_t);
      }
      fwd_rows_any(g_t, biasp, c_prev, c_t, h_t, 0, n, H);
      copy_rows(h_t, H, xh.data() + I, K, n, H);
      c_prev = c_t;
    }
    // h_n and c_n: copies of the last step's rows (outputs of an op may not alias each other).
    copy_rows(xh.data() + I, K, h_np + b0 * H, H, n, H);
    copy_rows(c_prev, H, c_np + b0 * H, H, n, H);
  });
  return {out, h_n, c_n, gates, cs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_bwd_seq_f32(
    const c10::optional<at::Tensor>& dout_in, const c10::optional<at::Tensor>& dh_n_in,
    const c10::optional<at::Tensor>& dc_n_in, const at::Tensor& x_in, const at::Tensor& w_ih_in,
    const at::Tensor& w_hh_in, const at::Tensor& h0_in, const at::Tensor& c0_in, const at::Tensor& out_in,
    const at::Tensor& act_in, const at::Tensor& cs_in, bool reverse, bool compute_dx) {
  const at::Tensor x = x_in.contiguous(), w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1), G = 4 * H, K = I + H;
  TORCH_CHECK(act_in.sizes() == at::IntArrayRef({T, B, G}) && cs_in.sizes() == at::IntArrayRef({T, B, H}) &&
                  out_in.sizes() == at::IntArrayRef({T, B, H}),
              "lstm_layer_bwd: saved tensors do not match x's shape");
  const at::Tensor act = act_in.contiguous(), cs = cs_in.contiguous(), out = out_in.contiguous();
  const at::Tensor h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const at::Tensor dout = dout_in.has_value() ? dout_in->contiguous() : at::Tensor();
  const at::Tensor dh_n = dh_n_in.has_value() ? dh_n_in->contiguous() : at::Tensor();
  const at::Tensor dc_n = dc_n_in.has_value() ? dc_n_in->contiguous() : at::Tensor();
  // Outputs, written by the slices: dh and dc carry the gradient to h_{t-1}, c_{t-1} through the loop and end as
  // dh0, dc0.
  at::Tensor dh = at::empty({B, H}, x.options()), dc = at::empty({B, H}, x.options());
  at::Tensor dx = compute_dx ? at::empty({T, B, I}, x.options()) : at::empty({0}, x.options());
  const int64_t slices = num_batch_slices(x, T, B);
  const SeqGemm gemm = seq_gemm();
  // Each slice's Σ_t A_tᵀ·dA_t, dW_catᵀ [K, G].
  at::Tensor dw_parts = at::empty({slices, K, G}, x.options());
  at::Tensor db_parts = at::empty({slices, G}, x.options());
  const float *xp = x.const_data_ptr<float>(), *actp = act.const_data_ptr<float>(), *csp = cs.const_data_ptr<float>(),
              *outp = out.const_data_ptr<float>(), *h0p = h0.const_data_ptr<float>(), *c0p = c0.const_data_ptr<float>(),
              *doutp = dout.defined() ? dout.const_data_ptr<float>() : nullptr,
              *dh_np = dh_n.defined() ? dh_n.const_data_ptr<float>() : nullptr,
              *dc_np = dc_n.defined() ? dc_n.const_data_ptr<float>() : nullptr, *w_ihp = w_ih.const_data_ptr<float>(),
              *w_hhp = w_hh.const_data_ptr<float>();
  float *dhp = dh.data_ptr<float>(), *dcp = dc.data_ptr<float>(), *dxp = compute_dx ? dx.data_ptr<float>() : nullptr;
  for_batch_slices(x, T, B, [&](int64_t sl, int64_t b0, int64_t n) {
    // dA_t [n, G]; A_t: [x_t | h_{t-1}] [n, K] for BLAS, its transpose [K, n] for brgemm.
    std::vector<float> da(n * G), a_t(K * n);
    float* dw = dw_parts.data_ptr<float>() + sl * K * G;
    float* db = db_parts.data_ptr<float>() + sl * G;
    std::fill(dw, dw + K * G, 0.f);
    std::fill(db, db + G, 0.f);
    float *dh_s = dhp + b0 * H, *dc_s = dcp + b0 * H;
    if (dh_np)
      copy_rows(dh_np + b0 * H, H, dh_s, H, n, H);
    else
      std::fill(dh_s, dh_s + n * H, 0.f);
    if (dc_np)
      copy_rows(dc_np + b0 * H, H, dc_s, H, n, H);
    else
      std::fill(dc_s, dc_s + n * H, 0.f);
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = reverse ? T - 1 - s : s;
      const int64_t t_prev = reverse ? t + 1 : t - 1;  // the step processed before t
      const float* c_prev = (s == 0 ? c0p : csp + t_prev * B * H) + b0 * H;
      const float* h_prev = (s == 0 ? h0p : outp + t_prev * B * H) + b0 * H;
      // Row pointers of this slice, so that the row loop runs over 0 .. n like the slice's own buffers.
      bwd_rows_any(actp + (t * B + b0) * G, c_prev, csp + (t * B + b0) * H, doutp ? doutp + (t * B + b0) * H : nullptr,
                   dh_s, dc_s, da.data(), db, 0, n, H);
      // The gradients reaching h_{t-1} and x_t, straight into dh and dx: W_hh [G, H] and W_ih [G, I] are the B
      // operands as they are. (One GEMM against [W_ih | W_hh] would need a copy of the weights and of its output,
      // and ran N = 156 slower than N = 128 and N = 28 apart at n = 64: brgemm 102 vs 73 + 18 µs on Zen 4; on Zen 3
      // MKL 145 vs MKL 111 + brgemm 29.)
      float* dx_t = compute_dx ? dxp + (t * B + b0) * I : nullptr;
      if (gemm == SeqGemm::blas) {
        copy_rows(xp + (t * B + b0) * I, I, a_t.data(), K, n, I);
        copy_rows(h_prev, H, a_t.data() + I, K, n, H);
        blas_sgemm(true, false, K, G, n, a_t.data(), K, da.data(), G, /*add_c=*/true, dw, G);
      } else {
        transpose_rows(xp + (t * B + b0) * I, I, a_t.data(), n, n, I);
        transpose_rows(h_prev, H, a_t.data() + I * n, n, n, H);
        brgemm_f32(K, G, n, n, G, G, /*add_c=*/true, a_t.data(), da.data(), dw);
      }
      gemm_nn(gemm, n, H, G, da.data(), G, w_hhp, H, /*add_c=*/false, dh_s, H);
      if (compute_dx) gemm_nn(gemm, n, I, G, da.data(), G, w_ihp, I, /*add_c=*/false, dx_t, I);
    }
  });
  // The slices' partial sums, transposed and added in slice order, and split into dW_ih [G, I] and dW_hh [G, H], in
  // parallel over blocks of gate rows.
  at::Tensor dw_ih = at::empty({G, I}, x.options()), dw_hh = at::empty({G, H}, x.options());
  at::Tensor db = at::empty({G}, x.options());
  const float* partp = dw_parts.const_data_ptr<float>();
  const float* dbpp = db_parts.const_data_ptr<float>();
  float *dw_ihp = dw_ih.data_ptr<float>(), *dw_hhp = dw_hh.data_ptr<float>(), *dbp = db.data_ptr<float>();
  at::parallel_for(0, G, 64, [&](int64_t g0, int64_t g1) {
    std::vector<float> sum((g1 - g0) * K);  // [g1 - g0, K]: rows of dW_cat
    for (int64_t g = g0; g < g1; ++g) {
      float acc = dbpp[g];
      for (int64_t sl = 1; sl < slices; ++sl) acc += dbpp[sl * G + g];
      dbp[g] = acc;
    }
    // Each slice's rows g0 .. g1 of dW_cat as a [g1 - g0, K] block, transposed from its [K, g1 - g0] columns.
    const auto block_of = [&](int64_t sl, float* dst) {
      transpose_rows(partp + sl * K * G + g0, G, dst, K, K, g1 - g0);
    };
    block_of(0, sum.data());
    std::vector<float> blk(slices > 1 ? sum.size() : 0);
    for (int64_t sl = 1; sl < slices; ++sl) {
      block_of(sl, blk.data());
      for (size_t i = 0; i < sum.size(); ++i) sum[i] += blk[i];
    }
    copy_rows(sum.data(), K, dw_ihp + g0 * I, I, g1 - g0, I);
    copy_rows(sum.data() + I, K, dw_hhp + g0 * H, H, g1 - g0, H);
  });
  return {dx, dw_ih, dw_hh, db, dh, dc};
}
#endif  // CPUBLAS_BRGEMM_F32F32F32

}  // namespace

const char* cpu_rows_isa() {
  switch (row_isa()) {
    case RowIsa::avx512:
      return "avx512";
    case RowIsa::avx2:
      return "avx2";
    case RowIsa::base:
      break;
  }
  return "baseline";
}

const char* cpu_sequence_gemm() {
#ifdef LEGW_FUSED_SEQ_F32
  return seq_gemm() == SeqGemm::blas ? "blas" : "brgemm";
#else
  return "none";
#endif
}

bool cpu_blas_sgemm() {
#ifdef LEGW_FUSED_SEQ_F32
  return blas_sgemm_found();
#else
  return false;
#endif
}

bool cpu_sequence_kernel() {
#ifdef LEGW_FUSED_SEQ_F32
  return true;
#else
  return false;
#endif
}

namespace {
// fp32 sequences on the whole-sequence kernel where it is built, all else on the per-step path. keep: the gates and
// cell states for a backward (the 4th and 5th outputs; without it they are empty on the sequence kernel).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_fwd_cpu(
    const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0, const at::Tensor& c0, bool reverse, bool keep) {
#ifdef LEGW_FUSED_SEQ_F32
  if (use_seq_f32(x)) {
    check_layer_args(x, w_ih, w_hh, b_ih, b_hh, h0, c0);
    return layer_fwd_seq_f32(x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse, keep);
  }
#endif
  return layer_fwd(pointwise_fwd_cpu, x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse);
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd_cpu(
    const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0, const at::Tensor& c0, bool reverse) {
  return layer_fwd_cpu(x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse, /*keep=*/true);
}

// The forward without a backward to prepare for (no gradient needed): out, h_n, c_n.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_infer_cpu(
    const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, const at::Tensor& h0, const at::Tensor& c0, bool reverse) {
  auto [out, h_n, c_n, gates, cs] = layer_fwd_cpu(x, w_ih, w_hh, b_ih, b_hh, h0, c0, reverse, /*keep=*/false);
  return {out, h_n, c_n};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd_cpu(
    const c10::optional<at::Tensor>& dout, const c10::optional<at::Tensor>& dh_n, const c10::optional<at::Tensor>& dc_n,
    const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& out, const at::Tensor& act, const at::Tensor& cs, bool reverse, bool compute_dx) {
#ifdef LEGW_FUSED_SEQ_F32
  if (use_seq_f32(x)) {
    return layer_bwd_seq_f32(dout, dh_n, dc_n, x, w_ih, w_hh, h0, c0, out, act, cs, reverse, compute_dx);
  }
#endif
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
  m.impl("lstm_layer_infer", &legw_fused::lstm::lstm_layer_infer_cpu);
}

#ifdef LEGW_FUSED_WITH_CUDA
TORCH_LIBRARY_IMPL(legw_fused, CUDA, m) {
  m.impl("lstm_layer_fwd", &legw_fused::lstm::lstm_layer_fwd_cuda);
  m.impl("lstm_layer_bwd", &legw_fused::lstm::lstm_layer_bwd_cuda);
}
#endif
