"""Turn the `tokenizer.ggml.*` metadata of a GGUF file into a `tokenizers.Tokenizer`.

A GGUF carries no tokenizer.json, only llama.cpp's description of the vocabulary. Two kinds are supported:

* "gpt2": byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM, ...). The split regex is chosen from `tokenizer.ggml.pre`.
* "llama": SentencePiece BPE (Llama 2, Mistral v0.1, TinyLlama, ...). Merges are rebuilt from the token scores.

The result matches what transformers builds from the same file (checked in tests/numerics/test_tokenizer_parity.py),
except where noted: `add_space_prefix = false` is honoured and SmolLM/StarCoder split digits like llama.cpp does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from leanlm.errors import ModelFormatError

logger = logging.getLogger(__name__)

SUPPORTED_MODELS = ("gpt2", "llama")

# llama.cpp token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Token texts that end a turn; llama.cpp stops on these as well as on the declared EOS.
END_OF_TURN_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "<|return|>",
        "<｜end▁of▁sentence｜>",
    }
)

# Split regexes, as written in the tokenizer.json of the models that introduced them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O_SPLIT = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_SPLIT_BY_PRE = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "kormo"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2", "kanana2"), _GPT4O_SPLIT),
}
# These vocabularies were trained with every digit on its own (a `Digits` step before GPT-2's regex).
_DIGIT_PRES = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})
_GPT2_PRES = frozenset({"default", "gpt-2", "gpt2", "mpt", "olmo", "jais"})


@dataclass(frozen=True)
class GGUFVocabulary:
    """The backend tokenizer plus the special-token facts the `Tokenizer` wrapper needs."""

    backend: BackendTokenizer
    bos_token_id: int | None
    eos_token_ids: frozenset[int]
    special_tokens: dict[str, str]  # bos_token/eos_token/unk_token/pad_token -> text, for chat templates
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def build_vocabulary(metadata: dict[str, Any]) -> GGUFVocabulary:
    model = metadata.get("tokenizer.ggml.model")
    if model not in SUPPORTED_MODELS:
        raise ModelFormatError(
            f"GGUF tokenizer model {model!r} (tokenizer.ggml.model) is not supported; leanlm reads "
            f"{', '.join(repr(m) for m in SUPPORTED_MODELS)}. "
            "Use a Hugging Face model folder with a tokenizer.json instead."
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelFormatError("The GGUF file has no tokenizer.ggml.tokens list, so it carries no vocabulary.")
    types = list(metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ModelFormatError(
            f"The GGUF file lists {len(tokens)} tokens but {len(types)} token types; the file is corrupt."
        )
    ids = _special_ids(metadata, len(tokens))
    backend = _byte_level_bpe(metadata, tokens) if model == "gpt2" else _sentencepiece_bpe(metadata, tokens)
    _add_special_tokens(backend, metadata, tokens, types, ids, byte_level=model == "gpt2")
    # llama.cpp prepends BOS to SentencePiece vocabularies unless the file says otherwise, and not to BPE ones.
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", model == "llama")) and ids.get("bos") is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and ids.get("eos") is not None
    backend.post_processor = template_processor(
        tokens[ids["bos"]] if add_bos else None, ids.get("bos"), tokens[ids["eos"]] if add_eos else None, ids.get("eos")
    )
    names = {"bos": "bos_token", "eos": "eos_token", "unk": "unk_token", "pad": "pad_token"}
    return GGUFVocabulary(
        backend=backend,
        bos_token_id=ids.get("bos"),
        eos_token_ids=_end_of_turn_ids(tokens, types, ids),
        special_tokens={names[key]: tokens[ids[key]] for key in names if ids.get(key) is not None},
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def template_processor(bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None):
    """A post-processor that wraps one sequence in BOS/EOS (either may be None, meaning not added)."""
    prefix = f"{bos}:0 " if bos is not None else ""
    suffix = f" {eos}:0" if eos is not None else ""
    pair_prefix = f" {bos}:1" if bos is not None else ""
    pair_suffix = f" {eos}:1" if eos is not None else ""
    special = [(bos, bos_id)] if bos is not None else []
    if eos is not None and eos != bos:
        special.append((eos, eos_id))
    return processors.TemplateProcessing(
        single=f"{prefix}$A:0{suffix}",
        pair=f"{prefix}$A:0{suffix}{pair_prefix} $B:1{pair_suffix}",
        special_tokens=special,
    )


def _special_ids(metadata: dict[str, Any], n_tokens: int) -> dict[str, int]:
    keys = {
        "bos": "bos_token_id",
        "eos": "eos_token_id",
        "unk": "unknown_token_id",
        "pad": "padding_token_id",
        "eot": "eot_token_id",
        "eom": "eom_token_id",
    }
    ids = {}
    for name, key in keys.items():
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is None:
            continue
        if not 0 <= int(value) < n_tokens:
            # llama.cpp ignores out-of-range ids with a warning; some converters write -1 for "none".
            logger.warning(
                "GGUF tokenizer.ggml.%s = %s is outside the %d-token vocabulary; ignored.", key, value, n_tokens
            )
            continue
        ids[name] = int(value)
    return ids


def _end_of_turn_ids(tokens: list[str], types: list[int], ids: dict[str, int]) -> frozenset[int]:
    declared = {ids[key] for key in ("eos", "eot", "eom") if key in ids}
    by_text = {
        i
        for i, (text, kind) in enumerate(zip(tokens, types, strict=True))
        if kind in (CONTROL, USER_DEFINED) and text in END_OF_TURN_TEXTS
    }
    return frozenset(declared | by_text)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves."""
    table = {b: chr(b) for b in [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]}
    shifted = (b for b in range(256) if b not in table)
    for offset, byte in enumerate(shifted):
        table[byte] = chr(0x100 + offset)
    return table


