"""Load an encoder folder (HF config.json + safetensors + tokenizer.json) by path or known name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer as BackendTokenizer

from leanlm.embed.precision import apply_precision, calibration_batches
from leanlm.errors import ModelFormatError
from leanlm.formats.loader import locate_checkpoint, read_hf_folder
from leanlm.models.encoder import EncoderConfig, TextEncoder
from leanlm.models.encoders import load_encoder


@dataclass
class LoadedEncoder:
    path: Path
    config: EncoderConfig
    encoder: TextEncoder
    tokenizer: BackendTokenizer  # the raw `tokenizers` object: batches, pairs and truncation are ours to set


def load_encoder_folder(model: str | Path, precision: str = "float32") -> LoadedEncoder:
    kind, path = locate_checkpoint(model)
    if kind != "hf":
        raise ModelFormatError(
            f"{path} is a GGUF file; encoders load from a Hugging Face folder (config.json + *.safetensors + "
            "tokenizer.json), e.g. --model all-minilm-l6-v2."
        )
    folder = read_hf_folder(path, torch.float32)
    config, encoder = load_encoder(folder.raw_config, folder.weights)
    backend = folder.tokenizer.backend
    backend.no_padding()  # tokenizer.json may fix padding and truncation (MiniLM's: 128); we batch and cut ourselves
    backend.no_truncation()
    calibrate = precision == "int8"
    calibration = (
        calibration_batches(backend, config.pad_token_id, max_tokens=min(128, config.max_tokens)) if calibrate else None
    )
    return LoadedEncoder(path, config, apply_precision(encoder, precision, calibration), backend)
