// Matrix products on GGML quantized blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), AVX2 + FMA + F16C,
// for CPU decoding.
//
// A weight row of K values is K/32 blocks, stored exactly as in a GGUF file:
//   Q4_0: fp16 d, 16 bytes of nibbles                       w = d * (q - 8)
//   Q4_1: fp16 d, fp16 m, 16 bytes of nibbles               w = d * q + m
//   Q5_0: fp16 d, 4 bytes qh, 16 bytes of nibbles           w = d * (q - 16)
//   Q5_1: fp16 d, fp16 m, 4 bytes qh, 16 bytes of nibbles   w = d * q + m
//   Q8_0: fp16 d, 32 int8                                   w = d * q
// (nibble j of a block is element j in its low half and element j + 16 in its high half; bit j of the
// little-endian word qh is bit 4 of element j), or K/256 K-quant
// super-blocks of 8 sub-blocks of 32 (layouts in verse/ggml/reference.py, from llama.cpp's ggml-common.h):
//   Q4_K/Q5_K: sub-block s is a Q4_1-like block, w = (d sc_s) q - (dmin m_s), 6-bit sc_s, m_s;
//   Q6_K:      sub-block s is a Q8_0-like block of q - 32 with one scale d sc_t per 16 values.
// Decoding reads every weight once per token, so its speed is the bytes it reads: 0.56-1.06 bytes per
// weight here against 2 for bf16. As in llama.cpp, x is first rounded to 8 bits per block of 32
// (x ~= dx * xq), so each block is an integer dot product (maddubs/madd: 32 pairs in two instructions),
// scaled once; the offsets (m, -8d, -16d) use the block sums of x:
//   sum_j w_j x_j = d * dx * sum_j q_j xq_j + m * dx * sum_j xq_j.
// Up to MAX_ROWS rows of x share each block's unpacking. `dequantize` widens a weight to fp32 (prompts).
// torch has no CPU kernel for these layouts (its int4 kernel is a different packing and is dequant-bound
// on AVX2), hence this file.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t QK = 32;
constexpr int64_t MAX_ROWS = 4;
constexpr int64_t PREFETCH_BYTES = 3072;  // how far ahead of the current block to prefetch (measured: 2-4 KB best)
constexpr int64_t QK_K = 256;
enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

int64_t block_bytes(int64_t qtype) {
  switch (qtype) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q5_0: return 22;
    case Q5_1: return 24;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q5_K: return 176;
    case Q6_K: return 210;
  }
  TORCH_CHECK(false, "verse_ggml: unsupported GGML type ", qtype,
              " (supported: Q4_0=2, Q4_1=3, Q5_0=6, Q5_1=7, Q8_0=8, Q4_K=12, Q5_K=13, Q6_K=14)");
}

int64_t block_values(int64_t qtype) { return qtype == Q4_K || qtype == Q5_K || qtype == Q6_K ? QK_K : QK; }

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

template <int64_t QT>
constexpr int64_t BB = QT == Q4_0 ? 18 : QT == Q4_1 ? 20 : QT == Q5_0 ? 22 : QT == Q5_1 ? 24 : 34;

// Blocks whose fp16 minimum m follows d (w = d q + m), and the zero point z of the others (w = d (q - z)).
template <int64_t QT>
constexpr bool HAS_MIN = QT == Q4_1 || QT == Q5_1;
template <int64_t QT>
constexpr float ZERO = QT == Q4_0 ? 8.0f : QT == Q5_0 ? 16.0f : 0.0f;

// Byte i of the result is 0xff where bit i of the 32-bit word at p is set, else 0 (llama.cpp's bytes_from_bits_32).
inline __m256i bytes_from_bits(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  const __m256i spread = _mm256_shuffle_epi8(  // byte k of the word into bytes 8k..8k+7
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000));
  // byte i of this mask has every bit but i % 8 set: OR gives all ones exactly where that bit is set
  const __m256i others = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
  return _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1));
}

