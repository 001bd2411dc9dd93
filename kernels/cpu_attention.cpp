// Paged attention on the CPU over a bf16 K/V cache: one call per layer for the whole
// step (prefill chunks and decode rows alike), reading K/V straight from the cache
// blocks (no gathered copy) with an online softmax, so memory is touched once.
//
// Layout of the fast path (AVX512_BF16): the query rows of one KV head are the
// vector lanes. Scores for a key are `dpbf16(Q pairs of 16 rows, broadcast K pair)`
// accumulated in float32 over the head dimension, so K is read in its cache layout;
// the softmax runs lane-wise (one max and one sum per row, vectorised over rows);
// P·V broadcasts interleaved V pairs against P pairs of the same rows. Scores and
// the output accumulate in float32; P is rounded to bf16 for the P·V products, as
// torch's own CPU flash attention does.
//
// Built at run time by kernels/cpu_attention.py (plain `c++`, torch's headers for
// `at::parallel_for` only) and called through ctypes.

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_simd.h"

#define TGI_FAST_PATH TGI_X86
#define TGI_TARGET TGI_AVX512_BF16

namespace {

using tgi::bf16;
constexpr int kLanes = 16;      // float32 lanes of a 512-bit vector: query rows per row group
constexpr int kTileKeys = 32;   // keys per online-softmax step
constexpr int kMaxGroups = 4;   // row groups of one work item (64 query rows)
constexpr int kMaxHeadDim = 512;
constexpr int64_t kPrefetchKeys = 32;  // decode: how far ahead of its tile a walk prefetches

struct Problem {
  const bf16* q;
  int64_t q_stride_token, q_stride_head;
  const bf16* k_cache;
  const bf16* v_cache;
  bf16* out;  // [tokens, heads, head_dim], contiguous
  const int64_t* query_start;  // [num_seqs + 1]
  const int64_t* seq_lens;     // [num_seqs]
  const int64_t* block_tables;  // [num_seqs, bt_stride]
  int64_t bt_stride, num_seqs, heads, kv_heads, head_dim, block_size;
  float scale;

