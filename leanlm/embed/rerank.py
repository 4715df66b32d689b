"""CrossEncoder: scores (query, document) pairs with a sequence-classification encoder (HF
`BertForSequenceClassification`, `XLMRobertaForSequenceClassification`). The relevance score is what
sentence-transformers' CrossEncoder gives for one label, sigmoid(logit); with several labels, the softmax
probability of the last one ("relevant")."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from leanlm.embed.batching import length_sorted_batches, pad_batch
from leanlm.embed.loading import load_encoder_folder
from leanlm.errors import InvalidRequestError, ModelFormatError
from leanlm.kernels.threads import scoped_threads


class CrossEncoder:
    def __init__(
        self,
        model: str | Path,
        precision: str = "float32",
        max_length: int | None = None,
        batch_size: int = 32,
        threads: int | None = None,
    ):
        loaded = load_encoder_folder(model, precision)
        if loaded.config.head == "none":
            raise ModelFormatError(
                f"{loaded.path} is a bare encoder; reranking needs a cross-encoder (*ForSequenceClassification)."
            )
        self.path, self.config, self.encoder, self.tokenizer = (
            loaded.path,
            loaded.config,
            loaded.encoder,
            loaded.tokenizer,
        )
        self.name, self.batch_size, self.threads = str(model), batch_size, threads
        self.max_length = min(max_length or self.config.max_tokens, self.config.max_tokens)
        self.tokenizer.enable_truncation(self.max_length, strategy="longest_first")

    def tokenize_pairs(
        self, query: str, documents: Sequence[str]
    ) -> tuple[list[list[int]], list[list[int]], list[bool]]:
        encodings = self.tokenizer.encode_batch([(query, document) for document in documents])
        return [e.ids for e in encodings], [e.type_ids for e in encodings], [bool(e.overflowing) for e in encodings]

    def logits(self, query: str, documents: Sequence[str]) -> torch.Tensor:
        """(len(documents), num_labels) raw logits."""
        ids, types, _ = self.tokenize_pairs(query, documents)
        out = torch.zeros(len(ids), self.config.num_labels)
        with torch.inference_mode(), scoped_threads(self.threads):
            for batch in length_sorted_batches(ids, self.batch_size):
                input_ids, mask, type_ids = pad_batch(
                    [ids[i] for i in batch], self.config.pad_token_id, [types[i] for i in batch]
                )
                if self.config.type_vocab_size == 1:
                    type_ids = torch.zeros_like(type_ids)
                out[batch] = self.encoder.classify(self.encoder(input_ids, mask, type_ids))
        return out

    def score(self, query: str, documents: Sequence[str]) -> list[float]:
        """One relevance score in [0, 1] per document."""
        if not documents:
            raise InvalidRequestError("documents is empty; pass at least one document to score.")
        logits = self.logits(query, documents)
        scores = torch.sigmoid(logits[:, 0]) if self.config.num_labels == 1 else logits.softmax(-1)[:, -1]
        return scores.tolist()

    def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None) -> list[tuple[int, float]]:
        """(index, score) pairs, best first, the first `top_n` of them."""
        scores = self.score(query, documents)
        ranked = sorted(enumerate(scores), key=lambda pair: -pair[1])
        return ranked[: top_n or len(ranked)]
