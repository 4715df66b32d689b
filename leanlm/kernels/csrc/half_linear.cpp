// 16-bit weights (bfloat16 or float16, the checkpoint's own row-major (rows, cols) matrix, no repacking) times
// float32 activations, accumulated in float32: out = x W^T.
//
// Each weight is converted exactly to float32 in registers (bfloat16: widen and shift left 16; float16: F16C's
// vcvtph2ps), so the result is the float32 dot product up to summation order; the activations are never rounded.
// One (activation row, weight row) pair always runs the same arithmetic: lane-wise FMAs over the inputs, 16 lanes
// at a time (one AVX-512 register or two AVX2 ones), in two chains (chunk c of 16 inputs into chain c mod 2), a
// zero-padded tail, then chain 0 + chain 1 and one fixed horizontal sum: the same bits in the AVX2 and the native
// build. Tiles (several weight rows times several activation rows, so a decoded weight vector serves many rows in
// prefill) only change which pairs run side by side, never a pair's arithmetic: a row's output does not depend on
// the batch.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace {

using leanlm::HalfWeights;

// A vector of 16 float lanes: lane j sums the products of inputs k = j mod 16. AVX-512 holds it in one register,
// AVX2 in two; the FMAs per lane and the final sum tree are the same, so both builds give the same bits.
constexpr int kLanes = 16;
#if defined(__AVX512F__) && defined(__AVX512BW__)
struct Vec {
  __m512 v;
};
inline Vec zero() { return {_mm512_setzero_ps()}; }
inline Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec load_x(const float* p) { return {_mm512_loadu_ps(p)}; }
template <bool BF16>
inline Vec load_w(const uint16_t* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (BF16) return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16))};
  return {_mm512_cvtph_ps(bits)};
}
inline __m256 fold(Vec a) { return _mm256_add_ps(_mm512_castps512_ps256(a.v), _mm512_extractf32x8_ps(a.v, 1)); }
constexpr int kTileRows = 4, kTileBatch = 4;  // 16 accumulators of 32 registers, one chain at a time
#else
struct Vec {
  __m256 lo, hi;  // lanes 0-7, 8-15
};
inline Vec zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline Vec load_x(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
template <bool BF16>
inline __m256 convert8(const uint16_t* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  return _mm256_cvtph_ps(bits);
}
template <bool BF16>
inline Vec load_w(const uint16_t* p) {
  return {convert8<BF16>(p), convert8<BF16>(p + 8)};
}
inline __m256 fold(Vec a) { return _mm256_add_ps(a.lo, a.hi); }
constexpr int kTileRows = 2, kTileBatch = 2;  // 4 accumulators of 2 registers: AVX2 has 16
#endif

inline Vec add(Vec a, Vec b) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  return {_mm512_add_ps(a.v, b.v)};
#else
  return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
#endif
}

inline float sum_lanes(Vec v) {  // a fixed tree: 16 -> 8 -> 4 -> 2 -> 1
  const __m256 half = fold(v);
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

// ---- bfloat16 weights times bfloat16-rounded activations (kernel mode "auto", as llama.cpp runs BF16 files) ----
// Lane j of 16 takes inputs 32s + 2j and 32s + 2j + 1: acc += w[odd] x[odd], then acc += w[even] x[even], each
// product exact in float32: what one vdpbf16ps does (AVX-512 BF16); other builds run the same two FMAs.

// x (float32) rounded to the nearest bfloat16, ties to even (NaN stays NaN), width padded with zeros to `padded`.
inline uint16_t round_to_bf16(uint32_t bits) {
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  return nan ? static_cast<uint16_t>((bits >> 16) | 0x40) : static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
}

// The same formula 8 at a time (AVX2 integer ops; a 120-row prefill rounds 70k-180k values per matrix).
inline __m128i round_to_bf16_8(const float* p) {
  const __m256i bits = _mm256_castps_si256(_mm256_loadu_ps(p));
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
  const __m256i v = _mm256_blendv_epi8(rounded, quiet, nan);  // 8 values in 0..0xffff: pack without saturating
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), 0x08));
}

