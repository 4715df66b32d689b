// The whole stack of Llama-family decoder layers in one call, for one sequence whose KV cache is a contiguous
// slab (batch-1 decoding and single-prompt prefill): the ~25 torch dispatches and Python module calls per layer
// of the module path cost more than the layer's own arithmetic on a small model.
//
// Every step calls the same kernels as the module path (kernels.h) in the same order on the same shapes, so the
// result is the same bit for bit; the engine's lossless tests compare this path (a request alone) with the
// module path (the same request in a batch).
//
//   stack = torch.classes.leanlm.DecoderStack(heads, kv_heads, head_dim, eps, scale, int8_activations)
//   stack.add_layer(input_norm, post_norm, [codes, scales, offsets, bias] x (qkv, o, gate_up, down), rows)
//   x = stack.forward(x (T, hidden), cos (T, D), sin (T, D), keys, values (L, H_kv, slots, D), first_slot, start)

#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <vector>

#include "kernels.h"

namespace {

struct PackedLinear {
  at::Tensor codes, scales;
  c10::optional<at::Tensor> offsets, bias;
  int64_t rows;

  at::Tensor operator()(const at::Tensor& x, bool int8_activations) const {
    if (codes.size(2) == 128) return leanlm::q4_linear(x, codes, scales, offsets, bias, rows, int8_activations);
    return leanlm::q8_linear(x, codes, scales, bias, rows, int8_activations);
  }
};

struct Layer {
  at::Tensor input_norm, post_norm;
  PackedLinear qkv, o, gate_up, down;
};

c10::optional<at::Tensor> present(const at::Tensor& t) {
  return t.numel() ? c10::optional<at::Tensor>(t) : c10::nullopt;  // an empty tensor stands for None
}

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
    PackedLinear parts[4];
    for (int i = 0; i < 4; ++i) {
      parts[i] = PackedLinear{linears[4 * i], linears[4 * i + 1], present(linears[4 * i + 2]),
                              present(linears[4 * i + 3]), rows[i]};
    }
    layers.push_back(Layer{input_norm, post_norm, parts[0], parts[1], parts[2], parts[3]});
  }

  // x: (T, hidden) float32, the embedded tokens at cache positions start..start+T-1 of the sequence whose slots
  // begin at first_slot in every layer of keys/values (L, H_kv, slots, D). Writes their keys and values there.
  at::Tensor forward(at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor keys, at::Tensor values,
                     int64_t first_slot, int64_t start) {
    const int64_t length = x.size(0);
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "DecoderStack: x must be (T, hidden) float32");
    TORCH_CHECK(keys.scalar_type() == at::kFloat && keys.size(0) == static_cast<int64_t>(layers.size()),
                "DecoderStack: a float32 cache with one slab per layer");
    const at::Tensor c = cos.reshape({1, 1, length, head_dim});
    const at::Tensor s = sin.reshape({1, 1, length, head_dim});
    for (size_t l = 0; l < layers.size(); ++l) {
      const Layer& layer = layers[l];
      const at::Tensor h = leanlm::rms_norm(x, layer.input_norm, eps);
      const at::Tensor qkv =
          layer.qkv(h, int8_activations).view({1, length, heads + 2 * kv_heads, head_dim}).transpose(1, 2);
      const at::Tensor qk = leanlm::rotary(qkv.narrow(1, 0, heads + kv_heads), c, s);  // (1, H + H_kv, T, D)
      const at::Tensor layer_keys = keys[l], layer_values = values[l];                // (H_kv, slots, D)
      layer_keys.narrow(1, first_slot + start, length).copy_(qk[0].narrow(0, heads, kv_heads));
      layer_values.narrow(1, first_slot + start, length).copy_(qkv[0].narrow(0, heads + kv_heads, kv_heads));
      const at::Tensor attended = leanlm::causal_attention(
          qk.narrow(1, 0, heads), layer_keys.narrow(1, first_slot, start + length).unsqueeze(0),
          layer_values.narrow(1, first_slot, start + length).unsqueeze(0), c10::nullopt, scale);  // (1, H, T, D)
      x = x + layer.o(attended.transpose(1, 2).reshape({length, heads * head_dim}), int8_activations);
      const at::Tensor gate_up = layer.gate_up(leanlm::rms_norm(x, layer.post_norm, eps), int8_activations);
      x = x + layer.down(leanlm::silu_mul(gate_up), int8_activations);
    }
    return x;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanlm, m) {
  m.class_<DecoderStack>("DecoderStack")
      .def(torch::init<int64_t, int64_t, int64_t, double, double, bool>())
      .def("add_layer", &DecoderStack::add_layer)
      .def("forward", &DecoderStack::forward);
}
