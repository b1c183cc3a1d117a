// Sampler: the next token of every batch row after a decode step, on the device, in one launch.
//
// One cluster of kClusterCtas CTAs per row: each CTA holds a contiguous slice of the row's
// vocabulary in shared memory (read from the logits once), and the CTAs of a row combine their
// partial results through distributed shared memory, one cluster barrier per reduction. Per row,
// in vLLM's order:
//   penalties (repetition over the prompt and output tokens, presence and frequency over the
//   output tokens) -> temperature, z = (l - max l) / T -> min-p: keep z >= log(min_p) -> top-k:
//   keep z >= the k-th largest z (a radix select over order-preserving keys; ties kept) -> top-p,
//   by rejection (below) -> a Gumbel-max draw, as an exponential race: the arg-max over the kept
//   tokens of exp(z) / E, E = -log u (the same token as the arg-max of z - log(-log u), without
//   its second log), u a hash of (seed, the request's token index, draw round, token id).
// The noise depends on the request alone (its seed and how many tokens it has produced), never
// on its row or on the other rows. Top-p without a sort (as FlashInfer's sorting-free samplers):
// draw j among the kept tokens above a pivot; j is in the nucleus exactly when the kept mass
// strictly above z_j is below top_p x the kept mass, and is then a draw from the nucleus; else no
// token at or below z_j is in it: raise the pivot past z_j and draw again with fresh noise (the
// next round). A row without min-p or top-k keeps every token, so its first draw needs no max:
// it is taken in the load pass, as the arg-max of l / T - log E (the log of exp(z) / E, less the
// constant max l / T), reduced with the max in one cluster reduction; one more pass then sums the
// kept mass and the mass above z_j together. Greedy rows (temperature below kGreedyBelow) take
// the arg-max of the penalized logits (the lowest index among equal maxima, as torch.argmax).
//
// Then the row's bookkeeping (commit): count the token (penalties), end the row on a stop token,
// max_tokens or a full cache, else feed the token and its position to the next decode step
// (`tokens`/`positions` are what the megakernel reads), and leave the step's record for the
// host. A row that has ended does nothing but say so in its record.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#include <cooperative_groups.h>

#include <cfloat>
#include <climits>
#endif

namespace flashformer {

struct Sampler {
  // CTAs per row: Hopper's largest (non-portable) cluster, so that a batch of 8 rows spreads over 128
  // SMs; each CTA holds a 16th of the row (8,016 floats of a 128K vocabulary).
  static constexpr int kClusterCtas = 16;
  static constexpr int kThreads = 512;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kLoadUnroll = 8;  // logits loads in flight per thread (L2 latency, not bandwidth, bounds it)
  static constexpr int kRadixBits = 8;  // top-k's radix select: up to 4 levels of 256 bins
  static constexpr int kBins = 1 << kRadixBits;
  static constexpr int kMaxRounds = 64;  // top-p draws before the last resort (the row's top token)
  static constexpr float kGreedyBelow = 1e-5f;  // temperatures below this are greedy (vLLM's)
  static constexpr int kMaxLogprobs = 20;       // top logprobs per token (OpenAI's limit)
  static constexpr int kNoiseBits = 23;
  // The race's E = -log u lies in [6e-8, 16.7] for u = (bits + 0.5) / 2^23, so a token's exp(z) / E is
  // at most 1.7e7 exp(z) and the top token's (z = 0, always kept) at least 0.06: a token whose z is
  // below -kNoiseReach cannot outscore it, so its noise is skipped.
  static constexpr float kNoiseReach = 20.f;
  // In the log domain (the load pass's draw, score l / T - log E): -log E < -log(6e-8) < 16.7, so a
  // token whose l / T is kLogNoiseReach below a score already seen cannot take it over.
  static constexpr float kLogNoiseReach = 17.f;
  // Odd multipliers below 2^31, so that Python's int64 replica of mix() never overflows.
  static constexpr uint32_t kHashMul0 = 0x2c1b3c6dU;
  static constexpr uint32_t kHashMul1 = 0x297a2d39U;

