"""`leanlm transcribe`: a bad file fails before the model loads, with the reason; a clip gives its transcript."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leanlm.cli.main import main

AUDIO = Path(__file__).resolve().parents[1] / "fixtures" / "audio"


def test_missing_audio_is_a_one_line_error(capsys, tmp_path):
    assert main(["transcribe", str(tmp_path / "nothing.wav")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_unknown_task_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["transcribe", str(AUDIO / "en.wav"), "--task", "summarize"])


@pytest.mark.slow
def test_transcribe_clip_as_json_and_vtt(capsys):
    pytest.importorskip("soundfile")
    args = ["transcribe", str(AUDIO / "es.flac"), "--beam-size", "1", "--temperature", "0", "--threads", "2", "-q"]
    assert main([*args, "--format", "verbose_json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["language"] == "es" and result["text"].startswith("Buenos días")
    assert result["segments"][0]["start"] == 0.0
    assert main([*args, "--format", "vtt"]) == 0
    assert capsys.readouterr().out.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:04.000\nBuenos días")
