"""`GET /v1/status` and `GET /admin/stats`: loaded models, memory in use and the model cache.

Seed 003's admin stats tracked the loaded models, the LRU model cache and GPU memory; seed
000's `/v1/status` was where operators looked to see which models were up. Both answer the
same facts here, `/v1/status` alongside the node's full status report.

Memory: this process's resident set and the machine's RAM from /proc; GPU memory per device
from `nvidia-smi` (device-wide: it counts a vLLM server this node supervises too) and, where
this process itself has initialised CUDA, torch's allocator figures for it. With no GPU,
`gpu` is an empty list and `gpu_available` false.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio
from fastapi import APIRouter

from backends.gpu.hardware import GpuInfo, detect_hardware
from backends.manager import BackendManager
from backends.types import BackendType

MIB = 1024 * 1024
GPU_QUERY_TTL_S = 2.0  # pollers share one nvidia-smi run
NVIDIA_SMI_TIMEOUT_S = 5.0


def process_rss_bytes() -> int | None:
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def system_memory() -> dict[str, int | None]:
    facts: dict[str, int | None] = {"total_bytes": None, "available_bytes": None}
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return facts
    for line in lines:
        key, _, rest = line.partition(":")
        fields = rest.split()
        if key in ("MemTotal", "MemAvailable") and fields and fields[0].isdigit():
            facts["total_bytes" if key == "MemTotal" else "available_bytes"] = int(fields[0]) * 1024
    return facts


def torch_cuda_memory() -> dict[int, dict[str, int]]:
    """This process's CUDA allocator figures, per device; empty unless it has initialised CUDA.

    torch is only looked at when already imported: importing it here would cost seconds."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {}
    return {
        index: {
            "process_allocated_bytes": int(torch.cuda.memory_allocated(index)),
            "process_reserved_bytes": int(torch.cuda.memory_reserved(index)),
        }
        for index in range(torch.cuda.device_count())
    }


class GpuProbe:
    """nvidia-smi, run off the event loop and at most once per GPU_QUERY_TTL_S."""

    def __init__(self) -> None:
        self._cached: tuple[float, tuple[GpuInfo, ...]] | None = None
        self._lock = trio.Lock()

    async def gpus(self) -> tuple[GpuInfo, ...]:
        async with self._lock:
            now = trio.current_time()
            if self._cached is None or now - self._cached[0] > GPU_QUERY_TTL_S:
                probe = partial(detect_hardware, use_torch=False, nvidia_smi_timeout_s=NVIDIA_SMI_TIMEOUT_S)
                hardware = await trio.to_thread.run_sync(probe, abandon_on_cancel=True)
                self._cached = (trio.current_time(), hardware.cuda_gpus)
            return self._cached[1]


async def memory_report(probe: GpuProbe) -> dict[str, Any]:
    allocator = torch_cuda_memory()
    gpus: list[dict[str, Any]] = []
    for gpu in await probe.gpus():
        gpus.append(
            {
                "index": gpu.index,
                "name": gpu.name,
                "total_bytes": gpu.memory_total_mib * MIB if gpu.memory_total_mib is not None else None,
                "used_bytes": gpu.memory_used_mib * MIB if gpu.memory_used_mib is not None else None,
                **allocator.pop(gpu.index, {}),
            }
        )
    # Devices torch sees that nvidia-smi did not report (no nvidia-smi on PATH).
    gpus.extend({"index": index, "name": None, **facts} for index, facts in sorted(allocator.items()))
    return {
        "process_rss_bytes": process_rss_bytes(),
        "system": system_memory(),
        "gpu_available": bool(gpus),
        "gpu": gpus,
    }


def model_report(manager: BackendManager) -> dict[str, Any]:
    loaded: dict[tuple[str, str], dict[str, Any]] = {}
    available: set[str] = set()
    caches: list[dict[str, Any]] = []
    for backend in manager.backends():
        for card in backend.capabilities.models:
            available.add(card.id)
            if card.loaded:
                entry = loaded.setdefault(
                    (backend.id, card.id),
                    {"id": card.id, "tasks": [], "backend": backend.id, "backend_type": backend.backend_type.value},
                )
                entry["tasks"].append(card.task.value)
        if backend.backend_type is BackendType.LOCAL:
            details = backend.describe()
            in_cache = details.get("loaded_models")
            models = list(in_cache) if isinstance(in_cache, dict) else []
            limit = details.get("max_loaded_models")
            caches.append(
                {
                    "backend": backend.id,
                    "device": details.get("device"),
                    "policy": "lru",
                    "size": len(models),
                    "max_size": limit if isinstance(limit, int) else None,
                    "models": models,  # least recently used first: the next to be evicted
                }
            )
    return {
        "loaded_models": sorted(loaded.values(), key=lambda m: (m["id"], m["backend"])),
        "model_counts": {"loaded": len({m["id"] for m in loaded.values()}), "available": len(available)},
        "cache": {
            "size": sum(c["size"] for c in caches),
            "max_size": sum(c["max_size"] or 0 for c in caches),
            "backends": caches,
        },
    }


def build_router(manager: BackendManager, node_status: Callable[[], dict[str, Any]]) -> APIRouter:
    router = APIRouter()
    probe = GpuProbe()
    started = time.time()

    async def stats() -> dict[str, Any]:
        return {
            "status": "ok" if manager.accepting else "shutting_down",
            **model_report(manager),
            "memory": await memory_report(probe),
            "requests": {"pending": manager.pending, "max_pending": manager.settings.max_pending_requests},
        }

    @router.get("/v1/status")
    async def status_v1() -> dict[str, Any]:
        """The node's status report with the loaded models, memory and cache."""
        return {**node_status(), **(await stats())}

    @router.get("/admin/stats")
    async def admin_stats() -> dict[str, Any]:
        """Seed 003's admin view: loaded models, memory in use, cache state."""
        return {"uptime_s": round(time.time() - started, 1), **(await stats())}

    return router