  int64_t group() const { return heads / kv_heads; }
  int64_t query_len(int64_t s) const { return query_start[s + 1] - query_start[s]; }
  int64_t context_len(int64_t s) const { return seq_lens[s] - query_len(s); }
  int64_t slot(int64_t s, int64_t pos) const {
    return block_tables[s * bt_stride + pos / block_size] * block_size + pos % block_size;
  }
  const bf16* key(int64_t s, int64_t pos, int64_t h) const {
    return k_cache + (slot(s, pos) * kv_heads + h) * head_dim;
  }
  const bf16* value(int64_t s, int64_t pos, int64_t h) const {
    return v_cache + (slot(s, pos) * kv_heads + h) * head_dim;
  }
  const bf16* query(int64_t token, int64_t head) const {
    return q + token * q_stride_token + head * q_stride_head;
  }
  bf16* output(int64_t token, int64_t head) const {
    return out + (token * heads + head) * head_dim;
  }
};

// Tokens [t0, t0 + tn) of one sequence's chunk, all query heads of one KV head.
struct Item {
  int64_t seq, kv_head, t0, tn;
  int64_t kv_count;  // KV heads [kv_head, kv_head + kv_count): all of them in a grouped decode item
  double cost;
};

using tgi::to_bf16;
using tgi::to_float;

// ---- portable path: one query row at a time, float32 throughout ----------------

void attend_portable(const Problem& p, const Item& it, std::vector<float>& scratch) {
  const int64_t d = p.head_dim, g = p.group();
  const int64_t qs = p.query_start[it.seq], ctx = p.context_len(it.seq);
  scratch.resize(2 * d);
  float* qrow = scratch.data();
  float* acc = qrow + d;
  for (int64_t t = it.t0; t < it.t0 + it.tn; ++t) {
    const int64_t pos = ctx + t;
    for (int64_t j = 0; j < g; ++j) {
      const int64_t head = it.kv_head * g + j;
      const bf16* q = p.query(qs + t, head);
      for (int64_t i = 0; i < d; ++i) qrow[i] = to_float(q[i]) * p.scale;
      std::fill(acc, acc + d, 0.f);
      float m = -std::numeric_limits<float>::infinity(), l = 0.f;
      for (int64_t key = 0; key <= pos; ++key) {
        const bf16* k = p.key(it.seq, key, it.kv_head);
        float s = 0.f;
        for (int64_t i = 0; i < d; ++i) s += qrow[i] * to_float(k[i]);
        if (s > m) {  // rescale what was summed under the old maximum
          const float c = std::exp(m - s);
          l *= c;
          for (int64_t i = 0; i < d; ++i) acc[i] *= c;
          m = s;
        }
        const float w = std::exp(s - m);
        l += w;
        const bf16* v = p.value(it.seq, key, it.kv_head);
        for (int64_t i = 0; i < d; ++i) acc[i] += w * to_float(v[i]);
      }
      bf16* o = p.output(qs + t, head);
      for (int64_t i = 0; i < d; ++i) o[i] = to_bf16(acc[i] / l);
    }
  }
}

// ---- AVX512_BF16 path ---------------------------------------------------------------

#if TGI_FAST_PATH

struct Scratch {
  std::vector<uint32_t> qv;  // [head_dim / 2][rows]: bf16 pairs of each row's query
  std::vector<float> s;      // [kTileKeys][rows]: scores, then probabilities
  std::vector<uint32_t> pv;  // [kTileKeys / 2][rows]: interleaved bf16 probability pairs
  std::vector<uint32_t> vp;  // [kTileKeys / 2][head_dim]: interleaved bf16 value pairs
  std::vector<float> o;      // [head_dim][rows]: output accumulator (rows in lanes)
  std::vector<uint32_t> zeros;  // a zero key/value row for keys past the end
  std::vector<float> row_stats;  // decode rows: running max, then running sum
  std::vector<uint32_t> prob_pairs;  // decode rows: [row][key pair] bf16 probability pairs
};

using tgi::exp_ps;

TGI_TARGET inline __m512bh pairs(const uint32_t* at) {
  return (__m512bh)_mm512_loadu_si512(at);
}

TGI_TARGET inline __m512bh broadcast_pair(const uint32_t* at) {
  return (__m512bh)_mm512_set1_epi32(int(*at));
}

// scores[n][lanes] (unscaled) for `keys[n]`, n < kTileKeys, against the packed queries.
template <int RG>
TGI_TARGET void tile_scores(const uint32_t* qv, const uint32_t* const* keys, int64_t half_dim,
                            float* scores) {
  constexpr int NK = RG == 1 ? 16 : RG == 2 ? 8 : 4;
  constexpr int rows = RG * kLanes;
  for (int n0 = 0; n0 < kTileKeys; n0 += NK) {
    __m512 acc[NK][RG];
    for (int n = 0; n < NK; ++n)
      for (int r = 0; r < RG; ++r) acc[n][r] = _mm512_setzero_ps();
    for (int64_t k2 = 0; k2 < half_dim; ++k2) {
      __m512bh a[RG];
      for (int r = 0; r < RG; ++r) a[r] = pairs(qv + k2 * rows + r * kLanes);
      for (int n = 0; n < NK; ++n) {
        const __m512bh b = broadcast_pair(keys[n0 + n] + k2);
        for (int r = 0; r < RG; ++r) acc[n][r] = _mm512_dpbf16_ps(acc[n][r], a[r], b);
      }
    }
    for (int n = 0; n < NK; ++n)
      for (int r = 0; r < RG; ++r) _mm512_storeu_ps(scores + (n0 + n) * rows + r * kLanes, acc[n][r]);
  }
}

// out[d][lanes] += sum over key pairs of probs(pair)[lanes] * values(pair)[d].
template <int RG>
TGI_TARGET void tile_values(const uint32_t* pv, const uint32_t* vp, int64_t head_dim,
                            int64_t key_pairs, float* out) {
  constexpr int DC = RG == 1 ? 16 : RG == 2 ? 8 : 4;  // head-dim entries per pass
  constexpr int rows = RG * kLanes;
  for (int64_t d0 = 0; d0 < head_dim; d0 += DC) {
    __m512 acc[DC][RG];
    for (int d = 0; d < DC; ++d)
      for (int r = 0; r < RG; ++r) acc[d][r] = _mm512_loadu_ps(out + (d0 + d) * rows + r * kLanes);
    for (int64_t n2 = 0; n2 < key_pairs; ++n2) {
      __m512bh a[RG];
      for (int r = 0; r < RG; ++r) a[r] = pairs(pv + n2 * rows + r * kLanes);
      for (int d = 0; d < DC; ++d) {
        const __m512bh b = broadcast_pair(vp + n2 * head_dim + d0 + d);
        for (int r = 0; r < RG; ++r) acc[d][r] = _mm512_dpbf16_ps(acc[d][r], a[r], b);
      }
    }
    for (int d = 0; d < DC; ++d)
      for (int r = 0; r < RG; ++r) _mm512_storeu_ps(out + (d0 + d) * rows + r * kLanes, acc[d][r]);
  }
}

template <int RG>
TGI_TARGET void attend_fast(const Problem& p, const Item& it, Scratch& sc) {
  constexpr int rows = RG * kLanes;
  const int64_t d = p.head_dim, half = d / 2, g = p.group(), h = it.kv_head;
  const int64_t qs = p.query_start[it.seq], ctx = p.context_len(it.seq);
  const int64_t used = it.tn * g;  // rows in use; the rest are padding, never written
  sc.qv.assign(half * rows, 0);
  sc.s.resize(kTileKeys * rows);
  sc.pv.resize(kTileKeys / 2 * rows);
  sc.vp.resize(kTileKeys / 2 * d);
  sc.o.assign(d * rows, 0.f);
  sc.zeros.assign(half, 0);
  alignas(64) int32_t pos[rows];
  for (int64_t r = 0; r < rows; ++r) {
    if (r >= used) {  // padding rows see every key: finite sums, no NaN
      pos[r] = std::numeric_limits<int32_t>::max();
      continue;
    }
    const int64_t t = it.t0 + r / g;
    pos[r] = int32_t(ctx + t);
    const auto* src = reinterpret_cast<const uint32_t*>(p.query(qs + t, h * g + r % g));
    for (int64_t k2 = 0; k2 < half; ++k2) sc.qv[k2 * rows + r] = src[k2];
  }
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 scale = _mm512_set1_ps(p.scale);
  // 16-bit lane indices: element 2i from the first source's i, 2i+1 from the second's.
  alignas(64) uint16_t index[32];
  for (int i = 0; i < 16; ++i) index[2 * i] = uint16_t(i), index[2 * i + 1] = uint16_t(16 + i);
  const __m512i interleave = _mm512_load_si512(index);  // halves of one vector
  for (int i = 0; i < 16; ++i) index[2 * i + 1] = uint16_t(32 + i);
  const __m512i lo_pairs = _mm512_load_si512(index);  // low halves of two vectors
  const __m512i hi_pairs = _mm512_add_epi16(lo_pairs, _mm512_set1_epi16(16));
  __m512 m[RG], l[RG];
  for (int r = 0; r < RG; ++r) m[r] = neg_inf, l[r] = _mm512_setzero_ps();
  const uint32_t* keys[kTileKeys];
  const bf16* values[kTileKeys];
  const auto* zero_row = reinterpret_cast<const bf16*>(sc.zeros.data());
  const int64_t end = ctx + it.t0 + it.tn;  // keys [0, end) cover every row's causal span
  const int64_t* table = p.block_tables + it.seq * p.bt_stride;
  for (int64_t k0 = 0; k0 < end; k0 += kTileKeys) {
    const int64_t nk = std::min<int64_t>(kTileKeys, end - k0);
    // Walk the block table once per block, not once per key (a division each).
    int64_t block = k0 / p.block_size, offset = k0 % p.block_size;
    int64_t slot = table[block] * p.block_size + offset;
    for (int64_t n = 0; n < kTileKeys; ++n) {
      if (n >= nk) {
        keys[n] = sc.zeros.data(), values[n] = zero_row;
        continue;
      }
      keys[n] = reinterpret_cast<const uint32_t*>(p.k_cache + (slot * p.kv_heads + h) * d);
      values[n] = p.v_cache + (slot * p.kv_heads + h) * d;
      if (++offset < p.block_size) ++slot;
      else if (n + 1 < nk) offset = 0, slot = table[++block] * p.block_size;
    }
    tile_scores<RG>(sc.qv.data(), keys, half, sc.s.data());
    // Below the diagonal (every row sees every key of the tile: most tiles of a chunk
    // over a cached prefix) the causal mask and the -inf checks are skipped.
    const bool all_visible = k0 + nk - 1 <= ctx + it.t0;
    const int64_t key_pairs = (nk + 1) / 2;
    for (int r = 0; r < RG; ++r) {
      __m512 tile_max = neg_inf;
      const __m512i rpos = _mm512_load_si512(pos + r * kLanes);
      for (int64_t n = 0; n < nk; ++n) {
        float* at = sc.s.data() + n * rows + r * kLanes;
        const __mmask16 visible =
            all_visible ? __mmask16(0xFFFF)
                        : _mm512_cmpge_epi32_mask(rpos, _mm512_set1_epi32(int(k0 + n)));
        const __m512 s = _mm512_mask_mul_ps(neg_inf, visible, _mm512_loadu_ps(at), scale);
        _mm512_storeu_ps(at, s);
        tile_max = _mm512_max_ps(tile_max, s);
      }
      const __m512 m_new = _mm512_max_ps(m[r], tile_max);
      // Rows that had no visible key yet carry nothing to rescale (and -inf - -inf is NaN).
      const __mmask16 had = _mm512_cmp_ps_mask(m[r], neg_inf, _CMP_NEQ_OQ);
      const __m512 alpha = _mm512_maskz_mov_ps(had, exp_ps(_mm512_sub_ps(m[r], m_new)));
      // Probabilities straight into interleaved bf16 pairs (P of V's products).
      __m512 sum = _mm512_setzero_ps();
      for (int64_t n2 = 0; n2 < key_pairs; ++n2) {
        __m512 w[2];
        for (int j = 0; j < 2; ++j) {
          const int64_t n = 2 * n2 + j;
          w[j] = _mm512_setzero_ps();
          if (n >= nk) continue;
          const __m512 s = _mm512_loadu_ps(sc.s.data() + n * rows + r * kLanes);
          const __m512 e = exp_ps(_mm512_sub_ps(s, m_new));
          w[j] = all_visible
                     ? e : _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, neg_inf, _CMP_NEQ_OQ), e);
          sum = _mm512_add_ps(sum, w[j]);
        }
        const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(w[1], w[0]);
        _mm512_storeu_si512(sc.pv.data() + n2 * rows + r * kLanes,
                            _mm512_permutexvar_epi16(interleave, both));
      }
      l[r] = _mm512_fmadd_ps(l[r], alpha, sum);
      // Once a row's maximum has settled, alpha is 1 in every lane: nothing to rescale.
      if (_mm512_cmp_ps_mask(alpha, _mm512_set1_ps(1.f), _CMP_EQ_OQ) != 0xFFFF) {
        for (int64_t i = 0; i < d; ++i) {
          float* at = sc.o.data() + i * rows + r * kLanes;
          _mm512_storeu_ps(at, _mm512_mul_ps(_mm512_loadu_ps(at), alpha));
        }
      }
      m[r] = m_new;
    }
    for (int64_t n2 = 0; n2 < key_pairs; ++n2) {
      const bf16* even = values[2 * n2];
      const bf16* odd = values[2 * n2 + 1];
      uint32_t* dst = sc.vp.data() + n2 * d;
      for (int64_t i = 0; i < d; i += 32) {
        const __m512i a = _mm512_loadu_si512(even + i), b = _mm512_loadu_si512(odd + i);
        _mm512_storeu_si512(dst + i, _mm512_permutex2var_epi16(a, lo_pairs, b));
        _mm512_storeu_si512(dst + i + 16, _mm512_permutex2var_epi16(a, hi_pairs, b));
      }
    }
    tile_values<RG>(sc.pv.data(), sc.vp.data(), d, key_pairs, sc.o.data());
  }
  alignas(64) float inv[rows];
  for (int r = 0; r < RG; ++r)
    _mm512_store_ps(inv + r * kLanes, _mm512_div_ps(_mm512_set1_ps(1.f), l[r]));
  for (int64_t r = 0; r < used; ++r) {
    bf16* o = p.output(qs + it.t0 + r / g, h * g + r % g);
    for (int64_t i = 0; i < d; ++i) o[i] = to_bf16(sc.o[i * rows + r] * inv[r]);
  }
}

