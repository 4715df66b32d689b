"""What a tensor-parallel rank says about itself, and the rule that only rank 0 prints results."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def describe_rank(llm) -> str:
    """One line: this rank's share of the heads, its KV cache, and why the C++ stack does not run."""
    config, engine = llm.model.config, llm.engine
    return (
        f"tensor-parallel rank {dist.get_rank()}/{dist.get_world_size()}: {config.num_heads} attention heads, "
        f"{config.num_kv_heads} KV heads, MLP width {config.intermediate_size}; KV cache "
        f"{engine.kv_bytes_per_token} bytes/token in {engine.block_manager.num_blocks} blocks; "
        + (
            "C++ stack on, all-reduce after o and down"
            if llm.model.decoder_stack is not None
            else f"C++ stack off: {llm.model.decoder_stack_refusal}"
        )
    )


def announce_rank(llm) -> None:
    """Print describe_rank on stderr, then silence this process's stdout unless it is rank 0 (torchrun runs the
    same command in every rank; the output is rank 0's)."""
    print(f"leanlm: {describe_rank(llm)}", file=sys.stderr, flush=True)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
