"""Topic events for WebSocket subscribers, derived from the node's status report.

The manager offers no change notifications, so each connection compares successive
views of the status report and turns differences into events. The report itself is
taken at most once per `max_age_s` however many clients watch (`SnapshotSource`), and
each view below keeps only what its topic is about, so comparing is cheap.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

Report = dict[str, Any]
State = dict[str, Any]


@dataclass(frozen=True)
class TopicEvent:
    topic: str
    event: str
    data: dict[str, Any]


class SnapshotSource:
    """One status report shared by every connection within `max_age_s`."""

    def __init__(self, report: Callable[[], Report], max_age_s: float) -> None:
        self._report = report
        self._max_age_s = max_age_s
        self._taken_at = -float("inf")
        self._cached: Report = {}

    def get(self) -> Report:
        now = trio.current_time()
        if now - self._taken_at >= self._max_age_s:
            self._cached = self._report()
            self._taken_at = now
        return self._cached

    def fresh(self) -> Report:
        self._taken_at = -float("inf")
        return self.get()


def _backends(report: Report) -> list[dict[str, Any]]:
    manager = report.get("manager") or {}
    return list(manager.get("backends") or [])


def state_of(topic: str, report: Report) -> State:
    """The part of the report a topic's events are about."""
    if topic == "backend":
        return {
            b["id"]: {
                "id": b["id"],
                "name": b.get("name"),
                "type": b.get("type"),
                "status": b.get("status"),
                "status_detail": b.get("status_detail", ""),
                "circuit_open": bool((b.get("circuit") or {}).get("open")),
                "models": {
                    f"{m['task']}:{m['id']}": {"model": m["id"], "task": m["task"], "loaded": bool(m.get("loaded"))}
                    for m in (b.get("capabilities") or {}).get("models", [])
                },
            }
            for b in _backends(report)
        }
    if topic == "inference":
        manager = report.get("manager") or {}
        return {
            "pending_requests": manager.get("pending_requests", 0),
            "backends": {
                b["id"]: {
                    key: (b.get("metrics") or {}).get(key, 0)
                    for key in ("in_flight", "queue_size", "requests_total", "requests_ok", "requests_failed")
                }
                for b in _backends(report)
            },
        }
    if topic == "status":
        manager = report.get("manager") or {}
        counts: dict[str, int] = {}
        loaded: set[str] = set()
        for b in _backends(report):
            counts[b.get("status", "unknown")] = counts.get(b.get("status", "unknown"), 0) + 1
            loaded.update(m["id"] for m in (b.get("capabilities") or {}).get("models", []) if m.get("loaded"))
        return {
            "accepting": manager.get("accepting", True),
            "backends": dict(sorted(counts.items())),
            "models_loaded": sorted(loaded),
            "peers": len(report.get("peers") or []),
        }
    if topic == "peers":
        return {_peer_key(p): p for p in report.get("peers") or []}
    if topic == "metrics":
        manager = report.get("manager") or {}
        return {
            "pending_requests": manager.get("pending_requests", 0),
            "backends": [{"id": b["id"], **(b.get("metrics") or {})} for b in _backends(report)],
        }
    raise ValueError(f"unknown topic {topic!r}")


def snapshot_event(topic: str, state: State) -> TopicEvent:
    """What a new subscriber gets first: the current state, so later events have a base."""
    if topic == "backend":
        data: dict[str, Any] = {"backends": [_backend_public(b) for b in state.values()]}
    elif topic == "peers":
        data = {"peers": list(state.values())}
    else:
        data = dict(state)
    return TopicEvent(topic, "snapshot", data)


def changes(topic: str, old: State, new: State) -> list[TopicEvent]:
    """Events that turn `old` into `new`. Metrics are periodic, not diffed."""
    if topic == "backend":
        return _backend_changes(old, new)
    if topic == "peers":
        joined = [TopicEvent("peers", "peer_joined", {"peer": new[k]}) for k in new if k not in old]
        left = [TopicEvent("peers", "peer_left", {"peer_id": k}) for k in old if k not in new]
        return joined + left
    if topic == "inference" and old != new:
        return [TopicEvent("inference", "activity", dict(new))]
    if topic == "status" and old != new:
        changed = sorted(k for k in new if old.get(k) != new.get(k))
        return [TopicEvent("status", "status_changed", {**new, "changed": changed})]
    return []


def _backend_changes(old: State, new: State) -> list[TopicEvent]:
    events: list[TopicEvent] = []
    for backend_id, now in new.items():
        before = old.get(backend_id)
        if before is None:
            events.append(TopicEvent("backend", "backend_added", {"backend": _backend_public(now)}))
            continue
        if before["status"] != now["status"]:
            events.append(
                TopicEvent(
                    "backend",
                    "backend_status",
                    {
                        "backend_id": backend_id,
                        "status": now["status"],
                        "previous": before["status"],
                        "detail": now["status_detail"],
                    },
                )
            )
        if before["circuit_open"] != now["circuit_open"]:
            name = "circuit_opened" if now["circuit_open"] else "circuit_closed"
            events.append(TopicEvent("backend", name, {"backend_id": backend_id}))
        for key, model in now["models"].items():
            was = before["models"].get(key)
            if was is None:
                events.append(TopicEvent("backend", "model_added", {"backend_id": backend_id, **model}))
            elif was["loaded"] != model["loaded"]:
                name = "model_loaded" if model["loaded"] else "model_unloaded"
                events.append(
                    TopicEvent(
                        "backend", name, {"backend_id": backend_id, "model": model["model"], "task": model["task"]}
                    )
                )
        for key, model in before["models"].items():
            if key not in now["models"]:
                events.append(TopicEvent("backend", "model_removed", {"backend_id": backend_id, **model}))
    for backend_id in old:
        if backend_id not in new:
            events.append(TopicEvent("backend", "backend_removed", {"backend_id": backend_id}))
    return events


def _backend_public(entry: dict[str, Any]) -> dict[str, Any]:
    return {**entry, "models": list(entry["models"].values())}


def _peer_key(peer: Any) -> str:
    if isinstance(peer, dict):
        for key in ("peer_id", "id", "node_id"):
            if isinstance(peer.get(key), str):
                return str(peer[key])
    return json.dumps(peer, sort_keys=True, default=str)
