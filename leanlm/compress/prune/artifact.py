"""Write a pruned model: config.json (the new shapes), tokenizer files, model.safetensors and compression.json.

Sparse projections (unstructured and N:M methods) are stored as bitmap + nonzero values (formats/sparse_folder.py);
structurally pruned models are ordinary dense folders. Written atomically (compress/artifact.py), and the
measurements in compression.json are taken on the folder as written, loaded the way a user loads it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from torch import nn

from leanlm.compress.artifact import atomic_folder, hf_config_dict, write_quantized
from leanlm.formats.sparse_folder import MANIFEST, pack_sparse
from leanlm.layers.quantized_linear import QuantizedLinear


def save_pruned(
    llm,
    folder: str | Path,
    manifest: dict,
    sparse: bool,
    measure: Callable[[Path], dict] | None = None,
    quantization: dict | None = None,
) -> Path:
    """Write `llm`'s model to `folder`. `sparse`: store the decoder projections compactly. `measure(path)` runs on
    the finished folder before it takes its final name; its result joins the manifest. A model with quantized
    layers (requantize.py) is written as a quantized artifact with `quantization` as its quantization.json, plus
    compression.json."""
    from safetensors.torch import save_file

    model = llm.model
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        with atomic_folder(folder) as scratch:
            write_quantized(llm, scratch, quantization or {})
            _write_manifest(scratch, {**manifest, "sparse_layers": {}}, measure)
        return Path(folder)
    tied = model.lm_head.weight is model.embed_tokens.weight
    sparse_names = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    sparse_names = {name for name in sparse_names if name.startswith("layers.")} if sparse else set()
    with atomic_folder(folder) as scratch:
        tensors, sparse_layers = {}, {}
        for name, tensor in model.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            if tied and name == "lm_head.weight":
                continue  # config.json says tied; the loader ties it back
            if name in sparse_names:
                stem = name.removesuffix(".weight")
                tensors[f"{stem}.mask"], tensors[f"{stem}.values"] = pack_sparse(tensor)
                sparse_layers[stem] = {"shape": list(tensor.shape)}
            else:
                tensors[name] = tensor
        save_file(tensors, scratch / "model.safetensors", metadata={"format": "leanlm"})
        config = hf_config_dict(llm.config) | {"tie_word_embeddings": tied}
        (scratch / "config.json").write_text(json.dumps(config, indent=2))
        llm.tokenizer.to_folder_files(scratch)
        _write_manifest(scratch, {**manifest, "sparse_layers": sparse_layers}, measure)
    return Path(folder)


def _write_manifest(scratch: Path, manifest: dict, measure: Callable[[Path], dict] | None) -> None:
    (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if measure is not None:  # on the folder as written, so the manifest must already be there
        manifest |= measure(scratch)
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2))
