// CUDA implementation of legw_fused::fused_step_ and legw_fused::sum_squares: multi-tensor SGD/LARS launches.
//
// Legend: N tensors per call; a chunk is kChunk consecutive elements of one tensor; one block per chunk.
// Tensor addresses and the block -> (tensor, chunk) map travel as kernel arguments (__grid_constant__, up to
// 32 KB on CUDA >= 12.1 and sm_70+): kMaxTensors tensors and kMaxBlocks chunks per launch, so a 25M-parameter
// model (161 tensors, 400 chunks) is one launch. Indexing is 64-bit: tensors over 2^31 elements work.
// Each thread walks groups of 16 / sizeof(param) consecutive elements (walk_chunk): one 16-byte load/store per
// tensor and group where every pointer of the tensor is aligned (chunk starts are multiples of kChunk), else element
// by element; the update and the norm pass alike.
// The LR is computed by thread 0 of each block from the device step count (no host sync). LARS: per-chunk sums of
// squares -> per-tensor ratios summed in chunk order by one block per tensor (fixed order: bitwise repeatable) ->
// update. With found_inf != 0 every kernel returns before writing (except for the |p|^2 cache, below).
// |p|^2 cache (param_sq, one float per chunk): the update block sums the squares of the values it stores
// and writes its chunk's sum (no atomics); the next call's sum_squares launch then reads only g, and its ratio
// launch adds the cached chunk sums in chunk order. Launches per LARS step: 3 (sum_squares, ratios, update); with
// given norms (norms_sq) 1 (the update computes each tensor's ratio itself); legw_fused::sum_squares is 2.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../fused_step.h"
#include "../fused_step_args.h"

// Kernel parameters over 4,096 bytes (TensorMeta) need nvcc >= 12.1; setup.py (legw_fused/_build_config.py) does
// not compile this file with an older toolkit.
#if __CUDACC_VER_MAJOR__ < 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ < 1)
#error "legw_fused: csrc/cuda/fused_step.cu needs nvcc >= 12.1 (kernel parameters over 4 KB)"
#endif

