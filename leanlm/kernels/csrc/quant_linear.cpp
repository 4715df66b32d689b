// Weight-only quantized linear layers for x86 CPUs with AVX2, FMA and F16C (plus VNNI and AVX-512 where the
// CPU has them: the build is per machine).
//
// W[n, k] = code[n, k] * scale[n, k / 32] + offset[n, k / 32]: blocks of 32 inputs (GGUF's block size), one
// float16 scale (and offset) per block. q4 codes are 0..15 (2- and 3-bit codes fit too), q8 codes int8 (GGUF's
// 5- and 6-bit codes too). A weight may carry two scales per block (sub16: one per 16 inputs, as GGUF's Q6_K).
//
// Layout (written by leanlm/kernels/layout.py at load time): rows are taken 8 at a time and interleaved
// 4 inputs at a time, so one 32-byte load holds inputs 4c..4c+3 of 8 rows and an 8-lane vector holds
// 8 output rows. For one block of one group of 8 rows:
//   q4: 4 slabs of 32 bytes; slab j, byte 4r + i = code[r][4j + i] | code[r][16 + 4j + i] << 4
//   q8: 8 slabs of 32 bytes; slab c, byte 4r + i = code[r][4c + i]
//   scales, offsets: 8 float16 (or float32 when float16 would round them), one per row; sub16: 8 scales for
//   inputs 0-15, then 8 for inputs 16-31
//   packed 5/6-bit (codes of up to 6 bits: GGUF's Q5_0/Q5_1/Q5_K/Q6_K): the q8 slabs' codes + zero (0..2^bits-1) as
//   4 slabs of nibbles (slab j: slab j's low 4 bits, slab j + 4's in the high half) and 1 (5-bit) or 2 (6-bit)
//   slabs of upper bits (packed_slab below): 160 or 192 bytes where q8 takes 256. Decoded in registers to the
//   unsigned codes, they meet the int8 activations in the same dpbusd; the zero comes off the integer sums.
// With activations quantized to int8 per block (llama.cpp's approach), a slab times the 4 broadcast
// activation bytes is one maddubs (one dpbusd with VNNI): the 8 rows' dot products accumulate in integer lanes
// and are scaled once per block. With float activations (exact mode) each input is decoded to float and multiplied in float.
// Every batch size runs the same per-row arithmetic (a thread takes 8 output rows and runs all activation rows
// over them while their weights sit in L1), so a row's result never depends on what else is in the batch: the
// serving engine's greedy outputs are the same alone or batched.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace {

using leanlm::kBlock;
using leanlm::kRows;
using leanlm::Weights;
constexpr int64_t kBatchTile = 4;  // activation rows that share one decode of a block

inline __m256i broadcast4(const int8_t* p) {
  int32_t value;
  std::memcpy(&value, p, sizeof(value));
  return _mm256_set1_epi32(value);
}

// ---- int8 activations --------------------------------------------------------------------------------------

struct QuantizedActivations {
  std::vector<int8_t> codes;       // (M, K)
  std::vector<float> scales;       // (M, K / 32)
  std::vector<float> sums;         // (M, K / 32): sum of the unquantized x over each block, for the offsets
  std::vector<int32_t> code_sums;  // (M, K / 16): sum of the codes over each half block, for packed codes' zero
};

// x ~= codes * scale per block of 32, |error| <= scale / 2 = max|x| / 254.
QuantizedActivations quantize_activations(const float* src, int64_t rows, int64_t cols) {
  const int64_t blocks = cols / kBlock;
  QuantizedActivations q{std::vector<int8_t>(rows * cols), std::vector<float>(rows * blocks),
                         std::vector<float>(rows * blocks), std::vector<int32_t>(2 * rows * blocks)};
  for (int64_t i = 0; i < rows * blocks; ++i) {
    const float* block = src + i * kBlock;
    float amax = 0.f, sum = 0.f;
    for (int j = 0; j < kBlock; ++j) {
      amax = std::max(amax, std::abs(block[j]));
      sum += block[j];
    }
    const float scale = amax / 127.f, inverse = amax > 0.f ? 127.f / amax : 0.f;
    int32_t halves[2] = {0, 0};
    for (int j = 0; j < kBlock; ++j) {
      const int8_t code = static_cast<int8_t>(std::nearbyint(block[j] * inverse));
      q.codes[i * kBlock + j] = code;
      halves[j / 16] += code;
    }
    q.scales[i] = scale;
    q.sums[i] = sum;
    q.code_sums[2 * i] = halves[0];
    q.code_sums[2 * i + 1] = halves[1];
  }
  return q;
}

// Dot products of 8 rows with one block of activations, as 8 int32 lanes. Integer sums are exact, so the VNNI
// path (one dpbusd where AVX2 needs maddubs + add) gives the same bits as the AVX2 one.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
inline __m256i dot_u8_s8(__m256i sum, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(sum, u, s); }
#define LEANLM_VNNI 1
#elif defined(__AVXVNNI__)
inline __m256i dot_u8_s8(__m256i sum, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(sum, u, s); }
#define LEANLM_VNNI 1
#endif

