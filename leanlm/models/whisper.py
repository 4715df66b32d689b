"""Whisper: an encoder-decoder Transformer over log-mel frames (OpenAI, 2022).

Encoder: two 1-D convolutions (the second with stride 2, so 3000 frames become 1500 positions), GELU, fixed
sinusoidal positions, pre-LayerNorm layers, final LayerNorm. Decoder: token embeddings plus learned positions,
layers with causal self-attention, cross-attention over the encoder output and a GELU MLP; the head is tied to
the token embeddings. Query, key and value projections are fused (keys carry no bias in Whisper: a zero bias).

Weights load from a transformers `WhisperForConditionalGeneration` state dict or from CTranslate2's model.bin
(faster-whisper's format). The decoder runs token steps over a `DecoderCache` whose rows are independent
requests (or beams) of different lengths, so a batch gives each row exactly its solo computation up to float
rounding. Cross-attention keys and values are computed once per request (`cross_kv`) and held read-only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.errors import ModelFormatError
from leanlm.kernels.threads import scoped_threads
from leanlm.layers.onednn_linear import onednn_linear_available, use_onednn
from leanlm.models.seq2seq import (
    SMALL_STEP_TOKENS,
    Attention,
    DecoderCache,
    DecodeStep,
    cross_attention,
    self_attention,
)


@dataclass(frozen=True)
class WhisperConfig:
    vocab_size: int = 51865
    num_mel_bins: int = 80
    d_model: int = 512
    encoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_layers: int = 6
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    max_source_positions: int = 1500
    max_target_positions: int = 448

    @classmethod
    def from_hf_dict(cls, raw: dict) -> WhisperConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in raw.items() if key in known})

    @property
    def n_audio_frames(self) -> int:
        return 2 * self.max_source_positions  # mel frames in one window: the conv stem halves them


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, decoder: bool):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, cross=False)
        if decoder:
            self.encoder_attn_layer_norm = nn.LayerNorm(dim)
            self.encoder_attn = Attention(dim, heads, cross=True)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


def sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's encoder positions: sin over the first half of the channels, cos over the second."""
    log_timescale = math.log(10000) / (channels // 2 - 1)
    inv = torch.exp(-log_timescale * torch.arange(channels // 2, dtype=torch.float32))
    scaled = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


class WhisperModel(nn.Module):
    def __init__(self, config: WhisperConfig):
        super().__init__()
        self.config = config
        dim = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.register_buffer("encoder_positions", sinusoids(config.max_source_positions, dim), persistent=True)
        self.encoder_layers = nn.ModuleList(
            Layer(dim, config.encoder_attention_heads, config.encoder_ffn_dim, decoder=False)
            for _ in range(config.encoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(dim)
        self.embed_tokens = nn.Embedding(config.vocab_size, dim)
        self.embed_positions = nn.Parameter(torch.zeros(config.max_target_positions, dim))
        self.decoder_layers = nn.ModuleList(
            Layer(dim, config.decoder_attention_heads, config.decoder_ffn_dim, decoder=True)
            for _ in range(config.decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(dim)

    # ---- encoder ----
    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, 3000) log-mel frames -> (B, 1500, d_model)."""
        if mel.shape[-2:] != (self.config.num_mel_bins, self.config.n_audio_frames):
            raise ValueError(
                f"Whisper's encoder takes (batch, {self.config.num_mel_bins}, {self.config.n_audio_frames}) "
                f"log-mel frames (30 s, padded), got {tuple(mel.shape)}"
            )
        mel = mel.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)  # (B, 1500, d)
        x = x + self.encoder_positions.to(x.dtype)
        for layer in self.encoder_layers:
            h = layer.self_attn_layer_norm(x)
            attn = layer.self_attn
            q, k, v = attn.qkv_proj(h).chunk(3, dim=-1)
            out = F.scaled_dot_product_attention(attn.split(q), attn.split(k), attn.split(v))
            x = x + attn.out_proj(attn.merge(out))
            x = x + layer.mlp(x)
        return self.encoder_norm(x)

    def cross_kv(self, encoder_output: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention keys and values, (B, H, 1500, hd) each: once per request."""
        result = []
        for layer in self.decoder_layers:
            attn = layer.encoder_attn
            k, v = attn.kv_proj(encoder_output).chunk(2, dim=-1)
            result.append((attn.split(k).contiguous(), attn.split(v).contiguous()))
        return result

    def new_cache(self, cross_kv, batch: int, capacity: int | None = None) -> DecoderCache:
        cfg = self.config
        return DecoderCache(
            cross_kv,
            capacity or cfg.max_target_positions,
            batch,
            cfg.decoder_attention_heads,
            cfg.d_model // cfg.decoder_attention_heads,
            self.embed_tokens.weight.dtype,
        )

    # ---- decoder ----
    def decode(
        self,
        tokens: torch.Tensor,
        cache: DecoderCache,
        rows: torch.Tensor | None = None,
        head_threads: int | None = None,
    ) -> torch.Tensor:
        """Append `tokens` (R, T) to cache rows `rows` (all rows when None; every row here advances by T) and
        return float32 logits (R, T, vocab). Row r's new tokens sit at positions lengths[r] .. lengths[r]+T-1.

        A step of a few tokens runs its layers on one thread: each op is too small to share, and an OpenMP
        barrier per op costs more than the op once the cores are busy (25 ms an op on a loaded 2-core machine).
        The vocabulary projection, the one large product, keeps the caller's threads (or `head_threads`)."""
        if tokens.numel() <= SMALL_STEP_TOKENS:
            with scoped_threads(1):
                hidden = self._decode_layers(tokens, cache, rows)
        else:
            hidden = self._decode_layers(tokens, cache, rows)
        with scoped_threads(head_threads):
            return vocabulary_logits(hidden, self.embed_tokens.weight)

    def _decode_layers(self, tokens: torch.Tensor, cache: DecoderCache, rows: torch.Tensor | None) -> torch.Tensor:
        step = DecodeStep.plan(cache, rows, tokens.shape[1], self.config.max_target_positions)
        x = self.embed_tokens(tokens) + self.embed_positions[step.positions]
        for index, layer in enumerate(self.decoder_layers):
            attn = layer.self_attn
            q, k, v = attn.qkv_proj(layer.self_attn_layer_norm(x)).chunk(3, dim=-1)
            out = self_attention(cache, index, step, attn.split(q), attn.split(k), attn.split(v))
            x = x + attn.out_proj(attn.merge(out))
            cross = layer.encoder_attn
            q = cross.split(cross.q_proj(layer.encoder_attn_layer_norm(x)))  # (R, H, T, hd)
            x = x + cross.out_proj(cross.merge(cross_attention(cache, index, step, q)))
            x = x + layer.mlp(x)
        step.finish(cache)
        return self.decoder_norm(x)


# ---- loading ----


def _fuse(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


def state_dict_from_hf(hf: dict[str, torch.Tensor], config: WhisperConfig) -> dict[str, torch.Tensor]:
    """Our names from transformers' WhisperForConditionalGeneration names (the `model.` prefix optional)."""
    hf = {name.removeprefix("model."): tensor for name, tensor in hf.items()}
    out = {
        "conv1.weight": hf["encoder.conv1.weight"],
        "conv1.bias": hf["encoder.conv1.bias"],
        "conv2.weight": hf["encoder.conv2.weight"],
        "conv2.bias": hf["encoder.conv2.bias"],
        "encoder_positions": hf["encoder.embed_positions.weight"],
        "encoder_norm.weight": hf["encoder.layer_norm.weight"],
        "encoder_norm.bias": hf["encoder.layer_norm.bias"],
        "embed_tokens.weight": hf["decoder.embed_tokens.weight"],
        "embed_positions": hf["decoder.embed_positions.weight"],
        "decoder_norm.weight": hf["decoder.layer_norm.weight"],
        "decoder_norm.bias": hf["decoder.layer_norm.bias"],
    }
    for side, count in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        for i in range(count):
            src, dst = f"{side}.layers.{i}.", f"{side}_layers.{i}."
            names = ["self_attn_layer_norm", "final_layer_norm", "fc1", "fc2", "self_attn.out_proj"]
            if side == "decoder":
                names += ["encoder_attn_layer_norm", "encoder_attn.out_proj", "encoder_attn.q_proj"]
            for name in names:
                out[dst + name + ".weight"] = hf[src + name + ".weight"]
                out[dst + name + ".bias"] = hf[src + name + ".bias"]
            attn = src + "self_attn."
            zero = torch.zeros_like(hf[attn + "q_proj.bias"])
            out[dst + "self_attn.qkv_proj.weight"] = _fuse(*(hf[f"{attn}{p}_proj.weight"] for p in "qkv"))
            out[dst + "self_attn.qkv_proj.bias"] = _fuse(hf[attn + "q_proj.bias"], zero, hf[attn + "v_proj.bias"])
            if side == "decoder":
                cross = src + "encoder_attn."
                out[dst + "encoder_attn.kv_proj.weight"] = _fuse(
                    hf[cross + "k_proj.weight"], hf[cross + "v_proj.weight"]
                )
                out[dst + "encoder_attn.kv_proj.bias"] = _fuse(zero, hf[cross + "v_proj.bias"])
    return out


def state_dict_from_ct2(variables: dict[str, torch.Tensor], config: WhisperConfig) -> dict[str, torch.Tensor]:
    """Our names from CTranslate2's WhisperSpec names (fused q/k/v as linear_0, k/v of cross-attention fused)."""
    v = variables
    out = {
        "conv1.weight": v["encoder/conv1/weight"],
        "conv1.bias": v["encoder/conv1/bias"],
        "conv2.weight": v["encoder/conv2/weight"],
        "conv2.bias": v["encoder/conv2/bias"],
        "encoder_positions": v["encoder/position_encodings/encodings"],
        "encoder_norm.weight": v["encoder/layer_norm/gamma"],
        "encoder_norm.bias": v["encoder/layer_norm/beta"],
        "embed_tokens.weight": v["decoder/embeddings/weight"],
        "embed_positions": v["decoder/position_encodings/encodings"],
        "decoder_norm.weight": v["decoder/layer_norm/gamma"],
        "decoder_norm.bias": v["decoder/layer_norm/beta"],
    }

    def linear(dst: str, src: str):
        out[dst + ".weight"] = v[src + "/weight"]
        out[dst + ".bias"] = v[src + "/bias"]

    def norm(dst: str, src: str):
        out[dst + ".weight"] = v[src + "/gamma"]
        out[dst + ".bias"] = v[src + "/beta"]

    for side, count in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        for i in range(count):
            src, dst = f"{side}/layer_{i}/", f"{side}_layers.{i}."
            norm(dst + "self_attn_layer_norm", src + "self_attention/layer_norm")
            linear(dst + "self_attn.qkv_proj", src + "self_attention/linear_0")
            linear(dst + "self_attn.out_proj", src + "self_attention/linear_1")
            norm(dst + "final_layer_norm", src + "ffn/layer_norm")
            linear(dst + "fc1", src + "ffn/linear_0")
            linear(dst + "fc2", src + "ffn/linear_1")
            if side == "decoder":
                norm(dst + "encoder_attn_layer_norm", src + "attention/layer_norm")
                linear(dst + "encoder_attn.q_proj", src + "attention/linear_0")
                linear(dst + "encoder_attn.kv_proj", src + "attention/linear_1")
                linear(dst + "encoder_attn.out_proj", src + "attention/linear_2")
    return out


def config_from_ct2(variables: dict[str, torch.Tensor]) -> WhisperConfig:
    def count(side: str) -> int:
        parts = {name.split("/")[1] for name in variables if name.startswith(f"{side}/layer_")}
        return sum(1 for part in parts if part.removeprefix("layer_").isdigit())

    embeddings = variables["decoder/embeddings/weight"]
    conv1 = variables["encoder/conv1/weight"]
    return WhisperConfig(
        vocab_size=embeddings.shape[0],
        num_mel_bins=conv1.shape[1],
        d_model=embeddings.shape[1],
        encoder_layers=count("encoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"].item()),
        decoder_layers=count("decoder"),
        decoder_attention_heads=int(variables["decoder/num_heads"].item()),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
    )


def vocabulary_logits(hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """hidden @ embedding^T in float32. Several float32 rows go to oneDNN (3x MKL's AVX2 sgemm on AMD at 5 rows x
    51865 words); a single row stays on torch's matmul, which is faster there."""
    if hidden.dtype == torch.float32 and hidden.shape[:-1].numel() > 1 and onednn_linear_available():
        return torch.ops.mkldnn._linear_pointwise(hidden.contiguous(), embedding, None, "none", [], "")
    return (hidden @ embedding.t()).float()


def build(config: WhisperConfig, state: dict[str, torch.Tensor], dtype: torch.dtype) -> WhisperModel:
    with torch.device("meta"):
        model = WhisperModel(config)
    model = model.to_empty(device="cpu")
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise ModelFormatError(f"the Whisper checkpoint lacks {sorted(missing)[:5]}: is it a complete Whisper model?")
    model.load_state_dict({name: t.to(dtype) for name, t in state.items()}, strict=True, assign=True)
    # on AMD CPUs torch's F.linear runs MKL's AVX2 sgemm; oneDNN's AVX-512 kernels did Whisper base's encoder
    # products 2.4-3.2x faster
    for layer in [*model.encoder_layers, *model.decoder_layers]:
        use_onednn(layer)
    return model.eval()


def load_whisper(path: str | Path, dtype: torch.dtype = torch.float32) -> WhisperModel:
    """A Whisper model from a CTranslate2 folder (model.bin) or a transformers folder (config.json + safetensors)."""
    from leanlm.formats.ctranslate2 import read_model_bin

    path = Path(path)
    if (path / "model.bin").is_file():
        ct2 = read_model_bin(path)
        if ct2.name != "WhisperSpec":
            raise ModelFormatError(f"{path}/model.bin holds a CTranslate2 {ct2.name}, not a Whisper model.")
        config = config_from_ct2(ct2.variables)
        return build(config, state_dict_from_ct2(ct2.variables, config), dtype)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelFormatError(
            f"{path} is neither a CTranslate2 Whisper folder (model.bin) nor a transformers one (config.json)."
        )
    raw = json.loads(config_file.read_text())
    if raw.get("model_type") != "whisper":
        raise ModelFormatError(f"{config_file} has model_type {raw.get('model_type')!r}, not 'whisper'.")
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{path} has no *.safetensors weights.")
    hf: dict[str, torch.Tensor] = {}
    for file in files:
        hf.update(load_file(str(file)))
    config = WhisperConfig.from_hf_dict(raw)
    return build(config, state_dict_from_hf(hf, config), dtype)


def state_dict_to_hf(model: WhisperModel) -> dict[str, torch.Tensor]:
    """transformers' WhisperForConditionalGeneration names from ours (q/k/v unfused; the key bias dropped)."""
    ours, config = model.state_dict(), model.config
    dim = config.d_model
    out = {"proj_out.weight": ours["embed_tokens.weight"]}
    for hf_name, name in (
        ("encoder.conv1", "conv1"),
        ("encoder.conv2", "conv2"),
        ("encoder.layer_norm", "encoder_norm"),
        ("decoder.layer_norm", "decoder_norm"),
    ):
        out[f"model.{hf_name}.weight"], out[f"model.{hf_name}.bias"] = ours[f"{name}.weight"], ours[f"{name}.bias"]
    out["model.encoder.embed_positions.weight"] = ours["encoder_positions"]
    out["model.decoder.embed_tokens.weight"] = ours["embed_tokens.weight"]
    out["model.decoder.embed_positions.weight"] = ours["embed_positions"]
    for side, count in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        for i in range(count):
            src, dst = f"{side}_layers.{i}.", f"model.{side}.layers.{i}."
            names = ["self_attn_layer_norm", "final_layer_norm", "fc1", "fc2", "self_attn.out_proj"]
            if side == "decoder":
                names += ["encoder_attn_layer_norm", "encoder_attn.out_proj", "encoder_attn.q_proj"]
            for name in names:
                out[dst + name + ".weight"], out[dst + name + ".bias"] = (
                    ours[src + name + ".weight"],
                    ours[src + name + ".bias"],
                )
            q, k, v = ours[src + "self_attn.qkv_proj.weight"].split(dim)
            qb, _, vb = ours[src + "self_attn.qkv_proj.bias"].split(dim)
            out.update(
                {
                    dst + "self_attn.q_proj.weight": q,
                    dst + "self_attn.k_proj.weight": k,
                    dst + "self_attn.v_proj.weight": v,
                    dst + "self_attn.q_proj.bias": qb,
                    dst + "self_attn.v_proj.bias": vb,
                }
            )
            if side == "decoder":
                k, v = ours[src + "encoder_attn.kv_proj.weight"].split(dim)
                _, vb = ours[src + "encoder_attn.kv_proj.bias"].split(dim)
                out.update(
                    {
                        dst + "encoder_attn.k_proj.weight": k,
                        dst + "encoder_attn.v_proj.weight": v,
                        dst + "encoder_attn.v_proj.bias": vb,
                    }
                )
    return out