namespace legw_fused {
namespace {

constexpr int64_t kChunk = kParamSqChunk;  // the cache layout is the chunking
constexpr int kThreads = 512;
constexpr int kMaxTensors = 256;
constexpr int kMaxBlocks = 1280;

struct TensorMeta {  // 24,064 bytes: under the 32,764-byte kernel-parameter limit (CUDA >= 12.1, sm_70+)
  void* p[kMaxTensors];
  const void* g[kMaxTensors];
  void* buf[kMaxTensors];
  float* master[kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t index[kMaxTensors];  // position of the tensor in the whole call (for the LARS ratios)
  int16_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
  int32_t block_global_chunk[kMaxBlocks];  // chunk position in the whole call (chunk sums, |p|^2 cache)
};

struct Scalars {
  const int64_t* step;
  const double* schedule;  // null: lr from lr_tensor or lr
  int64_t schedule_len;
  const float* lr_tensor;
  float lr;
  StepConfig cfg;
  const float* grad_scale;  // null: no unscaling
  const float* found_inf;   // null: never skip
  const float* ratios;      // LARS trust ratio per tensor of the call, null without LARS or with norms
  const float* norms;       // given sums of squares [2, n_total] (norms_sq): ratios computed by the update
  int64_t n_total;          // tensors in the call
  float trust_coefficient;
  float eps;
  bool clip;
  float max_ratio;       // clamp of the raw trust ratio (+inf: none)
  float* param_sq;       // |p|^2 cache: one sum of squares of the stored values per chunk of the call, or null
  bool param_sq_cached;  // the cache already describes the params (a skipped step leaves it as it is)
};
// The update kernel's parameters: at most 32,764 bytes (CUDA >= 12.1, sm_70+).
static_assert(sizeof(TensorMeta) + sizeof(Scalars) <= 32764, "kernel parameters over the CUDA limit");

__device__ __forceinline__ bool skipped(const Scalars& s) { return s.found_inf != nullptr && *s.found_inf != 0.f; }

__device__ __forceinline__ float resolve_lr(const Scalars& s) {
  if (s.schedule != nullptr)
    return static_cast<float>(legw_lr(static_cast<double>(*s.step), s.schedule, s.schedule_len));
  return s.lr_tensor != nullptr ? *s.lr_tensor : s.lr;
}

__device__ __forceinline__ float inv_scale(const Scalars& s) {
  return s.grad_scale != nullptr ? static_cast<float>(1.0 / static_cast<double>(*s.grad_scale)) : 1.f;
}

__device__ __forceinline__ bool aligned(const void* ptr, int bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// N values loaded or stored as one access (16 bytes; 32, i.e. two 16-byte accesses, for fp32 masters beside
// 16-bit params).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* x) {
  return *reinterpret_cast<const Pack<T, N>*>(x);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* x, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(x) = v;
}

// Elements per 16-byte access of the params: the group size of walk_chunk for every tensor of a P call.
template <typename P>
constexpr int kVecOf = 16 / sizeof(P);

// Element j of a chunk [begin, end) belongs to thread ((j - begin) / kVec) % blockDim.x: each thread walks its
// groups of kVec consecutive elements in order, the last group possibly partial. A whole group is one vector access
// per tensor, `vec(j)`, where the caller's pointers are aligned for it (`vector`); otherwise kVec single-element
// accesses `one(j)`. Either way a thread visits the same elements in the same order, so its sums do not depend on
// alignment, and the update's |p|^2 chunk sums equal the norm pass's bit for bit.
template <int kVec, typename Vec, typename One>
__device__ __forceinline__ void walk_chunk(int64_t begin, int64_t end, bool vector, const Vec& vec, const One& one) {
  for (int64_t j = begin + static_cast<int64_t>(threadIdx.x) * kVec; j < end;
       j += static_cast<int64_t>(blockDim.x) * kVec) {
    if (vector && j + kVec <= end) {
      vec(j);
    } else {
      for (int k = 0; k < kVec && j + k < end; ++k) one(j + k);
    }
  }
}

// This thread's sum of squares of x[begin, end) times scale, in walk_chunk's order: x is a param, grad (P) or master
// (fp32), walked in groups of kVec elements.
template <int kVec, typename T>
__device__ __forceinline__ float thread_sum_squares(const T* x, float scale, int64_t begin, int64_t end) {
  float sq = 0.f;
  walk_chunk<kVec>(
      begin, end, aligned(x, sizeof(T) * kVec),
      [&](int64_t j) {
        const Pack<T, kVec> w = load_pack<T, kVec>(x + j);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const float v = static_cast<float>(w.v[k]) * scale;
          sq = fmaf(v, v, sq);
        }
      },
      [&](int64_t j) {
        const float v = static_cast<float>(x[j]) * scale;
        sq = fmaf(v, v, sq);
      });
  return sq;
}

// Block-wide sum in a fixed pattern (warp shuffles, then the warps' sums in order): repeatable bit for bit.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += shared[w];
  }
  __syncthreads();
  return total;  // valid in thread 0
}

// The chunk of this block: tensor t of the launch, elements [begin, end).
struct BlockChunk {
  int t;
  int64_t begin, end;
};

__device__ __forceinline__ BlockChunk block_chunk(const TensorMeta& meta) {
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  return {t, begin, begin + kChunk < meta.numel[t] ? begin + kChunk : meta.numel[t]};
}

// This thread's share of the |p|^2 chunk sum: of the fp32 masters where given, else of the params.
template <typename P>
__device__ __forceinline__ float thread_param_sq(const TensorMeta& meta, const BlockChunk& ch) {
  const float* master = meta.master[ch.t];
  return master != nullptr ? thread_sum_squares<kVecOf<P>>(master, 1.f, ch.begin, ch.end)
                           : thread_sum_squares<kVecOf<P>>(static_cast<const P*>(meta.p[ch.t]), 1.f, ch.begin, ch.end);
}

