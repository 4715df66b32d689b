"""`leanlm optimize` end to end: search, then write the chosen artifact (atomically) with its quality card,
the Pareto front PNG and the HTML report. The work folder keeps every built candidate and measurement, so a
rerun (or a run after an interruption) only measures what is missing."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from leanlm.errors import InvalidRequestError
from leanlm.optimize.card import write_card_files
from leanlm.optimize.formats import Candidate, candidates
from leanlm.optimize.measure import EVAL_CONTEXT, EVAL_STRIDE, EngineMeasurer, split_text
from leanlm.optimize.search import Budget, MeasurementCache, SearchResult, search

EVAL_CORPUS = "wiki"


@dataclass
class OptimizeRequest:
    model: str | None
    budget: Budget
    objective: str = "decode"
    formats: list[str] = field(default_factory=list)
    kv_caches: list[str] = field(default_factory=lambda: ["auto"])
    threads: list[int] = field(default_factory=lambda: [2])
    kernels: list[str] = field(default_factory=lambda: ["auto"])
    output: str = "optimized"
    work: str | None = None
    eval_tokens: int = 1024
    speed_repetitions: int = 2
    max_measured: int | None = None
    quality_only: bool = False  # measure quality now (load does not change it); time the candidates in a later run
    command: str = ""


def work_folder(request: OptimizeRequest, model: Path) -> Path:
    """The work folder, tied to its model and evaluation settings: reusing it with others would mix results."""
    work = Path(request.work or f"{request.output}.work")
    settings = {"model": str(model), "eval_tokens": request.eval_tokens, "context": EVAL_CONTEXT, "stride": EVAL_STRIDE}
    path = work / "settings.json"
    if path.is_file() and json.loads(path.read_text()) != settings:
        raise InvalidRequestError(
            f"The work folder {work} holds measurements of other settings ({path}). Pass another --work or remove it."
        )
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))
    return work


def optimize(request: OptimizeRequest) -> dict:
    from leanlm.evaluate.corpus import corpus_text
    from leanlm.formats.loader import resolve_model_path

    model = resolve_model_path(request.model).resolve()
    work = work_folder(request, model)
    search_half, _ = split_text(corpus_text(EVAL_CORPUS, quiet=True))
    measurer = EngineMeasurer(
        str(model), work, search_half, request.eval_tokens, request.speed_repetitions, progress=False
    )
    space = candidates(request.formats, request.kv_caches, request.threads, request.kernels)
    print(f"leanlm: {len(space)} candidates; predicting each with `leanlm plan`'s probes...", file=sys.stderr)
    cache = MeasurementCache(work / "measurements.jsonl")
    result = search(
        space, measurer, request.budget, request.objective, cache, request.max_measured, timed=not request.quality_only
    )
    summary = {
        "model": str(model),
        "work": str(work),
        "best": result.best,
        "front": result.front,
        "entries": result.entries,
    }
    save_search(result, work / "search.json", request, model)
    if result.best is None or request.quality_only:
        summary["report"] = str(write_report(result, work, request, model))
        return summary
    output = write_artifact(result, measurer, request, model)
    summary["output"] = str(output)
    summary["card"] = json.loads((output / "card.json").read_text())
    return summary


def save_search(result: SearchResult, path: Path, request: OptimizeRequest, model: Path) -> None:
    """Every candidate with its prediction and measurements, the front and the choice, as JSON."""
    from leanlm.bench.machine import describe
    from leanlm.bench.worker import load_average

    payload = {
        "model": str(model),
        "objective": result.objective,
        "budget": request.budget.to_dict(),
        "command": request.command,
        "machine": {**describe(request.threads[0]), "load_average": load_average()},
        "entries": result.entries,
        "front": [e["key"] for e in result.front],
        "best": None if result.best is None else result.best["key"],
    }
    path.write_text(json.dumps(payload, indent=2))


def write_artifact(result: SearchResult, measurer: EngineMeasurer, request: OptimizeRequest, model: Path) -> Path:
    from leanlm.bench.machine import describe
    from leanlm.bench.worker import load_average
    from leanlm.compress.artifact import atomic_folder
    from leanlm.engine.llm import LLM
    from leanlm.evaluate import evaluate
    from leanlm.evaluate.corpus import corpus_text

    best = result.best
    candidate = Candidate(**best["candidate"])
    source = measurer.artifact(candidate)
    # The held-out half: the search never scored it. The card carries both.
    _, held_out = split_text(corpus_text(EVAL_CORPUS, quiet=True))
    llm = LLM(source, device="cpu", threads=candidate.threads, **measurer.load_options(candidate))
    check = evaluate(
        llm,
        held_out,
        corpus="wiki (held-out half)",
        context=EVAL_CONTEXT,
        stride=EVAL_STRIDE,
        max_tokens=request.eval_tokens,
        baseline=measurer.baseline(),
    )
    held_out_quality = {
        "kl_mean": check.kl_mean,
        "ppl_ratio": check.ppl_ratio,
        "top1_agreement": check.top1_agreement,
        "eval_tokens": check.num_tokens,
        "meets_budget": None,
    }
    held_out_quality["meets_budget"] = request.budget.meets(held_out_quality)
    output = Path(request.output)
    load_path = "." if source.is_dir() else source.name
    options = measurer.load_options(candidate) | {"kv_cache": candidate.kv_cache, "threads": candidate.threads}
    flags = f" --dtype {options['dtype']}" + (" --dequantize" if options["dequantize"] else "")
    flags += f" --kv-cache {candidate.kv_cache} --kernels {candidate.kernels} --threads {candidate.threads}"
    card = {
        "name": str(output),
        "source": str(model),
        "format": candidate.spec.to_dict(),
        "candidate": candidate.to_dict(),
        "objective": result.objective,
        "budget": request.budget.to_dict(),
        "budget_text": request.budget.describe(),
        "quality": {k: best[k] for k in ("kl_mean", "ppl_ratio", "top1_agreement", "eval_tokens")},
        "held_out_quality": held_out_quality,
        "speed": {
            "decode_tok_s": best["decode_tok_s"],
            "prefill_tok_s": best["prefill_tok_s"],
            "peak_rss_mib": best["peak_rss_mib"],
            "prompt_tokens": measurer.prompt_tokens,
            "gen_tokens": measurer.gen_tokens,
            "threads": candidate.threads,
            "samples": best.get("speed_samples"),
        },
        "disk_bytes": best["disk_bytes"],
        "eval": {
            "corpus": EVAL_CORPUS,
            "context": EVAL_CONTEXT,
            "stride": EVAL_STRIDE,
            "search_tokens": best["eval_tokens"],
            "held_out_tokens": request.eval_tokens,
        },
        "load": {"path": load_path, "options": options},
        "command": f'leanlm generate --model {output / load_path if load_path != "." else output}{flags} "Hello"',
        "machine": {**describe(candidate.threads), "load_average": round(load_average() or 0, 1)},
        "search": {"command": request.command, "front": [e["key"] for e in result.front]},
    }
    with atomic_folder(output) as scratch:
        if source.is_dir():
            for item in source.iterdir():
                shutil.copy2(item, scratch / item.name)
        else:
            shutil.copy2(source, scratch / source.name)
        write_card_files(scratch, card)
        write_report(result, scratch, request, model)
    return output


def write_report(result: SearchResult, folder: Path, request: OptimizeRequest, model: Path) -> Path:
    from leanlm.bench.machine import describe
    from leanlm.optimize.report import html_report, save_front_png

    png = save_front_png(result, folder / "front.png")
    if png is None:
        print("leanlm: no front.png (matplotlib missing): `pip install 'leanlm[bench]'`.", file=sys.stderr)
    commands = [request.command] if request.command else []
    if result.best is not None:
        commands.append(f"leanlm eval --card {request.output}")
    text = html_report(result, png, describe(request.threads[0]), commands, f"leanlm optimize: {model.name}")
    path = folder / "report.html"
    path.write_text(text)
    return path
