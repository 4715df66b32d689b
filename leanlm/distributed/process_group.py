"""The torch.distributed process group tensor parallelism runs in: gloo on CPU, NCCL on CUDA, set up from the
environment `torchrun` gives each process (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""

from __future__ import annotations

import atexit
import datetime
import os

import torch
import torch.distributed as dist

from leanlm.errors import InvalidRequestError


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_tensor_parallel(size: int, device: torch.device) -> tuple[int, int]:
    """Join (or check) the default process group for `size` ranks; returns (rank, size). A process group the caller
    set up already (tests, Ray workers) is used as it is."""
    if size < 1:
        raise InvalidRequestError(f"tensor_parallel_size must be >= 1, got {size}.")
    if not dist.is_available():
        raise InvalidRequestError("This torch build has no torch.distributed; tensor parallelism needs it.")
    if not dist.is_initialized():
        world = os.environ.get("WORLD_SIZE")
        if world is None:
            raise InvalidRequestError(
                f"tensor_parallel_size={size} needs one process per rank: launch with "
                f"`torchrun --nproc-per-node {size} -m leanlm.cli.main ... --tensor-parallel-size {size}`."
            )
        if int(world) != size:
            raise InvalidRequestError(
                f"torchrun started {world} processes but tensor_parallel_size is {size}; make them equal "
                f"(--nproc-per-node {size})."
            )
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # A server's follower ranks wait in a collective while rank 0 idles (distributed/lockstep.py): no timeout.
        dist.init_process_group(backend_for(device), timeout=datetime.timedelta(days=365))
        # Torn down before the interpreter's own teardown: a group left to it may abort the process (gloo's
        # threads destroyed while joinable), turning a finished run into a failed one.
        atexit.register(_destroy)
    if dist.get_world_size() != size:
        raise InvalidRequestError(
            f"The process group has {dist.get_world_size()} ranks but tensor_parallel_size is {size}."
        )
    return dist.get_rank(), size


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shared_seed(device: torch.device) -> int:
    """One random seed for every rank (rank 0's), so that unseeded sampling draws the same on each."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device if device.type == "cuda" else "cpu")
    dist.broadcast(seed, src=0)
    return int(seed.item())