template <typename P, typename B, bool kMomentum, bool kMaster>
__global__ void __launch_bounds__(kThreads)
    update_kernel(const __grid_constant__ TensorMeta meta, const __grid_constant__ Scalars s) {
  __shared__ float shared[kThreads / 32];
  __shared__ float lr_shared;
  const bool skip = skipped(s);
  const bool with_sq = s.param_sq != nullptr && !(skip && s.param_sq_cached);
  if (skip && !with_sq) return;
  const BlockChunk ch = block_chunk(meta);
  if (skip) {  // a GradScaler skips the step: the cache must describe the unchanged values
    const float sq = block_sum(thread_param_sq<P>(meta, ch), shared);
    if (threadIdx.x == 0) s.param_sq[meta.block_global_chunk[blockIdx.x]] = sq;
    return;
  }
  if (threadIdx.x == 0) lr_shared = resolve_lr(s);
  __syncthreads();
  const float lr = lr_shared;
  float r = 1.f;
  if (s.norms != nullptr) {
    const int64_t k = meta.index[ch.t];
    r = trust_ratio(sqrtf(s.norms[k]), sqrtf(s.norms[s.n_total + k]), lr, s.trust_coefficient, s.cfg.weight_decay,
                    s.eps, s.clip, s.max_ratio);
  } else if (s.ratios != nullptr) {
    r = s.ratios[meta.index[ch.t]];
  }
  const float inv = inv_scale(s);

  constexpr int kVec = kVecOf<P>;
  P* p = static_cast<P*>(meta.p[ch.t]);
  const P* g = static_cast<const P*>(meta.g[ch.t]);
  B* buf = static_cast<B*>(meta.buf[ch.t]);
  float* master = meta.master[ch.t];
  const bool vector = aligned(p, 16) && aligned(g, 16) && (!kMomentum || aligned(buf, sizeof(B) * kVec)) &&
                      (!kMaster || aligned(master, 4 * kVec));
  const bool read_buf = kMomentum && !s.cfg.first_step;
  B no_buf{};
  float no_master = 0.f;
  float sq = 0.f;  // sum of squares of this thread's stored values, for the |p|^2 cache
  walk_chunk<kVec>(
      ch.begin, ch.end, vector,
      [&](int64_t j) {
        Pack<P, kVec> pv;
        Pack<B, kVec> bv;
        Pack<float, kVec> mv;
        if (!kMaster) pv = load_pack<P, kVec>(p + j);  // with a master, p is only written
        const Pack<P, kVec> gv = load_pack<P, kVec>(g + j);
        if (read_buf) bv = load_pack<B, kVec>(buf + j);
        if (kMaster) mv = load_pack<float, kVec>(master + j);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const float v = update_one<true, kMomentum, kMaster>(pv.v[k], gv.v[k], kMomentum ? bv.v[k] : no_buf,
                                                               kMaster ? mv.v[k] : no_master, lr, r, inv, s.cfg);
          sq = fmaf(v, v, sq);
        }
        store_pack(p + j, pv);
        if (kMomentum) store_pack(buf + j, bv);
        if (kMaster) store_pack(master + j, mv);
      },
      [&](int64_t j) {
        const float v = update_one<true, kMomentum, kMaster>(p[j], g[j], kMomentum ? buf[j] : no_buf,
                                                             kMaster ? master[j] : no_master, lr, r, inv, s.cfg);
        sq = fmaf(v, v, sq);
      });
  if (with_sq) {  // uniform over the block: every thread reaches block_sum's barriers
    sq = block_sum(sq, shared);
    if (threadIdx.x == 0) s.param_sq[meta.block_global_chunk[blockIdx.x]] = sq;
  }
}

