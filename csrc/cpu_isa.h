// Run-time choice between two builds of a CPU loop: the baseline one (the extension targets baseline x86-64, so that
// it runs anywhere) and one compiled under `#pragma GCC target("avx2,fma")` where LEGW_FUSED_AVX2 is defined.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#define LEGW_FUSED_AVX2 1
#endif

namespace legw_fused {

inline bool cpu_has_avx2_fma() {
#ifdef LEGW_FUSED_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// AVX-512 F, VL, BW and DQ: what the loops compiled under `target("avx512f,avx512vl,avx512bw,avx512dq")` may use.
inline bool cpu_has_avx512() {
#ifdef LEGW_FUSED_AVX2
  static const bool ok = cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

}  // namespace legw_fused
