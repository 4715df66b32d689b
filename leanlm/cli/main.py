"""`leanlm` command line: one entry point; each subcommand lives in its own module (add_parser + run).

Subcommand modules import torch and the rest of leanlm inside `run`, so `leanlm --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = """Run, compress and measure Transformer language models on the machine you have.

examples:
  leanlm generate "The capital of France is" --max-tokens 16 --temperature 0
  leanlm generate --chat "Explain self-attention in two sentences."
  leanlm generate --model path/to/model.gguf --prompt-file prompts.txt --json
  leanlm chat
  leanlm eval --model M2 --baseline M
  leanlm bench --vs transformers
  leanlm models
  leanlm generate --model gemma3-270m "Hello"
  leanlm embed "a sentence to embed" "another one"
  leanlm search --corpus notes.txt --query "how do I reset it?"
  leanlm transcribe speech.wav --format srt
  leanlm translate --to fr "Where is the station?"
"""

# name -> module; the order is the order of `leanlm --help`.
COMMANDS = {
    "generate": "leanlm.cli.generate",
    "chat": "leanlm.cli.chat",
    "eval": "leanlm.cli.evaluate",
    "bench": "leanlm.cli.bench",
    "quantize": "leanlm.cli.quantize",
    "prune": "leanlm.cli.prune",
    "sensitivity": "leanlm.cli.sensitivity",
    "plan": "leanlm.cli.plan",
    "optimize": "leanlm.cli.optimize",
    "serve": "leanlm.cli.serve",
    "models": "leanlm.cli.models",
    "embed": "leanlm.cli.embed",
    "search": "leanlm.cli.search",
    "transcribe": "leanlm.cli.transcribe",
    "translate": "leanlm.cli.translate",
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    from leanlm import __version__

    parser = argparse.ArgumentParser(
        prog="leanlm", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"leanlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a subcommand not written yet
        module.add_parser(sub)
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from leanlm.errors import LeanLMError
    from leanlm.kernels.threads import scoped_threads

    try:
        with scoped_threads(getattr(args, "threads", None)):  # --threads for the whole command, then restored
            return modules[args.command].run(args)
    except LeanLMError as exc:
        print(f"leanlm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
