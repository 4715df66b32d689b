"""Tensor parallelism on this machine: batch-1 greedy decode with 1 rank and with 2 ranks (torchrun, gloo), each rank
one thread, interleaved 1 2 1 2 ... in one run; plus gloo's all-reduce latency for one hidden-state row and the
memory bandwidth, the two inputs of the paper model in docs/TENSOR_PARALLEL.md, which the script evaluates next to
the measured figures.

The model is a random Llama of a shape both rank counts divide (leanlm's default SmolLM2-135M has 9 heads, which 2
does not), quantized to int4 in groups of 32 so it runs leanlm's q4 kernels and the C++ stack with its all-reduce:

    python benchmarks/bench_tensor_parallel.py [--repeats 3] [--tokens 96] [--json out/bench_tp.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {  # ~100M parameters: 8 layers of width 1024, 16 heads over 4 KV heads, MLP 2816
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 1024,
    "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
    "head_dim": 64, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}  # fmt: skip


def write_model(folder: Path) -> Path:
    """The random model as a leanlm int4 folder (compress/ writes it; each rank shards it before packing)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from leanlm.compress.config import QuantConfig
    from leanlm.compress.pipelines import quantize_to_folder

    dense = folder / "dense"
    dense.mkdir(parents=True)
    c, gen = SHAPE, torch.Generator().manual_seed(0)
    h, m, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    weights = {
        "model.embed_tokens.weight": torch.randn(c["vocab_size"], h, generator=gen),
        "model.norm.weight": torch.ones(h),
        "lm_head.weight": torch.randn(c["vocab_size"], h, generator=gen) * 0.05,
    }
    for i in range(c["num_hidden_layers"]):
        shapes = {"self_attn.q": (q, h), "self_attn.k": (kv, h), "self_attn.v": (kv, h), "self_attn.o": (h, q),
                  "mlp.gate": (m, h), "mlp.up": (m, h), "mlp.down": (h, m)}  # fmt: skip
        for name, shape in shapes.items():
            weights[f"model.layers.{i}.{name}_proj.weight"] = torch.randn(*shape, generator=gen) * 0.03
        weights[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h)
        weights[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h)
    save_file(weights, dense / "model.safetensors")
    (dense / "config.json").write_text(json.dumps(c))
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(c["vocab_size"])}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(dense / "tokenizer.json"))
    quantized = folder / "int4"
    quantize_to_folder(str(dense), QuantConfig("int4", group_size=32), quantized, eval_tokens=0, progress=False)
    return quantized


def worker(model: str, tokens: int, size: int) -> None:
    """One rank (under torchrun): warm up, then decode `tokens` greedy tokens at batch 1; rank 0 prints JSON."""
    import torch.distributed as dist

    from leanlm.engine.llm import LLM
    from leanlm.sampling_params import SamplingParams

    llm = LLM(model, threads=1, tensor_parallel_size=size)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate(["w1 w2 w3"], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up
    out = llm.generate(["w4 w5 w6 w7"], params)[0]
    record = {"ranks": size, "decode_tok_s": (tokens - 1) / out.metrics.decode_time_s,
              "stack": llm.model.decoder_stack is not None}  # fmt: skip
    if size > 1:  # gloo's all-reduce of one hidden-state row (float32), as the layers do it
        row, times = torch.zeros(SHAPE["hidden_size"]), []
        for _ in range(300):
            started = time.perf_counter()
            dist.all_reduce(row)
            times.append(time.perf_counter() - started)
        record["all_reduce_us"] = statistics.median(times) * 1e6
    if llm.tensor_parallel_rank == 0:
        print("RESULT " + json.dumps(record), flush=True)
    if size > 1:
        dist.destroy_process_group()


def run_ranks(model: Path, tokens: int, size: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(size),
        str(Path(__file__).resolve()),
        "--worker",
        str(model),
        "--tokens",
        str(tokens),
        "--ranks",
        str(size),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{size} rank(s) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def paper_model(weight_bytes: float, layers: int, bandwidth_gbs: float, all_reduce_us: float, ranks: int) -> float:
    """Decode tok/s by the model of docs/TENSOR_PARALLEL.md: each rank streams 1/n of the weights at its share of
    the bandwidth, plus two all-reduces per layer. On one CPU socket the ranks share the bandwidth (`bandwidth_gbs`
    is what all of them together get), so only the all-reduce term changes with n."""
    stream_s = weight_bytes / (bandwidth_gbs * 1e9)
    return 1 / (stream_s + (2 * layers * all_reduce_us * 1e-6 if ranks > 1 else 0.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.tokens, args.ranks)

    from leanlm.bench.machine import describe, memory_bandwidth_gbs

    machine = describe(threads=1)
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; torch {machine['torch']}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        model = write_model(Path(scratch))
        weight_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for repeat in range(args.repeats):
            for size in (1, 2):  # interleaved, so load drift from other jobs hits both
                runs[size].append(run_ranks(model, args.tokens, size))
                print(f"repeat {repeat}: {size} rank(s): {runs[size][-1]}", flush=True)
    bandwidth = {n: memory_bandwidth_gbs(threads=n, size_mib=512) for n in (1, 2)}
    all_reduce_us = statistics.median(r["all_reduce_us"] for r in runs[2])
    layers = SHAPE["num_hidden_layers"]
    report = {"machine": machine, "weight_bytes": weight_bytes, "bandwidth_gbs": bandwidth,
              "all_reduce_us": all_reduce_us, "ranks": {}}  # fmt: skip
    for size in (1, 2):
        measured = statistics.median(r["decode_tok_s"] for r in runs[size])
        predicted = paper_model(weight_bytes, layers, bandwidth[size], all_reduce_us, size)
        report["ranks"][size] = {"decode_tok_s": measured, "paper_model_tok_s": predicted,
                                 "stack": all(r["stack"] for r in runs[size])}  # fmt: skip
    print(json.dumps(report, indent=2))
    print("\n| ranks (1 thread each) | decode tok/s, measured (median) | paper model tok/s | C++ stack |")
    print("|---|---|---|---|")
    for size, row in report["ranks"].items():
        print(f"| {size} | {row['decode_tok_s']:.1f} | {row['paper_model_tok_s']:.1f} | {row['stack']} |")
    print(f"\nweights {weight_bytes / 2**20:.0f} MiB; bandwidth {bandwidth[1]:.1f} GB/s (1 thread), "
          f"{bandwidth[2]:.1f} GB/s (2 threads); gloo all-reduce of one {SHAPE['hidden_size']}-float row: "
          f"{all_reduce_us:.0f} us (median)")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
