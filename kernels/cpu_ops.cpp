// The elementwise chain of a bf16 decoder layer on the CPU, fused: what eager torch
// runs as ~35 small ops a layer (each a dispatch, an allocation and a pass over
// memory) in three calls. Each rounds to bf16 where torch's op-by-op bf16 path
// rounds, so results equal it up to the order of one float32 sum (RMSNorm's) and
// the last bit of exp (SiLU's). AVX-512 where the CPU has it, plain loops elsewhere.
//
// Built and loaded like cpu_attention.cpp (kernels/cpu_build.py).

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_simd.h"

namespace {

using tgi::bf16;
using tgi::round_bf16;
using tgi::to_bf16;
using tgi::to_float;

// Elements per thread task: below this a step's rows run on one thread (a fork costs more).
constexpr int64_t kGrainElements = 32768;

int64_t grain(int64_t row_elements) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_elements));
}

// ---- one row each, portable ----

void add_norm_row(bf16* h, const bf16* d, const bf16* w, bf16* o, int64_t dim, float eps) {
  if (d != nullptr)
    for (int64_t i = 0; i < dim; ++i) h[i] = to_bf16(to_float(h[i]) + to_float(d[i]));
  float squares = 0.f;
  for (int64_t i = 0; i < dim; ++i) squares += to_float(h[i]) * to_float(h[i]);
  const float inv = 1.f / std::sqrt(squares / float(dim) + eps);
  for (int64_t i = 0; i < dim; ++i) o[i] = to_bf16(to_float(w[i]) * round_bf16(to_float(h[i]) * inv));
}

void silu_mul_row(const bf16* g, const bf16* u, bf16* o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = to_float(g[i]);
    o[i] = to_bf16(round_bf16(x / (1.f + std::exp(-x))) * to_float(u[i]));
  }
}

void rope_row(bf16* a, bf16* b, const bf16* c, const bf16* s, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = to_float(a[i]), x2 = to_float(b[i]), ci = to_float(c[i]), si = to_float(s[i]);
    a[i] = to_bf16(round_bf16(x1 * ci) - round_bf16(x2 * si));
    b[i] = to_bf16(round_bf16(x2 * ci) + round_bf16(x1 * si));
  }
}

// ---- the same, 16 lanes at a time ----

#if TGI_X86
using tgi::exp_ps;
using tgi::load_bf16;
using tgi::round_bf16x16;
using tgi::store_bf16;

TGI_AVX512 void add_norm_row_avx512(bf16* h, const bf16* d, const bf16* w, bf16* o, int64_t dim,
                                    float eps) {
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < dim; i += 16) {
    const int n = int(std::min<int64_t>(16, dim - i));
    __m512 x = load_bf16(h + i, n);
    if (d != nullptr) {
      x = round_bf16x16(_mm512_add_ps(x, load_bf16(d + i, n)));
      store_bf16(h + i, x, n);
    }
    squares = _mm512_fmadd_ps(x, x, squares);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / float(dim) + eps));
  for (int64_t i = 0; i < dim; i += 16) {
    const int n = int(std::min<int64_t>(16, dim - i));
    const __m512 x = round_bf16x16(_mm512_mul_ps(load_bf16(h + i, n), inv));
    store_bf16(o + i, _mm512_mul_ps(load_bf16(w + i, n), x), n);
  }
}

TGI_AVX512 void silu_mul_row_avx512(const bf16* g, const bf16* u, bf16* o, int64_t count) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < count; i += 16) {
    const int n = int(std::min<int64_t>(16, count - i));
    const __m512 x = load_bf16(g + i, n);
    const __m512 silu = _mm512_div_ps(x, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    store_bf16(o + i, _mm512_mul_ps(round_bf16x16(silu), load_bf16(u + i, n)), n);
  }
}

