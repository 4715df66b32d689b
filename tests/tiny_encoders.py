"""Tiny random encoder folders (config.json, model.safetensors, tokenizer.json) made with transformers, for tests."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "the a cat dog sat on mat query document is about cats dogs and of to in it was good bad".split()


def word_tokenizer(family: str):
    """A WordPiece tokenizer over WORDS with the family's special tokens and template (pairs too)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    if family == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        cls, sep, unk = "[CLS]", "[SEP]", "[UNK]"
    else:  # XLM-R: <s>=0, <pad>=1, </s>=2
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        cls, sep, unk = "<s>", "</s>", "<unk>"
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    tokenizer = Tokenizer(WordPiece(vocab, unk_token=unk))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    pair = f"{cls} $A:0 {sep}:0 $B:1 {sep}:1" if family == "bert" else f"{cls} $A:0 {sep}:0 {sep}:0 $B:0 {sep}:0"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A:0 {sep}:0", pair=pair, special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])]
    )
    return tokenizer, len(vocab)


def tiny_config(family: str, num_labels: int = 0, **overrides):
    import transformers

    vocab = len(WORDS) + 4
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if num_labels:
        common["num_labels"] = num_labels
    common.update(overrides)
    if family == "bert":
        return transformers.BertConfig(pad_token_id=0, **common)
    return transformers.XLMRobertaConfig(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1, **common)


def tiny_model(family: str, num_labels: int = 0, seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    config = tiny_config(family, num_labels, **overrides)
    names = {
        ("bert", False): "BertModel",
        ("bert", True): "BertForSequenceClassification",
        ("xlm-roberta", False): "XLMRobertaModel",
        ("xlm-roberta", True): "XLMRobertaForSequenceClassification",
    }
    model = getattr(transformers, names[family, bool(num_labels)])(config)
    with torch.no_grad():  # random LayerNorms too, so that a swapped weight and bias cannot pass
        for name, param in model.named_parameters():
            if "LayerNorm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def tiny_folder(path: Path, family: str, num_labels: int = 0, seed: int = 0, **overrides):
    """Save a tiny random model with a tokenizer; returns (folder, transformers model)."""
    model = tiny_model(family, num_labels, seed, **overrides)
    model.save_pretrained(path)
    tokenizer, _ = word_tokenizer(family)
    tokenizer.save(str(path / "tokenizer.json"))
    return path, model
