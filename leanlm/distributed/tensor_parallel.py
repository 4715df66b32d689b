"""Tensor parallelism (Megatron-style) over torch.distributed: each rank holds 1/N of every attention head group and
of the MLP, and two all-reduces per layer sum the partial outputs.

- column-parallel: q/k/v (by heads) and gate/up (by rows) are sharded part by part *before* fusing, so each rank's
  fused qkv_proj is [q_r; k_r; v_r] and its gate_up_proj is [gate_r; up_r];
- row-parallel: o_proj and down_proj take the matching input columns; their outputs are partial sums, all-reduced;
- quantized weights (QuantizedTensor) are sliced in their stored form, so each rank packs only its shard for the
  kernels; a column shard must start and end on a quantization group boundary;
- each rank's model config has its own head and MLP counts, so the engine sizes the KV cache per rank;
- embedding, norms and the head are replicated (every rank computes the same logits and samples the same token).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from leanlm.config import ModelConfig
from leanlm.errors import InvalidRequestError
from leanlm.layers.quantized_tensor import QuantizedTensor
from leanlm.models.stack import refresh_decoder_stack

# HF names of the sharded projections: column-parallel (output rows split) and row-parallel (input columns split).
# A leanlm quantized folder stores the fused qkv_proj and gate_up_proj; they are split back into parts to shard.
_PROJECTION = re.compile(
    r"(?:model\.)?layers\.\d+\.(?:self_attn|mlp)\.(q|k|v|qkv|o|gate|up|gate_up|down)_proj\.(weight|bias)"
)
COLUMN_PARALLEL = ("q", "k", "v", "gate", "up", "qkv", "gate_up")
ROW_PARALLEL = ("o", "down")



def rank_config(config: ModelConfig, size: int) -> ModelConfig:
    """The shape one rank of `size` runs: heads, key/value heads and the MLP width divided by `size`."""
    counts = {
        "attention heads": config.num_heads,
        "key/value heads": config.num_kv_heads,
        "MLP intermediate size": config.intermediate_size,
    }
    for what, count in counts.items():
        if count % size:
            divisors = [d for d in range(2, 9) if all(c % d == 0 for c in counts.values())]
            hint = f" Sizes that divide all of them: {divisors}." if divisors else " No size from 2 to 8 does."
            raise InvalidRequestError(
                f"tensor_parallel_size={size} does not divide the model's {count} {what} "
                f"({config.num_heads} heads, {config.num_kv_heads} key/value heads, MLP width "
                f"{config.intermediate_size}).{hint}"
            )
    return config.replace(
        num_heads=config.num_heads // size,
        num_kv_heads=config.num_kv_heads // size,
        intermediate_size=config.intermediate_size // size,
    )


def shard_weights(weights: dict, config: ModelConfig, rank: int, size: int) -> dict:
    """This rank's part of an HF-named checkpoint (dense tensors or QuantizedTensors); the rest is replicated."""
    q, kv, mlp = config.q_size, config.kv_size, config.intermediate_size
    parts = {"q": [q], "k": [kv], "v": [kv], "qkv": [q, kv, kv], "gate": [mlp], "up": [mlp], "gate_up": [mlp, mlp]}
    shard = {}
    for name, tensor in weights.items():
        match = _PROJECTION.fullmatch(name)
        if not match or size == 1:
            shard[name] = tensor
            continue
        proj, kind = match.groups()
        if proj in COLUMN_PARALLEL:
            shard[name] = _slice_parts(tensor, parts[proj], rank, size)
        elif kind == "weight":
            shard[name] = _slice_columns(tensor, name, rank, size)
        else:  # a row-parallel bias is added once: by rank 0, after the others' partial sums
            shard[name] = tensor if rank == 0 else torch.zeros_like(tensor)
    return shard


