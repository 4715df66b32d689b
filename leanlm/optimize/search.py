"""The budgeted search: candidates ordered by a cheap proxy, measured for quality first (a candidate over the
quality budget is never timed), then for speed and memory; every measurement cached on disk, so a rerun or an
interrupted run resumes where it stopped. The result is the Pareto front of quality against the objective.

The measurer is anything with `predict(candidate) -> dict` (cheap: the objective's predicted value),
`quality(candidate) -> dict` (kl_mean, ppl_ratio, top1_agreement, disk_bytes) and `speed(candidate) -> dict`
(decode_tok_s, prefill_tok_s, peak_rss_mib); tests use a fake one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from leanlm.errors import InvalidRequestError
from leanlm.optimize.formats import Candidate

# objective -> (metric, higher is better)
OBJECTIVES = {
    "decode": ("decode_tok_s", True),
    "prefill": ("prefill_tok_s", True),
    "memory": ("peak_rss_mib", False),
    "disk": ("disk_bytes", False),
}


class Measurer(Protocol):
    def predict(self, candidate: Candidate) -> dict: ...
    def quality(self, candidate: Candidate) -> dict: ...
    def speed(self, candidate: Candidate) -> dict: ...


@dataclass(frozen=True)
class Budget:
    max_kl: float | None = None  # nats per token against the original
    max_ppl_increase: float | None = None  # a fraction: 0.02 = perplexity at most 2% above the original's
    min_top1: float | None = None  # fraction of positions where the top token agrees with the original's

    def __post_init__(self) -> None:
        if self.max_kl is None and self.max_ppl_increase is None and self.min_top1 is None:
            raise InvalidRequestError("Give a quality budget: --max-kl 0.05, --max-ppl-increase 2% or --min-top1 0.9.")
        if self.max_kl is not None and self.max_kl <= 0:
            raise InvalidRequestError(f"--max-kl must be > 0, got {self.max_kl}.")
        if self.max_ppl_increase is not None and self.max_ppl_increase < 0:
            raise InvalidRequestError(f"--max-ppl-increase must be >= 0, got {self.max_ppl_increase}.")
        if self.min_top1 is not None and not 0 < self.min_top1 <= 1:
            raise InvalidRequestError(f"--min-top1 must be in (0, 1], got {self.min_top1}.")

    def meets(self, quality: dict) -> bool:
        return not self.violations(quality)

    def violations(self, quality: dict) -> list[str]:
        failed = []
        if self.max_kl is not None and quality["kl_mean"] > self.max_kl:
            failed.append(f"KL {quality['kl_mean']:.4f} > {self.max_kl}")
        if self.max_ppl_increase is not None and quality["ppl_ratio"] > 1 + self.max_ppl_increase:
            failed.append(f"perplexity x{quality['ppl_ratio']:.4f} > x{1 + self.max_ppl_increase:.4f}")
        if self.min_top1 is not None and quality["top1_agreement"] < self.min_top1:
            failed.append(f"top-1 {quality['top1_agreement']:.4f} < {self.min_top1}")
        return failed

    def describe(self) -> str:
        parts = []
        if self.max_kl is not None:
            parts.append(f"KL <= {self.max_kl}")
        if self.max_ppl_increase is not None:
            parts.append(f"perplexity increase <= {100 * self.max_ppl_increase:g}%")
        if self.min_top1 is not None:
            parts.append(f"top-1 agreement >= {self.min_top1}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {"max_kl": self.max_kl, "max_ppl_increase": self.max_ppl_increase, "min_top1": self.min_top1}


def parse_percent(text: str) -> float:
    """'2%' -> 0.02, '0.02' -> 0.02."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise InvalidRequestError(f"Expected a fraction or a percentage such as 2%, got '{text}'.") from None


class MeasurementCache:
    """One JSON line per measured candidate, appended as soon as it is known (an interrupted run keeps them)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry

    def get(self, candidate: Candidate) -> dict | None:
        return self.entries.get(candidate.key)

    def put(self, candidate: Candidate, entry: dict) -> None:
        """Add to (or complete) the candidate's entry; the last line for a key wins when the file is read."""
        entry = {**self.entries.get(candidate.key, {}), "key": candidate.key, "candidate": candidate.to_dict(), **entry}
        self.entries[candidate.key] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def dominates(a: dict, b: dict, metric: str, higher: bool) -> bool:
    """a is no worse than b in quality (KL) and in the objective, and better in one."""
    better_obj = a[metric] > b[metric] if higher else a[metric] < b[metric]
    no_worse_obj = a[metric] >= b[metric] if higher else a[metric] <= b[metric]
    return a["kl_mean"] <= b["kl_mean"] and no_worse_obj and (a["kl_mean"] < b["kl_mean"] or better_obj)


def pareto_front(entries: list[dict], metric: str, higher: bool) -> list[dict]:
    """The fully measured entries no other entry dominates, by increasing KL."""
    full = [e for e in entries if e.get(metric) is not None]
    front = [e for e in full if not any(dominates(o, e, metric, higher) for o in full if o is not e)]
    return sorted(front, key=lambda e: e["kl_mean"])


