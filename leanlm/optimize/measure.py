"""The real measurer: builds each candidate with `leanlm quantize`'s pipeline (cached in the work folder), scores
its quality against the original on evaluation text (never the calibration text: GPTQ/AWQ calibrate on c4, this is
wiki), and times it with the bench engine in fresh processes (so load, peak memory and speed are its own).

The evaluation text is split in two: the search scores candidates on the first half; the chosen artifact's card is
re-measured on the second half, which the search never saw.
"""

from __future__ import annotations

import gc
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from leanlm.bench.machine import memory_bandwidth_gbs
from leanlm.errors import InvalidRequestError
from leanlm.optimize.formats import FORMATS, Candidate, FormatSpec
from leanlm.optimize.predict import Prediction, Workload, predict, source_layers

EVAL_CONTEXT, EVAL_STRIDE = 512, 256


def split_text(text: str) -> tuple[str, str]:
    """(search half, held-out half), cut at a paragraph boundary near the middle."""
    middle = len(text) // 2
    cut = text.find("\n", middle)
    cut = middle if cut < 0 else cut + 1
    return text[:cut], text[cut:]


def source_layout(model: Path) -> FormatSpec:
    """The table entry that runs like a source that is not a natively run GGUF (source_layers covers those): a
    leanlm quantized folder by its manifest, anything else as bfloat16."""
    from leanlm.models.checkpoint import holds_quantized_weights

    if not model.is_dir() or not holds_quantized_weights(model):
        return FORMATS["bf16"]
    manifest = json.loads((model / "quantization.json").read_text())
    match = [
        f
        for f in FORMATS.values()
        if f.quantized and (f.bits, f.group_size) == (manifest["bits"], manifest["group_size"])
    ]
    return match[0] if match else FORMATS["rtn4-g32"]


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class EngineMeasurer:
    model: str  # the source checkpoint (path)
    work: Path  # the optimizer's folder: candidates/ live here
    text: str  # the text quality is scored on
    eval_tokens: int = 1024
    speed_repetitions: int = 2
    prompt_tokens: int = 64
    gen_tokens: int = 32
    progress: bool = True

    def __post_init__(self) -> None:
        from leanlm.models.checkpoint import load_checkpoint

        self.config = load_checkpoint(self.model, weights=False).config
        self._baseline = None
        self._predictions: dict[str, Prediction] = {}
        self._bandwidth: dict[int, float] = {}

    # ---- the cheap proxy -------------------------------------------------------------------------------

    def prediction(self, candidate: Candidate) -> Prediction:
        if candidate.key not in self._predictions:
            workload = Workload(
                context=self.prompt_tokens + self.gen_tokens,
                prompt_tokens=self.prompt_tokens,
                kv_cache=candidate.kv_cache,
                threads=candidate.threads,
            )
            spec, config, stored = candidate.spec, self.config, None
            if spec.method in ("source", "layers"):  # runs like the source (fewer layers for "layers")
                stored = source_layers(self.model)
                spec = FORMATS["source"] if stored else source_layout(Path(self.model))
                config = config.replace(num_layers=config.num_layers - candidate.spec.drop_layers)
            if candidate.threads not in self._bandwidth:  # probed once per thread count
                self._bandwidth[candidate.threads] = memory_bandwidth_gbs(candidate.threads, size_mib=256, repeats=5)
            bandwidth = self._bandwidth[candidate.threads]
            self._predictions[candidate.key] = predict(
                config, spec, workload, bandwidth, kernels=candidate.kernels, stored=stored
            )
        return self._predictions[candidate.key]

    def predict(self, candidate: Candidate) -> dict:
        p = self.prediction(candidate)
        return {
            "decode_tok_s": p.decode_tok_s,
            "prefill_tok_s": p.prefill_tok_s,
            "peak_rss_mib": p.peak_bytes / 2**20,
            "disk_bytes": p.weights_bytes,
        }

    # ---- building and loading ----------------------------------------------------------------------------

    def artifact(self, candidate: Candidate) -> Path:
        """The candidate's weights on disk: the source itself, or a quantized folder built once and reused."""
        spec = candidate.spec
        if spec.method == "layers":
            return self.pruned_artifact(candidate)
        if not spec.quantized:
            return Path(self.model)
        folder = self.work / "candidates" / spec.name
        exported = folder.with_suffix(".gguf") if spec.gguf_kquants else None
        if not (folder / "quantization.json").is_file() or (exported and not exported.is_file()):
            from leanlm.compress.pipelines import quantize_to_folder

            # Building holds a float32 copy of the model: let the bfloat16 baseline go meanwhile (it reloads when
            # next needed), so a 1.5B model's build fits beside other work (6 GB instead of 9)
            self._baseline = None
            gc.collect()
            if exported and not str(self.model).endswith(".gguf"):
                raise InvalidRequestError(
                    f"Format {spec.name} is written as GGUF from a GGUF source's metadata; {self.model} is not a "
                    "GGUF file. Leave it out of --formats."
                )
            quantize_to_folder(
                self.model,
                spec.quant_config(),
                folder,
                threads=candidate.threads,
                eval_tokens=0,
                progress=False,
                export_gguf=exported,
                gguf_kquants=spec.gguf_kquants,
            )
        return exported or folder

    def pruned_artifact(self, candidate: Candidate) -> Path:
        folder = self.work / "candidates" / candidate.spec.name
        if not (folder / "compression.json").is_file():
            from leanlm.compress.pipelines import prune_to_folder
            from leanlm.compress.prune.config import PruneConfig

            config = PruneConfig("layers", drop_layers=candidate.spec.drop_layers)
            prune_to_folder(self.model, config, folder, threads=candidate.threads, eval_tokens=0, progress=False)
        return folder

    def load_options(self, candidate: Candidate) -> dict:
        return {
            "dtype": candidate.spec.dtype,
            "dequantize": candidate.spec.method == "dense",
            "kernels": candidate.kernels,
        }

    def baseline(self):
        """The original as the reference: every weight dequantized, in bfloat16 (what `leanlm quantize` compares
        against)."""
        if self._baseline is None:
            from leanlm.engine.llm import LLM

            self._baseline = LLM(self.model, dtype="bfloat16", device="cpu", dequantize=True)
        return self._baseline

    # ---- measurements ------------------------------------------------------------------------------------

    def quality(self, candidate: Candidate) -> dict:
        from leanlm.engine.llm import LLM
        from leanlm.evaluate import evaluate

        path = self.artifact(candidate)
        llm = LLM(
            path, device="cpu", threads=candidate.threads, kv_cache=candidate.kv_cache, **self.load_options(candidate)
        )
        result = evaluate(
            llm,
            self.text,
            corpus="wiki (search half)",
            context=EVAL_CONTEXT,
            stride=EVAL_STRIDE,
            max_tokens=self.eval_tokens,
            baseline=self.baseline(),
            progress=self.progress,
        )
        disk = folder_bytes(path) if candidate.spec.method != "dense" else self.prediction(candidate).weights_bytes
        return {
            "kl_mean": result.kl_mean,
            "ppl_ratio": result.ppl_ratio,
            "top1_agreement": result.top1_agreement,
            "perplexity": result.perplexity,
            "eval_tokens": result.num_tokens,
            "disk_bytes": disk,
            "artifact": str(path),
        }

    def speed(self, candidate: Candidate) -> dict:
        from leanlm.bench.runner import BenchSpec, EngineSpec, run_sample

        path = self.artifact(candidate)
        options = {
            "kv_cache": candidate.kv_cache,
            "dequantize": candidate.spec.method == "dense",
            "kernels": candidate.kernels,
        }
        engine = EngineSpec("leanlm", candidate.spec.dtype, str(path), tuple(options.items()))
        spec = BenchSpec(str(path), [engine], candidate.threads, "cpu", self.prompt_tokens, self.gen_tokens)
        samples = [run_sample(spec, engine) for _ in range(self.speed_repetitions)]
        runs = [s["runs"][0] for s in samples]
        return {
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
            "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in runs),
            "peak_rss_mib": statistics.median(s["peak_rss_mib"] for s in samples),
            "speed_samples": len(samples),
            "precision": samples[0]["precision"],
        }
