"""`leanlm quantize` for an encoder (an embedding model or a cross-encoder): quantize its layers' linear layers to
int8 (W8A8, per-token activation scales, SmoothQuant calibrated on c4) or int4 (round-to-nearest, groups of 32),
write the artifact (embed/artifact.py) and record in quantization.json what it cost against float32: the embeddings'
cosine to float32 and retrieval on wiki.utf8 paragraphs (recall@1, nDCG@10 and their ratio to float32, top-1
agreement), measured on the artifact as written (reloaded from disk).

Level 4 (measurement), because the manifest records evaluate/'s retrieval figures.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np

from leanlm.compress.artifact import atomic_folder
from leanlm.embed import CrossEncoder, Embedder
from leanlm.embed.artifact import write_encoder_artifact
from leanlm.embed.loading import encoder_role
from leanlm.errors import InvalidRequestError
from leanlm.evaluate.retrieval import agreement, rankings, retrieval_metrics, retrieval_pairs, top1_agreement
from leanlm.formats.quantized_folder import MANIFEST
from leanlm.kernels.threads import scoped_threads
from leanlm.layers.int8_linear import Int8DynamicLinear
from leanlm.layers.quantized_linear import QuantizedLinear

ENCODER_METHODS = ("int8", "int4")
EVALUATION_CORPUS = "wiki.utf8 (the evaluation corpus): paragraph = document, its first sentence = query"


def quantize_encoder_to_folder(
    model, method: str, output, *, threads: int | None = None, eval_pairs: int = 300
) -> dict:
    """Quantize the encoder `model` to `method` and write the folder `output` (atomically); `eval_pairs` wiki
    queries measure retrieval against float32 (0 = skip; a cross-encoder gets its scores compared instead).
    Returns quantization.json as written."""
    if method not in ENCODER_METHODS:
        raise InvalidRequestError(
            f"Encoders quantize with --method {' or '.join(ENCODER_METHODS)} (int8: W8A8 with per-token scales; "
            f"int4: groups of 32), not {method!r}."
        )
    role = encoder_role(model)
    if role is None:
        raise InvalidRequestError(f"{model} is not an encoder (BERT / XLM-RoBERTa folder or known embedding model).")
    load = Embedder if role == "embedding" else CrossEncoder
    with scoped_threads(threads):
        started = time.perf_counter()
        quantized = load(model, precision=method)
        seconds = round(time.perf_counter() - started, 1)
        manifest = {
            "method": method,
            "precision": method,
            "role": role,
            "source": str(quantized.path),
            "report": _sizes(quantized.encoder) | {"seconds": seconds},
        }
        if method == "int8":
            manifest["calibration"] = "c4.utf8: 64 texts, at most 128 tokens (SmoothQuant alpha 0.65)"
        with atomic_folder(output) as scratch:
            write_encoder_artifact(quantized.path, quantized.encoder, scratch, manifest)
            if eval_pairs:
                reference, artifact = load(model, precision="float32"), load(scratch)
                measure = measure_embedding_quality if role == "embedding" else measure_rerank_quality
                manifest["quality"] = measure(artifact, reference, eval_pairs)
                written = json.loads((scratch / MANIFEST).read_text())
                (scratch / MANIFEST).write_text(json.dumps(written | {"quality": manifest["quality"]}, indent=2))
    return json.loads((Path(output) / MANIFEST).read_text())


def _sizes(encoder) -> dict:
    dense = quantized = layers = 0
    for module in encoder.modules():
        if isinstance(module, Int8DynamicLinear):
            dense += module.in_features * module.out_features * 4
            quantized += module.codes_t.numel() + module.weight_scale.numel() * 4
            layers += 1
        elif isinstance(module, QuantizedLinear):
            dense += module.in_features * module.out_features * 4
            quantized += module.codes.numel() * module.bits // 8 + module.scale.numel() * 4
            quantized += 0 if module.offset is None else module.offset.numel() * 4
            layers += 1
    return {"quantized_layers": layers, "dense_bytes": dense, "quantized_bytes": quantized}


def measure_embedding_quality(embedder: Embedder, reference: Embedder, pairs: int) -> dict:
    """Retrieval with `embedder` and with the float32 `reference` on the same wiki pairs, and how close they are."""
    from leanlm.formats.corpus import evaluation_text

    queries, documents = retrieval_pairs(evaluation_text(quiet=True), max_pairs=pairs)
    with warnings.catch_warnings():  # long paragraphs are cut at max_seq_length, as the benchmark does
        warnings.simplefilter("ignore")
        ours = embedder.embed(queries), embedder.embed(documents)
        base = reference.embed(queries), reference.embed(documents)
    ranked, base_ranked = rankings(*ours), rankings(*base)
    metrics, base_metrics = retrieval_metrics(ranked), retrieval_metrics(base_ranked)
    return {
        "corpus": EVALUATION_CORPUS,
        "pairs": len(queries),
        "recall@1": metrics["recall@1"],
        "ndcg@10": metrics["ndcg@10"],
        "float32_recall@1": base_metrics["recall@1"],
        "float32_ndcg@10": base_metrics["ndcg@10"],
        "recall@1_ratio": metrics["recall@1"] / max(base_metrics["recall@1"], 1e-12),
        "ndcg@10_ratio": metrics["ndcg@10"] / max(base_metrics["ndcg@10"], 1e-12),
        "top1_agreement": top1_agreement(ranked, base_ranked),
        **agreement(np.concatenate(ours), np.concatenate(base)),  # cosine_mean, cosine_min to float32
    }


def measure_rerank_quality(reranker: CrossEncoder, reference: CrossEncoder, pairs: int) -> dict:
    """Each wiki query scored against its own and 9 other documents: the top-1 agreement with float32 and the
    largest score difference."""
    from leanlm.formats.corpus import evaluation_text

    queries, documents = retrieval_pairs(evaluation_text(quiet=True), max_pairs=pairs)
    agree, largest = 0, 0.0
    for i, query in enumerate(queries):
        candidates = [documents[(i + j) % len(documents)] for j in range(min(10, len(documents)))]
        ours, base = reranker.score(query, candidates), reference.score(query, candidates)
        agree += int(np.argmax(ours) == np.argmax(base))
        largest = max(largest, float(np.max(np.abs(np.asarray(ours) - np.asarray(base)))))
    return {
        "corpus": EVALUATION_CORPUS,
        "pairs": len(queries),
        "top1_agreement": agree / len(queries),
        "score_max_difference": largest,
    }
