"""Where a batched engine step's time goes: schedule / run (forward pass vs the rest) / output processing.

Engine mode (default) drives LLMEngine directly, no HTTP: --concurrency greedy requests of mixed prompt length
(bench_serve.py's prompts, EOS ignored) added at once, stepped until done. Server mode (--server) runs the real
app (uvicorn + the engine thread) in this process and replays bench_serve.py's client from a subprocess, so
the event loop's work (handlers, SSE encoding, the queue handoff) competes for the GIL as it does in
`leanlm serve`. Both report per-step milliseconds by phase, for steps that decode the whole batch (the steady
state) and overall; --cprofile adds cProfile's top functions (engine thread, and the event loop in server mode).
Phase times come from time.perf_counter around the engine's own methods in a pass without cProfile (with
--cprofile a second pass, on other prompts, runs under it); figures are only as quiet as the machine, so
compare proportions between runs rather than absolute numbers.

    python benchmarks/profile_engine.py [--concurrency 16] [--max-tokens 64] [--server] [--cprofile]
                                        [--temperature 0.8 --top-p 0.9 --top-k 0 --repetition-penalty 1.1]
                                        [--threads 2] [--kernels auto] [--model M] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import prompt_for, run_level  # noqa: E402  (the same prompts and client as the serving benchmark)

PHASES = ("schedule", "forward", "run_other", "outputs", "dispatch")


class PhaseClock:
    """Wraps an engine's methods (on the instance) to time each phase of every step."""

    def __init__(self, engine, async_engine=None):
        self.steps: list[dict] = []
        self._current: dict | None = None
        self.last: dict | None = None  # the latest finished step, recorded or not
        self.recording = True
        self._wrap(engine.scheduler, "schedule", "schedule", on_result=self._note_schedule)
        self._wrap(engine.runner, "run", "run")
        runner = engine.runner
        runner.model = _TimedModel(runner.model, self)
        self._wrap(engine, "_process_outputs", "outputs", closes_step=async_engine is None)
        if async_engine is not None:  # the step ends after its outputs are handed to the event loop
            self._wrap(async_engine, "_dispatch", "dispatch", closes_step=True)

    def add(self, phase: str, seconds: float) -> None:
        if self._current is not None:
            self._current[phase] = self._current.get(phase, 0.0) + seconds

    def reset(self) -> None:
        self.steps.clear()

    def _note_schedule(self, schedule) -> None:
        entries = schedule.scheduled
        self._current = {
            "num_requests": len(entries),
            "num_tokens": sum(e.num_tokens for e in entries),
            "all_decode": all(e.num_tokens == 1 for e in entries),
        }

    def _wrap(self, owner, name: str, phase: str, on_result=None, closes_step: bool = False) -> None:
        method = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            result = method(*args, **kwargs)
            elapsed = time.perf_counter() - started
            if on_result is not None:
                on_result(result)
            self.add(phase, elapsed)
            if closes_step and self._current is not None:
                self.last = self._current
                if self.recording and self._current.get("num_requests"):
                    self.steps.append(self._current)
                self._current = None
            return result

        setattr(owner, name, timed)

    def summary(self, batch: int) -> dict:
        steady = [s for s in self.steps if _is_full_decode(s, batch)]
        return {"steady_decode_steps": _phase_means(steady), "all_steps": _phase_means(self.steps)}


def _is_full_decode(step: dict, batch: int) -> bool:
    return step["all_decode"] and step["num_requests"] == batch


class _TimedModel:
    """Stands in for the model inside ModelRunner: times the forward pass, delegates everything else."""

    def __init__(self, model, clock: PhaseClock):
        self._model, self._clock = model, clock

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        result = self._model(*args, **kwargs)
        self._clock.add("forward", time.perf_counter() - started)
        return result

    def __getattr__(self, name):
        return getattr(self._model, name)


def _phase_means(steps: list[dict]) -> dict:
    if not steps:
        return {"steps": 0}
    totals = defaultdict(float)
    for step in steps:
        for phase in ("schedule", "run", "forward", "outputs", "dispatch"):
            totals[phase] += step.get(phase, 0.0)
    totals["run_other"] = totals["run"] - totals["forward"]  # inputs, attention metadata, sampling
    per_step = {phase: 1000 * totals[phase] / len(steps) for phase in PHASES}
    step_ms = sum(per_step.values())
    return {
        "steps": len(steps),
        "mean_requests": round(sum(s["num_requests"] for s in steps) / len(steps), 1),
        "step_ms": round(step_ms, 2),
        "ms": {phase: round(ms, 2) for phase, ms in per_step.items()},
        "share": {phase: round(ms / step_ms, 3) for phase, ms in per_step.items()} if step_ms else {},
    }


def _profile_text(profiler: cProfile.Profile, title: str, top: int) -> str:
    lines = []
    for order in ("cumulative", "tottime"):
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).strip_dirs().sort_stats(order).print_stats(top)
        lines.append(f"==== {title}: top {top} by {order} ====\n{stream.getvalue()}")
    return "\n".join(lines)


# ---- engine mode ------------------------------------------------------------------------------------------------


