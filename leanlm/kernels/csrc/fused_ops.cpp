// Small fused float32 ops for the decode step: each replaces several torch dispatches (and their temporary
// tensors) by one call, which matters when a token's whole layer runs in tens of microseconds.
//   rms_norm(x, weight, eps)  x / sqrt(mean(x^2) + eps) * weight over the last dimension
//   silu_mul(gate_up)         silu(gate) * up, where gate_up = [gate | up] along the last dimension
//   rotary(x, cos, sin)       x * cos + rotate_half(x) * sin (RoPE, rotate-half layout), any strides of x
//   causal_attention(q, k, v, mask, scale)  softmax(q k^T * scale) v per query, causal or masked, grouped-query
// Other dtypes and devices go to torch's own implementations.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"

namespace {

bool fast_path(const at::Tensor& x) { return x.device().is_cpu() && x.scalar_type() == at::kFloat; }

// Four partial sums: one chain of dependent fmadds would make a query-key product latency-bound.
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int c = 0; c < 4; ++c)
      acc[c] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * c), _mm256_loadu_ps(b + i + 8 * c), acc[c]);
  for (int c = 0; i + 8 <= n; i += 8, ++c) acc[c] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc[c]);
  const __m256 sum8 = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  float total = _mm_cvtss_f32(sum);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// out[0..dim) = sum over the unmasked keys j, in order, of p[j] * value_j, for head dims of 8 * Chunks floats: the
// accumulator stays in registers (the generic loop below keeps it in memory; both round the same way).
template <int Chunks>
void weighted_values(const float* p, const float* value0, int64_t value_stride, const int64_t* slots,
                     const bool* mask, int64_t keys, float* out) {
  __m256 acc[Chunks];
  for (int c = 0; c < Chunks; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < keys; ++j) {
    if (mask && !mask[j]) continue;
    const float* value = value0 + (slots ? slots[j] : j) * value_stride;
    const __m256 weight = _mm256_set1_ps(p[j]);
    for (int c = 0; c < Chunks; ++c) acc[c] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(value + 8 * c), acc[c]);
  }
  for (int c = 0; c < Chunks; ++c) _mm256_storeu_ps(out + 8 * c, acc[c]);
}

void weighted_values_any(const float* p, const float* value0, int64_t value_stride, const int64_t* slots,
                         const bool* mask, int64_t keys, int64_t dim, float* out) {
  std::fill(out, out + dim, 0.f);
  for (int64_t j = 0; j < keys; ++j) {
    if (mask && !mask[j]) continue;
    const float* value = value0 + (slots ? slots[j] : j) * value_stride;
    const __m256 weight = _mm256_set1_ps(p[j]);
    int64_t d = 0;
    for (; d + 8 <= dim; d += 8)
      _mm256_storeu_ps(out + d, _mm256_fmadd_ps(weight, _mm256_loadu_ps(value + d), _mm256_loadu_ps(out + d)));
    for (; d < dim; ++d) out[d] += p[j] * value[d];
  }
}

}  // namespace

namespace leanlm {

void rms_norm_row(const float* row, const float* weight, float* out, int64_t width, double eps) {
  // double: a long row of large activations must not lose the small ones; 2 x 4 lanes, summed at the end
  __m256d sums[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
  int64_t i = 0;
  for (; i + 8 <= width; i += 8) {
    const __m256 x = _mm256_loadu_ps(row + i);
    const __m256d low = _mm256_cvtps_pd(_mm256_castps256_ps128(x)), high = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
    sums[0] = _mm256_fmadd_pd(low, low, sums[0]);
    sums[1] = _mm256_fmadd_pd(high, high, sums[1]);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(sums[0], sums[1]));
  double squares = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; i < width; ++i) squares += static_cast<double>(row[i]) * row[i];
  const float inverse = static_cast<float>(1.0 / std::sqrt(squares / width + eps));
  for (int64_t i = 0; i < width; ++i) out[i] = row[i] * inverse * weight[i];
}

void silu_mul_row(const float* gate_up, float* out, int64_t half) {
  const float* up = gate_up + half;
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= half; i += 8) {
    const __m256 gate = _mm256_loadu_ps(gate_up + i);
    const __m256 sigmoid_denominator = _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gate)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gate, sigmoid_denominator), _mm256_loadu_ps(up + i)));
  }
  for (; i < half; ++i) out[i] = gate_up[i] / (1.f + std::exp(-gate_up[i])) * up[i];
}

