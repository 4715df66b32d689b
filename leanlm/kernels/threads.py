"""Thread counts scoped to one piece of work instead of set for the whole process.

torch has no per-object thread pool. With its OpenMP backend, `torch.set_num_threads` sets the calling OS
thread's OpenMP team size and the default that threads started afterwards begin with. So an object that wants its
own count (an LLM with `threads=`, GPTQ's one-thread loop) sets it around its own compute calls and puts the
previous value back: other threads, and later calls on this thread, keep their own setting. Two such objects that
compute at the same moment on one OS thread cannot each have their count; they never do (calls are sequential).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def scoped_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` intra-op threads on this thread (None: leave the setting alone), then restore."""
    previous = torch.get_num_threads()
    if threads is None or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def map_single_threaded(function: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """function(item) for every item, on `workers` OS threads that each run torch with one intra-op thread (the
    calling thread's grad and inference modes carried over), results in order. Independent pieces of work (texts
    of a batch) scale better this way than each op split across the threads: no barrier after every small op."""
    with _POOLS_LOCK:
        pool = _POOLS.get(workers) or _POOLS.setdefault(workers, ThreadPoolExecutor(workers, "leanlm-worker"))
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(item: T) -> R:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad), scoped_threads(1):
            return function(item)

    return list(pool.map(run, items))
