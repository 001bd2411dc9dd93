// Grammar masks on the CPU: each constrained row's banned tokens set in place to the
// ban value, straight from llguidance's bitmask (bit t % 32 of word t / 32: token t is
// allowed). The general path (executor/logits.py) turns the bitmask into a float bias
// the size of the rows' logits and adds it: ~2 ms a step for 32 rows of a 49k
// vocabulary on 2 cores; this reads the bitmask once and writes only banned entries.
// Setting to -1e30 equals adding it: |logit| << 1e30 rounds away in float32.
//
// Built and loaded like cpu_attention.cpp (kernels/cpu_build.py).

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

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

}  // namespace

extern "C" {

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
