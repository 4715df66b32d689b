"""int8 Whisper base (W8A8 layer Linears) on the committed English clip: its word error rate stays within one word
of float32's, greedy and beam 5. (One word of this 17-word clip is 6 points; bench_whisper.py measures the
difference on 30 s and 5 min of speech.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from leanlm.formats.audio import load_audio
from leanlm.models.whisper_int8 import quantize_int8
from leanlm.speech.transcribe import TranscribeOptions, WhisperPipeline
from leanlm.speech.wer import word_error_rate

pytestmark = pytest.mark.slow

AUDIO = Path(__file__).resolve().parents[1] / "fixtures" / "audio"
ENGLISH = json.loads((AUDIO / "sentences.json").read_text())["en.wav"]["text"]


@pytest.fixture(scope="module")
def folder():
    from leanlm.formats.assets import fetch_speech_model

    torch.set_num_threads(2)
    return fetch_speech_model("whisper-base", quiet=True)


@pytest.mark.parametrize("beam_size", [1, 5])
def test_int8_word_error_rate_within_one_word_of_float32(folder, beam_size):
    audio = load_audio(AUDIO / "en.wav")
    options = TranscribeOptions(beam_size=beam_size, temperatures=(0.0,), language="en")
    float32 = WhisperPipeline.from_folder(folder)
    int8 = WhisperPipeline.from_folder(folder)
    quantize_int8(int8.model)
    one_word = 1 / len(ENGLISH.split())
    float_wer = word_error_rate(ENGLISH, float32.transcribe(audio, options).text)
    int8_wer = word_error_rate(ENGLISH, int8.transcribe(audio, options).text)
    assert int8_wer <= float_wer + one_word + 1e-9, (int8_wer, float_wer)
