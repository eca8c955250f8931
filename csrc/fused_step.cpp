// CPU implementation of legw_fused::fused_step_ and legw_fused::sum_squares: the whole SGD/LARS step for a list of
// tensors in one call.
//
// Work is cut into fixed chunks of at most kChunk elements of one tensor. Threads (at::parallel_for, OpenMP) get
// equal shares of all elements, not of chunks: a model's tensors range from 1 to millions of elements, and an
// even split by chunk count left one of two threads with 80% of the work. SGD is one pass: read p, g, buf; write
// p, buf (20 bytes per fp32 element). LARS reduces |p|^2 and |g|^2 per chunk and sums each tensor's chunk sums in
// chunk order, so the result does not depend on the number of threads (bitwise repeatable); it works through
// cache-sized groups of tensors (see kCacheGroup). With the |p|^2 cache (param_sq) the update pass also sums the
// squares of what it stores, so the next step's norm pass reads only g.
//
// fp32 parameters get torch.optim.SGD's results bit for bit (fused_step.h): the update is built twice, with and
// without fused multiply-adds, and runs the one that matches the kernels torch itself runs on this CPU.
//
// No floating-point contraction in this file: an unfused a*b + c must stay two roundings, and a sum of squares must
// round the same way in both builds (the AVX2 one could otherwise contract it into fmas).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "fused_step.h"
#include "fused_step_args.h"
#include "legw_lr.h"

namespace legw_fused {
namespace {

// 64K elements: large enough that per-chunk overhead vanishes, small enough to balance tensors of any size.
constexpr int64_t kChunk = kParamSqChunk;
// Sums of squares restart their fp32 accumulators every kSumBlock elements (fused_step_loops.inc).
constexpr int64_t kSumBlock = 1024;

typedef float f32x4 __attribute__((vector_size(16)));  // GCC/Clang vector extension: four fp32 lanes

namespace base {
constexpr bool kFused = false;
#include "fused_step_loops.inc"
}  // namespace base

#ifdef LEGW_FUSED_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr bool kFused = true;
#include "fused_step_loops.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

// Whether torch's CPU kernels fuse x.add(y, alpha=a) on this machine: its AVX2 and AVX512 kernels do (vector body
// and scalar tail alike), its DEFAULT ones (baseline x86-64, no FMA) do not (measured with torch 2.14 against an
// fp64 emulation of both roundings). Elsewhere than x86-64 the baseline build runs.
bool torch_fuses() {
  static const bool fused = cpu_has_avx2_fma() && at::get_cpu_capability() != "DEFAULT";
  return fused;
}

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

// What the norm pass reads: params (their fp32 masters where given) and grads times inv_scale; with param_sq, the
// |p|^2 cache holding the params' chunk sums.
struct NormInputs {
  at::TensorList params, grads, masters;
  const float* param_sq;
  float inv_scale;
};

// Sum of squares of one chunk of the params (of their masters where given), as the |p|^2 cache stores it: fp32.
template <typename P>
float param_chunk_sq(const NormInputs& in, const Chunk& ch) {
  const int64_t len = ch.end - ch.begin;
  return static_cast<float>(in.masters.empty()
                                ? base::sum_squares(in.params[ch.tensor].data_ptr<P>() + ch.begin, len, 1.f)
                                : base::sum_squares(in.masters[ch.tensor].data_ptr<float>() + ch.begin, len, 1.f));
}

// Chunk sums of squares of chunks [c0, c1) into p_sq, g_sq [c1 - c0]. A fresh |p|^2 chunk sum is rounded to fp32
// like the cache's, so that a step gets the same norms from either.
template <typename P>
void chunk_sums(const NormInputs& in, const std::vector<Chunk>& chunks, int64_t c0, int64_t c1, float* p_sq,
                float* g_sq) {
  for_each_chunk(chunks, c0, c1, [&](int64_t k) {
    const Chunk& ch = chunks[k];
    p_sq[k - c0] = in.param_sq != nullptr ? in.param_sq[k] : param_chunk_sq<P>(in, ch);
    g_sq[k - c0] = static_cast<float>(
        base::sum_squares(in.grads[ch.tensor].data_ptr<P>() + ch.begin, ch.end - ch.begin, in.inv_scale));
  });
}

// Adds each tensor's chunk sums in chunk order (bitwise repeatable) and calls done(tensor, |p|^2, |g|^2).
template <typename F>
void per_tensor_sums(const std::vector<Chunk>& chunks, int64_t c0, int64_t c1, const float* p_sq, const float* g_sq,
                     const F& done) {
  for (int64_t k = c0; k < c1;) {
    const int64_t t = chunks[k].tensor;
    double p_total = 0.0, g_total = 0.0;
    for (; k < c1 && chunks[k].tensor == t; ++k) {
      p_total += p_sq[k - c0];
      g_total += g_sq[k - c0];
    }
    done(t, p_total, g_total);
  }
}

// A step skipped by a GradScaler changes no param, but the |p|^2 cache must describe them after the call.
template <typename P>
void refresh_param_sq(const NormInputs& in, const std::vector<Chunk>& chunks, float* param_sq) {
  for_each_chunk(chunks, 0, static_cast<int64_t>(chunks.size()),
                 [&](int64_t k) { param_sq[k] = param_chunk_sq<P>(in, chunks[k]); });
}

struct LarsConfig {
  float trust_coefficient, weight_decay, eps, max_ratio;
  bool clip;

