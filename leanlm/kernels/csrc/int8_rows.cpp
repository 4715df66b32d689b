// Per-token int8 quantization of activation rows and the int32 -> float epilogue of an int8 GEMM (encoders'
// Int8DynamicLinear). Each does in one pass what the torch reference does in several, with the same float
// operations in the same order (built with -ffp-contract=off), so the results are the reference's bit for bit.
// Rows go to threads 64 at a time: a short text (a few rows) stays on one thread.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace leanlm_int8 {

// x (M, K) float32, inverse_smoothing (K) or none -> codes (M, K) int8 and scales (M, 1) float32:
// v = x * inverse_smoothing; scale = max(max|v|, 1e-12) / 127; code = clamp(round_half_even(v * (1 / scale))).
std::vector<at::Tensor> quantize_rows(const at::Tensor& x, const c10::optional<at::Tensor>& inverse_smoothing) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be (M, K) float32");
  const int64_t rows = x.size(0), cols = x.size(1);
  const float* smooth = nullptr;
  at::Tensor smoothing;
  if (inverse_smoothing.has_value()) {
    smoothing = inverse_smoothing->contiguous();
    TORCH_CHECK(smoothing.numel() == cols && smoothing.scalar_type() == at::kFloat, "smoothing must be (K) float32");
    smooth = smoothing.data_ptr<float>();
  }
  auto codes = at::empty({rows, cols}, x.options().dtype(at::kChar));
  auto scales = at::empty({rows, 1}, x.options());
  const float* in = x.data_ptr<float>();
  int8_t* out = codes.data_ptr<int8_t>();
  float* scale_out = scales.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> row(cols);
    for (int64_t m = begin; m < end; ++m) {
      const float* src = in + m * cols;
      // `omp simd` vectorizes the max reduction (exact in any order) and the rounding loop below.
      float* v = row.data();
      float largest = 0.f;
      if (smooth) {
#pragma omp simd reduction(max : largest)
        for (int64_t k = 0; k < cols; ++k) {
          v[k] = src[k] * smooth[k];
          const float a = std::fabs(v[k]);
          largest = a > largest ? a : largest;
        }
      } else {
#pragma omp simd reduction(max : largest)
        for (int64_t k = 0; k < cols; ++k) {
          v[k] = src[k];
          const float a = std::fabs(v[k]);
          largest = a > largest ? a : largest;
        }
      }
      const float scale = std::max(largest, 1e-12f) / 127.0f;
      const float inverse = 1.0f / scale;
      int8_t* dst = out + m * cols;
#pragma omp simd
      for (int64_t k = 0; k < cols; ++k) {
        // Adding and taking away 1.5 * 2^23 rounds half to even, as nearbyint does for |v| < 2^22 (here <= 127),
        // without a libm call per element, so the loop vectorizes.
        const float q = (v[k] * inverse + 12582912.0f) - 12582912.0f;
        const float clamped = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
        dst[k] = static_cast<int8_t>(static_cast<int32_t>(clamped));
      }
      scale_out[m] = scale;
    }
  });
  return {codes, scales};
}

// acc (M, N) int32, row_scales (M, 1), column_scales (N), bias (N) or none, residual (M, N) or none -> (M, N)
// float32: out = float(acc) * row_scale * column_scale + bias, then + residual (the encoder's x + W h, one pass).
at::Tensor scale_int32(const at::Tensor& acc, const at::Tensor& row_scales, const at::Tensor& column_scales,
                       const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == at::kInt, "acc must be (M, N) int32");
  const int64_t rows = acc.size(0), cols = acc.size(1);
  auto a = acc.contiguous();
  auto rs = row_scales.contiguous();
  auto cs = column_scales.contiguous();
  at::Tensor b, res;
  const float* bp = nullptr;
  const float* resp = nullptr;
  if (bias.has_value()) {
    b = bias->contiguous();
    bp = b.data_ptr<float>();
  }
  if (residual.has_value()) {
    res = residual->contiguous();
    TORCH_CHECK(res.scalar_type() == at::kFloat && res.numel() == rows * cols, "residual must be (M, N) float32");
    resp = res.data_ptr<float>();
  }
  auto out = at::empty({rows, cols}, acc.options().dtype(at::kFloat));
  const int32_t* ap = a.data_ptr<int32_t>();
  const float* rp = rs.data_ptr<float>();
  const float* cp = cs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int32_t* src = ap + m * cols;
      float* dst = op + m * cols;
      const float r = rp[m];
      if (bp) {
#pragma omp simd
        for (int64_t n = 0; n < cols; ++n) dst[n] = static_cast<float>(src[n]) * r * cp[n] + bp[n];
      } else {
#pragma omp simd
        for (int64_t n = 0; n < cols; ++n) dst[n] = static_cast<float>(src[n]) * r * cp[n];
      }
      if (resp) {
        const float* add = resp + m * cols;
#pragma omp simd
        for (int64_t n = 0; n < cols; ++n) dst[n] = dst[n] + add[n];
      }
    }
  });
  return out;
}

}  // namespace leanlm_int8

TORCH_LIBRARY(leanlm_int8, m) {
  m.def("quantize_rows(Tensor x, Tensor? inverse_smoothing) -> Tensor[]");
  m.def("scale_int32(Tensor acc, Tensor row_scales, Tensor column_scales, Tensor? bias, Tensor? residual=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanlm_int8, CPU, m) {
  m.impl("quantize_rows", &leanlm_int8::quantize_rows);
  m.impl("scale_int32", &leanlm_int8::scale_int32);
}
