// The LoRA delta of a fused projection for a batch of tokens, each on its own adapter
// slot, in one call (the BGMV of Punica / S-LoRA, for the CPU): for token t on slot s
// and each sub-projection i (q, k, v of qkv_proj; gate, up of gate_up_proj),
//   y[t, off_i : off_i+1] += (s_scale B_i^s) (A_i^s x_t)
// with the shrink accumulated in float32 and y rounded to bf16 once; tokens of one
// slot go in blocks of 4, so each weight is loaded once per block. Only the token's
// own adapter is computed (no masked columns), so a decode step of 32 tokens on 4
// adapters does a quarter of the work of one GEMM over every slot.
#include <ATen/Parallel.h>

#include <cstdint>

#include "cpu_simd.h"

using tgi::bf16;

namespace {

constexpr int64_t kBlock = 8;  // tokens of one slot computed together (weights loaded once)

// s[j][r] = A[r] . x_j for r < rank, the n tokens j (A rows `in` long).
void shrink(const bf16* const* x, int64_t n, const bf16* a, int64_t in, int64_t rank, float* s) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t r = 0; r < rank; ++r) {
      float acc = 0.f;
      for (int64_t k = 0; k < in; ++k) acc += tgi::to_float(a[r * in + k]) * tgi::to_float(x[j][k]);
      s[j * rank + r] = acc;
    }
}

// y_j[o] += sum_r s[j][r] bt[r][o] for o < out (bt rows `out` long), rounded once.
void expand(const float* s, int64_t n, const bf16* bt, int64_t out, int64_t rank, bf16* const* y) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t o = 0; o < out; ++o) {
      float acc = tgi::to_float(y[j][o]);
      for (int64_t r = 0; r < rank; ++r) acc += s[j * rank + r] * tgi::to_float(bt[r * out + o]);
      y[j][o] = tgi::to_bf16(acc);
    }
}

#if TGI_X86
inline bool has_avx512_bf16() {
  static const bool yes = tgi::has_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
}

// 32 bf16 of `at` (n < 32: the first n, the rest zero) as the dot-product instruction's type.
TGI_AVX512_BF16 inline __m512bh load_bf16x32(const bf16* at, int64_t n) {
  const __mmask32 m = n >= 32 ? ~__mmask32(0) : __mmask32((1ull << n) - 1);
  return (__m512bh)_mm512_maskz_loadu_epi16(m, at);
}

// Q rows of A against N tokens per pass: each A chunk is loaded once for the N tokens
// (compile-time N and Q keep the N x Q accumulators in registers).
template <int N, int Q>
TGI_AVX512_BF16 inline void shrink_rows(const bf16* const* x, const bf16* a, int64_t in,
                                        int64_t rank, int64_t r0, float* s) {
  __m512 acc[N][Q];
  for (int j = 0; j < N; ++j)
    for (int q = 0; q < Q; ++q) acc[j][q] = _mm512_setzero_ps();
  for (int64_t k = 0; k < in; k += 32) {
    __m512bh av[Q];
    for (int q = 0; q < Q; ++q) av[q] = load_bf16x32(a + (r0 + q) * in + k, in - k);
    for (int j = 0; j < N; ++j) {
      const __m512bh xv = load_bf16x32(x[j] + k, in - k);
      for (int q = 0; q < Q; ++q) acc[j][q] = _mm512_dpbf16_ps(acc[j][q], av[q], xv);
    }
  }
  for (int j = 0; j < N; ++j)
    for (int q = 0; q < Q; ++q) s[j * rank + r0 + q] = _mm512_reduce_add_ps(acc[j][q]);
}

template <int N>
TGI_AVX512_BF16 void shrink_block(const bf16* const* x, const bf16* a, int64_t in, int64_t rank,
                                  float* s) {
  constexpr int Q = N > 4 ? 2 : 4;  // N x Q accumulators within the 32 registers
  int64_t r = 0;
  for (; r + Q <= rank; r += Q) shrink_rows<N, Q>(x, a, in, rank, r, s);
  for (; r < rank; ++r) shrink_rows<N, 1>(x, a, in, rank, r, s);
}

