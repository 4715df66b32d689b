"""Gemma 3 270M end to end through the README's commands: generate, chat template, eval, quantize (and run the
artifact), unstructured pruning, and a clear refusal where a method assumes Llama's layer."""

import json

import pytest

from leanlm.cli.main import main
from leanlm.formats.assets import fetch_known_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    return str(fetch_known_model("gemma3-270m", quiet=True))


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_and_eval_by_name(capsys, gemma):
    code, out, err = run(
        capsys, "generate", "--model", "gemma3-270m", "The capital of France is", "--max-tokens", 8, "--temperature", 0
    )
    assert code == 0 and "capital" in out, err
    code, out, err = run(
        capsys, "eval", "--model", gemma, "-n", 512, "--context", 256, "--stride", 128, "-q", "--json", "-"
    )
    assert code == 0, err
    result = json.loads(out[out.index("{") :])
    assert 1.0 < result["perplexity"] < 60.0  # a 270M base model on wiki text


def test_quantize_then_run_the_artifact(capsys, tmp_path, gemma):
    folder = tmp_path / "gemma-int8"
    code, _, err = run(capsys, "quantize", "--model", gemma, "--method", "int8", "-o", folder, "--eval-tokens", 256)
    assert code == 0, err
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["sliding_window"] == 512
    code, out, err = run(
        capsys, "generate", "--model", folder, "The capital of France is", "--max-tokens", 8, "--temperature", 0
    )
    assert code == 0 and out.strip(), err


def test_methods_that_assume_llamas_layer_refuse_clearly(capsys, tmp_path, gemma):
    code, _, err = run(capsys, "prune", "--model", gemma, "--method", "layers", "--drop", 2, "-o", tmp_path / "x")
    assert code == 1 and "query/key norms" in err and "unstructured" in err
    assert not (tmp_path / "x").exists()