@dataclass
class SearchResult:
    objective: str
    budget: Budget
    entries: list[dict]  # every candidate: measured, skipped (with why), or over budget
    front: list[dict]
    best: dict | None  # the front's best objective value among candidates within the budget
    log: list[str] = field(default_factory=list)


# A calibrated method (GPTQ, AWQ) is skipped when round-to-nearest at the same bits and groups measured more than
# this many times the KL budget: calibration cut KL by 1.5-3x in every measurement of this project, never 10x.
CALIBRATION_GAIN_BOUND = 4.0


def rtn_sibling_failure(candidate: Candidate, entries: dict[str, dict], budget: Budget) -> str | None:
    """Why a calibrated candidate cannot meet the budget, judged from its measured round-to-nearest sibling."""
    spec = candidate.spec
    if not spec.calibrated or budget.max_kl is None:
        return None
    for entry in entries.values():
        other = Candidate(**entry["candidate"])
        same_layout = other.spec.method == "int4" and (other.spec.bits, other.spec.group_size, other.spec.mixed) == (
            spec.bits,
            spec.group_size,
            spec.mixed,
        )
        if (
            same_layout
            and entry.get("kl_mean") is not None
            and entry["kl_mean"] > CALIBRATION_GAIN_BOUND * budget.max_kl
        ):
            return f"round-to-nearest at the same bits and groups measured KL {entry['kl_mean']:.3f}"
    return None


def search(
    candidates: list[Candidate],
    measurer: Measurer,
    budget: Budget,
    objective: str,
    cache: MeasurementCache,
    max_measured: int | None = None,
    progress: Callable[[str], None] | None = None,
    timed: bool = True,
) -> SearchResult:
    """Measure the cheap candidates first (round-to-nearest, the source), then the calibrated ones, each group by
    best predicted objective. Skip a candidate whose format is coarser than one that already failed the budget
    (same method, fewer bits or bigger groups cannot do better), and a calibrated one whose round-to-nearest
    sibling is far over the budget (CALIBRATION_GAIN_BOUND). timed=False measures quality only (a loaded machine
    does not change it); a later run times the candidates within the budget."""
    if objective not in OBJECTIVES:
        raise InvalidRequestError(f"Unknown objective '{objective}'. Choose among: {', '.join(OBJECTIVES)}.")
    metric, higher = OBJECTIVES[objective]
    say = progress or (lambda line: print(line, file=sys.stderr))
    predicted = {c.key: measurer.predict(c) for c in candidates}
    sign = -1 if higher else 1
    ordered = sorted(candidates, key=lambda c: (c.spec.calibrated, sign * predicted[c.key].get(metric, 0)))
    entries: dict[str, dict] = {}
    failed: list[Candidate] = []
    durations: list[float] = []
    measured_now = 0
    for index, candidate in enumerate(ordered):
        cached = cache.get(candidate)
        if cached is None and (
            coarser := next((f for f in failed if f.spec.at_least_as_fine_as(candidate.spec)), None)
        ):
            entry = {"key": candidate.key, "candidate": candidate.to_dict(), "skipped": f"{coarser.format} failed"}
            entries[candidate.key] = {**entry, "predicted": predicted[candidate.key]}
            say(f"[{index + 1}/{len(ordered)}] {candidate.key}: skipped ({coarser.format}, at least as fine, failed)")
            continue
        if cached is None and (why := rtn_sibling_failure(candidate, entries, budget)):
            entries[candidate.key] = {
                "key": candidate.key,
                "candidate": candidate.to_dict(),
                "skipped": why,
                "predicted": predicted[candidate.key],
            }
            say(f"[{index + 1}/{len(ordered)}] {candidate.key}: skipped ({why})")
            continue
        if cached is None and max_measured is not None and measured_now >= max_measured:
            entries[candidate.key] = {
                "key": candidate.key,
                "candidate": candidate.to_dict(),
                "skipped": "measurement limit reached",
                "predicted": predicted[candidate.key],
            }
            continue
        todo = cached is None or (timed and budget.meets(cached) and cached.get(metric) is None)
        if todo:
            remaining = sum(1 for c in ordered[index:] if cache.get(c) is None)
            eta = f", ETA {_duration(sum(durations) / len(durations) * remaining)}" if durations else ""
            say(f"[{index + 1}/{len(ordered)}] {candidate.key}: measuring{eta}")
            started = time.perf_counter()
            if cached is None:
                cache.put(candidate, measurer.quality(candidate))
            if timed and budget.meets(cache.get(candidate)):  # over the budget: never timed
                cache.put(candidate, measurer.speed(candidate))
            durations.append(time.perf_counter() - started)
            measured_now += 1
            cached = cache.get(candidate)
        else:
            say(f"[{index + 1}/{len(ordered)}] {candidate.key}: cached")
        entry = {**cached, "within_budget": budget.meets(cached), "predicted": predicted[candidate.key]}
        entries[candidate.key] = entry
        if not entry["within_budget"]:
            failed.append(candidate)
    all_entries = list(entries.values())
    front = pareto_front([e for e in all_entries if "skipped" not in e], metric, higher)
    within = [e for e in all_entries if e.get("within_budget") and e.get(metric) is not None]
    best = (max if higher else min)(within, key=lambda e: e[metric]) if within else None
    return SearchResult(objective, budget, all_entries, front, best)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