// Sixteen vectors to the vector of their sums (lane n: the sum of v[n]), by pairwise
// unpacks and lane shuffles: ~45 instructions instead of 16 horizontal reductions.
TGI_TARGET inline __m512 sum_each(__m512 v[16]) {
  __m512 x[8], z[4];
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(x[2 * i]), b = _mm512_castps_pd(x[2 * i + 1]);
    z[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // Each 128-bit lane of z[k] now holds partial sums of v[4k..4k+3]: add across lanes.
  const __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88),
                                  _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
  const __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], 0x88),
                                  _mm512_shuffle_f32x4(z[2], z[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xDD));
}

// A decode item: one token, the query heads of KV heads [kv_head, kv_head + kv_count),
// G <= 8 per KV head. Vector lanes run along the head dimension, as K and V lie in the
// cache, so the few rows waste no lanes. All KV heads of a sequence in one item read
// each cache block front to back (the heads' rows interleave in a slot): one head at a
// time, a strided walk, ran at a third of the memory bandwidth once K/V left the caches.
// Scores of 16 keys are summed across lanes at once (`sum_each`); the softmax runs over
// keys.
template <int G>
TGI_TARGET void attend_rows(const Problem& p, const Item& it, Scratch& sc) {
  constexpr int kKeys = 16;
  const int64_t d = p.head_dim, chunks = d / 32, g = p.group();
  const int64_t h0 = it.kv_head, hn = it.kv_count, rows = hn * G;
  const int64_t qs = p.query_start[it.seq], end = p.seq_lens[it.seq];
  const int64_t* table = p.block_tables + it.seq * p.bt_stride;
  const int64_t slot_elems = p.kv_heads * d;
  sc.o.assign(rows * d, 0.f);  // [row][head_dim]
  sc.vp.resize(kKeys / 2 * d);  // [key pair][head_dim] one head's interleaved pairs
  sc.zeros.assign(slot_elems, 0);
  sc.row_stats.assign(2 * rows, 0.f);
  sc.prob_pairs.resize(rows * (kKeys / 2));
  float* m = sc.row_stats.data();
  float* l = m + rows;
  for (int64_t r = 0; r < rows; ++r) m[r] = -std::numeric_limits<float>::infinity();
  alignas(64) uint16_t index[32];
  for (int i = 0; i < 16; ++i) index[2 * i] = uint16_t(i), index[2 * i + 1] = uint16_t(32 + i);
  const __m512i lo_pairs = _mm512_load_si512(index);
  const __m512i hi_pairs = _mm512_add_epi16(lo_pairs, _mm512_set1_epi16(16));
  const auto* zero_row = reinterpret_cast<const bf16*>(sc.zeros.data());
  const bf16* keys[kKeys];    // slot rows: every KV head's row of each key
  const bf16* values[kKeys];
  int64_t block = 0, offset = 0, slot = table[0] * p.block_size;
  // A second walk kPrefetchKeys ahead: the hardware prefetchers lose the block table's
  // jumps from block to block (measured: 1.1-1.2x on K/V that have left the caches).
  int64_t pf_pos = 0, pf_block = 0, pf_offset = 0, pf_slot = slot;
  const int64_t row_bytes = hn * d * int64_t(sizeof(bf16));
  auto prefetch_to = [&](int64_t to) {
    for (to = std::min(to, end); pf_pos < to; ++pf_pos) {
      const char* kp = reinterpret_cast<const char*>(p.k_cache + pf_slot * slot_elems + h0 * d);
      const char* vq = reinterpret_cast<const char*>(p.v_cache + pf_slot * slot_elems + h0 * d);
      for (int64_t off = 0; off < row_bytes; off += 64) {
        asm volatile("prefetcht0 %0" : : "m"(kp[off]));
        asm volatile("prefetcht0 %0" : : "m"(vq[off]));
      }
      if (++pf_offset < p.block_size) ++pf_slot;
      else if (pf_pos + 1 < end) pf_offset = 0, pf_slot = table[++pf_block] * p.block_size;
    }
  };
  prefetch_to(kPrefetchKeys);
  for (int64_t k0 = 0; k0 < end; k0 += kKeys) {
    const int64_t nk = std::min<int64_t>(kKeys, end - k0);
    prefetch_to(k0 + kKeys + kPrefetchKeys);
    for (int64_t n = 0; n < kKeys; ++n) {
      if (n >= nk) {
        keys[n] = values[n] = zero_row;
        continue;
      }
      keys[n] = p.k_cache + slot * slot_elems;
      values[n] = p.v_cache + slot * slot_elems;
      if (++offset < p.block_size) ++slot;
      else if (k0 + n + 1 < end) offset = 0, slot = table[++block] * p.block_size;
    }
    const __mmask16 live = __mmask16((1u << nk) - 1u);
    for (int64_t hh = 0; hh < hn; ++hh) {
      const int64_t h = h0 + hh;
      for (int r = 0; r < G; ++r) {
        const int64_t row = hh * G + r;
        const bf16* q = p.query(qs + it.t0, h * g + r);
        __m512 acc[kKeys];
        for (int n = 0; n < kKeys; ++n) acc[n] = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c) {
          const __m512bh qc = (__m512bh)_mm512_loadu_si512(q + 32 * c);
          for (int n = 0; n < kKeys; ++n)
            acc[n] = _mm512_dpbf16_ps(acc[n], qc,
                                      (__m512bh)_mm512_loadu_si512(keys[n] + h * d + 32 * c));
        }
        const __m512 s = _mm512_mask_mul_ps(
            _mm512_set1_ps(-std::numeric_limits<float>::infinity()), live, sum_each(acc),
            _mm512_set1_ps(p.scale));
        const float m_new = std::max(m[row], _mm512_reduce_max_ps(s));  // key 0 is always live
        const float alpha = m[row] == -std::numeric_limits<float>::infinity()
                                ? 0.f : std::exp(m[row] - m_new);
        const __m512 w =
            _mm512_maskz_mov_ps(live, exp_ps(_mm512_sub_ps(s, _mm512_set1_ps(m_new))));
        l[row] = l[row] * alpha + _mm512_reduce_add_ps(w);
        m[row] = m_new;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(sc.prob_pairs.data() + row * (kKeys / 2)),
                            (__m256i)_mm512_cvtneps_pbh(w));
        if (alpha != 1.f) {
          const __m512 a = _mm512_set1_ps(alpha);
          float* o = sc.o.data() + row * d;
          for (int64_t i = 0; i < d; i += 16)
            _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_loadu_ps(o + i), a));
        }
      }
    }
    const int64_t key_pairs = (nk + 1) / 2;
    for (int64_t hh = 0; hh < hn; ++hh) {
      const int64_t h = h0 + hh;
      for (int64_t n2 = 0; n2 < key_pairs; ++n2) {
        uint32_t* dst = sc.vp.data() + n2 * d;
        for (int64_t i = 0; i < d; i += 32) {
          const __m512i a = _mm512_loadu_si512(values[2 * n2] + h * d + i);
          const __m512i b = _mm512_loadu_si512(values[2 * n2 + 1] + h * d + i);
          _mm512_storeu_si512(dst + i, _mm512_permutex2var_epi16(a, lo_pairs, b));
          _mm512_storeu_si512(dst + i + 16, _mm512_permutex2var_epi16(a, hi_pairs, b));
        }
      }
      for (int r = 0; r < G; ++r) {
        const int64_t row = hh * G + r;
        const uint32_t* probs = sc.prob_pairs.data() + row * (kKeys / 2);
        const uint32_t* vp = sc.vp.data();
        float* o = sc.o.data() + row * d;
        for (int64_t i = 0; i < d; i += 16) {
          __m512 acc = _mm512_loadu_ps(o + i);
          for (int64_t n2 = 0; n2 < key_pairs; ++n2)
            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(int(probs[n2])),
                                   (__m512bh)_mm512_loadu_si512(vp + n2 * d + i));
          _mm512_storeu_ps(o + i, acc);
        }
      }
    }
  }
  for (int64_t hh = 0; hh < hn; ++hh)
    for (int r = 0; r < G; ++r) {
      const int64_t row = hh * G + r;
      bf16* out = p.output(qs + it.t0, (h0 + hh) * g + r);
      const float inv = 1.f / l[row];
      for (int64_t i = 0; i < d; ++i) out[i] = to_bf16(sc.o[row * d + i] * inv);
    }
}