// The 32 quants of one block as bytes in x's element order (Q4: unsigned 0..15; Q5: 0..31; Q8_0: signed).
template <int64_t QT>
inline __m256i quant_bytes(const uint8_t* blk) {
  if constexpr (QT == Q8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
  } else {
    constexpr int64_t nibbles = QT == Q4_0 ? 2 : QT == Q4_1 ? 4 : QT == Q5_0 ? 6 : 8;
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + nibbles));
    const __m128i mask = _mm_set1_epi8(15);
    const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), _mm_and_si128(bytes, mask));
    if constexpr (QT == Q5_0 || QT == Q5_1)  // the fifth bits, from the 4 bytes before the nibbles
      return _mm256_or_si256(q, _mm256_and_si256(bytes_from_bits(blk + nibbles - 4), _mm256_set1_epi8(16)));
    return q;
  }
}

// One block: scale d, offset m (multiplies the block sum of x), and the 32 quants as fp32.
template <int64_t QT>
inline void unpack(const uint8_t* blk, float& d, float& m, __m256 q[4]) {
  d = half_at(blk);
  m = HAS_MIN<QT> ? half_at(blk + 2) : -ZERO<QT> * d;
  const __m256i bytes = quant_bytes<QT>(blk);
  const __m128i halves[2] = {_mm256_castsi256_si128(bytes), _mm256_extracti128_si256(bytes, 1)};
  for (int i = 0; i < 4; ++i) {
    const __m128i part = i & 1 ? _mm_srli_si128(halves[i >> 1], 8) : halves[i >> 1];
    q[i] = _mm256_cvtepi32_ps(QT == Q8_0 ? _mm256_cvtepi8_epi32(part) : _mm256_cvtepu8_epi32(part));
  }
}

// Eight int32 partial sums of quants(32 bytes) . xq(32 int8), as floats.
template <int64_t QT>
inline __m256 block_dot(__m256i q, const int8_t* xq) {
  __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  if constexpr (QT == Q8_0) {  // maddubs multiplies unsigned by signed: move q's sign onto x
    x = _mm256_sign_epi8(x, q);
    q = _mm256_sign_epi8(q, q);
  }
  const __m256i pairs = _mm256_maddubs_epi16(q, x);  // |q| <= 127, |x| <= 127: no 16-bit saturation
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// Rows of x rounded to 8 bits per block of 32 (as llama.cpp's Q8_0/Q8_1): x ~= dx * xq, dx = amax / 127.
// xs is dx * sum(xq), the block sum that the offsets (m, -8d, -16d) multiply.
void quantize_rows(const float* x, int64_t M, int64_t nb, int8_t* xq, float* dx, float* xs) {
  for (int64_t i = 0; i < M * nb; ++i) {
    const float* v = x + i * QK;
    float amax = 0.0f;
    for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float d = amax / 127.0f;
    int sum = 0;
    for (int j = 0; j < QK; ++j) {
      const int q = d == 0.0f ? 0 : static_cast<int>(std::nearbyint(v[j] / d));
      xq[i * QK + j] = static_cast<int8_t>(q);
      sum += q;
    }
    dx[i] = d;
    xs[i] = d * static_cast<float>(sum);
  }
}

// y[r, n0:n1] = W[n0:n1] . x[r] for r < M <= MAX_ROWS. Each weight block is unpacked once for every row;
// blocks go in pairs so that each row has two independent FMA chains.
template <int64_t QT>
void gemm_rows(const uint8_t* w, int64_t nb, const int8_t* xq, const float* dx, const float* xs, int64_t M,
               float* y, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * nb * BB<QT>;
    __m256 acc[MAX_ROWS][2];
    float off[MAX_ROWS];
    for (int64_t r = 0; r < M; ++r) {
      acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      off[r] = 0.0f;
    }
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = row + b * BB<QT>;
      _mm_prefetch(reinterpret_cast<const char*>(blk + PREFETCH_BYTES), _MM_HINT_T0);
      const float d = half_at(blk);
      const float m = HAS_MIN<QT> ? half_at(blk + 2) : -ZERO<QT> * d;
      const __m256i q = quant_bytes<QT>(blk);
      for (int64_t r = 0; r < M; ++r) {
        const int64_t i = r * nb + b;
        acc[r][b & 1] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx[i]), block_dot<QT>(q, xq + i * QK), acc[r][b & 1]);
        if constexpr (QT != Q8_0) off[r] += m * xs[i];
      }
    }
    for (int64_t r = 0; r < M; ++r) y[r * N + n] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) + off[r];
  }
}