// Packed 5- and 6-bit codes (layout.py): per block of 8 rows, 4 slabs of nibbles (byte k of slab j: the low 4
// bits of q8-slab j's byte k, and of slab j + 4's in the high half), then the upper bits: 6-bit, 2 slabs (slab h,
// bits 2k..2k+1: bits 4-5 of q8-slab h + 2k); 5-bit, 1 slab (bit c: bit 4 of q8-slab c). Decoding gives the
// unsigned code + zero of q8-slab c. 16-bit shifts are safe: every wanted bit stays in its byte, strays are masked.
template <int Bits>
inline __m256i packed_slab(const uint8_t* block, int c) {
  const __m256i nibbles = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * (c % 4)));
  const __m256i low = _mm256_and_si256(c < 4 ? nibbles : _mm256_srli_epi16(nibbles, 4), _mm256_set1_epi8(0x0F));
  const int field = Bits == 6 ? 2 * (c / 2) : c;  // where this slab's upper bits sit in their byte
  const uint8_t* upper_slab = block + 128 + 32 * (Bits == 6 ? c % 2 : 0);
  const __m256i upper = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(upper_slab));
  const __m256i moved = field <= 4 ? _mm256_slli_epi16(upper, 4 - field) : _mm256_srli_epi16(upper, field - 4);
  return _mm256_or_si256(low, _mm256_and_si256(moved, _mm256_set1_epi8(Bits == 6 ? 0x30 : 0x10)));
}

// A block of 8 rows decoded once into 8 vectors of unsigned bytes (q4: the nibbles of inputs 4j..4j+3 in u[2j]
// and of 16+4j.. in u[2j+1]; q8: |code| of inputs 4c..4c+3 in u[c], the codes themselves in sign[c]; packed 5/6:
// code + zero of inputs 4c..4c+3 in u[c], the zero taken off after the sum), then multiplied by every activation
// row of the tile: prefill and batched decoding decode each block once.
template <int Bits>
struct DecodedBlock {
  static constexpr bool Q4 = Bits == 4, Q8 = Bits == 8;
  __m256i u[8];
  __m256i sign[Q8 ? 8 : 1];

  explicit DecodedBlock(const uint8_t* block) {
    if constexpr (Q4) {
      const __m256i low_mask = _mm256_set1_epi8(0x0F);
      for (int j = 0; j < 4; ++j) {
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * j));
        u[2 * j] = _mm256_and_si256(packed, low_mask);
        u[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_mask);
      }
    } else if constexpr (Q8) {
      for (int c = 0; c < 8; ++c) {
        sign[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * c));
        u[c] = _mm256_sign_epi8(sign[c], sign[c]);  // both instructions multiply unsigned by signed bytes
      }
    } else {
      for (int c = 0; c < 8; ++c) u[c] = packed_slab<Bits>(block, c);
    }
  }

  // The 4 activation bytes that slab i multiplies, with q8's weight signs moved onto them.
  __m256i activations(const int8_t* x, int i) const {
    if constexpr (Q4) return broadcast4(x + (i % 2) * 16 + 4 * (i / 2));
    if constexpr (Q8) return _mm256_sign_epi8(broadcast4(x + 4 * i), sign[i]);
    return broadcast4(x + 4 * i);
  }

  // Dot products of the 8 rows with one block of activations, as 8 int32 lanes (packed: of code + zero).
  __m256i dot(const int8_t* x) const {
#ifdef LEANLM_VNNI
    // 4 independent chains: a chain of 8 dependent dpbusd (5 cycles each) would bound the whole kernel
    __m256i sums[4];
    for (int i = 0; i < 4; ++i) sums[i] = dot_u8_s8(_mm256_setzero_si256(), u[i], activations(x, i));
    for (int i = 4; i < 8; ++i) sums[i - 4] = dot_u8_s8(sums[i - 4], u[i], activations(x, i));
    return _mm256_add_epi32(_mm256_add_epi32(sums[0], sums[1]), _mm256_add_epi32(sums[2], sums[3]));
#else
    if constexpr (Q4) {
      __m256i sum16 = _mm256_setzero_si256();  // 8 x 2 products x 15 x 127 < 32767: int16 lanes never overflow
      for (int i = 0; i < 8; ++i) sum16 = _mm256_add_epi16(sum16, _mm256_maddubs_epi16(u[i], activations(x, i)));
      return _mm256_madd_epi16(sum16, _mm256_set1_epi16(1));
    }
    __m256i sum32 = _mm256_setzero_si256();  // 2 x 128 x 127 fits int16 once, not 8 times: widen every slab
    for (int i = 0; i < 8; ++i) {
      const __m256i products = _mm256_maddubs_epi16(u[i], activations(x, i));
      sum32 = _mm256_add_epi32(sum32, _mm256_madd_epi16(products, _mm256_set1_epi16(1)));
    }
    return sum32;
#endif
  }

  // Slab k (0-3) of half h: inputs 16 h + 4 k.. (q4 holds the halves in alternate slabs).
  static constexpr int half_slab(int h, int k) { return Q4 ? 2 * k + h : 4 * h + k; }

  // The dot products over inputs 0-15 and 16-31 apart, for sub16 scales.
  void dot_halves(const int8_t* x, __m256i& low, __m256i& high) const {
    __m256i halves[2];
    for (int h = 0; h < 2; ++h) {
#ifdef LEANLM_VNNI
      const int s0 = half_slab(h, 0), s1 = half_slab(h, 1), s2 = half_slab(h, 2), s3 = half_slab(h, 3);
      __m256i a = dot_u8_s8(_mm256_setzero_si256(), u[s0], activations(x, s0));
      __m256i b = dot_u8_s8(_mm256_setzero_si256(), u[s1], activations(x, s1));
      a = dot_u8_s8(a, u[s2], activations(x, s2));
      b = dot_u8_s8(b, u[s3], activations(x, s3));
      halves[h] = _mm256_add_epi32(a, b);
#else
      __m256i sum32 = _mm256_setzero_si256();
      for (int k = 0; k < 4; ++k) {
        const int i = half_slab(h, k);
        const __m256i products = _mm256_maddubs_epi16(u[i], activations(x, i));
        sum32 = _mm256_add_epi32(sum32, _mm256_madd_epi16(products, _mm256_set1_epi16(1)));
      }
      halves[h] = sum32;
#endif
    }
    low = halves[0];
    high = halves[1];
  }
};