void round_rows_to_bf16(const float* x, int64_t m, int64_t cols, int64_t padded, uint16_t* out) {
  for (int64_t r = 0; r < m; ++r) {
    const float* row = x + r * cols;
    uint16_t* dst = out + r * padded;
    int64_t k = 0;
    for (; k + 8 <= cols; k += 8) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), round_to_bf16_8(row + k));
    for (; k < cols; ++k) {
      uint32_t bits;
      std::memcpy(&bits, row + k, sizeof(bits));
      dst[k] = round_to_bf16(bits);
    }
    std::fill(dst + cols, dst + padded, uint16_t{0});
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define LEANLM_DPBF16 1
inline Vec dot_pairs(const uint16_t* w, const uint16_t* x, Vec acc) {
  // Loaded straight as bfloat16 vectors: a cast of an integer register made GCC copy it through the stack.
  __m512bh wv, xv;
  std::memcpy(&wv, w, sizeof(wv));
  std::memcpy(&xv, x, sizeof(xv));
  return {_mm512_dpbf16_ps(acc.v, wv, xv)};
}
#else
// 32 bfloat16 as 16 dwords: the even element is the low half (shift it up), the odd one the high half (mask).
inline void split(const uint16_t* p, int half, __m256& even, __m256& odd) {
  const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * half));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(d, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(d, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
#if defined(__AVX512F__)
inline Vec dot_pairs(const uint16_t* w, const uint16_t* x, Vec acc) {
  const __m512i wd = _mm512_loadu_si512(w), xd = _mm512_loadu_si512(x);
  const __m512i mask = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  acc.v = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(wd, mask)),
                          _mm512_castsi512_ps(_mm512_and_si512(xd, mask)), acc.v);
  return {_mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(wd, 16)),
                          _mm512_castsi512_ps(_mm512_slli_epi32(xd, 16)), acc.v)};
}
#else
inline Vec dot_pairs(const uint16_t* w, const uint16_t* x, Vec acc) {
  __m256 we, wo, xe, xo;
  split(w, 0, we, wo);
  split(x, 0, xe, xo);
  acc.lo = _mm256_fmadd_ps(we, xe, _mm256_fmadd_ps(wo, xo, acc.lo));
  split(w, 1, we, wo);
  split(x, 1, xe, xo);
  acc.hi = _mm256_fmadd_ps(we, xe, _mm256_fmadd_ps(wo, xo, acc.hi));
  return acc;
}
#endif
#endif

// One step of a pair's dot product over a chunk of inputs, per mode. Exact: 16 float32 activations times 16 weights
// converted exactly (F16C for float16). Rounded: 32 bfloat16 activations (zero-padded rows) times 32 bfloat16.
template <bool BF16>
struct ExactStep {
  using X = float;
  static constexpr int64_t kWidth = kLanes;
  static constexpr bool kPaddedX = false;
  static Vec step(const uint16_t* w, const float* x, Vec acc) { return fmadd(load_w<BF16>(w), load_x(x), acc); }
};
struct RoundedStep {
  using X = uint16_t;
  static constexpr int64_t kWidth = 2 * kLanes;
  static constexpr bool kPaddedX = true;
  static Vec step(const uint16_t* w, const uint16_t* x, Vec acc) { return dot_pairs(w, x, acc); }
};

// Every (activation row, weight row) pair keeps two float32 chains: chunk c of the inputs (Op::kWidth of them) goes to
// chain c mod 2, in order, the tail zero-padded; the result is chain 0 + chain 1, then one fixed horizontal sum.
// Single rows run both chains at once (independent FMAs, while the row is read as one sequential stream); tiles of
// several pairs run one chain after the other (half the registers, so more pairs share each load). Either way a
// pair's arithmetic is the same: a row's output does not depend on the batch.