// One row of x (decoding): the same sums as gemm_rows with M = 1, two blocks per iteration.
template <int64_t QT>
void gemv(const uint8_t* w, int64_t nb, const int8_t* xq, const float* dx, const float* xs, float* y, int64_t n0,
          int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * nb * BB<QT>;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float off0 = 0.0f, off1 = 0.0f;
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
      const uint8_t* b0 = row + b * BB<QT>;
      const uint8_t* b1 = b0 + BB<QT>;
      _mm_prefetch(reinterpret_cast<const char*>(b0 + PREFETCH_BYTES), _MM_HINT_T0);
      const float d0 = half_at(b0), d1 = half_at(b1);
      acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0 * dx[b]), block_dot<QT>(quant_bytes<QT>(b0), xq + b * QK), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1 * dx[b + 1]), block_dot<QT>(quant_bytes<QT>(b1), xq + (b + 1) * QK),
                             acc1);
      if constexpr (HAS_MIN<QT>) {
        off0 += half_at(b0 + 2) * xs[b];
        off1 += half_at(b1 + 2) * xs[b + 1];
      } else if constexpr (ZERO<QT> != 0.0f) {
        off0 += d0 * xs[b];
        off1 += d1 * xs[b + 1];
      }
    }
    if (b < nb) {
      const uint8_t* b0 = row + b * BB<QT>;
      const float d0 = half_at(b0);
      acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0 * dx[b]), block_dot<QT>(quant_bytes<QT>(b0), xq + b * QK), acc0);
      if constexpr (HAS_MIN<QT>) off0 += half_at(b0 + 2) * xs[b];
      if constexpr (ZERO<QT> != 0.0f) off0 += d0 * xs[b];
    }
    const float sum = hsum(_mm256_add_ps(acc0, acc1));
    y[n] = HAS_MIN<QT> ? sum + off0 + off1 : sum - ZERO<QT> * (off0 + off1);
  }
}

// ---- K-quants: a super-block of 256 values is 8 sub-blocks of 32, each multiplied like one 32-value block.

template <int64_t QT>
constexpr int64_t KB = QT == Q4_K ? 144 : QT == Q5_K ? 176 : 210;

// The 6-bit scales (bytes 0-7) and minimums (bytes 8-15) of a Q4_K/Q5_K super-block, unpacked from its 12
// bytes four at a time (llama.cpp's get_scale_min_k4 on 32-bit words).
inline void k_scales_bytes(const uint8_t* s, uint32_t u[4]) {
  constexpr uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, top2 = 0x03030303;
  std::memcpy(u, s, 12);
  u[3] = ((u[2] >> 4) & low4) | (((u[1] >> 6) & top2) << 4);  // m_4..7
  const uint32_t m = u[1] & low6;                              // m_0..3
  u[1] = (u[2] & low4) | (((u[0] >> 6) & top2) << 4);          // sc_4..7
  u[2] = m;
  u[0] &= low6;                                                // sc_0..3
}