void rotary_row(const float* x, int64_t stride, const float* cos, const float* sin, float* out, int64_t dim) {
  const int64_t half = dim / 2;
  int64_t i = 0;
  if (stride == 1) {  // the usual case, 8 at a time; the same two products and one difference per element
    for (; i + 8 <= half; i += 8) {
      const __m256 first = _mm256_loadu_ps(x + i), second = _mm256_loadu_ps(x + i + half);
      _mm256_storeu_ps(out + i, _mm256_sub_ps(_mm256_mul_ps(first, _mm256_loadu_ps(cos + i)),
                                              _mm256_mul_ps(second, _mm256_loadu_ps(sin + i))));
      _mm256_storeu_ps(out + i + half, _mm256_add_ps(_mm256_mul_ps(second, _mm256_loadu_ps(cos + i + half)),
                                                     _mm256_mul_ps(first, _mm256_loadu_ps(sin + i + half))));
    }
  }
  for (; i < half; ++i) {
    const float first = x[i * stride], second = x[(i + half) * stride];
    out[i] = first * cos[i] - second * sin[i];
    out[i + half] = second * cos[i + half] + first * sin[i + half];
  }
}

void attend_queries(const float* q, int64_t q_stride, int64_t count, const float* key0, int64_t key_stride,
                    const float* value0, int64_t value_stride, int64_t last, const int64_t* slots, const bool* mask,
                    float scale, int64_t dim, float* scores, float* out, int64_t out_stride) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t keys = last + 1, full = keys - keys % 8;
  std::vector<float> best(count, kNegInf), total(count, 0.f);
  for (int64_t j = 0; j < keys; ++j) {  // every key is read once for all the queries
    const bool masked = mask && !mask[j];
    const float* key = key0 + (slots ? slots[j] : j) * key_stride;
    for (int64_t g = 0; g < count; ++g) {
      const float score = masked ? kNegInf : dot(q + g * q_stride, key, dim) * scale;
      scores[g * keys + j] = score;
      best[g] = std::max(best[g], score);
    }
  }
  // scores <- exp(scores - best), 8 at a time; masked keys get some value and are skipped below
  for (int64_t g = 0; g < count; ++g) {
    float* row = scores + g * keys;
    const __m256 shift = _mm256_set1_ps(best[g]);
    for (int64_t j = 0; j < full; j += 8) _mm256_storeu_ps(row + j, exp_ps(_mm256_sub_ps(_mm256_loadu_ps(row + j), shift)));
    if (full < keys) {
      float tail[8];
      std::fill(tail, tail + 8, best[g]);
      std::copy(row + full, row + keys, tail);
      _mm256_storeu_ps(tail, exp_ps(_mm256_sub_ps(_mm256_loadu_ps(tail), shift)));
      std::copy(tail, tail + (keys - full), row + full);
    }
    for (int64_t j = 0; j < keys; ++j)
      if (!(mask && !mask[j])) total[g] += row[j];
    float* dst = out + g * out_stride;
    if (dim == 64) weighted_values<8>(row, value0, value_stride, slots, mask, keys, dst);
    else if (dim == 128) weighted_values<16>(row, value0, value_stride, slots, mask, keys, dst);
    else weighted_values_any(row, value0, value_stride, slots, mask, keys, dim, dst);
  }
  for (int64_t g = 0; g < count; ++g) {
    const float inverse = total[g] > 0.f ? 1.f / total[g] : 0.f;
    for (int64_t d = 0; d < dim; ++d) out[g * out_stride + d] *= inverse;
  }
}

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
    for (int64_t r = begin; r < end; ++r) rms_norm_row(src + r * width, wp, dst + r * width, width, eps);
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
    for (int64_t r = begin; r < end; ++r) silu_mul_row(src + r * 2 * half, dst + r * half, half);
  });
  return out;
}