  // Why a row ended (Record::finish, Args::status).
  enum Finish : int32_t {
    kNone = 0,    // still generating
    kStop = 1,    // a stop token (EOS unless ignored, or one of stop_token_ids)
    kLength = 2,  // max_tokens, or the KV cache is full
    kAborted = 3  // ended by the host (a stop string)
  };
  // Record::flags bits.
  enum Flags : int32_t {
    kIdle = 1,       // the row had ended before this step: no token
    kNonFinite = 2   // the row's logits held NaN or inf: its token is invalid, nothing was fed
  };

  // What one step leaves for the host per row (the engine copies every row's record to pinned
  // memory in one transfer; logprobs, when asked for, are written beside it after the kernel).
  struct Record {
    int32_t token;
    int32_t finish;  // a Finish
    int32_t flags;   // Flags
  };

  // One request's settings, one per batch row (32-bit words; the binding lists the fields and
  // their offsets, so Python never states this layout by hand).
  struct Row {
    float temperature;         // < kGreedyBelow: arg-max
    float top_p;               // 1: off
    float min_p;               // 0: off
    float repetition_penalty;  // 1: off
    float presence_penalty;    // 0: off
    float frequency_penalty;   // 0: off
    int32_t top_k;             // <= 0 or >= vocab: off
    int32_t max_tokens;
    uint32_t seed_lo, seed_hi;
    int32_t penalized;  // 1: apply the penalties (its output_counts and prompt_mask rows are kept)
    int32_t num_stop;   // stop_ids[row][0 .. num_stop)
  };

  struct Args {
    const float* logits;  // [batch, logits_stride] fp32; null: take next_tokens (the fused arg-max)
    int64_t logits_stride;
    const int32_t* next_tokens;  // [batch], read when logits is null
    int vocab, batch, max_seq;
    const Row* rows;             // [batch]
    const int32_t* stop_ids;     // [batch, stop_stride]
    int stop_stride;
    int32_t* output_counts;      // [batch, vocab]: how often each token was produced (penalized rows)
    const uint8_t* prompt_mask;  // [batch, vocab]: 1 where the token is in the prompt (penalized rows)
    int64_t* tokens;             // [batch] in/out: the token the next decode step reads
    int64_t* positions;          // [batch] in/out: its position
    int32_t* generated;          // [batch] in/out: tokens produced so far (the noise's step index)
    int32_t* status;             // [batch] in/out: a Finish, kNone while generating
    Record* records;             // [batch] out
  };

  // A bijective 32-bit mixer (xorshift-multiply rounds).
  __host__ __device__ static constexpr uint32_t mix(uint32_t x) {
    x ^= x >> 16;
    x *= kHashMul0;
    x ^= x >> 15;
    x *= kHashMul1;
    x ^= x >> 16;
    return x;
  }
  // The noise's key of one draw: (seed, the request's token index, draw round), hashed once per row
  // and round.
  __host__ __device__ static constexpr uint32_t noise_key(uint32_t seed_lo, uint32_t seed_hi, uint32_t step,
                                                          uint32_t round) {
    return mix(mix(mix(mix(round) ^ step) ^ seed_lo) ^ seed_hi);
  }
  // 23 uniform bits for token `token` under a draw's key (one mix a token: the key is mixed four
  // times already): (bits + 0.5) / 2^23 is exact in fp32 and strictly inside (0, 1).
  __host__ __device__ static constexpr uint32_t noise_bits(uint32_t key, uint32_t token) {
    return mix(token ^ key) >> (32 - kNoiseBits);
  }

