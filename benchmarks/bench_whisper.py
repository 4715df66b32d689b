"""Whisper base: real-time factor (seconds of compute per second of audio; lower is faster) and word error rate
for 30 s and 5 min of English speech, leanlm against faster-whisper (CTranslate2) and transformers.

The speech is synthesized with espeak-ng from sentences of the wiki evaluation corpus (so the reference text is
known). Every engine decodes with the same settings: beam 5, temperature 0 only, timestamps, conditioning on the
previous window's text, language given (en). All engines live in this process with 2 threads and run
interleaved (A B C ... A B C ...); figures are medians over --repetitions.

    python benchmarks/bench_whisper.py [--repetitions 3] [--lengths 30 300] [--json out/bench_whisper.json]
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from leanlm.bench.machine import cpu_model
from leanlm.formats.assets import CORPUS_WIKI, fetch, fetch_speech_model
from leanlm.models.whisper_int8 import quantize_int8
from leanlm.speech.transcribe import TranscribeOptions, WhisperPipeline
from leanlm.speech.wer import word_error_rate


def speech(seconds: float) -> tuple[np.ndarray, str]:
    """At least `seconds` of espeak-ng English read from the wiki corpus, cut at a sentence end."""
    import soundfile
    import soxr

    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed: apt-get install espeak-ng")
    text = fetch(CORPUS_WIKI, quiet=True).read_text(encoding="utf-8")
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 < len(s.strip()) < 200 and "=" not in s]
    chunks, spoken, total = [], [], 0.0
    for sentence in sentences:
        wav = subprocess.run(
            ["espeak-ng", "-v", "en-us", "-s", "160", "--stdout", sentence], capture_output=True, check=True
        ).stdout
        samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
        samples = soxr.resample(samples, rate, 16_000).astype(np.float32)
        chunks += [samples, np.zeros(4000, dtype=np.float32)]
        spoken.append(sentence)
        total += (len(samples) + 4000) / 16_000
        if total >= seconds:
            break
    return np.concatenate(chunks), " ".join(spoken)


class Leanlm:
    def __init__(self, folder: Path, dtype: torch.dtype, int8: bool = False):
        self.pipeline = WhisperPipeline.from_folder(folder, dtype)
        if int8:  # W8A8 layer Linears (models/whisper_int8.py), as faster-whisper's compute_type="int8"
            quantize_int8(self.pipeline.model)
        self.options = TranscribeOptions(beam_size=5, temperatures=(0.0,), language="en")

    def __call__(self, audio: np.ndarray) -> str:
        return self.pipeline.transcribe(audio, self.options).text


class FasterWhisper:
    def __init__(self, folder: Path, compute_type: str, threads: int):
        from faster_whisper import WhisperModel

        self.model = WhisperModel(str(folder), device="cpu", compute_type=compute_type, cpu_threads=threads)

    def __call__(self, audio: np.ndarray) -> str:
        segments, _ = self.model.transcribe(audio, beam_size=5, temperature=0.0, language="en")
        return "".join(s.text for s in segments).strip()


class Transformers:
    """transformers' WhisperForConditionalGeneration on the same weights (exported by leanlm), long-form
    generation with timestamps and previous-text conditioning."""

    def __init__(self, folder: Path):
        import transformers

        from leanlm.models.whisper import state_dict_to_hf

        pipeline = WhisperPipeline.from_folder(folder)
        cfg = pipeline.model.config
        hf_config = transformers.WhisperConfig(
            vocab_size=cfg.vocab_size,
            num_mel_bins=cfg.num_mel_bins,
            d_model=cfg.d_model,
            encoder_layers=cfg.encoder_layers,
            encoder_attention_heads=cfg.encoder_attention_heads,
            decoder_layers=cfg.decoder_layers,
            decoder_attention_heads=cfg.decoder_attention_heads,
            encoder_ffn_dim=cfg.encoder_ffn_dim,
            decoder_ffn_dim=cfg.decoder_ffn_dim,
            max_source_positions=cfg.max_source_positions,
            max_target_positions=cfg.max_target_positions,
            pad_token_id=50257,
            bos_token_id=50257,
            eos_token_id=50257,
            decoder_start_token_id=50258,
        )
        model = transformers.WhisperForConditionalGeneration(hf_config).eval()
        model.load_state_dict(state_dict_to_hf(pipeline.model), strict=False)
        tok = pipeline.tokenizer
        gen = model.generation_config
        gen.lang_to_id = {f"<|{code}|>": token for code, token in tok.languages.items()}
        gen.task_to_id = {"transcribe": tok.transcribe, "translate": tok.translate}
        gen.no_timestamps_token_id = tok.no_timestamps
        gen.prev_sot_token_id = tok.sot_prev
        gen.is_multilingual = True
        gen.suppress_tokens = [t for t in pipeline.suppress_ids if t < tok.eot]
        gen.begin_suppress_tokens = [tok.encode(" ")[0], tok.eot]
        gen.max_initial_timestamp_index = 50
        gen.forced_decoder_ids = None
        gen.max_length = cfg.max_target_positions
        self.model, self.tokenizer = model, tok
        self.extractor = transformers.WhisperFeatureExtractor()

    @torch.inference_mode()
    def __call__(self, audio: np.ndarray) -> str:
        long = len(audio) > 30 * 16_000
        inputs = self.extractor(
            audio,
            sampling_rate=16_000,
            return_tensors="pt",
            return_attention_mask=True,
            **({"truncation": False, "padding": "longest"} if long else {}),
        )
        out = self.model.generate(
            inputs.input_features,
            attention_mask=inputs.attention_mask,
            language="en",
            task="transcribe",
            num_beams=5,
            return_timestamps=True,
            temperature=0.0,
            condition_on_prev_tokens=True,
            do_sample=False,
        )
        sequences = out["sequences"] if isinstance(out, dict) else out
        return self.tokenizer.decode(sequences[0].tolist()).strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=float, nargs="+", default=[30, 300], help="seconds of audio")
    parser.add_argument("--engines", nargs="+", default=None, help="labels to run (default: all)")
    parser.add_argument("--json", default="out/bench_whisper.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = fetch_speech_model("whisper-base")
    makers = {
        "leanlm float32": lambda: Leanlm(folder, torch.float32),
        "leanlm bfloat16": lambda: Leanlm(folder, torch.bfloat16),
        "leanlm int8": lambda: Leanlm(folder, torch.float32, int8=True),
        "faster-whisper float32": lambda: FasterWhisper(folder, "float32", args.threads),
        "faster-whisper int8": lambda: FasterWhisper(folder, "int8", args.threads),
        "transformers float32": lambda: Transformers(folder),
    }
    engines = {}
    for label, make in makers.items():
        if args.engines and label not in args.engines:
            continue
        try:
            engines[label] = make()
        except Exception as exc:  # noqa: BLE001 - a missing peer is reported, the rest still run
            print(f"skipping {label}: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(f"CPU: {cpu_model()}, {args.threads} threads, torch {torch.__version__}", file=sys.stderr)
    report = {"cpu": cpu_model(), "threads": args.threads, "results": []}
    for seconds in args.lengths:
        audio, reference = speech(seconds)
        duration = len(audio) / 16_000
        times: dict[str, list[float]] = {label: [] for label in engines}
        texts: dict[str, str] = {}
        for repetition in range(args.repetitions):
            for label, engine in engines.items():  # interleaved, so load drift hits every engine alike
                start = time.perf_counter()
                texts[label] = engine(audio)
                times[label].append(time.perf_counter() - start)
                print(
                    f"  {duration:.0f} s audio, run {repetition + 1}: {label}: {times[label][-1]:.2f} s",
                    file=sys.stderr,
                )
        for label in engines:
            rtf = statistics.median(times[label]) / duration
            report["results"].append(
                {
                    "audio_s": round(duration, 1),
                    "engine": label,
                    "rtf": round(rtf, 4),
                    "seconds": times[label],
                    "wer": round(word_error_rate(reference, texts[label]), 4),
                }
            )
    print(f"\nWhisper base, {report['cpu']}, {args.threads} threads, beam 5, median of {args.repetitions}\n")
    print("| audio | engine | RTF (lower is faster) | x faster-whisper fp32 | x transformers | WER |")
    print("|---|---|---|---|---|---|")
    for row in report["results"]:
        same = {r["engine"]: r["rtf"] for r in report["results"] if r["audio_s"] == row["audio_s"]}
        fw, hf = same.get("faster-whisper float32"), same.get("transformers float32")
        vs_fw = f"{fw / row['rtf']:.2f}x" if fw else "-"
        vs_hf = f"{hf / row['rtf']:.2f}x" if hf else "-"
        print(f"| {row['audio_s']:.0f} s | {row['engine']} | {row['rtf']:.3f} | {vs_fw} | {vs_hf} | {row['wer']:.3f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