// The 32 quants of sub-block s of a super-block as bytes in x's element order: Q4_K/Q5_K unsigned (0..31),
// Q6_K signed (q - 32).
template <int64_t QT>
inline __m256i k_quant_bytes(const uint8_t* blk, int s) {
  const __m256i m4 = _mm256_set1_epi8(15);
  if constexpr (QT == Q6_K) {  // ql: nibble (s/2)%2 of bytes 64(s/4) + 32(s%2) on; qh: bits 2(s%4) of 32(s/4) on
    const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * (s >> 2) + 32 * (s & 1)));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * (s >> 2)));
    const __m256i lo = _mm256_and_si256(_mm256_srl_epi16(ql, _mm_cvtsi32_si128(4 * ((s >> 1) & 1))), m4);
    const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * (s & 3))), _mm256_set1_epi8(3));
    return _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32));
  } else {
    const uint8_t* qs = blk + (QT == Q5_K ? 48 : 16) + 32 * (s >> 1);
    __m256i q = _mm256_and_si256(
        _mm256_srl_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs)), _mm_cvtsi32_si128(4 * (s & 1))), m4);
    if constexpr (QT == Q5_K) {  // bit s of qh[j] is bit 4 of element j
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16));
      const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(s)), _mm256_set1_epi8(1));
      q = _mm256_or_si256(q, _mm256_slli_epi16(bit, 4));
    }
    return q;
  }
}

inline __m256 bytes8_ps(const void* p, bool is_signed) {  // 8 bytes -> 8 floats
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
}

// y[r, n0:n1] = W[n0:n1] . x[r] for R rows of x (1 <= R <= MAX_ROWS), W in K-quant super-blocks. Sub-block s
// is an integer dot of its quants with the rounded x (Q6_K: the two 16-value halves weighted by their int8
// scales in the same madd), scaled by d sc_s dx (Q6_K: d dx); Q4_K/Q5_K subtract dmin m_s times the block sum
// of x. The per-sub-block factors of a super-block are computed 8 at a time; each super-block is unpacked once
// for every row, and even/odd sub-blocks go to two accumulators per row.
template <int64_t QT, int64_t R>
void k_rows(const uint8_t* w, int64_t nb, const int8_t* xq, const float* dx, const float* xs, float* y, int64_t N,
            int64_t n0, int64_t n1) {
  const int64_t nsb = nb / 8;
  const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * nsb * KB<QT>;
    __m256 acc[R][2], offset[R];
    for (int64_t r = 0; r < R; ++r) acc[r][0] = acc[r][1] = offset[r] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < nsb; ++sb) {
      const uint8_t* blk = row + sb * KB<QT>;
      for (int64_t p = 0; p < KB<QT>; p += 64)
        _mm_prefetch(reinterpret_cast<const char*>(blk + PREFETCH_BYTES + p), _MM_HINT_T0);
      alignas(32) float scale[R][8];  // the float factor of sub-block s for row r
      const int64_t i0 = sb * 8;
      // int8 quants of sub-block s, and the int16 weights of its products in the madd
      auto dot = [&](const __m256i q, const __m256i weights, int64_t r, int s) {
        __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (r * nb + i0 + s) * QK));
        __m256i u = q;
        if constexpr (QT == Q6_K) {  // maddubs multiplies unsigned by signed: move q's sign onto x
          x = _mm256_sign_epi8(x, q);
          u = _mm256_sign_epi8(q, q);
        }
        const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), weights);
        acc[r][s & 1] = _mm256_fmadd_ps(_mm256_broadcast_ss(&scale[r][s]), _mm256_cvtepi32_ps(sums), acc[r][s & 1]);
      };
      if constexpr (QT == Q6_K) {
        const __m256 d = _mm256_set1_ps(half_at(blk + 208));
        for (int64_t r = 0; r < R; ++r) _mm256_store_ps(scale[r], _mm256_mul_ps(d, _mm256_loadu_ps(dx + r * nb + i0)));
        // the 16 int8 scales as int16; sub-block s weighs its lanes 0-3 by scale 2s, lanes 4-7 by 2s + 1
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)));
        const __m256i pick = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                              2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
        const __m256i m2 = _mm256_set1_epi8(0x30), m32 = _mm256_set1_epi8(32);
        for (int h = 0; h < 2; ++h) {  // 128 values: ql 64 bytes, qh 32 bytes, sub-blocks 4h..4h+3
          const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * h));
          const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * h + 32));
          const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h));
          auto sub = [&](int s, __m256i low, __m256i high) {  // quants 0..63 from their low 4 and high 2 bits
            const __m256i q6 = _mm256_or_si256(_mm256_and_si256(low, m4), _mm256_and_si256(high, m2));
            const __m256i q = _mm256_sub_epi8(q6, m32);
            const __m256i weights = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(sc16, _mm256_set1_epi32(s)), pick);
            for (int64_t r = 0; r < R; ++r) dot(q, weights, r, s);
          };
          sub(4 * h, ql0, _mm256_slli_epi16(qh, 4));
          sub(4 * h + 1, ql1, _mm256_slli_epi16(qh, 2));
          sub(4 * h + 2, _mm256_srli_epi16(ql0, 4), qh);
          sub(4 * h + 3, _mm256_srli_epi16(ql1, 4), _mm256_srli_epi16(qh, 2));
        }
      } else {
        uint32_t u[4];
        k_scales_bytes(blk + 4, u);
        const __m256 d = _mm256_mul_ps(_mm256_set1_ps(half_at(blk)), bytes8_ps(u, false));
        const __m256 dmin = _mm256_mul_ps(_mm256_set1_ps(half_at(blk + 2)), bytes8_ps(u + 2, false));
        for (int64_t r = 0; r < R; ++r) {
          _mm256_store_ps(scale[r], _mm256_mul_ps(d, _mm256_loadu_ps(dx + r * nb + i0)));
          offset[r] = _mm256_fmadd_ps(dmin, _mm256_loadu_ps(xs + r * nb + i0), offset[r]);
        }
        __m256i qh = _mm256_setzero_si256();
        if constexpr (QT == Q5_K) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16));
        const uint8_t* qs = blk + (QT == Q5_K ? 48 : 16);
        const __m256i bit4 = _mm256_set1_epi8(16);
        for (int j = 0; j < 4; ++j) {  // 32 bytes: sub-block 2j in the low nibbles, 2j + 1 in the high ones
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * j));
          __m256i q0 = _mm256_and_si256(raw, m4), q1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
          if constexpr (QT == Q5_K) {  // bit s of qh[i] is bit 4 of element i of sub-block s
            q0 = _mm256_or_si256(q0, _mm256_and_si256(_mm256_slli_epi16(qh, 4), bit4));
            q1 = _mm256_or_si256(q1, _mm256_and_si256(_mm256_slli_epi16(qh, 3), bit4));
            qh = _mm256_srli_epi16(qh, 2);
          }
          for (int64_t r = 0; r < R; ++r) {
            dot(q0, ones, r, 2 * j);
            dot(q1, ones, r, 2 * j + 1);
          }
        }
      }
    }
    for (int64_t r = 0; r < R; ++r)
      y[r * N + n] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) - hsum(offset[r]);
  }
}

