// The whole stack of Llama-family decoder layers in one call, for one engine step: any mix of prefill chunks
// and decode tokens of sequences in the paged KV cache. On a small model the module path's ~25 torch dispatches,
// temporary tensors and Python calls per layer, and its gathers of cached keys for batched attention, cost more
// than the layer's arithmetic; here a layer is a handful of loops over buffers allocated once per call.
//
// Each step runs the same row/query functions as the torch ops (kernels.h) on the same values in the same order,
// so the result is the same bit for bit as the module path (tests/numerics/test_decoder_stack.py).
//
//   stack = torch.classes.leanlm.DecoderStack(heads, kv_heads, head_dim, eps, scale, int8_activations)
//   stack.add_layer(input_norm, post_norm, [codes, scales, offsets, bias, scale_base, offset_base] x (qkv, o,
//                   gate_up, down), rows)
//   x = stack.forward(x (N, hidden), cos (N, D), sin (N, D), keys, values (L, H_kv, slots, D),
//                     block_tables (B, W), block_size, row_sequence (N,), row_position (N,))
//                   (a 16-bit projection: codes = its bfloat16/float16 (rows, cols) weight, the rest empty)
//   stack.add_layer_segments(input_norm, post_norm, linears, rows, segments)  the same, a projection held as
//                   row segments in different layouts (segments[i] of them for projection i, 6 tensors and one
//                   rows entry each; every segment but the last a multiple of 8 rows): a fused q/k/v whose Q4_K
//                   q/k and Q6_K v pack narrower apart than in one common form
//   stack.set_all_reduce_group(name)  tensor parallelism: the o and down outputs of this rank are partial sums,
//                                     summed over the ranks of torch.distributed group `name` (distributed/)

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"

