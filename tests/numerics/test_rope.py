"""RoPE frequencies for every rope_scaling variant we claim, against transformers' own initializers."""

import pytest
import torch

from leanlm.layers.rope import apply_rotary, inverse_frequencies
from leanlm.models.registry import config_from_hf

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

BASE = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 256,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 4096,
}
VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_inverse_frequencies_match_transformers(name):
    theta = 500000.0
    scaling = VARIANTS[name]
    hf_config = transformers.LlamaConfig(
        **{k: v for k, v in BASE.items() if k != "model_type"}, rope_parameters={"rope_theta": theta, **scaling}
    )
    seq_len = 8192  # beyond the trained context, so "dynamic" actually rescales
    expected, expected_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config, "cpu", seq_len=seq_len)
    config = config_from_hf({**BASE, "rope_parameters": {"rope_theta": theta, **scaling}})
    ours, scale = inverse_frequencies(
        config.head_dim, config.rope_theta, config.rope_scaling, config.context_length, seq_len
    )
    torch.testing.assert_close(ours, expected.float(), rtol=1e-5, atol=1e-9)
    assert scale == pytest.approx(expected_scale)


def test_rotation_preserves_norm_and_relative_angle():
    """RoPE property: <R(m) q, R(n) k> depends only on m - n."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 64, generator=gen, dtype=torch.float64)
    inv_freq, _ = inverse_frequencies(64, 10000.0, None, 4096, 4096)

    def rotate(x, pos):
        angles = torch.cat([pos * inv_freq, pos * inv_freq]).double()
        return apply_rotary(x.view(1, 1, 1, 64), angles.cos(), angles.sin()).view(64)

    assert rotate(q, 7).norm().item() == pytest.approx(q.norm().item())
    assert torch.dot(rotate(q, 10), rotate(k, 3)).item() == pytest.approx(
        torch.dot(rotate(q, 107), rotate(k, 100)).item()
    )