void attend_fast_any(const Problem& p, const Item& it, Scratch& sc) {
  if (it.tn == 1) {
    switch (p.group()) {
      case 1: return attend_rows<1>(p, it, sc);
      case 2: return attend_rows<2>(p, it, sc);
      case 3: return attend_rows<3>(p, it, sc);
      case 4: return attend_rows<4>(p, it, sc);
      case 5: return attend_rows<5>(p, it, sc);
      case 6: return attend_rows<6>(p, it, sc);
      case 7: return attend_rows<7>(p, it, sc);
      case 8: return attend_rows<8>(p, it, sc);
      default: break;
    }
  }
  switch ((it.tn * p.group() + kLanes - 1) / kLanes) {
    case 1: return attend_fast<1>(p, it, sc);
    case 2: return attend_fast<2>(p, it, sc);
    case 3: return attend_fast<3>(p, it, sc);
    default: return attend_fast<4>(p, it, sc);
  }
}

#endif  // TGI_FAST_PATH

// Work items, costliest first, so the threads' dynamic pick balances the tail.
std::vector<Item> plan_items(const Problem& p, bool fast) {
  const int64_t g = p.group();
  // Fast path: as many tokens as fill 32 query rows (two row groups) per item.
  const int64_t tokens_per_item = fast ? std::max<int64_t>(1, 2 * kLanes / g) : 1;
  // Decode tokens take every KV head of their sequence in one item (reading each cache
  // block front to back), once there are enough sequences to keep every thread busy.
  int64_t decode_seqs = 0;
  for (int64_t s = 0; s < p.num_seqs; ++s) decode_seqs += p.query_len(s) == 1;
  const bool grouped = fast && g <= 8 && decode_seqs >= 2 * at::get_num_threads();
  std::vector<Item> items;
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    const int64_t qlen = p.query_len(s), ctx = p.context_len(s);
    if (qlen == 1 && grouped) {
      items.push_back({s, 0, 0, 1, p.kv_heads, double(p.heads) * double(ctx + 1)});
      continue;
    }
    for (int64_t t0 = 0; t0 < qlen; t0 += tokens_per_item) {
      const int64_t tn = std::min(tokens_per_item, qlen - t0);
      for (int64_t h = 0; h < p.kv_heads; ++h)
        items.push_back({s, h, t0, tn, 1, double(tn * g) * double(ctx + t0 + tn)});
    }
  }
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return items;
}

}  // namespace

