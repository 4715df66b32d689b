"""The official `openai` client transcribes and translates through the real speech server (whisper-base), and
bad uploads get a 4xx that names the problem while the server keeps serving."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from tests.server_harness import running_server

openai = pytest.importorskip("openai")
pytest.importorskip("multipart")
pytestmark = pytest.mark.slow

AUDIO = Path(__file__).resolve().parents[1] / "fixtures" / "audio"


@pytest.fixture(scope="module")
def app():
    from leanlm.server.speech_app import build_speech_app
    from leanlm.speech.transcribe import load_pipeline

    torch.set_num_threads(2)
    return build_speech_app(load_pipeline("whisper-base", quiet=True), "whisper-base", max_audio_bytes=400_000)


@pytest.fixture(scope="module")
def server(app):
    with running_server(app) as (url, _):
        yield url


def test_openai_client_transcribes_translates_and_formats(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    with open(AUDIO / "en.wav", "rb") as audio:
        result = client.audio.transcriptions.create(model="whisper-1", file=audio, language="en", temperature=0.0)
    assert result.text == "The quick brown fox jumps over the lazy dog. It is a sunny day in the city."
    with open(AUDIO / "en.wav", "rb") as audio:
        srt = client.audio.transcriptions.create(model="whisper-1", file=audio, response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:03,120\nThe quick brown fox")
    with open(AUDIO / "de.flac", "rb") as audio:
        verbose = client.audio.translations.create(model="whisper-1", file=audio, response_format="verbose_json")
    assert verbose.language == "de" and "good morning" in verbose.text.lower()
    assert verbose.segments and verbose.segments[0].start == 0.0


def test_bad_uploads_are_4xx_naming_the_problem(server):
    url = f"{server}/v1/audio/transcriptions"
    bad = httpx.post(url, files={"file": ("x.mp3", b"this is not audio" * 50)}, timeout=60)
    assert bad.status_code == 400 and "audio" in bad.json()["error"]["message"]
    big = httpx.post(url, files={"file": ("big.wav", bytes(600_000))}, timeout=60)
    assert big.status_code in (400, 413) and "larger" in big.json()["error"]["message"]
    fmt = httpx.post(
        url, files={"file": ("a.wav", (AUDIO / "en.wav").read_bytes())}, data={"response_format": "docx"}, timeout=60
    )
    assert fmt.status_code == 400 and "response_format" in fmt.json()["error"]["message"]
    lang = httpx.post(
        url,
        files={"file": ("a.wav", (AUDIO / "en.wav").read_bytes())},
        data={"language": "xx", "temperature": "0"},
        timeout=120,
    )
    assert lang.status_code == 400 and "xx" in lang.json()["error"]["message"]
    not_form = httpx.post(url, content=json.dumps({"file": "x"}), headers={"content-type": "application/json"})
    assert not_form.status_code == 415
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_greedy_requests_batch_in_the_engine_with_their_solo_text(server, app):
    """beam_size=1 requests decode through the engine: sent together, each gets the text it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    url = f"{server}/v1/audio/transcriptions"

    def post(name):
        data = {"beam_size": "1", "response_format": "verbose_json", "temperature": "0", "language": name[:2]}
        reply = httpx.post(url, files={"file": (name, (AUDIO / name).read_bytes())}, data=data, timeout=600)
        assert reply.status_code == 200, reply.text
        return reply.json()

    names = ["en.wav", "es.flac"]
    alone = [post(name) for name in names]
    loop = app.state.engine.engine_loop
    assert loop.max_windows == 1
    with ThreadPoolExecutor(len(names)) as pool:
        together = list(pool.map(post, names))
    assert loop.max_windows == 2  # both clips' windows decoded in the same steps
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert [[s["tokens"] for s in r["segments"]] for r in together] == [
        [s["tokens"] for s in r["segments"]] for r in alone
    ]
    bad = httpx.post(url, files={"file": ("a.wav", (AUDIO / "en.wav").read_bytes())}, data={"beam_size": "0"})
    assert bad.status_code == 400 and "beam_size" in bad.json()["error"]["message"]
