"""Run engines in fresh processes, interleaved A/B/A/B, and aggregate samples into a report with roofline bounds."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from leanlm.bench import machine
from leanlm.bench.roofline import decode_bound, decode_weight_bytes, prefill_flops
from leanlm.bench.worker import load_average
from leanlm.errors import InvalidRequestError, LeanLMError

METRICS = ("prefill_tok_s", "decode_tok_s", "ms_per_token", "ttft_s")


@dataclass(frozen=True)
class EngineSpec:
    engine: str  # leanlm | transformers | llama.cpp
    dtype: str = "auto"
    model: str | None = None  # None: the benchmark's model
    options: tuple[tuple[str, str | bool], ...] = ()  # extra LLM(...) arguments, e.g. (("kv_cache", "int8"),)
    label: str | None = None  # shown instead of the precision the engine reports
    source: str | None = None  # another leanlm checkout whose code this engine runs (before/after in one run)


@dataclass(frozen=True)
class BenchSpec:
    model: str
    engines: list[EngineSpec]
    threads: int = 2
    device: str = "cpu"
    prompt_tokens: int = 120
    gen_tokens: int = 128
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    repetitions: int = 3

    def __post_init__(self) -> None:
        if self.repetitions < 1 or self.prompt_tokens < 1 or self.gen_tokens < 2:
            raise InvalidRequestError("repetitions and prompt tokens must be >= 1 and generated tokens >= 2.")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise InvalidRequestError("batch sizes must be integers >= 1, e.g. --batch 1,4,16.")


def run_sample(spec: BenchSpec, engine: EngineSpec, timeout_s: float = 1800) -> dict:
    """One fresh process: its load time and peak memory are its own."""
    worker_spec = {
        "engine": engine.engine,
        "model": engine.model or spec.model,
        "dtype": engine.dtype,
        "device": spec.device,
        "threads": spec.threads,
        "prompt_tokens": spec.prompt_tokens,
        "gen_tokens": spec.gen_tokens,
        "batch_sizes": [1] if engine.engine == "llama.cpp" else spec.batch_sizes,
        "options": dict(engine.options),
    }
    env = None if engine.source is None else {**os.environ, "PYTHONPATH": str(Path(engine.source).resolve())}
    result = subprocess.run(
        [sys.executable, "-m", "leanlm.bench.worker", json.dumps(worker_spec)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode < 0:
        raise WorkerCrashed(engine, -result.returncode)
    if result.returncode != 0 or not lines:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise LeanLMError(f"The {engine.engine} benchmark process failed:\n{tail}")
    sample = json.loads(lines[-1])
    if "error" in sample:
        raise LeanLMError(f"{engine.engine}: {sample['error']}")
    return sample


class WorkerCrashed(LeanLMError):
    def __init__(self, engine: EngineSpec, signal_number: int):
        name = _signal_name(signal_number)
        super().__init__(f"The {engine.engine} benchmark process died from signal {signal_number} ({name}).")
        self.signal_number = signal_number


def run_sample_or_fall_back(spec: BenchSpec, engine: EngineSpec, fallbacks: dict[EngineSpec, EngineSpec]) -> dict:
    """Run one sample; a llama.cpp process that crashes (a native build segfaults on some CPUs, e.g. Intel Xeon
    with AMX under KVM, with its extra buffer types on) is run again with them off, and so are its later samples.
    The sample's notes say so."""
    runs_as = fallbacks.get(engine, engine)
    try:
        return run_sample(spec, runs_as)
    except WorkerCrashed as crash:
        if runs_as.engine != "llama.cpp" or ("extra_bufts", False) in runs_as.options:
            raise
        fallback = replace(runs_as, options=(*runs_as.options, ("extra_bufts", False)))
        sample = run_sample(spec, fallback)
        fallbacks[engine] = fallback
        note = f"crashed with extra buffer types on ({crash}); rerun with them off"
        sample["notes"] = [note, *sample.get("notes", [])]
        return sample


