"""Embedder: texts -> one vector each, with the model's own sentence-transformers pipeline.

    from leanlm import Embedder
    embedder = Embedder("all-minilm-l6-v2")             # or an HF/sentence-transformers folder
    vectors = embedder.embed(["a sentence", "another"])  # numpy (2, 384) float32, L2-normalized for this model

Texts are tokenized, cut at `max_seq_length` (with a warning, as sentence-transformers does silently), sorted by
length and run in batches, so a batch pads to texts of similar lengths; each text gets the vector it gets alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from leanlm.embed.batching import length_sorted_batches, pad_batch
from leanlm.embed.loading import load_encoder_folder
from leanlm.embed.pooling import pool
from leanlm.embed.precision import check_precision
from leanlm.errors import InvalidRequestError
from leanlm.formats.sentence_config import read_sentence_pipeline
from leanlm.kernels.threads import scoped_threads

DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


class Embedder:
    def __init__(
        self,
        model: str | Path = DEFAULT_EMBEDDING_MODEL,
        precision: str = "float32",
        max_seq_length: int | None = None,
        batch_size: int = 32,
        threads: int | None = None,
    ):
        check_precision(precision)
        if batch_size < 1:
            raise InvalidRequestError(f"batch_size must be at least 1, got {batch_size}.")
        loaded = load_encoder_folder(model, precision)
        self.path, self.config, self.encoder, self.tokenizer = (
            loaded.path,
            loaded.config,
            loaded.encoder,
            loaded.tokenizer,
        )
        self.pipeline = read_sentence_pipeline(self.path)
        self.precision, self.batch_size, self.threads = loaded.precision, batch_size, threads
        self.name = str(model)
        limit = self.config.max_tokens
        wanted = max_seq_length or self.pipeline.max_seq_length or limit
        if not 1 <= wanted <= limit:
            raise InvalidRequestError(f"max_seq_length must be between 1 and {limit} for this model, got {wanted}.")
        self.max_seq_length = wanted
        self.tokenizer.enable_truncation(self.max_seq_length)
        with torch.inference_mode():
            self.dimension = int(self._vectors_of(self.tokenize(["a"])[0]).shape[1])

    # ---- tokens -------------------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids per text (special tokens added, cut at max_seq_length) and whether each was cut."""
        if self.pipeline.do_lower_case:
            texts = [text.lower() for text in texts]
        encodings = self.tokenizer.encode_batch(list(texts))
        return [e.ids for e in encodings], [bool(e.overflowing) for e in encodings]

    # ---- embeddings ---------------------------------------------------------------------------------------------

    def embed(self, texts: str | Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """(N, dimension) float32 embeddings (a single string gives (1, dimension))."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
        if bad is not None:
            raise InvalidRequestError(f"texts[{bad}] is a {type(texts[bad]).__name__}; pass strings.")
        ids, cut = self.tokenize(texts)
        if any(cut):
            warnings.warn(
                f"{sum(cut)} of {len(texts)} texts are longer than max_seq_length={self.max_seq_length} tokens and "
                "were truncated (as sentence-transformers does); only their beginning is embedded.",
                stacklevel=2,
            )
        return self.embed_token_ids(ids, batch_size)

    def embed_token_ids(self, token_ids: Sequence[Sequence[int]], batch_size: int | None = None) -> np.ndarray:
        """Embeddings of token-id lists given as they are (no special tokens added, no cutting)."""
        for i, row in enumerate(token_ids):
            if not 1 <= len(row) <= self.config.max_tokens:
                raise InvalidRequestError(
                    f"token list {i} has {len(row)} tokens; this model takes 1 to {self.config.max_tokens}."
                )
            if min(row) < 0 or max(row) >= self.config.vocab_size:
                raise InvalidRequestError(
                    f"token list {i} holds ids outside the vocabulary (0..{self.config.vocab_size - 1})."
                )
        out = np.zeros((len(token_ids), self.dimension), dtype=np.float32)
        with torch.inference_mode(), scoped_threads(self.threads):
            for batch in length_sorted_batches(token_ids, batch_size or self.batch_size):
                out[batch] = self._vectors_of([token_ids[i] for i in batch]).numpy()
        return out

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int = 32,
        normalize_embeddings: bool = False,
        convert_to_numpy: bool = True,
    ):
        """sentence-transformers' signature: a 1-D vector for one string, (N, D) for a list."""
        vectors = self.embed(sentences, batch_size)
        if normalize_embeddings:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        result = vectors[0] if isinstance(sentences, str) else vectors
        return result if convert_to_numpy else torch.from_numpy(result)

    def _vectors_of(self, rows: list[list[int]]) -> torch.Tensor:
        ids, mask, types = pad_batch(rows, self.config.pad_token_id)
        hidden = self.encoder(ids, mask, types)
        vectors = pool(hidden, mask, self.pipeline.pooling)
        for dense in self.pipeline.dense:
            vectors = dense(vectors)
        if self.pipeline.normalize:
            vectors = F.normalize(vectors, p=2, dim=-1)
        return vectors.float()

    def __repr__(self) -> str:
        return (
            f"Embedder({self.name!r}, precision={self.precision!r}, dimension={self.dimension}, "
            f"max_seq_length={self.max_seq_length}, pooling={'+'.join(self.pipeline.pooling)}, "
            f"normalize={self.pipeline.normalize})"
        )
