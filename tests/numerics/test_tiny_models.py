"""Every family against transformers on tiny random models (weights copied across): a full pass, and token by token
through the contiguous and the paged cache (sliding-window layers included, past their window)."""

import pytest
import torch

from leanlm.cache.kv_cache import KVCache
from leanlm.models.registry import build_model, config_from_hf

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=320,
    hidden_size=96,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=6,
    max_position_embeddings=512,
)
CASES = {
    "llama-gqa-untied-llama3rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama-mha-tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=6, tie_word_embeddings=True)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(num_key_value_heads=3, tie_word_embeddings=False, sliding_window=None),
    ),
    # a window of 12 keys over 40-token sequences: most queries see only part of their past
    "mistral-window": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(num_key_value_heads=3, tie_word_embeddings=False, sliding_window=12),
    ),
    # sliding and global layers with their own rope bases, QK-norm, GeGLU, (1 + w) norms, scaled embeddings, and a
    # query scale (query_pre_attn_scalar) other than 1/sqrt(head_dim)
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            num_key_value_heads=2,
            head_dim=32,
            sliding_window=12,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        ),
    ),
}
WINDOWED = ["mistral-window", "gemma3"]


def make_pair(case: str):
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(0)
    hf_config = getattr(transformers, config_cls)(**COMMON, **extra)
    hf = getattr(transformers, model_cls)(hf_config).eval()
    with torch.no_grad():  # random biases, so the Qwen2 bias path is really exercised
        for name, param in hf.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
            elif "norm" in name:  # Gemma's norms start at 0 (a factor of 1): move them off the neutral point
                param.add_(torch.randn_like(param) * 0.2)
    config = config_from_hf(hf_config.to_dict())
    ours = build_model(config, dict(hf.state_dict()), torch.float32)
    return hf, ours


@pytest.mark.parametrize("case", list(CASES))
def test_full_sequence_logits_match(case):
    hf, ours = make_pair(case)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = hf(ids).logits
        got = ours(ids, torch.arange(40).expand(2, 40))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["llama-gqa-untied-llama3rope", "qwen2-bias", *WINDOWED])