// Packed codes are code + zero: sum (code + zero) x - zero sum x = sum code x, exactly in int32, so the integer
// dot products (and all that follows) are the q8 layout's bits.
template <int Bits, typename Vec>
inline Vec unzero(Vec dot, const Weights& w, int32_t code_sum) {
  if constexpr (Bits == 5 || Bits == 6) {
    if constexpr (std::is_same_v<Vec, __m256i>) return _mm256_sub_epi32(dot, _mm256_set1_epi32(w.zero * code_sum));
#ifdef __AVX512F__
    else return _mm512_sub_epi32(dot, _mm512_set1_epi32(w.zero * code_sum));
#endif
  }
  return dot;
}

template <int Tile, int Bits, bool Sub16>
void groups_int8(const Weights& w, const QuantizedActivations& xq, float* out, int64_t stride, int64_t m0,
                 int64_t g_begin, int64_t g_end) {
  const int8_t* x_codes = xq.codes.data();
  const float* x_scales = xq.scales.data();
  const float* x_sums = xq.sums.data();
  const int32_t* code_sums = xq.code_sums.data();
  for (int64_t g = g_begin; g < g_end; ++g) {
    __m256 acc[Tile];
    for (int t = 0; t < Tile; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < w.blocks; ++b) {
      const int64_t at = g * w.blocks + b;
      const DecodedBlock<Bits> block(w.codes + at * w.block_bytes());
      const __m256 scales = w.scales_at(at);
      const __m256 high_scales = w.scales_at(at, 1);
      const __m256 offsets = w.offsets_at(at);
      for (int t = 0; t < Tile; ++t) {
        const int64_t xb = (m0 + t) * w.blocks + b;
        const __m256 x_scale = _mm256_set1_ps(x_scales[xb]);
        if constexpr (Sub16) {
          __m256i low, high;
          block.dot_halves(x_codes + xb * kBlock, low, high);
          low = unzero<Bits>(low, w, code_sums[2 * xb]);
          high = unzero<Bits>(high, w, code_sums[2 * xb + 1]);
          acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(scales, x_scale), _mm256_cvtepi32_ps(low), acc[t]);
          acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(high_scales, x_scale), _mm256_cvtepi32_ps(high), acc[t]);
        } else {
          const __m256i dot =
              unzero<Bits>(block.dot(x_codes + xb * kBlock), w, code_sums[2 * xb] + code_sums[2 * xb + 1]);
          acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(scales, x_scale), _mm256_cvtepi32_ps(dot), acc[t]);
        }
        if (w.offsets) acc[t] = _mm256_fmadd_ps(offsets, _mm256_set1_ps(x_sums[xb]), acc[t]);
      }
    }
    for (int t = 0; t < Tile; ++t) _mm256_storeu_ps(out + (m0 + t) * stride + g * kRows, acc[t]);
  }
}