  float ratio(double p_sq, double g_sq, float lr) const {
    return trust_ratio(static_cast<float>(std::sqrt(p_sq)), static_cast<float>(std::sqrt(g_sq)), lr, trust_coefficient,
                       weight_decay, eps, clip, max_ratio);
  }
};

// One step's resolved inputs.
struct Step {
  at::TensorList params, grads, bufs, masters;
  std::vector<Chunk> chunks;
  float lr;
  float inv_scale;
  StepConfig cfg;
  bool fused;       // torch_fuses()
  float* param_sq;  // the |p|^2 cache, written by the update; or null
  bool param_sq_cached;
  std::vector<float> ratio;  // per tensor: LARS trust ratio, 1 without LARS
};

// The LARS trust ratios of the tensors of chunks [c0, c1), from the norm pass.
template <typename P>
void trust_ratios(Step& s, const LarsConfig& lars, int64_t c0, int64_t c1) {
  const NormInputs in{s.params, s.grads, s.masters, s.param_sq_cached ? s.param_sq : nullptr, s.inv_scale};
  std::vector<float> p_sq(c1 - c0), g_sq(c1 - c0);
  chunk_sums<P>(in, s.chunks, c0, c1, p_sq.data(), g_sq.data());
  per_tensor_sums(s.chunks, c0, c1, p_sq.data(), g_sq.data(),
                  [&](int64_t t, double p_total, double g_total) { s.ratio[t] = lars.ratio(p_total, g_total, s.lr); });
}

template <typename P, typename B, bool kMomentum, bool kMaster, bool kNorm, typename Config>
auto update_chunk_for(bool fused) {
#ifdef LEGW_FUSED_AVX2
  if (fused) return &avx2::update_chunk<P, B, kMomentum, kMaster, kNorm, Config>;
#endif
  return &base::update_chunk<P, B, kMomentum, kMaster, kNorm, Config>;
}

// Updates chunks [c0, c1) with the update's flags fixed in `Config`; with kNorm also writes their |p|^2 cache entries.
template <typename P, bool kMomentum, bool kMaster, bool kNorm, typename Config>
void update_chunks(const Step& s, const Config& cfg, int64_t c0, int64_t c1) {
  using B = std::conditional_t<kMaster, float, P>;  // momentum buffers are fp32 with master weights
  const auto update = update_chunk_for<P, B, kMomentum, kMaster, kNorm, Config>(s.fused);
  // maximize as the gradient's sign: torch negates the (unscaled) gradient, and g * -s == -(g * s) exactly.
  const float scale = s.cfg.maximize ? -s.inv_scale : s.inv_scale;
  for_each_chunk(s.chunks, c0, c1, [&](int64_t k) {
    const Chunk& ch = s.chunks[k];
    const double sq = update(s.params[ch.tensor].data_ptr<P>() + ch.begin, s.grads[ch.tensor].data_ptr<P>() + ch.begin,
                             kMomentum ? s.bufs[ch.tensor].data_ptr<B>() + ch.begin : nullptr,
                             kMaster ? s.masters[ch.tensor].data_ptr<float>() + ch.begin : nullptr, ch.end - ch.begin,
                             s.lr, s.ratio[ch.tensor], scale, cfg);
    if constexpr (kNorm) s.param_sq[k] = static_cast<float>(sq);
  });
}

// Picks the instantiation: storage (momentum buffers, masters, the |p|^2 cache) and the update's flags. Without
// momentum, nesterov and first_step do not enter the update, so they are not instantiated.
template <typename P>
void update_chunks(const Step& s, int64_t c0, int64_t c1) {
  const StepConfig& c = s.cfg;
  const auto run = [&](auto momentum, auto master, auto norm, auto decays, auto nesterov, auto first) {
    using Config = FixedStepConfig<decltype(momentum)::value, decltype(decays)::value, decltype(nesterov)::value,
                                   decltype(first)::value>;
    update_chunks<P, decltype(momentum)::value, decltype(master)::value, decltype(norm)::value>(
        s, Config{c.momentum, c.one_minus_dampening, c.weight_decay}, c0, c1);
  };
  with_constants(
      [&](auto master, auto norm, auto decays) {
        if (s.bufs.empty()) {
          run(std::false_type{}, master, norm, decays, std::false_type{}, std::false_type{});
        } else {
          with_constants(
              [&](auto nesterov, auto first) { run(std::true_type{}, master, norm, decays, nesterov, first); },
              c.nesterov, c.first_step);
        }
      },
      !s.masters.empty(), s.param_sq != nullptr, c.decays());
}

// The step once its inputs are resolved. LARS without given norms: norm pass then update, cache group by group.
template <typename P>
void run_step(Step& s, const LarsConfig* lars, const float* norms_sq) {
  const int64_t n = static_cast<int64_t>(s.params.size());
  if (lars != nullptr && norms_sq == nullptr) {
    for (const auto& [c0, c1] : cache_groups(s.chunks)) {
      trust_ratios<P>(s, *lars, c0, c1);
      update_chunks<P>(s, c0, c1);
    }
    return;
  }
  if (lars != nullptr) {
    for (int64_t t = 0; t < n; ++t) s.ratio[t] = lars->ratio(norms_sq[t], norms_sq[n + t], s.lr);
  }
  update_chunks<P>(s, 0, static_cast<int64_t>(s.chunks.size()));  // one pass over everything
}

// The value of a one-element CPU tensor, read in place: item() would be one more op to dispatch per call.
double value_of(const at::Tensor& t) {
  if (!t.is_cpu()) return t.item<double>();
  switch (t.scalar_type()) {
    case at::kFloat:
      return *t.const_data_ptr<float>();
    case at::kDouble:
      return *t.const_data_ptr<double>();
    case at::kLong:
      return static_cast<double>(*t.const_data_ptr<int64_t>());
    default:
      return t.item<double>();
  }
}

// Same reciprocal as GradScaler.unscale_ (double, then rounded to fp32).
float inv_scale_of(const c10::optional<at::Tensor>& grad_scale) {
  return grad_scale.has_value() ? static_cast<float>(1.0 / value_of(*grad_scale)) : 1.f;
}

// The step's LR, rounded once to fp32 as torch rounds its alpha: the schedule's double value at `step`, else
// lr_tensor, else lr.
float resolve_lr(const at::Tensor& step, const c10::optional<at::Tensor>& schedule,
                 const c10::optional<at::Tensor>& lr_tensor, double lr) {
  if (schedule.has_value()) {
    const at::Tensor s = schedule->contiguous();
    check_packed_schedule_cpu(s, "fused_step_");
    return static_cast<float>(
        legw_lr(static_cast<double>(*step.const_data_ptr<int64_t>()), s.data_ptr<double>(), s.numel()));
  }
  return static_cast<float>(lr_tensor.has_value() ? value_of(*lr_tensor) : lr);
}

}  // namespace

void fused_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList masters,
                    const at::Tensor& step, const c10::optional<at::Tensor>& schedule,
                    const c10::optional<at::Tensor>& lr_tensor, double lr, double momentum, double dampening,
                    double weight_decay, bool nesterov, bool maximize, bool first_step, bool lars,
                    double trust_coefficient, double eps, bool trust_clip, double max_trust_ratio,
                    const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                    const c10::optional<at::Tensor>& norms_sq, const c10::optional<at::Tensor>& param_sq,
                    bool param_sq_cached, bool advance_step) {
  check_fused_step_args(params, grads, bufs, masters, step, schedule, momentum, lr_tensor, grad_scale, found_inf,
                        norms_sq, param_sq, param_sq_cached);
  // A GradScaler found inf/NaN gradients: the step is skipped and nothing changes. (Host reads are free on CPU.)
  if (found_inf.has_value() && value_of(*found_inf) != 0.0) {
    if (param_sq.has_value() && !param_sq_cached && !params.empty()) {  // the cache describes the unchanged values
      dispatch_param_type(params[0].scalar_type(), [&](auto tag) {
        refresh_param_sq<decltype(tag)>({params, grads, masters, nullptr, 1.f}, make_chunks(params),
                                        param_sq->data_ptr<float>());
      });
    }
    return;
  }
  if (!params.empty()) {
    Step s{params, grads, bufs, masters, make_chunks(params)};
    s.lr = resolve_lr(step, schedule, lr_tensor, lr);
    s.inv_scale = inv_scale_of(grad_scale);
    s.cfg = step_config(momentum, dampening, weight_decay, nesterov, maximize, first_step);
    s.fused = torch_fuses();
    s.param_sq = param_sq.has_value() ? param_sq->data_ptr<float>() : nullptr;
    s.param_sq_cached = param_sq_cached;
    s.ratio.assign(params.size(), 1.f);
    const LarsConfig lars_cfg{static_cast<float>(trust_coefficient), static_cast<float>(weight_decay),
                              static_cast<float>(eps), static_cast<float>(max_trust_ratio), trust_clip};
    const float* given_norms = lars && norms_sq.has_value() ? norms_sq->data_ptr<float>() : nullptr;
    dispatch_param_type(params[0].scalar_type(),
                        [&](auto tag) { run_step<decltype(tag)>(s, lars ? &lars_cfg : nullptr, given_norms); });
  }
  // Counted after the update, which read the count for its LR: a plain write, where step.add_ would be one more op
  // to dispatch (~0.1 ms on a cold cache).
  if (advance_step) {
    TORCH_CHECK(step.is_cpu(), "fused_step_: step is on ", step.device(), ", the CPU kernel advances it in place");
    ++*step.data_ptr<int64_t>();
  }
}