extern "C" {

// Whether this build has the AVX512_BF16 path (the caller checks that the CPU has it).
int tgi_cpu_attention_has_fast_path() { return TGI_FAST_PATH; }

// 0 on success; 1: shapes the kernel does not take. `fast`: use the AVX512_BF16 path.
int tgi_cpu_paged_attention(int fast, const void* q, int64_t q_stride_token, int64_t q_stride_head,
                            const void* k_cache, const void* v_cache, void* out,
                            const int64_t* query_start, const int64_t* seq_lens,
                            const int64_t* block_tables, int64_t bt_stride, int64_t num_seqs,
                            int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,
                            float scale) {
  if (kv_heads <= 0 || heads % kv_heads || head_dim % 2 || head_dim > kMaxHeadDim) return 1;
  const Problem p{static_cast<const bf16*>(q), q_stride_token, q_stride_head,
                  static_cast<const bf16*>(k_cache), static_cast<const bf16*>(v_cache),
                  static_cast<bf16*>(out), query_start, seq_lens, block_tables, bt_stride,
                  num_seqs, heads, kv_heads, head_dim, block_size, scale};
#if TGI_FAST_PATH
  if (fast && (head_dim % 32 || p.group() > kMaxGroups * kLanes)) return 1;
#else
  if (fast) return 1;
#endif
  const std::vector<Item> items = plan_items(p, fast);
  std::atomic<size_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t end) {
#if TGI_FAST_PATH
    Scratch scratch;
#endif
    std::vector<float> portable;
    for (int64_t worker = begin; worker < end; ++worker) {
      for (size_t i = next++; i < items.size(); i = next++) {
#if TGI_FAST_PATH
        if (fast) {
          attend_fast_any(p, items[i], scratch);
          continue;
        }
#endif
        attend_portable(p, items[i], portable);
      }
    }
  });
  return 0;
}

}  // extern "C"
