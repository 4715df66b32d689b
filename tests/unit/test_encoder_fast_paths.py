"""The encoders' fast paths against their references: the oneDNN float32 linear layer with its fused activation,
the float32 encoder on it against transformers, and the int8 row quantization's vectorized kernel (any width)."""

import pytest
import torch
import torch.nn.functional as F

from leanlm.embed.precision import apply_precision
from leanlm.layers.int8_linear import quantize_rows
from leanlm.layers.onednn_linear import OneDNNLinear, onednn_linear_available
from leanlm.models.encoders import load_encoder


@pytest.mark.parametrize("activation", [None, "gelu", "gelu_new", "relu"])
def test_onednn_linear_equals_linear_then_activation(activation):
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 24)
    x = torch.randn(3, 5, 40)  # leading dims kept, as the encoder's (B, T, H)
    expected = linear(x)
    if activation == "gelu":
        expected = F.gelu(expected)
    elif activation == "gelu_new":
        expected = F.gelu(expected, approximate="tanh")
    elif activation == "relu":
        expected = F.relu(expected)
    layer = OneDNNLinear.from_linear(linear, activation)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x.bfloat16()).float(), expected, atol=0.1, rtol=0.05)  # not float32: F.linear
        residual = torch.randn(3, 5, 24)
        torch.testing.assert_close(layer(x, residual), expected + residual, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="swish"):
        OneDNNLinear.from_linear(linear, "swish")


def test_the_float32_encoder_runs_on_onednn_and_equals_transformers():
    from tiny_encoders import tiny_model

    model = tiny_model("bert")
    raw = model.config.to_dict() | {"architectures": ["BertModel"]}
    encoder = apply_precision(load_encoder(raw, model.state_dict())[1], "float32")
    if onednn_linear_available():
        assert isinstance(encoder.layers[0].up, OneDNNLinear) and encoder.layers[0].up_applies_act
        assert encoder.layers[0].adds_residual
    ids = torch.tensor([[2, 7, 8, 9, 3], [2, 12, 3, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = encoder(ids, mask)
    torch.testing.assert_close(ours[mask.bool()], expected[mask.bool()], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("width", [7, 100, 384])  # below, between and at multiples of the vector width
@pytest.mark.parametrize("smoothed", [False, True])
def test_int8_row_kernel_gives_the_reference_bits(width, smoothed):
    from leanlm.kernels.int8_rows import load_int8_rows

    if not load_int8_rows():
        pytest.skip("leanlm's int8 row kernels could not be built here")
    torch.manual_seed(width)
    x = torch.randn(9, width) * torch.logspace(-3, 2, 9)[:, None]
    x[0] = 0.0  # an all-zero row: scale clamps at 1e-12 / 127
    x[1] = 0.0
    x[1, :5] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5])  # scale 1: halves round to even, as nearbyint does
    inverse = torch.rand(width) + 0.5 if smoothed else None
    codes, scale = torch.ops.leanlm_int8.quantize_rows(x, inverse)
    ref_codes, ref_scale = quantize_rows(x if inverse is None else x * inverse)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
    if not smoothed:
        assert codes[1, :5].tolist() == [127, 0, 2, 2, 0]


@pytest.mark.parametrize(("tokens", "heads", "dim"), [(1, 12, 32), (12, 12, 32), (41, 4, 16), (22, 3, 10)])
def test_short_attention_kernel_equals_sdpa_with_padding(tokens, heads, dim):
    from leanlm.kernels.int8_rows import load_int8_rows

    if not load_int8_rows():
        pytest.skip("leanlm's encoder kernels could not be built here")
    torch.manual_seed(tokens)
    batch, hidden = 3, heads * dim
    qkv = torch.randn(batch, tokens, 3 * hidden) * 3  # scores spread widely: softmax saturates on some keys
    real = torch.ones(batch, tokens, dtype=torch.bool)
    real[1, tokens // 2 + 1 :] = False  # padding at the end, as pad_batch puts it
    real[2, 0] = tokens == 1  # a masked key anywhere (the kernel does not assume trailing padding)
    q, k, v = qkv.view(batch, tokens, 3, heads, dim).permute(2, 0, 3, 1, 4)
    for mask in (None, real):
        keys = None if mask is None else mask[:, None, None, :]
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keys)
        exact = exact.transpose(1, 2).reshape(batch, tokens, hidden)
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=keys).transpose(1, 2).reshape(batch, tokens, hidden)
        ours = torch.ops.leanlm_encoder.attention(qkv, heads, mask)
        # float32 rounding only: no further from the float64 result than SDPA is (values ~3, scores up to ~40)
        assert (ours.double() - exact).abs().max() <= 2 * (sdpa.double() - exact).abs().max() + 1e-6
        torch.testing.assert_close(ours, sdpa, atol=5e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="split into q, k, v"):
        torch.ops.leanlm_encoder.attention(qkv[..., :-1].contiguous(), heads, None)


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_batch_slices_and_text_threads_give_the_one_pass_states(precision, monkeypatch):
    """Slicing a batch (tokens_per_pass) and running its slices on worker threads (text_parallel) change nothing:
    texts never see each other. The one-pass result (63 tokens: on one thread, single_thread_tokens) uses SDPA
    (short_attention off): the kernel is checked too."""
    from tiny_encoders import tiny_model

    from leanlm.kernels.int8_rows import load_int8_rows
    from leanlm.kernels.threads import scoped_threads

    model = tiny_model("bert")
    raw = model.config.to_dict() | {"architectures": ["BertModel"]}
    encoder = apply_precision(load_encoder(raw, model.state_dict())[1], precision)
    torch.manual_seed(1)
    ids = torch.randint(4, 20, (7, 9))
    mask = torch.ones_like(ids)
    mask[3:, 6:] = 0  # the later texts padded: slices mix unpadded and padded ones
    with torch.inference_mode():
        encoder.tokens_per_pass, encoder.text_parallel = 1 << 30, False
        for layer in encoder.layers:
            layer.short_attention = False
        one_pass = encoder(ids, mask)
        for layer in encoder.layers:
            layer.short_attention = load_int8_rows()
        encoder.single_thread_tokens, encoder.tokens_per_pass = 0, 20  # 2 texts a slice: 4 slices
        sliced = encoder(ids, mask)
        encoder.text_parallel = True
        with scoped_threads(2):
            threaded = encoder(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(sliced[real], one_pass[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(threaded[real], one_pass[real], atol=1e-5, rtol=1e-5)
