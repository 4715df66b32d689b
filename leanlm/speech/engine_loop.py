"""One thread owns a Whisper engine and steps it; any thread may hand it windows to decode and wait for them.

Each transcription (its 30 s seek loop, language detection, temperature fallback) runs in its caller's thread; its
greedy windows go to this loop (WhisperPipeline.greedy_decoder), where they join the windows of every other
transcription in the running batch: continuous batching, a new window starts at the next step instead of waiting
for the batch in flight to end. The engine is not thread-safe: only the loop's thread touches it.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future

import torch

from leanlm.engine.engine import LLMEngine
from leanlm.formats.whisper_tokenizer import WhisperTokenizer
from leanlm.speech.decoding import DecodeOptions, DecodeResult
from leanlm.speech.engine_decoding import WindowRequest, abort_window, submit_window


class _Job:
    def __init__(self, windows: list[torch.Tensor], prompts: list[list[int]], options: DecodeOptions):
        self.windows, self.prompts, self.options = windows, prompts, options
        self.future: Future = Future()
        self.handles: list[WindowRequest] = []


class EngineLoop:
    def __init__(self, engine: LLMEngine, tokenizer: WhisperTokenizer):
        self.engine, self.tokenizer = engine, tokenizer
        self._incoming: deque[_Job] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.max_windows = 0  # most windows (distinct audio) in the engine at once: concurrent callers batched

    def decode_windows(
        self, windows: list[torch.Tensor], prompts: list[list[int]], options: DecodeOptions
    ) -> list[DecodeResult]:
        """What decode_windows returns for greedy options; blocks until the windows are decoded."""
        job = _Job(list(windows), prompts, options)
        with self._wake:
            if self._stopping:
                raise RuntimeError("the Whisper engine loop has stopped")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="leanlm-whisper-engine")
                self._thread.start()
            self._incoming.append(job)
            self._wake.notify()
        return job.future.result()

    __call__ = decode_windows  # a WhisperPipeline.greedy_decoder

    def stop(self, timeout_s: float = 60.0) -> None:
        """Fail the waiting callers and end the thread. Joined: a thread that ran OpenMP work and is still alive
        when the process exits aborts it (libgomp: "terminate called without an active exception")."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        active: list[_Job] = []
        while True:
            with self._wake:
                while not self._incoming and not active and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    break
                incoming, self._incoming = list(self._incoming), deque()
            for job in incoming:
                self._start(job, active)
            if active:
                self._step(active)
        for job in active + list(self._incoming):
            job.future.set_exception(RuntimeError("the Whisper engine loop has stopped"))

    def _start(self, job: _Job, active: list[_Job]) -> None:
        try:
            for window, prompt in zip(job.windows, job.prompts, strict=True):
                job.handles.append(submit_window(self.engine, self.tokenizer, window, prompt, job.options))
        except Exception as exc:  # noqa: BLE001 - a bad job fails alone
            for handle in job.handles:
                abort_window(self.engine, handle)
            job.future.set_exception(exc)
            return
        active.append(job)

    def _step(self, active: list[_Job]) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - every waiting caller gets the error; the loop keeps serving
            for job in active:
                for handle in job.handles:
                    abort_window(self.engine, handle)
                job.future.set_exception(exc)
            active.clear()
            return
        self.steps += 1
        self.max_windows = max(self.max_windows, len(self.engine.scheduler.encoder_users))
        owner = {rid: handle for job in active for handle in job.handles for rid in handle.request_ids}
        for output in outputs:
            if output.finished and output.request_id in owner:
                owner[output.request_id].observe(output)
        for job in [job for job in active if all(handle.done for handle in job.handles)]:
            active.remove(job)
            job.future.set_result([handle.result(self.tokenizer) for handle in job.handles])
