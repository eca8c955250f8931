// The per-element SGD/LARS update and the LARS trust ratio, shared by the CPU and CUDA fused step kernels.
//
// The update mirrors torch.optim.SGD's fp32 arithmetic operation by operation (legw_fused/ops/fused_step_reference.py
// writes the same formulas out): each torch op rounds once, and `x.add(y, alpha=a)` is computed as a*y + x, fused
// (one rounding) by torch's AVX2/AVX512 CPU kernels and by CUDA, unfused (a*y rounded first) by its DEFAULT CPU
// kernels. kFused picks the same, so the fp32 results are torch's bit for bit on the ISA torch runs on.
#pragma once

#include <cmath>

#include "legw_schedule.h"

namespace legw_fused {

// Scalars as torch's ops receive them: Python doubles rounded once to fp32 (so 1 - dampening is rounded after the
// subtraction, in double).
struct StepConfig {
  float momentum;
  float one_minus_dampening;  // the weight of d in the momentum update
  float weight_decay;
  bool nesterov;
  bool maximize;    // step up the gradient: d starts from -g, as torch.optim.SGD(maximize=True)
  bool first_step;  // momentum buffers hold no history yet: buf = d, as torch.optim.SGD's first step

  LEGW_HOST_DEVICE bool has_momentum() const { return momentum != 0.f; }
  LEGW_HOST_DEVICE bool decays() const { return weight_decay != 0.f; }  // torch skips the op at wd = 0
};

// The same with its flags fixed at compile time, for the CPU loops: with flags read at run time GCC kept the SGD
// loop scalar (a test of first_step per element; AVX-512 EPYC, perf annotate), at 0.66x torch's fused CPU SGD.
// `maximize` is left out: the CPU loop folds it into the gradient's scale (g * -s == -(g * s) exactly).
template <bool kMomentum, bool kDecays, bool kNesterov, bool kFirstStep>
struct FixedStepConfig {
  float momentum;
  float one_minus_dampening;
  float weight_decay;
  static constexpr bool nesterov = kNesterov;
  static constexpr bool maximize = false;
  static constexpr bool first_step = kFirstStep;

  static constexpr bool has_momentum() { return kMomentum; }
  static constexpr bool decays() { return kDecays; }
};

// a*b + c: one rounding with kFused (fmaf), two without. Callers compile the unfused form without floating-point
// contraction (fused_step.cpp: fp-contract=off), or it would silently become an fma on FMA targets.
template <bool kFused>
LEGW_HOST_DEVICE float madd(float a, float b, float c) {
  if constexpr (kFused) {
    return fmaf(a, b, c);
  } else {
    return a * b + c;
  }
}

// One element, in torch.optim.SGD's op order (g negated first when maximize; wd = weight_decay, m = momentum):
// d = r*(g + wd*p); buf = first ? d : (buf*m) + (1 - dampening)*d; d = nesterov ? d + m*buf : buf; p = p - lr*d.
// `r` is the tensor's LARS trust ratio (1 without LARS: exact); `buf` is ignored when momentum == 0.
// `Config`: StepConfig or a FixedStepConfig.
template <bool kFused, typename Config>
LEGW_HOST_DEVICE void update_element(float& p, float g, float& buf, float lr, float r, const Config& c) {
  if (c.maximize) g = -g;
  float d = c.decays() ? madd<kFused>(c.weight_decay, p, g) : g;
  d = d * r;
  if (c.has_momentum()) {
    buf = c.first_step ? d : madd<kFused>(c.one_minus_dampening, d, buf * c.momentum);
    d = c.nesterov ? madd<kFused>(c.momentum, buf, d) : buf;
  }
  p = madd<kFused>(-lr, d, p);
}

// One stored element: param p (dtype P; with kMaster only written, the update running on the fp32 master), grad g
// (times inv_scale, GradScaler's unscale), momentum buffer buf (dtype B, only with kMomentum). Returns the value the
// |p|^2 cache squares: the master, or the param as stored.
template <bool kFused, bool kMomentum, bool kMaster, typename P, typename B, typename Config>
LEGW_HOST_DEVICE float update_one(P& p, P g, B& buf, float& master, float lr, float r, float inv_scale,
                                  const Config& c) {
  float x = kMaster ? master : static_cast<float>(p);
  // Read also on the first step, where update_element ignores it (buf = d): a load under a condition kept the CPU
  // loop scalar. The buffer exists whenever kMomentum (fresh, uninitialised memory on the first step).
  float b = kMomentum ? static_cast<float>(buf) : 0.f;
  update_element<kFused>(x, static_cast<float>(g) * inv_scale, b, lr, r, c);
  if constexpr (kMaster) master = x;
  p = static_cast<P>(x);
  if constexpr (kMomentum) buf = static_cast<B>(b);
  return kMaster ? x : static_cast<float>(p);
}

// LARS: tc*|p| / (|g| + wd*|p| + eps) where both norms are > 0, else 1, at most max_ratio (+inf: no clamp); with
// clip, min(ratio / lr, 1), which is 1 at lr = 0 (the limit, also when trust_coefficient = 0 would make it 0/0).
LEGW_HOST_DEVICE float trust_ratio(float p_norm, float g_norm, float lr, float trust_coefficient, float weight_decay,
                                   float eps, bool clip, float max_ratio) {
  if (!(p_norm > 0.f && g_norm > 0.f)) return 1.f;
  // wd*|p| + |g| as one explicit fma: nvcc and Triton contract it by default and this file's CPU build does not
  // (fp-contract=off), so written plainly the backends' ratios could differ in the last bit.
  const float r = fminf(trust_coefficient * p_norm / (fmaf(weight_decay, p_norm, g_norm) + eps), max_ratio);
  if (!clip) return r;
  return lr > 0.f ? fminf(r / lr, 1.f) : 1.f;
}

}  // namespace legw_fused
