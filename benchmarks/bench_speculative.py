"""Speculative decoding: decode tok/s and acceptance of each drafter against plain decoding, batch 1, greedy, and
llama.cpp (llama-cpp-python, plain and with its prompt-lookup draft, LlamaPromptLookupDecoding) on the same GGUF file.

Three chat tasks: editing code (rewrite a given function), summarizing a given passage, and a free story. Every
engine of a model shares the loaded weights (one LLMEngine per method over the same model); runs are interleaved
(for each repetition, each task, every engine in turn) so that load drift on a shared machine hits all of them,
and the table gives medians. "same" says whether leanlm's greedy tokens equal plain decoding's (lossless).

    python benchmarks/bench_speculative.py [--models default,qwen2.5-coder-1.5b] [--methods ngram,self]
        [--tasks "code edit,summarize,story"] [--max-tokens 128] [--repetitions 3] [--threads 2] [--no-llama-cpp]
"""

from __future__ import annotations

import argparse
import statistics
import time

from leanlm import LLM, SamplingParams
from leanlm.bench.machine import describe
from leanlm.config import EngineConfig
from leanlm.engine.engine import LLMEngine

CODE = """def parse_config(path):
    with open(path) as f:
        lines = f.readlines()
    config = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, value = line.split("=", 1)
        config[key.strip()] = value.strip()
    return config


def load_users(config):
    users = []
    with open(config["users_file"]) as f:
        for line in f:
            name, email = line.strip().split(",")
            users.append({"name": name, "email": email})
    return users
"""

PASSAGE = (
    "The lighthouse at Point Arden was built in 1871 to guard a stretch of coast where more than forty ships had "
    "been lost in the previous two decades. Its first keeper, Thomas Hale, lived in the tower with his wife and "
    "three children, and kept a log of every vessel that passed. The light was fuelled by whale oil until 1890, "
    "then by kerosene, and it was finally electrified in 1934. During the Second World War the lamp was dimmed "
    "and the tower served as a lookout post for the coastal defence. The last keeper left in 1989, when the light "
    "was automated, and the keeper's cottage became a small museum that displays Hale's logbooks, the original "
    "Fresnel lens and photographs of the shipwrecks that led to the lighthouse being built."
)

TASKS = {
    "code edit": "Rewrite these functions to use pathlib and type hints. Keep the logic the same.\n\n" + CODE,
    "summarize": "Summarize the following passage in a few sentences.\n\n" + PASSAGE,
    "story": "Write a short story about a fox who learns to play the violin.",
}


def leanlm_run(llm: LLM, engine: LLMEngine, ids: list[int], max_tokens: int) -> dict:
    llm.engine = engine
    out = llm.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0))[0]
    m = out.metrics
    return {
        "tok_s": m.decode_tokens_per_s,
        "tokens": out.token_ids,
        "drafted": m.num_draft_tokens,
        "accepted": m.num_accepted_tokens,
    }


def llama_cpp_run(model, ids: list[int], max_tokens: int) -> dict:
    model.reset()
    first, count = None, 0
    for token in model.generate(ids, top_k=1, temp=0.0, reset=True):
        count += 1
        if first is None:
            first = time.perf_counter()
        if token == model.token_eos() or count >= max_tokens:
            break
    last = time.perf_counter()
    return {"tok_s": (count - 1) / (last - first) if count > 1 else 0.0, "tokens": None, "drafted": 0, "accepted": 0}


def load_llama_cpp(path, threads: int):
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError:
        return {}
    common = dict(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=2048, verbose=False)
    return {
        "llama.cpp": Llama(**common),
        "llama.cpp lookup": Llama(**common, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="default,qwen2.5-coder-1.5b")
    parser.add_argument("--methods", default="ngram,self", help="leanlm --speculative methods besides plain")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, among: " + ", ".join(TASKS))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-llama-cpp", action="store_true")
    args = parser.parse_args()
    machine = describe(args.threads)
    print(f"# {machine.get('cpu')} | {args.threads} threads | batch 1, greedy, {args.max_tokens} tokens at most")
    rows = []
    for name in args.models.split(","):
        llm = LLM(None if name == "default" else name, threads=args.threads)
        engines = {"plain": llm.engine}
        for method in filter(None, args.methods.split(",")):
            config = EngineConfig(speculative=method)
            engines[method] = LLMEngine(llm.model, llm.tokenizer, config, llm.plan.kv_cache, args.threads)
        peers = {} if args.no_llama_cpp else load_llama_cpp(llm.model_path, args.threads)
        tasks = args.tasks.split(",")
        prompts = {task: llm.apply_chat_template([{"role": "user", "content": TASKS[task]}]) for task in tasks}
        leanlm_run(llm, engines["plain"], prompts["story"], 4)  # warm-up
        results: dict[tuple[str, str], list[dict]] = {}
        for repetition in range(args.repetitions):
            for task, ids in prompts.items():
                for engine_name, engine in engines.items():
                    sample = leanlm_run(llm, engine, ids, args.max_tokens)
                    results.setdefault((task, engine_name), []).append(sample)
                    accepted = f", accepted {sample['accepted']}/{sample['drafted']}" if sample["drafted"] else ""
                    speed = f"{sample['tok_s']:.2f} tok/s"
                    print(f"  [{repetition}] {name} {task} {engine_name}: {speed}{accepted}", flush=True)
                for peer_name, peer in peers.items():
                    sample = llama_cpp_run(peer, ids, args.max_tokens)
                    results.setdefault((task, peer_name), []).append(sample)
                    print(f"  [{repetition}] {name} {task} {peer_name}: {sample['tok_s']:.2f} tok/s", flush=True)
        for task in prompts:
            plain = statistics.median(s["tok_s"] for s in results[(task, "plain")])
            reference = results[(task, "plain")][0]["tokens"]
            peer_plain = statistics.median(s["tok_s"] for s in results.get((task, "llama.cpp"), [{"tok_s": 0}]))
            for engine_name in [*engines, *peers]:
                samples = results[(task, engine_name)]
                speed = statistics.median(s["tok_s"] for s in samples)
                drafted = sum(s["drafted"] for s in samples)
                accepted = sum(s["accepted"] for s in samples)
                base = peer_plain if engine_name.startswith("llama.cpp") else plain
                same = "-" if samples[0]["tokens"] is None else str(all(s["tokens"] == reference for s in samples))
                acceptance = f"{accepted / drafted:.0%} of {drafted // len(samples)}" if drafted else "-"
                rows.append((name, task, engine_name, speed, speed / base if base else 0.0, acceptance, same))
        del llm, engines, peers
    print("\n| model | task | engine | decode tok/s (median) | vs its plain | acceptance (drafted/run) | same tokens |")
    print("|---|---|---|---:|---:|---:|---|")
    for name, task, engine_name, speed, ratio, acceptance, same in rows:
        print(f"| {name} | {task} | {engine_name} | {speed:.2f} | {ratio:.2f}x | {acceptance} | {same} |")


if __name__ == "__main__":
    main()
