"""Marian (opus-mt shape) and T5-small shape encoder-decoders: leanlm's generate against transformers' generate.

No Marian or T5 weights ship in a Python package, so both models are transformers' random initialisation at the
real models' shapes (opus-mt-en-fr: d_model 512, 6+6 layers, 8 heads, FFN 2048, 59514 words; t5-small: d_model
512, 6+6 layers, 8 heads, FFN 2048, 32128 words), saved by transformers and loaded by leanlm from the folder.
Speed does not depend on the weights' values; each run checks that both engines generate the same tokens.
Sources: random token ids, 32 per sentence. Both engines run in this process with 2 threads, interleaved
(A B A B ...); figures are medians over --repetitions.

    python benchmarks/bench_translate.py [--repetitions 3] [--batches 1 8] [--beams 1 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from leanlm.bench.machine import cpu_model
from leanlm.translate.seq2seq import load_seq2seq

SHAPES = {
    "marian (opus-mt-en-fr shape)": lambda t: t.MarianMTModel(
        t.MarianConfig(
            vocab_size=59514,
            decoder_vocab_size=59514,
            d_model=512,
            encoder_layers=6,
            decoder_layers=6,
            encoder_attention_heads=8,
            decoder_attention_heads=8,
            encoder_ffn_dim=2048,
            decoder_ffn_dim=2048,
            max_position_embeddings=512,
            scale_embedding=True,
            activation_function="swish",
            pad_token_id=59513,
            eos_token_id=0,
            decoder_start_token_id=59513,
            forced_eos_token_id=0,
        )
    ),
    "t5 (t5-small shape)": lambda t: t.T5ForConditionalGeneration(
        t.T5Config(
            vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, decoder_start_token_id=0
        )
    ),
}


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    import transformers

    rows = []
    for name, make in SHAPES.items():
        torch.manual_seed(0)
        hf = make(transformers).eval()
        with tempfile.TemporaryDirectory() as folder:
            hf.save_pretrained(folder)
            ours = load_seq2seq(folder)
        vocab = hf.config.vocab_size
        for batch in args.batches:
            ids = torch.randint(2, vocab - 2, (batch, 32), generator=torch.Generator().manual_seed(batch))
            for beams in args.beams:
                search = dict(max_new_tokens=args.max_new_tokens, num_beams=beams)
                times = {"leanlm": [], "transformers": []}
                same = True
                with torch.inference_mode():
                    hf.generate(input_ids=ids, do_sample=False, **search)  # warm-up: first calls allocate
                    ours.generate(ids, **search)
                    for _ in range(args.repetitions):
                        seconds, theirs = timed(hf.generate, input_ids=ids, do_sample=False, **search)
                        times["transformers"].append(seconds)
                        seconds, mine = timed(ours.generate, ids, **search)
                        times["leanlm"].append(seconds)
                        for row, tokens in enumerate(mine):
                            same &= tokens == theirs[row, 1 : 1 + len(tokens)].tolist()
                generated = sum(len(tokens) for tokens in mine)
                medians = {engine: statistics.median(values) for engine, values in times.items()}
                rows.append(
                    dict(
                        model=name,
                        batch=batch,
                        beams=beams,
                        generated_tokens=generated,
                        leanlm_s=round(medians["leanlm"], 3),
                        transformers_s=round(medians["transformers"], 3),
                        speedup=round(medians["transformers"] / medians["leanlm"], 2),
                        same_tokens=same,
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{cpu_model()}, 2 threads, median of {args.repetitions} runs, {args.max_new_tokens} new tokens at most\n")
    print("| model | batch | beams | tokens | leanlm s | transformers s | x transformers | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['beams']} | {r['generated_tokens']} | {r['leanlm_s']:.3f} | "
            f"{r['transformers_s']:.3f} | {r['speedup']:.2f}x | {'yes' if r['same_tokens'] else 'NO'} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
