"""Load an encoder folder (HF config.json + safetensors + tokenizer.json) by path or known name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer as BackendTokenizer

from leanlm.embed.artifact import is_encoder_artifact, read_encoder_artifact
from leanlm.embed.precision import apply_precision, calibration_batches
from leanlm.errors import InvalidRequestError, ModelFormatError
from leanlm.formats.loader import locate_checkpoint, read_hf_config, read_hf_folder
from leanlm.formats.tokenizer import Tokenizer
from leanlm.models.encoder import EncoderConfig, TextEncoder
from leanlm.models.encoders import load_encoder


@dataclass
class LoadedEncoder:
    path: Path
    config: EncoderConfig
    encoder: TextEncoder
    tokenizer: BackendTokenizer  # the raw `tokenizers` object: batches, pairs and truncation are ours to set
    precision: str = "float32"


def load_encoder_folder(model: str | Path, precision: str = "float32") -> LoadedEncoder:
    """`precision` of the linear layers; a quantized artifact (embed/artifact.py) loads in its own precision,
    which "float32" (the default) or its own name asks for."""
    kind, path = locate_checkpoint(model)
    if kind != "hf":
        raise ModelFormatError(
            f"{path} is a GGUF file; encoders load from a Hugging Face folder (config.json + *.safetensors + "
            "tokenizer.json), e.g. --model all-minilm-l6-v2."
        )
    if is_encoder_artifact(path):
        return _load_artifact(path, precision)
    folder = read_hf_folder(path, torch.float32)
    config, encoder = load_encoder(folder.raw_config, folder.weights)
    backend = folder.tokenizer.backend
    backend.no_padding()  # tokenizer.json may fix padding and truncation (MiniLM's: 128); we batch and cut ourselves
    backend.no_truncation()
    calibrate = precision == "int8"
    calibration = (
        calibration_batches(backend, config.pad_token_id, max_tokens=min(128, config.max_tokens)) if calibrate else None
    )
    return LoadedEncoder(path, config, apply_precision(encoder, precision, calibration), backend, precision)


def _load_artifact(path: Path, precision: str) -> LoadedEncoder:
    config, encoder, stored = read_encoder_artifact(path, read_hf_config(path))
    if precision not in ("float32", stored):
        raise InvalidRequestError(
            f"{path} is an encoder quantized to {stored} by `leanlm quantize`; it runs in {stored} only. Leave the "
            f"precision out, or load the original model for {precision}."
        )
    return LoadedEncoder(path, config, encoder, _backend_tokenizer(path), stored)


def _backend_tokenizer(path: Path) -> BackendTokenizer:
    backend = Tokenizer.from_folder(path).backend
    backend.no_padding()
    backend.no_truncation()
    return backend


def encoder_role(model) -> str | None:
    """ "embedding" or "rerank" when `model` names an encoder (a known embedding model, or an HF folder whose
    model_type is an encoder family; a *ForSequenceClassification one reranks), else None (e.g. a generator)."""
    import json

    from leanlm.formats.assets import KNOWN_MODELS
    from leanlm.models.encoders import ENCODER_FAMILIES

    if model is None:
        return None
    path = Path(model)
    if not path.exists():
        known = KNOWN_MODELS.get(str(model))
        return "embedding" if known is not None and known.family in ENCODER_FAMILIES else None
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        return None
    raw = json.loads(config.read_text())
    if raw.get("model_type") not in ENCODER_FAMILIES:
        return None
    classifier = any(name.endswith("ForSequenceClassification") for name in raw.get("architectures") or [])
    return "rerank" if classifier else "embedding"