// Per chunk: the sums of squares of p (unless the |p|^2 cache holds them: with_p false) and of g times 1/grad_scale,
// into chunk_sums[2k], [2k + 1].
template <typename P>
__global__ void __launch_bounds__(kThreads)
    sum_squares_kernel(const __grid_constant__ TensorMeta meta, const __grid_constant__ Scalars s, float* chunk_sums,
                       bool with_p) {
  if (skipped(s)) return;
  __shared__ float shared[kThreads / 32];
  const BlockChunk ch = block_chunk(meta);
  const float p_sq = block_sum(with_p ? thread_param_sq<P>(meta, ch) : 0.f, shared);
  const float g_sq = block_sum(
      thread_sum_squares<kVecOf<P>>(static_cast<const P*>(meta.g[ch.t]), inv_scale(s), ch.begin, ch.end), shared);
  if (threadIdx.x == 0) {
    chunk_sums[2 * meta.block_global_chunk[blockIdx.x]] = p_sq;
    chunk_sums[2 * meta.block_global_chunk[blockIdx.x] + 1] = g_sq;
  }
}

// Chunk ranges of up to kMaxRatioTensors tensors, as kernel arguments: no per-call host-to-device copy, so the
// launches stay valid when replayed from a CUDA graph.
constexpr int kMaxRatioTensors = 2048;

struct RatioMeta {
  int32_t first_chunk[kMaxRatioTensors + 1];  // tensor t of this launch owns chunks [first_chunk[t], [t + 1])
  int32_t tensor_base;                        // index of this launch's tensor 0 in the call
  int32_t n_total;                            // tensors in the call
};

// One block per tensor: its chunk sums in order (those of p from the |p|^2 cache `param_sq` where given)
// -> its trust ratio in `out`, or with `sums` its two sums of squares at out[t] and out[n_total + t].
__global__ void __launch_bounds__(kThreads)
    trust_ratio_kernel(const __grid_constant__ RatioMeta meta, const float* chunk_sums, const float* param_sq,
                       float* out, bool sums, const __grid_constant__ Scalars s) {
  if (skipped(s)) return;
  __shared__ float shared[kThreads / 32];
  const int t = blockIdx.x;
  float p_sq = 0.f, g_sq = 0.f;
  for (int c = meta.first_chunk[t] + threadIdx.x; c < meta.first_chunk[t + 1]; c += blockDim.x) {
    p_sq += param_sq != nullptr ? param_sq[c] : chunk_sums[2 * c];
    g_sq += chunk_sums[2 * c + 1];
  }
  p_sq = block_sum(p_sq, shared);
  g_sq = block_sum(g_sq, shared);
  if (threadIdx.x == 0) {
    const int64_t k = static_cast<int64_t>(meta.tensor_base) + t;
    if (sums) {
      out[k] = p_sq;
      out[meta.n_total + k] = g_sq;
    } else {
      const float lr = s.clip ? resolve_lr(s) : 1.f;
      out[k] = trust_ratio(sqrtf(p_sq), sqrtf(g_sq), lr, s.trust_coefficient, s.cfg.weight_decay, s.eps, s.clip,
                           s.max_ratio);
    }
  }
}

// Fills TensorMeta launch by launch and calls `launch(meta, n_blocks)`.
template <typename F>
void for_each_launch(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList masters,
                     const F& launch) {
  TensorMeta meta{};
  int n_tensors = 0, n_blocks = 0, global_chunk = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(params.size()); ++t) {
    const int64_t n = params[t].numel();
    if (n == 0) continue;
    meta.p[n_tensors] = params[t].data_ptr();
    meta.g[n_tensors] = grads[t].data_ptr();
    meta.buf[n_tensors] = bufs.empty() ? nullptr : bufs[t].data_ptr();
    meta.master[n_tensors] = masters.empty() ? nullptr : masters[t].data_ptr<float>();
    meta.numel[n_tensors] = n;
    meta.index[n_tensors] = static_cast<int32_t>(t);
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[n_blocks] = static_cast<int16_t>(n_tensors);
      meta.block_chunk[n_blocks] = static_cast<int32_t>(c);
      meta.block_global_chunk[n_blocks] = global_chunk++;
      ++n_blocks;
      const bool blocks_full = n_blocks == kMaxBlocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks_full || (last_chunk && n_tensors + 1 == kMaxTensors)) {
        launch(meta, n_blocks);
        n_blocks = 0;
        if (!last_chunk) {  // the tensor continues in the next launch, as its entry 0
          meta.p[0] = meta.p[n_tensors];
          meta.g[0] = meta.g[n_tensors];
          meta.buf[0] = meta.buf[n_tensors];
          meta.master[0] = meta.master[n_tensors];
          meta.numel[0] = meta.numel[n_tensors];
          meta.index[0] = meta.index[n_tensors];
          n_tensors = 0;
        } else {
          n_tensors = -1;  // incremented below
        }
      }
    }
    ++n_tensors;
  }
  if (n_blocks > 0) launch(meta, n_blocks);
}