def _slice_parts(tensor, parts: list[int], rank: int, size: int):
    """Rows of this rank from each stacked part (q, k, v or gate, up): [part0_r; part1_r; ...]."""
    rows = tensor.codes.shape[0] if isinstance(tensor, QuantizedTensor) else tensor.shape[0]
    if rows != sum(parts):
        raise InvalidRequestError(f"A projection has {rows} rows where the config implies {sum(parts)}.")
    starts = [sum(parts[:i]) for i in range(len(parts))]
    index = torch.cat(
        [torch.arange(s + rank * n // size, s + (rank + 1) * n // size) for s, n in zip(starts, parts, strict=True)]
    )
    if isinstance(tensor, QuantizedTensor):
        return tensor.map_rows(lambda t: t[index].contiguous())
    return tensor[index].contiguous()


def _slice_columns(tensor, name: str, rank: int, size: int):
    columns = tensor.shape[1] if not isinstance(tensor, QuantizedTensor) else tensor.codes.shape[1]
    start, stop = rank * columns // size, (rank + 1) * columns // size
    if not isinstance(tensor, QuantizedTensor):
        return tensor[:, start:stop].contiguous()
    group = tensor.group_size
    if start % group or (stop % group and stop != columns):
        raise InvalidRequestError(
            f"{name}: {columns} inputs in quantization groups of {group} cannot be split in {size} equal parts on "
            "group boundaries; use another tensor_parallel_size or a smaller group size."
        )
    groups = slice(start // group, -(-stop // group))
    offset = None if tensor.offset is None else tensor.offset[:, groups].contiguous()
    return QuantizedTensor(
        tensor.codes[:, start:stop].contiguous(), tensor.scale[:, groups].contiguous(), offset, tensor.bits, group
    )


class RowParallel(nn.Module):
    """A row-parallel projection: this rank's partial product, summed over the ranks (in float32, so that the one
    rounding to the activation dtype happens after the sum, as in one process)."""

    def __init__(self, inner: nn.Module, group=None):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = self.inner(x)
        total = partial.float()
        dist.all_reduce(total, group=self.group)
        return total.to(partial.dtype)


def parallelize(model: nn.Module, size: int, group=None) -> nn.Module:
    """Wrap every layer's o_proj and down_proj in an all-reduce, after build_model over this rank's shard, and
    rebuild the C++ stack (where it runs the model) with the same all-reduce after its o and down products."""
    if size == 1:
        return model
    for layer in model.layers:
        layer.self_attn.o_proj = RowParallel(layer.self_attn.o_proj, group)
        layer.mlp.down_proj = RowParallel(layer.mlp.down_proj, group)
    model.tensor_parallel_size = size
    model.all_reduce_group = (group or dist.group.WORLD).group_name
    refresh_decoder_stack(model)
    return model


def synchronize_sampling(runner, device: torch.device) -> None:
    """Make every rank take rank 0's sampled tokens. The logits are the same on every rank (replicated head after
    identical all-reduces), so this only guards against a rank whose sampler drew differently."""
    sample = runner._sample

    def sample_like_rank_0(request_ids, logits, masks=None):
        sampled = sample(request_ids, logits, masks)  # request id -> [its one sampled token]
        tokens = torch.tensor([sampled[rid][0].token_id for rid in request_ids], dtype=torch.int64, device=device)
        dist.broadcast(tokens, src=0)
        for rid, token in zip(request_ids, tokens.tolist(), strict=True):
            if sampled[rid][0].token_id != token:
                sampled[rid] = [type(sampled[rid][0])(token)]
        return sampled

    runner._sample = sample_like_rank_0


def broadcast_lists(lists: list[list[int]], width: int, device: torch.device) -> list[list[int]]:
    """Rank 0's lists of at most `width` non-negative ints (the same number of lists on every rank)."""
    table = torch.full((len(lists), width), -1, dtype=torch.int64, device=device)
    for row, values in enumerate(lists):
        table[row, : len(values)] = torch.tensor(values, dtype=torch.int64)
    dist.broadcast(table, src=0)
    return [[value for value in row if value >= 0] for row in table.tolist()]


def synchronize_speculation(engine, device: torch.device) -> None:
    """Speculative decoding on every rank as on rank 0: the draft lengths (each rank's tuner times its own steps),
    the drafts, and the tokens each verify step keeps (rejection sampling draws like any sampler). Every rank then
    runs the same rows and the same collectives, and keeps the same tokens."""
    speculator, runner = engine.speculator, engine.runner
    if speculator is None:
        return
    speculator.synchronize = lambda lists, width: broadcast_lists(lists, width, device)
    verify = runner._verify

    def verify_like_rank_0(verified, logits):
        kept = verify(verified, logits)  # request id -> the accepted drafts and one more token
        ids = [entry.request.request_id for entry, _ in verified]
        width = max(entry.num_draft_tokens for entry, _ in verified) + 1
        tokens = broadcast_lists([[t.token_id for t in kept[rid]] for rid in ids], width, device)
        for rid, entry_tokens in zip(ids, tokens, strict=True):
            # A request that speculates has no penalty or grammar: its sampling state keeps nothing per token.
            if [t.token_id for t in kept[rid]] != entry_tokens:
                kept[rid] = [type(kept[rid][0])(token) for token in entry_tokens]
        return kept

    runner._verify = verify_like_rank_0


def build_rank(checkpoint, plan, size: int, engine_config=None, threads: int | None = None):
    """(model, engine) of this process's rank: join the process group, shard the checkpoint, build the model over
    the shard (quantized layers pack only their part), wrap the row-parallel layers, and build an engine whose
    KV cache holds this rank's heads only."""
    from leanlm.distributed.process_group import init_tensor_parallel, shared_seed
    from leanlm.engine.engine import LLMEngine
    from leanlm.models.registry import build_model

    rank, size = init_tensor_parallel(size, plan.device)
    config = rank_config(checkpoint.config, size)
    model = build_model(config, shard_weights(checkpoint.weights, checkpoint.config, rank, size), plan)
    parallelize(model, size)
    engine = LLMEngine(model, checkpoint.tokenizer, engine_config, plan.kv_cache, threads)
    torch.manual_seed(shared_seed(plan.device))
    synchronize_sampling(engine.runner, plan.device)
    synchronize_speculation(engine, plan.device)
    return model, engine
