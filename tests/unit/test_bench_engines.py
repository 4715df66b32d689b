"""The benchmark measures what it says: every engine timed around its whole call, exactly N tokens per prompt,
distinct prompts per batch row, nothing served from a prefix cache, and a crashing llama.cpp rerun without its
extra buffer types. No timing is asserted: a fake clock stands in for the real one."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from leanlm.bench import engines, runner, worker
from leanlm.bench.engines import LeanLMEngine, bench_engine_config, time_generation
from leanlm.bench.runner import BenchSpec, EngineSpec, WorkerCrashed
from leanlm.errors import InvalidRequestError, LeanLMError


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(engines.time, "perf_counter", fake)
    return fake


def test_first_token_waits_for_every_row_and_the_clock_covers_the_whole_call(clock):
    def run(on_tokens):
        clock.now = 1.0  # setting up the call counts too
        on_tokens([0])  # row 0's first token (its prefill chunk came first)
        clock.now = 3.0
        on_tokens([1, 0])  # row 1's first token: the batch's prefill is done
        clock.now = 4.0
        on_tokens([1])
        clock.now = 6.0  # work after the last token, before the call returns

    assert time_generation(run, batch=2, new_tokens=2) == (3.0, 6.0)


@pytest.mark.parametrize("schedule", [[[0], [0]], [[0, 1], [0, 1], [1]], [[0]]])
def test_a_wrong_number_of_tokens_is_an_error(clock, schedule):
    def run(on_tokens):
        for rows in schedule:
            on_tokens(rows)

    with pytest.raises(LeanLMError, match="asked for 2"):
        time_generation(run, batch=2, new_tokens=2)


def test_bench_engine_computes_every_prompt_token():
    assert bench_engine_config().enable_prefix_caching is False


class WordTokenizer:
    """One token per word: enough to check how prompts are cut from a text."""

    def encode(self, text, add_special_tokens=True):
        return [int(word.removeprefix("w")) for word in text.split()]


def test_batch_prompts_are_distinct_stretches_of_exact_length():
    text = " ".join(f"w{i}" for i in range(1000))
    prompts = worker.prompt_ids(WordTokenizer(), text, length=7, batch=5)
    assert [len(p) for p in prompts] == [7] * 5
    assert prompts == [list(range(7 * row, 7 * row + 7)) for row in range(5)]  # consecutive, no overlap


def test_too_short_a_text_is_refused():
    with pytest.raises(InvalidRequestError, match="need 12"):
        worker.prompt_ids(WordTokenizer(), "w1 w2 w3", length=4, batch=3)


def crash_then_succeed(calls, crash_signal=11, crashes=1):
    def fake_run(command, **kwargs):
        spec = json.loads(command[-1])
        calls.append(spec)
        if len(calls) <= crashes:
            return subprocess.CompletedProcess(command, -crash_signal, "", "")
        sample = {"engine": spec["engine"], "notes": [], "runs": []}
        return subprocess.CompletedProcess(command, 0, json.dumps(sample) + "\n", "")

    return fake_run


def test_a_crashing_llama_cpp_is_rerun_without_extra_buffer_types(monkeypatch):
    calls = []
    monkeypatch.setattr(runner.subprocess, "run", crash_then_succeed(calls))
    spec = BenchSpec(model="m.gguf", engines=[EngineSpec("llama.cpp")])
    fallbacks = {}
    sample = runner.run_sample_or_fall_back(spec, spec.engines[0], fallbacks)
    assert [c["options"] for c in calls] == [{}, {"extra_bufts": False}]
    assert "SIGSEGV" in sample["notes"][0] and "extra buffer types" in sample["notes"][0]
    runner.run_sample_or_fall_back(spec, spec.engines[0], fallbacks)  # later samples go straight to the fallback
    assert calls[-1]["options"] == {"extra_bufts": False} and len(calls) == 3


def test_other_crashes_are_reported_not_retried(monkeypatch):
    calls = []
    monkeypatch.setattr(runner.subprocess, "run", crash_then_succeed(calls, crashes=3))
    spec = BenchSpec(model="m.gguf", engines=[EngineSpec("leanlm"), EngineSpec("llama.cpp")])
    with pytest.raises(WorkerCrashed, match="leanlm benchmark process died from signal 11"):
        runner.run_sample_or_fall_back(spec, spec.engines[0], {})
    with pytest.raises(WorkerCrashed, match="llama.cpp"):  # crashes again without the extra buffer types
        runner.run_sample_or_fall_back(spec, spec.engines[1], {})
    assert len(calls) == 3


# ---- on the real default model ------------------------------------------------------------------------------


@pytest.mark.slow
def test_leanlm_engine_serves_no_prompt_token_from_a_cache(default_gguf_path):
    engine = LeanLMEngine()
    engine.load(default_gguf_path, "auto", "cpu", 2)
    prompt = list(range(1000, 1040))  # 40 tokens: two full 16-token blocks that a prefix cache would keep
    engine.generate([prompt], 3)
    ttft, total = engine.generate([prompt, prompt], 3)  # the same prompt again, twice in one batch
    assert 0 < ttft < total
    assert engine.llm.engine.stats().prefix_cache_hits == 0


@pytest.mark.slow
def test_real_prompts_share_no_tokens_across_rows_or_with_the_warm_up(default_gguf_path):
    from leanlm.models.checkpoint import load_checkpoint

    tokenizer = load_checkpoint(default_gguf_path, weights=False).tokenizer
    prompts = worker.prompt_ids(tokenizer, worker.prompt_text(), 120, 16)
    warm_up = worker.prompt_ids(tokenizer, worker.WARMUP_TEXT, 16, 1)[0]
    assert all(len(p) == 120 for p in prompts)
    first_blocks = {tuple(p[:16]) for p in prompts} | {tuple(warm_up)}
    assert len(first_blocks) == 17  # no two prompts (or a prompt and the warm-up) start alike


@pytest.mark.slow
def test_llama_cpp_runs_without_extra_buffer_types_and_steps_once_per_token(default_gguf_path):
    pytest.importorskip("llama_cpp")
    engine = engines.LlamaCppEngine()
    engine.load(default_gguf_path, "auto", "cpu", 2, extra_bufts=False)
    assert engine.llm.model_params.use_extra_bufts is False
    assert engine.notes == ("extra buffer types (repack/AMX) off",)
    evals = []
    real_eval = engine.llm.eval
    engine.llm.eval = lambda tokens: (evals.append(len(tokens)), real_eval(tokens))
    ttft, total = engine.generate([list(range(1000, 1020))], 5)
    assert evals == [20, 1, 1, 1, 1]  # the prompt, then one step per token after the first
    assert 0 < ttft < total


def test_unknown_llama_cpp_options_are_refused(monkeypatch):
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: SimpleNamespace())
    with pytest.raises(InvalidRequestError, match="no option kv_cache"):
        engines.LlamaCppEngine().load(Path("m.gguf"), "auto", "cpu", 2, kv_cache="int8")
