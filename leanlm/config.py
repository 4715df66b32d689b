"""Frozen, validated configuration: the model's shape (from config.json or GGUF metadata) and the engine's limits."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from leanlm.errors import InvalidRequestError, ModelFormatError


@dataclass(frozen=True)
class ModelConfig:
    """The shape every decoder family shares. Which model types exist, and what each family reads beyond these
    fields (kept in `extra`, in HF's key names), is decided in leanlm/models/ (registry and family modules)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    mlp_bias: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # original keys, kept for saving

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "context_length",
        ):
            if getattr(self, name) <= 0:
                raise ModelFormatError(f"Model config has {name}={getattr(self, name)}; it must be positive.")
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"Model config has {self.num_heads} attention heads and {self.num_kv_heads} key/value heads; "
                "the first must be a multiple of the second (grouped-query attention)."
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        per_layer = attn + mlp + 2 * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + self.hidden_size

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], **overrides: Any) -> ModelConfig:
        """The keys every family's config.json shares; a family passes what it reads differently as overrides."""
        try:
            num_heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            head_dim = raw.get("head_dim") or hidden // num_heads
            fields = dict(
                model_type=raw.get("model_type", "unknown"),
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
                head_dim=int(head_dim),
                context_length=int(raw.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_theta(raw)),
                rope_scaling=_rope_scaling(raw),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                extra=dict(raw),
            )
        except KeyError as exc:
            raise ModelFormatError(f"config.json lacks the key {exc}. The file is incomplete; restore it.") from exc
        return cls(**(fields | overrides))

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], model_type: str, **overrides: Any) -> ModelConfig:
        """The `{arch}.*` keys every family's GGUF shares; a family passes the rest as overrides."""
        arch = meta.get("general.architecture")

        def key(name: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{name}", default)
            if value is None:
                raise ModelFormatError(f"GGUF metadata lacks '{arch}.{name}'. The file is incomplete or corrupt.")
            return value

        num_heads = int(key("attention.head_count"))
        hidden = int(key("embedding_length"))
        head_dim = int(
            meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count") or hidden // num_heads
        )
        vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
        scaling = None
        scaling_type = meta.get(f"{arch}.rope.scaling.type")
        if scaling_type and scaling_type != "none":
            scaling = {"rope_type": scaling_type, "factor": float(meta.get(f"{arch}.rope.scaling.factor", 1.0))}
            if original := meta.get(f"{arch}.rope.scaling.original_context_length"):
                scaling["original_max_position_embeddings"] = int(original)
        fields = dict(
            model_type=model_type,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or num_heads),
            head_dim=head_dim,
            context_length=int(key("context_length")),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
        )
        return cls(**(fields | overrides))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _rope_theta(raw: dict[str, Any]) -> float:
    # transformers 5 moved rope settings into `rope_parameters`; older files have rope_theta at the top.
    params = raw.get("rope_parameters") or {}
    return params.get("rope_theta", raw.get("rope_theta", 10000.0))


def _rope_scaling(raw: dict[str, Any]) -> dict[str, Any] | None:
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters")
    if not scaling:
        return None
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    return {**scaling, "rope_type": rope_type}


@dataclass(frozen=True)
class EngineConfig:
    """Limits of the serving engine: how many requests and tokens one step may run, and the KV cache size."""

    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 512  # token budget of one step (prefill chunks + decode tokens)
    block_size: int = 16  # tokens per KV cache block
    kv_cache_memory: int | None = None  # bytes; None = a share of free memory, capped
    enable_prefix_caching: bool = True  # requests sharing a prompt prefix share its KV blocks
    num_kv_blocks: int | None = None  # exact block count, overriding kv_cache_memory (tests, experiments)
    # Speculative decoding (engine/speculative/): "ngram" (prompt lookup); "self:int4" (the model quantized to int4
    # drafts for itself), "self:N" (its first N layers draft), "self" (int4 for a dense model, else half the
    # layers); "draft:M" (model M, sharing the tokenizer, drafts); None = off.
    speculative: str | None = None
    num_speculative_tokens: int | None = None  # most tokens drafted per step; None: the method's (ngram 10, else 5)
    speculative_adaptive: bool = True  # each request tunes its draft length, down to none when it does not pay
    # Encoder-decoder models (Whisper): new encoder inputs one step may encode. Encoding a 30 s window costs as much
    # as many decoder steps, so admissions are spread out and running requests keep decoding (vLLM's encoder budget).
    max_encoder_inputs_per_step: int = 4

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_encoder_inputs_per_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"EngineConfig.{name} must be an integer >= 1, got {value!r}.")
        if self.kv_cache_memory is not None and (not isinstance(self.kv_cache_memory, int) or self.kv_cache_memory < 1):
            raise InvalidRequestError(
                f"kv_cache_memory must be a positive number of bytes (e.g. parse_size('2GiB')), "
                f"got {self.kv_cache_memory!r}."
            )
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 1):
            raise InvalidRequestError(f"num_kv_blocks must be an integer >= 1, got {self.num_kv_blocks!r}.")
        if self.speculative is not None:
            check_speculative(self.speculative)
        count = self.num_speculative_tokens
        if count is not None and (not isinstance(count, int) or not 1 <= count <= 32):
            raise InvalidRequestError(
                f"num_speculative_tokens must be an integer in 1..32, got {self.num_speculative_tokens!r}."
            )


SPECULATIVE_METHODS = "ngram, self, self:int4, self:N (N layers) or draft:MODEL"


def check_speculative(value: str) -> None:
    """Raise unless `value` names a speculative method: ngram, self, self:int4, self:N or draft:MODEL."""
    kind, colon, arg = str(value).partition(":")
    ok = (kind == "ngram" and not colon) or (kind == "draft" and arg.strip() != "")
    ok = ok or (kind == "self" and (not colon or arg == "int4" or (arg.isdigit() and int(arg) > 0)))
    if not ok:
        raise InvalidRequestError(f"Unknown speculative method {value!r}. Choose {SPECULATIVE_METHODS}.")


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 2**10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 2**20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 2**30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """'2GiB' -> 2147483648, '512MiB', '1.5GB', '1000000' (bytes). KiB/MiB/GiB are powers of 1024, KB/MB/GB of 1000."""
    if isinstance(text, int) and not isinstance(text, bool):
        number, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise InvalidRequestError(
                f"Cannot read the size {text!r}. Write a number with an optional unit, e.g. 2GiB, 512MiB or 1.5GB."
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _SIZE_UNITS[unit])
    if size < 1:
        raise InvalidRequestError(f"The size {text!r} is zero; give a positive size such as 512MiB.")
    return size