TGI_AVX512 void rope_row_avx512(bf16* a, bf16* b, const bf16* c, const bf16* s, int64_t half) {
  for (int64_t i = 0; i < half; i += 16) {
    const int n = int(std::min<int64_t>(16, half - i));
    const __m512 x1 = load_bf16(a + i, n), x2 = load_bf16(b + i, n);
    const __m512 ci = load_bf16(c + i, n), si = load_bf16(s + i, n);
    store_bf16(a + i, _mm512_sub_ps(round_bf16x16(_mm512_mul_ps(x1, ci)),
                                    round_bf16x16(_mm512_mul_ps(x2, si))), n);
    store_bf16(b + i, _mm512_add_ps(round_bf16x16(_mm512_mul_ps(x2, ci)),
                                    round_bf16x16(_mm512_mul_ps(x1, si))), n);
  }
}
#endif

bool use_avx512() {
#if TGI_X86
  return tgi::has_avx512();
#else
  return false;
#endif
}

}  // namespace

extern "C" {

// hidden[t] += delta[t] (if delta), then out[t] = w * bf16(h * rsqrt(mean(h^2) + eps)),
// as HF's RMSNorm on the bf16 sum. Rows are `*_stride` elements apart. In every call
// `fast` picks the AVX-512 rows (the caller checks `tgi_ops_have_avx512`).
void tgi_add_rms_norm(int fast, void* hidden_, const void* delta_, const void* weight_, void* out_,
                      int64_t rows, int64_t dim, int64_t hidden_stride, int64_t delta_stride,
                      int64_t out_stride, float eps) {
  auto* hidden = static_cast<bf16*>(hidden_);
  const auto* delta = static_cast<const bf16*>(delta_);
  const auto* weight = static_cast<const bf16*>(weight_);
  auto* out = static_cast<bf16*>(out_);
  at::parallel_for(0, rows, grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      bf16* h = hidden + t * hidden_stride;
      const bf16* d = delta == nullptr ? nullptr : delta + t * delta_stride;
#if TGI_X86
      if (fast) {
        add_norm_row_avx512(h, d, weight, out + t * out_stride, dim, eps);
        continue;
      }
#endif
      add_norm_row(h, d, weight, out + t * out_stride, dim, eps);
    }
  });
}

// out[t] = bf16(bf16(silu(gate)) * up) for gate_up[t] = [gate (inter) | up (inter)].
void tgi_silu_mul(int fast, const void* gate_up_, void* out_, int64_t rows, int64_t inter,
                  int64_t in_stride, int64_t out_stride) {
  const auto* gate_up = static_cast<const bf16*>(gate_up_);
  auto* out = static_cast<bf16*>(out_);
  at::parallel_for(0, rows, grain(inter), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const bf16* g = gate_up + t * in_stride;
#if TGI_X86
      if (fast) {
        silu_mul_row_avx512(g, g + inter, out + t * out_stride, inter);
        continue;
      }
#endif
      silu_mul_row(g, g + inter, out + t * out_stride, inter);
    }
  });
}

// In place on x [rows, heads, dim] (token stride `stride`, heads contiguous), HF's
// rotate_half layout: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), each product and sum
// rounded as torch's bf16 ops round them. cos/sin: [rows, dim / 2] bf16.
void tgi_rope(int fast, void* x_, const void* cos_, const void* sin_, int64_t rows, int64_t heads,
              int64_t dim, int64_t stride) {
  auto* x = static_cast<bf16*>(x_);
  const auto* cos = static_cast<const bf16*>(cos_);
  const auto* sin = static_cast<const bf16*>(sin_);
  const int64_t half = dim / 2;
  at::parallel_for(0, rows, grain(heads * dim), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        bf16* a = x + t * stride + h * dim;
#if TGI_X86
        if (fast) {
          rope_row_avx512(a, a + half, cos + t * half, sin + t * half, half);
          continue;
        }
#endif
        rope_row(a, a + half, cos + t * half, sin + t * half, half);
      }
    }
  });
}

// Whether the AVX-512 rows can run here (`fast` = 1 then picks them).
int tgi_ops_have_avx512() { return use_avx512(); }

}  // extern "C"