#if defined(LEANLM_VNNI) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VNNI__)
#define LEANLM_GROUP_PAIRS 1
// Two groups of 8 rows in one 512-bit vector: half the instructions of two 256-bit passes (the kernel is bound by
// issuing them once a batch has a few rows), the same operations per lane, so the same bits.
template <int Bits>
struct DecodedPair {
  static constexpr bool Q4 = Bits == 4, Q8 = Bits == 8;
  __m512i u[8];
  __m512i sign[Q8 ? 8 : 1];

  DecodedPair(const uint8_t* first, const uint8_t* second) {
    auto slab = [&](int offset) {
      const __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + offset));
      const __m256i high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(second + offset));
      return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
    };
    if constexpr (Q4) {
      const __m512i low_mask = _mm512_set1_epi8(0x0F);
      for (int j = 0; j < 4; ++j) {
        const __m512i packed = slab(32 * j);
        u[2 * j] = _mm512_and_si512(packed, low_mask);
        u[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_mask);
      }
    } else if constexpr (Q8) {
      for (int c = 0; c < 8; ++c) {
        sign[c] = slab(32 * c);
        u[c] = _mm512_abs_epi8(sign[c]);  // |-128| wraps to 0x80 = 128 unsigned, as sign_epi8 does
      }
    } else {  // packed_slab's decoding, 64 bytes at a time
      const __m512i low_mask = _mm512_set1_epi8(0x0F), high_mask = _mm512_set1_epi8(Bits == 6 ? 0x30 : 0x10);
      __m512i nibbles[4], upper[2];
      for (int j = 0; j < 4; ++j) nibbles[j] = slab(32 * j);
      for (int h = 0; h < (Bits == 6 ? 2 : 1); ++h) upper[h] = slab(128 + 32 * h);
      for (int c = 0; c < 8; ++c) {
        const __m512i low = _mm512_and_si512(c < 4 ? nibbles[c] : _mm512_srli_epi16(nibbles[c - 4], 4), low_mask);
        const int field = Bits == 6 ? 2 * (c / 2) : c;
        const __m512i source = upper[Bits == 6 ? c % 2 : 0];
        const __m512i moved =
            field <= 4 ? _mm512_slli_epi16(source, 4 - field) : _mm512_srli_epi16(source, field - 4);
        u[c] = _mm512_or_si512(low, _mm512_and_si512(moved, high_mask));
      }
    }
  }

  __m512i activations(const int8_t* x, int i) const {
    int32_t value;
    std::memcpy(&value, x + (Q4 ? (i % 2) * 16 + 4 * (i / 2) : 4 * i), sizeof(value));
    const __m512i a = _mm512_set1_epi32(value);
    if constexpr (!Q8) return a;
    // negate where the weight is negative (where it is zero, |w| = 0 zeroes the product anyway)
    return _mm512_mask_sub_epi8(a, _mm512_movepi8_mask(sign[i]), _mm512_setzero_si512(), a);
  }

  __m512i dot(const int8_t* x) const {
    __m512i sums[4];
    for (int i = 0; i < 4; ++i) sums[i] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[i], activations(x, i));
    for (int i = 4; i < 8; ++i) sums[i - 4] = _mm512_dpbusd_epi32(sums[i - 4], u[i], activations(x, i));
    return _mm512_add_epi32(_mm512_add_epi32(sums[0], sums[1]), _mm512_add_epi32(sums[2], sums[3]));
  }

  static constexpr int half_slab(int h, int k) { return Q4 ? 2 * k + h : 4 * h + k; }

  void dot_halves(const int8_t* x, __m512i& low, __m512i& high) const {
    __m512i halves[2];
    for (int h = 0; h < 2; ++h) {
      const int s0 = half_slab(h, 0), s1 = half_slab(h, 1), s2 = half_slab(h, 2), s3 = half_slab(h, 3);
      __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[s0], activations(x, s0));
      __m512i b = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[s1], activations(x, s1));
      a = _mm512_dpbusd_epi32(a, u[s2], activations(x, s2));
      b = _mm512_dpbusd_epi32(b, u[s3], activations(x, s3));
      halves[h] = _mm512_add_epi32(a, b);
    }
    low = halves[0];
    high = halves[1];
  }
};

inline __m512 pair_params(__m256 first, __m256 second) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(first), second, 1);
}