namespace {

c10::optional<at::Tensor> present(const at::Tensor& t) {
  return t.numel() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// One projection: a packed quantized weight (kernels/layout.py), or a 16-bit matrix as the checkpoint holds it
// (half_linear.cpp: codes is then the bfloat16 or float16 (rows, cols) weight and the other tensors are empty).
struct PackedLinear {
  at::Tensor codes, scales, offsets, bias, scale_base, offset_base;  // all but codes, scales: empty when absent
  bool half;
  leanlm::Weights weights{};
  leanlm::HalfWeights half_weights{};
  std::vector<PackedLinear> rest;  // further row segments, in other layouts: their outputs follow these rows
  int64_t own_rows() const { return half ? half_weights.rows : weights.rows; }
  int64_t own_width() const { return half ? half_weights.rows : weights.groups * leanlm::kRows; }
  int64_t rows() const {
    int64_t total = own_rows();
    for (const auto& segment : rest) total += segment.own_rows();
    return total;
  }
  // output row stride, padding included
  int64_t width() const {
    int64_t total = own_width();
    for (const auto& segment : rest) total += segment.own_width();
    return total;
  }

  PackedLinear(at::Tensor codes_, at::Tensor scales_, at::Tensor offsets_, at::Tensor bias_, at::Tensor scale_base_,
               at::Tensor offset_base_, int64_t rows)
      : codes(std::move(codes_)), scales(std::move(scales_)), offsets(std::move(offsets_)), bias(bias_.contiguous()),
        scale_base(std::move(scale_base_)), offset_base(std::move(offset_base_)),
        half(codes.scalar_type() == at::kBFloat16 || codes.scalar_type() == at::kHalf) {
    if (half) {
      half_weights = leanlm::check_half_weights(codes);
      TORCH_CHECK(half_weights.rows == rows, "DecoderStack: a 16-bit weight has ", half_weights.rows,
                  " rows, the layer expects ", rows);
    } else {
      weights = leanlm::check_weights(codes, scales, present(offsets), rows, codes.size(2) == 128, present(scale_base),
                                      present(offset_base));
    }
    TORCH_CHECK(!bias.numel() || (bias.scalar_type() == at::kFloat && bias.numel() == rows),
                "DecoderStack: a bias must be float32 with one value per output");
  }

  // out (m, width()) = x (m, cols) W^T + bias
  void operator()(const float* x, int64_t m, float* out, bool int8_activations) const {
    run(x, m, out, width(), int8_activations);
  }

  // this segment's outputs into out[:, 0:own_width()] of rows `stride` floats apart, then the further segments'
  void run(const float* x, int64_t m, float* out, int64_t stride, bool int8_activations) const {
    if (half) {
      RECORD_FUNCTION("leanlm::half_linear", c10::ArrayRef<const c10::IValue>{});
      leanlm::half_matmul_into(half_weights, x, m, out, stride, int8_activations);  // "auto": bf16 activations
    } else {
      RECORD_FUNCTION(weights.q4 ? "leanlm::q4_linear" : "leanlm::q8_linear", c10::ArrayRef<const c10::IValue>{});
      leanlm::matmul_into(weights, x, m, out, int8_activations, stride);
    }
    if (bias.numel()) {
      const float* b = bias.data_ptr<float>();
      for (int64_t r = 0; r < m; ++r)
        for (int64_t i = 0; i < own_rows(); ++i) out[r * stride + i] += b[i];
    }
    float* next = out + own_width();
    for (const auto& segment : rest) {
      segment.run(x, m, next, stride, int8_activations);
      next += segment.own_width();
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
  std::string all_reduce_group;  // empty: one process holds the whole layer

  DecoderStack(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, double scale, bool int8_activations)
      : heads(heads), kv_heads(kv_heads), head_dim(head_dim), eps(eps), scale(scale),
        int8_activations(int8_activations) {}

  // linears: codes, scales, offsets, bias, scale_base, offset_base for qkv, o, gate_up and down (empty tensors for
  // none); rows: their outputs.
  void add_layer(at::Tensor input_norm, at::Tensor post_norm, std::vector<at::Tensor> linears,
                 std::vector<int64_t> rows) {
    TORCH_CHECK(linears.size() == 24 && rows.size() == 4, "add_layer: 4 linears of 6 tensors each");
    add_layer_segments(std::move(input_norm), std::move(post_norm), std::move(linears), std::move(rows), {1, 1, 1, 1});
  }

  void add_layer_segments(at::Tensor input_norm, at::Tensor post_norm, std::vector<at::Tensor> linears,
                          std::vector<int64_t> rows, std::vector<int64_t> segments) {
    TORCH_CHECK(segments.size() == 4 && rows.size() == linears.size() / 6 && linears.size() % 6 == 0,
                "add_layer_segments: 4 segment counts, 6 tensors and one rows entry per segment");
    int64_t total = 0;
    for (const int64_t count : segments) {
      TORCH_CHECK(count >= 1, "add_layer_segments: every projection has a segment");
      total += count;
    }
    TORCH_CHECK(total == static_cast<int64_t>(rows.size()), "add_layer_segments: segments and rows disagree");
    TORCH_CHECK(input_norm.scalar_type() == at::kFloat && post_norm.scalar_type() == at::kFloat,
                "add_layer: float32 norm weights");
    int64_t next = 0;
    auto linear = [&](int64_t count) {
      auto segment = [&](int64_t i) {
        const at::Tensor* t = &linears[6 * i];
        return PackedLinear(t[0], t[1], t[2], t[3], t[4], t[5], rows[i]);
      };
      PackedLinear first = segment(next++);
      for (int64_t i = 1; i < count; ++i) {
        TORCH_CHECK(first.width() == first.rows(), "add_layer_segments: a segment before the last has rows % 8 != 0");
        first.rest.push_back(segment(next++));
      }
      return first;
    };
    PackedLinear qkv = linear(segments[0]), o = linear(segments[1]), gate_up = linear(segments[2]),
                 down = linear(segments[3]);
    layers.push_back(Layer{input_norm.contiguous(), post_norm.contiguous(), std::move(qkv), std::move(o),
                           std::move(gate_up), std::move(down)});
  }

  void set_all_reduce_group(std::string name) { all_reduce_group = std::move(name); }

  // Sum `values` (rows x width) over the ranks, in place, through torch.distributed's own collective (the op the
  // module path's all_reduce dispatches to), and wait for it.
  void all_reduce(float* values, int64_t count) const {
    if (all_reduce_group.empty()) return;
    static const c10::OperatorHandle reduce =
        c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::all_reduce_", "");
    static const c10::OperatorHandle wait =
        c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::wait_tensor", "");
    at::Tensor view = at::from_blob(values, {count}, at::kFloat);
    std::vector<c10::IValue> stack{view, std::string("sum"), all_reduce_group};
    reduce.callBoxed(&stack);
    std::vector<c10::IValue> waited{view};
    wait.callBoxed(&waited);
  }

  // One forward pass over N token rows from B sequences of the paged cache (keys, values: (L, H_kv, slots, D)).
  // Row r is sequence row_sequence[r] at position row_position[r]; position p of sequence s lives in slot
  // block_tables[s][p / block_size] * block_size + p % block_size. Each row's key and value are written to its
  // slot, then it attends causally over its sequence's slots 0..position. Returns the hidden states (N, hidden).
  at::Tensor forward(at::Tensor x_in, at::Tensor cos_in, at::Tensor sin_in, at::Tensor keys, at::Tensor values,
                     at::Tensor block_tables_in, int64_t block_size, at::Tensor row_sequence_in,
                     at::Tensor row_position_in) {
    // A profiler scope: its self time is everything but the matrix products and attention (scoped below).
    RECORD_FUNCTION("leanlm::decoder_stack", c10::ArrayRef<const c10::IValue>{});
    const int64_t rows = x_in.size(0), hidden = x_in.size(1), dim = head_dim, group = heads / kv_heads;
    TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "DecoderStack: x must be (N, hidden) float32");
    TORCH_CHECK(keys.scalar_type() == at::kFloat && keys.is_contiguous() && values.is_contiguous() &&
                    keys.sizes() == values.sizes() && keys.size(0) == static_cast<int64_t>(layers.size()) &&
                    keys.size(1) == kv_heads && keys.size(3) == dim,
                "DecoderStack: keys and values must be contiguous float32 (layers, kv_heads, slots, head_dim)");
    const at::Tensor tables = block_tables_in.to(at::kLong).contiguous();
    const at::Tensor row_sequence = row_sequence_in.to(at::kLong).contiguous();
    const at::Tensor row_position = row_position_in.to(at::kLong).contiguous();
    TORCH_CHECK(tables.dim() == 2 && row_sequence.numel() == rows && row_position.numel() == rows,
                "DecoderStack: one sequence index and one position per row, a (sequences, blocks) table");
    TORCH_CHECK(!layers.empty() && hidden == layers.front().input_norm.numel(),
                "DecoderStack: x has ", hidden, " features, the layers expect ", layers.front().input_norm.numel());
    TORCH_CHECK(cos_in.numel() == rows * dim && sin_in.numel() == rows * dim && cos_in.scalar_type() == at::kFloat &&
                    sin_in.scalar_type() == at::kFloat,
                "DecoderStack: cos and sin must be float32 (N, head_dim)");
    const int64_t slots = keys.size(2);
    const int64_t* seq_of = row_sequence.data_ptr<int64_t>();
    const int64_t* pos_of = row_position.data_ptr<int64_t>();
    // The slots of every position each sequence attends to, looked up once for all layers.
    std::vector<std::vector<int64_t>> sequence_slots(tables.size(0));
    for (int64_t r = 0; r < rows; ++r) {
      TORCH_CHECK(seq_of[r] >= 0 && seq_of[r] < tables.size(0) && pos_of[r] >= 0 &&
                      pos_of[r] < tables.size(1) * block_size,
                  "DecoderStack: row ", r, " points outside its block table");
      std::vector<int64_t>& known = sequence_slots[seq_of[r]];
      const int64_t* table = tables.data_ptr<int64_t>() + seq_of[r] * tables.size(1);
      for (int64_t p = static_cast<int64_t>(known.size()); p <= pos_of[r]; ++p) {
        const int64_t slot = table[p / block_size] * block_size + p % block_size;
        TORCH_CHECK(slot >= 0 && slot < slots, "DecoderStack: block table entry outside the cache");
        known.push_back(slot);
      }
    }
    at::Tensor x = x_in.contiguous().clone();  // the residual stream, updated in place
    const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    const Layer& first = layers.front();
    std::vector<float> normed(rows * hidden), qkv(rows * first.qkv.width()), q(rows * heads * dim),
        attended(rows * heads * dim), projected(rows * std::max(first.o.width(), first.down.width())),
        gate_up(rows * first.gate_up.width()), activated(rows * first.gate_up.rows() / 2);
    float* xp = x.data_ptr<float>();
    const float sc = static_cast<float>(scale);
    for (size_t l = 0; l < layers.size(); ++l) {
      const Layer& layer = layers[l];
      float* layer_keys = keys.data_ptr<float>() + l * kv_heads * slots * dim;  // (H_kv, slots, D)
      float* layer_values = values.data_ptr<float>() + l * kv_heads * slots * dim;
      for (int64_t r = 0; r < rows; ++r)
        leanlm::rms_norm_row(xp + r * hidden, layer.input_norm.data_ptr<float>(), normed.data() + r * hidden, hidden,
                             eps);
      layer.qkv(normed.data(), rows, qkv.data(), int8_activations);
      // RoPE on the query and key heads; new keys and values go straight to their cache slots.
      const int64_t qkv_width = layer.qkv.width();
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = qkv.data() + r * qkv_width;
        const int64_t slot = sequence_slots[seq_of[r]][pos_of[r]];
        for (int64_t h = 0; h < heads; ++h)
          leanlm::rotary_row(row + h * dim, 1, cp + r * dim, sp + r * dim, q.data() + (r * heads + h) * dim, dim);
        for (int64_t h = 0; h < kv_heads; ++h) {
          leanlm::rotary_row(row + (heads + h) * dim, 1, cp + r * dim, sp + r * dim,
                             layer_keys + (h * slots + slot) * dim, dim);
          std::memcpy(layer_values + (h * slots + slot) * dim, row + (heads + kv_heads + h) * dim,
                      dim * sizeof(float));
        }
      }
      {
        RECORD_FUNCTION("leanlm::causal_attention", c10::ArrayRef<const c10::IValue>{});
        // An item is the query heads sharing one KV head (each key read once for them), or a single query head
        // when there are too few groups to keep every thread busy (batch-1 decoding: 3 groups on 2 threads).
        // A query's arithmetic is the same either way.
        const int64_t per_item = rows * kv_heads >= 4 * at::get_num_threads() ? group : 1;
        at::parallel_for(0, rows * heads / per_item, 1, [&](int64_t begin, int64_t end) {
          std::vector<float> scores;
          for (int64_t item = begin; item < end; ++item) {
            const int64_t r = item * per_item / heads, h = item * per_item % heads;
            scores.resize(per_item * (pos_of[r] + 1));
            const int64_t kv = (h / group) * slots * dim, first = (r * heads + h) * dim;
            leanlm::attend_queries(q.data() + first, dim, per_item, layer_keys + kv, dim, layer_values + kv, dim,
                                   pos_of[r], sequence_slots[seq_of[r]].data(), nullptr, sc, dim, scores.data(),
                                   attended.data() + first, dim);
          }
        });
      }
      layer.o(attended.data(), rows, projected.data(), int8_activations);
      all_reduce(projected.data(), rows * layer.o.width());
      add_rows(xp, projected.data(), rows, hidden, layer.o.width());
      for (int64_t r = 0; r < rows; ++r)
        leanlm::rms_norm_row(xp + r * hidden, layer.post_norm.data_ptr<float>(), normed.data() + r * hidden, hidden,
                             eps);
      layer.gate_up(normed.data(), rows, gate_up.data(), int8_activations);
      const int64_t half = layer.gate_up.rows() / 2;
      for (int64_t r = 0; r < rows; ++r)
        leanlm::silu_mul_row(gate_up.data() + r * layer.gate_up.width(), activated.data() + r * half, half);
      layer.down(activated.data(), rows, projected.data(), int8_activations);
      all_reduce(projected.data(), rows * layer.down.width());
      add_rows(xp, projected.data(), rows, hidden, layer.down.width());
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
      .def("add_layer_segments", &DecoderStack::add_layer_segments)
      .def("set_all_reduce_group", &DecoderStack::set_all_reduce_group)
      .def("forward", &DecoderStack::forward);
}
