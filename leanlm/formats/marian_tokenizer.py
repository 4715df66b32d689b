"""Marian's tokenizer: SentencePiece pieces (source.spm to encode, target.spm to decode) mapped through vocab.json.

opus-mt folders ship no tokenizer.json, so the `tokenizers` library cannot read them; this needs the
`sentencepiece` package (`pip install leanlm[translate]`). Encoding appends the end token, as MarianTokenizer does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from leanlm.errors import InvalidRequestError, ModelFormatError

FILES = ("source.spm", "target.spm", "vocab.json")


def is_marian_tokenizer_folder(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILES)


class MarianTokenizer:
    def __init__(self, folder: str | Path, eos_token_id: int, pad_token_id: int):
        folder = Path(folder)
        try:
            import sentencepiece
        except ImportError as exc:
            raise ModelFormatError(
                f"{folder} holds a Marian tokenizer (SentencePiece .spm files), which needs the sentencepiece "
                "package: pip install leanlm[translate]"
            ) from exc
        self.source = sentencepiece.SentencePieceProcessor(model_file=str(folder / "source.spm"))
        self.target = sentencepiece.SentencePieceProcessor(model_file=str(folder / "target.spm"))
        self.vocab: dict[str, int] = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        self.pieces = {index: piece for piece, index in self.vocab.items()}
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.unk_token_id = self.vocab.get("<unk>", 1)
        self.special_ids = {eos_token_id, pad_token_id, self.unk_token_id}

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"Text to translate must be a string, got {type(text).__name__}.")
        prefix = []
        end = text.find("<<")
        if text.startswith(">>") and end != -1:  # a multilingual model's target language, as MarianTokenizer reads it
            prefix, text = [self.vocab.get(text[: end + 2], self.unk_token_id)], text[end + 2 :]
        pieces = self.source.encode(text, out_type=str)
        return prefix + [self.vocab.get(piece, self.unk_token_id) for piece in pieces] + [self.eos_token_id]

    def has_token(self, token: str) -> bool:
        return token in self.vocab

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        pieces = [
            self.pieces.get(int(i), "<unk>") for i in ids if not (skip_special_tokens and int(i) in self.special_ids)
        ]
        return self.target.decode_pieces(pieces).replace("\u2581", " ").strip()
