// Two passes over a step's float32 logits on the CPU.
//
// Greedy rows: each row's first maximum and its log-softmax, -log(sum(exp(x - max))),
// without the [rows, vocab] log-softmax torch would write (then gather one entry of):
// a batch-32 decode step's sampling was ~5% of it.
//
// Grammar masks: each constrained row's banned tokens set in place to the
// ban value, straight from llguidance's bitmask (bit t % 32 of word t / 32: token t is
// allowed). The general path (executor/logits.py) turns the bitmask into a float bias
// the size of the rows' logits and adds it: ~2 ms a step for 32 rows of a 49k
// vocabulary on 2 cores; this reads the bitmask once and writes only banned entries.
// Setting to -1e30 equals adding it: |logit| << 1e30 rounds away in float32.
//
// Built and loaded like cpu_attention.cpp (kernels/cpu_build.py).

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_simd.h"

namespace {

void mask_row(float* row, const int32_t* words, int64_t vocab, float banned) {
  for (int64_t w = 0; 32 * w < vocab; ++w) {
    const uint32_t bits = uint32_t(words[w]);
    if (bits == 0xFFFFFFFFu) continue;
    const int64_t n = std::min<int64_t>(32, vocab - 32 * w);
    for (int64_t b = 0; b < n; ++b)
      if (!((bits >> b) & 1u)) row[32 * w + b] = banned;
  }
}

#if TGI_X86
TGI_AVX512 void mask_row_avx512(float* row, const int32_t* words, int64_t vocab, float banned) {
  const __m512 value = _mm512_set1_ps(banned);
  const int64_t full = vocab / 32;
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t ban = ~uint32_t(words[w]);
    if (ban == 0) continue;
    _mm512_mask_storeu_ps(row + 32 * w, __mmask16(ban & 0xFFFFu), value);
    _mm512_mask_storeu_ps(row + 32 * w + 16, __mmask16(ban >> 16), value);
  }
  if (32 * full < vocab) mask_row(row + 32 * full, words + full, vocab - 32 * full, banned);
}
#endif

void greedy_row(const float* row, int64_t vocab, int64_t* token, float* logprob) {
  int64_t best = 0;
  for (int64_t i = 1; i < vocab; ++i)
    if (row[i] > row[best]) best = i;
  const float m = row[best];
  double sum = 0.0;  // one running float sum over a whole vocabulary drifts by ~1e-4
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(row[i] - m);
  *token = best;
  *logprob = -float(std::log(sum));
}

#if TGI_X86
TGI_AVX512 void greedy_row_avx512(const float* row, int64_t vocab, int64_t* token,
                                  float* logprob) {
  // Each lane keeps its first maximum and where; the answer is the lowest index among
  // the lanes holding the overall maximum: the first, as torch.argmax.
  const int64_t full = vocab / 16 * 16;
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512i where = _mm512_setzero_si512();
  __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  for (int64_t i = 0; i < full; i += 16, index = _mm512_add_epi32(index, step)) {
    const __m512 x = _mm512_loadu_ps(row + i);
    const __mmask16 more = _mm512_cmp_ps_mask(x, best, _CMP_GT_OQ);
    best = _mm512_mask_mov_ps(best, more, x);
    where = _mm512_mask_mov_epi32(where, more, index);
  }
  float m = _mm512_reduce_max_ps(best);
  const __mmask16 at_max = _mm512_cmp_ps_mask(best, _mm512_set1_ps(m), _CMP_EQ_OQ);
  int64_t first = at_max ? _mm512_mask_reduce_min_epi32(at_max, where) : 0;
  for (int64_t i = full; i < vocab; ++i)  // the tail comes after every lane's entries
    if (row[i] > m) m = row[i], first = i;
  __m512 sum = _mm512_setzero_ps();
  const __m512 vm = _mm512_set1_ps(m);
  for (int64_t i = 0; i < full; i += 16)
    sum = _mm512_add_ps(sum, tgi::exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row + i), vm)));
  float total = _mm512_reduce_add_ps(sum);
  for (int64_t i = full; i < vocab; ++i) total += std::exp(row[i] - m);
  *token = first;
  *logprob = -std::log(total);
}
#endif

}  // namespace

extern "C" {

// tokens[r] = the first argmax of logits[r], logprobs[r] = its log-softmax, for rows
// `row_stride` floats apart.
void tgi_greedy(int fast, const float* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                int64_t* tokens, float* logprobs) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
#if TGI_X86
      if (fast) {
        greedy_row_avx512(logits + r * row_stride, vocab, tokens + r, logprobs + r);
        continue;
      }
#endif
      greedy_row(logits + r * row_stride, vocab, tokens + r, logprobs + r);
    }
  });
}

int tgi_logits_have_avx512() {
#if TGI_X86
  return tgi::has_avx512();
#else
  return 0;
#endif
}

// logits[rows[i]][t] = banned wherever bit t of bitmask[i] is clear, for t < vocab.
// Rows of `logits` are `row_stride` floats apart, of `bitmask` `words` int32s apart
// (words * 32 >= vocab, checked by the caller); `rows` are distinct.
void tgi_mask_logits(int fast, float* logits, int64_t row_stride, int64_t vocab,
                     const int64_t* rows, int64_t n, const int32_t* bitmask, int64_t words,
                     float banned) {
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = logits + rows[i] * row_stride;
      const int32_t* mask = bitmask + i * words;
#if TGI_X86
      if (fast) {
        mask_row_avx512(row, mask, vocab, banned);
        continue;
      }
#endif
      mask_row(row, mask, vocab, banned);
    }
  });
}

}  // extern "C"
