"""Prefix-aware routing on Ray Serve's request-router API: a request whose prompt starts like an earlier one goes to
the replica that ran the earlier one (its prefix cache holds those KV blocks), unless that replica is full, then to
the least loaded of the others (Serve probes their queue lengths within a rank)."""

from __future__ import annotations

import hashlib
import json

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

# Requests that agree on this many leading characters of their prompt share a replica. About 30 tokens: two
# prefix-cache blocks of 16, so a shared system prompt or few-shot header routes together.
PREFIX_CHARS = 128


def prefix_key(body: bytes, chars: int = PREFIX_CHARS) -> str | None:
    """The routing key of an OpenAI request body: a hash of the first `chars` characters of its prompt (completions)
    or of its messages as the chat template would see them in order (chat). None when there is no prompt."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(request, dict):
        return None
    prompt = request.get("prompt")
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        prompt = prompt[0]  # a batch of prompts: the first one decides
    if prompt is None and isinstance(request.get("messages"), list):
        prompt = "".join(f"<{m.get('role')}>{m.get('content')}" for m in request["messages"] if isinstance(m, dict))
    if prompt is None:
        return None
    text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
    return hashlib.blake2b(text[:chars].encode("utf-8", "replace"), digest_size=8).hexdigest()


def preferred_replica(key: str, replica_ids: list[str]) -> str:
    """Rendezvous hashing: the replica with the highest hash(key, replica). Adding or losing a replica moves only
    the keys that replica wins or held."""
    return max(replica_ids, key=lambda rid: hashlib.blake2b(f"{key}|{rid}".encode(), digest_size=8).digest())


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Ranks for one request: [the key's replica], then [every other replica] (least loaded first, as Serve picks
    within a rank). Requests without a key (GET /v1/models) rank all replicas together."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = pending_request.kwargs.get("prefix_key") if pending_request is not None else None
        if key is None:
            return [candidate_replicas]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        first = by_id[preferred_replica(key, sorted(by_id))]
        others = [replica for replica in candidate_replicas if replica is not first]
        return [[first], others] if others else [[first]]
