"""`leanlm bench`: load time, TTFT, prefill and decode speed, memory and % of roofline, side by side with peers."""

from __future__ import annotations

import argparse
import os
import sys

from leanlm.cli.options import add_model_options
from leanlm.errors import InvalidRequestError

PEERS = ("transformers", "llama.cpp")


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="measure speed and memory (TTFT, prefill/decode tok/s, peak RSS, %% of roofline), vs peers",
        description="Each engine runs in a fresh process, interleaved A/B/A/B over --repetitions, with a fixed "
        "prompt length (tokens) and a fixed number of generated tokens (EOS ignored). Reports medians and "
        "min-max, the memory-bandwidth roofline bound for decode, and ratios against the first peer.",
    )
    bench.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,4,16 (default 1)")
    bench.add_argument("--vs", default="", help=f"comma-separated peers: {', '.join(PEERS)}")
    bench.add_argument("--peer-dtype", default="float32", help="precision for the transformers peer")
    bench.add_argument("--llama-cpp-model", help="GGUF file for llama.cpp (default: --model when it is a GGUF)")
    bench.add_argument("--prompt-tokens", type=int, default=120, help="prompt length in tokens (default 120)")
    bench.add_argument("--gen-tokens", type=int, default=128, help="tokens generated per run (default 128)")
    bench.add_argument("--repetitions", "-r", type=int, default=3, help="runs per engine (default 3)")
    bench.add_argument("--json", help="write every raw sample, the medians and the machine description here")
    bench.add_argument("--plot", help="write a PNG of decode tok/s per engine against the roofline bound")
    add_model_options(bench)


def parse_list(text: str, convert=str) -> list:
    try:
        return [convert(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise InvalidRequestError(f"Cannot parse '{text}' as a comma-separated list ({exc}).") from exc


def run(args: argparse.Namespace) -> int:
    from leanlm.bench.report import format_table, save_plot
    from leanlm.bench.runner import BenchSpec, EngineSpec, add_ratios, run_benchmark, save_json
    from leanlm.formats.loader import resolve_model_path

    peers = parse_list(args.vs)
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise InvalidRequestError(f"Unknown peer '{unknown[0]}'. Choose among: {', '.join(PEERS)}.")
    model = str(resolve_model_path(args.model))
    engines = [EngineSpec("leanlm", args.dtype)]
    for peer in peers:
        peer_model = args.llama_cpp_model if peer == "llama.cpp" else None
        engines.append(EngineSpec(peer, args.peer_dtype if peer == "transformers" else "auto", peer_model))
    spec = BenchSpec(
        model=model,
        engines=engines,
        threads=args.threads or os.cpu_count() or 1,
        device="cuda" if args.device == "cuda" else "cpu",
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        batch_sizes=parse_list(args.batch, int),
        repetitions=args.repetitions,
    )

    def progress(repetition, engine, sample):
        first = sample["runs"][0]
        print(
            f"  run {repetition + 1}/{spec.repetitions} {engine.engine} {sample['precision']}: "
            f"load {sample['load_s']:.1f} s, decode {first['decode_tok_s']:.1f} tok/s",
            file=sys.stderr,
        )

    report = run_benchmark(spec, progress)
    if peers:
        reference = next(r for r in report["rows"] if r["engine"] == peers[0])
        add_ratios(report, (reference["engine"], reference["precision"]))
    print(format_table(report))
    if args.json:
        save_json(report, args.json)
    if args.plot:
        save_plot(report, args.plot)
    return 0
