"""Our tokenizer against the references: transformers (from the same GGUF / folder) and sentencepiece itself."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from leanlm.formats.gguf import GGUFFile
from leanlm.formats.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'm sure you're right; they'll say he'd've LIKED IT'S fine, we've done it.",
    "你好，世界！这是一个测试。机器学习模型可以理解中文吗？",
    "def f(x):\n\tif x:\n\t\treturn x  # two spaces\n    else:\n        return [i ** 2 for i in range(10)]\n",
    "I ❤️ 🦀! Family: 👨‍👩‍👧‍👦, thumbs 👍🏽, flag 🏳️‍🌈, 😀😃😄",
    "a  b   c    d\n\n\n  e \n\t \r\n  end",
    "   leading spaces",
    "trailing spaces   ",
    "\n\n",
    " ",
    "Café naïve façade Ærøskøbing Straße Ελληνικά русский язык",
    "12345678",
    "pi = 3.14159, 1,000,000 and 2024-01-01T12:34:56Z; x1y22z333",
    "مرحبا بالعالم नमस्ते दुनिया こんにちは世界 안녕하세요",
    "Ünïcödé 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ — “quotes” ‘single’ … «guillemets»",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|endoftext|>",
    "a<|im_end|>b <|im_start|> c",
    "<|im_start|",  # an incomplete special token is plain text
]

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris. It has about 2.1 million inhabitants."},
    {"role": "user", "content": "And of Japan? Answer in 日本語 please 🙂"},
]
WITH_SYSTEM = [{"role": "system", "content": "You answer briefly."}, *CONVERSATION]


def _random_ids(vocab_size: int, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(1, 40))] for _ in range(count)]


def _assert_same_tokenizer(ours: Tokenizer, hf, texts: list[str]) -> None:
    for text in texts:
        for add_special in (True, False):
            expected = hf.encode(text, add_special_tokens=add_special)
            assert ours.encode(text, add_special_tokens=add_special) == expected, (text, add_special)
        ids = hf.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (text, skip)
    # Arbitrary id sequences, including special tokens and partial UTF-8 sequences.
    for ids in _random_ids(ours.vocab_size, 50, seed=0):
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids


def _assert_streaming_matches(ours: Tokenizer, texts: list[str]) -> None:
    for text in texts:
        ids = ours.encode(text)
        stream = IncrementalDetokenizer(ours)
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == ours.decode(ids), text


# ---- the real default model (byte-level BPE, tokenizer.ggml.pre = "smollm") -----------------------------------


@pytest.fixture(scope="module")
def default_ours(default_gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(GGUFFile(default_gguf_path).metadata)


@pytest.fixture(scope="module")
def default_hf(default_gguf_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(default_gguf_path.parent), gguf_file=default_gguf_path.name)


@pytest.mark.slow
def test_gguf_byte_level_matches_transformers(default_ours, default_hf):
    _assert_same_tokenizer(default_ours, default_hf, TEXTS)
    assert default_ours.vocab_size == len(default_hf)
    assert default_ours.bos_token_id == default_hf.bos_token_id
    assert default_hf.eos_token_id in default_ours.eos_token_ids
    assert default_ours.encode("<|im_start|><|im_end|>") == [1, 2]


@pytest.mark.slow
def test_gguf_streaming_equals_full_decode(default_ours):
    _assert_streaming_matches(default_ours, TEXTS)


@pytest.mark.slow
@pytest.mark.parametrize("messages", [CONVERSATION, WITH_SYSTEM], ids=["no-system", "system"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_template_matches_transformers(default_ours, default_hf, messages, add_generation_prompt):
    expected = default_hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert default_ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    # The rendered prompt also tokenizes identically (its special tokens map to their ids).
    assert default_ours.encode(expected) == default_hf.encode(expected)


@pytest.mark.slow
def test_from_folder_matches_transformers(default_ours, default_hf, tmp_path):
    from transformers import AutoTokenizer

    default_hf.save_pretrained(tmp_path)
    ours, hf = Tokenizer.from_folder(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    _assert_same_tokenizer(ours, hf, TEXTS)
    assert ours.apply_chat_template(WITH_SYSTEM) == hf.apply_chat_template(
        WITH_SYSTEM, tokenize=False, add_generation_prompt=True
    )
    assert ours.bos_token_id == default_ours.bos_token_id
    assert ours.eos_token_ids == default_ours.eos_token_ids


@pytest.mark.slow
def test_to_folder_files_reloads_in_both(default_ours, tmp_path):
    from transformers import AutoTokenizer

    default_ours.to_folder_files(tmp_path)
    ours, hf = Tokenizer.from_folder(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    _assert_same_tokenizer(ours, hf, TEXTS)
    for text in TEXTS:
        assert ours.encode(text) == default_ours.encode(text)
    assert ours.apply_chat_template(CONVERSATION) == default_ours.apply_chat_template(CONVERSATION)
    assert ours.eos_token_ids == default_ours.eos_token_ids


# ---- a SentencePiece ("llama") vocabulary, trained here and written to a tiny GGUF ----------------------------

SPM_TEXTS = [
    "",
    "hello world",
    "The quick brown fox jumps over the lazy dog 42 times.",
    "über café naïve Straße",
    "数据模型 and 模型数据",
    "Привет мир 😀 👨‍👩‍👧 ❤️ ∑",  # absent from the training text: byte fallback
    "tabs\tand\nnewlines\n\nand  double  spaces",
    "trailing space ",
    "<s>hello</s> world <unk>",
]
# Texts with leading whitespace are left out of the sentencepiece comparison: sentencepiece adds its "▁" prefix
# even before "▁▁", while transformers' Metaspace (and so we) do not. transformers stays the reference for those.
LEADING_SPACE_TEXTS = ["  two leading spaces", " one", "\tleading tab"]


def _training_text(path: Path) -> None:
    rng = random.Random(1)
    words = [
        "hello",
        "world",
        "token",
        "stream",
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "times",
        "über",
        "café",
        "naïve",
        "Straße",
        "数据",
        "模型",
        "and",
        "tabs",
        "spaces",
        "newlines",
    ]
    lines = []
    for index in range(2000):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        lines.append(f"{line} {rng.randint(0, 999)}" if index % 3 == 0 else line)
    path.write_text("\n".join(lines), encoding="utf-8")


def _write_llama_gguf(path: Path, processor) -> None:
    import gguf

    tokens, scores, types = [], [], []
    for i in range(processor.get_piece_size()):
        tokens.append(processor.id_to_piece(i))
        scores.append(processor.get_score(i))
        kind = (
            gguf.TokenType.UNKNOWN
            if processor.is_unknown(i)
            else gguf.TokenType.CONTROL
            if processor.is_control(i)
            else gguf.TokenType.BYTE
            if processor.is_byte(i)
            else gguf.TokenType.NORMAL
        )
        types.append(int(kind))
    writer = gguf.GGUFWriter(str(path), "llama")
    # A minimal llama config and one tensor: transformers reads the architecture before it builds the tokenizer.
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(processor.bos_id())
    writer.add_eos_token_id(processor.eos_id())
    writer.add_unk_token_id(processor.unk_id())
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """(sentencepiece processor, path of a tiny GGUF holding its vocabulary)."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("gguf")
    folder = tmp_path_factory.mktemp("spm")
    _training_text(folder / "corpus.txt")
    # Identity normalization and kept whitespace: GGUF tokenizers (llama.cpp, transformers) do not normalize.
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"),
        model_prefix=str(folder / "tiny"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_file=str(folder / "tiny.model"))
    _write_llama_gguf(folder / "tiny.gguf", processor)
    return processor, folder / "tiny.gguf"


