"""A corrupt pytorch_model.bin gives the same one-line ModelFormatError as a corrupt safetensors file."""

import pytest
import torch

from leanlm.errors import ModelFormatError
from leanlm.formats.loader import _read_hf_weights


def _saved(folder, name="pytorch_model.bin"):
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, folder / name)
    return folder / name


def test_intact_bin_loads(tmp_path):
    weights = _read_hf_weights(_saved(tmp_path).parent)
    torch.testing.assert_close(weights["w"], torch.arange(4096, dtype=torch.float32))


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # truncated download
        lambda data: b"not a checkpoint at all",  # not a zip archive
        lambda data: b"\x80\x02}q\x00."[:-1],  # a broken legacy pickle
    ],
)
def test_corrupt_bin_is_one_line_model_format_error(tmp_path, damage):
    path = _saved(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ModelFormatError, match=r"pytorch_model\.bin is corrupt.*Download it again") as info:
        _read_hf_weights(tmp_path)
    assert "\n" not in str(info.value)


def test_pickled_objects_are_refused_not_run(tmp_path):
    torch.save({"w": torch.ones(2), "code": print}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelFormatError, match="not a plain weights file"):
        _read_hf_weights(tmp_path)
