"""The on-disk form of a leanlm pruned model, reading side (compress/prune/artifact.py writes it).

A sparse matrix X (N, K) is stored as X.mask, a bitmap of its nonzeros (N, ceil(K / 8)) uint8, bit j % 8 of byte
j // 8 for column j, and X.values, the nonzeros in row-major order (nnz,). At 50% sparsity in bfloat16 that is
8 + 1 bits per weight instead of 16; a 2:4 pattern stored as values + 2-bit indices would take the same 9 bits, so
one format serves unstructured and N:M weights. compression.json lists the sparse matrices and their shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from leanlm.errors import ModelFormatError

MANIFEST = "compression.json"
_BITS = 1 << torch.arange(8, dtype=torch.uint8)  # (8,) bit j of a byte


def pack_sparse(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> (bitmap (N, ceil(K / 8)) uint8, nonzero values (nnz,) in the weight's dtype)."""
    rows, cols = weight.shape
    nonzero = weight != 0
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8)
    padded[:, :cols] = nonzero.to(torch.uint8)
    bitmap = (padded.view(rows, -1, 8) * _BITS).sum(-1, dtype=torch.uint8)  # (N, ceil(K / 8))
    return bitmap, weight[nonzero].contiguous()


def unpack_sparse(bitmap: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of pack_sparse: a dense (N, K) tensor in the values' dtype."""
    rows, cols = shape
    nonzero = ((bitmap.unsqueeze(-1) & _BITS) != 0).view(rows, -1)[:, :cols]  # (N, K)
    if int(nonzero.sum()) != values.numel():
        raise ModelFormatError(
            f"A sparse matrix's bitmap marks {int(nonzero.sum())} nonzeros but {values.numel()} values are stored; "
            "the artifact is corrupt. Write it again with `leanlm prune`."
        )
    dense = torch.zeros(rows, cols, dtype=values.dtype)
    dense[nonzero] = values
    return dense


def read_sparse_weights(folder: Path, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn X.mask/X.values entries of a saved artifact back into dense tensors named X.weight (torch has no fast
    sparse matmul on CPU: measured in benchmarks/bench_prune.py, dense runs faster)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    weights = dict(raw)
    for name, layer in manifest.get("sparse_layers", {}).items():
        try:
            bitmap, values = weights.pop(f"{name}.mask"), weights.pop(f"{name}.values")
        except KeyError as exc:
            raise ModelFormatError(f"{folder} lacks {exc} named in {MANIFEST}; the artifact is incomplete.") from exc
        weights[f"{name}.weight"] = unpack_sparse(bitmap, values, tuple(layer["shape"]))
    return weights