@pytest.fixture(scope="module")
def spm_ours(spm_model) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(GGUFFile(spm_model[1]).metadata)


def test_llama_gguf_matches_sentencepiece(spm_model, spm_ours):
    processor, _ = spm_model
    for text in SPM_TEXTS:
        if "<s>" in text:
            continue  # sentencepiece never parses control tokens out of text
        expected = processor.encode(text)
        assert spm_ours.encode(text, add_special_tokens=False) == expected, text
        assert spm_ours.encode(text) == [processor.bos_id(), *expected], text  # no add_bos_token key: BOS is added
        assert spm_ours.decode(expected) == processor.decode(expected), text
    assert any(processor.is_byte(i) for i in spm_ours.encode(SPM_TEXTS[5])), "byte fallback was not exercised"


def test_llama_gguf_streaming_equals_full_decode(spm_ours):
    _assert_streaming_matches(spm_ours, SPM_TEXTS + LEADING_SPACE_TEXTS)


@pytest.mark.slow
def test_llama_gguf_matches_transformers(spm_model, spm_ours, tmp_path):
    from transformers import AutoTokenizer

    path = spm_model[1]
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _assert_same_tokenizer(spm_ours, hf, SPM_TEXTS + LEADING_SPACE_TEXTS)
    assert spm_ours.bos_token_id == hf.bos_token_id
    assert spm_ours.eos_token_ids == {hf.eos_token_id}
    # Saved by leanlm, the vocabulary (with its add-BOS rule) reloads the same in transformers.
    spm_ours.to_folder_files(tmp_path)
    _assert_same_tokenizer(spm_ours, AutoTokenizer.from_pretrained(tmp_path), SPM_TEXTS + LEADING_SPACE_TEXTS)
