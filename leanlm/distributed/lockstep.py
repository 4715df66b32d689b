"""A tensor-parallel server: rank 0 serves HTTP, the other ranks follow its engine in lock step.

Every rank must run the same engine calls in the same order (each step's forward pass has collectives in it).
Rank 0's engine is wrapped in LockstepEngine, which records the requests added and aborted since the previous step
and broadcasts them with the step; `follow` is the other ranks' loop: receive, apply, step, until rank 0 says stop.
"""

from __future__ import annotations

import torch.distributed as dist


class LockstepEngine:
    """Rank 0's LLMEngine, publishing what it is asked to do before each step (the rest passes through)."""

    def __init__(self, engine):
        self._engine = engine
        self._pending: list[tuple] = []

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params, prompt: str | None = None) -> None:
        self._engine.add_request(request_id, prompt_token_ids, params, prompt=prompt)
        self._pending.append(("add", request_id, list(prompt_token_ids), params, prompt))  # only once accepted

    def abort_request(self, request_id: str) -> None:
        self._engine.abort_request(request_id)
        self._pending.append(("abort", request_id))

    def step(self):
        self._publish("step")
        return self._engine.step()

    def stop_followers(self) -> None:
        self._publish("stop")

    def _publish(self, final: str) -> None:
        operations, self._pending = [*self._pending, (final,)], []
        dist.broadcast_object_list([operations], src=0)


def follow(engine) -> None:
    """The loop of a rank other than 0: apply rank 0's requests and aborts, step when it steps, return on stop."""
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        for operation in box[0]:
            kind = operation[0]
            if kind == "add":
                _, request_id, token_ids, params, prompt = operation
                engine.add_request(request_id, token_ids, params, prompt=prompt)
            elif kind == "abort":
                engine.abort_request(operation[1])
            elif kind == "step":
                engine.step()
            elif kind == "stop":
                return
