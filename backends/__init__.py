"""Backends and the manager that routes requests between them.

The public surface: the request/result vocabulary (`backends.types`), the exception
tree (`backends.errors`), the `Backend` interface and the `BackendManager`. Concrete
backends live in subpackages (`backends.local`, ...) and are imported by the node's
composition root, so importing this package never loads torch.
"""

from backends.base import Backend
from backends.catalog import ModelCatalog
from backends.errors import InferenceError
from backends.manager import BackendManager, ManagerSettings
from backends.strategies import Strategy
from backends.types import BackendStatus, BackendType, Capabilities, ModelCard, RequestContext, Task

__all__ = [
    "Backend",
    "BackendManager",
    "BackendStatus",
    "BackendType",
    "Capabilities",
    "InferenceError",
    "ManagerSettings",
    "ModelCard",
    "ModelCatalog",
    "RequestContext",
    "Strategy",
    "Task",
]
