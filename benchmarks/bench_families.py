"""Every weight format against llama.cpp on the same files (issues 12 and 13): Qwen2.5-Coder-1.5B and Gemma 3 270M
(Q4_K_M GGUFs fetched from PyPI wheels), SmolLM2-135M re-encoded as F16, BF16, Q4_K_M and Q6_K, and the default
model (SmolLM2 Q4_1) as published, in one run.

2 threads, batch 1, a 120-token prompt, 128 generated tokens (EOS ignored); each engine runs in a fresh process,
interleaved, median of --repetitions runs; one benchmark (and one bandwidth probe) per model. leanlm runs K-quant and
Q5 blocks natively on its kernels; F16/BF16 files and bfloat16 folders run as bfloat16 weights on its 16-bit
kernels (float32 activations). Writes JSON with every sample.

A model is a known model name, a path, or NAME:TYPE for the known model re-encoded: F16 by leanlm's exporter, other
types (BF16, Q4_K_M, Q6_K, ...) by llama.cpp's own quantizer from that F16 (leanlm/bench/llama_cpp_files.py), the
files cached under $LEANLM_HOME/exports. NAME:HF-TYPE runs leanlm on a Hugging Face folder (bfloat16 safetensors)
of that file's weights against llama.cpp on the file itself.

    python benchmarks/bench_families.py [--models gemma3-270m,smollm2-135m:Q6_K] [--repetitions 3]
    python benchmarks/bench_families.py --models smollm2-135m,out/smol-26L    # a leanlm artifact beside its source
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from leanlm.bench.report import format_table, print_sample
from leanlm.bench.runner import BenchSpec, EngineSpec, run_benchmark, save_json
from leanlm.formats.assets import fetch_known_model, leanlm_home

DEFAULT_MODELS = (
    "qwen2.5-coder-1.5b,gemma3-270m,smollm2-135m:F16,smollm2-135m:BF16,smollm2-135m:HF-BF16,smollm2-135m:Q4_K_M,"
    "smollm2-135m:Q6_K,smollm2-135m"
)
HF_PREFIX = "HF-"  # NAME:HF-BF16: leanlm on a Hugging Face folder of the BF16 file's weights, llama.cpp on the file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="out/bench_families.json")
    args = parser.parse_args()
    reports = {}
    for name in args.models.split(","):
        folder = Path(name).is_dir()  # a leanlm artifact (quantized or pruned folder): llama.cpp cannot read it
        hf = name.partition(":")[2].startswith(HF_PREFIX)
        path = name if folder else str(model_file(name.replace(HF_PREFIX, ""), args.threads))
        ours = str(hf_folder(Path(path))) if hf else path
        engines = [EngineSpec("leanlm", "auto", ours, label=Path(name).name)]
        if importlib.util.find_spec("llama_cpp") is not None and not folder:
            engines.append(EngineSpec("llama.cpp", "auto", path, label=name.replace(HF_PREFIX, "")))
        spec = BenchSpec(model=path, threads=args.threads, repetitions=args.repetitions, engines=engines)

        report = run_benchmark(spec, print_sample)
        add_ratios(report)
        print(format_table(report), flush=True)
        reports[name] = report
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        save_json(reports, args.json)
    return 0


def model_file(name: str, threads: int) -> Path:
    """A known model's file, or with ':TYPE' that model re-encoded (F16 by leanlm, the rest by llama.cpp)."""
    from leanlm.bench.llama_cpp_files import quantize_with_llama_cpp
    from leanlm.formats.gguf_export import export_gguf

    if Path(name).is_file():
        return Path(name)
    known, _, type_name = name.partition(":")
    source = fetch_known_model(known)
    if not type_name:
        return source
    exports = leanlm_home() / "exports"
    f16 = exports / f"{source.stem}.F16.gguf"
    if not f16.is_file():
        exports.mkdir(parents=True, exist_ok=True)
        export_gguf(source, f16, "F16")
    if type_name == "F16":
        return f16
    return quantize_with_llama_cpp(f16, type_name, exports / f"{source.stem}.llama-{type_name}.gguf", threads)


def hf_folder(gguf_file: Path) -> Path:
    """The GGUF's weights as a Hugging Face folder (config.json, bfloat16 model.safetensors, tokenizer files), as
    transformers would save them; cached beside the file."""
    import json

    import torch
    from safetensors.torch import save_file

    from leanlm.compress.artifact import atomic_folder, hf_config_dict
    from leanlm.models.checkpoint import load_checkpoint

    folder = gguf_file.with_suffix(".hf")
    if (folder / "config.json").is_file():
        return folder
    checkpoint = load_checkpoint(gguf_file, torch.bfloat16)
    with atomic_folder(folder) as scratch:
        save_file({k: v.contiguous() for k, v in checkpoint.weights.items()}, scratch / "model.safetensors")
        (scratch / "config.json").write_text(json.dumps(hf_config_dict(checkpoint.config), indent=2))
        checkpoint.tokenizer.to_folder_files(scratch)
    return folder


def add_ratios(report: dict) -> None:
    """leanlm against llama.cpp on the same file."""
    peer = next((row for row in report["rows"] if row["engine"] == "llama.cpp"), None)
    for row in report["rows"]:
        if row["engine"] == "leanlm" and peer is not None:
            row["vs"] = {
                "engine": "llama.cpp",
                **{m: row[f"{m}_tok_s"]["median"] / peer[f"{m}_tok_s"]["median"] for m in ("prefill", "decode")},
                "load": row["load_s"]["median"] / peer["load_s"]["median"],
            }


if __name__ == "__main__":
    sys.exit(main())
