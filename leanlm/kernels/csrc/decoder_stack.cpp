// The whole stack of Llama-family decoder layers in one call, for one sequence whose KV cache is a contiguous
// stretch of slots (batch-1 decoding and single-prompt prefill). On a small model the module path's ~25 torch
// dispatches, temporary tensors and Python calls per layer cost more than the layer's arithmetic; here a layer
// is a handful of loops over buffers allocated once per call.
//
// Each step runs the same row/query functions as the torch ops (kernels.h) on the same values in the same order,
// so the result is the same bit for bit as the module path; the engine's lossless tests compare the two (a
// request alone takes this path, the same request in a batch the module path).
//
//   stack = torch.classes.leanlm.DecoderStack(heads, kv_heads, head_dim, eps, scale, int8_activations)
//   stack.add_layer(input_norm, post_norm, [codes, scales, offsets, bias] x (qkv, o, gate_up, down), rows)
//   x = stack.forward(x (T, hidden), cos (T, D), sin (T, D), keys, values (L, H_kv, slots, D), first_slot, start)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace {

struct PackedLinear {
  at::Tensor codes, scales, offsets, bias;  // offsets, bias: empty when absent
  leanlm::Weights weights;
  int64_t width() const { return weights.groups * leanlm::kRows; }  // output row stride, padding included

  PackedLinear(at::Tensor codes_, at::Tensor scales_, at::Tensor offsets_, at::Tensor bias_, int64_t rows)
      : codes(std::move(codes_)), scales(std::move(scales_)), offsets(std::move(offsets_)), bias(bias_.contiguous()),
        weights(leanlm::check_weights(codes, scales,
                                      offsets.numel() ? c10::optional<at::Tensor>(offsets) : c10::nullopt, rows,
                                      codes.size(2) == 128)) {
    TORCH_CHECK(!bias.numel() || (bias.scalar_type() == at::kFloat && bias.numel() == rows),
                "DecoderStack: a bias must be float32 with one value per output");
  }

  // out (m, width()) = x (m, cols) W^T + bias
  void operator()(const float* x, int64_t m, float* out, bool int8_activations) const {
    RECORD_FUNCTION(weights.q4 ? "leanlm::q4_linear" : "leanlm::q8_linear", c10::ArrayRef<const c10::IValue>{});
    leanlm::matmul_into(weights, x, m, out, int8_activations);
    if (bias.numel()) {
      const float* b = bias.data_ptr<float>();
      for (int64_t r = 0; r < m; ++r)
        for (int64_t i = 0; i < weights.rows; ++i) out[r * width() + i] += b[i];
    }
  }
};

struct Layer {
  at::Tensor input_norm, post_norm;
  PackedLinear qkv, o, gate_up, down;
};

struct DecoderStack : torch::CustomClassHolder {
  int64_t heads, kv_heads, head_dim;
  double eps, scale;
  bool int8_activations;
  std::vector<Layer> layers;

  DecoderStack(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, double scale, bool int8_activations)
      : heads(heads), kv_heads(kv_heads), head_dim(head_dim), eps(eps), scale(scale),
        int8_activations(int8_activations) {}

  // linears: codes, scales, offsets, bias for qkv, o, gate_up and down (empty tensors for none); rows: their outputs.
  void add_layer(at::Tensor input_norm, at::Tensor post_norm, std::vector<at::Tensor> linears,
                 std::vector<int64_t> rows) {
    TORCH_CHECK(linears.size() == 16 && rows.size() == 4, "add_layer: 4 linears of 4 tensors each");
    TORCH_CHECK(input_norm.scalar_type() == at::kFloat && post_norm.scalar_type() == at::kFloat,
                "add_layer: float32 norm weights");
    auto linear = [&](int i) {
      return PackedLinear(linears[4 * i], linears[4 * i + 1], linears[4 * i + 2], linears[4 * i + 3], rows[i]);
    };
    layers.push_back(Layer{input_norm.contiguous(), post_norm.contiguous(), linear(0), linear(1), linear(2), linear(3)});
  }

