// The pointwise part of one LSTM step, shared by the C++ CPU and CUDA kernels (legw_fused/functional.py has the
// maths). Shapes: B batch, H hidden, G = 4H gate columns in PyTorch's order i, f, g, o.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>

// Forced inline on the host too: the row loops (lstm_rows.inc) are compiled once per instruction set, and a call
// that GCC leaves out of line keeps its loop scalar (seen: exp_vec called from the AVX2 fp64 loop, ~6x slower).
#ifdef __CUDACC__
#define LEGW_HD __host__ __device__ __forceinline__
#else
#define LEGW_HD inline __attribute__((always_inline))
#endif

namespace legw_fused {
namespace lstm {

// exp(x) for float in arithmetic and bit operations only, so that a loop of them vectorises on the CPU (the C
// library's expf does not without -ffast-math). Range reduction x = n·ln2 + r, |r| <= ln2/2, with ln2 split in two
// (Cody–Waite), then a degree-6 Taylor/minimax polynomial for e^r (the classical Cephes coefficients; relative
// error about 2e-7, i.e. 1–2 ulp) and 2^n put into the exponent bits.
LEGW_HD float exp_approx(float x) {
  // Clamped with comparisons, not fminf/fmaxf: those are library calls that stop vectorisation (NaN rules).
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  // round(x / ln2) by the 1.5·2^23 trick: exact round-to-nearest without a floor instruction.
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = p * (r * r) + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
#ifdef __CUDA_ARCH__
  two_n = __int_as_float(bits);
#else
  std::memcpy(&two_n, &bits, sizeof two_n);
#endif
  return e_r * two_n;
}

// exp(x) for double the same way, to double precision, for the CPU loops (the C library's exp kept fp64 steps
// scalar: 0.65x nn.LSTMCell forward at B 97, H 51, whose ATen ops vectorise). Cody–Waite with fdlibm's ln2 split,
// then e^r by its Taylor series up to r^13 (|r| <= ln2/2: the next term is below 2^-60 relative), so within about
// one ulp of std::exp. 2^n comes from the low bits of the rounding sum itself (k = x/ln2 + 1.5·2^52 holds n in its
// low mantissa bits): no double-to-int64 conversion, which AVX2 lacks and would keep the loop scalar.
inline __attribute__((always_inline)) double exp_vec(double x) {  // host only: CUDA has its own exp
  x = x < -708.0 ? -708.0 : (x > 709.0 ? 709.0 : x);
  const double k = x * 1.4426950408889634 + 6755399441055744.0;
  const double n = k - 6755399441055744.0;
  const double r = (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  const double e_r = p * (r * r) + r + 1.0;
  int64_t k_bits;
  std::memcpy(&k_bits, &k, sizeof k_bits);
  const int64_t bits = (k_bits + 1023) << 52;  // n + 1023 in [2, 2046] fills the exponent field; the rest shifts out
  double two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return e_r * two_n;
}

template <typename acc_t>
LEGW_HD acc_t sigmoid(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return 1.f / (1.f + exp_approx(-x));
  } else {
#ifdef __CUDA_ARCH__
    return acc_t(1) / (acc_t(1) + exp(-x));
#else
    return acc_t(1) / (acc_t(1) + exp_vec(-x));
#endif
  }
}

// tanh(x) = 1 - 2 / (e^{2x} + 1): absolute error ~2e-7 in float, ~2e-16 in double (relative accuracy near 0 is not
// needed: every use is added to or multiplied with O(1) terms).
template <typename acc_t>
LEGW_HD acc_t tanh_(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return 1.f - 2.f / (exp_approx(2.f * x) + 1.f);
  } else {
#ifdef __CUDA_ARCH__
    return tanh(x);
#else
    return 1.0 - 2.0 / (exp_vec(2.0 * x) + 1.0);
#endif
  }
}

// Forward of one element j of one row: preactivations a_i..a_o and c_prev in, activated gates, c and h out.
template <typename acc_t>
struct Fwd {
  acc_t i, f, g, o, c, h;
  LEGW_HD Fwd(acc_t ai, acc_t af, acc_t ag, acc_t ao, acc_t c_prev) {
    i = sigmoid(ai);
    f = sigmoid(af);
    g = tanh_(ag);
    o = sigmoid(ao);
    c = f * c_prev + i * g;
    h = o * tanh_(c);
  }
};

// Backward of one element: activated gates, c_prev, c, the gradient reaching h (from the output and from the next
// step) and the one reaching c from the next step; out: the preactivation gradients and the gradient to c_prev.
template <typename acc_t>
struct Bwd {
  acc_t di, df, dg, do_, dc_prev;
  LEGW_HD Bwd(acc_t i, acc_t f, acc_t g, acc_t o, acc_t c_prev, acc_t c, acc_t dh, acc_t dc) {
    const acc_t tc = tanh_(c);
    const acc_t dc_total = dc + dh * o * (acc_t(1) - tc * tc);
    di = dc_total * g * i * (acc_t(1) - i);
    df = dc_total * c_prev * f * (acc_t(1) - f);
    dg = dc_total * i * (acc_t(1) - g * g);
    do_ = dh * tc * o * (acc_t(1) - o);
    dc_prev = dc_total * f;
  }
};

// Device kernels of one step (CPU in lstm.cpp, CUDA in cuda/lstm.cu). All tensors are contiguous rows.
//   fwd: a [B,G] preactivations in (without bias), overwritten with the activated gates (saved for backward);
//        bias [G] (acc type; zeros without biases) added in fp32; c_prev [B,H] (acc type) in; c [B,H] (acc) and
//        h [B,H] (param dtype) out.
//   bwd: act [B,G], c_prev, c [B,H] (acc); dout [B,H] (may be undefined) + dh_rec [B,H] = the gradient reaching h;
//        dc [B,H] (acc) in: from the next step, out: to c_prev; da [B,G] out (param dtype).
void pointwise_fwd_cpu(at::Tensor& a, const at::Tensor& bias, const at::Tensor& c_prev, at::Tensor& c, at::Tensor& h);
void pointwise_bwd_cpu(const at::Tensor& act, const at::Tensor& c_prev, const at::Tensor& c, const at::Tensor& dout,
                       const at::Tensor& dh_rec, at::Tensor& dc, at::Tensor& da);
#ifdef LEGW_FUSED_WITH_CUDA
void pointwise_fwd_cuda(at::Tensor& a, const at::Tensor& bias, const at::Tensor& c_prev, at::Tensor& c, at::Tensor& h);
void pointwise_bwd_cuda(const at::Tensor& act, const at::Tensor& c_prev, const at::Tensor& c, const at::Tensor& dout,
                        const at::Tensor& dh_rec, at::Tensor& dc, at::Tensor& da);
#endif

// What the CPU layer runs in this process, for legw_fused._C (reported by `legw-fused info`): the row loops' build
// ("avx512", "avx2" or "baseline", by ATen's CPU capability and the CPU), and whether fp32 sequences take the
// whole-sequence brgemm path (compiled where torch exports an fp32 at::native::cpublas::brgemm).
const char* cpu_rows_isa();
bool cpu_sequence_kernel();
// The sequence kernel's GEMMs in this process: "brgemm" (oneDNN's micro-kernel) or "blas" (the sgemm ATen calls);
// "none" without the kernel. LEGW_FUSED_LSTM_CPU_GEMM may choose; a value other than auto, brgemm or blas throws
// (c10::ValueError).
const char* cpu_sequence_gemm();
// Whether the BLAS sgemm_ that LEGW_FUSED_LSTM_CPU_GEMM=blas needs was found in torch's libraries.
bool cpu_blas_sgemm();

}  // namespace lstm
}  // namespace legw_fused
