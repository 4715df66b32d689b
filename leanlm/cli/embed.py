"""`leanlm embed`: texts in, one JSON line per text out ({"index", "text", "embedding"})."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from leanlm.cli.embed_options import add_embedder_options, load_embedder
from leanlm.errors import InvalidRequestError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embed texts with an encoder model and print JSONL",
        description="Embed each text with a sentence-transformers model (its own pooling and normalization) and "
        "print one JSON object per line: index, text and embedding.",
    )
    p.add_argument("texts", nargs="*", help="texts to embed (or --input-file, or one per line on stdin)")
    p.add_argument("--input-file", "-i", help="a file with one text per line (blank lines skipped)")
    p.add_argument("--output", "-o", help="write the JSONL here instead of stdout")
    p.add_argument("--no-text", action="store_true", help="leave the text out of each line")
    add_embedder_options(p)


def read_texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.texts)
    if args.input_file:
        path = Path(args.input_file)
        if not path.is_file():
            raise InvalidRequestError(f"Input file not found: {path}. Pass a text file with one text per line.")
        texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif not texts and not sys.stdin.isatty():
        texts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not texts:
        raise InvalidRequestError("No texts given. Pass them as arguments, with --input-file, or on stdin.")
    return texts


def run(args: argparse.Namespace) -> int:
    texts = read_texts(args)
    vectors = load_embedder(args).embed(texts)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for index, (text, vector) in enumerate(zip(texts, vectors, strict=True)):
            record = {"index": index} | ({} if args.no_text else {"text": text})
            out.write(json.dumps(record | {"embedding": [float(x) for x in vector]}, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
