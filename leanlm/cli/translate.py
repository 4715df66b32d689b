"""`leanlm translate`: text through an instruct model's chat template (or a Marian / T5 folder), audio with Whisper.

- `leanlm translate --to fr "text"`: the default model (or `--model`, a known instruct model, GGUF file or folder)
  is asked, in one chat turn, for the translation alone; greedy decoding.
- `leanlm translate --model opus-mt-en-fr/ "text"`: a Marian or T5 Hugging Face folder translates directly
  (beam search as its generation_config.json says; T5 is told `--to` by its task prefix).
- `leanlm translate speech.wav`: Whisper's translate task (speech in any language to English text).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leanlm.cli.options import add_model_options

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm", ".aac", ".mp4", ".mkv"}


def add_parser(subparsers) -> None:
    cmd = subparsers.add_parser(
        "translate",
        help="translate text (instruct model, or a Marian/T5 folder) or speech into English (Whisper)",
        description="Translate each text argument (or stdin) into --to with an instruct model through its chat "
        "template (default model: SmolLM2-135M-Instruct; larger instruct models translate far better), or "
        "directly with a Marian (opus-mt) or T5 folder given as --model. Audio files are translated into English "
        "by Whisper's translate task (default model: whisper-base).",
    )
    cmd.add_argument("inputs", nargs="*", help="texts to translate, or audio files (wav, flac, mp3, ...)")
    cmd.add_argument("--to", dest="target", default=None, help="target language: a code (fr) or name (French)")
    cmd.add_argument(
        "--from", dest="source", default=None, help="source language (default: the model decides / detects it)"
    )
    cmd.add_argument("--max-tokens", type=int, default=256, help="longest translation, in tokens")
    cmd.add_argument("--num-beams", type=int, default=None, help="beam width for Marian/T5 and Whisper")
    cmd.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_model_options(cmd)


def is_audio(text: str) -> bool:
    path = Path(text)
    return path.suffix.lower() in AUDIO_SUFFIXES and path.is_file()


def run(args: argparse.Namespace) -> int:
    from leanlm.errors import InvalidRequestError
    from leanlm.translate.prompts import language_code

    if args.max_tokens < 1:
        raise InvalidRequestError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.num_beams is not None and args.num_beams < 1:
        raise InvalidRequestError(f"--num-beams must be at least 1, got {args.num_beams}")
    target = None if args.target is None else language_code(args.target)  # unknown languages fail before loading
    source = None if args.source is None else language_code(args.source)
    audio = [is_audio(item) for item in args.inputs]
    if any(audio):
        if not all(audio):
            raise InvalidRequestError("Give either audio files or texts to translate, not both in one call.")
        if target not in (None, "en"):
            raise InvalidRequestError(
                f"Whisper translates speech into English only (got --to {args.target}). Transcribe it with "
                "`leanlm transcribe`, then translate the text with `leanlm translate --to ...`."
            )
        return translate_audio(args, source)
    texts = list(args.inputs)
    if not texts:
        if sys.stdin.isatty():
            raise InvalidRequestError("No text given. Pass it as an argument or on stdin.")
        texts = [sys.stdin.read().strip()]
    if not all(text.strip() for text in texts):
        raise InvalidRequestError("A text to translate is empty.")
    from leanlm.translate.seq2seq import is_seq2seq_folder

    if args.model is not None and is_seq2seq_folder(args.model):
        return translate_seq2seq(args, texts, target, source)
    if target is None:
        raise InvalidRequestError("Say which language to translate into: --to fr (a code or a language name).")
    return translate_with_instruct_model(args, texts, target, source)


def translate_seq2seq(args: argparse.Namespace, texts: list[str], target: str | None, source: str | None) -> int:
    from leanlm.translate.seq2seq import load_seq2seq

    model = load_seq2seq(args.model)
    for text in model.translate(texts, target, source, max_new_tokens=args.max_tokens, num_beams=args.num_beams):
        print(text)
    return 0


def translate_with_instruct_model(args: argparse.Namespace, texts: list[str], target: str, source: str | None) -> int:
    from leanlm.cli.options import load_llm
    from leanlm.sampling_params import SamplingParams
    from leanlm.translate.prompts import instruct_messages

    llm = load_llm(args)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    outputs = llm.chat([instruct_messages(text, target, source) for text in texts], params)
    for output in outputs:
        print(output.text.strip())
    return 0


def translate_audio(args: argparse.Namespace, source: str | None) -> int:
    """Whisper's translate task through `leanlm transcribe`'s own code (same defaults, output as txt)."""
    from leanlm.cli import transcribe

    transcribe_args = argparse.Namespace(
        audio=list(args.inputs),
        model=args.model or "whisper-base",
        task="translate",
        language=source,
        beam_size=args.num_beams or 5,
        temperature=None,
        no_condition_on_previous_text=False,
        without_timestamps=False,
        initial_prompt=None,
        format="txt",
        dtype="float32",
        threads=args.threads,
        quiet=args.quiet,
    )
    return transcribe.run(transcribe_args)
