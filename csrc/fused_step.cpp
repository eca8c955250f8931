// CPU implementation of legw_fused::fused_step_: the whole SGD/LARS step for a list of tensors in one call.
//
// Work is cut into fixed chunks of at most kChunk elements of one tensor. Threads (at::parallel_for, OpenMP) get
// equal shares of all elements, not of chunks: a model's tensors range from 1 to millions of elements, and an
// even split by chunk count left one of two threads with 80% of the work. LARS first reduces |p|^2 and |g|^2 per
// chunk, then sums the chunk partials of each tensor in chunk order: the result does not depend on the number of
// threads (bitwise repeatable). The update is one pass: read p, g, buf; write p, buf (20 bytes per fp32 element).
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
constexpr int64_t kChunk = 1 << 16;

struct Chunk {
  int64_t tensor;
  int64_t begin;   // element range within the tensor
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

// Calls fn(chunk_index) for every chunk, each exactly once, threads taking equal shares of the elements: a thread
// owning elements [begin, end) runs the chunks that start there.
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, int64_t total, const F& fn) {
  at::parallel_for(0, total, kChunk, [&](int64_t begin, int64_t end) {
    auto first = std::lower_bound(chunks.begin(), chunks.end(), begin,
                                  [](const Chunk& c, int64_t off) { return c.offset < off; });
    for (auto it = first; it != chunks.end() && it->offset < end; ++it) fn(it - chunks.begin());
  });
}

template <typename F>
void dispatch_param_type(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    case at::kHalf:
      return f(c10::Half{});
    default:
      TORCH_CHECK(false, "fused_step_: unsupported param dtype ", type);
  }
}

// Sum of squares. Four independent 4-wide fp32 accumulators (GCC/Clang vector extensions): a single accumulator
// makes the loop wait on each add's latency, at about a third of the memory bandwidth, and the compiler does not
// split it by itself without -ffast-math. Accumulators restart every 1024 elements, whose sums are added in
// double. The order of additions is fixed by this code, so the result repeats exactly.
typedef float f32x4 __attribute__((vector_size(16)));

template <typename T>
double sum_squares(const T* __restrict x, int64_t n, float scale) {
  constexpr int64_t kBlock = 1024;
  double acc = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    f32x4 a[4] = {};
    int64_t i = b;
    for (; i + 16 <= e; i += 16) {
      float v[16];
      for (int j = 0; j < 16; ++j) v[j] = static_cast<float>(x[i + j]) * scale;
      for (int k = 0; k < 4; ++k) {
        f32x4 w;
        std::memcpy(&w, v + 4 * k, sizeof(w));
        a[k] += w * w;
      }
    }
    const f32x4 s = (a[0] + a[1]) + (a[2] + a[3]);
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
void update_chunk(P* __restrict p, const P* __restrict g, B* __restrict buf, float* __restrict master, int64_t n,
                  float lr, float r, float inv_scale, const StepConfig c) {
  for (int64_t i = 0; i < n; ++i) {
    float pv = kMaster ? master[i] : static_cast<float>(p[i]);
    float bv = (kMomentum && !c.first_step) ? static_cast<float>(buf[i]) : 0.f;
    update_element(pv, static_cast<float>(g[i]) * inv_scale, bv, lr, r, c);
    if constexpr (kMaster) master[i] = pv;
    p[i] = static_cast<P>(pv);
    if constexpr (kMomentum) buf[i] = static_cast<B>(bv);
  }
}

}  // namespace

void fused_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList masters,
                    const at::Tensor& step, const c10::optional<at::Tensor>& schedule,
                    const c10::optional<at::Tensor>& lr_tensor, double lr, double momentum, double dampening,
                    double weight_decay, bool nesterov, bool first_step, bool lars, double trust_coefficient,
                    double eps, bool trust_clip, const c10::optional<at::Tensor>& grad_scale,
                    const c10::optional<at::Tensor>& found_inf) {
  check_fused_step_args(params, grads, bufs, masters, step, schedule, momentum);
  if (params.empty()) return;
  // A GradScaler found inf/NaN gradients: the step is skipped and nothing changes. (Host reads are free on CPU.)
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) return;

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

  const auto chunks = make_chunks(params);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  const int64_t total = chunks.empty() ? 0 : chunks.back().offset + (chunks.back().end - chunks.back().begin);
  std::vector<float> ratio(params.size(), 1.f);
  dispatch_param_type(params[0].scalar_type(), [&](auto tag) {
    using P = decltype(tag);
    if (lars) {
      std::vector<double> p_sq(n_chunks), g_sq(n_chunks);
      for_each_chunk(chunks, total, [&](int64_t k) {
        const Chunk& ch = chunks[k];
        const int64_t len = ch.end - ch.begin;
        p_sq[k] = masters.empty() ? sum_squares(params[ch.tensor].data_ptr<P>() + ch.begin, len, 1.f)
                                  : sum_squares(masters[ch.tensor].data_ptr<float>() + ch.begin, len, 1.f);
        g_sq[k] = sum_squares(grads[ch.tensor].data_ptr<P>() + ch.begin, len, inv_scale);
      });
      std::vector<double> p_total(params.size(), 0.0), g_total(params.size(), 0.0);
      for (int64_t k = 0; k < n_chunks; ++k) {
        p_total[chunks[k].tensor] += p_sq[k];
        g_total[chunks[k].tensor] += g_sq[k];
      }
      for (size_t t = 0; t < params.size(); ++t) {
        ratio[t] = trust_ratio(static_cast<float>(std::sqrt(p_total[t])), static_cast<float>(std::sqrt(g_total[t])),
                               lr_f, static_cast<float>(trust_coefficient), static_cast<float>(weight_decay),
                               static_cast<float>(eps), trust_clip);
      }
    }

    const StepConfig cfg{static_cast<float>(momentum), static_cast<float>(dampening),
                         static_cast<float>(weight_decay), nesterov, first_step};
    auto run = [&](auto momentum_tag, auto master_tag) {
      constexpr bool kMomentum = decltype(momentum_tag)::value;
      constexpr bool kMaster = decltype(master_tag)::value;
      using B = std::conditional_t<kMaster, float, P>;
      for_each_chunk(chunks, total, [&](int64_t k) {
        const Chunk& ch = chunks[k];
        update_chunk<P, B, kMomentum, kMaster>(
            params[ch.tensor].data_ptr<P>() + ch.begin, grads[ch.tensor].data_ptr<P>() + ch.begin,
            kMomentum ? bufs[ch.tensor].data_ptr<B>() + ch.begin : nullptr,
            kMaster ? masters[ch.tensor].data_ptr<float>() + ch.begin : nullptr, ch.end - ch.begin, lr_f,
            ratio[ch.tensor], inv_scale, cfg);
      });
    };
    const bool has_momentum = momentum != 0.0;
    if (masters.empty()) {
      has_momentum ? run(std::true_type{}, std::false_type{}) : run(std::false_type{}, std::false_type{});
    } else {
      has_momentum ? run(std::true_type{}, std::true_type{}) : run(std::false_type{}, std::true_type{});
    }
  });
}

TORCH_LIBRARY_IMPL(legw_fused, CPU, m) { m.impl("fused_step_", &fused_step_cpu); }

}  // namespace legw_fused
