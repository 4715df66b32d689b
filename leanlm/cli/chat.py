"""`leanlm chat`: an interactive conversation that keeps its history and streams each answer."""

from __future__ import annotations

import argparse
import sys

from leanlm.cli.options import add_model_options, add_sampling_options, load_llm, sampling_params_from


def add_parser(subparsers) -> None:
    chat = subparsers.add_parser(
        "chat",
        help="talk with the model interactively (chat template, streamed answers)",
        description="Interactive chat. Type a message and press Enter; /reset starts over, /exit (or Ctrl-D) quits.",
    )
    chat.add_argument("--system", help="a system message that starts the conversation")
    add_sampling_options(chat, max_tokens=512)
    add_model_options(chat)


def run(args: argparse.Namespace) -> int:
    params = sampling_params_from(args)
    llm = load_llm(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"leanlm chat with {llm.model_path.name} (/reset to start over, /exit or Ctrl-D to quit)")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            history = list(system)
            continue
        history.append({"role": "user", "content": message})
        answer = []
        for chunk in llm.stream_chat(history, params):
            answer.append(chunk.text)
            print(chunk.text, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(answer)})
    return 0
