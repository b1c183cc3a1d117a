// Final RMSNorm + LM head with a fused arg-max: logits optionally written out (with an L2
// evict-last hint: the sampler reads them next, and the next step overwrites them in L2 instead
// of the weight stream pushing them out to HBM a sector at a time), each CTA reduces
// its rows to a (value, index) per batch row, and the last CTA to finish picks the winner. The
// LM head's zero rows past the vocabulary (padded_vocab) are multiplied but never logits. A
// non-finite logit anywhere in a row fails the step (StepError::kNonFiniteLogits) instead of
// emitting a token.
#pragma once

#include "flashformer/op.hpp"
#ifdef __CUDACC__
#include <cfloat>

#include "flashformer/gemv.cuh"
#include "flashformer/sync.cuh"
#endif

namespace flashformer {

#ifdef __CUDACC__
// Larger logit wins; ties go to the lower index (torch.argmax's choice).
__device__ __forceinline__ bool better(float v, int i, float best_v, int best_i) {
  return v > best_v || (v == best_v && i < best_i);
}

// A CTA's candidate index for a row in which it saw a non-finite logit.
inline constexpr int kNonFiniteIndex = -1;

// A store that L2 keeps before anything of normal or evict-first priority.
__device__ __forceinline__ void store_evict_last(float* p, float v) {
  const uint64_t policy = uint64_t(cute::TMA::CacheHintSm90::EVICT_LAST);
  asm volatile("st.global.L2::cache_hint.f32 [%0], %1, %2;" ::"l"(p), "f"(v), "l"(policy) : "memory");
}

template <class T>
struct LmHeadEpilogue {
  Consumer<T>& c;
  float best_v[2] = {-FLT_MAX, -FLT_MAX};  // warp 0: batch columns 2t and 2t+1
  int best_i[2] = {INT_MAX, INT_MAX};
  bool finite[2] = {true, true};           // every logit of the column seen so far is finite
  __device__ LmHeadEpilogue(Consumer<T>& c_, const Task&) : c(c_) {}
  __device__ void prefetch(int) {}  // reads nothing

  __device__ void row_block(int rb, const AccTile& acc) {
    const int g = c.lane / 4, t = c.lane % 4;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int n = 2 * t + q;
      if (n >= c.p.batch) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = rb * kRowBlock + g + 8 * h;
        if (T::kPaddedVocab != T::kVocab && row >= T::kVocab) continue;  // a padding row: not a logit
        const float v = acc[2 * h + q];
        if (c.p.logits) store_evict_last(c.p.logits + int64_t(n) * T::kVocab + row, v);
        finite[q] &= isfinite(v);
        if (better(v, row, best_v[q], best_i[q])) best_v[q] = v, best_i[q] = row;
      }
    }
  }

  // Warp 0: reduce over the 8 row lanes g of each t; lanes 0..3 publish this CTA's candidates.
  __device__ void finish() {
    if (c.warp != 0) return;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
#pragma unroll
      for (int off = 4; off < kWarpSize; off *= 2) {
        const float v = __shfl_xor_sync(0xffffffffu, best_v[q], off);
        const int i = __shfl_xor_sync(0xffffffffu, best_i[q], off);
        if (better(v, i, best_v[q], best_i[q])) best_v[q] = v, best_i[q] = i;
        finite[q] &= __shfl_xor_sync(0xffffffffu, int(finite[q]), off) != 0;
      }
    }
    if (c.lane < 4)
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int n = 2 * c.lane + q;
        if (n >= c.p.batch) continue;
        float* part = c.p.scratch.argmax_part + (int64_t(n) * gridDim.x + blockIdx.x) * 2;
        part[0] = best_v[q];
        part[1] = __int_as_float(finite[q] ? best_i[q] : kNonFiniteIndex);
      }
  }
};
#endif