def run_benchmark(spec: BenchSpec, on_sample: Callable[[int, EngineSpec, dict], None] | None = None) -> dict:
    from leanlm.models.checkpoint import load_checkpoint

    config = load_checkpoint(spec.model, weights=False).config
    load_before = load_average()
    bandwidth = machine.memory_bandwidth_gbs(spec.threads) if spec.device == "cpu" else None
    samples: dict[EngineSpec, list[dict]] = {e: [] for e in spec.engines}
    fallbacks: dict[EngineSpec, EngineSpec] = {}
    for repetition in range(spec.repetitions):  # interleaved: A B C, A B C, ... so drift hits every engine
        for engine in spec.engines:
            sample = run_sample_or_fall_back(spec, engine, fallbacks)
            samples[engine].append(sample)
            if on_sample:
                on_sample(repetition, engine, sample)
    rows = [row for engine in spec.engines for row in _aggregate(engine, samples[engine], spec, config, bandwidth)]
    return {
        "machine": {**machine.describe(spec.threads), "load_average": [load_before, load_average()]},
        "spec": {**asdict(spec), "engines": [asdict(e) for e in spec.engines]},
        "model": {"path": spec.model, "parameters": config.num_parameters(), "layers": config.num_layers},
        "bandwidth_gbs": bandwidth,
        "rows": rows,
        "samples": [{"engine": asdict(e), "samples": s} for e, s in samples.items()],
    }


def _aggregate(engine: EngineSpec, samples: list[dict], spec: BenchSpec, config, bandwidth: float | None) -> list[dict]:
    first = samples[0]
    rows = []
    for index, run in enumerate(first["runs"]):
        batch = run["batch"]
        row = {
            "engine": first["engine"],
            "precision": engine.label or first["precision"],
            "batch": batch,
            "load_s": _stats([s["load_s"] for s in samples]),
            "peak_rss_mib": _stats([s["peak_rss_mib"] for s in samples]),
            "notes": sorted({note for s in samples for note in s.get("notes", [])}),
            "load_average": _load_range(samples),
        }
        for metric in METRICS:
            row[metric] = _stats([s["runs"][index][metric] for s in samples])
        flops = batch * prefill_flops(config, spec.prompt_tokens)
        row["prefill_gflop_s"] = flops / row["ttft_s"]["median"] / 1e9
        if bandwidth:
            # Average context during decode: the prompt plus half the generated tokens.
            context = spec.prompt_tokens + spec.gen_tokens // 2
            bits = first["bits_per_weight"]
            if first.get("decode_weight_bytes"):  # measured from the loaded model: exact for mixed layouts
                bits = 8 * first["decode_weight_bytes"] / (decode_weight_bytes(config, 8))
            bound = decode_bound(config, bits, context, first["kv_bytes_per_value"], bandwidth)
            bound_tok_s = batch * bandwidth * 1e9 / (bound.weight_bytes + batch * bound.kv_cache_bytes)
            row["decode_bound_tok_s"] = bound_tok_s
            row["roofline_pct"] = 100 * row["decode_tok_s"]["median"] / bound_tok_s
        rows.append(row)
    return rows


def _load_range(samples: list[dict]) -> list[float] | None:
    """The lowest and highest 1-minute load average seen at the start or end of these samples."""
    loads = [value for s in samples for value in s.get("load_average", []) if value is not None]
    return [min(loads), max(loads)] if loads else None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def add_ratios(report: dict, reference: tuple[str, str]) -> None:
    """Each row's median prefill/decode speed divided by the reference engine's at the same batch size."""
    base = {r["batch"]: r for r in report["rows"] if (r["engine"], r["precision"]) == reference}
    for row in report["rows"]:
        if row["batch"] in base:
            ref = base[row["batch"]]
            row["vs"] = {
                "engine": f"{reference[0]} {reference[1]}",
                "prefill": row["prefill_tok_s"]["median"] / ref["prefill_tok_s"]["median"],
                "decode": row["decode_tok_s"]["median"] / ref["decode_tok_s"]["median"],
                "load": row["load_s"]["median"] / ref["load_s"]["median"],
            }


def save_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2))
