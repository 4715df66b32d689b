"""OpenAI's audio API over a Whisper pipeline: POST /v1/audio/transcriptions and /v1/audio/translations
(multipart upload; response_format json, text, srt, vtt, verbose_json), plus /health and /v1/models.

Requests that arrive while a batch runs wait in a queue; the worker takes every waiting request with the same
decoding options as one batch (`WhisperPipeline.transcribe_batch`, which gives each its solo tokens).
Greedy requests (form field beam_size=1, a faster-whisper-server extension) skip that queue: each runs in a thread
of its own, and their windows batch step by step in the serving engine (speech/engine_loop.py), whatever their
options and whenever they arrive.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from leanlm.errors import InvalidRequestError
from leanlm.formats.audio import AudioError, load_audio
from leanlm.server.app import BodySizeLimit, add_error_handlers, api_key_check
from leanlm.server.errors import BadRequest, UnsupportedMediaType
from leanlm.server.protocol import ModelCard, ModelList
from leanlm.server.serving import ServerSettings
from leanlm.speech.engine_decoding import whisper_engine
from leanlm.speech.engine_loop import EngineLoop
from leanlm.speech.output import render
from leanlm.speech.transcribe import TranscribeOptions, WhisperPipeline

MAX_AUDIO_BYTES = 25 * 1024 * 1024  # OpenAI's upload limit
MAX_AUDIO_SECONDS = 2 * 3600
MAX_BATCH = 8
MAX_GREEDY_JOBS = 16  # greedy transcriptions running at once through the engine; more wait for a slot
MAX_BEAM_SIZE = 10
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


@dataclass
class _Job:
    audio: object
    options: TranscribeOptions
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


@dataclass
class SpeechBatcher:
    """One worker thread runs batches; `submit` is awaited by the request handlers."""

    pipeline: WhisperPipeline
    queue: deque = field(default_factory=deque)
    wake: threading.Condition = field(default_factory=threading.Condition)
    stopping: bool = False
    batches: int = 0
    engine_loop: EngineLoop | None = None  # set: greedy requests decode through the engine
    greedy_slots: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(MAX_GREEDY_JOBS))

    def start(self) -> None:
        threading.Thread(target=self._work, daemon=True, name="leanlm-speech").start()

    async def shutdown(self, grace_s: float) -> None:
        """What the HTTP server calls on shutdown: the batch that runs finishes, queued requests are dropped."""
        self.stop()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.engine_loop is not None:
            self.engine_loop.stop()

    async def submit(self, audio, options: TranscribeOptions):
        loop = asyncio.get_running_loop()
        job = _Job(audio, options, loop.create_future(), loop)
        if options.beam_size == 1 and self.engine_loop is not None:
            threading.Thread(target=self._transcribe_alone, args=(job,), daemon=True, name="leanlm-speech-job").start()
            return await job.future
        with self.wake:
            self.queue.append(job)
            self.wake.notify()
        return await job.future

    def _take_batch(self) -> list[_Job]:
        first = self.queue.popleft()
        batch, rest = [first], deque()
        while self.queue:
            job = self.queue.popleft()
            (batch if job.options == first.options and len(batch) < MAX_BATCH else rest).append(job)
        self.queue.extendleft(reversed(rest))
        return batch

    def _work(self) -> None:
        while True:
            with self.wake:
                while not self.queue and not self.stopping:
                    self.wake.wait()
                if self.stopping:
                    return
                batch = self._take_batch()
            try:
                results = self.pipeline.transcribe_batch([job.audio for job in batch], batch[0].options)
                self.batches += 1
                outcomes = [(job, result, None) for job, result in zip(batch, results, strict=True)]
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request
                outcomes = [(job, None, exc) for job in batch]
            for job, result, error in outcomes:
                job.loop.call_soon_threadsafe(_settle, job.future, result, error)

    def _transcribe_alone(self, job: _Job) -> None:
        """A greedy request: its own seek loop, its windows decoded by the engine beside everyone else's."""
        with self.greedy_slots:
            try:
                result, error = self.pipeline.transcribe(job.audio, job.options), None
            except Exception as exc:  # noqa: BLE001 - handed to the waiting request
                result, error = None, exc
        job.loop.call_soon_threadsafe(_settle, job.future, result, error)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def build_speech_app(
    pipeline: WhisperPipeline,
    model_name: str,
    api_key: str | None = None,
    max_audio_bytes: int = MAX_AUDIO_BYTES,
    engine: bool = True,
) -> FastAPI:
    """engine: greedy requests (beam_size=1) decode through the serving engine, batched across requests."""
    batcher = SpeechBatcher(pipeline)
    if engine:
        batcher.engine_loop = EngineLoop(whisper_engine(pipeline.model, pipeline.tokenizer), pipeline.tokenizer)
        pipeline.greedy_decoder = batcher.engine_loop
    started = int(time.time())

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="leanlm speech", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = batcher  # the HTTP server drains `state.engine` on shutdown
    app.state.settings = ServerSettings(model_name=model_name, api_key=api_key)
    app.add_middleware(BodySizeLimit, max_bytes=max_audio_bytes + 64 * 1024)  # the form fields around the file
    add_error_handlers(app)
    authorized = [Depends(api_key_check(api_key))]

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> dict:
        return ModelList(data=[ModelCard(id=model_name, created=started)]).model_dump()

    async def handle(request: Request, task: str) -> Response:
        form = await _form(request)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise BadRequest("Send the audio as the multipart field 'file'.", param="file")
        data = await upload.read()
        if len(data) > max_audio_bytes:
            raise BadRequest(
                f"The audio file is larger than {max_audio_bytes} bytes.", param="file", code="file_too_large"
            )
        fmt = str(form.get("response_format") or "json")
        if fmt not in RESPONSE_FORMATS:
            raise BadRequest(
                f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, not {fmt!r}.", param="response_format"
            )
        options = _options(form, task)
        try:
            audio = await asyncio.to_thread(load_audio, data)
        except AudioError as exc:
            raise BadRequest(f"{exc}", param="file", code="invalid_audio") from exc
        if len(audio) > MAX_AUDIO_SECONDS * 16_000:
            raise BadRequest(f"The audio is longer than {MAX_AUDIO_SECONDS} s.", param="file", code="audio_too_long")
        result = await batcher.submit(audio, options)
        body = render(result, fmt)
        if fmt in ("json", "verbose_json"):
            return Response(body, media_type="application/json")
        return PlainTextResponse(body)

    @app.post("/v1/audio/transcriptions", dependencies=authorized)
    async def transcriptions(request: Request) -> Response:
        return await handle(request, "transcribe")

    @app.post("/v1/audio/translations", dependencies=authorized)
    async def translations(request: Request) -> Response:
        return await handle(request, "translate")

    return app


