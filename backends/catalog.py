"""Which model a request means: per-task defaults and configurable aliases.

The seed systems' clients send no `model` (each endpoint had a default) or name models
this node does not ship (`bge-base-en`, `qwen-coder-1.5b`...). Both resolve here, before
routing, so every backend sees a concrete model id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from backends.types import Task


@dataclass
class ModelCatalog:
    defaults: dict[Task, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, defaults: Mapping[str, str], aliases: Mapping[str, str]) -> ModelCatalog:
        return cls(
            defaults={Task.parse(task): model for task, model in defaults.items() if model},
            aliases=dict(aliases),
        )

    def resolve(self, task: Task, model: str | None) -> str:
        """The concrete model id for a request. Aliases may chain, but never loop."""
        name = (model or "").strip() or self.defaults.get(task) or ""
        seen: set[str] = set()
        while name in self.aliases and name not in seen:
            seen.add(name)
            name = self.aliases[name]
        return name

    def default_for(self, task: Task) -> str | None:
        return self.defaults.get(task)
