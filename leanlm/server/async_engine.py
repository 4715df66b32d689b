"""The engine on one background thread, served to asyncio request handlers.

`LLMEngine` is not thread-safe, so only the engine thread touches it. Handlers send commands (add, abort)
through a thread-safe queue that the thread drains before every step; the thread hands each step's outputs
back to the event loop with one `call_soon_threadsafe` per step. The thread sleeps while there is no work.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from leanlm.server.errors import APIError, InternalError, QueueFull, ServiceUnavailable
from leanlm.server.metrics import ServerMetrics

logger = logging.getLogger("leanlm.server")


class Submission:
    """The engine requests of one HTTP request (prompts x n choices). Iterate `outputs()`; always `close()`."""

    def __init__(self, owner: AsyncEngine, submission_id: str, count: int):
        self.id = submission_id
        self.count = count
        self.arrival = time.perf_counter()
        self._owner = owner
        self._queue: asyncio.Queue = asyncio.Queue()
        self.accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        self._unfinished = set(range(count))
        self._closed = False

    def request_id(self, index: int) -> str:
        return f"{self.id}-{index}"

    async def outputs(self) -> AsyncIterator[tuple[int, object]]:
        """(index, RequestOutput) pairs until every request has finished; raises APIError if the server stops it."""
        while self._unfinished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            index, output = item
            if output.finish_reason is not None:
                self._unfinished.discard(index)
            yield index, output

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def close(self) -> None:
        """Abort what has not finished (a client that went away) and give the capacity back. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._owner._release(self, abort=bool(self._unfinished))

    def _deliver(self, items: list) -> None:
        for item in items:
            self._queue.put_nowait(item)


@dataclass
class _Route:
    submission: Submission
    index: int
    last_token_at: float | None = None


@dataclass
class _Add:
    submission: Submission
    prompts: list[list[int]]
    params: list
    texts: list[str | None]


@dataclass
class _Abort:
    submission: Submission


@dataclass
class _AbortAll:
    error: APIError


class _Stop:
    pass


