"""`leanlm optimize`: the best configuration of a model for this machine under a quality budget, measured."""

from __future__ import annotations

import argparse
import shlex
import sys

from leanlm.optimize.formats import FORMATS, KERNEL_MODES, KV_CACHE_TYPES
from leanlm.optimize.search import OBJECTIVES

EXAMPLES = """examples:
  leanlm optimize --max-kl 0.05 -o smollm2-fast                 # the default model, fastest decode within KL 0.05
  leanlm optimize --model M --max-ppl-increase 2% --objective disk -o M-small
  leanlm optimize --model M --min-top1 0.9 --formats int8,gptq4-g32,rtn4-g32 --kv-cache auto,int8 -o out
  leanlm eval --card smollm2-fast                                # does it still meet its card?
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "optimize",
        help="search formats, methods and runtime settings for the best configuration under a quality budget",
        description="Predict every candidate (as `leanlm plan` does), then measure the promising ones here:\n"
        "quality against the original on wiki text (never the calibration text), speed and memory with the bench\n"
        "engine in fresh processes. Writes the chosen artifact with its quality card (README.md, card.json), the\n"
        "Pareto front (front.png) and report.html. Measurements are cached in the work folder: rerun to resume.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    budget = p.add_argument_group("quality budget (at least one)")
    budget.add_argument("--max-kl", type=float, help="mean KL(original || candidate) in nats per token, e.g. 0.05")
    budget.add_argument("--max-ppl-increase", help="perplexity at most this much above the original's, e.g. 2%%")
    budget.add_argument("--min-top1", type=float, help="top-1 agreement with the original at least this, e.g. 0.9")
    p.add_argument("--objective", choices=list(OBJECTIVES), default="decode", help="what to optimize (default: decode)")
    p.add_argument("--output", "-o", required=True, help="folder for the chosen artifact (written atomically)")
    p.add_argument("--work", help="folder for candidates and cached measurements (default: OUTPUT.work)")
    p.add_argument("--formats", help=f"comma-separated formats to consider (default: all of {', '.join(FORMATS)})")
    p.add_argument(
        "--kv-cache", default="auto", help=f"comma-separated KV cache types among {', '.join(KV_CACHE_TYPES)}"
    )
    p.add_argument(
        "--kernels",
        dest="kernel_list",
        default="auto",
        help=f"comma-separated kernel modes among {', '.join(KERNEL_MODES)} (exact: float32 activations)",
    )
    p.add_argument(
        "--threads", "-t", dest="thread_list", default="2", help="comma-separated thread counts to try (default: 2)"
    )
    p.add_argument("--eval-tokens", type=int, default=1024, help="wiki tokens scored per candidate (default 1024)")
    p.add_argument("--speed-runs", type=int, default=2, help="fresh-process speed runs per candidate (median)")
    p.add_argument("--max-measured", type=int, help="measure at most this many new candidates in this run")
    p.add_argument(
        "--quality-only",
        action="store_true",
        help="measure quality only (a busy machine does not change it); rerun without it to time the candidates",
    )
    p.add_argument("--model", "-m", default=None, help="the model to optimize (default: SmolLM2-135M-Instruct)")


def run(args: argparse.Namespace) -> int:
    from leanlm.errors import InvalidRequestError
    from leanlm.optimize.formats import parse_formats
    from leanlm.optimize.run import OptimizeRequest, optimize
    from leanlm.optimize.search import Budget, parse_percent

    budget = Budget(
        max_kl=args.max_kl,
        max_ppl_increase=None if args.max_ppl_increase is None else parse_percent(args.max_ppl_increase),
        min_top1=args.min_top1,
    )
    try:
        threads = [int(t) for t in args.thread_list.split(",")]
    except ValueError:
        raise InvalidRequestError(f"--threads takes integers such as 2 or 1,2, got '{args.thread_list}'.") from None
    kernels = [k.strip() for k in args.kernel_list.split(",")]
    if unknown := [k for k in kernels if k not in KERNEL_MODES]:
        raise InvalidRequestError(f"Unknown kernel mode '{unknown[0]}'. Choose among: {', '.join(KERNEL_MODES)}.")
    if args.eval_tokens < 64:
        raise InvalidRequestError(f"--eval-tokens must be at least 64, got {args.eval_tokens}.")
    request = OptimizeRequest(
        model=args.model,
        budget=budget,
        objective=args.objective,
        formats=parse_formats(args.formats),
        kv_caches=[k.strip() for k in args.kv_cache.split(",")],
        threads=threads,
        kernels=kernels,
        output=args.output,
        work=args.work,
        eval_tokens=args.eval_tokens,
        speed_repetitions=args.speed_runs,
        max_measured=args.max_measured,
        quality_only=args.quality_only,
        command="leanlm optimize " + " ".join(shlex.quote(a) for a in sys.argv[2:]),
    )
    summary = optimize(request)
    if request.quality_only:
        measured = [e for e in summary["entries"] if e.get("kl_mean") is not None]
        for entry in sorted(measured, key=lambda e: e["kl_mean"]):
            size, top1 = entry["disk_bytes"] / 2**20, entry["top1_agreement"]
            print(f"quality: {entry['key']:<32} KL {entry['kl_mean']:.4f}  top-1 {top1:.3f}  {size:.1f} MiB")
        print(f"Quality measured in {summary['work']}; rerun without --quality-only on a quiet machine to time them.")
        return 0
    for entry in summary["front"]:
        print(f"front: {entry['key']:<32} KL {entry['kl_mean']:.4f}  decode {entry.get('decode_tok_s', 0):.1f} tok/s")
    if summary["best"] is None:
        print(f"No candidate meets {budget.describe()}; see {summary['report']}.")
        return 1
    held = summary["card"]["held_out_quality"]
    print(
        f"chosen: {summary['best']['key']} -> {summary['output']} "
        "(card: README.md, card.json; report.html, front.png)\n"
        f"held-out text: KL {held['kl_mean']:.4f}, top-1 {100 * held['top1_agreement']:.1f}%, "
        f"{'meets' if held['meets_budget'] else 'DOES NOT meet'} the budget"
    )
    return 0
