"""Whisper base through the serving engine on the committed clips: greedy transcription gives the tokens of the
standalone loop (speech/decoding.py), and three transcriptions running at once from three threads batch in the
engine and each get their solo tokens."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import pytest
import torch

from leanlm.formats.audio import load_audio
from leanlm.speech.engine_decoding import whisper_engine
from leanlm.speech.engine_loop import EngineLoop
from leanlm.speech.transcribe import TranscribeOptions, WhisperPipeline

pytestmark = pytest.mark.slow

AUDIO = Path(__file__).resolve().parents[1] / "fixtures" / "audio"
NAMES = sorted(json.loads((AUDIO / "sentences.json").read_text()))
GREEDY = TranscribeOptions(beam_size=1, temperatures=(0.0,))


@pytest.fixture(scope="module")
def pipeline():
    from leanlm.formats.assets import fetch_speech_model

    torch.set_num_threads(2)
    return WhisperPipeline.from_folder(fetch_speech_model("whisper-base", quiet=True))


@pytest.fixture(scope="module")
def audio():
    return {name: load_audio(AUDIO / name) for name in NAMES}


@pytest.fixture(scope="module")
def solo(pipeline, audio):
    """The standalone loop, one clip at a time."""
    return {name: pipeline.transcribe(samples, GREEDY) for name, samples in audio.items()}


def _tokens(transcription):
    return [segment.tokens for segment in transcription.segments]


def test_engine_greedy_tokens_equal_the_standalone_loop(pipeline, audio, solo):
    through_engine = copy.copy(pipeline)
    loop = EngineLoop(whisper_engine(pipeline.model, pipeline.tokenizer), pipeline.tokenizer)
    through_engine.greedy_decoder = loop
    try:
        results = through_engine.transcribe_batch([audio[name] for name in NAMES], GREEDY)
    finally:
        loop.stop()
    for name, result in zip(NAMES, results, strict=True):
        assert _tokens(result) == _tokens(solo[name]), name
        for ours, theirs in zip(result.segments, solo[name].segments, strict=True):
            assert ours.no_speech_prob == pytest.approx(theirs.no_speech_prob, abs=1e-4)
            assert ours.avg_logprob == pytest.approx(theirs.avg_logprob, abs=1e-3)
    assert loop.engine.runner.encoder_cache == {} and loop.engine.stats().kv_blocks_used == 0


def test_three_concurrent_transcriptions_batch_in_the_engine_with_their_solo_tokens(pipeline, audio, solo):
    through_engine = copy.copy(pipeline)
    loop = EngineLoop(whisper_engine(pipeline.model, pipeline.tokenizer), pipeline.tokenizer)
    through_engine.greedy_decoder = loop
    names = NAMES[:3]
    results: dict[str, object] = {}
    start = threading.Barrier(len(names))

    def transcribe(name):
        start.wait()
        results[name] = through_engine.transcribe(audio[name], GREEDY)

    threads = [threading.Thread(target=transcribe, args=(name,)) for name in names]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
    finally:
        loop.stop()
    assert loop.max_windows >= 2  # windows of different transcriptions ran in the same steps
    for name in names:
        assert _tokens(results[name]) == _tokens(solo[name]), name