class AsyncEngine:
    def __init__(self, engine, max_in_flight: int, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.max_in_flight = max_in_flight  # engine requests admitted and unfinished (running + waiting)
        self.metrics = metrics or ServerMetrics()
        self.stats = None  # the engine's latest EngineStats, published by the engine thread
        self.error: BaseException | None = None  # set when the engine thread died
        self.accepting = True
        self.in_flight = 0
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._routes: dict[str, _Route] = {}  # engine thread only
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Event | None = None

    # ---- event loop side ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self.stats = self.engine.stats()
        self._thread = threading.Thread(target=self._run, name="leanlm-engine", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    async def submit(self, prompts: list[list[int]], params: list, texts: list[str | None]) -> Submission:
        """Queue one engine request per (prompt, params) pair; returns once the engine has accepted all of them.

        Raises ServiceUnavailable while shutting down, QueueFull when the server holds too many requests, and
        the engine's own error (prompt too long, invalid parameters) when it refuses one.
        """
        if self.error is not None:
            raise ServiceUnavailable(
                f"The engine stopped after an internal error ({self.error!r}). Restart the server.", code="engine_dead"
            )
        if not self.accepting:
            self.metrics.count_rejected("shutting_down")
            raise ServiceUnavailable("The server is shutting down. Retry on a running server.", code="shutting_down")
        if self.in_flight + len(prompts) > self.max_in_flight:
            self.metrics.count_rejected("queue_full")
            raise QueueFull(
                f"The server is full: {self.in_flight} requests running or waiting, and it holds at most "
                f"{self.max_in_flight} (the running batch, --max-num-seqs, plus --max-queue waiting). "
                "Retry after the Retry-After delay.",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        submission = Submission(self, f"req-{next(self._ids)}", len(prompts))
        self.in_flight += len(prompts)
        self._idle.clear()
        self._send(_Add(submission, prompts, params, texts))
        try:
            await submission.accepted
        except BaseException:
            submission.close()
            raise
        self.metrics.count_prompt_tokens(sum(len(p) for p in prompts))
        return submission

    async def shutdown(self, grace_s: float) -> None:
        """Stop admitting; let running requests finish for up to grace_s, then stop the rest and tell their clients."""
        self.accepting = False
        if self._thread is None:
            return
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        except TimeoutError:
            logger.warning("%d requests still running after %.0f s; stopping them", self.in_flight, grace_s)
        stopped = ServiceUnavailable(
            "The server shut down before this request finished. Retry on a running server.", code="shutting_down"
        )
        self._send(_AbortAll(stopped))
        self._send(_Stop())
        await asyncio.to_thread(self._thread.join, 10.0)

    def _release(self, submission: Submission, abort: bool) -> None:
        if abort:
            self._send(_Abort(submission))
        self.in_flight -= submission.count
        if self.in_flight == 0:
            self._idle.set()

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wake.set()
        if self.error is not None:  # no engine thread drains the queue any more
            self._refuse_commands()

    # ---- engine thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._wake.clear()  # before draining: a command sent after this point sets it again
                if not self._run_commands():
                    return
                if not self.engine.has_unfinished_requests():
                    self.stats = self.engine.stats()
                    self._wake.wait()
                    continue
                outputs = self.engine.step()
                self._dispatch(outputs, time.perf_counter())
                self.stats = self.engine.stats()
        except BaseException as exc:  # a bug or out of memory: fail every request instead of hanging them
            logger.exception("The engine thread stopped")
            self.error = exc
            self._fail_all(self._dead_error())
            self._refuse_commands()

    def _dead_error(self) -> InternalError:
        return InternalError(f"The engine stopped with an internal error: {self.error!r}.", code="engine_error")

    def _refuse_commands(self) -> None:
        """Answer the adds still queued once the engine thread is gone, so that no handler waits forever."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                self._post(_resolve, command.submission.accepted, self._dead_error())

    def _run_commands(self) -> bool:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _Abort):
                self._abort(command.submission)
            elif isinstance(command, _AbortAll):
                self._fail_all(command.error)
            elif isinstance(command, _Stop):
                return False

    def _add(self, command: _Add) -> None:
        submission, added = command.submission, []
        try:
            for index, (ids, params, text) in enumerate(
                zip(command.prompts, command.params, command.texts, strict=True)
            ):
                request_id = submission.request_id(index)
                self.engine.add_request(request_id, ids, params, prompt=text)
                self._routes[request_id] = _Route(submission, index)
                added.append(request_id)
        except Exception as exc:
            for request_id in added:
                self.engine.abort_request(request_id)
                del self._routes[request_id]
            self._post(_resolve, submission.accepted, exc)
            return
        self._post(_resolve, submission.accepted, None)

    def _abort(self, submission: Submission) -> None:
        for index in range(submission.count):
            request_id = submission.request_id(index)
            if self._routes.pop(request_id, None) is not None:
                self.engine.abort_request(request_id)
                self.metrics.observe_finished("abort", time.perf_counter() - submission.arrival)

    def _fail_all(self, error: APIError) -> None:
        submissions = {route.submission for route in self._routes.values()}
        for submission in submissions:
            if self.error is None:
                self._abort(submission)
            self._post(submission._deliver, [error])
        self._routes.clear()

    def _post(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def _dispatch(self, outputs: list, now: float) -> None:
        batches: dict[Submission, list] = {}
        for output in outputs:
            route = self._routes.get(output.request_id)
            if route is None:  # aborted meanwhile
                continue
            submission = route.submission
            if output.new_token_ids:
                if route.last_token_at is None:
                    self.metrics.observe_first_token(now - submission.arrival)
                else:
                    self.metrics.observe_tokens(now - route.last_token_at, len(output.new_token_ids))
                route.last_token_at = now
            if output.finish_reason is not None:
                del self._routes[output.request_id]
                self.metrics.observe_finished(output.finish_reason, now - submission.arrival)
            batches.setdefault(submission, []).append((route.index, output))
        if batches:  # one wake-up of the event loop per step (each is a write to its self-pipe), not one per request
            self._post(_deliver_all, batches)


def _deliver_all(batches: dict[Submission, list]) -> None:
    for submission, items in batches.items():
        submission._deliver(items)


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the handler stopped waiting (client gone)
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
