"""`leanlm quantize`: compress a model's weights, measure what it cost, and write a loadable artifact."""

from __future__ import annotations

import argparse
import sys
import time

from leanlm.cli.options import add_model_options
from leanlm.compress.config import METHODS


def add_parser(subparsers) -> None:
    q = subparsers.add_parser(
        "quantize",
        help="quantize weights (int8, int4, GPTQ, AWQ) and save a folder that leanlm loads",
        description="Quantize every projection and the LM head, measure perplexity/KL against the original on "
        "the evaluation corpus, and write config.json, tokenizer, model.safetensors and quantization.json.",
    )
    q.add_argument(
        "--method",
        required=True,
        choices=METHODS,
        help="int8: per-channel symmetric; int4: group-wise round-to-nearest; gptq/awq: calibrated on c4 text",
    )
    q.add_argument("--output", "-o", required=True, help="folder to write (replaced atomically if it exists)")
    q.add_argument("--bits", type=int, default=0, help="bits per weight (default: 8 for int8, 4 otherwise)")
    q.add_argument(
        "--group-size",
        type=int,
        default=0,
        help="weights per scale/offset (default: per channel for int8, 128 otherwise; -1 = per channel)",
    )
    q.add_argument("--no-lm-head", action="store_true", help="keep the LM head in the model's dtype")
    q.add_argument("--calibration-samples", type=int, default=32, help="GPTQ/AWQ: c4 sequences (default 32)")
    q.add_argument("--calibration-length", type=int, default=256, help="GPTQ/AWQ: tokens per sequence (default 256)")
    q.add_argument(
        "--no-act-order",
        action="store_true",
        help="GPTQ: keep the stored column order (default: decreasing Hessian diagonal, which measured better)",
    )
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ: dampening fraction (default 0.01)")
    q.add_argument(
        "--export-gguf",
        help="also write a GGUF file for llama.cpp (int8 -> Q8_0, 4 bits or fewer -> Q4_1); needs a GGUF source",
    )
    q.add_argument(
        "--eval-tokens",
        type=int,
        default=2048,
        help="wiki tokens for the quality check recorded in quantization.json (0 = skip)",
    )
    add_model_options(q)


def run(args: argparse.Namespace) -> int:
    from leanlm.compress.artifact import save_quantized
    from leanlm.compress.config import QuantConfig
    from leanlm.compress.quantize import quantize
    from leanlm.compress.storage import adopt_storage_dtype
    from leanlm.engine.llm import LLM, resolve_dtype

    config = QuantConfig(
        method=args.method,
        bits=args.bits,
        group_size=args.group_size,
        include_lm_head=not args.no_lm_head,
        calibration_samples=args.calibration_samples,
        calibration_length=args.calibration_length,
        act_order=not args.no_act_order,
        damp=args.damp,
    )
    runtime_dtype = resolve_dtype(args.dtype)
    # Quantize from float32 copies of the original weights; the artifact keeps dense tensors in runtime_dtype.
    llm = LLM(args.model, dtype="float32", device="cpu", threads=args.threads, dequantize=True)
    started = time.perf_counter()
    report = quantize(llm, config)
    report["seconds"] = round(time.perf_counter() - started, 1)
    adopt_storage_dtype(llm, runtime_dtype)
    manifest = {
        "method": config.method,
        "bits": config.bits,
        "group_size": config.group_size,
        "config": config.to_dict(),
        "source": str(llm.model_path),
        "dtype": str(runtime_dtype)[6:],
        "report": report,
    }
    if config.method in ("gptq", "awq"):
        manifest["calibration"] = {
            "corpus": "c4.utf8 (exllamav2==0.3.2)",
            "samples": config.calibration_samples,
            "tokens_per_sample": config.calibration_length,
        }
    manifest["speed"] = _measure_speed(llm)
    if args.eval_tokens:
        manifest["quality"] = _measure_quality(llm, args, runtime_dtype)
    folder = save_quantized(llm, args.output, manifest)
    if args.export_gguf:
        from leanlm.compress.gguf_writer import write_gguf

        print(f"wrote {write_gguf(llm, llm.model_path, args.export_gguf)}")
    mib = report["quantized_bytes"] / 2**20
    print(
        f"{config.method} {config.bits}-bit g{config.group_size}: {report['quantized_layers']} layers, "
        f"{report['dense_bytes'] / 2**20:.0f} MiB -> {mib:.0f} MiB in {report['seconds']} s -> {folder}"
    )
    if "quality" in manifest:
        q = manifest["quality"]
        print(
            f"quality on {q['num_tokens']} wiki tokens: perplexity {q['perplexity']:.3f} "
            f"(original {q['baseline_perplexity']:.3f}, x{q['ppl_ratio']:.4f}), KL {q['kl_mean']:.4f}, "
            f"top-1 {100 * q['top1_agreement']:.1f}%"
        )
    return 0


def _measure_speed(llm) -> dict:
    """A quick single-run figure for the manifest; benchmarks/bench_quant.py gives the careful medians."""
    import torch

    from leanlm.sampling_params import SamplingParams

    prompt = (llm.tokenizer.encode("The history of computing is a story of ideas. " * 16))[:64]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    llm.generate([prompt[:8]], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    metrics = llm.generate([prompt], params)[0].metrics
    return {
        "prompt_tokens": 64,
        "generated_tokens": 32,
        "prefill_tok_s": round(metrics.prefill_tokens_per_s, 1),
        "decode_tok_s": round(metrics.decode_tokens_per_s, 1),
        "threads": torch.get_num_threads(),
    }


def _measure_quality(llm, args, dtype) -> dict:
    """Perplexity, KL and top-1 of the quantized model against the original, on the evaluation corpus."""
    from leanlm.engine.llm import LLM
    from leanlm.evaluate import evaluate
    from leanlm.evaluate.corpus import evaluation_text

    original = LLM(args.model, dtype=dtype, device="cpu", threads=args.threads, dequantize=True)
    print("leanlm: measuring quality against the original...", file=sys.stderr)
    result = evaluate(
        llm, evaluation_text(), corpus="wiki", max_tokens=args.eval_tokens, baseline=original, progress=True
    )
    return result.to_dict()
