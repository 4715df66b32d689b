"""What encoder families share: their config, a post-norm bidirectional Transformer layer, and the module tree.

Encoders (BERT, XLM-RoBERTa) read whole texts at once: attention is bidirectional with a padding mask, never
causal, and they need no KV cache or engine. A family file (bert.py, xlm_roberta.py) parses its config and maps
its tensor names onto this tree; `TextEncoder.forward` returns the last hidden states (B, T, H).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.errors import ModelFormatError
from leanlm.kernels.threads import map_single_threaded, scoped_threads
from leanlm.layers.attention import reference_attention

# HF hidden_act names -> the function (erf GELU is BERT's; the tanh approximation is "gelu_new").
ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "swish": F.silu,  # Marian's default
    "silu": F.silu,
}


@dataclass(frozen=True)
class EncoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int
    # Position ids start here: 0 for BERT; pad_token_id + 1 for RoBERTa-style models, which count only real tokens.
    position_offset: int = 0
    num_labels: int = 0  # a classification head's outputs (cross-encoders); 0 = no head
    head: str = "none"  # "none", "bert" (pooler + classifier) or "roberta" (dense + out_proj on <s>)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ModelFormatError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_heads}; "
                "the config.json is inconsistent."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ModelFormatError(
                f"hidden_act {self.hidden_act!r} is not supported by leanlm's encoders "
                f"(supported: {', '.join(ACTIVATIONS)})."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_tokens(self) -> int:
        """The longest input the position table allows (RoBERTa loses the offset's slots)."""
        return self.max_position_embeddings - self.position_offset


def encoder_config_from_hf(raw: dict, position_offset: int, head: str) -> EncoderConfig:
    try:
        architectures = raw.get("architectures") or []
        classifier = any(name.endswith("ForSequenceClassification") for name in architectures)
        labels = len(raw.get("id2label") or {}) or int(raw.get("num_labels", 0) or 0)
        return EncoderConfig(
            model_type=raw["model_type"],
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=int(raw["num_attention_heads"]),
            intermediate_size=int(raw["intermediate_size"]),
            max_position_embeddings=int(raw["max_position_embeddings"]),
            type_vocab_size=int(raw.get("type_vocab_size", 2)),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            hidden_act=raw.get("hidden_act", "gelu"),
            pad_token_id=int(raw.get("pad_token_id") or 0),
            position_offset=position_offset,
            num_labels=(labels or 2) if classifier else 0,
            head=head if classifier else "none",
        )
    except KeyError as exc:
        raise ModelFormatError(f"config.json lacks {exc.args[0]!r}, which an encoder needs.") from exc


# Up to this many tokens leanlm's attention kernel (kernels/csrc/encoder_attention.cpp, whole heads per thread)
# beat torch's SDPA on all-MiniLM-L6-v2's heads (12 x 32), 2 threads: 3.7x at 12 tokens, 1.5x at 128; SDPA's
# blocked flash kernel wins at 256.
SHORT_ATTENTION_TOKENS = 128


class EncoderLayer(nn.Module):
    """Post-norm layer: x = LN(x + attn(x)); x = LN(x + down(act(up(x)))). q/k/v are one fused projection."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.up = nn.Linear(h, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, h)
        self.mlp_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.act = ACTIVATIONS[config.hidden_act]
        self.reference = False  # True: the attention formula written out (the fast path's reference)
        self.up_applies_act = False  # True once `up` computes act(up(x)) itself (a fused oneDNN post-op)
        self.adds_residual = False  # True once attn_out / down take the residual to add (oneDNN's binary post-op)
        self.short_attention = False  # True: float32 texts up to SHORT_ATTENTION_TOKENS use leanlm's attention kernel

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """mask: (B, 1, 1, T) True for real keys, or None when every key is real (SDPA's faster unmasked path)."""
        b, t, h = x.shape
        qkv = self.qkv(x)
        if self.short_attention and t <= SHORT_ATTENTION_TOKENS and qkv.dtype == torch.float32 and not self.reference:
            context = torch.ops.leanlm_encoder.attention(qkv, self.num_heads, None if mask is None else mask.view(b, t))
            return self._feed_forward(context, x)
        q, k, v = qkv.view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, d)
        if self.reference:  # the formula reads a missing mask as causal: spell out "every key"
            full = torch.ones(b, 1, 1, t, dtype=torch.bool, device=x.device)
            context = reference_attention(q, k, v, full if mask is None else mask)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self._feed_forward(context.transpose(1, 2).reshape(b, t, h), x)

    def _feed_forward(self, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The rest of the layer after attention: context (B, T, H) with the heads side by side."""
        x = self.attn_norm(self._plus(self.attn_out, context, x))
        hidden = self.up(x) if self.up_applies_act else self.act(self.up(x))
        return self.mlp_norm(self._plus(self.down, hidden, x))

    def _plus(self, linear: nn.Module, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return linear(h, residual) if self.adds_residual else residual + linear(h)


class TextEncoder(nn.Module):
    """Embeddings (word + position + token type, then LayerNorm) and the layers; an optional classifier head."""

    # Tokens one pass through the layers takes at most. Above about 32 MiB (8192 tokens x 1536 floats) every
    # intermediate is a fresh mmap whose pages fault in on first touch: on all-MiniLM-L6-v2, 32 texts of 256 tokens
    # ran 1.8x faster (int8) and 1.15x (float32) in slices of 8 texts than in one pass.
    # Smaller slices stay in cache longer: 512 tokens ran int8 7% faster than 2048 (one thread's CPU time).
    tokens_per_pass = 512
    # True: with several torch threads, a batch's texts are split among them, each running the layers on one thread.
    # On the 2-vCPU EPYC, 32 texts of 12 tokens ran 1.4x (int8) to 2.4x (float32) faster so than with every op
    # split across both threads (which waits at a barrier after each of ~100 small ops a pass).
    text_parallel = True
    # Up to this many tokens in a batch, one thread runs it: its ops are too small to split. A 12-token text (int8)
    # used 1.8 ms of CPU time on one thread, where the quiet 2-thread benchmark took 4.2 ms wall-clock.
    single_thread_tokens = 64

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.embed_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        if config.head != "none":
            self.head_dense = nn.Linear(h, h)  # BERT's pooler / RoBERTa's classifier.dense: tanh(W x_cls + b)
            self.head_out = nn.Linear(h, config.num_labels)

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.config.position_offset == 0:
            return torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
        # RoBERTa numbers real tokens from pad_token_id + 1; padding keeps pad_token_id.
        mask = attention_mask.long()
        return torch.cumsum(mask, dim=1) * mask + self.config.pad_token_id

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids, attention_mask: (B, T) with 1 for real tokens -> last hidden states (B, T, H)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(self.position_ids(attention_mask))
            + self.token_type_embeddings(token_type_ids)
        )
        x = self.embed_norm(x).to(self.compute_dtype)
        real = attention_mask.bool()
        # Texts never see each other: a batch runs in slices whose activations stay small (see tokens_per_pass),
        # and with several threads, slices of texts go to one thread each (see text_parallel).
        texts, workers = x.shape[0], torch.get_num_threads() if self.text_parallel else 1
        if texts * x.shape[1] <= self.single_thread_tokens:
            with scoped_threads(1):
                return self._layers(x, real)
        slices = -(-texts * x.shape[1] // self.tokens_per_pass)
        if workers > 1 and texts > 1:
            slices = -(-max(slices, workers) // workers) * workers  # a whole number of slices per thread
        rows = -(-texts // max(1, min(slices, texts)))
        if rows >= texts:
            return self._layers(x, real)
        parts = [(x[i : i + rows], real[i : i + rows]) for i in range(0, texts, rows)]
        if workers > 1 and texts > 1:
            return torch.cat(map_single_threaded(lambda part: self._layers(*part), parts, workers))
        return torch.cat([self._layers(*part) for part in parts])

    def _layers(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        mask = real[:, None, None, :]  # (B, 1, 1, T): every query sees every real key
        if bool(mask.all()):
            mask = None
        for layer in self.layers:
            x = layer(x, mask)
        return x

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.layers[0].attn_norm.weight.dtype if self.layers else torch.float32

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, num_labels) logits from the first token, as HF's sequence classifiers do."""
        if self.config.head == "none":
            raise ModelFormatError("This encoder has no classification head; load a *ForSequenceClassification model.")
        first = torch.tanh(self.head_dense(hidden[:, 0]))
        return self.head_out(first).float()


def build_encoder(
    config: EncoderConfig, weights: dict[str, torch.Tensor], modules: dict[str, nn.Module] | None = None
) -> TextEncoder:
    """The module tree with `weights` (leanlm's names, see the families' `encoder_weights`) assigned, in float32;
    `modules` replace the layers' linear layers of those names (a quantized artifact's, already built)."""
    with torch.device("meta"):
        model = TextEncoder(config)
    for name, module in (modules or {}).items():
        model.set_submodule(name, module)
    replaced = tuple(f"{name}." for name in modules or {})
    expected = {name for name, _ in model.named_parameters() if not name.startswith(replaced)}
    missing, unexpected = expected - weights.keys(), weights.keys() - expected
    if missing or unexpected:
        raise ModelFormatError(
            f"The checkpoint does not match a {config.model_type} encoder: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}."
        )
    for name, tensor in weights.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        shape = getattr(module, attr).shape
        if tuple(tensor.shape) != tuple(shape):
            raise ModelFormatError(f"{name} has shape {tuple(tensor.shape)}, the config implies {tuple(shape)}.")
        setattr(module, attr, nn.Parameter(tensor.float().contiguous(), requires_grad=False))
    return model.eval()


def fuse_layer_weights(get, prefix: str, layer: int) -> dict[str, torch.Tensor]:
    """One layer's tensors in leanlm's names, from HF BERT-style names (`get(name)` reads one tensor)."""
    p = f"{prefix}encoder.layer.{layer}."
    out = f"layers.{layer}."
    parts = {
        "qkv.weight": torch.cat([get(f"{p}attention.self.{n}.weight") for n in ("query", "key", "value")]),
        "qkv.bias": torch.cat([get(f"{p}attention.self.{n}.bias") for n in ("query", "key", "value")]),
        "attn_out.weight": get(f"{p}attention.output.dense.weight"),
        "attn_out.bias": get(f"{p}attention.output.dense.bias"),
        "attn_norm.weight": get(f"{p}attention.output.LayerNorm.weight"),
        "attn_norm.bias": get(f"{p}attention.output.LayerNorm.bias"),
        "up.weight": get(f"{p}intermediate.dense.weight"),
        "up.bias": get(f"{p}intermediate.dense.bias"),
        "down.weight": get(f"{p}output.dense.weight"),
        "down.bias": get(f"{p}output.dense.bias"),
        "mlp_norm.weight": get(f"{p}output.LayerNorm.weight"),
        "mlp_norm.bias": get(f"{p}output.LayerNorm.bias"),
    }
    return {out + name: tensor for name, tensor in parts.items()}


def embedding_weights(get, prefix: str) -> dict[str, torch.Tensor]:
    p = f"{prefix}embeddings."
    return {
        "word_embeddings.weight": get(f"{p}word_embeddings.weight"),
        "position_embeddings.weight": get(f"{p}position_embeddings.weight"),
        "token_type_embeddings.weight": get(f"{p}token_type_embeddings.weight"),
        "embed_norm.weight": get(f"{p}LayerNorm.weight"),
        "embed_norm.bias": get(f"{p}LayerNorm.bias"),
    }


def tensor_getter(hf: dict[str, torch.Tensor]):
    """Reads HF names, also from old checkpoints that call LayerNorm parameters gamma/beta."""

    def get(name: str) -> torch.Tensor:
        if name in hf:
            return hf[name]
        old = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        if old in hf:
            return hf[old]
        raise ModelFormatError(f"The checkpoint lacks the tensor {name!r}.")

    return get


def weight_prefix(hf: dict[str, torch.Tensor], candidates: tuple[str, ...]) -> str:
    """'' for a bare encoder's names, or the task model's prefix ('bert.', 'roberta.')."""
    for prefix in ("", *candidates):
        if f"{prefix}embeddings.word_embeddings.weight" in hf:
            return prefix
    raise ModelFormatError(
        f"No embeddings.word_embeddings.weight (bare or under {', '.join(candidates)}) in the checkpoint."
    )
