"""One engine, one fresh process, one sample: `python -m leanlm.bench.worker '<json spec>'` prints a JSON result.

A sample is: load time, then per batch size one generation of `gen_tokens`, timed around the engine's call
(engines.time_generation): time until every prompt has its first token (prefill), and the (gen_tokens - 1)
further tokens per prompt over the rest (decode). Peak RSS covers it all.

Prompts are real text (the evaluation corpus, Wikipedia), a different stretch of it for every row of a batch,
and the warm-up runs on a text of its own: no prompt shares tokens with another or with the warm-up, so no
engine can serve a prompt token from a cache (leanlm's bench engine also runs with its prefix cache off).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

from leanlm.errors import InvalidRequestError

# The warm-up's text, unrelated to the prompts.
WARMUP_TEXT = (
    "Bread dough rises because yeast ferments sugars and releases carbon dioxide, which the gluten network "
    "traps in small bubbles; a cool, slow rise gives the loaf more flavour than a warm, fast one."
)


def prompt_text() -> str:
    from leanlm.evaluate.corpus import evaluation_text

    return evaluation_text(quiet=True)


def prompt_ids(tokenizer, text: str, length: int, batch: int) -> list[list[int]]:
    """`batch` prompts of exactly `length` tokens: consecutive, non-overlapping stretches of `text`."""
    needed = batch * length
    characters = 8 * needed
    while True:
        ids = tokenizer.encode(text[:characters], add_special_tokens=False)
        # one token more than needed: a word cut at the end of the slice is never used
        if len(ids) > needed or characters >= len(text):
            break
        characters *= 2
    if len(ids) < needed:
        raise InvalidRequestError(
            f"The prompt text has {len(ids)} tokens; {batch} prompts of {length} tokens need {needed}. "
            "Use fewer or shorter prompts."
        )
    return [ids[row * length : (row + 1) * length] for row in range(batch)]


def load_average() -> float | None:
    """The machine's 1-minute load average (other jobs share its cores), None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def peak_rss_mib() -> float:
    """This process's own peak resident memory. (ru_maxrss is not: Linux carries the parent's peak across exec.)"""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(spec: dict) -> dict:
    import torch

    from leanlm.bench.engines import ENGINES
    from leanlm.models.checkpoint import load_checkpoint

    torch.set_num_threads(spec["threads"])
    load_before = load_average()
    engine = ENGINES[spec["engine"]]()
    model = Path(spec["model"])
    started = time.perf_counter()
    engine.load(model, spec["dtype"], spec["device"], spec["threads"], **spec.get("options", {}))
    load_s = time.perf_counter() - started
    tokenizer = getattr(getattr(engine, "llm", None), "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        tokenizer = load_checkpoint(model, torch.float32, weights=False).tokenizer
    text = prompt_text()
    engine.generate(prompt_ids(tokenizer, WARMUP_TEXT, 16, 1), 4)  # warm-up: first-call allocations, kernel choice
    runs = []
    for batch in spec["batch_sizes"]:
        prompts = prompt_ids(tokenizer, text, spec["prompt_tokens"], batch)
        ttft, total = engine.generate(prompts, spec["gen_tokens"])
        decode_s = total - ttft
        runs.append(
            {
                "batch": batch,
                "ttft_s": ttft,
                "prefill_tok_s": batch * spec["prompt_tokens"] / ttft,
                "decode_tok_s": batch * (spec["gen_tokens"] - 1) / decode_s,
                "ms_per_token": 1e3 * decode_s / (spec["gen_tokens"] - 1),
            }
        )
    return {
        "engine": engine.name,
        "precision": engine.precision,
        "bits_per_weight": engine.bits_per_weight,
        "kv_bytes_per_value": engine.kv_bytes_per_value,
        "decode_weight_bytes": getattr(engine, "decode_weight_bytes", None),
        "notes": list(engine.notes),
        "load_average": [load_before, load_average()],  # 1-minute, at the start and end of this sample
        "load_s": load_s,
        "peak_rss_mib": peak_rss_mib(),
        "runs": runs,
    }


def main() -> None:
    from leanlm.errors import LeanLMError

    try:
        result = run(json.loads(sys.argv[1]))
    except LeanLMError as exc:
        result = {"error": str(exc)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
