"""One engine, one fresh process, one sample: `python -m leanlm.bench.worker '<json spec>'` prints a JSON result.

A sample is: load time, then per batch size one generation of `gen_tokens` timed inside the call: time to
the first token (prefill), and (gen_tokens - 1) further tokens over the rest (decode). Peak RSS covers it all.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

# A fixed English text; prompts are its first N tokens, so every engine sees identical token ids.
PROMPT_TEXT = (
    "The history of computing is a story of ideas that took decades to become practical. Charles Babbage "
    "designed mechanical engines in the nineteenth century, and Ada Lovelace wrote what many consider the "
    "first program for one of them. A century later, electronic machines filled whole rooms, and programmers "
    "fed them punched cards. The transistor, the integrated circuit and the microprocessor each shrank the "
    "machine and multiplied its speed, until a computer fit in a pocket. Software grew alongside: operating "
    "systems, compilers, databases and networks turned raw arithmetic into tools that anyone could use. "
    "Today, language models trained on vast amounts of text can answer questions, write code and translate "
    "between languages, yet they still run on the same basic principle of reading numbers from memory, "
    "multiplying them and writing the results back. How fast that happens depends less on the arithmetic "
    "than on how quickly the memory can deliver the weights, which is why small models and compressed "
    "weights matter so much on ordinary computers."
)


def prompt_ids(tokenizer, length: int, batch: int) -> list[list[int]]:
    ids = tokenizer.encode(PROMPT_TEXT, add_special_tokens=False)
    while len(ids) < length:
        ids = ids + ids
    return [ids[:length]] * batch


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
    engine = ENGINES[spec["engine"]]()
    model = Path(spec["model"])
    started = time.perf_counter()
    engine.load(model, spec["dtype"], spec["device"], spec["threads"], **spec.get("options", {}))
    load_s = time.perf_counter() - started
    tokenizer = getattr(getattr(engine, "llm", None), "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        tokenizer = load_checkpoint(model, torch.float32, weights=False).tokenizer
    engine.generate(prompt_ids(tokenizer, 16, 1), 4)  # warm-up: first-call allocations and kernel selection
    runs = []
    for batch in spec["batch_sizes"]:
        prompts = prompt_ids(tokenizer, spec["prompt_tokens"], batch)
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