// Adds to acc[i][t] the zero-padded last, partial chunk of weight rows i times activation rows t.
template <class Op, int R, int T>
inline void tail_step(const HalfWeights& w, const uint16_t* rows, const typename Op::X* xs, int64_t x_stride,
                      Vec (&acc)[R][T]) {
  constexpr int64_t W = Op::kWidth;
  const int64_t full = w.cols / W * W, tail = w.cols - full;
  alignas(64) uint16_t wpad[W];  // zero-padded copies: the same lanes whatever the tile
  alignas(64) typename Op::X xpad[T][W];
  if constexpr (!Op::kPaddedX)
    for (int t = 0; t < T; ++t) {
      std::fill(xpad[t], xpad[t] + W, typename Op::X{0});
      std::memcpy(xpad[t], xs + t * x_stride + full, tail * sizeof(typename Op::X));
    }
  for (int i = 0; i < R; ++i) {
    std::fill(wpad, wpad + W, uint16_t{0});
    std::memcpy(wpad, rows + i * w.cols + full, tail * sizeof(uint16_t));
    for (int t = 0; t < T; ++t)
      acc[i][t] = Op::step(wpad, Op::kPaddedX ? xs + t * x_stride + full : xpad[t], acc[i][t]);
  }
}

// Adds to acc[i][t] the chunks of parity h (the tail included when it has that parity).
template <class Op, int R, int T>
inline void chain(const HalfWeights& w, const uint16_t* rows, const typename Op::X* xs, int64_t x_stride, int h,
                  Vec (&acc)[R][T]) {
  constexpr int64_t W = Op::kWidth;
  const int64_t full = w.cols / W * W;
  for (int64_t k = h * W; k + W <= full; k += 2 * W)
    for (int i = 0; i < R; ++i)
      for (int t = 0; t < T; ++t) acc[i][t] = Op::step(rows + i * w.cols + k, xs + t * x_stride + k, acc[i][t]);
  if (full < w.cols && ((full / W) & 1) == h) tail_step<Op, R, T>(w, rows, xs, x_stride, acc);
}

// R weight rows (from r0) times T activation rows (from m0), one chain after the other:
// out[m][r] = sum_k x[m][k] w[r][k].
template <class Op, int R, int T>
void tile(const HalfWeights& w, const typename Op::X* x, int64_t x_stride, float* out, int64_t out_stride,
          int64_t r0, int64_t m0) {
  const uint16_t* rows = w.data + r0 * w.cols;
  const typename Op::X* xs = x + m0 * x_stride;
  Vec even[R][T], odd[R][T];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) even[i][t] = odd[i][t] = zero();
  chain<Op, R, T>(w, rows, xs, x_stride, 0, even);
  chain<Op, R, T>(w, rows, xs, x_stride, 1, odd);
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) out[(m0 + t) * out_stride + r0 + i] = sum_lanes(add(even[i][t], odd[i][t]));
}

// One weight row times one activation row, both chains at once (the same arithmetic as tile<Op, 1, 1>).
template <class Op>
void single(const HalfWeights& w, const typename Op::X* x, float* out, int64_t r) {
  constexpr int64_t W = Op::kWidth;
  const uint16_t* row = w.data + r * w.cols;
  Vec even = zero(), odd = zero();  // locals, so they stay in registers
  const int64_t full = w.cols / W * W;
  int64_t k = 0;
  for (; k + 2 * W <= full; k += 2 * W) {
    even = Op::step(row + k, x + k, even);
    odd = Op::step(row + k + W, x + k + W, odd);
  }
  if (k < full) even = Op::step(row + k, x + k, even);  // an odd count of full chunks: the last one is even
  if (full < w.cols) {
    Vec last[1][1] = {{(full / W) & 1 ? odd : even}};
    tail_step<Op, 1, 1>(w, row, x, 0, last);
    ((full / W) & 1 ? odd : even) = last[0][0];
  }
  out[r] = sum_lanes(add(even, odd));
}

constexpr int64_t kRowBlock = 16;  // weight rows per task: 16 x 1536 x 2 bytes stays in L1/L2 over every x row