  __host__ __device__ static constexpr int slice_len(int vocab) { return (vocab + kClusterCtas - 1) / kClusterCtas; }
  // Dynamic shared memory of one CTA: its slice of the row (SharedStorage is static).
  static constexpr size_t slice_bytes(int vocab) { return size_t(slice_len(vocab)) * sizeof(float); }

#ifdef __CUDACC__
  // The larger value wins, the lower index among equals (torch.argmax's choice).
  __device__ static bool wins(float v, int i, float other_v, int other_i) {
    return v > other_v || (v == other_v && i < other_i);
  }
  // Each CTA's part of a cluster-wide reduction: an arg-max, a sum and flag bits, combined together.
  struct Partial {
    float value;
    int index;
    float sum;
    int flags;
    __device__ static Partial identity() { return Partial{-INFINITY, INT_MAX, 0.f, 0}; }
    __device__ static Partial combine(const Partial& a, const Partial& b) {
      const bool a_wins = wins(a.value, a.index, b.value, b.index);
      return Partial{a_wins ? a.value : b.value, a_wins ? a.index : b.index, a.sum + b.sum, a.flags | b.flags};
    }
  };
  // The load pass's reduction of a row that draws there: the row's max (top), its first draw (the
  // largest score, its token and that token's logit) and the flags.
  struct TopAndDraw {
    Partial top;
    float score;
    int drawn;
    float drawn_logit;
    __device__ static TopAndDraw identity() { return TopAndDraw{Partial::identity(), -INFINITY, INT_MAX, 0.f}; }
    __device__ static TopAndDraw combine(const TopAndDraw& a, const TopAndDraw& b) {
      const bool a_wins = wins(a.score, a.drawn, b.score, b.drawn);
      return TopAndDraw{Partial::combine(a.top, b.top), a_wins ? a.score : b.score, a_wins ? a.drawn : b.drawn,
                        a_wins ? a.drawn_logit : b.drawn_logit};
    }
  };
  // Two sums (the kept mass and the mass above a draw's z).
  struct Masses {
    float kept, above;
    __device__ static Masses identity() { return Masses{0.f, 0.f}; }
    __device__ static Masses combine(const Masses& a, const Masses& b) {
      return Masses{a.kept + b.kept, a.above + b.above};
    }
  };
  // The largest partial: what SharedStorage's reduction slots are sized for.
  static constexpr size_t kPartialBytes = sizeof(TopAndDraw);
  static_assert(sizeof(Partial) <= kPartialBytes && sizeof(Masses) <= kPartialBytes);

  struct SharedStorage {
    unsigned hist[2][kBins];  // this CTA's radix histogram, double-buffered across levels
    // (one partial type per reduction, each slot sized for the largest)
    alignas(16) unsigned char slot[2][kPartialBytes];  // this CTA's part of the current reduction, double-buffered
    alignas(16) unsigned char warp[kWarps][kPartialBytes];  // block-reduction scratch
    unsigned bins[kBins];                                // the cluster's histogram of the current level
    alignas(16) unsigned char result[kPartialBytes];     // a reduction's result, broadcast inside the CTA
    unsigned select[3];  // radix select: the chosen prefix, the rank left, the chosen bin's count
  };