// Per-tensor sums of squares (sums) or trust ratios of a call: the first launch sums chunks, the ratio launch adds
// them per tensor in chunk order.
template <typename P>
void reduce_norms(at::TensorList params, at::TensorList grads, at::TensorList masters, const Scalars& s,
                  const float* param_sq, float* out, bool sums, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<int32_t> first_chunk(n + 1, 0);
  for (int64_t t = 0; t < n; ++t)
    first_chunk[t + 1] = first_chunk[t] + static_cast<int32_t>((params[t].numel() + kChunk - 1) / kChunk);
  at::Tensor chunk_sums = at::empty({2 * std::max(first_chunk.back(), 1)}, params[0].options().dtype(at::kFloat));
  for_each_launch(params, grads, {}, masters, [&](const TensorMeta& meta, int n_blocks) {
    sum_squares_kernel<P>
        <<<n_blocks, kThreads, 0, stream>>>(meta, s, chunk_sums.data_ptr<float>(), param_sq == nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  for (int64_t base = 0; base < n; base += kMaxRatioTensors) {
    const int64_t count = std::min<int64_t>(kMaxRatioTensors, n - base);
    RatioMeta meta{};
    meta.tensor_base = static_cast<int32_t>(base);
    meta.n_total = static_cast<int32_t>(n);
    std::copy(first_chunk.begin() + base, first_chunk.begin() + base + count + 1, meta.first_chunk);
    // every tensor's block writes its entry (sums 0, ratio 1 for empty tensors): `out` needs no initialisation
    trust_ratio_kernel<<<static_cast<unsigned>(count), kThreads, 0, stream>>>(meta, chunk_sums.data_ptr<float>(),
                                                                              param_sq, out, sums, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// fused_step_'s advance_step, after the kernels that read the count, on their stream: +1, or + (found_inf == 0)
// where a GradScaler's verdict is on the device.
void advance_step_count(const at::Tensor& step, const c10::optional<at::Tensor>& found_inf, bool advance_step) {
  if (!advance_step) return;
  if (found_inf.has_value()) {
    step.add_(found_inf->eq(0));
  } else {
    step.add_(1);
  }
}

}  // namespace

void fused_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList masters,
                     const at::Tensor& step, const c10::optional<at::Tensor>& schedule,
                     const c10::optional<at::Tensor>& lr_tensor, double lr, double momentum, double dampening,
                     double weight_decay, bool nesterov, bool maximize, bool first_step, bool lars,
                     double trust_coefficient, double eps, bool trust_clip, double max_trust_ratio,
                     const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                     const c10::optional<at::Tensor>& norms_sq, const c10::optional<at::Tensor>& param_sq,
                     bool param_sq_cached, bool advance_step) {
  check_fused_step_args(params, grads, bufs, masters, step, schedule, momentum, lr_tensor, grad_scale, found_inf,
                        norms_sq, param_sq, param_sq_cached);
  if (params.empty()) {
    advance_step_count(step, found_inf, advance_step);
    return;
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto as_float = [](const c10::optional<at::Tensor>& t) {
    return t.has_value() ? c10::optional<at::Tensor>(t->to(at::kFloat).contiguous()) : c10::nullopt;
  };
  const auto lr_f = as_float(lr_tensor), scale_f = as_float(grad_scale), inf_f = as_float(found_inf);
  Scalars s{};
  s.step = step.data_ptr<int64_t>();
  s.schedule = schedule.has_value() ? schedule->data_ptr<double>() : nullptr;
  s.schedule_len = schedule.has_value() ? schedule->numel() : 0;
  s.lr_tensor = lr_f.has_value() ? lr_f->data_ptr<float>() : nullptr;
  s.lr = static_cast<float>(lr);
  s.cfg = step_config(momentum, dampening, weight_decay, nesterov, maximize, first_step);
  s.grad_scale = scale_f.has_value() ? scale_f->data_ptr<float>() : nullptr;
  s.found_inf = inf_f.has_value() ? inf_f->data_ptr<float>() : nullptr;
  s.n_total = static_cast<int64_t>(params.size());
  s.trust_coefficient = static_cast<float>(trust_coefficient);
  s.eps = static_cast<float>(eps);
  s.clip = trust_clip;
  s.max_ratio = static_cast<float>(max_trust_ratio);
  s.norms = lars && norms_sq.has_value() ? norms_sq->data_ptr<float>() : nullptr;
  s.param_sq = param_sq.has_value() ? param_sq->data_ptr<float>() : nullptr;
  s.param_sq_cached = param_sq_cached;

  dispatch_param_type(params[0].scalar_type(), [&](auto tag) {
    using P = decltype(tag);
    at::Tensor ratios;
    if (lars && !norms_sq.has_value()) {
      ratios = at::empty({s.n_total}, params[0].options().dtype(at::kFloat));
      reduce_norms<P>(params, grads, masters, s, param_sq_cached ? s.param_sq : nullptr, ratios.data_ptr<float>(),
                      false, stream);
      s.ratios = ratios.data_ptr<float>();
    }
    with_constants(
        [&](auto momentum_flag, auto master_flag) {
          constexpr bool kMomentum = decltype(momentum_flag)::value, kMaster = decltype(master_flag)::value;
          using B = std::conditional_t<kMaster, float, P>;  // momentum buffers are fp32 with master weights
          for_each_launch(params, grads, bufs, masters, [&](const TensorMeta& meta, int n_blocks) {
            update_kernel<P, B, kMomentum, kMaster><<<n_blocks, kThreads, 0, stream>>>(meta, s);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        },
        momentum != 0.0, !masters.empty());
  });
  advance_step_count(step, found_inf, advance_step);  // after the kernels that read it, on the same stream
}

at::Tensor sum_squares_cuda(at::TensorList params, at::TensorList grads, at::TensorList masters,
                            const c10::optional<at::Tensor>& param_sq, const c10::optional<at::Tensor>& grad_scale) {
  check_sum_squares_args(params, grads, masters, param_sq, grad_scale);
  const int64_t n = static_cast<int64_t>(params.size());
  if (n == 0) return at::zeros({2, 0}, at::TensorOptions().dtype(at::kFloat));
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto scale_f =
      grad_scale.has_value() ? c10::optional<at::Tensor>(grad_scale->to(at::kFloat).contiguous()) : c10::nullopt;
  Scalars s{};
  s.grad_scale = scale_f.has_value() ? scale_f->data_ptr<float>() : nullptr;
  s.n_total = n;
  at::Tensor out = at::empty({2, n}, params[0].options().dtype(at::kFloat));
  dispatch_param_type(params[0].scalar_type(), [&](auto tag) {
    using P = decltype(tag);
    reduce_norms<P>(params, grads, masters, s, param_sq.has_value() ? param_sq->data_ptr<float>() : nullptr,
                    out.data_ptr<float>(), true, stream);
  });
  return out;
}

TORCH_LIBRARY_IMPL(legw_fused, CUDA, m) {
  m.impl("fused_step_", &fused_step_cuda);
  m.impl("sum_squares", &sum_squares_cuda);
}

}  // namespace legw_fused
