"""The default model's weights in bfloat16 on leanlm's 16-bit kernels, against the same weights dense in float32,
and a Hugging Face folder of them against the GGUF they came from (one code path after load).

Tolerances on a 40-token text (log-probabilities over the vocabulary): mode exact (float32 activations) KL < 1e-6
(measured 5e-9); mode auto (activations rounded to bfloat16, as llama.cpp runs BF16 files) KL < 1e-3 (measured
7.5e-5; dense bfloat16 through torch measured 8e-4); top-1 equal on every position in both.
"""

from __future__ import annotations

import json

import pytest
import torch

from leanlm.kernels.build import load_kernels

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not load_kernels(), reason="leanlm kernels unavailable (no compiler or AVX2)"),
]

TEXT = (
    "The history of the Roman Empire spans many centuries, from the founding of the city to the fall of "
    "Constantinople in 1453, and its legacy shaped law, language and architecture across Europe."
)


@torch.inference_mode()
def log_probs(llm, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(llm.model(torch.tensor([ids]), torch.arange(len(ids))[None]).float()[0], -1)


@pytest.fixture(scope="module")
def reference(default_gguf_path):
    from leanlm import LLM

    return LLM(default_gguf_path, dtype="float32", dequantize=True, threads=2)


@pytest.mark.parametrize("kernels,bound", [("exact", 1e-6), ("auto", 1e-3)])
def test_bfloat16_weights_on_the_kernels_match_float32(default_gguf_path, reference, kernels, bound):
    from leanlm import LLM

    # the Q4_1 file's values are exact in bfloat16 only up to rounding: the reference reads the rounded values
    half = LLM(default_gguf_path, dtype="bfloat16", dequantize=True, threads=2, kernels=kernels)
    assert half.plan.half_weights and half.model.decoder_stack is not None
    for module in reference.model.modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
            module.weight.data = module.weight.data.bfloat16().float()
    ids = reference.tokenizer.encode(TEXT)
    want, got = log_probs(reference, ids), log_probs(half, ids)
    kl = float((want.exp() * (want - got)).sum(-1).mean())
    assert kl < bound, kl
    assert torch.equal(want.argmax(-1), got.argmax(-1))


def test_a_bfloat16_folder_runs_as_its_gguf(default_gguf_path, tmp_path):
    """Same weights, same path after load: identical logits and greedy tokens."""
    from safetensors.torch import save_file

    from leanlm import LLM, SamplingParams
    from leanlm.compress.artifact import hf_config_dict
    from leanlm.models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(default_gguf_path, torch.bfloat16)
    save_file({k: v.contiguous() for k, v in checkpoint.weights.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(checkpoint.config)))
    checkpoint.tokenizer.to_folder_files(tmp_path)
    folder, gguf = LLM(tmp_path, threads=2), LLM(default_gguf_path, dequantize=True, threads=2)
    assert folder.plan.half_weights and folder.model.decoder_stack is not None
    ids = gguf.tokenizer.encode(TEXT)
    assert torch.equal(log_probs(folder, ids), log_probs(gguf, ids))
    params = SamplingParams(max_tokens=16, temperature=0)
    assert folder.generate(TEXT, params)[0].token_ids == gguf.generate(TEXT, params)[0].token_ids
