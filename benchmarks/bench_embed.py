"""Embedding benchmark: all-MiniLM-L6-v2 in leanlm (float32 / bf16 / int8 / int4) against sentence-transformers
(torch float32 and bf16) and CTranslate2 (float32 / int8 / bf16 where it runs them), same process, same run.

Speed: sentences/s at batch 1 and 32 for short texts (about 12 tokens) and 256-token texts, each engine timed
in turn within every repetition (A B C ... A B C ...), so load drift hits all; medians of the repetitions.
Every engine embeds the same texts from the same token ids' text (CTranslate2 gets leanlm's tokenizer's ids and
pools in numpy; its tokenization and pooling are inside its timing).
Quality: retrieval on wiki.utf8 (paragraph = document, its first sentence = query, taken out of the document):
recall@1, nDCG@10, their ratio to float32, cosine to float32 and top-1 agreement with float32.

    python benchmarks/bench_embed.py [--repetitions 5] [--pairs 500] [--threads 2] [--clock wall|cpu]
                                     [--out out/bench_embed.json]
                                     [--engines 'leanlm float32,ctranslate2 float32']
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from leanlm.bench.machine import cpu_model
from leanlm.embed import Embedder
from leanlm.embed.precision import cpu_has_fast_bf16
from leanlm.evaluate.retrieval import agreement, rankings, retrieval_metrics, retrieval_pairs, top1_agreement
from leanlm.formats.assets import fetch_known_model
from leanlm.formats.corpus import evaluation_text

MODEL = "all-minilm-l6-v2"
WORKLOADS = {  # name -> (texts per timing at batch 1, texts per timing at batch 32)
    "short": (32, 128),
    "256-token": (8, 64),
}


# Retrieval quality for these (the first is the baseline); the other peers' precisions match float32's closely.
QUALITY_ENGINES = (
    "leanlm float32",
    "leanlm bf16",
    "leanlm int8",
    "leanlm int4",
    "sentence-transformers float32",
    "ctranslate2 int8_float32",
)


def workload_texts(embedder: Embedder) -> dict[str, list[str]]:
    """Short texts: wiki sentences cut to 10 words (about 12 tokens with [CLS]/[SEP]). Long: text runs of at least
    256 tokens (cut at 256 by every engine)."""
    text = evaluation_text(quiet=True)
    lines = [line.strip() for line in text.splitlines() if len(line.split()) >= 12 and not line.startswith("<")]
    short = [" ".join(line.split()[:10]) for line in lines[:256]]
    words = " ".join(lines).split()
    long = [" ".join(words[i : i + 260]) for i in range(0, 260 * 128, 260)]
    assert all(cut for cut in embedder.tokenize(long[:8])[1]), "long texts should reach 256 tokens"
    return {"short": short, "256-token": long}


class LeanLM:
    def __init__(self, precision: str, threads: int):
        self.name = f"leanlm {precision}"
        self.embedder = Embedder(MODEL, precision=precision, threads=threads)

    def embed(self, texts: list[str], batch_size: int) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.embedder.embed(texts, batch_size)


class SentenceTransformers:
    def __init__(self, dtype: torch.dtype, threads: int):
        from sentence_transformers import SentenceTransformer

        self.name = f"sentence-transformers {'bf16' if dtype == torch.bfloat16 else 'float32'}"
        self.model = SentenceTransformer(str(fetch_known_model(MODEL)), device="cpu").to(dtype)
        self.threads = threads

    def embed(self, texts: list[str], batch_size: int) -> np.ndarray:
        return self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True).astype(np.float32)


class CTranslate2:
    def __init__(self, compute_type: str, threads: int, folder: Path, embedder: Embedder):
        import ctranslate2

        self.name = f"ctranslate2 {compute_type}"
        self.encoder = ctranslate2.Encoder(str(folder), device="cpu", compute_type=compute_type, intra_threads=threads)
        self.embedder = embedder  # its tokenizer (the same ids as leanlm's) and max_seq_length

    def embed(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            ids = self.embedder.tokenize(texts[start : start + batch_size])[0]
            hidden = np.array(self.encoder.forward_batch(ids).last_hidden_state, dtype=np.float32)  # (B, T, H)
            lengths = np.array([len(row) for row in ids])
            mask = (np.arange(hidden.shape[1])[None, :] < lengths[:, None]).astype(np.float32)[..., None]
            pooled = (hidden * mask).sum(axis=1) / lengths[:, None]
            out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
        return np.concatenate(out)


def convert_for_ctranslate2(target: Path) -> Path:
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(fetch_known_model(MODEL))).convert(str(target), force=True)
    return target


def build_engines(threads: int, scratch: Path, reference: Embedder) -> tuple[list, list[str]]:
    engines, notes = [], []
    for precision in ("float32", "bf16", "int8", "int4"):
        engines.append(LeanLM(precision, threads))
    for dtype in (torch.float32, torch.bfloat16):
        engines.append(SentenceTransformers(dtype, threads))
    try:
        folder = convert_for_ctranslate2(scratch / "ct2")
    except Exception as exc:  # the converter needs transformers; report instead of failing the run
        notes.append(f"CTranslate2 conversion failed ({type(exc).__name__}: {exc}); its rows are missing.")
        return engines, notes
    import ctranslate2

    supported = ctranslate2.get_supported_compute_types("cpu")
    for compute_type in ("float32", "bfloat16", "int8_float32"):
        if compute_type in supported:
            engines.append(CTranslate2(compute_type, threads, folder, reference))
        else:
            notes.append(f"CTranslate2 does not offer {compute_type} on this CPU (it offers {sorted(supported)}).")
    return engines, notes


def time_speed(engines, texts: dict[str, list[str]], repetitions: int, clock=time.perf_counter) -> dict:
    samples: dict[tuple[str, str, int], list[float]] = {}
    for engine in engines:  # warm-up: first-call costs (oneDNN primitive caches, allocations)
        for workload in WORKLOADS:
            engine.embed(texts[workload][:32], 32)
    for repetition in range(repetitions):
        for workload, (count_b1, count_b32) in WORKLOADS.items():
            for batch, count in ((1, count_b1), (32, count_b32)):
                chunk = texts[workload][:count]
                for engine in engines:  # interleaved: A B C ... within every repetition
                    start = clock()
                    engine.embed(chunk, batch)
                    samples.setdefault((engine.name, workload, batch), []).append(count / (clock() - start))
        print(f"  repetition {repetition + 1}/{repetitions} done", flush=True)
    return {key: statistics.median(values) for key, values in samples.items()} | {
        ("spread",) + key: (min(values), max(values)) for key, values in samples.items()
    }


def measure_quality(engines, pairs: int) -> dict[str, dict]:
    queries, documents = retrieval_pairs(evaluation_text(quiet=True), max_pairs=pairs)
    results, baseline = {}, None
    for engine in engines:
        q, d = engine.embed(queries, 32), engine.embed(documents, 32)
        ranked = rankings(q, d)
        if baseline is None:
            baseline = (q, d, ranked)
        row = retrieval_metrics(ranked) | agreement(np.concatenate([q, d]), np.concatenate(baseline[:2]))
        row["top1_agreement"] = top1_agreement(ranked, baseline[2])
        results[engine.name] = row
    base = results[engines[0].name]
    for row in results.values():
        row["recall@1_ratio"] = row["recall@1"] / base["recall@1"]
        row["ndcg@10_ratio"] = row["ndcg@10"] / base["ndcg@10"]
    return results | {"_pairs": len(queries)}


def report(speed: dict, quality: dict, engines, args, notes: list[str]) -> str:
    lines = [
        f"all-MiniLM-L6-v2, {args.threads} threads on {cpu_model()} (AVX-512 BF16/AMX: {cpu_has_fast_bf16()}), "
        f"torch {torch.__version__}; median of {args.repetitions} interleaved runs, sentences/s [min-max]"
        + (" of CPU time" if args.clock == "cpu" else ""),
        "",
        "| engine | short, batch 1 | short, batch 32 | 256-token, batch 1 | 256-token, batch 32 |",
        "|---|---|---|---|---|",
    ]
    keys = [(w, b) for w in WORKLOADS for b in (1, 32)]
    for engine in engines:
        cells = []
        for workload, batch in keys:
            low, high = speed[("spread", engine.name, workload, batch)]
            cells.append(f"{speed[(engine.name, workload, batch)]:.1f} [{low:.1f}-{high:.1f}]")
        lines.append(f"| {engine.name} | " + " | ".join(cells) + " |")
    lines += ["", "Same-run ratios (leanlm / peer, medians):", ""]
    lines += ["| leanlm vs peer | " + " | ".join(f"{w}, batch {b}" for w, b in keys) + " |", "|---|---|---|---|---|"]
    pairs = [
        ("leanlm float32", "sentence-transformers float32"),
        ("leanlm bf16", "sentence-transformers float32"),
        ("leanlm int8", "sentence-transformers float32"),
        ("leanlm bf16", "sentence-transformers bf16"),
        ("leanlm float32", "ctranslate2 float32"),
        ("leanlm bf16", "ctranslate2 bfloat16"),
        ("leanlm int8", "ctranslate2 int8_float32"),
    ]
    names = {engine.name for engine in engines}
    for ours, peer in pairs:
        if ours in names and peer in names:
            ratios = [speed[(ours, w, b)] / speed[(peer, w, b)] for w, b in keys]
            lines.append(f"| {ours} / {peer} | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    lines += [
        "",
        f"Retrieval on wiki.utf8: {quality['_pairs']} queries (first sentences) over as many documents (the rest of "
        "each paragraph), max_seq_length 256; ratios and cosines against the first row.",
        "",
        "| engine | recall@1 | nDCG@10 | recall@1 / float32 | nDCG@10 / float32 | top-1 agreement | cosine mean | "
        "cosine min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in quality.items():
        if name.startswith("_"):
            continue
        lines.append(
            f"| {name} | {row['recall@1']:.4f} | {row['ndcg@10']:.4f} | {row['recall@1_ratio']:.4f} | "
            f"{row['ndcg@10_ratio']:.4f} | {row['top1_agreement']:.4f} | {row['cosine_mean']:.5f} | "
            f"{row['cosine_min']:.5f} |"
        )
    return "\n".join(lines + [""] + [f"Note: {note}" for note in notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=500, help="retrieval queries (0: skip the quality table)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="out/bench_embed.json")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: sentences per second of the process's CPU time, which other jobs on the machine barely change "
        "(with --threads 1: each engine's work per thread)",
    )
    parser.add_argument(
        "--engines",
        default="",
        help="only these engines, comma-separated (e.g. 'leanlm float32,ctranslate2 float32'; default: all)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference = Embedder(MODEL)
    texts = workload_texts(reference)
    with tempfile.TemporaryDirectory() as scratch:
        engines, notes = build_engines(args.threads, Path(scratch), reference)
        if args.engines:
            wanted = {name.strip() for name in args.engines.split(",")}
            engines = [engine for engine in engines if engine.name in wanted]
        print(f"engines: {', '.join(e.name for e in engines)}", flush=True)
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        speed = time_speed(engines, texts, args.repetitions, clock)
        quality_engines = [e for e in engines if e.name in QUALITY_ENGINES]
        quality = measure_quality(quality_engines, args.pairs) if args.pairs else {"_pairs": 0}
    table = report(speed, quality, engines, args, notes)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    serial = {"|".join(map(str, key)): value for key, value in speed.items()}
    out.write_text(json.dumps({"speed": serial, "quality": quality, "table": table}, indent=1))
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