def test_cached_decode_matches_full_forward(case):
    """Prefill 30 tokens, then feed 10 one at a time through the KV cache: same logits as one full pass."""
    hf, ours = make_pair(case)
    cfg = ours.config
    ids = torch.randint(0, COMMON["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = hf(ids).logits[0]
        cache = KVCache(cfg.num_layers, 1, cfg.num_kv_heads, 40, cfg.head_dim, torch.float32)
        steps = [ours(ids[:, :30], torch.arange(30)[None], cache.attention(0, ours.attention))[0]]
        for t in range(30, 40):
            steps.append(ours(ids[:, t : t + 1], torch.tensor([[t]]), cache.attention(t, ours.attention))[0])
    torch.testing.assert_close(torch.cat(steps), expected, atol=1e-4, rtol=1e-4)


def test_reference_attention_backend_gives_same_logits():
    _, ours = make_pair("llama-gqa-untied-llama3rope")
    ids = torch.randint(0, COMMON["vocab_size"], (1, 25), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        fast = ours(ids, torch.arange(25)[None])
        ours.set_attention_backend("reference")
        plain = ours(ids, torch.arange(25)[None])
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["qwen2-bias", "llama-gqa-untied-llama3rope"])
@torch.inference_mode()
def test_decoder_stack_equals_the_module_path_on_quantized_tiny_models(case):
    """Biases, head_dim 16 (the attention kernel's generic loop) and 4-bit / 8-bit layers through the one-call
    DecoderStack against the module path: the same bits (the default model's own test covers the common shapes)."""
    from leanlm.cache.paged_kv import PagedKVCache
    from leanlm.compress.quantize import install
    from leanlm.compress.rtn import quantize_rtn
    from leanlm.engine.paged_attention import SequenceSlice, build_paged_attention
    from leanlm.kernels.build import load_kernels
    from leanlm.models.registry import prepare_runtime

    if not load_kernels():
        pytest.skip("leanlm kernels unavailable")
    _, ours = make_pair(case)
    linears = {n: m for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("layers.")}
    bits = {name: 8 if "down_proj" in name else 4 for name in linears}  # both kernels in one stack
    install(ours, {n: quantize_rtn(m.weight.float(), bits[n], 32, bits[n] == 8) for n, m in linears.items()})
    prepare_runtime(ours, ours.plan.for_weights(quantized=True))
    assert ours.decoder_stack is not None
    c = ours.config
    ids = torch.randint(0, c.vocab_size, (1, 30), generator=torch.Generator().manual_seed(1))
    outputs = {}
    for use_stack in (True, False):
        saved, ours.decoder_stack = ours.decoder_stack, ours.decoder_stack if use_stack else None
        cache = PagedKVCache(c.num_layers, 4, 16, c.num_kv_heads, c.head_dim, torch.float32)
        logits = []
        for start, size in ((0, 25), (25, 1), (26, 4)):  # prefill, decode, a chunk over the cache
            attend = build_paged_attention(cache, ours.attention, [SequenceSlice(start, size, [2, 0], False)])
            logits.append(ours(ids[:, start : start + size], torch.arange(start, start + size)[None], attend=attend))
        ours.decoder_stack = saved
        outputs[use_stack] = torch.cat(logits, dim=1)
    assert torch.equal(outputs[True], outputs[False])


@pytest.mark.parametrize("case", ["llama-gqa-untied-llama3rope", *WINDOWED])
@torch.inference_mode()
def test_paged_decode_matches_transformers_past_the_window(case):
    """The engine's paged attention (scattered blocks, a prefill, single-token decodes past the window, a chunk over
    the cache, and a decode batched with another sequence) against transformers' full pass."""
    from leanlm.cache.paged_kv import PagedKVCache
    from leanlm.engine.paged_attention import SequenceSlice, build_paged_attention

    hf, ours = make_pair(case)
    c = ours.config
    ids = torch.randint(0, c.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    expected = hf(ids).logits
    cache = PagedKVCache(c.num_layers, 8, 16, c.num_kv_heads, c.head_dim, torch.float32)
    blocks = ([5, 1, 3], [2, 7, 4])
    got: list[list[torch.Tensor]] = [[], []]
    steps = [(0, 20), *((t, 1) for t in range(20, 30)), (30, 6)]
    for start, size in steps:  # sequence 0 alone
        attend = build_paged_attention(cache, ours.attention, [SequenceSlice(start, size, blocks[0], False)])
        got[0].append(ours(ids[:1, start : start + size], torch.arange(start, start + size)[None], attend=attend)[0])
    attend = build_paged_attention(cache, ours.attention, [SequenceSlice(0, 36, blocks[1], False)])
    got[1].append(ours(ids[1:, :36], torch.arange(36)[None], attend=attend)[0])
    for t in range(36, 40):  # both decode together: one padded, masked batch
        sequences = [SequenceSlice(t, 1, blocks[0], False), SequenceSlice(t, 1, blocks[1], False)]
        attend = build_paged_attention(cache, ours.attention, sequences)
        logits = ours(ids[:, t : t + 1].reshape(1, 2), torch.tensor([[t, t]]), attend=attend)[0]
        got[0].append(logits[:1])
        got[1].append(logits[1:])
    for row in (0, 1):
        torch.testing.assert_close(torch.cat(got[row]), expected[row], atol=1e-4, rtol=1e-4)


def test_decoder_stack_refuses_what_it_does_not_implement():
    """The C++ stack computes one layer function; a family that differs keeps the module path, with the reason."""
    from leanlm.models.stack import stack_refusal

    _, gemma = make_pair("gemma3")
    reason = stack_refusal(gemma.spec, gemma.config.head_dim)
    for part in ("norm offset", "other than silu", "query/key norms", "post-attention", "differ", "scale"):
        assert part in reason
    _, mistral = make_pair("mistral-window")
    assert "sliding-window" in stack_refusal(mistral.spec, mistral.config.head_dim)
    _, llama = make_pair("llama-mha-tied")
    assert stack_refusal(llama.spec, llama.config.head_dim) is None
