"""`leanlm serve`: the OpenAI-compatible HTTP server (completions, chat, streaming, metrics)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from leanlm.cli.options import add_model_options, load_llm


def add_parser(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve POST /v1/completions and /v1/chat/completions (streaming with stream: true), "
        "GET /v1/models, /health and /metrics (Prometheus). Listens on 127.0.0.1 unless --host says otherwise. "
        "An encoder as --model (e.g. all-minilm-l6-v2, or a cross-encoder folder) serves POST /v1/embeddings (or "
        "/v1/rerank) without a generator.",
    )
    group = serve.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, local only)")
    group.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    group.add_argument(
        "--api-key",
        default=os.environ.get("LEANLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $LEANLM_API_KEY, or none)",
    )
    group.add_argument("--served-model-name", help="the model id clients send (default: the model file's name)")
    group.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests that may wait beyond the running batch (--max-num-seqs); more get 429 (default: %(default)s)",
    )
    group.add_argument(
        "--max-tokens-limit",
        type=int,
        default=4096,
        help="largest max_tokens a request may ask for; more is a 400 (default: %(default)s)",
    )
    group.add_argument(
        "--max-request-bytes",
        type=int,
        default=1 << 20,
        help="largest request body; more is a 413 (default: %(default)s)",
    )
    group.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds running requests get to finish on shutdown before they are stopped (default: %(default)s)",
    )
    group.add_argument(
        "--allowed-hosts",
        nargs="+",
        default=[],
        metavar="HOST",
        help="Host header names to answer besides localhost, 127.0.0.1 and --host (checked when there is no "
        "--api-key, against DNS rebinding; '*' answers any)",
    )
    group.add_argument(
        "--allowed-origins",
        "--cors-origins",
        nargs="+",
        default=[],
        metavar="ORIGIN",
        help="browser origins allowed to call the API (CORS), e.g. https://app.example; '*' for any (default: none)",
    )
    group.add_argument(
        "--special-tokens-in-content",
        action="store_true",
        help="trusted clients only: read control tokens typed in chat messages as control tokens (default: plain "
        "text, so that a user cannot forge a system turn)",
    )
    group.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    encoders = serve.add_argument_group("encoders (served beside the generator; the request's model picks)")
    encoders.add_argument(
        "--embedding-model",
        action="append",
        default=[],
        metavar="MODEL",
        help="also serve POST /v1/embeddings with this encoder (a sentence-transformers folder or a known name such "
        "as all-minilm-l6-v2); repeat for several",
    )
    encoders.add_argument(
        "--rerank-model",
        action="append",
        default=[],
        metavar="MODEL",
        help="also serve POST /v1/rerank with this cross-encoder (an HF *ForSequenceClassification folder)",
    )
    encoders.add_argument(
        "--embedding-precision",
        default="float32",
        choices=["float32", "bf16", "int8", "int4"],
        help="precision of the encoders' linear layers (default: %(default)s)",
    )
    add_replica_options(serve)
    add_model_options(serve)


def add_replica_options(serve) -> None:
    group = serve.add_argument_group("replicas (Ray Serve; pip install leanlm[distributed])")
    group.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="run N copies of the model on Ray Serve behind this one endpoint, routed by prompt prefix then load "
        "(default: one process, no Ray)",
    )
    group.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest replicas")
    group.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most replicas")
    group.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (e.g. auto, or ray://head:10001) instead of starting a local one",
    )
    group.add_argument(
        "--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves for each replica (default: %(default)s)"
    )
    group.add_argument(
        "--pin-cores", action="store_true", help="pin each replica to one core of its machine (benchmarks)"
    )


def served_model_name(model_path) -> str:
    path = os.fspath(model_path)
    name = os.path.basename(path.rstrip("/"))
    return name.removesuffix(".gguf")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from leanlm.errors import InvalidRequestError
    from leanlm.server.serving import ServerSettings

    if not 0 < args.port < 65536:
        raise InvalidRequestError(f"--port must be in 1..65535, got {args.port}.")
    try:  # checked before the (slower) model load
        settings = ServerSettings(
            model_name=args.served_model_name or "",
            max_tokens_limit=args.max_tokens_limit,
            max_queue=args.max_queue,
            api_key=args.api_key,
            max_body_bytes=args.max_request_bytes,
            shutdown_grace_s=args.shutdown_timeout,
            bind_host=args.host,
            allowed_hosts=tuple(args.allowed_hosts),
            allowed_origins=tuple(args.allowed_origins),
            special_tokens_in_content=args.special_tokens_in_content,
        )
    except ValueError as exc:
        raise InvalidRequestError(f"Invalid server option: {exc}.") from None
    if args.api_key is None and not _is_loopback(args.host):
        print(
            f"leanlm: warning: listening on {args.host} without --api-key: anyone who can reach it can use it.",
            file=sys.stderr,
        )

    tensor_parallel = getattr(args, "tensor_parallel_size", 1) > 1
    replica_flags = (args.replicas, args.ray_address, args.min_replicas, args.max_replicas)
    if any(flag is not None for flag in replica_flags):
        return _serve_replicas(args, settings)

    from leanlm.server.app import build_app
    from leanlm.server.http_server import Server

    if _is_speech_model(args.model):
        return _serve_speech(args, settings)
    from leanlm.embed.loading import encoder_role

    role = encoder_role(args.model)
    if role is not None:
        return _serve_encoders_only(args, settings, role)
    llm = _load_on_a_passing_thread(args)
    if tensor_parallel:  # under torchrun: rank 0 serves, the other ranks follow its engine step by step
        from leanlm.distributed.lockstep import LockstepEngine, follow

        if llm.tensor_parallel_rank != 0:
            follow(llm.engine)
            return 0
        llm.engine = LockstepEngine(llm.engine)
    if not settings.model_name:
        settings = dataclasses.replace(settings, model_name=served_model_name(llm.model_path))
    encoders = _load_encoders(args)
    print(f"leanlm: serving '{settings.model_name}' on http://{args.host}:{args.port}/v1", file=sys.stderr)
    if encoders:
        print(f"leanlm: and the encoders {', '.join(encoders.names)}", file=sys.stderr)
    try:
        Server(build_app(llm, settings, encoders=encoders), args.host, args.port, log_level=args.log_level).run()
    finally:
        if tensor_parallel:
            llm.engine.stop_followers()
    return 0


def _serve_replicas(args: argparse.Namespace, settings) -> int:
    """serve --replicas: the same API from N replicas on Ray Serve; runs until interrupted."""
    import time

    from leanlm.cli.options import llm_options
    from leanlm.errors import InvalidRequestError

    counts = {"--replicas": args.replicas, "--min-replicas": args.min_replicas, "--max-replicas": args.max_replicas}
    for flag, count in counts.items():
        if count is not None and count < (0 if flag == "--min-replicas" else 1):
            raise InvalidRequestError(f"{flag} must be >= 1 (0 for --min-replicas), got {count}.")
    if args.min_replicas is not None and args.max_replicas is not None and args.min_replicas > args.max_replicas:
        raise InvalidRequestError(f"--min-replicas {args.min_replicas} exceeds --max-replicas {args.max_replicas}.")
    try:
        from leanlm.server.replicas.deployment import ReplicaOptions, start_replicas, stop_replicas
    except ImportError as exc:
        raise InvalidRequestError(
            f"serve --replicas runs on Ray Serve, which is not installed ({exc}); pip install 'leanlm[distributed]'."
        ) from None
    options = ReplicaOptions(
        replicas=args.replicas or 1,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        cpus_per_replica=args.replica_cpus,
        max_ongoing_requests=args.max_num_seqs + args.max_queue,
        pin_cores=args.pin_cores,
    )
    start_replicas(llm_options(args), settings, options, args.host, args.port, args.ray_address, served_model_name)
    print(f"leanlm: serving {options.replicas} replica(s) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop_replicas()
    return 0


def _load_encoders(args: argparse.Namespace):
    """EncoderServing for --embedding-model / --rerank-model, named as clients send them, or None."""
    if not (args.embedding_model or args.rerank_model):
        return None
    import threading

    from leanlm.embed import CrossEncoder, Embedder
    from leanlm.server.encoders import EncoderServing

    precision, loaded = args.embedding_precision, {}

    def load() -> None:  # on a passing thread, as the generator (see below): no OpenMP team left behind
        try:
            renamed = getattr(args, "served_names", {})

            def names(model) -> str:
                return renamed.get(model) or served_model_name(model)

            loaded["embedders"] = {names(m): Embedder(m, precision=precision) for m in args.embedding_model}
            loaded["rerankers"] = {names(m): CrossEncoder(m, precision=precision) for m in args.rerank_model}
        except BaseException as exc:
            loaded["error"] = exc

    thread = threading.Thread(target=load, name="leanlm-load-encoders")
    thread.start()
    thread.join()
    if "error" in loaded:
        raise loaded["error"]
    return EncoderServing(loaded["embedders"], loaded["rerankers"])


def _serve_encoders_only(args: argparse.Namespace, settings, role: str) -> int:
    """--model is an encoder: serve it (and any --embedding-model / --rerank-model) without a generator, as vLLM
    serves an embedding model: /v1/embeddings (or /v1/rerank for a cross-encoder), /v1/models, /health."""
    from leanlm.server.encoder_app import build_encoder_app
    from leanlm.server.http_server import Server

    if settings.model_name:  # --served-model-name renames --model
        args.served_names = {args.model: settings.model_name}
    (args.embedding_model if role == "embedding" else args.rerank_model).insert(0, args.model)
    encoders = _load_encoders(args)
    print(
        f"leanlm: serving the {role} model(s) {', '.join(encoders.names)} on http://{args.host}:{args.port}/v1 "
        "(no generator)",
        file=sys.stderr,
    )
    Server(build_encoder_app(encoders, settings), args.host, args.port, log_level=args.log_level).run()
    return 0


def _is_speech_model(model) -> bool:
    """A known speech model name (whisper-base) or a Whisper folder (CTranslate2 model.bin or HF model_type)."""
    import json
    from pathlib import Path

    from leanlm.formats.assets import KNOWN_SPEECH_MODELS

    if model is None:
        return False
    path = Path(model)
    if not path.exists():
        return str(model) in KNOWN_SPEECH_MODELS
    if (path / "model.bin").is_file():
        return True
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "whisper"


def _serve_speech(args: argparse.Namespace, settings) -> int:
    """POST /v1/audio/transcriptions and /v1/audio/translations over a Whisper model."""
    from leanlm.server.http_server import Server
    from leanlm.server.speech_app import build_speech_app
    from leanlm.speech.transcribe import load_pipeline

    pipeline = load_pipeline(args.model)
    name = settings.model_name or served_model_name(args.model)
    print(f"leanlm: serving speech model '{name}' on http://{args.host}:{args.port}/v1/audio", file=sys.stderr)
    Server(build_speech_app(pipeline, name, api_key=args.api_key), args.host, args.port, log_level=args.log_level).run()
    return 0


def _load_on_a_passing_thread(args: argparse.Namespace):
    """load_llm on a thread that ends when it is done. OpenMP (libgomp) keeps one thread team per thread that ran
    parallel work and spins far less once its teams outnumber the cores: had the main thread loaded the model, the
    engine thread would decode at less than half speed on 2 cores. A finished thread's team goes with it."""
    import threading

    result: dict = {}

    def load() -> None:
        try:
            result["llm"] = load_llm(args)
        except BaseException as exc:  # re-raised on the main thread, as if loaded there
            result["error"] = exc

    thread = threading.Thread(target=load, name="leanlm-load")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["llm"]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
