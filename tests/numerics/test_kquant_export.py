"""`--export-gguf --gguf-kquants` on the default model, mixed precision included: llama.cpp loads the Q4_K/Q6_K
file and its logits stay close to leanlm's quantized model."""

import numpy as np
import pytest
import torch

from leanlm import LLM
from leanlm.compress.config import QuantConfig
from leanlm.compress.quantize import quantize
from leanlm.evaluate.corpus import evaluation_text

pytestmark = pytest.mark.slow


def test_llama_cpp_reads_the_kquant_export_of_a_mixed_model(default_gguf_path, tmp_path):
    pytest.importorskip("llama_cpp")
    from leanlm.bench.engines import llama_cpp_model
    from leanlm.compress.gguf_writer import write_gguf
    from leanlm.formats.gguf import GGUFFile

    llm = LLM(default_gguf_path, dtype="float32", dequantize=True)
    quantize(llm, QuantConfig("int4", group_size=32, layer_bits=(("layers.0", 8), ("layers.1", 8))))
    path = write_gguf(llm, default_gguf_path, tmp_path / "model.gguf", kquants=True)
    exported = GGUFFile(path)
    types = {
        "blk.3.ffn_down.weight": "Q4_K",  # 4 bits, rows of 1536 = 6 x 256
        "blk.0.ffn_down.weight": "Q6_K",  # raised to 8 bits by the mixed allocation
        "blk.3.attn_q.weight": "Q4_1",  # rows of 576: no K-quant, the exact 4-bit mapping
        "blk.0.attn_q.weight": "Q8_0",
        "token_embd.weight": "Q8_0",  # the int8 embedding as it is
    }
    assert {name: exported.tensor_type_name(name) for name in types} == types

    ids = llm.tokenizer.encode(evaluation_text(quiet=True)[:2000])[:128]
    with torch.inference_mode():
        ours = llm.model(torch.tensor([ids]), torch.arange(len(ids))[None])[0].float().log_softmax(-1)
    runner = llama_cpp_model(path, extra_bufts=False, n_ctx=256, logits_all=True, verbose=False)
    runner.eval(ids)
    theirs = torch.from_numpy(np.asarray(runner.scores[: len(ids)], dtype=np.float32)).log_softmax(-1)
    kl = (ours.exp() * (ours - theirs)).sum(-1).mean().item()
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    # the Q4_K/Q6_K re-rounding plus llama.cpp's int8 activations (figures: BENCHMARKS.md, "Compact artifacts")
    assert kl < 0.05 and top1 > 0.88, (kl, top1)
