import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    from leanlm.formats.assets import default_model_path

    return default_model_path(quiet=True)
