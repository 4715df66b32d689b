"""`leanlm plan`: for each format this machine can run, the memory the engine will allocate and the speed to
expect, predicted from the model's shape and probes of this machine (nothing is loaded but the config)."""

from __future__ import annotations

import argparse
import json

from leanlm.optimize.formats import FORMATS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="predict memory (weights, KV cache, activations, peak) and speed of each format on this machine",
        description="Memory figures are what the engine allocates (the KV cache with the --kv-cache-memory shown);\n"
        "speeds come from the probed memory bandwidth and each format's kernels timed on the model's shapes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", "-m", default=None, help="the model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence held in the KV cache (default 4096)")
    p.add_argument("--batch", type=int, default=1, help="sequences at once (default 1)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prefill length for the speed (default 128)")
    p.add_argument("--kv-cache", default="auto", choices=["auto", "int8"], help="KV cache type (default auto)")
    p.add_argument("--threads", "-t", type=int, default=2, help="threads (default 2)")
    p.add_argument(
        "--kernels", default="auto", choices=["auto", "exact"], help="kernel mode (exact: float32 activations)"
    )
    p.add_argument(
        "--formats", help=f"comma-separated (default: all of {', '.join(FORMATS)}; source only for a GGUF file)"
    )
    p.add_argument("--json", metavar="PATH", help="also write the predictions as JSON ('-' = stdout only)")


def run(args: argparse.Namespace) -> int:
    from leanlm.bench.machine import cpu_model, memory_bandwidth_gbs
    from leanlm.errors import InvalidRequestError
    from leanlm.models.checkpoint import load_checkpoint
    from leanlm.optimize.formats import parse_formats
    from leanlm.optimize.predict import Workload, predict, source_layers

    if args.context < 1 or args.batch < 1 or args.prompt_tokens < 1:
        raise InvalidRequestError("--context, --batch and --prompt-tokens must be >= 1.")
    checkpoint = load_checkpoint(args.model, weights=False)
    stored = source_layers(checkpoint.path)  # a GGUF file leanlm runs as stored: its own layers are probed
    names = parse_formats(args.formats) if args.formats else [f for f in FORMATS if f != "source" or stored]
    if "source" in names and not stored:
        raise InvalidRequestError(
            "plan predicts the source only for a GGUF file in block types leanlm runs natively; "
            "for this checkpoint predict bf16 (what it runs as) or measure it with `leanlm bench`."
        )
    config = checkpoint.config
    if args.context > config.context_length:
        raise InvalidRequestError(f"--context {args.context} exceeds the model's context ({config.context_length}).")
    workload = Workload(args.context, args.batch, args.prompt_tokens, args.kv_cache, args.threads)
    bandwidth = memory_bandwidth_gbs(args.threads, size_mib=256, repeats=5)
    predictions = [
        predict(config, FORMATS[n], workload, bandwidth, kernels=args.kernels, stored=stored if n == "source" else None)
        for n in names
    ]
    if args.json != "-":
        print(f"{checkpoint.path.name}: {config.num_parameters() / 1e6:.0f}M parameters, {config.num_layers} layers")
        print(
            f"{cpu_model()}, {args.threads} threads, {bandwidth:.1f} GB/s probed; context {args.context} x batch "
            f"{args.batch}, KV cache {args.kv_cache}, prefill of {args.prompt_tokens} tokens"
        )
        from leanlm.optimize.memory import available_memory

        available = available_memory()
        print(format_table(predictions, available, args.batch, config.context_length))
        kv = predictions[0]
        print(
            f"KV cache: run with --kv-cache-memory {kv.kv_cache_memory} (the engine adds one null block). "
            f"'longest context': tokens per sequence that fit in the {available / 2**30:.1f} GiB available now "
            f"at batch {args.batch} (capped at the model's {config.context_length})."
        )
    if args.json:
        payload = json.dumps([p.to_dict() for p in predictions], indent=2)
        if args.json == "-":
            print(payload)
        else:
            with open(args.json, "w") as handle:
                handle.write(payload + "\n")
    return 0


def format_table(predictions, available: int, batch: int, context_limit: int) -> str:
    header = (
        f"{'format':<12} {'bits/w':>6} {'weights':>9} {'KV cache':>9} {'activ.':>8} {'peak':>9} "
        f"{'decode tok/s':>12} {'prefill tok/s':>13} {'longest context':>15}"
    )
    lines = [header, "-" * len(header)]
    for p in predictions:
        lines.append(
            f"{p.format:<12} {p.bits_per_weight:>6.2f} {_mib(p.weights_bytes):>9} {_mib(p.kv_cache_bytes):>9} "
            f"{_mib(p.activation_bytes):>8} {_mib(p.peak_bytes):>9} {p.decode_tok_s:>12.1f} "
            f"{p.prefill_tok_s:>13.1f} {min(context_limit, p.longest_context(available, batch)):>15}"
        )
    return "\n".join(lines)


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f}M"
