"""Start-up objects are frozen out of the collector's passes; start-up garbage is not."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from p2p_node.heap import freeze_after_loading, freeze_startup_heap


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


@pytest.fixture
def unfrozen_afterwards() -> Iterator[None]:
    yield
    gc.unfreeze()  # other tests expect a collector that sees everything


def test_startup_garbage_is_freed_and_the_rest_frozen(unfrozen_afterwards: None) -> None:
    kept = Node()
    garbage = Node()
    freed = weakref.ref(garbage)
    del garbage
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    frozen = freeze_startup_heap()
    assert freed() is None  # collected first, not frozen for ever
    assert frozen == gc.get_freeze_count() > 1000
    assert kept.me is kept


def test_a_model_loaded_later_is_frozen_too(unfrozen_afterwards: None) -> None:
    gc.unfreeze()
    freeze_startup_heap()
    before = gc.get_freeze_count()
    weights = [Node() for _ in range(500)]  # what a model load leaves behind, long-lived
    freeze_after_loading("tiny")
    assert gc.get_freeze_count() >= before + 500
    assert all(w.me is w for w in weights)
