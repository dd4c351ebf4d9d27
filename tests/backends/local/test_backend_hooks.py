"""How the local backend loads models: one at a time, and telling its owner when one is
ready (the node freezes the new long-lived objects out of the garbage collector's passes)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import trio

from backends.local.backend import LocalBackend, LocalBackendSettings


async def test_each_model_load_is_reported_once_after_it_is_usable(tmp_path: Path) -> None:
    loaded: list[tuple[str, bool]] = []
    backend: LocalBackend

    def on_model_loaded(model: str) -> None:
        loaded.append((model, model in backend.describe()["loaded_models"]))  # type: ignore[operator]

    settings = LocalBackendSettings(
        cache_dir=tmp_path,
        device="cpu",
        chat_models={"tiny": "builtin:tiny-random"},
        embedding_models={},
        rerank_models={},
    )
    backend = LocalBackend(settings, on_model_loaded=on_model_loaded)
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        await backend.load_model("tiny")
        await backend.load_model("tiny")  # already loaded: not reported again
        nursery.cancel_scope.cancel()
    assert loaded == [("tiny", True)]


async def test_models_load_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # transformers' loading is not thread-safe: two at once corrupted one (see LocalBackend).
    guard = threading.Lock()
    active = peak = 0
    real_load = LocalBackend._load_generator

    def watched_load(self: LocalBackend, model: str, source: str) -> object:
        nonlocal active, peak
        with guard:
            active += 1
            peak = max(peak, active)
        time.sleep(0.3)  # the window in which a second load would overlap
        with guard:
            active -= 1
        return real_load(self, model, source)

    monkeypatch.setattr(LocalBackend, "_load_generator", watched_load)
    models = {"a": "builtin:tiny-random", "b": "builtin:tiny-random"}
    settings = LocalBackendSettings(tmp_path, "cpu", chat_models=models, embedding_models={}, rerank_models={})
    backend = LocalBackend(settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        async with trio.open_nursery() as loads:
            loads.start_soon(backend.load_model, "a")
            loads.start_soon(backend.load_model, "b")
        assert sorted(backend.describe()["loaded_models"]) == ["a", "b"]  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    assert peak == 1
