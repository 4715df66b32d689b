"""The Ray Serve application behind `leanlm serve --replicas N`.

Replica   one leanlm server (the ordinary app of server/app.py over its own LLM and engine) per Serve replica;
          Serve health-checks it (`check_health`: the engine thread is alive) and replaces one that dies.
          With tensor_parallel_size N in its LLM options, a replica is rank 0 of N: it starts N - 1 RankFollower
          actors on its node, which build their shards and follow its engine (distributed/lockstep.py).
Frontend  the HTTP ingress: forwards each request to a replica chosen by routing.PrefixAffinityRouter, retries on
          another replica when the chosen one dies before anything reached the client, and answers /metrics with
          every live replica's metrics (replicas push theirs every REPORT_EVERY_S).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import os
import socket
import time

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import ReplicaUnavailableError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from leanlm.server.replicas.asgi import call_app
from leanlm.server.replicas.metrics import merge_metrics
from leanlm.server.replicas.routing import PrefixAffinityRouter, prefix_key

APP_NAME = "leanlm"
REPORT_EVERY_S = 1.0
STALE_AFTER_S = 5.0  # a replica silent this long is gone from /metrics
ATTEMPTS = 3  # replicas tried for a request that has sent nothing to its client yet
# A replica that died (or its actor became unreachable) under a request: the request may go elsewhere.
REPLICA_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ReplicaUnavailableError)


class Replica:
    async def __init__(self, llm_options: dict, settings, pin_cores: bool = False, model_name=None):
        """model_name: llm.model_path -> the served name when settings has none (cli/serve.served_model_name)."""
        from leanlm.engine.llm import LLM
        from leanlm.server.app import build_app

        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        if pin_cores:  # one core per replica (benchmarks: replicas scale with cores, not with shared ones)
            rank = getattr(context.rank, "local_rank", 0)  # this replica's index among the deployment's on its node
            cores = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cores[rank % len(cores)]})
        self._followers, self._following = start_followers(llm_options)
        # Loaded on a thread that then ends: the engine thread keeps the only OpenMP team (see cli/serve.py).
        llm = await asyncio.to_thread(LLM, **llm_options)
        if self._followers:
            from leanlm.distributed.lockstep import LockstepEngine

            llm.engine = LockstepEngine(llm.engine)
        if not settings.model_name and model_name is not None:
            settings = dataclasses.replace(settings, model_name=model_name(llm.model_path))
        self.app = build_app(llm, settings)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts the engine thread on this replica's event loop
        self.engine = self.app.state.engine
        self._reporter = asyncio.ensure_future(self._report_metrics())

    async def http(self, method: str, path: str, query: str, headers: list, body: bytes, prefix_key: str | None):
        """Run one request through the app; yields {"status", "headers"} then body chunks. `prefix_key` is for
        the router (PrefixAffinityRouter reads it from the call's keyword arguments)."""
        async for message in call_app(self.app, method, path, query, headers, body):
            yield message

    async def check_health(self) -> None:
        if not self.engine.healthy:
            raise RuntimeError("the engine thread is not running")
        ended, _ = ray.wait(self._following, timeout=0) if self._following else ([], None)
        if ended:  # a tensor-parallel rank is gone: this replica cannot step any more
            raise RuntimeError("a tensor-parallel rank of this replica stopped")

    def __del__(self) -> None:
        for follower in getattr(self, "_followers", []):
            try:
                ray.kill(follower)
            except Exception:  # Ray itself shutting down: the actor goes with it
                pass

    async def _report_metrics(self) -> None:
        frontend = serve.get_deployment_handle("Frontend", APP_NAME)
        while True:
            text = self.engine.metrics.render(self.engine.stats, self.engine.in_flight)
            try:
                await frontend.report.remote(self.replica_id, text)
            except Exception:  # the frontend restarting or not up yet: the next report will do
                pass
            await asyncio.sleep(REPORT_EVERY_S)


@ray.remote
class RankFollower:
    """Rank `rank` (> 0) of a replica's tensor-parallel group: builds its shard, then follows rank 0's engine."""

    def __init__(self, llm_options: dict, rank: int, size: int, address: str, port: int):
        env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": size, "MASTER_ADDR": address, "MASTER_PORT": port}
        os.environ.update({name: str(value) for name, value in env.items()})
        self.llm_options = llm_options

    def run(self) -> None:
        from leanlm.distributed.lockstep import follow
        from leanlm.engine.llm import LLM

        follow(LLM(**self.llm_options).engine)  # returns when rank 0 stops; raises when it is gone


def start_followers(llm_options: dict) -> tuple[list, list]:
    """For tensor_parallel_size N > 1: the N - 1 follower actors on this node (same CPUs each as the replica) and
    their running loops; this process becomes rank 0 of the group through torch.distributed's environment."""
    size = llm_options.get("tensor_parallel_size", 1)
    if size <= 1:
        return [], []
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    address = ray.util.get_node_ip_address()
    with socket.socket() as sock:
        sock.bind((address, 0))
        port = sock.getsockname()[1]
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    followers = [
        RankFollower.options(num_cpus=cpus, scheduling_strategy=here).remote(llm_options, rank, size, address, port)
        for rank in range(1, size)
    ]
    env = {"RANK": 0, "LOCAL_RANK": 0, "WORLD_SIZE": size, "MASTER_ADDR": address, "MASTER_PORT": port}
    os.environ.update({name: str(value) for name, value in env.items()})
    return followers, [follower.run.remote() for follower in followers]


class Frontend:
    def __init__(self, replicas, api_key: str | None = None):
        self.replicas = replicas.options(stream=True)
        self.api_key = api_key
        self.reports: dict[str, tuple[float, str]] = {}
        self.retried = 0  # requests sent again after their replica was lost before answering
        self.lost = 0  # requests whose replica was lost after the client had received part of the answer

    async def report(self, replica_id: str, text: str) -> None:
        self.reports[replica_id] = (time.monotonic(), text)

    async def __call__(self, request: Request) -> Response:
        if request.url.path == "/metrics" and request.method == "GET":
            return self._metrics(request)
        body = await request.body()
        key = prefix_key(body) if request.method == "POST" else None
        headers = list(request.headers.items())
        for attempt in range(ATTEMPTS):
            stream = self.replicas.http.remote(
                request.method, request.url.path, request.url.query, headers, body, prefix_key=key
            )
            try:  # until the first body chunk nothing has reached the client: a lost replica means try another
                start = await stream.__anext__()
                first = await anext(stream, b"")
            except REPLICA_LOST:
                self.retried += 1
                await asyncio.sleep(0.2 * (attempt + 1))  # Serve's router drops the dead replica meanwhile
                continue
            media = dict(start["headers"]).get("content-type", "")
            return StreamingResponse(
                self._rest(stream, first, "text/event-stream" in media),
                status_code=start["status"],
                headers={k: v for k, v in start["headers"] if k.lower() not in ("content-length", "transfer-encoding")},
            )
        error = {"message": f"No replica could answer ({ATTEMPTS} tried); retry later.", "type": "server_error"}
        return JSONResponse({"error": {**error, "param": None, "code": "replicas_unavailable"}}, status_code=503)

    async def _rest(self, stream, first: bytes, events: bool):
        yield first
        try:
            async for chunk in stream:
                yield chunk
        except REPLICA_LOST:
            self.lost += 1
            if events:  # an SSE client reads why its stream ended early
                error = {"message": "The replica answering this request stopped mid-stream; send it again.",
                         "type": "server_error", "param": None, "code": "replica_lost"}  # fmt: skip
                yield f"data: {json.dumps({'error': error})}\n\n".encode()

    def _metrics(self, request: Request) -> Response:
        given = request.headers.get("authorization", "").encode()
        if self.api_key is not None and not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            error = {"message": "Missing or wrong API key.", "type": "invalid_request_error", "code": "invalid_api_key"}
            return JSONResponse({"error": {**error, "param": None}}, status_code=401)
        now = time.monotonic()
        live = {rid: text for rid, (at, text) in self.reports.items() if now - at < STALE_AFTER_S}
        extra = [
            "# HELP leanlm_replicas Replicas that reported metrics in the last few seconds.",
            "# TYPE leanlm_replicas gauge",
            f"leanlm_replicas {len(live)}",
            "# HELP leanlm_router_retries Requests sent to another replica after theirs was lost before answering.",
            "# TYPE leanlm_router_retries counter",
            f"leanlm_router_retries_total {self.retried}",
            "# HELP leanlm_router_lost_streams Answers cut off because their replica was lost mid-stream.",
            "# TYPE leanlm_router_lost_streams counter",
            f"leanlm_router_lost_streams_total {self.lost}",
        ]
        return PlainTextResponse(merge_metrics(live, extra), media_type="text/plain; version=0.0.4")


@dataclasses.dataclass(frozen=True)
class ReplicaOptions:
    replicas: int = 1
    min_replicas: int | None = None  # with max_replicas: Serve autoscales between the two
    max_replicas: int | None = None
    cpus_per_replica: float = 1.0
    max_ongoing_requests: int = 64  # per replica, as the engine's --max-num-seqs
    pin_cores: bool = False
    target_ongoing_requests: float = 8.0  # autoscaling: requests per replica it aims for

    def deployment_options(self) -> dict:
        options = {
            "ray_actor_options": {"num_cpus": self.cpus_per_replica},
            "max_ongoing_requests": self.max_ongoing_requests,
            "request_router_config": RequestRouterConfig(request_router_class=PrefixAffinityRouter),
            "health_check_period_s": 2,
            "health_check_timeout_s": 30,
        }
        if self.min_replicas is None and self.max_replicas is None:
            return {**options, "num_replicas": self.replicas}
        low = self.min_replicas if self.min_replicas is not None else 1
        high = self.max_replicas if self.max_replicas is not None else max(low, self.replicas)
        return {
            **options,
            "autoscaling_config": {
                "min_replicas": low,
                "max_replicas": high,
                "initial_replicas": min(max(self.replicas, low), high),
                "target_ongoing_requests": self.target_ongoing_requests,
            },
        }


def build_application(llm_options: dict, settings, options: ReplicaOptions, model_name=None):
    replica = serve.deployment(Replica).options(name="Replica", **options.deployment_options())
    frontend = serve.deployment(Frontend).options(name="Frontend", num_replicas=1, ray_actor_options={"num_cpus": 0})
    return frontend.bind(replica.bind(llm_options, settings, options.pin_cores, model_name), settings.api_key)


def start_replicas(
    llm_options: dict, settings, options: ReplicaOptions, host: str, port: int, address=None, model_name=None
) -> None:
    """Start (address None: a local Ray cluster) or join a Ray cluster, and deploy the application on it; returns
    once every replica is up."""
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(llm_options, settings, options, model_name), name=APP_NAME, route_prefix="/")


def stop_replicas() -> None:
    serve.delete(APP_NAME)
    serve.shutdown()
