import pytest

from leanlm.errors import ModelFormatError, UnsupportedArchitectureError
from leanlm.models.registry import config_from_gguf, config_from_hf

HF_LLAMA = {
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
}


def test_hf_config():
    config = config_from_hf(HF_LLAMA)
    assert (config.head_dim, config.num_kv_heads, config.rope_theta) == (16, 2, 500000.0)
    assert config.rope_scaling["rope_type"] == "llama3"


def test_unknown_architecture_names_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="gpt_neox.*llama"):
        config_from_hf({**HF_LLAMA, "model_type": "gpt_neox"})
    with pytest.raises(UnsupportedArchitectureError, match="'falcon'"):
        config_from_gguf({"general.architecture": "falcon"})


def test_missing_key_and_bad_gqa():
    broken = dict(HF_LLAMA)
    del broken["hidden_size"]
    with pytest.raises(ModelFormatError, match="hidden_size"):
        config_from_hf(broken)
    with pytest.raises(ModelFormatError, match="multiple"):
        config_from_hf({**HF_LLAMA, "num_key_value_heads": 3})


def test_gguf_metadata():
    meta = {
        "general.architecture": "llama",
        "llama.block_count": 30,
        "llama.context_length": 8192,
        "llama.embedding_length": 576,
        "llama.feed_forward_length": 1536,
        "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3,
        "llama.rope.freq_base": 100000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.vocab_size": 49152,
    }
    config = config_from_gguf(meta)
    assert (config.num_layers, config.head_dim, config.num_kv_heads, config.context_length) == (30, 64, 3, 8192)
    assert config.replace(tie_word_embeddings=True).num_parameters() == 134_515_008  # SmolLM2-135M
