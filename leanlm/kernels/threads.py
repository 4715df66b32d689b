"""Thread counts scoped to one piece of work instead of set for the whole process.

torch has no per-object thread pool. With its OpenMP backend, `torch.set_num_threads` sets the calling OS
thread's OpenMP team size and the default that threads started afterwards begin with. So an object that wants its
own count (an LLM with `threads=`, GPTQ's one-thread loop) sets it around its own compute calls and puts the
previous value back: other threads, and later calls on this thread, keep their own setting. Two such objects that
compute at the same moment on one OS thread cannot each have their count; they never do (calls are sequential).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