// Each 16 outputs: B's values loaded once for the N tokens.
template <int N>
TGI_AVX512 void expand_block(const float* s, const bf16* bt, int64_t out, int64_t rank,
                             bf16* const* y) {
  for (int64_t o = 0; o < out; o += 16) {
    const int w = out - o >= 16 ? 16 : int(out - o);
    __m512 acc[N];
    for (int j = 0; j < N; ++j) acc[j] = tgi::load_bf16(y[j] + o, w);
    for (int64_t r = 0; r < rank; ++r) {
      const __m512 b = tgi::load_bf16(bt + r * out + o, w);
      for (int j = 0; j < N; ++j)
        acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(s[j * rank + r]), b, acc[j]);
    }
    for (int j = 0; j < N; ++j) tgi::store_bf16(y[j] + o, acc[j], w);
  }
}

template <int N>
void block_avx512(const bf16* const* x, const bf16* a, int64_t in, int64_t rank, const bf16* bt,
                  int64_t out, bf16* const* y, float* s) {
  shrink_block<N>(x, a, in, rank, s);
  expand_block<N>(s, bt, out, rank, y);
}

void lora_block_avx512(int64_t n, const bf16* const* x, const bf16* a, int64_t in, int64_t rank,
                       const bf16* bt, int64_t out, bf16* const* y, float* s) {
  switch (n) {
    case 8: return block_avx512<8>(x, a, in, rank, bt, out, y, s);
    case 7: return block_avx512<7>(x, a, in, rank, bt, out, y, s);
    case 6: return block_avx512<6>(x, a, in, rank, bt, out, y, s);
    case 5: return block_avx512<5>(x, a, in, rank, bt, out, y, s);
    case 4: return block_avx512<4>(x, a, in, rank, bt, out, y, s);
    case 3: return block_avx512<3>(x, a, in, rank, bt, out, y, s);
    case 2: return block_avx512<2>(x, a, in, rank, bt, out, y, s);
    default: return block_avx512<1>(x, a, in, rank, bt, out, y, s);
  }
}
#endif

}  // namespace

extern "C" {

int tgi_lora_have_avx512_bf16() {
#if TGI_X86
  return has_avx512_bf16();
#else
  return 0;
#endif
}

// x: bf16 [tokens, in] (rows x_stride apart); y: bf16 [tokens, out_total] (rows y_stride
// apart), added to in place. The adapter tokens come as blocks of at most 4 on one
// slot: block c is tokens order[bounds[c] .. bounds[c+1]) on slot block_slot[c].
// a: bf16 [S][subs][rank][in]; bt: bf16 [S][rank * out_total], sub i's block at
// rank * offs[i], row r of it at + r * (offs[i+1] - offs[i]); offs: int64 [subs + 1].
// `fast`: the AVX512-BF16 code (the caller checks `tgi_lora_have_avx512_bf16`).
void tgi_lora(int fast, const void* x_, int64_t x_stride, int64_t in, const int32_t* order,
              const int32_t* bounds, const int32_t* block_slot, int64_t blocks, const void* a_,
              const void* bt_, int64_t subs, int64_t rank, const int64_t* offs, void* y_,
              int64_t y_stride) {
  const auto* x = static_cast<const bf16*>(x_);
  const auto* a = static_cast<const bf16*>(a_);
  const auto* bt = static_cast<const bf16*>(bt_);
  auto* y = static_cast<bf16*>(y_);
  const int64_t out_total = offs[subs];
  // One work item per (block, sub-projection): one decode token still spreads over the
  // cores when the projection is fused.
  at::parallel_for(0, blocks * subs, 1, [&](int64_t begin, int64_t end) {
    float s[kBlock * 256];
    const bf16* xs[kBlock];
    bf16* ys[kBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item / subs, i = item % subs;
      const int64_t slot = block_slot[c], n = bounds[c + 1] - bounds[c];
      for (int64_t j = 0; j < n; ++j) {
        const int64_t t = order[bounds[c] + j];
        xs[j] = x + t * x_stride;
        ys[j] = y + t * y_stride + offs[i];
      }
      const bf16* a_i = a + ((slot * subs + i) * rank) * in;
      const int64_t out = offs[i + 1] - offs[i];
      const bf16* bt_i = bt + slot * rank * out_total + rank * offs[i];
#if TGI_X86
      if (fast) {
        lora_block_avx512(n, xs, a_i, in, rank, bt_i, out, ys, s);
        continue;
      }
#endif
      shrink(xs, n, a_i, in, rank, s);
      expand(s, n, bt_i, out, rank, ys);
    }
  });
}

}  // extern "C"