template <int64_t QT>
void k_weight_rows(const uint8_t* w, int64_t nb, const int8_t* xq, const float* dx, const float* xs, int64_t rows,
                   float* y, int64_t N, int64_t n0, int64_t n1) {
  switch (rows) {
    case 1: k_rows<QT, 1>(w, nb, xq, dx, xs, y, N, n0, n1); break;
    case 2: k_rows<QT, 2>(w, nb, xq, dx, xs, y, N, n0, n1); break;
    case 3: k_rows<QT, 3>(w, nb, xq, dx, xs, y, N, n0, n1); break;
    default: k_rows<QT, MAX_ROWS>(w, nb, xq, dx, xs, y, N, n0, n1);
  }
}

// Super-blocks -> float32, 256 values each (prompts widen the weight once).
template <int64_t QT>
void k_dequantize_impl(const uint8_t* w, int64_t nsb, float* out, int64_t N) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t i = n0 * nsb; i < n1 * nsb; ++i) {
      const uint8_t* blk = w + i * KB<QT>;
      float* dst = out + i * QK_K;
      float scale[16], minimum[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if constexpr (QT == Q6_K) {
        const float d = half_at(blk + 208);
        for (int t = 0; t < 16; ++t) scale[t] = d * reinterpret_cast<const int8_t*>(blk + 192)[t];
      } else {
        const float d = half_at(blk), dmin = half_at(blk + 2);
        uint32_t u[4];
        k_scales_bytes(blk + 4, u);
        const uint8_t* sc = reinterpret_cast<const uint8_t*>(u);
        for (int s = 0; s < 8; ++s) {
          scale[2 * s] = scale[2 * s + 1] = d * static_cast<float>(sc[s]);
          minimum[s] = dmin * static_cast<float>(sc[8 + s]);
        }
      }
      for (int s = 0; s < 8; ++s) {
        alignas(32) int8_t q[32];
        _mm256_store_si256(reinterpret_cast<__m256i*>(q), k_quant_bytes<QT>(blk, s));
        for (int j = 0; j < 32; ++j) {
          const float v = QT == Q6_K ? static_cast<float>(q[j]) : static_cast<float>(static_cast<uint8_t>(q[j]));
          dst[32 * s + j] = scale[2 * s + j / 16] * v - minimum[s];
        }
      }
    }
  });
}

