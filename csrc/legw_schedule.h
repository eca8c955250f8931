// The LEGW learning-rate schedule, evaluated inside kernels from a device step count.
//
// Host and device share this one definition so that every fused kernel (CPU, CUDA) computes exactly the LR that
// legw_fused.LEGW.lr() defines in Python. The schedule arrives as the float64 tensor LEGW.packed(device); all
// integer rounding (W, T, milestone steps) was done on the host, so here there is only comparison and arithmetic.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LEGW_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LEGW_HOST_DEVICE inline
#endif

namespace legw_fused {

// Slots of the packed schedule; mirrors PACKED_SLOTS in legw_fused/schedule.py.
enum ScheduleSlot : int {
  kDecay = 0,
  kPeakLr = 1,
  kEndLr = 2,
  kWarmupSteps = 3,
  kTotalSteps = 4,
  kStepsPerEpoch = 5,
  kPower = 6,
  kGamma = 7,
  kNumMilestones = 8,
  kFirstMilestone = 9,  // milestone steps follow, kNumMilestones of them
};

// Order of legw_fused.schedule.DECAYS.
enum Decay : int { kPoly = 0, kCosine = 1, kExp = 2, kStep = 3, kConstant = 4 };

constexpr int kNumDecays = 5;

// LR of optimizer step t (t = steps already taken). Operation order follows LEGW.lr() so that the CPU result is
// bitwise the Python one (same libm); on CUDA pow/cos may differ in the last bit of a double. `sched_len` (the
// packed tensor's numel) bounds the milestone reads, since on the device the header cannot be checked first.
LEGW_HOST_DEVICE double legw_lr(double t, const double* sched, int64_t sched_len) {
  const double peak = sched[kPeakLr];
  const double end = sched[kEndLr];
  const double W = sched[kWarmupSteps];
  const double T = sched[kTotalSteps];
  if (t < W) return peak * (t + 1.0) / W;
  const double s = T > W ? fmin((t - W) / (T - W), 1.0) : 1.0;
  switch (static_cast<int>(sched[kDecay])) {
    case kPoly:
      return end + (peak - end) * pow(1.0 - s, sched[kPower]);
    case kCosine:
      return end + (peak - end) * (1.0 + cos(M_PI * s)) / 2.0;
    case kExp:
      return peak * pow(sched[kGamma], (t - W) / sched[kStepsPerEpoch]);
    case kStep: {
      const int64_t announced = static_cast<int64_t>(sched[kNumMilestones]);
      const int64_t n = announced < sched_len - kFirstMilestone ? announced : sched_len - kFirstMilestone;
      double passed = 0.0;
      for (int64_t i = 0; i < n; ++i) passed += t >= sched[kFirstMilestone + i] ? 1.0 : 0.0;
      return peak * pow(sched[kGamma], passed);
    }
    default:
      return peak;
  }
}

}  // namespace legw_fused