// x: (B, H, T, D) with any strides (a view into the fused qkv projection); cos, sin: (B, 1, T, D).
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  if (!fast_path(x) || !fast_path(cos) || x.dim() != 4) {
    const int64_t half = x.size(-1) / 2;
    return x * cos + at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1) * sin;
  }
  const int64_t batch = x.size(0), heads = x.size(1), length = x.size(2), dim = x.size(3);
  const at::Tensor c = cos.expand({batch, 1, length, dim}).contiguous();
  const at::Tensor s = sin.expand({batch, 1, length, dim}).contiguous();
  at::Tensor out = at::empty({batch, heads, length, dim}, x.options());
  const float* xp = x.data_ptr<float>();
  const int64_t xb = x.stride(0), xh = x.stride(1), xt = x.stride(2), xd = x.stride(3);
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      for (int64_t t = 0; t < length; ++t) {
        const int64_t at = (b * length + t) * dim;
        rotary_row(xp + b * xb + h * xh + t * xt, xd, cp + at, sp + at, op + ((b * heads + h) * length + t) * dim, dim);
      }
    }
  });
  return out;
}

// q: (B, H, T, D); k, v: (B, H_kv, S, D), any strides but a contiguous last dimension (slices of the cache);
// mask: (B, 1, T or 1, S) bool, True = may attend, or None for causal (query t sits at position S - T + t).
// Each query is computed on its own, over its keys in order: a query's result is the same bit for bit whether
// it runs in a prefill, a chunk of one, a decode step or a batch, which is what makes the engine's batching and
// chunked prefill lossless. For one query per sequence it is also far cheaper than SDPA's setup.
at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k_in, const at::Tensor& v_in,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(fast_path(q) && fast_path(k_in) && fast_path(v_in) && q.dim() == 4 && k_in.dim() == 4,
              "causal_attention: 4-D float32 CPU tensors");
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), keys = k.size(2), group = heads / kv_heads;
  TORCH_CHECK(heads % kv_heads == 0 && k.size(0) == batch && v.sizes() == k.sizes() && k.size(3) == dim &&
                  keys >= queries,
              "causal_attention: shapes of q, k and v disagree");
  at::Tensor allowed;
  if (mask.has_value()) allowed = mask->to(at::kBool).expand({batch, 1, queries, keys}).contiguous();
  const bool* mp = mask.has_value() ? allowed.data_ptr<bool>() : nullptr;
  const at::Tensor query = q.contiguous();
  at::Tensor out = at::empty({batch, heads, queries, dim}, q.options());
  const float* qp = query.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t kb = k.stride(0), kh = k.stride(1), ks = k.stride(2);
  const int64_t vb = v.stride(0), vh = v.stride(1), vs = v.stride(2);
  // One item = the queries of one KV head (a grouped-query group) at one position: they share its keys.
  at::parallel_for(0, batch * kv_heads * queries, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * keys);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (kv_heads * queries), kvh = item / queries % kv_heads, t = item % queries;
      const bool* row_mask = mp ? mp + (b * queries + t) * keys : nullptr;
      const int64_t last = mp ? keys - 1 : keys - queries + t;  // a mask replaces the causal rule, as in SDPA
      const int64_t first = ((b * heads + kvh * group) * queries + t) * dim;  // (B, H, T, D): heads T * D apart
      attend_queries(qp + first, queries * dim, group, kp + b * kb + kvh * kh, ks, vp + b * vb + kvh * vh, vs, last,
                     nullptr, row_mask, static_cast<float>(scale), dim, scores.data(), op + first, queries * dim);
    }
  });
  return out;
}

}  // namespace leanlm

TORCH_LIBRARY_FRAGMENT(leanlm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanlm, CompositeExplicitAutograd, m) {
  m.impl("rms_norm", &leanlm::rms_norm);
  m.impl("silu_mul", &leanlm::silu_mul);
  m.impl("rotary", &leanlm::rotary);
}

TORCH_LIBRARY_IMPL(leanlm, CPU, m) { m.impl("causal_attention", &leanlm::causal_attention); }
