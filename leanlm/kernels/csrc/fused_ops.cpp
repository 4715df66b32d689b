// Small fused float32 ops for the decode step: each replaces several torch dispatches (and their temporary
// tensors) by one call, which matters when a token's whole layer runs in tens of microseconds.
//   rms_norm(x, weight, eps)  x / sqrt(mean(x^2) + eps) * weight over the last dimension
//   silu_mul(gate_up)         silu(gate) * up, where gate_up = [gate | up] along the last dimension
// Other dtypes and devices go to torch's own implementations.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>

namespace {

bool fast_path(const at::Tensor& x) { return x.device().is_cpu() && x.scalar_type() == at::kFloat; }

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (!fast_path(x) || !fast_path(weight)) {
    return at::rms_norm(x, {weight.size(0)}, weight, eps);
  }
  TORCH_CHECK(x.size(-1) == weight.size(0), "rms_norm: x has ", x.size(-1), " features, weight ", weight.size(0));
  const at::Tensor input = x.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty_like(input);
  const int64_t width = input.size(-1), rows = input.numel() / std::max<int64_t>(width, 1);
  const float* src = input.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = src + r * width;
      double squares = 0.0;  // double: a long row of large activations must not lose the small ones
      for (int64_t i = 0; i < width; ++i) squares += static_cast<double>(row[i]) * row[i];
      const float inverse = static_cast<float>(1.0 / std::sqrt(squares / width + eps));
      for (int64_t i = 0; i < width; ++i) dst[r * width + i] = row[i] * inverse * wp[i];
    }
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  const int64_t half = gate_up.size(-1) / 2;
  if (!fast_path(gate_up)) {
    const auto parts = gate_up.split(half, -1);
    return at::silu(parts[0]) * parts[1];
  }
  const at::Tensor input = gate_up.contiguous();
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = half;
  at::Tensor out = at::empty(shape, input.options());
  const int64_t rows = input.numel() / (2 * half);
  const float* src = input.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = src + r * 2 * half;
      const float* up = gate + half;
      for (int64_t i = 0; i < half; ++i) dst[r * half + i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanlm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanlm, CompositeExplicitAutograd, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
}
