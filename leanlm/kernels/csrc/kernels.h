// The ops of leanlm's kernel library, callable from C++ as well as through torch.ops.leanlm (see each .cpp).
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>

namespace leanlm {

constexpr int64_t kBlock = 32;
constexpr int64_t kRows = 8;  // rows interleaved per group = lanes of a float vector

// A packed weight (leanlm/kernels/layout.py), as raw pointers into its tensors.
struct Weights {
  const uint8_t* codes;  // (groups, blocks, 128 or 256)
  const void* scales;    // (groups, blocks, 8) float16 or float32; (groups, blocks, 16) when sub16
  const void* offsets;   // (groups, blocks, 8) like scales, or nullptr
  // K-quant super-blocks (GGUF Q4_K/Q5_K/Q6_K): when set, scales and offsets are int8 multipliers of these
  // float16 bases, one per 8 blocks (256 inputs): (groups, blocks / 8, 8). base * multiplier is exact in float32.
  const void* scale_base;
  const void* offset_base;
  int64_t rows, cols, groups, blocks;
  bool q4, half_params;
  bool sub16;  // two scales per block, for inputs 0-15 then 16-31 (GGUF Q6_K's sub-blocks); one offset
  // Bits a code is stored in: 4 (q4), 8 (q8), or 5 / 6 (packed: the q8 layout's slabs split into a nibble plane
  // and a 1- or 2-bit plane, codes stored as code + zero, zero = 0 or 2^(bits-1); quant_linear.cpp).
  int bits = 8;
  int zero = 0;
  int64_t block_bytes() const { return bits * 32; }
  // the 8 rows' parameters of block `at` (= group * blocks + block)
  // parameters number `index` (8 rows) of block `at`
  __m256 params(const void* base, int64_t index, const void* super_base, int64_t at) const {
    if (super_base) {
      const int8_t* multipliers = static_cast<const int8_t*>(base) + index * 8;
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(multipliers));
      const __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
      const auto* d = static_cast<const at::Half*>(super_base) + (at / 8) * 8;
      return _mm256_mul_ps(m, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d))));
    }
    if (half_params) {
      const auto* halves = static_cast<const at::Half*>(base) + index * 8;
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(halves)));
    }
    return _mm256_loadu_ps(static_cast<const float*>(base) + index * 8);
  }
  // half: 0 for inputs 0-15, 1 for 16-31 (the same scales unless sub16)
  __m256 scales_at(int64_t at, int half = 0) const {
    return params(scales, sub16 ? 2 * at + half : at, scale_base, at);
  }
  __m256 offsets_at(int64_t at) const { return offsets ? params(offsets, at, offset_base, at) : _mm256_setzero_ps(); }
};


// Checks the tensors of a packed weight and points a Weights at them (they must outlive it). The layout comes from
// the codes: 128 bytes a block q4, 256 q8, 160 / 192 packed 5 / 6-bit (an int8 tensor: signed codes, zero 2^(b-1)).
Weights check_weights(const at::Tensor& codes, const at::Tensor& scales, const c10::optional<at::Tensor>& offsets,
                      int64_t rows, bool q4, const c10::optional<at::Tensor>& scale_base = c10::nullopt,
                      const c10::optional<at::Tensor>& offset_base = c10::nullopt);
// out (m, groups * 8) = x (m, cols) W^T, padding rows included; the same arithmetic for every m and chunking.
// out_stride: floats from one output row to the next (0: groups * 8), for a weight held as row segments.
void matmul_into(const Weights& w, const float* x, int64_t m, float* out, bool int8_activations,
                 int64_t out_stride = 0);

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& offsets, const c10::optional<at::Tensor>& bias, int64_t rows,
                     bool int8_activations, const c10::optional<at::Tensor>& scale_base,
                     const c10::optional<at::Tensor>& offset_base);
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& offsets, const c10::optional<at::Tensor>& bias, int64_t rows,
                     bool int8_activations, const c10::optional<at::Tensor>& scale_base,
                     const c10::optional<at::Tensor>& offset_base);
at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scales, const c10::optional<at::Tensor>& offsets,
                      int64_t rows, const c10::optional<at::Tensor>& scale_base,
                      const c10::optional<at::Tensor>& offset_base);

// A 16-bit weight (half_linear.cpp): the checkpoint's (rows, cols) bfloat16 or float16 matrix as it is.
struct HalfWeights {
  const uint16_t* data;
  int64_t rows, cols;
  bool bf16;  // else float16
};
HalfWeights check_half_weights(const at::Tensor& weight);
// out (m, out_stride)[:, :rows] = x (m, cols) W^T in float32; a row's result is the same for every m.
// round_activations (bfloat16 weights only; kernel mode "auto"): x rounded to bfloat16 first, as vdpbf16ps reads it.
void half_matmul_into(const HalfWeights& w, const float* x, int64_t m, float* out, int64_t out_stride,
                      bool round_activations);
at::Tensor half_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       bool round_activations);

// exp of 8 floats (Cephes' polynomial, within 2 ulp of std::exp over float's normal range; inputs are clamped to
// +-88.38). Vectorized because libm's scalar exp dominated SiLU and softmax.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
  // x = n ln2 + r, |r| <= ln2 / 2, with ln2 split in two so that n * ln2 stays exact
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(power));  // * 2^n
}

// One row or one query of the fused ops below, for callers that own their buffers (decoder_stack.cpp).
void rms_norm_row(const float* row, const float* weight, float* out, int64_t width, double eps);
void silu_mul_row(const float* gate_up, float* out, int64_t half);
void rotary_row(const float* x, int64_t stride, const float* cos, const float* sin, float* out, int64_t dim);
// softmax(q k_j * scale) v over keys j = 0..last for `count` queries (q_stride floats apart) that share their keys
// (grouped-query attention): key j is row slots[j] of key0 (row j when slots is null); mask: true = may attend,
// or null. Each query's arithmetic is the same whatever count is. scores: count * (last + 1) floats of scratch.
void attend_queries(const float* q, int64_t q_stride, int64_t count, const float* key0, int64_t key_stride,
                    const float* value0, int64_t value_stride, int64_t last, const int64_t* slots, const bool* mask,
                    float scale, int64_t dim, float* scores, float* out, int64_t out_stride);

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale);

}  // namespace leanlm
