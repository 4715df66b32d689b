"""The `leanlm quantize` and `leanlm prune` pipelines: load the model in float32, compress it, measure what it cost
(compress/measure.py) and write the artifact. Each returns the manifest it wrote (quantization.json or
compression.json); the CLI only parses options and prints.

Level 4 (measurement), because the manifests record evaluate/'s quality figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from leanlm.compress.config import QuantConfig
from leanlm.compress.measure import measure_quality, measure_speed
from leanlm.compress.prune.config import UNSTRUCTURED, PruneConfig
from leanlm.compress.storage import adopt_storage_dtype
from leanlm.engine.llm import LLM, resolve_dtype
from leanlm.kernels.threads import scoped_threads

CALIBRATION_CORPUS = "c4.utf8 (exllamav2==0.3.2)"


def quantize_to_folder(model, config: QuantConfig, output, *, threads: int | None = None, **options) -> dict:
    """Quantize `model` with `config` and write the folder `output` (atomically); returns quantization.json as
    written. Options: dtype (of the artifact's dense tensors), eval_tokens (wiki tokens for the quality check,
    0 = skip), export_gguf (also write a GGUF file for llama.cpp), progress. `threads` holds for this call only."""
    with scoped_threads(threads):
        return _quantize_to_folder(model, config, output, threads=threads, **options)


def prune_to_folder(model, config: PruneConfig, output, *, threads: int | None = None, **options) -> dict:
    """Prune `model` with `config` and write the folder `output` (atomically); returns compression.json as
    written. Options: dtype (of the artifact), eval_tokens (wiki tokens for the quality and speed checks, 0 = skip),
    progress. `threads` holds for this call only."""
    with scoped_threads(threads):
        return _prune_to_folder(model, config, output, threads=threads, **options)


def _quantize_to_folder(
    model: str | Path | None,
    config: QuantConfig,
    output: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    threads: int | None = None,
    eval_tokens: int = 2048,
    export_gguf: str | Path | None = None,
    progress: bool = True,
    sensitivity: str | Path | dict | None = None,
    gguf_kquants: bool = False,
) -> dict:
    """Quantize `model` with `config` and write the folder `output` (atomically); `dtype` is the dtype of the
        artifact's dense tensors. `eval_tokens` wiki tokens measure quality against the original (0 = skip).
        `export_gguf` also writes a GGUF file for llama.cpp. `sensitivity`: a KL report (`leanlm sensitivity --json`,
        a path or its dict) that mixed precision reuses instead of probing; `gguf_kquants`: the GGUF export as Q4_K/Q6_K
    where rows allow. Returns quantization.json as written."""
    from leanlm.compress.artifact import save_quantized
    from leanlm.compress.quantize import quantize
    from leanlm.formats.quantized_folder import MANIFEST

    runtime_dtype = resolve_dtype(dtype)
    # Quantize from float32 copies of the original weights; the artifact keeps dense tensors in runtime_dtype.
    llm = LLM(model, dtype="float32", device="cpu", threads=threads, dequantize=True)
    started = time.perf_counter()
    mixed = None
    if config.mixed and not config.layer_bits:
        from leanlm.compress.mixed import plan_mixed

        if isinstance(sensitivity, str | Path):
            sensitivity = json.loads(Path(sensitivity).read_text())
        config, mixed = plan_mixed(llm, config, progress, sensitivity)
    report = quantize(llm, config)
    report["seconds"] = round(time.perf_counter() - started, 1)
    adopt_storage_dtype(llm, runtime_dtype)
    manifest = {
        "method": config.method,
        "bits": config.bits,
        "group_size": config.group_size,
        "config": config.to_dict(),
        "source": str(llm.model_path),
        "dtype": str(runtime_dtype).removeprefix("torch."),
        "report": report,
    }
    if mixed is not None:
        manifest["mixed"] = mixed
    if config.method in ("gptq", "awq"):
        manifest["calibration"] = _calibration(config.calibration_samples, config.calibration_length)
    manifest["speed"] = measure_speed(llm)
    if eval_tokens:
        original = LLM(model, dtype=runtime_dtype, device="cpu", threads=threads, dequantize=True)
        manifest["quality"] = measure_quality(llm, original, eval_tokens, progress)
    folder = save_quantized(llm, output, manifest)
    if export_gguf:
        from leanlm.compress.gguf_writer import write_gguf

        write_gguf(llm, llm.model_path, export_gguf, kquants=gguf_kquants)
    return json.loads((folder / MANIFEST).read_text())


def _prune_to_folder(
    model: str | Path | None,
    config: PruneConfig,
    output: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    threads: int | None = None,
    eval_tokens: int = 2048,
    progress: bool = True,
) -> dict:
    """Prune `model` with `config` and write the folder `output` (atomically); `dtype` is the artifact's dtype.
    `eval_tokens` wiki tokens measure quality and speed of the written folder against the original (0 = skip both).
    Returns compression.json as written."""
    from leanlm.compress.prune.artifact import save_pruned
    from leanlm.compress.prune.prune import prune
    from leanlm.formats.sparse_folder import MANIFEST

    runtime_dtype = resolve_dtype(dtype)
    # A quantized source pruned structurally stays quantized (prune/requantize.py): its own blocks, read here.
    native = {} if config.method in UNSTRUCTURED else _native_blocks(model, threads)
    # Prune float32 copies of the original weights (a quantized GGUF is dequantized); the artifact keeps runtime_dtype.
    llm = LLM(model, dtype="float32", device="cpu", threads=threads, dequantize=True)
    source_layers = llm.config.num_layers
    report = prune(llm, config)
    quantization = None
    if native:
        quantization = _requantize(llm, native, report.get("dropped_layers", []), source_layers)
        report["requantized"] = {"kept_source_blocks": quantization["kept_source_blocks"]}
        report["requantized"]["requantized_int4_g32"] = len(quantization["requantized"])
    adopt_storage_dtype(llm, runtime_dtype)
    manifest = {
        "method": config.method,
        "config": config.to_dict(),
        "source": str(llm.model_path),
        "dtype": str(runtime_dtype).removeprefix("torch."),
        "report": report,
    }
    if config.calibrated:
        manifest["calibration"] = _calibration(config.calibration_samples, config.calibration_length)

    def measure(folder: Path) -> dict:
        """Speed (quick, single run) and quality of the written folder against the original, both at runtime_dtype."""
        pruned = LLM(folder, dtype=runtime_dtype, device="cpu", threads=threads)
        # against the original as a user runs it: at its own precision when the pruned model kept one
        original = LLM(model, dtype=runtime_dtype, device="cpu", threads=threads, dequantize=not native)
        speed = {"pruned": measure_speed(pruned), "original": measure_speed(original)}
        speed["decode_speedup"] = round(speed["pruned"]["decode_tok_s"] / speed["original"]["decode_tok_s"], 3)
        return {"speed": speed, "quality": measure_quality(pruned, original, eval_tokens, progress)}

    sparse = config.method in UNSTRUCTURED
    measured = measure if eval_tokens else None
    folder = save_pruned(llm, output, manifest, sparse=sparse, measure=measured, quantization=quantization)
    return json.loads((folder / MANIFEST).read_text())


def _native_blocks(model, threads: int | None) -> dict:
    """The source's quantized linear layers as it loads natively ({} for a dense source)."""
    from leanlm.compress.prune.requantize import native_blocks

    return native_blocks(LLM(model, device="cpu", threads=threads).model)


def _requantize(llm: LLM, native: dict, dropped_layers: list[int], source_layers: int) -> dict:
    """Put the pruned float model back into blocks and run it as a quantized model; returns quantization.json's
    description of what was done."""
    from leanlm.compress.prune.requantize import REQUANTIZE, requantize_pruned
    from leanlm.compress.quantize import install
    from leanlm.models.registry import prepare_runtime

    blocks, report = requantize_pruned(llm.model, native, dropped_layers, source_layers)
    install(llm.model, blocks)
    llm.plan = llm.plan.for_weights(quantized=True)
    prepare_runtime(llm.model, llm.plan)
    return {
        "method": "pruned source blocks + " + REQUANTIZE.method,
        "bits": REQUANTIZE.bits,
        "group_size": REQUANTIZE.group_size,
        "source": str(llm.model_path),
        **report,
    }


def _calibration(samples: int, length: int) -> dict:
    return {"corpus": CALIBRATION_CORPUS, "samples": samples, "tokens_per_sample": length}