// One weight of a product: its blocks, type, rows, first row in the joint row range, and output [M, N].
struct Weight {
  const uint8_t* blocks;
  int64_t qtype, N, row0;
  float* y;
};

// Rows n0..n1 of one weight for `rows` (<= MAX_ROWS) rows of quantized x.
void weight_rows(const Weight& W, int64_t nb, const int8_t* xq, const float* dx, const float* xs, int64_t rows,
                 float* y, int64_t n0, int64_t n1) {
#define VERSE_GGML_ROWS(QT)                                                          \
  if (rows == 1)                                                                   \
    gemv<QT>(W.blocks, nb, xq, dx, xs, y, n0, n1);                                  \
  else                                                                              \
    gemm_rows<QT>(W.blocks, nb, xq, dx, xs, rows, y, W.N, n0, n1);
  switch (W.qtype) {
    case Q4_0: VERSE_GGML_ROWS(Q4_0) break;
    case Q4_1: VERSE_GGML_ROWS(Q4_1) break;
    case Q5_0: VERSE_GGML_ROWS(Q5_0) break;
    case Q5_1: VERSE_GGML_ROWS(Q5_1) break;
    case Q4_K: k_weight_rows<Q4_K>(W.blocks, nb, xq, dx, xs, rows, y, W.N, n0, n1); break;
    case Q5_K: k_weight_rows<Q5_K>(W.blocks, nb, xq, dx, xs, rows, y, W.N, n0, n1); break;
    case Q6_K: k_weight_rows<Q6_K>(W.blocks, nb, xq, dx, xs, rows, y, W.N, n0, n1); break;
    default: VERSE_GGML_ROWS(Q8_0)
  }
#undef VERSE_GGML_ROWS
}

template <int64_t QT>
void dequantize_impl(const uint8_t* w, int64_t nb, float* out, int64_t N) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t b = 0; b < nb; ++b) {
        float d, m;
        __m256 q[4];
        unpack<QT>(w + (n * nb + b) * BB<QT>, d, m, q);
        const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
        float* dst = out + (n * nb + b) * QK;
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(dst + 8 * i, _mm256_fmadd_ps(dv, q[i], mv));
      }
    }
  });
}

void check_blocks(const at::Tensor& blocks, int64_t qtype) {
  TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == at::kByte && blocks.dim() == 2 &&
              blocks.is_contiguous(), "verse_ggml: blocks must be a contiguous CPU uint8 [N, K/32 * block bytes]");
  TORCH_CHECK(blocks.size(1) % block_bytes(qtype) == 0, "verse_ggml: row of ", blocks.size(1),
              " bytes is not a whole number of blocks");
}

