"""`leanlm sensitivity`: the KL report per layer, how much each layer's quantization alone moves the final logits."""

from __future__ import annotations

import argparse
import json

from leanlm.cli.options import add_model_options


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sensitivity",
        help="KL of the final logits with one layer (or tensor) at a time quantized: where the bits matter",
        description="Quantize one decoder layer (or one tensor) at a time by round-to-nearest at each width, and "
        "report the mean KL of the final logits against the original on c4 text (the calibration corpus, never "
        "the evaluation text). `leanlm quantize --mixed` uses the same probe to allocate bits.",
    )
    p.add_argument("--bits", default="3,4,8", help="comma-separated widths to probe (default 3,4,8)")
    p.add_argument("--group-size", type=int, default=32, help="weights per scale/offset (default 32; -1 per channel)")
    p.add_argument("--per", choices=["layer", "tensor"], default="layer", help="probe groups (default: layer)")
    p.add_argument("--samples", type=int, default=4, help="c4 sequences (default 4)")
    p.add_argument("--length", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--no-lm-head", action="store_true", help="leave the LM head out")
    p.add_argument("--json", help="also write the report as JSON to this file")
    add_model_options(p)


def run(args: argparse.Namespace) -> int:
    from leanlm.compress.config import QuantConfig
    from leanlm.compress.mixed import sensitivity_report, sensitivity_table
    from leanlm.engine.llm import LLM
    from leanlm.errors import InvalidRequestError

    try:
        widths = tuple(sorted({int(b) for b in args.bits.split(",")}))
    except ValueError:
        raise InvalidRequestError(f"--bits takes integers such as 3,4,8, got '{args.bits}'.") from None
    configs = [QuantConfig("int4", bits=b, group_size=args.group_size) for b in widths]  # validates each width
    config = QuantConfig(
        "int4",
        bits=min(widths),
        group_size=configs[0].group_size,
        include_lm_head=not args.no_lm_head,
        mixed_granularity=args.per,
        sensitivity_samples=args.samples,
        sensitivity_length=args.length,
    )
    llm = LLM(args.model, dtype="float32", device="cpu", threads=args.threads, dequantize=True)
    report = sensitivity_report(llm, config, widths, progress=True)
    report["source"] = str(llm.model_path)
    print(sensitivity_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0