struct LmHeadOp : OpDefaults {
  static constexpr const char* kName = "lm_head";
  static constexpr Scope kScope = Scope::kOnceLast;
  static constexpr Signal kSignal = Signal::kItself;  // its last CTA reduces the arg-max, nothing waits after it
  static constexpr int units(const ModelDims& d, int) { return d.padded_vocab() / kRowBlock; }
  static constexpr int64_t unit_bytes(const ModelDims& d, const WeightFormats& f) { return row_block_bytes(d.hidden, f.lm_head); }

#ifdef __CUDACC__
  // The LM head is e4m3 only in FP8 kernels, and there where it has scales (a checkpoint may
  // leave it bf16).
  template <class T>
  __device__ static bool fp8(const MegakernelParams& p) {
    if constexpr (T::kWeights == WeightFormat::kFp8)
      return p.lm_head.scale != nullptr;
    else
      return false;
  }
  template <class T>
  __device__ static bool produce(Producer<T>& pr, Task, int u0, int u1) {
    if constexpr (T::kWeights == WeightFormat::kFp8)
      if (fp8<T>(pr.p)) return stream_row_blocks<WeightFormat::kFp8>(pr, pr.p.lm_head, T::kHidden, u0, u1);
    return stream_row_blocks<WeightFormat::kBf16>(pr, pr.p.lm_head, T::kHidden, u0, u1);
  }
  // x's rows were written by the task before (the last layer's down projection): the final norm.
  template <class T>
  __device__ static bool consume(Consumer<T>& c, Task task, int u0, int u1) {
    const int norm = 2 * c.p.n_layers;
    bool ok;
    if constexpr (T::kWeights == WeightFormat::kFp8)
      ok = fp8<T>(c.p) ? norm_then_matmul<T, WeightFormat::kFp8, LmHeadEpilogue<T>>(c, c.p.final_norm, norm, c.p.lm_head,
                                                                                      task, u0, u1)
                       : norm_then_matmul<T, WeightFormat::kBf16, LmHeadEpilogue<T>>(c, c.p.final_norm, norm,
                                                                                       c.p.lm_head, task, u0, u1);
    else
      ok = norm_then_matmul<T, WeightFormat::kBf16, LmHeadEpilogue<T>>(c, c.p.final_norm, norm, c.p.lm_head, task, u0,
                                                                       u1);
    if (!ok) return false;
    c.sync();  // this CTA's candidates are written
    if (!c.finished_last(c.counter(task.index), unsigned(c.p.arrivals[task.op])))
      return true;  // the last LM-head CTA picks the winners, from every CTA's candidates
    // A warp per batch row, a lane per 32nd of the SMs: the candidates' loads in flight together,
    // then a shuffle reduction (better() orders every (value, index) pair, so the order of the
    // combination cannot change the winner).
    for (int n = c.warp; n < c.p.batch; n += kConsumerWarps) {
      float best_v = -FLT_MAX;
      int best_i = INT_MAX;
      bool finite = true;
#pragma unroll 4
      for (int s = c.lane; s < int(gridDim.x); s += kWarpSize) {
        if (!owns_units(c.p, task.index, s)) continue;  // this SM owns no LM-head rows
        const float* part = c.p.scratch.argmax_part + (int64_t(n) * gridDim.x + s) * 2;
        const float v = __ldcg(part);
        const int i = __float_as_int(__ldcg(part + 1));
        finite &= i != kNonFiniteIndex;
        if (better(v, i, best_v, best_i)) best_v = v, best_i = i;
      }
#pragma unroll
      for (int off = 1; off < kWarpSize; off *= 2) {
        const float v = __shfl_xor_sync(0xffffffffu, best_v, off);
        const int i = __shfl_xor_sync(0xffffffffu, best_i, off);
        if (better(v, i, best_v, best_i)) best_v = v, best_i = i;
      }
      finite = __all_sync(0xffffffffu, finite);
      if (c.lane == 0) {
        c.p.next_tokens[n] = best_i;
        // (timing variants compute garbage on purpose: only a real step is checked)
        if (!finite && !variant_on<T>(c.p, ~0)) raise_error(c.p.scratch, StepError::kNonFiniteLogits, task.index, n);
      }
    }
    return true;
  }
#endif
};

}  // namespace flashformer
