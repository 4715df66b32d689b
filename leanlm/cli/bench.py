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
    bench.add_argument(
        "--llama-cpp-types",
        default="source",
        help="GGUF precisions for llama.cpp, e.g. F16,Q8_0,Q4_1: leanlm re-encodes the model's weights to each "
        "(cached under $LEANLM_HOME/exports); 'source' runs the file as given (default: %(default)s)",
    )
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


def gguf_for_llama_cpp(model: str, type_name: str):
    """The model as a GGUF file of the given precision (exported once, then reused from the cache)."""
    from pathlib import Path

    from leanlm.formats.assets import leanlm_home
    from leanlm.formats.gguf_export import export_gguf

    source = Path(model)
    if type_name == "source":
        if source.suffix != ".gguf":
            raise InvalidRequestError("llama.cpp runs GGUF files: pass --llama-cpp-types F16 (or Q8_0...) to export.")
        return source
    target = leanlm_home() / "exports" / f"{source.stem}.{type_name}.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"leanlm: writing {target.name} for llama.cpp...", file=sys.stderr)
        export_gguf(source, target, type_name)
    return target


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
        if peer == "transformers":
            engines.append(EngineSpec(peer, args.peer_dtype))
        else:
            engines += [
                EngineSpec(peer, "auto", str(gguf_for_llama_cpp(model, t))) for t in parse_list(args.llama_cpp_types)
            ]
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
        for note in sample.get("notes", []):
            print(f"  note: {engine.engine} {sample['precision']}: {note}", file=sys.stderr)

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