// Batches (prefill) run tiles of kTileRows x kTileBatch pairs, so each weight vector serves several activation
// rows; single rows (decode) run one weight row at a time: the weights are then read as one sequential stream,
// which the hardware prefetcher follows (several rows side by side made as many short streams: 20% slower).
template <class Op>
void matmul(const HalfWeights& w, const typename Op::X* x, int64_t m_total, int64_t x_stride, float* out,
            int64_t out_stride) {
  const int64_t blocks = (w.rows + kRowBlock - 1) / kRowBlock;
  const int64_t grain = std::max<int64_t>(1, blocks / (8 * at::get_num_threads()));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r_begin = b * kRowBlock, r_end = std::min(w.rows, r_begin + kRowBlock);
      int64_t m = 0;
      for (; m + kTileBatch <= m_total; m += kTileBatch) {
        int64_t r = r_begin;
        for (; r + kTileRows <= r_end; r += kTileRows)
          tile<Op, kTileRows, kTileBatch>(w, x, x_stride, out, out_stride, r, m);
        for (; r < r_end; ++r) tile<Op, 1, kTileBatch>(w, x, x_stride, out, out_stride, r, m);
      }
      for (; m < m_total; ++m)
        for (int64_t r = r_begin; r < r_end; ++r) single<Op>(w, x + m * x_stride, out + m * out_stride, r);
    }
  });
}

void matmul_bf16_activations(const HalfWeights& w, const float* x, int64_t m_total, float* out, int64_t out_stride) {
  const int64_t padded = (w.cols + RoundedStep::kWidth - 1) / RoundedStep::kWidth * RoundedStep::kWidth;
  std::vector<uint16_t> xb(m_total * padded);
  round_rows_to_bf16(x, m_total, w.cols, padded, xb.data());
  matmul<RoundedStep>(w, xb.data(), m_total, padded, out, out_stride);
}

}  // namespace

namespace leanlm {

HalfWeights check_half_weights(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.is_contiguous() &&
                  (weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kHalf),
              "half_linear: the weight must be a contiguous (rows, cols) bfloat16 or float16 CPU tensor");
  TORCH_CHECK(weight.size(0) > 0 && weight.size(1) > 0, "half_linear: an empty weight");
  return HalfWeights{reinterpret_cast<const uint16_t*>(weight.data_ptr()), weight.size(0), weight.size(1),
                     weight.scalar_type() == at::kBFloat16};
}

void half_matmul_into(const HalfWeights& w, const float* x, int64_t m, float* out, int64_t out_stride,
                      bool round_activations) {
  if (w.bf16 && round_activations) matmul_bf16_activations(w, x, m, out, out_stride);
  else if (w.bf16) matmul<ExactStep<true>>(w, x, m, w.cols, out, out_stride);
  else matmul<ExactStep<false>>(w, x, m, w.cols, out, out_stride);
}

at::Tensor half_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       bool round_activations) {
  const HalfWeights w = check_half_weights(weight);
  TORCH_CHECK(x.device().is_cpu(), "half_linear: x must be on the CPU");
  TORCH_CHECK(x.size(-1) == w.cols, "half_linear: x has ", x.size(-1), " features, the weight expects ", w.cols);
  const at::Tensor x2d = x.reshape({-1, w.cols}).to(at::kFloat).contiguous();
  at::Tensor out = at::empty({x2d.size(0), w.rows}, x2d.options());
  half_matmul_into(w, x2d.data_ptr<float>(), x2d.size(0), out.data_ptr<float>(), w.rows, round_activations);
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  if (x.scalar_type() != at::kFloat) out = out.to(x.scalar_type());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.rows;
  return out.reshape(shape);
}

}  // namespace leanlm

TORCH_LIBRARY_FRAGMENT(leanlm, m) { 
  m.def("half_linear(Tensor x, Tensor weight, Tensor? bias, bool round_activations=False) -> Tensor");
 }

TORCH_LIBRARY_IMPL(leanlm, CPU, m) { m.impl("half_linear", &leanlm::half_linear); }
