"""`leanlm quantize` on encoders (tiny random BERTs): the artifact reloads to the very embeddings / scores of the
in-memory quantized model, is smaller, and its quantization.json records the quality against float32."""

import json
import warnings

import numpy as np
import pytest
from tiny_encoders import tiny_folder

from leanlm.compress.encoders import quantize_encoder_to_folder
from leanlm.embed import CrossEncoder, Embedder
from leanlm.errors import InvalidRequestError

pytest.importorskip("transformers")
TEXTS = ["the cat sat on the mat", "a dog was good", "query about cats and dogs", "it"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return tiny_folder(root / "embed", "bert")[0], tiny_folder(root / "rerank", "bert", num_labels=1)[0]


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_the_artifact_embeds_as_the_quantized_model_and_records_quality(folders, tmp_path, method):
    source = folders[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # wiki texts are longer than the tiny model's 64 positions
        manifest = quantize_encoder_to_folder(source, method, tmp_path / "out", eval_pairs=8)
    assert manifest["kind"] == "encoder" and manifest["precision"] == method
    quality = manifest["quality"]
    assert quality["pairs"] == 8
    for key in ("recall@1", "ndcg@10", "recall@1_ratio", "ndcg@10_ratio", "top1_agreement", "cosine_mean"):
        assert key in quality, key
    assert 0.5 < quality["cosine_min"] <= quality["cosine_mean"] <= 1.0 + 1e-6
    assert len(manifest["layers"]) == 2 * 4  # 2 layers x (qkv, attn_out, up, down)

    artifact = Embedder(tmp_path / "out")
    assert artifact.precision == method
    assert artifact.encoder.layers[0].adds_residual == (method == "int8")
    np.testing.assert_array_equal(artifact.embed(TEXTS), Embedder(source, precision=method).embed(TEXTS))
    stored = (tmp_path / "out" / "model.safetensors").stat().st_size
    assert stored < (source / "model.safetensors").stat().st_size
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_a_cross_encoder_artifact_scores_as_the_quantized_model(folders, tmp_path):
    source = folders[1]
    manifest = quantize_encoder_to_folder(source, "int8", tmp_path / "ce", eval_pairs=0)
    assert manifest["role"] == "rerank" and "quality" not in manifest
    documents = TEXTS[1:]
    assert CrossEncoder(tmp_path / "ce").score(TEXTS[0], documents) == CrossEncoder(source, precision="int8").score(
        TEXTS[0], documents
    )


def test_bad_requests_name_the_fix(folders, tmp_path):
    source = folders[0]
    with pytest.raises(InvalidRequestError, match="int8 or int4"):
        quantize_encoder_to_folder(source, "gptq", tmp_path / "x")
    quantize_encoder_to_folder(source, "int4", tmp_path / "q4", eval_pairs=0)
    with pytest.raises(InvalidRequestError, match="int4 only"):
        Embedder(tmp_path / "q4", precision="int8")
    assert json.loads((tmp_path / "q4" / "quantization.json").read_text())["layers"]["layers.0.qkv"]["bits"] == 4


def test_the_quantize_cli_takes_an_encoder(folders, tmp_path, capsys):
    from leanlm.cli.main import main

    source = folders[0]
    assert (
        main(["quantize", "--model", str(source), "--method", "int8", "-o", str(tmp_path / "q"), "--eval-pairs", "0"])
        == 0
    )
    assert "int8 encoder: 8 layers" in capsys.readouterr().out
    assert Embedder(tmp_path / "q").precision == "int8"
    assert main(["quantize", "--model", str(source), "--method", "int4", "--bits", "3", "-o", str(tmp_path / "x")]) == 1
    assert "leave out --bits" in capsys.readouterr().err
