"""Semantic understanding with encoder models: embeddings (Embedder), reranking (CrossEncoder), search."""

from leanlm.embed.embedder import DEFAULT_EMBEDDING_MODEL, Embedder
from leanlm.embed.index import SemanticIndex
from leanlm.embed.rerank import CrossEncoder

__all__ = ["DEFAULT_EMBEDDING_MODEL", "CrossEncoder", "Embedder", "SemanticIndex"]
