// The per-element SGD/LARS update and the LARS trust ratio, shared by the CPU and CUDA fused step kernels.
//
// Both mirror legw_fused/ops/fused_step_reference.py (the oracle) in fp32: same formulas, same order of operations,
// so backends differ from the reference only by fp32 rounding (fused multiply-adds, reduction order of the norms).
#pragma once

#include <cmath>

#include "legw_schedule.h"

namespace legw_fused {

struct StepConfig {
  float momentum;
  float dampening;
  float weight_decay;
  bool nesterov;
  bool maximize;    // step up the gradient: d starts from -g, as torch.optim.SGD(maximize=True)
  bool first_step;  // momentum buffers hold no history yet: buf = d, as torch.optim.SGD's first step
};

// One element (g negated first when maximize): d = r*(g + wd*p); buf = first ? d : m*buf + (1 - dampening)*d; d =
// nesterov ? d + m*buf : buf; p = p - lr*d. `r` is the tensor's LARS trust ratio (1 without LARS); `buf` is ignored
// when momentum == 0.
LEGW_HOST_DEVICE void update_element(float& p, float g, float& buf, float lr, float r, const StepConfig& c) {
  if (c.maximize) g = -g;
  float d = (g + c.weight_decay * p) * r;
  if (c.momentum != 0.f) {
    buf = c.first_step ? d : buf * c.momentum + (1.f - c.dampening) * d;
    d = c.nesterov ? d + c.momentum * buf : buf;
  }
  p = p - lr * d;
}

// LARS: tc*|p| / (|g| + wd*|p| + eps) where both norms are > 0, else 1, at most max_ratio (+inf: no clamp); with
// clip, min(ratio / lr, 1), which is 1 at lr = 0 (the limit, also when trust_coefficient = 0 would make it 0/0).
LEGW_HOST_DEVICE float trust_ratio(float p_norm, float g_norm, float lr, float trust_coefficient, float weight_decay,
                                   float eps, bool clip, float max_ratio) {
  if (!(p_norm > 0.f && g_norm > 0.f)) return 1.f;
  const float r = fminf(trust_coefficient * p_norm / (g_norm + weight_decay * p_norm + eps), max_ratio);
  if (!clip) return r;
  return lr > 0.f ? fminf(r / lr, 1.f) : 1.f;
}

}  // namespace legw_fused
