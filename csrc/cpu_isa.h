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

}  // namespace legw_fused
