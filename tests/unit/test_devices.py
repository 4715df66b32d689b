"""Device and dtype choices (the CUDA path exists; without a GPU it must fail clearly)."""

import pytest
import torch

from leanlm.cache.kv_cache import default_cache_dtype
from leanlm.engine.llm import resolve_device, resolve_dtype
from leanlm.errors import InvalidRequestError


def test_auto_device_follows_cuda_availability():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(InvalidRequestError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_unknown_device_and_dtype():
    with pytest.raises(InvalidRequestError, match="Unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(InvalidRequestError, match="Unknown dtype 'int3'"):
        resolve_dtype("int3")
    assert resolve_dtype("auto") == torch.bfloat16 and resolve_dtype("float32") == torch.float32


def test_kv_cache_dtype_per_device():
    assert default_cache_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    assert default_cache_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16
