"""The local backend tells its owner when a model finished loading (the node freezes the
new long-lived objects out of the garbage collector's passes then)."""

from __future__ import annotations

from pathlib import Path

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
