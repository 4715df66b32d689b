"""`leanlm generate`: completions (or one-message chats) for one prompt or a file of prompts."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from leanlm.cli.options import add_model_options, add_sampling_options, load_llm, sampling_params_from
from leanlm.errors import InvalidRequestError


def add_parser(subparsers) -> None:
    gen = subparsers.add_parser(
        "generate",
        help="continue a text (or answer it with --chat) and print the result",
        description="Continue the given text (a completion). With --chat, the text is sent as one "
        "user message through the model's chat template. One prompt streams; several run as a batch.",
    )
    gen.add_argument("prompt", nargs="?", help="the text to continue (or read from stdin)")
    gen.add_argument("--prompt-file", help="a file with one prompt per line (blank lines skipped); runs as a batch")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of streaming text")
    gen.add_argument(
        "--attention",
        default="sdpa",
        choices=["sdpa", "reference"],
        help="attention implementation (reference = the plain formula, for checking)",
    )
    gen.add_argument("--quiet", "-q", action="store_true", help="do not print timing statistics to stderr")
    add_sampling_options(gen)
    add_model_options(gen)


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise InvalidRequestError(f"Prompt file not found: {path}. Pass a text file with one prompt per line.")
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise InvalidRequestError(f"{path} holds no prompts. Write one prompt per line.")
        return prompts + ([args.prompt] if args.prompt else [])
    if args.prompt is None:
        if sys.stdin.isatty():
            raise InvalidRequestError("No prompt given. Pass it as an argument, with --prompt-file, or on stdin.")
        return [sys.stdin.read()]
    return [args.prompt]


def run(args: argparse.Namespace) -> int:
    params = sampling_params_from(args)  # validate before the (slower) model load
    prompts = read_prompts(args)
    llm = load_llm(args)
    if len(prompts) == 1 and not args.json:
        for chunk in llm.stream(prompts[0], params, chat=args.chat):
            print(chunk.text, end="", flush=True)
        print(flush=True)
        outputs = llm.last_outputs
    elif args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    for out, prompt in zip(outputs, prompts, strict=True):
        if args.json:
            record = {
                "prompt": prompt,
                "text": out.text,
                "token_ids": out.token_ids,
                "prompt_tokens": len(out.prompt_token_ids),
                "finish_reason": out.finish_reason,
                "metrics": asdict(out.metrics),
            }
            print(json.dumps(record, ensure_ascii=False))
        elif len(prompts) > 1:
            print(f"--- [{out.index}] {prompt}\n{out.text}")
    if not args.quiet:
        m = outputs[0].metrics
        print(
            f"[{llm.model_path.name} {llm.precision} | load {llm.load_time_s:.2f} s | "
            f"prompt {m.num_prompt_tokens} tok, {m.prefill_tokens_per_s:.0f} tok/s | "
            f"generated {m.num_generated_tokens} tok, {m.decode_tokens_per_s:.1f} tok/s | "
            + (
                f"speculative {llm.engine.speculator.name}: {m.num_accepted_tokens}/{m.num_draft_tokens} accepted | "
                if llm.engine.speculator is not None
                else ""
            )
            + f"finish: {outputs[0].finish_reason}]",
            file=sys.stderr,
        )
    return 0