// x [M, K] float32 times each GGML weight `blocks[i]` [N_i, K / block values * block bytes]^T -> [M, N_i] float32.
// Several weights that share x (a layer's query/key/value, gate/up) go in one call: x is rounded once, and one
// parallel loop covers all their rows.
std::vector<at::Tensor> gemm(const at::Tensor& x_in, at::TensorList blocks, at::IntArrayRef qtypes) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2,
              "verse_ggml: x must be a CPU float32 [M, K]");
  TORCH_CHECK(blocks.size() == qtypes.size() && !blocks.empty(), "verse_ggml: one qtype per weight");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), nb = K / QK;
  std::vector<at::Tensor> out;
  std::vector<Weight> weights;
  int64_t rows_total = 0;
  for (size_t i = 0; i < blocks.size(); ++i) {
    check_blocks(blocks[i], qtypes[i]);
    const int64_t features = blocks[i].size(1) / block_bytes(qtypes[i]) * block_values(qtypes[i]);
    TORCH_CHECK(features == K, "verse_ggml: x has ", K, " features, weight ", i, " has ", features);
    out.push_back(at::empty({M, blocks[i].size(0)}, x.options()));
    weights.push_back({blocks[i].data_ptr<uint8_t>(), qtypes[i], blocks[i].size(0), rows_total,
                       out.back().data_ptr<float>()});
    rows_total += blocks[i].size(0);
  }
  // the rounded x lives in per-thread scratch: decoding calls this ~100 times per token
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> scales;
  xq.resize(M * K);
  scales.resize(2 * M * nb);
  const int8_t* q = xq.data();
  const float *d = scales.data(), *sp = scales.data() + M * nb;
  quantize_rows(x.data_ptr<float>(), M, nb, xq.data(), scales.data(), scales.data() + M * nb);
  for (int64_t r0 = 0; r0 < M; r0 += MAX_ROWS) {
    const int64_t rows = std::min(MAX_ROWS, M - r0), i0 = r0 * nb;
    at::parallel_for(0, rows_total, 16, [&](int64_t a, int64_t b) {
      for (const Weight& W : weights) {
        const int64_t n0 = std::max(a, W.row0) - W.row0, n1 = std::min(b, W.row0 + W.N) - W.row0;
        if (n0 < n1) weight_rows(W, nb, q + i0 * QK, d + i0, sp + i0, rows, W.y + r0 * W.N, n0, n1);
      }
    });
  }
  return out;
}

// The weight as float32 [N, K] (for long prompts, where a dense GEMM on the widened weight is faster).
at::Tensor dequantize(const at::Tensor& blocks, int64_t qtype) {
  check_blocks(blocks, qtype);
  const int64_t N = blocks.size(0), nb = blocks.size(1) / block_bytes(qtype);
  at::Tensor out = at::empty({N, nb * block_values(qtype)}, blocks.options().dtype(at::kFloat));
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  switch (qtype) {
    case Q4_0: dequantize_impl<Q4_0>(w, nb, out.data_ptr<float>(), N); break;
    case Q4_1: dequantize_impl<Q4_1>(w, nb, out.data_ptr<float>(), N); break;
    case Q5_0: dequantize_impl<Q5_0>(w, nb, out.data_ptr<float>(), N); break;
    case Q5_1: dequantize_impl<Q5_1>(w, nb, out.data_ptr<float>(), N); break;
    case Q4_K: k_dequantize_impl<Q4_K>(w, nb, out.data_ptr<float>(), N); break;
    case Q5_K: k_dequantize_impl<Q5_K>(w, nb, out.data_ptr<float>(), N); break;
    case Q6_K: k_dequantize_impl<Q6_K>(w, nb, out.data_ptr<float>(), N); break;
    default: dequantize_impl<Q8_0>(w, nb, out.data_ptr<float>(), N);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(verse_ggml, m) {
  m.def("gemm(Tensor x, Tensor[] blocks, int[] qtypes) -> Tensor[]");
  m.def("dequantize(Tensor blocks, int qtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(verse_ggml, CPU, m) {
  m.impl("gemm", &gemm);
  m.impl("dequantize", &dequantize);
}
