// CPU implementation of legw_fused::fused_step_ and legw_fused::sum_squares: the whole SGD/LARS step for a list of
// tensors in one call.
//
// Work is cut into fixed chunks of at most kChunk elements of one tensor. Threads (at::parallel_for, OpenMP) get
// equal shares of all elements, not of chunks: a model's tensors range from 1 to millions of elements, and an
// even split by chunk count left one of two threads with 80% of the work. SGD is one pass: read p, g, buf; write
// p, buf (20 bytes per fp32 element). LARS reduces |p|^2 and |g|^2 per chunk and sums each tensor's chunk
// partials in chunk order, so the result does not depend on the number of threads (bitwise repeatable); it works
// through cache-sized groups of tensors (see kCacheGroup). With the |p|^2 cache (param_sq) the update
// pass also sums the squares of what it stores, so the next step's norm pass reads only g.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "fused_step.h"
#include "fused_step_args.h"
#include "legw_lr.h"

namespace legw_fused {
namespace {

// 64K elements: large enough that per-chunk overhead vanishes, small enough to balance tensors of any size.
constexpr int64_t kChunk = kParamSqChunk;

struct Chunk {
  int64_t tensor;
  int64_t begin;  // element range within the tensor
  int64_t end;
  int64_t offset;  // position of `begin` among all elements of the call
};

std::vector<Chunk> make_chunks(at::TensorList params) {
  std::vector<Chunk> chunks;
  int64_t offset = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(params.size()); ++t) {
    const int64_t n = params[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk), offset + b});
    offset += n;
  }
  return chunks;
}

// Calls fn(k) for every chunk k in [c0, c1), each exactly once, threads taking equal shares of the elements: a
// thread owning elements [begin, end) runs the chunks that start there.
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, int64_t c0, int64_t c1, const F& fn) {
  if (c0 >= c1) return;
  const int64_t first = chunks[c0].offset;
  const int64_t last = chunks[c1 - 1].offset + (chunks[c1 - 1].end - chunks[c1 - 1].begin);
  at::parallel_for(first, last, kChunk, [&](int64_t begin, int64_t end) {
    auto it = std::lower_bound(chunks.begin() + c0, chunks.begin() + c1, begin,
                               [](const Chunk& c, int64_t off) { return c.offset < off; });
    for (; it != chunks.begin() + c1 && it->offset < end; ++it) fn(it - chunks.begin());
  });
}

// LARS needs every norm of a tensor before any of its elements is updated. Done tensor group by tensor group,
// with groups of whole tensors of at most kCacheGroup elements (8 MB of fp32 p and g; or one larger tensor), the
// update re-reads p and g from the last-level cache instead of memory: 20 bytes per fp32 element from DRAM
// instead of 28, for all but the largest tensors.
constexpr int64_t kCacheGroup = 1 << 20;

std::vector<std::pair<int64_t, int64_t>> cache_groups(const std::vector<Chunk>& chunks) {
  std::vector<std::pair<int64_t, int64_t>> groups;
  const int64_t n = static_cast<int64_t>(chunks.size());
  int64_t start = 0, elements = 0;
  for (int64_t k = 0; k < n;) {
    int64_t e = k, tensor_elements = 0;
    for (; e < n && chunks[e].tensor == chunks[k].tensor; ++e) tensor_elements += chunks[e].end - chunks[e].begin;
    if (elements > 0 && elements + tensor_elements > kCacheGroup) {
      groups.emplace_back(start, k);
      start = k;
      elements = 0;
    }
    elements += tensor_elements;
    k = e;
  }
  if (start < n) groups.emplace_back(start, n);
  return groups;
}

// Sum of squares. Four independent 4-wide fp32 accumulators (GCC/Clang vector extensions): a single accumulator
// makes the loop wait on each add's latency, at about a third of the memory bandwidth, and the compiler does not
// split it by itself without -ffast-math. Accumulators restart every 1024 elements, whose sums are added in
// double. The order of additions is fixed by this code, so the result repeats exactly.
typedef float f32x4 __attribute__((vector_size(16)));

// Four consecutive values as fp32 times `scale`, built in registers: staging them through a float[16] on the stack
// made GCC mix vector and scalar stores, and the reloads that failed store forwarding ran the loop at a quarter of
// its in-cache speed (measured: 6.6 vs 25 GB/s per core in cache; 13 vs 19-22 GB/s from memory on 2 cores).
template <typename T>
inline f32x4 load4(const T* __restrict x, float scale) {
  f32x4 w;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&w, x, sizeof(w));
  } else {
    w = f32x4{static_cast<float>(x[0]), static_cast<float>(x[1]), static_cast<float>(x[2]), static_cast<float>(x[3])};
  }
  return w * scale;
}