// groups g and g + 1 for activation rows m0..m0+Tile-1
template <int Tile, int Bits, bool Sub16>
void group_pair_int8(const Weights& w, const QuantizedActivations& xq, float* out, int64_t stride, int64_t m0,
                     int64_t g) {
  const int8_t* x_codes = xq.codes.data();
  const float* x_scales = xq.scales.data();
  const float* x_sums = xq.sums.data();
  const int32_t* code_sums = xq.code_sums.data();
  __m512 acc[Tile];
  for (int t = 0; t < Tile; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < w.blocks; ++b) {
    const int64_t at = g * w.blocks + b, next = at + w.blocks;
    const DecodedPair<Bits> block(w.codes + at * w.block_bytes(), w.codes + next * w.block_bytes());
    const __m512 scales = pair_params(w.scales_at(at), w.scales_at(next));
    const __m512 high_scales = pair_params(w.scales_at(at, 1), w.scales_at(next, 1));
    const __m512 offsets = pair_params(w.offsets_at(at), w.offsets_at(next));
    for (int t = 0; t < Tile; ++t) {
      const int64_t xb = (m0 + t) * w.blocks + b;
      const __m512 x_scale = _mm512_set1_ps(x_scales[xb]);
      if constexpr (Sub16) {
        __m512i low, high;
        block.dot_halves(x_codes + xb * kBlock, low, high);
        low = unzero<Bits>(low, w, code_sums[2 * xb]);
        high = unzero<Bits>(high, w, code_sums[2 * xb + 1]);
        acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(scales, x_scale), _mm512_cvtepi32_ps(low), acc[t]);
        acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(high_scales, x_scale), _mm512_cvtepi32_ps(high), acc[t]);
      } else {
        const __m512i dot =
            unzero<Bits>(block.dot(x_codes + xb * kBlock), w, code_sums[2 * xb] + code_sums[2 * xb + 1]);
        acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(scales, x_scale), _mm512_cvtepi32_ps(dot), acc[t]);
      }
      if (w.offsets) acc[t] = _mm512_fmadd_ps(offsets, _mm512_set1_ps(x_sums[xb]), acc[t]);
    }
  }
  for (int t = 0; t < Tile; ++t) _mm512_storeu_ps(out + (m0 + t) * stride + g * kRows, acc[t]);
}
#endif

// ---- float activations (exact up to float32 rounding) ------------------------------------------------------

// 8 rows' codes for inputs 4c + i, i = 0..3, from one slab of bytes (lane r = row r), as floats.
inline void slab_to_floats(__m256i bytes, bool is_signed, __m256 w[4]) {
  for (int i = 0; i < 4; ++i) {
    const __m256i moved = _mm256_slli_epi32(bytes, 24 - 8 * i);  // byte i to the top
    const __m256i value = is_signed ? _mm256_srai_epi32(moved, 24) : _mm256_srli_epi32(moved, 24);
    w[i] = _mm256_cvtepi32_ps(value);
  }
}

// Slab c of a q8 or packed block as the q8 layout's signed codes (packed: code + zero, less zero).
inline __m256i signed_slab(const Weights& w, const uint8_t* block, int c) {
  if (w.bits == 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * c));
  const __m256i u = w.bits == 6 ? packed_slab<6>(block, c) : packed_slab<5>(block, c);
  return _mm256_sub_epi8(u, _mm256_set1_epi8(static_cast<char>(w.zero)));
}

inline __m256 slab_dot(__m256i bytes, bool is_signed, const float* x) {
  __m256 w[4];
  slab_to_floats(bytes, is_signed, w);
  __m256 sum = _mm256_mul_ps(w[0], _mm256_set1_ps(x[0]));
  for (int i = 1; i < 4; ++i) sum = _mm256_fmadd_ps(w[i], _mm256_set1_ps(x[i]), sum);
  return sum;
}

// sum over one block of code * x for 8 rows, in float.
inline __m256 block_dot_float(const Weights& w, const uint8_t* block, const float* x) {
  __m256 sum = _mm256_setzero_ps();
  if (w.q4) {
    const __m256i low_mask = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 4; ++j) {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * j));
      sum = _mm256_add_ps(sum, slab_dot(_mm256_and_si256(packed, low_mask), false, x + 4 * j));
      sum = _mm256_add_ps(sum, slab_dot(_mm256_and_si256(_mm256_srli_epi16(packed, 4), low_mask), false,
                                        x + 16 + 4 * j));
    }
  } else {
    for (int c = 0; c < 8; ++c) sum = _mm256_add_ps(sum, slab_dot(signed_slab(w, block, c), true, x + 4 * c));
  }
  return sum;
}

// sub16: the sums over inputs 0-15 and 16-31 apart (q8: slabs 0-3 and 4-7; q4: low and high nibbles).
inline void block_dot_float_halves(const Weights& w, const uint8_t* block, const float* x, __m256& low,
                                   __m256& high) {
  __m256 halves[2];
  for (int h = 0; h < 2; ++h) {
    __m256 sum = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      if (w.q4) {  // nibbles of slab k: inputs 4k.. low, 16 + 4k.. high
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * k));
        const __m256i codes = _mm256_and_si256(h ? _mm256_srli_epi16(packed, 4) : packed, _mm256_set1_epi8(0x0F));
        sum = _mm256_add_ps(sum, slab_dot(codes, false, x + 16 * h + 4 * k));
      } else {
        const int c = 4 * h + k;
        sum = _mm256_add_ps(sum, slab_dot(signed_slab(w, block, c), true, x + 4 * c));
      }
    }
    halves[h] = sum;
  }
  low = halves[0];
  high = halves[1];
}

