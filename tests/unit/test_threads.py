"""Thread counts are scoped: GPTQ's one-thread loop and an LLM's `threads=` never change another thread's setting,
and every scope puts the previous value back."""

import threading

import torch

from leanlm.compress.gptq import single_thread
from leanlm.kernels.threads import scoped_threads


def test_scope_sets_then_restores_the_calling_threads_count():
    before = torch.get_num_threads()
    with scoped_threads(1):
        assert torch.get_num_threads() == 1
        with scoped_threads(3):
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with scoped_threads(None):  # None: leave it alone
        assert torch.get_num_threads() == before


def test_scope_restores_after_an_error():
    before = torch.get_num_threads()
    try:
        with single_thread():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert torch.get_num_threads() == before


def test_gptq_single_thread_does_not_change_another_threads_count():
    """A server's engine thread keeps its count while GPTQ runs on another thread."""
    torch.set_num_threads(2)
    inside, release, seen = threading.Event(), threading.Event(), []

    def gptq_like():
        with single_thread():
            seen.append(torch.get_num_threads())
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=gptq_like)
    worker.start()
    try:
        assert inside.wait(10)
        assert torch.get_num_threads() == 2  # this thread, meanwhile
    finally:
        release.set()
        worker.join()
    assert seen == [1] and torch.get_num_threads() == 2
