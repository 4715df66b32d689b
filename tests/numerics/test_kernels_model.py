"""The default model at its native 4-bit precision: leanlm's kernels against torch's (the fallback).

With float activations ("exact") the kernels (and the fused norm, RoPE and SiLU ops that come with them)
compute the same function as the fallback up to float32 rounding, so greedy tokens must be identical. With int8
activations ("auto", the default) each activation block is rounded to 1/127 of its largest value, as llama.cpp
does; there the bound is on agreement with the exact kernels: top-1 >= 90% of positions and mean KL <= 0.02 on
real text.
"""

from __future__ import annotations

import pytest
import torch

from leanlm.evaluate.corpus import evaluation_text
from leanlm.kernels.build import load_kernels
from leanlm.models.checkpoint import load_checkpoint
from leanlm.models.registry import build_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not load_kernels(), reason="leanlm kernels unavailable (no compiler or AVX2)"),
]

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def checkpoint(default_gguf_path):
    return load_checkpoint(default_gguf_path, torch.float32, native_quant=True)


def model_for(checkpoint, mode: str):
    model = build_model(checkpoint.config, checkpoint.weights, torch.float32, "cpu", mode)
    kernels = {m.kernel for m in model.modules() if hasattr(m, "kernel")}
    assert kernels == ({"int4pack", "dense"} if mode == "torch" else {"leanlm-q4", "leanlm-q8"})
    return model


@torch.inference_mode()
def greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """Full recompute each step (no cache): every row count stays under the kernels' dense threshold."""
    ids = list(ids)
    for _ in range(new_tokens):
        logits = model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), last_only=True)
        ids.append(int(logits[0, -1].argmax()))
    return ids


def test_exact_kernels_give_the_fallbacks_greedy_tokens(checkpoint):
    exact, fallback = model_for(checkpoint, "exact"), model_for(checkpoint, "torch")
    for prompt in PROMPTS:
        ids = checkpoint.tokenizer.encode(prompt)
        assert greedy(exact, ids, 16) == greedy(fallback, ids, 16), prompt


@torch.inference_mode()
def test_int8_activations_agree_with_exact_kernels(checkpoint):
    exact, fast = model_for(checkpoint, "exact"), model_for(checkpoint, "auto")
    tokens = checkpoint.tokenizer.encode(evaluation_text()[:20000])
    agree, kl, count = 0, 0.0, 0
    for start in range(0, 6 * 40, 40):  # 6 windows of 40 tokens: the matrix-vector path, not the dense one
        window = torch.tensor([tokens[start : start + 40]])
        positions = torch.arange(40).unsqueeze(0)
        reference = exact(window, positions).log_softmax(-1)[0]
        approximate = fast(window, positions).log_softmax(-1)[0]
        agree += int((reference.argmax(-1) == approximate.argmax(-1)).sum())
        kl += float((reference.exp() * (reference - approximate)).sum())
        count += 40
    assert agree / count >= 0.90
    assert kl / count <= 0.02
