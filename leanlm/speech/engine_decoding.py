"""Greedy Whisper decoding through the serving engine: each 30 s window is one engine request, so windows of
different callers batch step by step with paged self-attention (engine/), instead of decoding_windows' own loop.

A window's request carries its log-mel frames as the encoder input (encoded once, when first scheduled; its
cross-attention keys and values live until the request ends), its prompt (previous text, start-of-transcript,
language, task) as the decoder prompt, and Whisper's logit rules (decoding.LogitRules) as a logits processor.
Prefix caching stays on: block hashes start from a hash of the window's frames (Request.cache_salt), so equal
prompts over different audio never share blocks, while the same window decoded again does.
Beam search and sampling stay in speech/decoding.py: the engine samples one token per request and step.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass

import torch

from leanlm.config import EngineConfig
from leanlm.engine.engine import LLMEngine
from leanlm.engine.outputs import RequestOutput
from leanlm.engine.request import EncoderInput
from leanlm.formats.whisper_tokenizer import WhisperTokenizer
from leanlm.models.whisper import WhisperModel
from leanlm.models.whisper_engine import WhisperForEngine
from leanlm.sampling_params import SamplingParams
from leanlm.speech.decoding import DecodeOptions, DecodeResult, LogitRules

_ids = itertools.count()


def window_hash(window: torch.Tensor) -> str:
    """Names a window's frames: equal audio, equal name."""
    return hashlib.sha256(window.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def whisper_engine(
    model: WhisperModel, tokenizer: WhisperTokenizer, config: EngineConfig | None = None, threads: int | None = None
) -> LLMEngine:
    """An engine over the model's decoder (its weights shared with `model`)."""
    config = config or EngineConfig(max_num_seqs=16, max_num_batched_tokens=512)
    return LLMEngine(WhisperForEngine(model), tokenizer, config, threads=threads)


@dataclass
class WindowRequest:
    """One window's requests in the engine: the transcription, and a one-token probe whose prompt stops at
    start-of-transcript, for P(<|nospeech|>) there (decode_windows reads it from the prompt's own logits; the engine
    samples only at a prompt's end). The probe shares the window's encoder output: it costs no encoder pass."""

    request_id: str
    probe_id: str | None
    options: DecodeOptions
    no_speech_prob: float = math.nan
    output: RequestOutput | None = None
    probe_done: bool = False

    @property
    def request_ids(self) -> list[str]:
        return [self.request_id] + ([self.probe_id] if self.probe_id else [])

    @property
    def done(self) -> bool:
        return self.output is not None and (self.probe_id is None or self.probe_done)

    def observe(self, output: RequestOutput) -> None:
        """Take a finished engine output of one of this window's requests."""
        if output.request_id == self.request_id:
            self.output = output
        elif output.request_id == self.probe_id:
            self.probe_done = True

    def result(self, tokenizer: WhisperTokenizer) -> DecodeResult:
        """As decode_windows' DecodeResult: end-of-text dropped from the tokens, kept in the log-probability sum."""
        tokens = list(self.output.token_ids)
        sum_logprob = sum(entry.logprob for entry in self.output.logprobs or [])
        if tokens and tokens[-1] == tokenizer.eot:
            tokens.pop()
        penalty = self.options.length_penalty
        score = sum_logprob / max(len(tokens), 1) ** penalty if penalty else sum_logprob
        return DecodeResult(tokens, sum_logprob, score, self.no_speech_prob)


def submit_window(
    engine: LLMEngine,
    tokenizer: WhisperTokenizer,
    window: torch.Tensor,
    prompt: list[int],
    options: DecodeOptions,
    no_speech: bool = True,
) -> WindowRequest:
    """Add one window's greedy decoding (and, with no_speech, its no-speech probe) to the engine."""
    if options.beam_size > 1 or options.temperature > 0:
        raise ValueError("the engine decodes Whisper greedily (beam_size 1, temperature 0): use decode_windows")
    if tokenizer.sot not in prompt:
        raise ValueError("a Whisper prompt holds <|startoftranscript|> (WhisperTokenizer.sot_sequence)")
    rules = LogitRules(tokenizer, engine.model_config.vocab_size, options)

    def whisper_rules(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        return rules.apply(logits[None], [generated])[0]  # generated never holds end-of-text: it ends the request

    number = next(_ids)
    handle = WindowRequest(f"whisper-window-{number}", f"whisper-probe-{number}" if no_speech else None, options)
    encoder_input = EncoderInput(window, window_hash(window))
    max_new = min(options.max_length // 2, options.max_length - (len(prompt) - 1))
    params = SamplingParams(temperature=0.0, max_tokens=max_new, logprobs=0, stop_token_ids=(tokenizer.eot,))
    engine.add_request(
        handle.request_id, prompt, params, encoder_input=encoder_input, logits_processors=[whisper_rules]
    )
    if no_speech:

        def read_no_speech(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
            handle.no_speech_prob = torch.softmax(logits.float(), dim=-1)[tokenizer.no_speech].item()
            return logits

        try:
            engine.add_request(
                handle.probe_id,
                prompt[: prompt.index(tokenizer.sot) + 1],
                SamplingParams(temperature=0.0, max_tokens=1),
                encoder_input=encoder_input,
                logits_processors=[read_no_speech],
            )
        except Exception:
            engine.abort_request(handle.request_id)
            raise
    return handle


def abort_window(engine: LLMEngine, handle: WindowRequest) -> None:
    for request_id in handle.request_ids:
        engine.abort_request(request_id)


def decode_windows_engine(
    engine: LLMEngine,
    tokenizer: WhisperTokenizer,
    windows: list[torch.Tensor],
    prompts: list[list[int]],
    options: DecodeOptions,
    no_speech: bool = True,
) -> list[DecodeResult]:
    """decode_windows' greedy results, through the engine: windows[b] is (n_mels, 3000), prompts[b] ends with the
    task tokens. Runs the engine until these requests finish (others in it keep running alongside)."""
    handles = [
        submit_window(engine, tokenizer, w, p, options, no_speech) for w, p in zip(windows, prompts, strict=True)
    ]
    owner = {request_id: handle for handle in handles for request_id in handle.request_ids}
    while not all(handle.done for handle in handles):
        for output in engine.step():
            if output.finished and output.request_id in owner:
                owner[output.request_id].observe(output)
    return [handle.result(tokenizer) for handle in handles]
