"""Size and quality of leanlm's artifacts (uniform, mixed precision, int8 embedding, K-quant GGUF export) against
llama.cpp's own Q4_K_M of the same weights.

Each configuration is scored on the held-out half of the wiki text (never the calibration text): KL against the
source dequantized to bfloat16, top-1 agreement and perplexity ratio, plus its size on disk. GGUF files are read by
leanlm with every block dequantized, so the figure is the file's own. With --llama-cpp-check, each GGUF is also run
by llama.cpp and its logits compared with leanlm's on the same file (KL, top-1): does llama.cpp read the export as
leanlm does? Quality only: speed on this shared machine decides nothing (BENCHMARKS.md, "Plan and optimize").

    python benchmarks/bench_compact_artifacts.py --artifact "int4 g32=out/rtn4g32" --artifact "export=out/m.gguf" \
        [--eval-tokens 1024] [--llama-cpp-check] [--cache out/compact.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from leanlm.bench.llama_cpp_files import quantize_with_llama_cpp
from leanlm.bench.machine import describe
from leanlm.bench.worker import load_average
from leanlm.cli.bench import gguf_for_llama_cpp
from leanlm.engine.llm import LLM
from leanlm.evaluate import evaluate
from leanlm.evaluate.corpus import corpus_text
from leanlm.formats.assets import leanlm_home
from leanlm.optimize.measure import EVAL_CONTEXT, EVAL_STRIDE, folder_bytes, split_text


def llama_cpp_agreement(path: Path, text: str, tokens: int = 256) -> dict:
    """KL(leanlm || llama.cpp) and top-1 agreement of the two engines' logits on the same GGUF file."""
    from leanlm.bench.engines import llama_cpp_model

    llm = LLM(path, dtype="float32", device="cpu", dequantize=True)
    ids = llm.tokenizer.encode(text)[:tokens]
    with torch.inference_mode():
        ours = llm.model(torch.tensor([ids]), torch.arange(len(ids))[None])[0].float().log_softmax(-1)
    runner = llama_cpp_model(path, extra_bufts=False, n_ctx=tokens + 8, logits_all=True, verbose=False)
    runner.eval(ids)
    theirs = torch.from_numpy(np.asarray(runner.scores[: len(ids)], dtype=np.float32)).log_softmax(-1)
    kl = (ours.exp() * (ours - theirs)).sum(-1).mean().item()
    return {"kl_vs_leanlm": kl, "top1_vs_leanlm": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the source (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--artifact", action="append", default=[], help="LABEL=PATH (a leanlm folder or a GGUF)")
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-cpp-check", action="store_true", help="run each GGUF in llama.cpp too")
    parser.add_argument("--cache", default=None, help="JSON of scored configurations (a rerun scores only new ones)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = Path(LLM(args.model, device="cpu", threads=args.threads).model_path)  # a name or path -> its file
    q4_k_m = leanlm_home() / "exports" / f"{model.stem}.Q4_K_M.llama-quantize.gguf"
    configs = {"llama.cpp Q4_K_M": quantize_with_llama_cpp(gguf_for_llama_cpp(str(model), "F16"), "Q4_K_M", q4_k_m)}
    for item in args.artifact:
        label, _, path = item.partition("=")
        configs[label] = Path(path)
    cache = Path(args.cache) if args.cache else None
    rows = json.loads(cache.read_text()) if cache and cache.is_file() else {}
    _, held_out = split_text(corpus_text("wiki", quiet=True))
    load_before = load_average()
    baseline = None
    for label, path in configs.items():
        if label in rows:
            continue
        print(f"quality of {label}...", file=sys.stderr, flush=True)
        baseline = baseline or LLM(model, dtype="bfloat16", device="cpu", dequantize=True, threads=args.threads)
        gguf = path.suffix == ".gguf"
        llm = LLM(path, dtype="bfloat16", device="cpu", dequantize=gguf, threads=args.threads)
        q = evaluate(
            llm,
            held_out,
            corpus="wiki (held-out half)",
            context=EVAL_CONTEXT,
            stride=EVAL_STRIDE,
            max_tokens=args.eval_tokens,
            baseline=baseline,
            progress=False,
        )
        rows[label] = {
            "disk_mib": folder_bytes(path) / 2**20,
            "kl_mean": q.kl_mean,
            "top1_agreement": q.top1_agreement,
            "ppl_ratio": q.ppl_ratio,
            "eval_tokens": q.num_tokens,
        }
        if gguf and args.llama_cpp_check:
            rows[label].update(llama_cpp_agreement(path, held_out))
        del llm
        if cache:
            cache.write_text(json.dumps(rows, indent=2))
    machine = {**describe(args.threads), "load_average": [load_before, load_average()]}
    print(
        f"\n{model.name}; {machine['cpu']}, {args.threads} threads, load average {machine['load_average']}; "
        f"quality on {args.eval_tokens} held-out wiki tokens against the source dequantized to bfloat16\n"
    )
    print("| configuration | on disk | KL | top-1 | ppl ratio | llama.cpp vs leanlm on the file (KL, top-1) |")
    print("|---|---|---|---|---|---|")
    for label in configs:
        r = rows[label]
        check = f"{r['kl_vs_leanlm']:.4f}, {100 * r['top1_vs_leanlm']:.1f}%" if "kl_vs_leanlm" in r else ""
        print(
            f"| {label} | {r['disk_mib']:.1f} MiB | {r['kl_mean']:.4f} | {100 * r['top1_agreement']:.1f}% | "
            f"{r['ppl_ratio']:.4f} | {check} |"
        )


if __name__ == "__main__":
    main()