template <int Tile>
void groups_float(const Weights& w, const float* x, const float* x_sums, float* out, int64_t stride, int64_t m0,
                  int64_t g_begin, int64_t g_end) {
  for (int64_t g = g_begin; g < g_end; ++g) {
    __m256 acc[Tile];
    for (int t = 0; t < Tile; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < w.blocks; ++b) {
      const int64_t at = g * w.blocks + b;
      const uint8_t* block = w.codes + at * w.block_bytes();
      const __m256 scales = w.scales_at(at);
      const __m256 high_scales = w.scales_at(at, 1);
      const __m256 offsets = w.offsets_at(at);
      for (int t = 0; t < Tile; ++t) {
        const int64_t xb = (m0 + t) * w.blocks + b;
        if (w.sub16) {
          __m256 low, high;
          block_dot_float_halves(w, block, x + xb * kBlock, low, high);
          acc[t] = _mm256_fmadd_ps(scales, low, acc[t]);
          acc[t] = _mm256_fmadd_ps(high_scales, high, acc[t]);
        } else {
          acc[t] = _mm256_fmadd_ps(scales, block_dot_float(w, block, x + xb * kBlock), acc[t]);
        }
        if (w.offsets) acc[t] = _mm256_fmadd_ps(offsets, _mm256_set1_ps(x_sums[xb]), acc[t]);
      }
    }
    for (int t = 0; t < Tile; ++t) _mm256_storeu_ps(out + (m0 + t) * stride + g * kRows, acc[t]);
  }
}

// Sum of x over each block of 32 (the offsets' term), row by row in a fixed order.
std::vector<float> block_sums(const float* src, int64_t rows, int64_t cols) {
  const int64_t blocks = cols / kBlock;
  std::vector<float> sums(rows * blocks);
  for (int64_t i = 0; i < rows * blocks; ++i) {
    float sum = 0.f;
    for (int j = 0; j < kBlock; ++j) sum += src[i * kBlock + j];
    sums[i] = sum;
  }
  return sums;
}

}  // namespace

namespace leanlm {

void matmul_into(const Weights& w, const float* x, int64_t m_total, float* out, bool int8_activations,
                 int64_t out_stride) {
  const int64_t stride = out_stride ? out_stride : w.groups * kRows;
  // Enough groups per task that scheduling is noise, few enough that every thread gets work.
  const int64_t grain = std::max<int64_t>(4, w.groups / (4 * at::get_num_threads()));
  // Group by group, all activation rows of one group before the next: its weights are read from memory once.
  auto over_rows = [m_total](auto tile4, auto tile1, int64_t g) {
    int64_t m = 0;
    for (; m + kBatchTile <= m_total; m += kBatchTile) tile4(m, g);
    for (; m < m_total; ++m) tile1(m, g);
  };
  if (int8_activations) {
    const QuantizedActivations xq = quantize_activations(x, m_total, w.cols);
    auto run = [&](auto bits, auto sub16) {
      constexpr int Bits = decltype(bits)::value;  // the code width: 4, 5, 6 or 8
      constexpr bool S = decltype(sub16)::value;
#ifdef LEANLM_GROUP_PAIRS
      // Batches of a tile or more (prefill, serving) in units of two groups (the last alone when the count is
      // odd); a single row reads faster one group at a time. Both give the same bits.
      const int64_t units = m_total >= kBatchTile ? (w.groups + 1) / 2 : 0;
      at::parallel_for(0, units, std::max<int64_t>(1, grain / 2), [&](int64_t begin, int64_t end) {
        for (int64_t unit = begin; unit < end; ++unit) {
          const int64_t g = 2 * unit;
          if (g + 1 < w.groups) {
            over_rows(
                [&](int64_t m, int64_t gi) { group_pair_int8<kBatchTile, Bits, S>(w, xq, out, stride, m, gi); },
                [&](int64_t m, int64_t gi) { group_pair_int8<1, Bits, S>(w, xq, out, stride, m, gi); }, g);
          } else {
            over_rows(
                [&](int64_t m, int64_t gi) { groups_int8<kBatchTile, Bits, S>(w, xq, out, stride, m, gi, gi + 1); },
                [&](int64_t m, int64_t gi) { groups_int8<1, Bits, S>(w, xq, out, stride, m, gi, gi + 1); }, g);
          }
        }
      });
      if (units) return;
#endif
      at::parallel_for(0, w.groups, grain, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; ++g) {
          over_rows(
              [&](int64_t m, int64_t gi) { groups_int8<kBatchTile, Bits, S>(w, xq, out, stride, m, gi, gi + 1); },
              [&](int64_t m, int64_t gi) { groups_int8<1, Bits, S>(w, xq, out, stride, m, gi, gi + 1); }, g);
        }
      });
    };
    auto with_bits = [&](auto bits) {
      if (w.sub16) run(bits, std::true_type{});
      else run(bits, std::false_type{});
    };
    if (w.q4) with_bits(std::integral_constant<int, 4>{});
    else if (w.bits == 6) with_bits(std::integral_constant<int, 6>{});
    else if (w.bits == 5) with_bits(std::integral_constant<int, 5>{});
    else with_bits(std::integral_constant<int, 8>{});
  } else {
    const std::vector<float> sums = block_sums(x, m_total, w.cols);
    at::parallel_for(0, w.groups, grain, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        over_rows(
            [&](int64_t m, int64_t gi) { groups_float<kBatchTile>(w, x, sums.data(), out, stride, m, gi, gi + 1); },
            [&](int64_t m, int64_t gi) { groups_float<1>(w, x, sums.data(), out, stride, m, gi, gi + 1); }, g);
      }
    });
  }
}

}  // namespace leanlm