// Asks for the cache lines of x[begin, end) ahead of use. A read-only pass is one stream per thread, and the
// hardware prefetchers alone left it at 25-27 GB/s on the 2-core VM; prefetching each 1024-element block two blocks
// ahead reached 44-48 GB/s (a standalone loop over 40 MB, 2 threads).
template <typename T>
inline void prefetch(const T* x, int64_t begin, int64_t end) {
  const char* p = reinterpret_cast<const char*>(x + begin);
  const char* e = reinterpret_cast<const char*>(x + end);
  for (; p < e; p += 64) __builtin_prefetch(p);
}

template <typename T>
double sum_squares(const T* __restrict x, int64_t n, float scale) {
  constexpr int64_t kBlock = 1024;
  double acc = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    prefetch(x, std::min(n, b + 2 * kBlock), std::min(n, b + 3 * kBlock));
    f32x4 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    int64_t i = b;
    for (; i + 16 <= e; i += 16) {
      const f32x4 w0 = load4(x + i, scale), w1 = load4(x + i + 4, scale), w2 = load4(x + i + 8, scale),
                  w3 = load4(x + i + 12, scale);
      a0 += w0 * w0;
      a1 += w1 * w1;
      a2 += w2 * w2;
      a3 += w3 * w3;
    }
    const f32x4 s = (a0 + a1) + (a2 + a3);
    float block = (s[0] + s[1]) + (s[2] + s[3]);
    for (; i < e; ++i) {
      const float v = static_cast<float>(x[i]) * scale;
      block += v * v;
    }
    acc += block;
  }
  return acc;
}

template <typename P, typename B, bool kMomentum, bool kMaster>
inline float update_one(P* __restrict p, const P* __restrict g, B* __restrict buf, float* __restrict master, int64_t i,
                        float lr, float r, float inv_scale, const StepConfig& c) {
  float pv = kMaster ? master[i] : static_cast<float>(p[i]);
  float bv = (kMomentum && !c.first_step) ? static_cast<float>(buf[i]) : 0.f;
  update_element(pv, static_cast<float>(g[i]) * inv_scale, bv, lr, r, c);
  if constexpr (kMaster) master[i] = pv;
  const P stored = static_cast<P>(pv);
  p[i] = stored;
  if constexpr (kMomentum) buf[i] = static_cast<B>(bv);
  return kMaster ? pv : static_cast<float>(stored);  // the value the next step's norm is taken of
}

// Updates n elements; with kNorm returns the sum of squares of the values stored, in a fixed order (16 lanes,
// blocks of 1024 added in double), so it repeats exactly and costs no memory traffic.
template <typename P, typename B, bool kMomentum, bool kMaster, bool kNorm>
double update_chunk(P* __restrict p, const P* __restrict g, B* __restrict buf, float* __restrict master, int64_t n,
                    float lr, float r, float inv_scale, const StepConfig c) {
  if constexpr (!kNorm) {
    for (int64_t i = 0; i < n; ++i) update_one<P, B, kMomentum, kMaster>(p, g, buf, master, i, lr, r, inv_scale, c);
    return 0.0;
  } else {
    constexpr int64_t kBlock = 1024;
    double acc = 0.0;
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t e = std::min(n, b + kBlock);
      float lanes[16] = {};
      int64_t i = b;
      for (; i + 16 <= e; i += 16) {
        for (int j = 0; j < 16; ++j) {
          const float v = update_one<P, B, kMomentum, kMaster>(p, g, buf, master, i + j, lr, r, inv_scale, c);
          lanes[j] += v * v;
        }
      }
      float block = 0.f;
      for (int j = 0; j < 16; ++j) block += lanes[j];
      for (; i < e; ++i) {
        const float v = update_one<P, B, kMomentum, kMaster>(p, g, buf, master, i, lr, r, inv_scale, c);
        block += v * v;
      }
      acc += block;
    }
    return acc;
  }
}

}  // namespace

