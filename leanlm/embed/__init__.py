"""Semantic understanding with encoder models: embeddings (Embedder), reranking (CrossEncoder), search (SemanticIndex)."""

from leanlm.embed.embedder import DEFAULT_EMBEDDING_MODEL, Embedder

__all__ = ["DEFAULT_EMBEDDING_MODEL", "Embedder"]