namespace {

// (M, K) float activations -> (M, groups * 8) float outputs; rows past w.rows are the layout's padding.
at::Tensor matvec(const Weights& w, const at::Tensor& x, bool int8_activations) {
  at::Tensor out = at::empty({x.size(0), w.groups * kRows}, x.options());
  leanlm::matmul_into(w, x.data_ptr<float>(), x.size(0), out.data_ptr<float>(), int8_activations);
  return out;
}

// W^T as a dense (K, rows) float32 tensor: 8 consecutive outputs of one input are one vector store.
at::Tensor dequantize_transposed(const Weights& w) {
  at::Tensor dense = at::empty({w.cols, w.groups * kRows}, at::TensorOptions().dtype(at::kFloat));
  float* dp = dense.data_ptr<float>();
  const int64_t stride = w.groups * kRows;
  at::parallel_for(0, w.groups, 4, [&](int64_t begin, int64_t end) {
    const __m256i low_mask = _mm256_set1_epi8(0x0F);
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t b = 0; b < w.blocks; ++b) {
        const int64_t at = g * w.blocks + b;
        const uint8_t* block = w.codes + at * w.block_bytes();
        const __m256 offsets = w.offsets_at(at);
        const int64_t column = b * kBlock * stride + g * kRows;  // input b * 32, output rows g * 8..
        auto store = [&](__m256i bytes, bool is_signed, int64_t first_input) {
          const __m256 scales = w.scales_at(at, first_input >= 16);
          __m256 values[4];
          slab_to_floats(bytes, is_signed, values);
          for (int i = 0; i < 4; ++i) {
            // multiply, then add (not fused): the same two roundings as QuantizedTensor.dequantize
            const __m256 weight = _mm256_add_ps(_mm256_mul_ps(values[i], scales), offsets);
            _mm256_storeu_ps(dp + column + (first_input + i) * stride, weight);
          }
        };
        for (int j = 0; j < (w.q4 ? 4 : 8); ++j) {
          if (w.q4) {
            const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * j));
            store(_mm256_and_si256(packed, low_mask), false, 4 * j);
            store(_mm256_and_si256(_mm256_srli_epi16(packed, 4), low_mask), false, 16 + 4 * j);
          } else {
            store(signed_slab(w, block, j), true, 4 * j);
          }
        }
      }
    }
  });
  return dense;
}

at::Tensor quantized_linear(const at::Tensor& x, const Weights& w, const c10::optional<at::Tensor>& bias,
                            bool int8_activations) {
  TORCH_CHECK(x.device().is_cpu(), "x must be on the CPU");
  TORCH_CHECK(x.size(-1) == w.cols, "x has ", x.size(-1), " features, the weight expects ", w.cols);
  const at::Tensor x2d = x.reshape({-1, w.cols});
  at::Tensor out = matvec(w, x2d.to(at::kFloat).contiguous(), int8_activations);
  if (x.scalar_type() != at::kFloat) out = out.to(x.scalar_type());
  if (out.size(1) != w.rows) out = out.narrow(1, 0, w.rows);
  if (bias.has_value()) out = out + bias->to(out.scalar_type());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.rows;
  return out.reshape(shape);
}

}  // namespace