void fused_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList masters,
                    const at::Tensor& step, const c10::optional<at::Tensor>& schedule,
                    const c10::optional<at::Tensor>& lr_tensor, double lr, double momentum, double dampening,
                    double weight_decay, bool nesterov, bool maximize, bool first_step, bool lars,
                    double trust_coefficient, double eps, bool trust_clip, double max_trust_ratio,
                    const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                    const c10::optional<at::Tensor>& norms_sq, const c10::optional<at::Tensor>& param_sq,
                    bool param_sq_cached) {
  check_fused_step_args(params, grads, bufs, masters, step, schedule, momentum,
                        {{"lr_tensor", &lr_tensor}, {"grad_scale", &grad_scale}, {"found_inf", &found_inf}});
  check_norm_args("fused_step_", params, norms_sq, param_sq, param_sq_cached);
  if (params.empty()) return;
  const auto chunks = make_chunks(params);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  float* partials = param_sq.has_value() ? param_sq->data_ptr<float>() : nullptr;

  // A GradScaler found inf/NaN gradients: the step is skipped and nothing changes. (Host reads are free on CPU.)
  // The |p|^2 cache must still describe the params after the call: refreshed unless it already does.
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) {
    if (partials != nullptr && !param_sq_cached) {
      dispatch_param_type(params[0].scalar_type(), [&](auto tag) {
        using P = decltype(tag);
        for_each_chunk(chunks, 0, n_chunks, [&](int64_t k) {
          const Chunk& ch = chunks[k];
          const int64_t len = ch.end - ch.begin;
          partials[k] = static_cast<float>(
              masters.empty() ? sum_squares(params[ch.tensor].data_ptr<P>() + ch.begin, len, 1.f)
                              : sum_squares(masters[ch.tensor].data_ptr<float>() + ch.begin, len, 1.f));
        });
      });
    }
    return;
  }

  double lr_value = lr;
  if (schedule.has_value()) {
    const at::Tensor s = schedule->contiguous();
    check_packed_schedule_cpu(s, "fused_step_");
    lr_value = legw_lr(static_cast<double>(step.item<int64_t>()), s.data_ptr<double>(), s.numel());
  } else if (lr_tensor.has_value()) {
    lr_value = lr_tensor->item<double>();
  }
  const float lr_f = static_cast<float>(lr_value);
  // Same reciprocal as GradScaler.unscale_ (double, then rounded to fp32).
  const float inv_scale = grad_scale.has_value() ? static_cast<float>(1.0 / grad_scale->item<double>()) : 1.f;

  const int64_t n_tensors = static_cast<int64_t>(params.size());
  std::vector<float> ratio(params.size(), 1.f);
  const auto ratio_of = [&](double p_sq, double g_sq) {
    return trust_ratio(static_cast<float>(std::sqrt(p_sq)), static_cast<float>(std::sqrt(g_sq)), lr_f,
                       static_cast<float>(trust_coefficient), static_cast<float>(weight_decay), static_cast<float>(eps),
                       trust_clip, static_cast<float>(max_trust_ratio));
  };
  if (lars && norms_sq.has_value()) {
    const float* norms = norms_sq->data_ptr<float>();
    for (int64_t t = 0; t < n_tensors; ++t) ratio[t] = ratio_of(norms[t], norms[n_tensors + t]);
  }
  const StepConfig cfg{static_cast<float>(momentum),
                       static_cast<float>(dampening),
                       static_cast<float>(weight_decay),
                       nesterov,
                       maximize,
                       first_step};
  dispatch_param_type(params[0].scalar_type(), [&](auto tag) {
    using P = decltype(tag);
    // |p|^2 (read from the cache, or summed) and |g|^2 of chunks [c0, c1), summed per tensor in chunk order, then
    // the trust ratios.
    auto trust_ratios = [&](int64_t c0, int64_t c1) {
      std::vector<double> p_sq(c1 - c0), g_sq(c1 - c0);
      for_each_chunk(chunks, c0, c1, [&](int64_t k) {
        const Chunk& ch = chunks[k];
        const int64_t len = ch.end - ch.begin;
        if (param_sq_cached) {
          p_sq[k - c0] = partials[k];
        } else {
          p_sq[k - c0] = masters.empty() ? sum_squares(params[ch.tensor].data_ptr<P>() + ch.begin, len, 1.f)
                                         : sum_squares(masters[ch.tensor].data_ptr<float>() + ch.begin, len, 1.f);
        }
        g_sq[k - c0] = sum_squares(grads[ch.tensor].data_ptr<P>() + ch.begin, len, inv_scale);
      });
      for (int64_t k = c0; k < c1;) {
        const int64_t t = chunks[k].tensor;
        double p_total = 0.0, g_total = 0.0;
        for (; k < c1 && chunks[k].tensor == t; ++k) {
          p_total += p_sq[k - c0];
          g_total += g_sq[k - c0];
        }
        ratio[t] = ratio_of(p_total, g_total);
      }
    };
    auto update = [&](int64_t c0, int64_t c1, auto momentum_tag, auto master_tag, auto norm_tag) {
      constexpr bool kMomentum = decltype(momentum_tag)::value;
      constexpr bool kMaster = decltype(master_tag)::value;
      constexpr bool kNorm = decltype(norm_tag)::value;
      using B = std::conditional_t<kMaster, float, P>;
      for_each_chunk(chunks, c0, c1, [&](int64_t k) {
        const Chunk& ch = chunks[k];
        const double sq = update_chunk<P, B, kMomentum, kMaster, kNorm>(
            params[ch.tensor].data_ptr<P>() + ch.begin, grads[ch.tensor].data_ptr<P>() + ch.begin,
            kMomentum ? bufs[ch.tensor].data_ptr<B>() + ch.begin : nullptr,
            kMaster ? masters[ch.tensor].data_ptr<float>() + ch.begin : nullptr, ch.end - ch.begin, lr_f,
            ratio[ch.tensor], inv_scale, cfg);
        if constexpr (kNorm) partials[k] = static_cast<float>(sq);
      });
    };
    auto update_with_norm = [&](int64_t c0, int64_t c1, auto momentum_tag, auto master_tag) {
      partials != nullptr ? update(c0, c1, momentum_tag, master_tag, std::true_type{})
                          : update(c0, c1, momentum_tag, master_tag, std::false_type{});
    };
    auto step_chunks = [&](int64_t c0, int64_t c1, bool reduce) {
      if (reduce) trust_ratios(c0, c1);
      const bool has_momentum = momentum != 0.0;
      if (masters.empty()) {
        has_momentum ? update_with_norm(c0, c1, std::true_type{}, std::false_type{})
                     : update_with_norm(c0, c1, std::false_type{}, std::false_type{});
      } else {
        has_momentum ? update_with_norm(c0, c1, std::true_type{}, std::true_type{})
                     : update_with_norm(c0, c1, std::false_type{}, std::true_type{});
      }
    };
    if (lars && !norms_sq.has_value()) {
      for (const auto& [c0, c1] : cache_groups(chunks)) step_chunks(c0, c1, true);
    } else {
      step_chunks(0, n_chunks, false);  // one pass over everything
    }
  });
}

