"""Encoder families on tiny random configs against transformers: hidden states with padding, the classification
heads, the reference attention, each fast precision against its reference, and sentence-transformers' pipeline
(pooling, Dense, Normalize) read from the model's own files."""

import json
import warnings

import numpy as np
import pytest
import torch
from tiny_encoders import tiny_folder, tiny_model, word_tokenizer

from leanlm.embed import CrossEncoder, Embedder
from leanlm.embed.precision import apply_precision
from leanlm.layers.int8_linear import Int8DynamicLinear
from leanlm.models.encoders import load_encoder

FAMILIES = ["bert", "xlm-roberta"]


def leanlm_encoder(model):
    raw = model.config.to_dict() | {"architectures": [type(model).__name__]}  # as save_pretrained writes it
    _, encoder = load_encoder(raw, model.state_dict())
    return encoder


def padded_batch(family: str):
    """Three rows of different lengths, right-padded with the family's pad id (BERT 0, XLM-R 1)."""
    pad = 0 if family == "bert" else 1
    rows = [[2, 7, 8, 9, 10, 11, 3], [2, 12, 3], [2, 5, 6, 13, 3]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_equal_transformers_with_padding(family):
    model = tiny_model(family)
    ids, mask = padded_batch(family)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = leanlm_encoder(model)(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_classification_heads_equal_transformers(family):
    model = tiny_model(family, num_labels=3)
    ids, mask = padded_batch(family)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        encoder = leanlm_encoder(model)
        ours = encoder.classify(encoder(ids, mask))
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


def test_bert_token_types_are_read():
    model = tiny_model("bert")
    ids, mask = padded_batch("bert")
    types = (torch.arange(ids.shape[1]) >= 2).long().expand_as(ids) * mask
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        ours = leanlm_encoder(model)(ids, mask, types)
    torch.testing.assert_close(ours[mask.bool()], expected[mask.bool()], atol=2e-5, rtol=1e-4)


def test_sdpa_equals_the_reference_attention_formula():
    encoder = leanlm_encoder(tiny_model("bert"))
    ids, mask = padded_batch("bert")
    with torch.no_grad():
        fast = encoder(ids, mask)
        for layer in encoder.layers:
            layer.reference = True
        reference = encoder(ids, mask)
    torch.testing.assert_close(fast[mask.bool()], reference[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("smoothed", [False, True])
def test_int8_linear_equals_its_reference_and_stays_near_float(smoothed):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(5, 7, 96) * torch.logspace(-2, 1, 7)[None, :, None]  # rows of very different scales
    x[..., 3] *= 30  # an outlier channel, as BERT's LayerNorm outputs have
    absmax = x.abs().amax(dim=(0, 1)) if smoothed else None
    layer = Int8DynamicLinear.from_linear(linear, absmax)
    with torch.no_grad():
        fast, reference, exact = layer(x), layer.reference_forward(x), linear(x)
        solo = torch.stack([layer(x[:, t : t + 1])[:, 0] for t in range(7)], dim=1)
        residual = torch.randn(5, 7, 40)
        fused_plus = layer(x, residual)
        layer.kernel = "int_mm"  # the same steps as torch ops: leanlm's fused kernels must give the same bits
        assert torch.equal(layer(x), fast)
        assert torch.equal(layer(x, residual), fused_plus) and torch.equal(fused_plus, residual + fast)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)  # int32 sums are exact; float32 rounding only
    assert torch.equal(fast, solo)  # per-token scales: a row's result does not depend on its batch
    relative = (fast - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert relative.max() < 0.05, relative.max()  # on a real model, smoothing helps: see test_embeddings.py


@pytest.mark.parametrize(("precision", "min_cosine"), [("bf16", 0.999), ("int8", 0.995), ("int4", 0.95)])
def test_fast_precisions_stay_close_to_float32(precision, min_cosine):
    model = tiny_model("bert", hidden_size=64, intermediate_size=128)
    ids, mask = padded_batch("bert")
    with torch.no_grad():
        reference = leanlm_encoder(model)(ids, mask)
        fast = apply_precision(leanlm_encoder(model), precision)(ids, mask).float()
    real = mask.bool()
    cosine = torch.nn.functional.cosine_similarity(fast[real], reference[real], dim=-1)
    assert cosine.min() > min_cosine, (precision, cosine.min())


def write_sentence_files(folder, pooling: str, dense_out: int | None, normalize: bool):
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, f"pooling_mode_{pooling}": True})
    )
    if dense_out:
        from safetensors.torch import save_file

        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        (folder / "2_Dense").mkdir()
        (folder / "2_Dense" / "config.json").write_text(
            json.dumps(
                {
                    "in_features": 32,
                    "out_features": dense_out,
                    "bias": True,
                    "activation_function": "torch.nn.modules.activation.Tanh",
                }
            )
        )
        torch.manual_seed(1)
        save_file(
            {"linear.weight": torch.randn(dense_out, 32) * 0.2, "linear.bias": torch.randn(dense_out) * 0.1},
            str(folder / "2_Dense" / "model.safetensors"),
        )
    if normalize:
        modules.append({"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12, "do_lower_case": False}))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "pad_token": "[PAD]",
                "cls_token": "[CLS]",
                "sep_token": "[SEP]",
                "unk_token": "[UNK]",
                "model_max_length": 64,
            }
        )
    )


TEXTS = ["the cat sat on the mat", "a dog", "query about cats and dogs", "it was good", "the " * 20 + "end"]


@pytest.mark.parametrize(
    ("pooling", "dense_out", "normalize"),
    [("mean_tokens", None, True), ("cls_token", 16, False), ("max_tokens", None, False), ("lasttoken", 8, True)],
)
def test_sentence_pipeline_equals_sentence_transformers(tmp_path, pooling, dense_out, normalize):
    st = pytest.importorskip("sentence_transformers")
    folder, _ = tiny_folder(tmp_path / "model", "bert")
    write_sentence_files(folder, pooling, dense_out, normalize)
    expected = st.SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = Embedder(folder, batch_size=2).embed(TEXTS)  # the last text is cut at max_seq_length=12
    assert any("truncated" in str(w.message) for w in caught)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=1e-4)


def test_cross_encoder_scores_equal_transformers(tmp_path):
    folder, model = tiny_folder(tmp_path / "ce", "bert", num_labels=1)
    tokenizer, _ = word_tokenizer("bert")
    documents = ["the cat sat on the mat", "dogs", "a document about cats"]
    encodings = tokenizer.encode_batch([("cats", d) for d in documents])
    with torch.no_grad():
        expected = [
            torch.sigmoid(model(input_ids=torch.tensor([e.ids]), token_type_ids=torch.tensor([e.type_ids])).logits)[
                0, 0
            ]
            for e in encodings
        ]
    scores = CrossEncoder(folder, batch_size=2).score("cats", documents)
    np.testing.assert_allclose(scores, [float(x) for x in expected], atol=1e-5)


def test_int8_calibration_fits_a_short_context_and_xlm_roberta(tmp_path):
    folder, _ = tiny_folder(tmp_path / "xlmr", "xlm-roberta")  # 64 positions: calibration text must be cut to fit
    texts = ["the cat sat on the mat", "a dog", "query about cats and dogs"]
    reference, int8 = Embedder(folder).embed(texts), Embedder(folder, precision="int8").embed(texts)
    cosine = np.sum(reference * int8, axis=1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(int8, axis=1)
    assert cosine.min() > 0.99, cosine