namespace leanlm {

Weights check_weights(const at::Tensor& codes, const at::Tensor& scales, const c10::optional<at::Tensor>& offsets,
                      int64_t rows, bool q4, const c10::optional<at::Tensor>& scale_base,
                      const c10::optional<at::Tensor>& offset_base) {
  TORCH_CHECK(codes.device().is_cpu() && codes.is_contiguous() && codes.dim() == 3 &&
                  (codes.scalar_type() == at::kByte || codes.scalar_type() == at::kChar),
              "codes: a contiguous (groups, blocks, bytes) uint8 (or int8) CPU tensor from leanlm.kernels.layout");
  const int bits = static_cast<int>(codes.size(2) / 32);
  TORCH_CHECK(q4 ? bits == 4 : (bits == 5 || bits == 6 || bits == 8),
              "codes: ", q4 ? "128" : "256, 192 or 160", " bytes per block of 8 rows");
  TORCH_CHECK(codes.scalar_type() == at::kByte || bits == 5 || bits == 6,
              "codes: int8 codes mark packed signed 5- or 6-bit codes only");
  // packed codes are stored as code + zero: signed ones (an int8 tensor) from -2^(bits-1), unsigned ones from 0
  const int zero = codes.scalar_type() == at::kChar ? 1 << (bits - 1) : 0;
  const int64_t groups = codes.size(0), blocks = codes.size(1);
  TORCH_CHECK(rows > 0 && rows <= groups * kRows && rows > (groups - 1) * kRows, "rows does not match the layout");
  const bool half_params = scales.scalar_type() == at::kHalf;
  const bool sub16 = scales.dim() == 3 && scales.size(2) == 2 * kRows;
  const bool compact = scale_base.has_value();  // int8 multipliers of per-256 float16 bases
  TORCH_CHECK((compact ? scales.scalar_type() == at::kChar : half_params || scales.scalar_type() == at::kFloat) &&
                  scales.is_contiguous() &&
                  scales.sizes() == at::IntArrayRef({groups, blocks, sub16 ? 2 * kRows : kRows}),
              "scales: contiguous float16 or float32 (int8 with bases) (groups, blocks, 8), or (groups, blocks, 16) "
              "for sub16");
  auto check_base = [&](const at::Tensor& base) {
    TORCH_CHECK(blocks % 8 == 0 && base.scalar_type() == at::kHalf && base.is_contiguous() &&
                    base.sizes() == at::IntArrayRef({groups, blocks / 8, kRows}),
                "bases: contiguous float16 (groups, blocks / 8, 8), blocks a multiple of 8");
    return base.data_ptr();
  };
  const void* scale_base_ptr = compact ? check_base(*scale_base) : nullptr;
  const void* offset_ptr = nullptr;
  const void* offset_base_ptr = nullptr;
  if (offsets.has_value()) {
    TORCH_CHECK(offsets->scalar_type() == scales.scalar_type() && offsets->is_contiguous() &&
                    offsets->sizes() == at::IntArrayRef({groups, blocks, kRows}),
                "offsets must be (groups, blocks, 8) in the scales' dtype");
    TORCH_CHECK(compact == offset_base.has_value(), "offsets need bases exactly when scales have them");
    offset_ptr = offsets->data_ptr();
    if (compact) offset_base_ptr = check_base(*offset_base);
  }
  return Weights{static_cast<const uint8_t*>(codes.data_ptr()), scales.data_ptr(), offset_ptr, scale_base_ptr,
                 offset_base_ptr, rows, blocks * kBlock, groups, blocks, q4, half_params, sub16, bits, zero};
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& offsets, const c10::optional<at::Tensor>& bias, int64_t rows,
                     bool int8_activations, const c10::optional<at::Tensor>& scale_base,
                     const c10::optional<at::Tensor>& offset_base) {
  const Weights w = check_weights(codes, scales, offsets, rows, true, scale_base, offset_base);
  return quantized_linear(x, w, bias, int8_activations);
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& offsets, const c10::optional<at::Tensor>& bias, int64_t rows,
                     bool int8_activations, const c10::optional<at::Tensor>& scale_base,
                     const c10::optional<at::Tensor>& offset_base) {
  const Weights w = check_weights(codes, scales, offsets, rows, false, scale_base, offset_base);
  return quantized_linear(x, w, bias, int8_activations);
}

at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scales, const c10::optional<at::Tensor>& offsets,
                      int64_t rows, const c10::optional<at::Tensor>& scale_base,
                      const c10::optional<at::Tensor>& offset_base) {
  const Weights w = check_weights(codes, scales, offsets, rows, codes.size(2) == 128, scale_base, offset_base);
  return dequantize_transposed(w).narrow(1, 0, rows).t().contiguous();
}

}  // namespace leanlm

TORCH_LIBRARY(leanlm, m) {
  m.def(
      "q4_linear(Tensor x, Tensor codes, Tensor scales, Tensor? offsets, Tensor? bias, int rows, "
      "bool int8_activations, Tensor? scale_base=None, Tensor? offset_base=None) -> Tensor");
  m.def(
      "q8_linear(Tensor x, Tensor codes, Tensor scales, Tensor? offsets, Tensor? bias, int rows, "
      "bool int8_activations, Tensor? scale_base=None, Tensor? offset_base=None) -> Tensor");
  m.def(
      "dequantize(Tensor codes, Tensor scales, Tensor? offsets, int rows, Tensor? scale_base=None, "
      "Tensor? offset_base=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanlm, CPU, m) {
  m.impl("q4_linear", &leanlm::q4_linear);
  m.impl("q8_linear", &leanlm::q8_linear);
  m.impl("dequantize", &leanlm::dequantize);
}
