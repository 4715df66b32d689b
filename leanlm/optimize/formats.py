"""The search space: a table of weight formats leanlm can run, and a candidate = format x KV cache x threads.

A new format (a K-quant kernel, a new method) joins the search by adding one FormatSpec to FORMATS: the planner
probes its kernel on the model's shapes, the measurer builds it through `leanlm quantize`'s pipeline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from leanlm.errors import InvalidRequestError


@dataclass(frozen=True)
class FormatSpec:
    name: str
    method: str  # "source" (the checkpoint as given), "dense" (dequantized, at `dtype`), "layers" (layers
    # dropped from the source, which keeps its own precision) or a QuantConfig method
    bits: int = 16
    group_size: int = -1
    dtype: str = "bfloat16"  # dense tensors (and activations for dense formats)
    note: str = ""
    drop_layers: int = 0  # method "layers": decoder layers removed
    mixed: float = 0.0  # mixed precision: the most sensitive layers at 8 bits, at most this fraction larger
    embedding_bits: int = 8  # the token embedding (and a tied LM head on its codes) at this many bits
    gguf_kquants: bool = False  # shipped as a GGUF file in llama.cpp's K-quant types (Q4_K/Q6_K where rows allow)

    @property
    def quantized(self) -> bool:
        """Built by `leanlm quantize` (a QuantConfig method)."""
        return self.method not in ("source", "dense", "layers")

    @property
    def calibrated(self) -> bool:
        return self.method in ("gptq", "awq")

    def quant_config(self):
        from leanlm.compress.config import QuantConfig

        if not self.quantized:
            raise InvalidRequestError(f"Format {self.name} is not a quantization.")
        return QuantConfig(
            method=self.method,
            bits=self.bits,
            group_size=self.group_size,
            mixed=self.mixed,
            embedding_bits=self.embedding_bits,
        )

    def at_least_as_fine_as(self, other: FormatSpec) -> bool:
        """Same method with as many bits and groups as small or smaller: expected no worse in quality. The search
        skips `other` when a format at least as fine already failed the budget."""
        if self.method == other.method == "layers":
            return self.drop_layers <= other.drop_layers
        if not (self.quantized and other.quantized) or self.method != other.method:
            return False
        mine = self.group_size if self.group_size > 0 else 1 << 30
        theirs = other.group_size if other.group_size > 0 else 1 << 30
        if self.gguf_kquants != other.gguf_kquants:
            return False  # re-encoded to other blocks: no order between them
        return (
            self.bits >= other.bits
            and mine <= theirs
            and self.mixed >= other.mixed
            and self.embedding_bits >= other.embedding_bits
        )

    def to_dict(self) -> dict:
        return asdict(self)


FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec("source", "source", note="the checkpoint as given (a GGUF runs at its own precision)"),
        FormatSpec("bf16", "dense", note="every weight dequantized to bfloat16"),
        FormatSpec("int8", "int8", 8, -1, note="round-to-nearest, symmetric, per channel"),
        FormatSpec("rtn4-g32", "int4", 4, 32, note="round-to-nearest, 4 bits, groups of 32"),
        FormatSpec("rtn4-g128", "int4", 4, 128, note="round-to-nearest, 4 bits, groups of 128"),
        FormatSpec("gptq4-g32", "gptq", 4, 32, note="GPTQ on c4 text, 4 bits, groups of 32"),
        FormatSpec("gptq4-g128", "gptq", 4, 128, note="GPTQ on c4 text, 4 bits, groups of 128"),
        FormatSpec("awq4-g32", "awq", 4, 32, note="AWQ on c4 text, 4 bits, groups of 32"),
        FormatSpec("awq4-g128", "awq", 4, 128, note="AWQ on c4 text, 4 bits, groups of 128"),
        FormatSpec("gptq3-g32", "gptq", 3, 32, note="GPTQ on c4 text, 3 bits (4-bit kernel), groups of 32"),
        FormatSpec(
            "rtn4-g32-mix10", "int4", 4, 32, mixed=0.1, note="RTN 4 bits g32, the layers most sensitive (KL) at 8: +10%"
        ),
        FormatSpec(
            "gptq4-g32-mix10", "gptq", 4, 32, mixed=0.1, note="GPTQ 4 bits g32, the most sensitive layers at 8: +10%"
        ),
        FormatSpec(
            "gptq4-g128-mix10", "gptq", 4, 128, mixed=0.1, note="GPTQ 4 bits g128, the most sensitive at 8: +10%"
        ),
        FormatSpec(
            "rtn4-g32-emb4", "int4", 4, 32, embedding_bits=4, note="RTN 4 bits g32, embedding and tied head at 4 bits"
        ),
        FormatSpec(
            "gptq4-g32-emb4", "gptq", 4, 32, embedding_bits=4, note="GPTQ 4 bits g32, embedding and tied head at 4"
        ),
        FormatSpec(
            "rtn4-g32-q4k",
            "int4",
            4,
            32,
            gguf_kquants=True,
            note="RTN 4 bits g32 as a GGUF file for llama.cpp: Q4_K where rows allow (others Q4_1), Q8_0 embedding",
        ),
        FormatSpec(
            "gptq4-g32-q4k", "gptq", 4, 32, gguf_kquants=True, note="GPTQ 4 bits g32 as a GGUF file in K-quant types"
        ),
        FormatSpec("drop2", "layers", note="the 2 least useful decoder layers removed (scored on c4)", drop_layers=2),
    )
}
KV_CACHE_TYPES = ("auto", "int8")
# How leanlm's kernels meet their activations: rounded (auto: int8 per block for quantized weights, bfloat16 for
# 16-bit ones, as llama.cpp) or float32 (exact: the weights' own quality, no activation rounding)
KERNEL_MODES = ("auto", "exact")


@dataclass(frozen=True)
class Candidate:
    format: str
    kv_cache: str = "auto"
    threads: int = 2
    kernels: str = "auto"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise InvalidRequestError(f"Unknown format '{self.format}'. Choose among: {', '.join(FORMATS)}.")
        if self.kv_cache not in KV_CACHE_TYPES:
            raise InvalidRequestError(f"Unknown KV cache '{self.kv_cache}'. Choose among: {', '.join(KV_CACHE_TYPES)}.")
        if self.kernels not in KERNEL_MODES:
            raise InvalidRequestError(f"Unknown kernel mode '{self.kernels}'. Choose among: {', '.join(KERNEL_MODES)}.")
        if self.threads < 1:
            raise InvalidRequestError(f"threads must be >= 1, got {self.threads}.")

    @property
    def spec(self) -> FormatSpec:
        return FORMATS[self.format]

    @property
    def key(self) -> str:
        """A stable name: the on-disk cache's key and the candidate's folder name."""
        key = f"{self.format}.kv-{self.kv_cache}.t{self.threads}"
        return key if self.kernels == "auto" else f"{key}.k-{self.kernels}"  # auto: the keys of earlier runs

    def to_dict(self) -> dict:
        return asdict(self)


def parse_formats(text: str | None) -> list[str]:
    names = list(FORMATS) if not text else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise InvalidRequestError(f"Unknown format(s) {', '.join(unknown)}. Choose among: {', '.join(FORMATS)}.")
    return names


def candidates(
    formats: list[str], kv_caches: list[str], threads: list[int], kernels: list[str] | None = None
) -> list[Candidate]:
    return [Candidate(f, kv, t, k) for f in formats for kv in kv_caches for t in threads for k in kernels or ["auto"]]