  // x: (T, hidden) float32, the embedded tokens at positions start..start+T-1 of the sequence whose position 0
  // is slot first_slot of keys/values (L, H_kv, slots, D). Writes the new keys and values; returns the hidden states.
  at::Tensor forward(at::Tensor x_in, at::Tensor cos_in, at::Tensor sin_in, at::Tensor keys, at::Tensor values,
                     int64_t first_slot, int64_t start) {
    const int64_t length = x_in.size(0), hidden = x_in.size(1), dim = head_dim, group = heads / kv_heads;
    const int64_t total = start + length;
    TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "DecoderStack: x must be (T, hidden) float32");
    TORCH_CHECK(keys.scalar_type() == at::kFloat && keys.is_contiguous() && values.is_contiguous() &&
                    keys.sizes() == values.sizes() && keys.size(0) == static_cast<int64_t>(layers.size()) &&
                    keys.size(1) == kv_heads && keys.size(3) == dim && first_slot + total <= keys.size(2),
                "DecoderStack: keys and values must be contiguous float32 (layers, kv_heads, slots, head_dim)");
    at::Tensor x = x_in.contiguous().clone();  // the residual stream, updated in place
    const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    const Layer& first = layers.front();
    std::vector<float> normed(length * hidden), qkv(length * first.qkv.width()), q(heads * length * dim),
        attended(length * heads * dim), projected(length * std::max(first.o.width(), first.down.width())),
        gate_up(length * first.gate_up.width()), activated(length * first.gate_up.weights.rows / 2);
    float* xp = x.data_ptr<float>();
    const int64_t slots = keys.size(2);
    const float sc = static_cast<float>(scale);
    for (size_t l = 0; l < layers.size(); ++l) {
      const Layer& layer = layers[l];
      float* layer_keys = keys.data_ptr<float>() + l * kv_heads * slots * dim;  // (H_kv, slots, D)
      float* layer_values = values.data_ptr<float>() + l * kv_heads * slots * dim;
      for (int64_t t = 0; t < length; ++t)
        leanlm::rms_norm_row(xp + t * hidden, layer.input_norm.data_ptr<float>(), normed.data() + t * hidden, hidden,
                             eps);
      layer.qkv(normed.data(), length, qkv.data(), int8_activations);
      // RoPE on the query and key heads; new keys and values go straight to their cache slots.
      const int64_t qkv_width = layer.qkv.width();
      for (int64_t t = 0; t < length; ++t) {
        const float* row = qkv.data() + t * qkv_width;
        const int64_t slot = first_slot + start + t;
        for (int64_t h = 0; h < heads; ++h)
          leanlm::rotary_row(row + h * dim, 1, cp + t * dim, sp + t * dim, q.data() + (h * length + t) * dim, dim);
        for (int64_t h = 0; h < kv_heads; ++h) {
          leanlm::rotary_row(row + (heads + h) * dim, 1, cp + t * dim, sp + t * dim,
                             layer_keys + (h * slots + slot) * dim, dim);
          std::memcpy(layer_values + (h * slots + slot) * dim, row + (heads + kv_heads + h) * dim,
                      dim * sizeof(float));
        }
      }
      {
        RECORD_FUNCTION("leanlm::causal_attention", c10::ArrayRef<const c10::IValue>{});
        at::parallel_for(0, heads * length, 1, [&](int64_t begin, int64_t end) {
          std::vector<float> scores(total);
          for (int64_t item = begin; item < end; ++item) {
            const int64_t h = item / length, t = item % length;
            const int64_t kv = (h / group) * slots + first_slot;
            leanlm::attend_query(q.data() + item * dim, layer_keys + kv * dim, dim, layer_values + kv * dim, dim,
                                 start + t, nullptr, sc, dim, scores.data(), attended.data() + (t * heads + h) * dim);
          }
        });
      }
      layer.o(attended.data(), length, projected.data(), int8_activations);
      add_rows(xp, projected.data(), length, hidden, layer.o.width());
      for (int64_t t = 0; t < length; ++t)
        leanlm::rms_norm_row(xp + t * hidden, layer.post_norm.data_ptr<float>(), normed.data() + t * hidden, hidden,
                             eps);
      layer.gate_up(normed.data(), length, gate_up.data(), int8_activations);
      const int64_t half = layer.gate_up.weights.rows / 2;
      for (int64_t t = 0; t < length; ++t)
        leanlm::silu_mul_row(gate_up.data() + t * layer.gate_up.width(), activated.data() + t * half, half);
      layer.down(activated.data(), length, projected.data(), int8_activations);
      add_rows(xp, projected.data(), length, hidden, layer.down.width());
    }
    return x;
  }

  // x (T, hidden) += y (T, stride)[:, :hidden]
  static void add_rows(float* x, const float* y, int64_t length, int64_t hidden, int64_t stride) {
    for (int64_t t = 0; t < length; ++t)
      for (int64_t i = 0; i < hidden; ++i) x[t * hidden + i] += y[t * stride + i];
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanlm, m) {
  m.class_<DecoderStack>("DecoderStack")
      .def(torch::init<int64_t, int64_t, int64_t, double, double, bool>())
      .def("add_layer", &DecoderStack::add_layer)
      .def("forward", &DecoderStack::forward);
}
