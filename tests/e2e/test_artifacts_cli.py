"""Every README command that takes --model works on every kind of model leanlm reads or writes: the default GGUF,
a Hugging Face folder, a folder written by `leanlm quantize` and one written by `leanlm prune`.

Smallest settings throughout: this checks that each command loads and runs each artifact, not quality or speed."""

import io
import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from leanlm.cli.main import main
from leanlm.compress.artifact import hf_config_dict
from leanlm.compress.config import QuantConfig
from leanlm.compress.pipelines import prune_to_folder, quantize_to_folder
from leanlm.compress.prune.config import PruneConfig
from leanlm.models.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

KINDS = ["gguf", "hf-folder", "quantized", "pruned"]


@pytest.fixture(scope="module")
def artifacts(default_gguf_path, tmp_path_factory) -> dict:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("artifacts")
    hf = root / "hf"  # a plain Hugging Face folder: HF tensor names, config.json, tokenizer.json
    checkpoint = load_checkpoint(default_gguf_path, torch.bfloat16)
    hf.mkdir()
    save_file({name: t.contiguous() for name, t in checkpoint.weights.items()}, hf / "model.safetensors")
    config = hf_config_dict(checkpoint.config) | {"tie_word_embeddings": checkpoint.config.tie_word_embeddings}
    (hf / "config.json").write_text(json.dumps(config))
    checkpoint.tokenizer.to_folder_files(hf)
    quantized, pruned = root / "quantized", root / "pruned"
    quantize_to_folder(default_gguf_path, QuantConfig("int4", group_size=32), quantized, eval_tokens=0, progress=False)
    prune_to_folder(
        default_gguf_path,
        PruneConfig("layers", drop_layers=2, calibration_samples=1, calibration_length=16),
        pruned,
        eval_tokens=0,
        progress=False,
    )
    return {"gguf": default_gguf_path, "hf-folder": hf, "quantized": quantized, "pruned": pruned}


def cli(*arguments: str, stdin: str | None = None, monkeypatch=None) -> None:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main([str(a) for a in arguments]) == 0, arguments


@pytest.mark.parametrize("kind", KINDS)
def test_in_process_commands_run_on_every_artifact(kind, artifacts, tmp_path, capsys, monkeypatch):
    model = ["--model", artifacts[kind], "--threads", "2"]
    cli("generate", *model, "The capital of France is", "-n", "4", "--temperature", "0")
    assert capsys.readouterr().out.strip()
    cli("chat", *model, "-n", "4", "--temperature", "0", stdin="Hi!\n/exit\n", monkeypatch=monkeypatch)
    assert capsys.readouterr().out.strip()
    cli("eval", *model, "-n", "64", "--context", "32", "--stride", "16", "-q", "--json", tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text())["perplexity"] > 1
    cli("quantize", *model, "--method", "int8", "--eval-tokens", "0", "-o", tmp_path / "q8")
    cli("prune", *model, "--method", "magnitude", "--sparsity", "0.1", "--eval-tokens", "0", "-o", tmp_path / "mag")
    for written in ("q8", "mag"):  # what they wrote loads and runs too
        cli("generate", "--model", tmp_path / written, "Hello", "-n", "2", "--temperature", "0")


@pytest.mark.parametrize("kind", KINDS)
def test_bench_and_serve_run_on_every_artifact(kind, artifacts, tmp_path):
    model = ["--model", str(artifacts[kind]), "--threads", "2"]
    cli("bench", *model, "-r", "1", "--prompt-tokens", "8", "--gen-tokens", "2", "--json", tmp_path / "bench.json")
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert row["decode_tok_s"]["median"] > 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "leanlm.cli.main", "serve", *model, "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.2)
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        body = {"model": name, "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
