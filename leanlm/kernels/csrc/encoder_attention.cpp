// Bidirectional attention of an encoder layer read straight from its fused q/k/v projection, for float32.
// torch's SDPA (flash kernel for CPU) splits a head into blocks sized for long sequences and runs small GEMMs
// per block; with head_dim 32 and short texts its overhead per head dominates (32 texts of 12 tokens: 0.85 ms
// a layer on 2 threads, slower than on 1). Here one thread takes whole (text, head) pairs: keys transposed into
// a local buffer so the scores vectorize over keys, a vectorizable exp, and the output written in (B, T, H)
// order, so the caller needs no permute or copy either.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace leanlm_encoder {

constexpr int64_t kLanes = 16;  // one AVX-512 register of float32 (two AVX2 ones)
constexpr int64_t kQueries = 4;

// exp(x) for x <= 0 (scores minus their maximum), relative error about 2e-7: Cephes' expf polynomial with the
// power of two built in the exponent bits, so `omp simd` loops vectorize it (libm's expf does not).
static inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2), half to even
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

// qkv (B, T, 3H) float32 as the fused projection writes it ([q heads | k heads | v heads] per token), key_mask
// (B, T) bool (true = a real key) or none -> softmax(q k^T / sqrt(d)) v, (B, T, H) float32.
at::Tensor attention(const at::Tensor& qkv, int64_t heads, const c10::optional<at::Tensor>& key_mask) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.scalar_type() == at::kFloat && qkv.is_contiguous(),
              "qkv must be contiguous (B, T, 3H) float32");
  const int64_t batch = qkv.size(0), tokens = qkv.size(1), width = qkv.size(2), hidden = width / 3;
  TORCH_CHECK(width % 3 == 0 && heads > 0 && hidden % heads == 0, "3H must split into q, k, v of `heads` heads");
  const int64_t dim = hidden / heads;
  at::Tensor mask;
  const bool* real = nullptr;
  if (key_mask.has_value()) {
    mask = key_mask->to(at::kBool).contiguous();
    TORCH_CHECK(mask.numel() == batch * tokens, "key_mask must be (B, T)");
    real = mask.data_ptr<bool>();
  }
  auto out = at::empty({batch, tokens, hidden}, qkv.options());
  const float* in = qkv.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  // About 32k multiply-adds per task at least, so a short text's few heads stay on one thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, tokens * tokens * dim));
  // Keys padded to whole 16-lane blocks: each block's 16 scores (and each 16 output channels) are summed in one
  // vector register across the head's channels (keys).
  const int64_t padded = (tokens + kLanes - 1) / kLanes * kLanes;
  const int64_t dim_blocks = dim % kLanes == 0 ? dim / kLanes : 0;  // 0: the output loop runs channel by channel
  at::parallel_for(0, batch * heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> keys_t(dim * padded), values(tokens * dim), scores(kQueries * padded), queries(kQueries * dim);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / heads, h = pair % heads;
      const float* text = in + b * tokens * width;
      int64_t keys = 0;  // the real keys, packed: keys_t (d, padded) and values (keys, d)
      for (int64_t j = 0; j < tokens; ++j) {
        if (real && !real[b * tokens + j]) continue;
        const float* k = text + j * width + hidden + h * dim;
        const float* v = k + hidden;
        for (int64_t c = 0; c < dim; ++c) {
          keys_t[c * padded + keys] = k[c];
          values[keys * dim + c] = v[c];
        }
        ++keys;
      }
      const int64_t key_blocks = (keys + kLanes - 1) / kLanes;
      for (int64_t c = 0; c < dim; ++c) std::fill(&keys_t[c * padded + keys], &keys_t[c * padded] + padded, 0.0f);
      if (keys == 0) {  // no real key (never from leanlm's batches): zeros rather than SDPA's NaN
        for (int64_t i = 0; i < tokens; ++i) {
          float* o = dst + (b * tokens + i) * hidden + h * dim;
          std::fill(o, o + dim, 0.0f);
        }
        continue;
      }
      // kQueries queries at a time: each loaded vector of keys (values) serves all of them.
      for (int64_t first = 0; first < tokens; first += kQueries) {
        const int64_t count = std::min<int64_t>(kQueries, tokens - first);
        for (int64_t r = 0; r < kQueries; ++r) {  // rows past the last query repeat it (computed, not stored)
          const float* q = text + (first + std::min(r, count - 1)) * width + h * dim;
          for (int64_t c = 0; c < dim; ++c) queries[r * dim + c] = q[c] * scale;
        }
        for (int64_t block = 0; block < key_blocks; ++block) {
          float lanes[kQueries][kLanes] = {};
          const float* kt = keys_t.data() + block * kLanes;
          for (int64_t c = 0; c < dim; ++c) {
#pragma GCC unroll 4
            for (int64_t r = 0; r < kQueries; ++r) {
              const float qc = queries[r * dim + c];
#pragma omp simd
              for (int64_t l = 0; l < kLanes; ++l) lanes[r][l] += qc * kt[c * padded + l];
            }
          }
          for (int64_t r = 0; r < kQueries; ++r) {
            std::memcpy(&scores[r * padded + block * kLanes], lanes[r], sizeof(lanes[r]));
          }
        }
        float inverse[kQueries];
        for (int64_t r = 0; r < kQueries; ++r) {
          float* s = scores.data() + r * padded;
          float largest = s[0];
          for (int64_t j = 1; j < keys; ++j) largest = s[j] > largest ? s[j] : largest;
          float total = 0.0f;
#pragma omp simd reduction(+ : total)
          for (int64_t j = 0; j < keys; ++j) {
            s[j] = exp_nonpositive(s[j] - largest);
            total += s[j];
          }
          inverse[r] = 1.0f / total;
        }
        for (int64_t block = 0; block < dim_blocks; ++block) {
          float lanes[kQueries][kLanes] = {};
          const float* v = values.data() + block * kLanes;
          for (int64_t j = 0; j < keys; ++j) {
#pragma GCC unroll 4
            for (int64_t r = 0; r < kQueries; ++r) {
              const float p = scores[r * padded + j];
#pragma omp simd
              for (int64_t l = 0; l < kLanes; ++l) lanes[r][l] += p * v[j * dim + l];
            }
          }
          for (int64_t r = 0; r < count; ++r) {
            float* o = dst + (b * tokens + first + r) * hidden + h * dim + block * kLanes;
#pragma omp simd
            for (int64_t l = 0; l < kLanes; ++l) o[l] = lanes[r][l] * inverse[r];
          }
        }
        for (int64_t r = 0; r < count; ++r) {
          float* o = dst + (b * tokens + first + r) * hidden + h * dim;
          for (int64_t c = dim_blocks * kLanes; c < dim; ++c) {
            float sum = 0.0f;
            for (int64_t j = 0; j < keys; ++j) sum += scores[r * padded + j] * values[j * dim + c];
            o[c] = sum * inverse[r];
          }
        }
      }
    }
  });
  return out;
}

}  // namespace leanlm_encoder

TORCH_LIBRARY(leanlm_encoder, m) { m.def("attention(Tensor qkv, int heads, Tensor? key_mask) -> Tensor"); }

TORCH_LIBRARY_IMPL(leanlm_encoder, CPU, m) { m.impl("attention", &leanlm_encoder::attention); }
