"""EngineConfig validation, size parsing for --kv-cache-memory, SamplingParams.logprobs bounds."""

import pytest

from leanlm.config import EngineConfig, parse_size
from leanlm.errors import InvalidRequestError
from leanlm.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "text,size",
    [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("100", 100), ("64 kib", 65536), (7, 7)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "2 GiBs", "-1GiB", "0"])
def test_parse_size_names_the_format(text):
    with pytest.raises(InvalidRequestError, match="2GiB|positive size"):
        parse_size(text)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_num_seqs=0),
        dict(max_num_batched_tokens=-1),
        dict(block_size=0),
        dict(kv_cache_memory=0),
        dict(num_kv_blocks=0),
    ],
)
def test_engine_config_rejects_bad_limits(kwargs):
    with pytest.raises(InvalidRequestError, match=next(iter(kwargs))):
        EngineConfig(**kwargs)


def test_engine_config_defaults():
    config = EngineConfig()
    assert (config.max_num_seqs, config.max_num_batched_tokens, config.block_size) == (64, 512, 16)
    assert config.kv_cache_memory is None and config.enable_prefix_caching


@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_logprobs_bounds(value):
    with pytest.raises(InvalidRequestError, match="logprobs"):
        SamplingParams(logprobs=value)
    assert SamplingParams(logprobs=20).logprobs == 20 and SamplingParams(logprobs=0).logprobs == 0
