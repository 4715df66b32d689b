"""GGUF export (for llama.cpp peers): metadata kept, weights re-encoded within the target format's error."""

import pytest
import torch

from leanlm.errors import InvalidRequestError
from leanlm.formats.gguf import GGUFFile
from leanlm.formats.gguf_export import export_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(default_gguf_path):
    return GGUFFile(default_gguf_path)


@pytest.mark.parametrize("type_name,rel_error", [("F16", 1e-3), ("Q8_0", 1e-2)])
def test_export_roundtrip(tmp_path, source, type_name, rel_error):
    target = export_gguf(source.path, tmp_path / f"m.{type_name}.gguf", type_name)
    exported = GGUFFile(target)
    assert exported.metadata["tokenizer.ggml.tokens"] == source.metadata["tokenizer.ggml.tokens"]
    assert exported.metadata["tokenizer.chat_template"] == source.metadata["tokenizer.chat_template"]
    assert exported.metadata["llama.block_count"] == 30
    assert exported.tensor_type_name("blk.0.attn_q.weight") == type_name
    assert exported.tensor_type_name("blk.0.attn_norm.weight") == "F32"  # vectors stay float32
    for name in ("blk.0.attn_q.weight", "blk.29.ffn_down.weight", "token_embd.weight"):
        original, copy = source.load_tensor(name), exported.load_tensor(name)
        error = (copy - original).norm() / original.norm()
        assert error < rel_error, (name, error)
    torch.testing.assert_close(exported.load_tensor("output_norm.weight"), source.load_tensor("output_norm.weight"))
    assert not (tmp_path / f"m.{type_name}.gguf.partial").exists()


def test_export_rejects_unknown_type(tmp_path, source):
    with pytest.raises(InvalidRequestError, match="Q3_K"):
        export_gguf(source.path, tmp_path / "x.gguf", "Q3_K")
