"""SemanticIndex: a corpus cut into documents, their embeddings, and cosine top-k search over them.

The embeddings are saved once per (corpus bytes, model, precision, max_seq_length, unit) under
$LEANLM_HOME/indexes, so a second `leanlm search` over the same corpus only embeds the query.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanlm.embed.embedder import Embedder
from leanlm.errors import InvalidRequestError
from leanlm.formats.assets import leanlm_home

UNITS = ("paragraph", "line")


def split_documents(text: str, unit: str) -> list[str]:
    """Paragraphs (blocks between blank lines) or non-empty lines, whitespace-trimmed."""
    if unit not in UNITS:
        raise InvalidRequestError(f"Unknown unit {unit!r}; use one of: {', '.join(UNITS)}.")
    pieces = re.split(r"\n\s*\n", text) if unit == "paragraph" else text.splitlines()
    return [piece.strip() for piece in pieces if piece.strip()]


@dataclass
class Hit:
    index: int
    score: float
    text: str


class SemanticIndex:
    def __init__(self, embedder: Embedder, documents: list[str], vectors: np.ndarray):
        self.embedder, self.documents = embedder, documents
        norms = np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        self.vectors = (vectors / norms).astype(np.float32)  # unit rows: a dot product is the cosine

    @classmethod
    def from_corpus(cls, embedder: Embedder, corpus: Path, unit: str = "paragraph", rebuild: bool = False):
        """(index, whether it was reused from the cache)."""
        data = Path(corpus).read_bytes()
        documents = split_documents(data.decode("utf-8", errors="replace"), unit)
        if not documents:
            raise InvalidRequestError(f"{corpus} holds no text to index.")
        key = hashlib.sha256(
            data + f"|{embedder.path.resolve()}|{embedder.precision}|{embedder.max_seq_length}|{unit}".encode()
        ).hexdigest()[:24]
        cached = leanlm_home() / "indexes" / f"{key}.npy"
        if cached.is_file() and not rebuild:
            vectors = np.load(cached)
            if vectors.shape == (len(documents), embedder.dimension):
                return cls(embedder, documents, vectors), True
        vectors = embedder.embed(documents)
        cached.parent.mkdir(parents=True, exist_ok=True)
        with open(cached.with_suffix(".tmp"), "wb") as handle:
            np.save(handle, vectors)
        cached.with_suffix(".tmp").replace(cached)
        return cls(embedder, documents, vectors), False

    def search(self, query: str, top_k: int = 5) -> list[Hit]:
        if top_k < 1:
            raise InvalidRequestError(f"top_k must be at least 1, got {top_k}.")
        query_vector = self.embedder.embed([query])[0]
        query_vector = query_vector / max(float(np.linalg.norm(query_vector)), 1e-12)
        scores = self.vectors @ query_vector
        best = np.argsort(-scores, kind="stable")[:top_k]
        return [Hit(int(i), float(scores[i]), self.documents[i]) for i in best]
