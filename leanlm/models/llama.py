"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2): RMSNorm, RoPE, grouped-query attention, SwiGLU.

Self-contained: the module tree, and how HF and GGUF tensor names map onto it (`load_weights`).
q/k/v and gate/up are fused into one matrix each, so a decode step dispatches two matmuls fewer per layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.cache.kv_cache import KVCache
from leanlm.config import ModelConfig
from leanlm.errors import ModelFormatError
from leanlm.layers.attention import ATTENTION_BACKENDS
from leanlm.layers.quantized_linear import QuantizedLinear, QuantizedTensor
from leanlm.layers.rope import apply_rotary, inverse_frequencies


@dataclass
class ForwardContext:
    """What every layer of one forward pass shares."""

    cos: torch.Tensor  # (B, 1, T, D)
    sin: torch.Tensor
    cache: KVCache | None
    start: int  # cache column of the first input token
    mask: torch.Tensor | None  # (B, 1, T, S) True = may attend; None = plain causal
    attention: Callable
    # The engine's paged attention: attend(layer_index, q, k, v) stores k/v and attends; replaces cache + attention.
    attend: Callable | None = None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.fused = False  # leanlm's one-call kernel (float32 CPU); see set_fused_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return torch.ops.leanlm.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=False)
        self.fused = False

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, length, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qkv = qkv.transpose(1, 2)  # (B, H + 2 H_kv, T, D)
        rotated_heads = self.num_heads + self.num_kv_heads
        rotate = torch.ops.leanlm.rotary if self.fused else apply_rotary
        qk = rotate(qkv[:, :rotated_heads], ctx.cos, ctx.sin)  # one rotation for q and k together
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, rotated_heads:]
        if ctx.attend is not None:
            out = ctx.attend(self.layer_index, q, k, v)
        else:
            if ctx.cache is not None:
                k, v = ctx.cache.update(self.layer_index, ctx.start, k, v)
            # Attention runs in the cache's dtype (float32 on CPU, where bfloat16 attention kernels are ~5x slower).
            out = ctx.attention(q.to(k.dtype), k, v, ctx.mask)  # (B, H, T, D)
        out = out.to(x.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.down_proj(torch.ops.leanlm.silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # An explicit (meta) weight skips the random init, whose meta-device path imports torch._dynamo (~2 s).
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        inv_freq, self.rope_scale = inverse_frequencies(
            config.head_dim, config.rope_theta, config.rope_scaling, config.context_length, config.context_length
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_name, self.fused_ops = "sdpa", False
        self.attention = ATTENTION_BACKENDS["sdpa"]
        self.decoder_stack = None  # leanlm's one-call decoder layers; see set_fused_ops
        self._stack_version = None  # QuantizedLinear.runtime_version when decoder_stack was built

    def set_attention_backend(self, name: str) -> None:
        self.attention_name = name
        # With the fused kernels loaded, the fast path ("sdpa") takes leanlm's per-query attention kernel.
        self.attention = ATTENTION_BACKENDS["fused" if name == "sdpa" and self.fused_ops else name]

    def set_fused_ops(self, enabled: bool) -> None:
        """Run RMSNorm, RoPE, SiLU-gating and attention through leanlm's fused kernels (one dispatch
        each instead of 3-6). Needs leanlm.kernels.build.load_kernels() to have succeeded."""
        self.fused_ops = enabled
        for module in self.modules():
            if isinstance(module, RMSNorm | MLP | Attention):
                module.fused = enabled
        self.set_attention_backend(self.attention_name)
        self._refresh_decoder_stack()

    def _refresh_decoder_stack(self) -> None:
        """(Re)build the stack when kernel layouts changed since it was built (or in a copy of the model)."""
        self.decoder_stack = _build_decoder_stack(self) if self.fused_ops else None
        self._stack_version = QuantizedLinear.runtime_version

    def __getstate__(self) -> dict:
        # The stack is a C++ object over this model's tensors: a copy (deepcopy, pickle) builds its own.
        return {**super().__getstate__(), "decoder_stack": None, "_stack_version": None}

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
        attend: Callable | None = None,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: (B, T). Returns float32 logits (B, T, V), or (B, 1, V) with last_only,
        or (B, R, V) for the R columns in logits_indices. `attend` (paged attention) replaces cache/start/mask."""
        x = self.embed_tokens(input_ids)
        cos, sin = self._cos_sin(positions, x.dtype)
        if self._stack_version != QuantizedLinear.runtime_version:
            self._refresh_decoder_stack()
        layout = attend.layout() if self.decoder_stack is not None and hasattr(attend, "layout") else None
        if layout is not None and self.attention_name == "sdpa" and x.dtype == layout.keys.dtype == torch.float32:
            # the whole step in one C++ call (paged attention included), same bits as the loop below
            x = self.decoder_stack.forward(x[0], cos[0, 0], sin[0, 0], *layout[:4], layout.row_sequence, positions[0])
            x = x[None]
        else:
            ctx = ForwardContext(cos, sin, cache, start, mask, self.attention, attend)
            for layer in self.layers:
                x = layer(x, ctx)
        if last_only:
            x = x[:, -1:]
        elif logits_indices is not None:
            x = x[:, logits_indices]
        return self.lm_head(self.norm(x)).float()

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Computed once per forward from positions (no table): any context length, any position grid.
        angles = positions.unsqueeze(-1).float() * self.inv_freq  # (B, T, D/2)
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # (B, 1, T, D), rotate-half layout
        return (angles.cos() * self.rope_scale).to(dtype), (angles.sin() * self.rope_scale).to(dtype)

    # ---- weights -------------------------------------------------------------------------------------------

    def load_weights(self, weights: dict[str, torch.Tensor | QuantizedTensor], dtype: torch.dtype) -> None:
        """Take HF-named tensors (model.layers.N.self_attn.q_proj.weight, ...), fuse, and assign them.

        A QuantizedTensor weight turns its nn.Linear into a QuantizedLinear."""
        weights = {
            name.removeprefix("model."): tensor
            for name, tensor in weights.items()
            if not name.endswith("rotary_emb.inv_freq")
        }
        if (factors := weights.pop("rope_freq_factors", None)) is not None:
            # Llama 3.x GGUF files store their rope scaling as per-frequency divisors instead of metadata.
            self.inv_freq = self.inv_freq / factors.float().cpu()
        if "embed_tokens.weight" not in weights:
            raise ModelFormatError("The checkpoint has no token embedding; it is incomplete.")
        weights.setdefault("lm_head.weight", weights["embed_tokens.weight"])  # tied embeddings
        if isinstance(weights["embed_tokens.weight"], QuantizedTensor):  # a lookup table must be dense
            weights["embed_tokens.weight"] = weights["embed_tokens.weight"].dequantize(dtype)
        fused = _fuse_projections(weights)
        quantized = {name.removesuffix(".weight"): t for name, t in fused.items() if isinstance(t, QuantizedTensor)}
        for module_name, weight in quantized.items():
            bias = fused.pop(f"{module_name}.bias", None)
            self.set_submodule(module_name, QuantizedLinear(weight, bias))
            del fused[f"{module_name}.weight"]
        expected = dict(self.named_parameters())
        missing = sorted(set(expected) - set(fused))
        if missing:
            raise ModelFormatError(
                f"The checkpoint lacks {len(missing)} tensors, e.g. '{missing[0]}'. "
                "The file is incomplete or belongs to another architecture."
            )
        for name, param in expected.items():
            if fused[name].shape != param.shape:
                raise ModelFormatError(
                    f"Tensor '{name}' has shape {tuple(fused[name].shape)} but the config implies "
                    f"{tuple(param.shape)}. config and weights disagree."
                )
        self.load_state_dict(fused, strict=False, assign=True)
        if "lm_head" not in quantized and fused["lm_head.weight"] is fused["embed_tokens.weight"]:
            self.lm_head.weight = self.embed_tokens.weight


def _build_decoder_stack(model: LlamaForCausalLM):
    """All decoder layers as one C++ call (kernels/csrc/decoder_stack.cpp), when every projection runs leanlm's
    kernels with the same activation mode and every layer has the config's shapes; None otherwise (the module
    path runs)."""
    config = model.config
    shapes = (config.q_size + 2 * config.kv_size, config.hidden_size, 2 * config.intermediate_size, config.hidden_size)
    projections = [
        (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
        for layer in model.layers
    ]
    flat = [p for layer in projections for p in layer]
    if not flat or not all(isinstance(p, QuantizedLinear) and p.kernel.startswith("leanlm") for p in flat):
        return None
    modes = {p._int8_activations for p in flat}
    norms = [(layer.input_layernorm.weight, layer.post_attention_layernorm.weight) for layer in model.layers]
    if (
        len(modes) != 1
        or any(tuple(p.out_features for p in linears) != shapes for linears in projections)
        or any(w.dtype != torch.float32 for pair in norms for w in pair)
    ):
        return None
    stack = torch.classes.leanlm.DecoderStack(
        config.num_heads, config.num_kv_heads, config.head_dim, config.rms_norm_eps, config.head_dim**-0.5, *modes
    )
    none = torch.empty(0)
    for (input_norm, post_norm), linears in zip(norms, projections, strict=True):
        tensors = []
        for linear in linears:
            packed = linear._packed
            offsets = packed.offsets if packed.offsets is not None else none
            bias = linear.bias.detach().float() if linear.bias is not None else none
            tensors += [packed.codes, packed.scales, offsets, bias]
        stack.add_layer(input_norm.detach(), post_norm.detach(), tensors, list(shapes))
    return stack


def _fuse_projections(weights: dict) -> dict:
    """q/k/v -> qkv_proj and gate/up -> gate_up_proj (rows stacked), for dense and quantized weights alike."""
    fused = {}
    for name, tensor in weights.items():
        match = re.fullmatch(r"layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|gate|up)_proj\.(weight|bias)", name)
        if not match:
            fused[name] = tensor
            continue
        layer, block, proj, kind = match.groups()
        parts = ("q", "k", "v") if block == "self_attn" else ("gate", "up")
        if proj != parts[0]:
            continue
        target = "qkv_proj" if block == "self_attn" else "gate_up_proj"
        sources = [f"layers.{layer}.{block}.{p}_proj.{kind}" for p in parts]
        missing = [s for s in sources if s not in weights]
        if missing:
            raise ModelFormatError(f"The checkpoint lacks {missing[0]}; it is incomplete.")
        tensors = [weights[s] for s in sources]
        if all(isinstance(t, QuantizedTensor) for t in tensors) and len({(t.bits, t.group_size) for t in tensors}) == 1:
            fused[f"layers.{layer}.{block}.{target}.{kind}"] = QuantizedTensor.cat(tensors)
        else:  # mixed precisions (some GGUF files): run the fused matrix dense
            dense = [t.dequantize() if isinstance(t, QuantizedTensor) else t for t in tensors]
            fused[f"layers.{layer}.{block}.{target}.{kind}"] = torch.cat([t.to(dense[0].dtype) for t in dense])
    return fused


# GGUF tensor names -> HF names, for `general.architecture` llama / mistral / qwen2.
_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name_from_gguf(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for tensors leanlm derives itself."""
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if match:
        layer, short, kind = match.groups()
        return f"model.layers.{layer}.{_GGUF_NAMES[short]}.{kind}" if short in _GGUF_NAMES else None
    if name == "rope_freqs.weight":
        return "rope_freq_factors"
    stem, _, kind = name.rpartition(".")
    return f"{_GGUF_NAMES[stem]}.{kind}" if stem in _GGUF_NAMES else None


def unpermute_gguf_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter interleaves q/k rows for its rope layout; undo it to get HF's rotate-half layout."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def permute_gguf_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of unpermute_gguf_rope: HF's rotate-half rows back to llama.cpp's interleaved layout."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
