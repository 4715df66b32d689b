"""A text encoder-decoder (Marian or T5) loaded from a Hugging Face folder, with `generate` and `translate`.

The folder holds config.json, safetensors (or pytorch_model*.bin) weights, optionally generation_config.json
(its defaults: beams, end and start tokens, forced end token, bad words, length penalty) and a tokenizer:
tokenizer.json (T5) or Marian's source.spm / target.spm / vocab.json (needs sentencepiece).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from leanlm.errors import InvalidRequestError, ModelFormatError, ModelNotFoundError
from leanlm.formats.loader import read_hf_config, read_hf_weights
from leanlm.formats.marian_tokenizer import MarianTokenizer, is_marian_tokenizer_folder
from leanlm.formats.tokenizer import Tokenizer
from leanlm.layers.onednn_linear import use_onednn
from leanlm.models import marian, t5
from leanlm.models.seq2seq import EncoderDecoderLM
from leanlm.translate.prompts import marian_target_token, t5_prefix
from leanlm.translate.search import SearchOptions, generate

FAMILIES = {name: family for family in (marian, t5) for name in family.MODEL_TYPES}
DEFAULT_MAX_NEW_TOKENS = 256


def is_seq2seq_folder(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") in FAMILIES
    except (json.JSONDecodeError, OSError):
        return False


def search_defaults(raw_config: dict, generation: dict, model: EncoderDecoderLM) -> SearchOptions:
    """The folder's generation defaults (generation_config.json over config.json), as transformers reads them."""
    merged = {**raw_config, **generation}
    cfg = model.config

    def first_id(value, fallback: int) -> int:
        value = value[0] if isinstance(value, list) and value else value
        return fallback if value is None else int(value)

    bad = tuple(ids[0] for ids in merged.get("bad_words_ids") or () if isinstance(ids, list) and len(ids) == 1)
    max_length = int(merged.get("max_length") or DEFAULT_MAX_NEW_TOKENS + 1)
    forced = merged.get("forced_eos_token_id")
    return SearchOptions(
        max_new_tokens=max(1, min(max_length - 1, DEFAULT_MAX_NEW_TOKENS, model.max_positions - 1)),
        num_beams=int(merged.get("num_beams") or 1),
        length_penalty=float(merged.get("length_penalty", 1.0)),
        early_stopping=merged.get("early_stopping", False),
        decoder_start_token_id=first_id(merged.get("decoder_start_token_id"), cfg.decoder_start_token_id),
        eos_token_id=first_id(merged.get("eos_token_id"), cfg.eos_token_id),
        pad_token_id=first_id(merged.get("pad_token_id"), cfg.pad_token_id),
        forced_eos_token_id=None if forced is None else first_id(forced, cfg.eos_token_id),
        suppress_token_ids=bad,
    )


class Seq2SeqModel:
    def __init__(self, model: EncoderDecoderLM, defaults: SearchOptions, tokenizer=None, path: Path | None = None):
        self.model, self.defaults, self.tokenizer, self.path = model, defaults, tokenizer, path

    def generate(
        self,
        input_ids: torch.Tensor | list[list[int]],
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        **overrides,
    ) -> list[list[int]]:
        """Source token ids (B, S) tensor (padded, with attention_mask) or a list of id lists -> per request the
        generated ids, the end token included when generated. Other SearchOptions fields can be overridden."""
        if isinstance(input_ids, list):
            input_ids, attention_mask = self._pad(input_ids)
        options = replace(self.defaults, **overrides)
        if max_new_tokens is not None:
            options = replace(options, max_new_tokens=max_new_tokens)
        if num_beams is not None:
            options = replace(options, num_beams=num_beams)
        if options.max_new_tokens >= self.model.max_positions:
            raise InvalidRequestError(
                f"max_new_tokens {options.max_new_tokens} is beyond this model's {self.model.max_positions} "
                "decoder positions (the start token takes one); ask for fewer."
            )
        if input_ids.shape[1] > self.model.max_positions:
            raise InvalidRequestError(
                f"the source has {input_ids.shape[1]} tokens; this model reads at most {self.model.max_positions}. "
                "Split the text into sentences."
            )
        vocab = self.model.config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise InvalidRequestError(
                f"source token ids must lie in [0, {vocab}); got {input_ids.min()}..{input_ids.max()}"
            )
        return generate(self.model, input_ids, attention_mask, options)

    def translate(
        self,
        texts: list[str],
        target: str | None = None,
        source: str | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
    ) -> list[str]:
        """Texts -> translations. T5 is told the languages by its task prefix (source default English); a Marian
        model translates its one pair, or, when multilingual, into `target` through its `>>xx<<` token."""
        if self.tokenizer is None:
            raise ModelFormatError(
                f"{self.path} has no tokenizer leanlm can read (tokenizer.json, or Marian's source.spm, target.spm "
                "and vocab.json): call generate() with token ids."
            )
        ids = [self.tokenizer.encode(self.source_text(text, target, source)) for text in texts]
        outputs = self.generate(ids, max_new_tokens=max_new_tokens, num_beams=num_beams)
        return [self.tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in outputs]

    def source_text(self, text: str, target: str | None, source: str | None) -> str:
        if target is None:
            return text
        if isinstance(self.model, t5.T5Model):
            return t5_prefix(target, source) + text
        token = marian_target_token(target)
        if isinstance(self.tokenizer, MarianTokenizer) and self.tokenizer.has_token(token):
            return f"{token} {text}"
        return text  # a one-pair Marian model: the pair is the model's

    def _pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not sequences or any(not seq for seq in sequences):
            raise InvalidRequestError("each source needs at least one token")
        longest = max(len(seq) for seq in sequences)
        ids = torch.full((len(sequences), longest), self.defaults.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return ids, (None if bool(mask.all()) else mask)


def load_seq2seq(path: str | Path, dtype: torch.dtype = torch.float32) -> Seq2SeqModel:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} is not a Hugging Face model folder (no config.json).")
    raw = read_hf_config(path)
    family = FAMILIES.get(raw.get("model_type"))
    if family is None:
        raise ModelFormatError(
            f"{path} has model_type {raw.get('model_type')!r}; leanlm's text encoder-decoders are {sorted(FAMILIES)}."
        )
    model = use_onednn(family.from_hf(raw, read_hf_weights(path), dtype))  # float32 products on oneDNN, not MKL
    generation_file = path / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
    defaults = search_defaults(raw, generation, model)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_folder(path)
    elif is_marian_tokenizer_folder(path):
        tokenizer = MarianTokenizer(path, defaults.eos_token_id, defaults.pad_token_id)
    return Seq2SeqModel(model, defaults, tokenizer, path)
