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

import torch

from leanlm.config import EngineConfig
from leanlm.engine.engine import LLMEngine
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


def submit_window(
    engine: LLMEngine,
    tokenizer: WhisperTokenizer,
    window: torch.Tensor,
    prompt: list[int],
    options: DecodeOptions,
    request_id: str | None = None,
) -> str:
    """Add one window's greedy decoding to the engine; returns its request id (see `result_of`)."""
    if options.beam_size > 1 or options.temperature > 0:
        raise ValueError("the engine decodes Whisper greedily (beam_size 1, temperature 0): use decode_windows")
    rules = LogitRules(tokenizer, engine.model_config.vocab_size, options)

    def whisper_rules(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        return rules.apply(logits[None], [generated])[0]  # generated never holds end-of-text: it ends the request

    max_new = min(options.max_length // 2, options.max_length - (len(prompt) - 1))
    params = SamplingParams(temperature=0.0, max_tokens=max_new, logprobs=0, stop_token_ids=(tokenizer.eot,))
    request_id = request_id or f"whisper-window-{next(_ids)}"
    engine.add_request(
        request_id,
        prompt,
        params,
        encoder_input=EncoderInput(window, window_hash(window)),
        logits_processors=[whisper_rules],
    )
    return request_id


def result_of(output, tokenizer: WhisperTokenizer, options: DecodeOptions) -> DecodeResult:
    """A finished window request's RequestOutput as decode_windows' DecodeResult (end-of-text dropped from the
    tokens, kept in the log-probability sum). no_speech_prob is not computed here (NaN)."""
    tokens = list(output.token_ids)
    sum_logprob = sum(entry.logprob for entry in output.logprobs)
    if tokens and tokens[-1] == tokenizer.eot:
        tokens.pop()
    length = max(len(tokens), 1)
    penalty = options.length_penalty
    score = sum_logprob / length**penalty if penalty else sum_logprob
    return DecodeResult(tokens, sum_logprob, score, math.nan)


def decode_windows_engine(
    engine: LLMEngine,
    tokenizer: WhisperTokenizer,
    windows: list[torch.Tensor],
    prompts: list[list[int]],
    options: DecodeOptions,
) -> list[DecodeResult]:
    """decode_windows' greedy results, through the engine: windows[b] is (n_mels, 3000), prompts[b] ends with the
    task tokens. Runs the engine until these requests finish (others in it keep running alongside)."""
    ids = [submit_window(engine, tokenizer, w, p, options) for w, p in zip(windows, prompts, strict=True)]
    finished: dict[str, object] = {}
    while len(finished) < len(ids):
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return [result_of(finished[rid], tokenizer, options) for rid in ids]