  // A partial (32-bit words) from lane `lane ^ o`.
  template <class P>
  __device__ static P shfl_xor(const P& p, int o) {
    static_assert(sizeof(P) % 4 == 0);
    constexpr int kWords = int(sizeof(P) / 4);
    uint32_t w[kWords];
    memcpy(w, &p, sizeof(P));
#pragma unroll
    for (int k = 0; k < kWords; ++k) w[k] = __shfl_xor_sync(0xffffffffu, w[k], o);
    P q;
    memcpy(&q, w, sizeof(P));
    return q;
  }
  template <class P>
  __device__ static P warp_reduce(P p) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) p = P::combine(p, shfl_xor(p, o));
    return p;
  }

  // Order-preserving map of a float to an unsigned key (a larger float, a larger key).
  __device__ static unsigned key_of(float v) {
    const unsigned b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  }
  // The race's exponential E = -log u of a token under a draw's key (in (6e-8, 16.7)), to 1e-5 of
  // its value: with v = 1 - u (exact in fp32, as u) below kSeriesBelow, -log(1 - v) as its series
  // to v^4 (the rest is below v^4 / 5 of it); above, the hardware's log2 (absolute error about
  // 2^-22, against |log2 u| >= 0.0227 there). Both are computed and one is picked: no divergence.
  static constexpr float kSeriesBelow = 1.f / 64.f;
  __device__ static float race_noise(uint32_t key, uint32_t token) {
    const uint32_t bits = noise_bits(key, token);
    constexpr float kUlp = 1.f / float(1u << kNoiseBits);
    const float u = (float(bits) + 0.5f) * kUlp;                                  // (0, 1)
    const float v = (float((1u << kNoiseBits) - 1u - bits) + 0.5f) * kUlp;        // 1 - u
    const float series = v * fmaf(v, fmaf(v, fmaf(v, 0.25f, 1.f / 3.f), 0.5f), 1.f);
    float lg2;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(lg2) : "f"(u));
    return v < kSeriesBelow ? series : -0.6931471805599453f * lg2;
  }
  // exp(z) for z <= 0 (tiny results flush to zero) and 1 / x for the race's E: one MUFU each.
  __device__ static float fast_exp(float z) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(z * 1.4426950408889634f));
    return y;
  }
  __device__ static float fast_log(float x) {  // log x for the race's E (one MUFU)
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return 0.6931471805599453f * y;
  }
  __device__ static float fast_rcp(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
  }

  // The reduction of every thread's `p` over the row's cluster; every thread gets the result.
  // `phase` picks the slot buffer: a CTA rewrites its slot of phase k + 2 only after the barrier
  // of phase k + 1, which every CTA reaches after reading the slots of phase k.
  template <class P>
  __device__ static P cluster_reduce(P p, SharedStorage& s, int& phase) {
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const auto at = [](unsigned char* bytes) { return reinterpret_cast<P*>(bytes); };
    p = warp_reduce(p);
    if (lane == 0) *at(s.warp[warp]) = p;
    __syncthreads();  // the warps' partials are in s.warp
    if (warp == 0) {
      P q = lane < kWarps ? *at(s.warp[lane]) : P::identity();
      q = warp_reduce(q);
      if (lane == 0) *at(s.slot[phase & 1]) = q;
    }
    cluster.sync();  // every CTA's slot is written and visible to the cluster (release/acquire)
    if (warp == 0) {
      P q = lane < kClusterCtas ? *cluster.map_shared_rank(at(s.slot[phase & 1]), lane) : P::identity();
      q = warp_reduce(q);
      if (lane == 0) *at(s.result) = q;
    }
    __syncthreads();  // s.result is written
    ++phase;
    return *at(s.result);
  }

  // The key of the k-th largest z of the row (k >= 1): a radix select, 8 bits a level from the
  // top; it stops early once the chosen bin holds exactly the tokens still to be ranked (their
  // smallest key is then at or above the bin's lowest key, which is returned).
  __device__ static unsigned kth_largest_key(const float* slice, int n, unsigned k, SharedStorage& s) {
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    const int lane = threadIdx.x % 32;
    unsigned prefix = 0, mask = 0, rank = k;
    for (int level = 0; level < 32 / kRadixBits; ++level) {
      const int shift = 32 - kRadixBits * (level + 1);
      unsigned* hist = s.hist[level & 1];
      for (int d = threadIdx.x; d < kBins; d += kThreads) hist[d] = 0;
      __syncthreads();  // the histogram is zeroed
      for (int base = 0; base < n; base += kThreads) {
        const int i = base + threadIdx.x;
        const unsigned key = i < n ? key_of(slice[i]) : 0u;
        const bool in = i < n && (key & mask) == prefix;
        const unsigned active = __ballot_sync(0xffffffffu, in);
        if (in) {  // one atomic per distinct bin of the warp: few bins hold most tokens
          const unsigned digit = (key >> shift) & (kBins - 1);
          const unsigned peers = __match_any_sync(active, digit);
          if (lane == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
        }
      }
      __syncthreads();  // this CTA's histogram is complete
      cluster.sync();   // every CTA's histogram is complete and visible (release/acquire)
      for (int d = threadIdx.x; d < kBins; d += kThreads) {
        unsigned total = 0;
#pragma unroll 4
        for (int r = 0; r < kClusterCtas; ++r) total += cluster.map_shared_rank(hist, r)[d];
        s.bins[d] = total;
      }
      __syncthreads();  // s.bins holds the cluster's histogram
      if (threadIdx.x < 32) {  // lane l holds bins 8l .. 8l+7; the bins above a lane are the higher lanes'
        constexpr int kPerLane = kBins / 32;
        unsigned mine = 0;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) mine += s.bins[lane * kPerLane + j];
        unsigned suffix = mine;  // sum over lanes >= lane
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const unsigned t = __shfl_down_sync(0xffffffffu, suffix, o);
          if (lane + o < 32) suffix += t;
        }
        unsigned above = suffix - mine;
        if (above < rank && rank <= suffix) {  // the one lane whose bins hold the rank-th key
          for (int j = kPerLane - 1; j >= 0; --j) {
            const unsigned count = s.bins[lane * kPerLane + j];
            if (above + count >= rank) {
              s.select[0] = prefix | (unsigned(lane * kPerLane + j) << shift);
              s.select[1] = rank - above;
              s.select[2] = count;
              break;
            }
            above += count;
          }
        }
      }
      __syncthreads();  // s.select is written
      prefix = s.select[0];
      rank = s.select[1];
      mask |= unsigned(kBins - 1) << shift;
      if (rank == s.select[2]) break;  // every token of the bin is kept: its lowest key is the threshold
      // (s.select is rewritten only past two barriers of the next level, after everyone read it)
    }
    return prefix;
  }

  // Row `row`'s bookkeeping after its token is chosen (one thread).
  __device__ static void commit(const Args& a, int row, int token, int flags) {
    const Row& r = a.rows[row];
    Record rec{token, kNone, flags};
    if (!(flags & kNonFinite)) {
      const int produced = a.generated[row] + 1;
      a.generated[row] = produced;
      if (r.penalized) a.output_counts[int64_t(row) * a.vocab + token] += 1;
      const int64_t position = a.positions[row] + 1;  // where this token goes
      int finish = kNone;
      for (int i = 0; i < r.num_stop; ++i)
        if (a.stop_ids[int64_t(row) * a.stop_stride + i] == token) finish = kStop;
      if (finish == kNone && (produced >= r.max_tokens || position + 1 >= a.max_seq)) finish = kLength;
      if (finish != kNone) {
        a.status[row] = finish;
      } else {
        a.tokens[row] = token;
        a.positions[row] = position;
      }
      rec.finish = finish;
    }
    a.records[row] = rec;
  }

  // Loads this CTA's slice of row `row` into shared memory with the penalties applied. Returns its
  // part of the row's max, arg-max and finiteness and, when kDraw, of the first round's draw over
  // every token: the largest x / T - log E (x the penalized logit, E the race's exponential under
  // `key`), its token and x.
  template <bool kDraw>
  __device__ static TopAndDraw load_slice(const Args& a, const Row& r, int row, int first, int n, float* slice,
                                          uint32_t key, float inv_temperature) {
    const float* logits = a.logits + int64_t(row) * a.logits_stride + first;
    const int32_t* counts = r.penalized ? a.output_counts + int64_t(row) * a.vocab + first : nullptr;
    const uint8_t* prompt = r.penalized ? a.prompt_mask + int64_t(row) * a.vocab + first : nullptr;
    TopAndDraw p = TopAndDraw::identity();
    for (int base = 0; base < n; base += kThreads * kLoadUnroll) {
      float v[kLoadUnroll];
      int c[kLoadUnroll];
      bool seen[kLoadUnroll];
#pragma unroll
      for (int u = 0; u < kLoadUnroll; ++u) {  // every load of the batch in flight before any is used
        const int i = base + u * kThreads + threadIdx.x;
        v[u] = i < n ? logits[i] : 0.f;
        c[u] = counts && i < n ? counts[i] : 0;
        seen[u] = counts && i < n && prompt[i];
      }
#pragma unroll
      for (int u = 0; u < kLoadUnroll; ++u) {
        const int i = base + u * kThreads + threadIdx.x;
        if (i >= n) continue;
        float x = v[u];
        if (!isfinite(x)) {
          p.top.flags |= kNonFinite;
          x = -INFINITY;
        }
        if (counts) {  // (intrinsics: no fused multiply-add, the same rounding as the torch reference)
          if (c[u] > 0 || seen[u])
            x = x > 0.f ? __fdiv_rn(x, r.repetition_penalty) : __fmul_rn(x, r.repetition_penalty);
          x = __fsub_rn(x, __fmul_rn(r.frequency_penalty, float(c[u])));
          x = __fsub_rn(x, c[u] > 0 ? r.presence_penalty : 0.f);
        }
        slice[i] = x;
        p.top = Partial::combine(p.top, Partial{x, first + i, 0.f, 0});
        if constexpr (kDraw) {  // (a thread visits its tokens in increasing index: only a larger score takes over)
          const float y = x * inv_temperature;
          if (y + kLogNoiseReach > p.score) {  // (else its score cannot exceed p.score: -log E < kLogNoiseReach)
            const float score = y - fast_log(race_noise(key, first + i));
            if (score > p.score) p.score = score, p.drawn = first + i, p.drawn_logit = x;
          }
        }
      }
    }
    return p;
  }

  // The whole sampler for the row of this cluster. `slice`: slice_len(vocab) floats of shared memory.
  __device__ static void run(const Args& a, float* slice, SharedStorage& s) {
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    const int row = blockIdx.x / kClusterCtas;
    const int rank = int(cluster.block_rank());
    if (a.status[row] != kNone) {  // uniform over the cluster: no barrier is skipped by part of it
      if (rank == 0 && threadIdx.x == 0) a.records[row] = Record{-1, a.status[row], kIdle};
      return;
    }
    const Row& r = a.rows[row];
    const uint32_t step = uint32_t(a.generated[row]);  // (read before any barrier: rank 0 commits after the last)
    const int len = slice_len(a.vocab), first = rank * len;
    const int n = max(0, min(len, a.vocab - first));
    int phase = 0;
    const bool sampled = r.temperature >= kGreedyBelow;
    const bool top_k = r.top_k > 0 && r.top_k < a.vocab;
    // Every token kept (no min-p, no top-k): the first round draws in the load pass.
    const bool early = sampled && !top_k && !(r.min_p > 0.f);

    // Load the slice, apply the penalties; the row's max and arg-max, whether all is finite, and
    // an early row's first draw.
    TopAndDraw loaded = TopAndDraw::identity();
    if (early)
      loaded = cluster_reduce(load_slice<true>(a, r, row, first, n, slice, noise_key(r.seed_lo, r.seed_hi, step, 0u),
                                               1.f / r.temperature),
                              s, phase);
    else
      loaded.top = cluster_reduce(load_slice<false>(a, r, row, first, n, slice, 0u, 0.f).top, s, phase);
    const Partial top = loaded.top;
    int token = top.index == INT_MAX ? 0 : top.index;

    if (!(top.flags & kNonFinite) && sampled) {
      // z = (l - max l) / T into the slice: a pass of its own before top-k's select, else in the
      // first round's draw (an early row: in the pass of its masses).
      const auto scaled = [&](int i) { return __fdiv_rn(__fsub_rn(slice[i], top.value), r.temperature); };
      unsigned low = 0;  // kept: key_of(z) >= low
      if (r.min_p > 0.f) low = key_of(logf(r.min_p));
      if (top_k) {
        for (int i = threadIdx.x; i < n; i += kThreads) slice[i] = scaled(i);
        low = max(low, kth_largest_key(slice, n, unsigned(r.top_k), s));
      }
      const bool nucleus = r.top_p < 1.f;
      unsigned pivot = low;  // this round draws among the keys >= pivot
      float kept_mass = 0.f;
      int round = 0;
      if (early) {  // round 0 is drawn: j
        token = loaded.drawn == INT_MAX ? top.index : loaded.drawn;
        round = kMaxRounds;  // done, unless the nucleus rejects j
        if (nucleus) {  // the kept mass and the mass strictly above z_j, in one pass
          const unsigned kj = key_of(__fdiv_rn(__fsub_rn(loaded.drawn_logit, top.value), r.temperature));
          Masses m = Masses::identity();
          for (int i = threadIdx.x; i < n; i += kThreads) {
            const float z = scaled(i);
            slice[i] = z;
            const float e = fast_exp(z);
            m.kept += e;
            if (key_of(z) > kj) m.above += e;
          }
          const Masses total = cluster_reduce(m, s, phase);
          if (!(total.above < __fmul_rn(r.top_p, total.kept))) {  // rejected: the rounds go on from round 1
            kept_mass = total.kept;
            pivot = kj + 1;
            token = top.index;
            round = 1;
          }
        }
      }
      for (; round < kMaxRounds; ++round) {
        const uint32_t key = noise_key(r.seed_lo, r.seed_hi, step, uint32_t(round));
        const bool first_round = round == 0;
        // The draw (a thread visits its tokens in increasing index, so a strictly larger score is
        // the only one that takes over); the kept mass (first round).
        float best = -INFINITY, mass = 0.f;
        int best_i = INT_MAX;
#pragma unroll 2
        for (int i = threadIdx.x; i < n; i += kThreads) {
          float z;
          if (first_round && !top_k) {
            z = scaled(i);
            slice[i] = z;
          } else {
            z = slice[i];
          }
          const unsigned kz = key_of(z);
          if (z >= -kNoiseReach && kz >= pivot) {  // (lower z never beats the top token, z = 0)
            const float score = fast_exp(z) * fast_rcp(race_noise(key, first + i));
            if (score > best) best = score, best_i = first + i;
          }
          if (first_round && nucleus && kz >= low) mass += fast_exp(z);
        }
        const Partial drawn = cluster_reduce(Partial{best, best_i, mass, 0}, s, phase);
        if (first_round) kept_mass = drawn.sum;
        token = drawn.index == INT_MAX ? top.index : drawn.index;  // (none above the pivot: never, the top is)
        if (!nucleus) break;
        const int owner = token / len;  // the CTA whose slice holds the token (read through DSMEM)
        const unsigned kj = key_of(cluster.map_shared_rank(slice, owner)[token - owner * len]);
        float above = 0.f;  // the kept mass strictly above z_j
        for (int i = threadIdx.x; i < n; i += kThreads) {
          const float z = slice[i];
          const unsigned key = key_of(z);
          if (key >= low && key > kj) above += fast_exp(z);
        }
        if (cluster_reduce(Partial{-INFINITY, INT_MAX, above, 0}, s, phase).sum < __fmul_rn(r.top_p, kept_mass))
          break;            // j is in the nucleus
        pivot = kj + 1;     // nothing at or below z_j is in the nucleus
        token = top.index;  // the last resort, should the rounds run out: the top token is always kept
      }
    }
    if (rank == 0 && threadIdx.x == 0) commit(a, row, token, top.flags & kNonFinite);
    cluster.sync();  // no CTA leaves while another may still read its shared memory
  }
#endif  // __CUDACC__
};

}  // namespace flashformer