at::Tensor sum_squares_cpu(at::TensorList params, at::TensorList grads, at::TensorList masters,
                           const c10::optional<at::Tensor>& param_sq, const c10::optional<at::Tensor>& grad_scale) {
  check_sum_squares_args(params, grads, masters, param_sq, grad_scale);
  const int64_t n = static_cast<int64_t>(params.size());
  at::Tensor out = at::zeros(
      {2, n}, at::TensorOptions().dtype(at::kFloat).device(params.empty() ? at::Device(at::kCPU) : params[0].device()));
  if (n == 0) return out;
  const NormInputs in{params, grads, masters, param_sq.has_value() ? param_sq->data_ptr<float>() : nullptr,
                      inv_scale_of(grad_scale)};
  const auto chunks = make_chunks(params);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  std::vector<float> p_sq(n_chunks), g_sq(n_chunks);
  dispatch_param_type(params[0].scalar_type(),
                      [&](auto tag) { chunk_sums<decltype(tag)>(in, chunks, 0, n_chunks, p_sq.data(), g_sq.data()); });
  float* o = out.data_ptr<float>();
  per_tensor_sums(chunks, 0, n_chunks, p_sq.data(), g_sq.data(), [&](int64_t t, double p_total, double g_total) {
    o[t] = static_cast<float>(p_total);
    o[n + t] = static_cast<float>(g_total);
  });
  return out;
}

TORCH_LIBRARY_IMPL(legw_fused, CPU, m) {
  m.impl("fused_step_", &fused_step_cpu);
  m.impl("sum_squares", &sum_squares_cpu);
}

}  // namespace legw_fused
