"""`leanlm search`: semantic search over a text file: embed its paragraphs (or lines) once, then print the
top-k documents for each query with their cosine scores."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from leanlm.cli.embed_options import add_embedder_options, load_embedder
from leanlm.errors import InvalidRequestError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help="semantic search over a text file (index built once, then reused)",
        description="Split --corpus into documents (paragraphs or lines), embed them (cached under "
        "$LEANLM_HOME/indexes, reused while the file, model and precision are the same) and print the --top-k "
        "documents closest to each --query.",
    )
    p.add_argument("--corpus", required=True, help="a UTF-8 text file to search")
    p.add_argument("--query", "-q", action="append", required=True, help="what to look for (repeat for several)")
    p.add_argument("--top-k", "-k", type=int, default=5, help="documents to print per query (default 5)")
    p.add_argument("--unit", default="paragraph", choices=["paragraph", "line"], help="what a document is")
    p.add_argument("--rebuild", action="store_true", help="embed the corpus again even if an index is cached")
    p.add_argument("--json", action="store_true", help="print one JSON object per query")
    add_embedder_options(p)


def run(args: argparse.Namespace) -> int:
    from leanlm.embed import SemanticIndex

    corpus = Path(args.corpus)
    if not corpus.is_file():
        raise InvalidRequestError(f"Corpus not found: {corpus}. Pass a UTF-8 text file.")
    index, reused = SemanticIndex.from_corpus(load_embedder(args), corpus, args.unit, rebuild=args.rebuild)
    print(
        f"leanlm: {'reused the index of' if reused else 'indexed'} {len(index.documents)} {args.unit}s of {corpus}",
        file=sys.stderr,
    )
    for query in args.query:
        hits = index.search(query, args.top_k)
        if args.json:
            print(json.dumps({"query": query, "hits": [vars(h) for h in hits]}, ensure_ascii=False))
            continue
        print(f"query: {query}")
        for rank, hit in enumerate(hits, start=1):
            text = " ".join(hit.text.split())
            print(f"{rank:3d}. {hit.score:.4f}  [{hit.index}] {text[:200]}{'...' if len(text) > 200 else ''}")
    return 0