at::Tensor sum_squares_cpu(at::TensorList params, at::TensorList grads, at::TensorList masters,
                           const c10::optional<at::Tensor>& param_sq, const c10::optional<at::Tensor>& grad_scale) {
  check_sum_squares_args(params, grads, masters, grad_scale);
  check_norm_args("sum_squares", params, c10::nullopt, param_sq, false);
  const int64_t n = static_cast<int64_t>(params.size());
  at::Tensor out = at::zeros(
      {2, n}, at::TensorOptions().dtype(at::kFloat).device(params.empty() ? at::Device(at::kCPU) : params[0].device()));
  if (n == 0) return out;
  const float inv_scale = grad_scale.has_value() ? static_cast<float>(1.0 / grad_scale->item<double>()) : 1.f;
  const float* cached = param_sq.has_value() ? param_sq->data_ptr<float>() : nullptr;
  const auto chunks = make_chunks(params);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  std::vector<double> p_sq(n_chunks), g_sq(n_chunks);
  dispatch_param_type(params[0].scalar_type(), [&](auto tag) {
    using P = decltype(tag);
    for_each_chunk(chunks, 0, n_chunks, [&](int64_t k) {
      const Chunk& ch = chunks[k];
      const int64_t len = ch.end - ch.begin;
      if (cached != nullptr) {
        p_sq[k] = cached[k];
      } else {
        p_sq[k] = masters.empty() ? sum_squares(params[ch.tensor].data_ptr<P>() + ch.begin, len, 1.f)
                                  : sum_squares(masters[ch.tensor].data_ptr<float>() + ch.begin, len, 1.f);
      }
      g_sq[k] = sum_squares(grads[ch.tensor].data_ptr<P>() + ch.begin, len, inv_scale);
    });
  });
  float* o = out.data_ptr<float>();
  for (int64_t k = 0; k < n_chunks;) {  // chunk partials summed per tensor in chunk order
    const int64_t t = chunks[k].tensor;
    double p_total = 0.0, g_total = 0.0;
    for (; k < n_chunks && chunks[k].tensor == t; ++k) {
      p_total += p_sq[k];
      g_total += g_sq[k];
    }
    o[t] = static_cast<float>(p_total);
    o[n + t] = static_cast<float>(g_total);
  }
  return out;
}

TORCH_LIBRARY_IMPL(legw_fused, CPU, m) {
  m.impl("fused_step_", &fused_step_cpu);
  m.impl("sum_squares", &sum_squares_cpu);
}

}  // namespace legw_fused
