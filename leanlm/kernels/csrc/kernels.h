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
  const void* scales;    // (groups, blocks, 8) float16 or float32
  const void* offsets;   // like scales, or nullptr
  int64_t rows, cols, groups, blocks;
  bool q4, half_params;
  int64_t block_bytes() const { return q4 ? 128 : 256; }
  // the 8 rows' parameters of block `at` (= group * blocks + block)
  __m256 params(const void* base, int64_t at) const {
    if (half_params) {
      const auto* halves = static_cast<const at::Half*>(base) + at * 8;
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(halves)));
    }
    return _mm256_loadu_ps(static_cast<const float*>(base) + at * 8);
  }
  __m256 scales_at(int64_t at) const { return params(scales, at); }
  __m256 offsets_at(int64_t at) const { return offsets ? params(offsets, at) : _mm256_setzero_ps(); }
};


// Checks the tensors of a packed weight and points a Weights at them (they must outlive it).
Weights check_weights(const at::Tensor& codes, const at::Tensor& scales, const c10::optional<at::Tensor>& offsets,
                      int64_t rows, bool q4);
// out (m, groups * 8) = x (m, cols) W^T, padding rows included; the same arithmetic for every m and chunking.
void matmul_into(const Weights& w, const float* x, int64_t m, float* out, bool int8_activations);

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& offsets, const c10::optional<at::Tensor>& bias, int64_t rows,
                     bool int8_activations);
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias, int64_t rows, bool int8_activations);
at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scales, const c10::optional<at::Tensor>& offsets,
                      int64_t rows);

// One row or one query of the fused ops below, for callers that own their buffers (decoder_stack.cpp).
void rms_norm_row(const float* row, const float* weight, float* out, int64_t width, double eps);
void silu_mul_row(const float* gate_up, float* out, int64_t half);
void rotary_row(const float* x, int64_t stride, const float* cos, const float* sin, float* out, int64_t dim);
// softmax(q k_j * scale) v over keys j = 0..last, key j at row slots[j] of key0 (or row j when slots is null);
// mask: true = may attend, or null. scores: last + 1 floats of scratch.
void attend_query(const float* q, const float* key0, int64_t key_stride, const float* value0, int64_t value_stride,
                  int64_t last, const int64_t* slots, const bool* mask, float scale, int64_t dim, float* scores,
                  float* out);

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale);

}  // namespace leanlm
