import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    from leanlm.formats.assets import default_model_path

    return default_model_path(quiet=True)


@pytest.fixture(scope="session")
def transformers_reference(default_gguf_path):
    """transformers' own model on the same GGUF, dequantized by transformers (slow: ~20-35 s, loaded once)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf_path.parent, gguf_file=default_gguf_path.name, dtype=torch.float32
    ).eval()
