"""Retrieval quality of an embedder on a real corpus: each paragraph of wiki.utf8 is a document, its first
sentence the query (taken out of the document, so the query is not a substring of its answer). Reports recall@1,
nDCG@10 (one relevant document per query) and, against a float32 baseline, the cosine of the embeddings and the
agreement of top-1 results."""

from __future__ import annotations

import re

import numpy as np

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def retrieval_pairs(text: str, max_pairs: int, min_query_chars: int = 40, min_document_chars: int = 150):
    """(queries, documents) from the paragraphs (lines) of a wiki dump, in file order."""
    queries, documents = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("<"):
            continue
        parts = _SENTENCE_END.split(line, maxsplit=1)
        if len(parts) < 2 or len(parts[0]) < min_query_chars or len(parts[1]) < min_document_chars:
            continue
        queries.append(parts[0])
        documents.append(parts[1])
        if len(queries) == max_pairs:
            break
    return queries, documents


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def rankings(query_vectors: np.ndarray, document_vectors: np.ndarray) -> np.ndarray:
    """(Q, D) document indices by cosine, best first."""
    scores = _unit(query_vectors) @ _unit(document_vectors).T
    return np.argsort(-scores, axis=1, kind="stable")


def retrieval_metrics(ranked: np.ndarray) -> dict[str, float]:
    """Query i's relevant document is document i: recall@1, recall@10, nDCG@10 and MRR."""
    truth = np.arange(ranked.shape[0])[:, None]
    rank = np.argmax(ranked == truth, axis=1)  # 0-based position of the relevant document
    ndcg = np.where(rank < 10, 1.0 / np.log2(rank + 2.0), 0.0)
    return {
        "recall@1": float(np.mean(rank == 0)),
        "recall@10": float(np.mean(rank < 10)),
        "ndcg@10": float(np.mean(ndcg)),
        "mrr": float(np.mean(1.0 / (rank + 1.0))),
    }


def agreement(vectors: np.ndarray, baseline: np.ndarray) -> dict[str, float]:
    """Cosine between each embedding and its baseline (mean and min)."""
    cosine = np.sum(_unit(vectors) * _unit(baseline), axis=1)
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}


def top1_agreement(ranked: np.ndarray, baseline_ranked: np.ndarray) -> float:
    return float(np.mean(ranked[:, 0] == baseline_ranked[:, 0]))
