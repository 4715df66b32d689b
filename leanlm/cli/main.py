"""`leanlm` command line: one entry point, subcommands imported lazily."""

from __future__ import annotations

import argparse
import sys

from leanlm.cli.options import add_model_options, add_sampling_options

DESCRIPTION = """Run, compress and measure Transformer language models on the machine you have.

examples:
  leanlm generate "The capital of France is" --max-tokens 16 --temperature 0
  leanlm generate --chat "Explain self-attention in two sentences."
  leanlm generate --model path/to/model.gguf --prompt-file prompts.txt --json
  leanlm chat
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leanlm", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from leanlm import __version__

    parser.add_argument("--version", action="version", version=f"leanlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="continue a text (or answer it with --chat) and print the result",
        description="Continue the given text (a completion). With --chat, the text is sent as one "
        "user message through the model's chat template.",
    )
    gen.add_argument("prompt", nargs="?", help="the text to continue")
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

    chat = sub.add_parser(
        "chat",
        help="talk with the model interactively (chat template, streamed answers)",
        description="Interactive chat. Type a message and press Enter; /reset starts over, /exit (or Ctrl-D) quits.",
    )
    chat.add_argument("--system", help="a system message that starts the conversation")
    add_sampling_options(chat, max_tokens=512)
    add_model_options(chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from leanlm.errors import LeanLMError

    try:
        if args.command == "generate":
            from leanlm.cli.generate import run_generate

            return run_generate(args)
        if args.command == "chat":
            from leanlm.cli.chat import run_chat

            return run_chat(args)
    except LeanLMError as exc:
        print(f"leanlm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