def _byte_level_bpe(metadata: dict[str, Any], tokens: list[str]) -> BackendTokenizer:
    table = _byte_alphabet()
    alphabet = set(table.values())
    # Some converters store a token as its text rather than its byte spelling; respell those so BPE can reach them.
    vocab = {
        token if set(token) <= alphabet else "".join(table[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    merges = _file_merges(metadata)
    if merges is None:
        raise ModelFormatError("The GGUF file has a byte-level BPE vocabulary but no tokenizer.ggml.merges list.")
    backend = BackendTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            fuse_unk=False,
            continuing_subword_prefix="",
            end_of_word_suffix="",
        )
    )
    backend.pre_tokenizer = _byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"))
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_level_pre_tokenizer(pre: str):
    if pre in _SPLIT_BY_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_BY_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre not in _GPT2_PRES:
        # transformers and llama.cpp's default both fall back to GPT-2's regex; say so, since it may split differently.
        logger.warning("Unknown GGUF pre-tokenizer %r (tokenizer.ggml.pre); splitting text with GPT-2's regex.", pre)
    return gpt2


def _sentencepiece_bpe(metadata: dict[str, Any], tokens: list[str]) -> BackendTokenizer:
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _file_merges(metadata)
    if merges is None:
        scores = metadata.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise ModelFormatError(
                "The GGUF SentencePiece vocabulary has no usable tokenizer.ggml.scores list "
                "(one score per token), so its merges cannot be rebuilt."
            )
        merges = _merges_from_scores(tokens, scores, vocab)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    backend = BackendTokenizer(
        models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    # SentencePiece writes spaces as "▁" and, unless told not to, puts one in front of the text.
    add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _file_merges(metadata: dict[str, Any]) -> list[tuple[str, str]] | None:
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is None:
        return None
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ModelFormatError(f"GGUF merge {merge!r} is not two tokens separated by a space; the file is corrupt.")
        pairs.append((left, right))
    return pairs


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE joins the adjacent pair whose joined piece scores highest; rank merges the same way."""
    ranked = []
    for piece, score in dict(zip(tokens, scores, strict=True)).items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        ranked.extend((score, left, right) for left, right in splits)
    # Stable sort: best score first, then longer left/right parts (the tie order transformers uses).
    ranked.sort(key=lambda item: (-item[0], -len(item[1]), -len(item[2])))
    return [(left, right) for _, left, right in ranked]


def _add_special_tokens(
    backend: BackendTokenizer,
    metadata: dict[str, Any],
    tokens: list[str],
    types: list[int],
    ids: dict[str, int],
    byte_level: bool,
) -> None:
    """Control tokens (and the declared bos/eos/unk/pad) are matched whole in text and skipped when decoding;
    user-defined ones are matched whole but kept."""
    alphabet = set(_byte_alphabet().values()) if byte_level else None
    special_ids = {i for i, kind in enumerate(types) if kind == CONTROL}
    special_ids |= {ids[key] for key in ("bos", "eos", "unk", "pad") if key in ids}
    special = [
        # A byte-level "control" token spelled outside the byte alphabet is a converter mislabel (transformers
        # skips it too); adding it would grow the vocabulary past the model's embedding size.
        AddedToken(tokens[i], special=True, normalized=False)
        for i in sorted(special_ids)
        if alphabet is None or set(tokens[i]) <= alphabet
    ]
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, kind in enumerate(types)
        if kind == USER_DEFINED and i not in special_ids and (alphabet is None or set(tokens[i]) <= alphabet)
    ]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)
