"""`leanlm plan`'s predictions against measurements: for each format, predicted and measured decode and prefill
tok/s (the bench engine, a fresh process per run, formats interleaved A B C, A B C, median) and predicted memory
against measured peak RSS, on the default model (or --model), 2 threads.

Candidates are the folders `leanlm optimize` built (pass its --work folder to reuse them) or are built here.
`--from-search WORK/search.json` prints the same table from an optimize run's own predictions and measurements
instead of running anything.

    python benchmarks/bench_plan.py [--model M] [--work runs/x.work] [--formats source,int8,rtn4-g32]
        [--repetitions 3] [--json out/bench_plan.json]
    python benchmarks/bench_plan.py --from-search runs/x.work/search.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from leanlm.bench.machine import describe, memory_bandwidth_gbs
from leanlm.bench.report import print_sample
from leanlm.bench.runner import BenchSpec, EngineSpec, run_sample
from leanlm.bench.worker import load_average
from leanlm.formats.loader import resolve_model_path
from leanlm.optimize.formats import Candidate, parse_formats
from leanlm.optimize.measure import EngineMeasurer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--work", default="out/bench_plan.work", help="folder with (or for) the built candidates")
    parser.add_argument("--formats", default="source,bf16,int8,rtn4-g32,rtn4-g128")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernels", default="auto", help="comma-separated kernel modes: auto, exact")
    parser.add_argument("--json", default=None)
    parser.add_argument("--from-search", default=None, help="an optimize run's search.json: print its table only")
    parser.add_argument(
        "--repredict",
        action="store_true",
        help="with --from-search: predict every measured candidate again with this code (the measurements stay)",
    )
    args = parser.parse_args()
    if args.from_search:
        print_from_search(Path(args.from_search), args.repredict)
        return

    model = resolve_model_path(args.model).resolve()
    measurer = EngineMeasurer(
        str(model), Path(args.work), text="", prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens
    )
    modes = [k.strip() for k in args.kernels.split(",")]
    candidates = [Candidate(n, threads=args.threads, kernels=k) for n in parse_formats(args.formats) for k in modes]
    load_before = load_average()
    bandwidth = memory_bandwidth_gbs(args.threads, size_mib=256, repeats=5)
    predicted = {}
    for c in candidates:
        print(f"predicting {label(c)}...", file=sys.stderr, flush=True)
        predicted[label(c)] = measurer.prediction(c)
    engines = {}
    for c in candidates:
        path = measurer.artifact(c)
        options = (("kv_cache", c.kv_cache), ("dequantize", c.spec.method == "dense"), ("kernels", c.kernels))
        engines[label(c)] = EngineSpec("leanlm", c.spec.dtype, str(path), options, label=label(c))
    spec = BenchSpec(str(model), list(engines.values()), args.threads, "cpu", args.prompt_tokens, args.gen_tokens)
    samples = {name: [] for name in engines}
    for repetition in range(args.repetitions):  # interleaved, so load drift hits every format
        for name, engine in engines.items():
            sample = run_sample(spec, engine)
            samples[name].append(sample)
            print_sample(repetition, engine, sample)
    rows = []
    for name, runs in samples.items():
        p = predicted[name]
        decode = statistics.median(s["runs"][0]["decode_tok_s"] for s in runs)
        prefill = statistics.median(s["runs"][0]["prefill_tok_s"] for s in runs)
        rss = statistics.median(s["peak_rss_mib"] for s in runs)
        rows.append(
            {
                "format": name,
                "precision": runs[0]["precision"],
                "predicted_decode": p.decode_tok_s,
                "measured_decode": decode,
                "predicted_prefill": p.prefill_tok_s,
                "measured_prefill": prefill,
                "predicted_weights_mib": p.weights_bytes / 2**20,
                "predicted_peak_mib": p.peak_bytes / 2**20,
                "measured_peak_rss_mib": rss,
            }
        )
    machine = {**describe(args.threads), "bandwidth_gbs": bandwidth, "load_average": [load_before, load_average()]}
    print(
        f"\n{model.name}; {machine['cpu']}, {args.threads} threads, {bandwidth:.1f} GB/s probed, load average "
        f"{machine['load_average']}; batch 1, {args.prompt_tokens}-token prompt, {args.gen_tokens} new tokens, "
        f"median of {args.repetitions} fresh-process runs, formats interleaved\n"
    )
    print(
        "| format | runs as | decode predicted | decode measured | error | prefill predicted | prefill measured "
        "| error | weights predicted | peak predicted | peak RSS measured |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['format']} | {r['precision']} | {r['predicted_decode']:.1f} | {r['measured_decode']:.1f} | "
            f"{_error(r['predicted_decode'], r['measured_decode'])} | {r['predicted_prefill']:.0f} | "
            f"{r['measured_prefill']:.0f} | {_error(r['predicted_prefill'], r['measured_prefill'])} | "
            f"{r['predicted_weights_mib']:.0f} MiB | {r['predicted_peak_mib']:.0f} MiB | "
            f"{r['measured_peak_rss_mib']:.0f} MiB |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows, "samples": samples}, indent=2))


def label(candidate: Candidate) -> str:
    return candidate.format if candidate.kernels == "auto" else f"{candidate.format} ({candidate.kernels})"


def print_from_search(path: Path, repredict: bool = False) -> None:
    search = json.loads(path.read_text())
    if repredict:  # the same measurements against this code's predictions (probed now, in this process)
        measurer = EngineMeasurer(search["model"], path.parent, text="")
        for e in search["entries"]:
            if e.get("decode_tok_s") is not None:
                e["predicted"] = measurer.predict(Candidate(**e["candidate"]))
        print(f"predictions made now (load average {load_average()}), measurements from the search", file=sys.stderr)
    m = search["machine"]
    print(
        f"{Path(search['model']).name}; {m['cpu']}, {m['threads']} threads, load average {m['load_average']} "
        "(at the end); each candidate's measurement: the bench engine in fresh processes, median\n"
    )
    print(
        "| candidate | decode predicted | decode measured | error | prefill predicted | prefill measured | error "
        "| peak predicted | peak RSS measured |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for e in search["entries"]:
        if e.get("decode_tok_s") is None:
            continue
        p = e["predicted"]
        print(
            f"| {e['key']} | {p['decode_tok_s']:.1f} | {e['decode_tok_s']:.1f} | "
            f"{_error(p['decode_tok_s'], e['decode_tok_s'])} | {p['prefill_tok_s']:.0f} | {e['prefill_tok_s']:.0f} | "
            f"{_error(p['prefill_tok_s'], e['prefill_tok_s'])} | {p['peak_rss_mib']:.0f} MiB | "
            f"{e['peak_rss_mib']:.0f} MiB |"
        )


def _error(predicted: float, measured: float) -> str:
    return f"{100 * (predicted - measured) / measured:+.0f}%"


if __name__ == "__main__":
    main()
