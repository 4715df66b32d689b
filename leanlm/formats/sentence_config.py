"""The sentence-transformers files of a model folder: what turns token states into one embedding.

modules.json lists the pipeline (Transformer, Pooling, Dense..., Normalize); sentence_bert_config.json holds
max_seq_length; each Pooling / Dense folder holds its own config.json (and a Dense layer its weights). A folder
without modules.json gets sentence-transformers' default for a plain HF model: mean pooling, no normalization.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from leanlm.errors import ModelFormatError

POOLING_MODES = ("mean", "cls", "max", "lasttoken", "mean_sqrt_len_tokens")
# sentence-transformers' legacy flags in Pooling/config.json, in its concatenation order.
_LEGACY_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_lasttoken": "lasttoken",
}
DENSE_ACTIVATIONS = {
    "torch.nn.modules.activation.Tanh": torch.tanh,
    "torch.nn.modules.linear.Identity": lambda x: x,
    "torch.nn.modules.activation.ReLU": torch.relu,
    "torch.nn.modules.activation.Sigmoid": torch.sigmoid,
}


@dataclass
class DenseLayer:
    weight: torch.Tensor  # (out, in)
    bias: torch.Tensor | None
    activation: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return DENSE_ACTIVATIONS[self.activation](torch.nn.functional.linear(x, self.weight, self.bias))


@dataclass
class SentencePipeline:
    pooling: tuple[str, ...] = ("mean",)  # several modes are concatenated, as sentence-transformers does
    dense: list[DenseLayer] = field(default_factory=list)
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    from_modules_json: bool = False


def read_sentence_pipeline(folder: Path) -> SentencePipeline:
    pipeline = SentencePipeline()
    config = _read_json(folder / "sentence_bert_config.json")
    if "max_seq_length" in config:
        pipeline.max_seq_length = int(config["max_seq_length"])
    pipeline.do_lower_case = bool(config.get("do_lower_case", False))
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return pipeline
    pipeline.from_modules_json = True
    modules = _read_json(modules_file)
    if not isinstance(modules, list):
        raise ModelFormatError(f"{modules_file} should be a list of modules.")
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        path = folder / module.get("path", "")
        if kind == "Transformer":
            continue
        if kind == "Pooling":
            pipeline.pooling = _pooling_modes(_read_json(path / "config.json"), path)
        elif kind == "Dense":
            pipeline.dense.append(_read_dense(path))
        elif kind == "Normalize":
            pipeline.normalize = True
        else:
            raise ModelFormatError(
                f"{modules_file} names the module {module.get('type')!r}, which leanlm does not run "
                "(supported: Transformer, Pooling, Dense, Normalize)."
            )
    return pipeline


def _pooling_modes(config: dict, path: Path) -> tuple[str, ...]:
    if "pooling_mode" in config:  # sentence-transformers >= 5 writes one mode (or a list)
        raw = config["pooling_mode"]
        modes = tuple(raw if isinstance(raw, list) else [raw])
    else:
        modes = tuple(mode for flag, mode in _LEGACY_POOLING_FLAGS.items() if config.get(flag))
    modes = tuple("cls" if m == "cls_token" else m for m in modes)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if not modes or unknown:
        raise ModelFormatError(
            f"{path / 'config.json'}: pooling {list(modes) or 'none'} is not supported "
            f"(supported: {', '.join(POOLING_MODES)})."
        )
    if config.get("include_prompt") is False:
        raise ModelFormatError(f"{path / 'config.json'}: include_prompt=false (instruction models) is not supported.")
    return modes


def _read_dense(path: Path) -> DenseLayer:
    config = _read_json(path / "config.json")
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation not in DENSE_ACTIVATIONS:
        raise ModelFormatError(
            f"{path / 'config.json'}: Dense activation {activation!r} is not supported "
            f"(supported: {', '.join(DENSE_ACTIVATIONS)})."
        )
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        tensors = load_file(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        tensors = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ModelFormatError(f"{path} (a Dense module) has no model.safetensors or pytorch_model.bin.")
    if "linear.weight" not in tensors:
        raise ModelFormatError(f"{path}'s weights lack linear.weight.")
    bias = tensors.get("linear.bias")
    return DenseLayer(tensors["linear.weight"].float(), None if bias is None else bias.float(), activation)


def _read_json(path: Path):
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path} is not valid JSON ({exc}). Restore the file.") from exc