async def _form(request: Request):
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise UnsupportedMediaType(
            f"Send the audio as multipart/form-data (a 'file' field), not {content_type or 'no content type'}.",
            code="unsupported_media_type",
        )
    try:
        return await request.form(max_files=1, max_fields=20)
    except AssertionError as exc:  # starlette's message when python-multipart is missing
        raise InvalidRequestError(f"{exc}: pip install leanlm[audio]") from exc


def _options(form, task: str) -> TranscribeOptions:
    language = form.get("language") or None
    prompt = form.get("prompt") or None
    temperature = form.get("temperature")
    try:
        temperatures = (float(temperature),) if temperature not in (None, "") else None
    except ValueError as exc:
        raise BadRequest(f"temperature must be a number, not {temperature!r}.", param="temperature") from exc
    if temperatures is not None and not 0 <= temperatures[0] <= 1:
        raise BadRequest("temperature must be between 0 and 1.", param="temperature")
    kwargs = {
        "task": task,
        "language": None if task == "translate" and language is None else language,
        "initial_prompt": prompt,
    }
    beam_size = form.get("beam_size")
    if beam_size not in (None, ""):
        if not str(beam_size).isdigit() or not 1 <= int(beam_size) <= MAX_BEAM_SIZE:
            raise BadRequest(
                f"beam_size must be an integer from 1 (greedy) to {MAX_BEAM_SIZE}, not {beam_size!r}.",
                param="beam_size",
            )
        kwargs["beam_size"] = int(beam_size)
    if temperatures is not None and temperatures[0] > 0:
        kwargs["temperatures"] = temperatures + tuple(t for t in (0.2, 0.4, 0.6, 0.8, 1.0) if t > temperatures[0])
    try:
        return TranscribeOptions(**kwargs)
    except InvalidRequestError as exc:
        raise BadRequest(str(exc)) from exc