def run_engine(llm, args) -> tuple[dict, str]:
    """A timed pass for the phase split; with --cprofile, a second pass (other prompts) under the profiler."""
    clock = PhaseClock(llm.engine)
    wall = _drive_engine(llm, args, clock, first_index=0)
    report = {"wall_s": round(wall, 2), "output_tok_s": round(args.concurrency * args.max_tokens / wall, 1)}
    report.update(clock.summary(args.concurrency))
    if not args.cprofile:
        return report, ""
    clock.recording = False
    profiler = cProfile.Profile()
    _drive_engine(llm, args, clock, first_index=args.concurrency, profiler=profiler)
    return report, _profile_text(profiler, "engine, full-batch decode steps", args.top)


def _drive_engine(llm, args, clock: PhaseClock, first_index: int, profiler: cProfile.Profile | None = None) -> float:
    """Add --concurrency requests at once and step until they finish; returns the wall time."""
    from leanlm import SamplingParams

    engine = llm.engine
    params = [
        SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=i if args.temperature > 0 else None,
            ignore_eos=True,
        )
        for i in range(args.concurrency)
    ]
    prompts = [llm.encode(prompt_for(first_index + i)) for i in range(args.concurrency)]
    profiling = False
    started = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.add_request(f"profile-{first_index + i}", ids, params[i])
    while engine.has_unfinished_requests():
        engine.step()
        # Profile the steady state only: from the first step that decoded the whole batch.
        if profiler and not profiling and clock.last and _is_full_decode(clock.last, args.concurrency):
            profiler.enable()
            profiling = True
    if profiling:
        profiler.disable()
    return time.perf_counter() - started


# ---- server mode ------------------------------------------------------------------------------------------------


def run_server(llm, args) -> tuple[dict, str]:
    """A timed pass for the phase split; with --cprofile, a second pass (other prompts) under the profilers."""
    from leanlm.server.app import build_app
    from leanlm.server.http_server import Server
    from leanlm.server.serving import ServerSettings

    app = build_app(llm, ServerSettings(model_name="bench"))
    async_engine = app.state.engine
    clock = PhaseClock(llm.engine, async_engine)
    profilers = {"engine thread": cProfile.Profile(), "event loop thread": cProfile.Profile()} if args.cprofile else {}
    profiling = threading.Event()
    if profilers:
        _profile_engine_thread(async_engine, profilers["engine thread"], profiling)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = Server(app, "127.0.0.1", sock.getsockname()[1], log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def client(concurrency: int, max_tokens: int, first_index: int) -> dict:
        command = [sys.executable, __file__, "--client", url, "--concurrency", str(concurrency)]
        command += ["--max-tokens", str(max_tokens), "--first-index", str(first_index)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    client(2, 8, 10_000)  # warm-up: first-call costs of the server stay out
    clock.reset()
    report = client(args.concurrency, args.max_tokens, 0)
    report.update(clock.summary(args.concurrency))
    if profilers:
        clock.recording = False
        loop_profiler = profilers["event loop thread"]
        profiling.set()
        async_engine._loop.call_soon_threadsafe(loop_profiler.enable)  # it must run on the loop's own thread
        client(args.concurrency, args.max_tokens, args.concurrency)
        profiling.clear()
        async_engine._loop.call_soon_threadsafe(loop_profiler.disable)
        time.sleep(0.2)
    server.should_exit = True
    thread.join(60)
    sock.close()
    text = "\n".join(_profile_text(p, title, args.top) for title, p in profilers.items())
    return report, text


def _profile_engine_thread(async_engine, profiler: cProfile.Profile, measuring: threading.Event) -> None:
    """The engine thread runs _run_commands before every step: switch its profiler there to follow `measuring`."""
    run_commands = async_engine._run_commands
    state = {"on": False}

    def switched():
        if measuring.is_set() != state["on"]:
            state["on"] = measuring.is_set()
            profiler.enable() if state["on"] else profiler.disable()
        return run_commands()

    async_engine._run_commands = switched


def client_main(args) -> int:
    requests = args.requests or args.concurrency
    row = asyncio.run(run_level(args.client, args.concurrency, requests, args.max_tokens, args.first_index))
    print(json.dumps(row))
    return 0


# ---- entry point ------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16, help="requests running together (default: 16)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (EOS ignored)")
    parser.add_argument("--server", action="store_true", help="profile the HTTP server path instead of the engine")
    parser.add_argument("--cprofile", action="store_true", help="also print cProfile's top functions")
    parser.add_argument("--top", type=int, default=30, help="functions listed per cProfile table")
    sampling = parser.add_argument_group("sampling (engine mode; default greedy, as bench_serve.py)")
    sampling.add_argument("--temperature", type=float, default=0.0)
    sampling.add_argument("--top-k", type=int, default=0)
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--kernels", default="auto", help="kernel mode, as `leanlm serve --kernels`")
    parser.add_argument("--model", default=None, help="model (default: the default model)")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)  # internal: the server mode's client
    parser.add_argument("--requests", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--first-index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client_main(args)

    from leanlm import LLM, SamplingParams

    llm = LLM(args.model, threads=args.threads, kernels=args.kernels)
    llm.generate(["Warm up the kernels."], SamplingParams(max_tokens=4, temperature=0))
    report, text = (run_server if args.server else run_engine)(llm, args)
    report = {"mode": "server" if args.server else "engine", "concurrency": args.concurrency, **report}
    if text:
        print(text)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
