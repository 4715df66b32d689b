// Small fused float32 ops for the decode step: each replaces several torch dispatches (and their temporary
// tensors) by one call, which matters when a token's whole layer runs in tens of microseconds.
//   rms_norm(x, weight, eps)  x / sqrt(mean(x^2) + eps) * weight over the last dimension
//   silu_mul(gate_up)         silu(gate) * up, where gate_up = [gate | up] along the last dimension
//   rotary(x, cos, sin)       x * cos + rotate_half(x) * sin (RoPE, rotate-half layout), any strides of x
//   decode_attention(q, k, v, mask)  softmax(q k^T / sqrt(d)) v for ONE query per sequence, grouped-query
// Other dtypes and devices go to torch's own implementations.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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

// x: (B, H, T, D) with any strides (a view into the fused qkv projection); cos, sin: (B, 1, T, D).
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  if (!fast_path(x) || !fast_path(cos) || x.dim() != 4) {
    const int64_t half = x.size(-1) / 2;
    return x * cos + at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1) * sin;
  }
  const int64_t batch = x.size(0), heads = x.size(1), length = x.size(2), dim = x.size(3), half = dim / 2;
  const at::Tensor c = cos.expand({batch, 1, length, dim}).contiguous();
  const at::Tensor s = sin.expand({batch, 1, length, dim}).contiguous();
  at::Tensor out = at::empty({batch, heads, length, dim}, x.options());
  const auto xa = x.accessor<float, 4>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      for (int64_t t = 0; t < length; ++t) {
        const auto row = xa[b][h][t];
        const float* ct = cp + (b * length + t) * dim;
        const float* st = sp + (b * length + t) * dim;
        float* dst = op + ((b * heads + h) * length + t) * dim;
        for (int64_t i = 0; i < half; ++i) {
          dst[i] = row[i] * ct[i] - row[i + half] * st[i];
          dst[i + half] = row[i + half] * ct[i + half] + row[i] * st[i + half];
        }
      }
    }
  });
  return out;
}

// q: (B, H, 1, D); k, v: (B, H_kv, S, D) with any strides (slices of the cache); mask: (B, 1, 1, S) bool, True =
// may attend, or None. One query per sequence: scores, softmax and the weighted sum of values in one pass per
// head, where torch's SDPA spends most of its time setting up for such a small problem.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(fast_path(q) && fast_path(k) && fast_path(v) && q.dim() == 4 && q.size(2) == 1,
              "decode_attention: float32 CPU tensors with one query per sequence");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(3);
  const int64_t kv_heads = k.size(1), keys = k.size(2), group = heads / kv_heads;
  TORCH_CHECK(heads % kv_heads == 0 && k.size(0) == batch && v.sizes() == k.sizes() && k.size(3) == dim,
              "decode_attention: shapes of q, k and v disagree");
  at::Tensor mask_bool;
  if (mask.has_value()) mask_bool = mask->to(at::kBool).expand({batch, 1, 1, keys}).contiguous();
  const bool* mp = mask.has_value() ? mask_bool.data_ptr<bool>() : nullptr;
  at::Tensor out = at::empty({batch, heads, 1, dim}, q.options());
  const auto qa = q.accessor<float, 4>();
  const auto ka = k.accessor<float, 4>();
  const auto va = v.accessor<float, 4>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(keys);
    std::vector<float> acc(dim);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads, g = h / group;
      const auto query = qa[b][h][0];
      float best = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < keys; ++j) {
        if (mp && !mp[b * keys + j]) {
          scores[j] = -std::numeric_limits<float>::infinity();
          continue;
        }
        const auto key = ka[b][g][j];
        float dot = 0.f;
        for (int64_t d = 0; d < dim; ++d) dot += query[d] * key[d];
        scores[j] = dot * static_cast<float>(scale);
        best = std::max(best, scores[j]);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      float total = 0.f;
      for (int64_t j = 0; j < keys; ++j) {
        if (scores[j] == -std::numeric_limits<float>::infinity()) continue;
        const float p = std::exp(scores[j] - best);
        total += p;
        const auto value = va[b][g][j];
        for (int64_t d = 0; d < dim; ++d) acc[d] += p * value[d];
      }
      float* dst = op + bh * dim;
      for (int64_t d = 0; d < dim; ++d) dst[d] = acc[d] / total;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanlm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanlm, CompositeExplicitAutograd, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rotary", &rotary);
}

TORCH_LIBRARY_IMPL(leanlm, CPU, m) { m.impl("decode_attention", &decode_attention); }
