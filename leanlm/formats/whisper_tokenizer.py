"""Whisper's tokenizer: byte-level BPE text tokens (tokenizer.json) plus its special and timestamp tokens.

Special tokens follow the text vocabulary: <|endoftext|>, <|startoftranscript|>, one token per language,
<|translate|>, <|transcribe|>, <|startoflm|>, <|startofprev|>, <|nospeech|>, <|notimestamps|>, then 1501
timestamp tokens <|0.00|> .. <|30.00|> in 20 ms steps (these are not in tokenizer.json; their ids are computed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from leanlm.errors import InvalidRequestError, ModelFormatError

TIME_PRECISION = 0.02  # seconds per timestamp token


@dataclass
class WhisperTokenizer:
    backend: object  # tokenizers.Tokenizer
    eot: int
    sot: int
    translate: int
    transcribe: int
    sot_prev: int
    no_speech: int
    no_timestamps: int
    languages: dict[str, int]  # "en" -> token id

    @classmethod
    def from_file(cls, path: str | Path) -> WhisperTokenizer:
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ModelFormatError(f"{path} does not exist: a Whisper model folder needs its tokenizer.json.")
        backend = Tokenizer.from_file(str(path))

        def tid(token: str) -> int | None:
            return backend.token_to_id(token)

        sot, eot, translate, no_ts = (
            tid("<|startoftranscript|>"),
            tid("<|endoftext|>"),
            tid("<|translate|>"),
            tid("<|notimestamps|>"),
        )
        if None in (sot, eot, translate, no_ts):
            raise ModelFormatError(f"{path} is not a Whisper tokenizer (no <|startoftranscript|> / <|notimestamps|>).")
        languages = {}
        for token_id in range(sot + 1, translate):
            token = backend.id_to_token(token_id)
            languages[token[2:-2]] = token_id
        no_speech = tid("<|nospeech|>")
        return cls(
            backend=backend,
            eot=eot,
            sot=sot,
            translate=translate,
            transcribe=tid("<|transcribe|>"),
            sot_prev=tid("<|startofprev|>"),
            no_speech=no_speech if no_speech is not None else tid("<|nocaptions|>"),
            no_timestamps=no_ts,
            languages=languages,
        )

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """As formats.tokenizer.Tokenizer's: the serving engine stops a request at end-of-text."""
        return frozenset({self.eot})

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1

    @property
    def multilingual(self) -> bool:
        return len(self.languages) > 1

    def language_token(self, code: str) -> int:
        if code not in self.languages:
            raise InvalidRequestError(
                f"'{code}' is not a language Whisper knows. Use an ISO 639-1 code such as en, fr, de, es "
                f"(all: {', '.join(self.languages)})."
            )
        return self.languages[code]

    def sot_sequence(self, language: str | None, task: str, timestamps: bool = True) -> list[int]:
        if task not in ("transcribe", "translate"):
            raise InvalidRequestError(f"task must be 'transcribe' or 'translate', not {task!r}")
        sequence = [self.sot]
        if self.multilingual:
            sequence += [
                self.language_token(language or "en"),
                self.translate if task == "translate" else self.transcribe,
            ]
        if not timestamps:
            sequence.append(self.no_timestamps)
        return sequence

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of the text tokens in `ids` (special and timestamp tokens dropped)."""
        return self.backend.decode([i for i in ids if i < self.eot])
