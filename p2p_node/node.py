"""The composition root: the one place that builds a node from its configuration.

`Node.run` owns the node's nursery: the backend manager (and through it every
backend's tasks), the HTTP server, and the signal watcher all live there. Shutdown
is graceful: stop taking requests, let in-flight ones finish within the grace
period, then cancel what remains.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import urlsplit

import hypercorn.config
import hypercorn.trio
import trio

from backends.catalog import ModelCatalog
from backends.discovery import discover
from backends.gpu.hardware import detect_hardware
from backends.local.backend import LocalBackend, LocalBackendSettings
from backends.manager import BackendManager, ManagerSettings
from backends.types import BackendStatus, Task
from p2p_node.api.app import ApiDependencies, create_app
from p2p_node.api.auth import ApiKeys
from p2p_node.backend_factory import build_backend, config_for_discovered
from p2p_node.config import ConfigError, NodeConfig
from p2p_node.heap import freeze_after_loading, freeze_startup_heap
from p2p_node.mcp_server.http import McpHttpSettings
from p2p_node.mesh.host import MeshHost, MeshSettings, tcp_port
from p2p_node.mesh.identity import IdentityError, load_or_create_identity
from p2p_node.mesh.mdns import MdnsDiscovery
from p2p_node.peering.service import Peering
from p2p_node.registry import ModelRegistry
from p2p_node.telemetry import Telemetry

log = logging.getLogger(__name__)

# After the drain, how long hypercorn may take to write final events and close connections.
FLUSH_AFTER_DRAIN_S = 5.0


def package_version() -> str:
    try:
        return version("p2p-node")
    except PackageNotFoundError:  # running from a source tree without install
        return "0.0.0+source"


@dataclass
class NodeAddresses:
    http: list[str]


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.node_id = uuid.uuid4().hex[:16]  # replaced by the libp2p peer id once the mesh lands
        self.version = package_version()
        self.started_at = time.time()
        self.addresses = NodeAddresses(http=[])
        self._stop = trio.Event()
        self.telemetry = Telemetry(self.status_report)
        self.manager = BackendManager(
            ManagerSettings(
                strategy=config.routing.strategy,
                max_pending_requests=config.routing.max_pending_requests,
                health_check_interval_s=config.routing.health_check_interval,
                health_check_timeout_s=config.routing.health_check_timeout,
                default_timeout_s=config.routing.request_timeout,
                max_attempts=config.routing.max_attempts,
                failure_threshold=config.routing.failure_threshold,
                base_cooldown_s=config.routing.cooldown,
                max_cooldown_s=config.routing.max_cooldown,
                hedge_after_factor=config.routing.hedge_after,
                hedge_ratio=config.routing.hedge_ratio,
            ),
            ModelCatalog.from_config(
                {
                    Task.CHAT.value: config.models.default_chat,
                    Task.COMPLETION.value: config.models.default_chat,
                    Task.EMBEDDING.value: config.models.default_embedding,
                    Task.RERANK.value: config.models.default_rerank,
                },
                config.models.aliases,
            ),
            observer=self.telemetry,
        )
        self.local = LocalBackend(
            LocalBackendSettings(
                cache_dir=config.models.cache_dir,
                device=config.models.device,
                max_batch_size=config.batching.max_batch_size,
                batch_wait_s=config.batching.batch_timeout_ms / 1000.0,
                max_loaded_models=config.models.max_loaded,
                chat_models=dict(config.models.chat),
                embedding_models=dict(config.models.embedding),
                rerank_models=dict(config.models.rerank),
                preload=list(config.models.preload),
                idle_unload_s=config.models.idle_unload or None,
            ),
            on_model_loaded=freeze_after_loading,
        )
        self.local.priority = config.routing.local_priority
        self.manager.register(self.local)
        for backend_config in config.backends:
            self.manager.register(build_backend(backend_config))
        # Measured once: nvidia-smi and friends are slow, and hardware doesn't change under us.
        self.hardware = detect_hardware().as_dict()
        self.peering = Peering(
            self.manager,
            self.version,
            sorted({self.local.device.split(":")[0]}),
            api_advert=self.api_advert,
            peer_protocols=tuple(config.mesh.peer_protocols),
        )
        self.mesh: MeshHost | None = None
        if config.mesh.enabled:
            try:
                key_pair = load_or_create_identity(config.mesh.identity_key)
            except IdentityError as exc:
                raise ConfigError(str(exc)) from None
            self.mesh = MeshHost(
                MeshSettings(
                    listen=list(config.mesh.listen),
                    bootstrap=list(config.mesh.bootstrap),
                    secret=config.mesh.secret,
                    allow_peers=frozenset(config.mesh.allow_peers),
                ),
                key_pair,
                self.peering.serve,
                self.peering.local_advert,
                self.peering.peers_changed,
            )
            self.node_id = self.mesh.peer_id
        self.app = create_app(
            ApiDependencies(
                manager=self.manager,
                node_status=self.status_report,
                readiness=self.readiness,
                inference_health=self.inference_health,
                render_metrics=self.telemetry.render,
                default_max_tokens=config.models.default_max_tokens,
                max_body_bytes=config.server.max_body_bytes,
                version=self.version,
                api_keys=ApiKeys(config.server.api_keys),
                registry=ModelRegistry.from_config(config.registry),
                mcp=McpHttpSettings(
                    enabled=config.mcp.enabled,
                    allowed_hosts=tuple(config.mcp.allowed_hosts),
                    allowed_origins=tuple(config.mcp.allowed_origins),
                    bind_host=config.server.host,
                ),
            )
        )

    # ---- running --------------------------------------------------------------------

    async def run(
        self, *, handle_signals: bool = False, task_status: trio.TaskStatus[NodeAddresses] = trio.TASK_STATUS_IGNORED
    ) -> None:
        server = self.config.server
        hconfig = hypercorn.config.Config()
        hconfig.bind = [_bind_address(server.host, server.port)]
        # The manager drains requests for shutdown_grace_s; hypercorn then only needs long
        # enough to write the last events and close connections.
        hconfig.graceful_timeout = FLUSH_AFTER_DRAIN_S
        hconfig.accesslog = None
        hconfig.errorlog = logging.getLogger("hypercorn.error")
        http_stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await self.start_backends(nursery)
            if handle_signals:
                nursery.start_soon(self._watch_signals)
            async with trio.open_nursery() as http_nursery:
                binds = await http_nursery.start(
                    partial(hypercorn.trio.serve, self.app, hconfig, shutdown_trigger=http_stop.wait)  # type: ignore[arg-type]
                )
                self.addresses.http = list(binds)
                log.info("node %s serving on %s", self.node_id, ", ".join(binds))
                task_status.started(self.addresses)
                await self._stop.wait()
                await self._drain()
                if self.app.state.mcp_http is not None:
                    await self.app.state.mcp_http.close_sessions()  # else hypercorn waits on their streams
                # Hypercorn stops listening and closes connections once their last bytes
                # are written, so streams that just finished still reach their clients.
                http_stop.set()
            nursery.cancel_scope.cancel()
        log.info("node %s stopped", self.node_id)

    async def start_backends(self, nursery: trio.Nursery) -> None:
        """Starts the manager and its backends in `nursery`, then adds discovered servers.
        `run` serves HTTP on top of them; `p2p-node mcp` serves MCP on stdio instead."""
        await nursery.start(self.manager.run)
        if self.config.discovery.enabled:
            await self._add_discovered_backends()
        if self.mesh is not None:
            mesh_addrs = await nursery.start(self.mesh.run)
            log.info("peer id %s, mesh listening on %s", self.mesh.peer_id, ", ".join(mesh_addrs))
            nursery.start_soon(self.peering.keep_backends_in_sync, self.mesh)
            if self.config.mesh.mdns:
                nursery.start_soon(self._run_mdns, self.mesh)
        # Both ways of serving (HTTP, MCP on stdio) start here; models that finish loading
        # later are frozen by the local backend's on_model_loaded.
        freeze_startup_heap()

    async def _run_mdns(self, mesh: MeshHost) -> None:
        discovery = MdnsDiscovery(
            mesh.peer_id,
            tcp_port(mesh.addrs),
            lambda addrs: mesh.connect(addrs[0]),
            list(self.config.mesh.mdns_interfaces),
        )
        try:
            await discovery.run()
        except Exception as exc:  # no multicast here: the node still works with bootstrap peers
            log.warning("mDNS discovery is off: %s", exc)

    async def _add_discovered_backends(self) -> None:
        settings = self.config.discovery
        configured = {(b.url or "").rstrip("/") for b in self.config.backends}
        servers = await discover(
            settings.host, tuple(settings.ports), frozenset({self.config.server.port}), settings.timeout
        )
        for server in servers:
            if server.url.rstrip("/") in configured:
                continue  # configured explicitly, with its own settings
            backend_config = config_for_discovered(server)
            if backend_config.id in {b.id for b in self.manager.backends()}:
                continue
            await self.manager.add(build_backend(backend_config))

    def request_stop(self) -> None:
        self._stop.set()

    async def _drain(self) -> None:
        """Refuse new requests (503 shutting_down; /ready fails) while the server still
        answers, and give in-flight ones the grace period. Whatever is still running then
        fails with a shutting_down error its client sees."""
        grace = self.config.server.shutdown_grace_s
        pending = self.manager.pending
        log.info("shutting down: refusing new requests, waiting up to %.0fs for %d in flight", grace, pending)
        self.manager.stop_accepting(drain_s=grace)
        with trio.move_on_after(grace + FLUSH_AFTER_DRAIN_S):
            await self.manager.wait_idle()
        if self.manager.pending:
            log.warning("%d requests still in flight after the grace period", self.manager.pending)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                self.request_stop()
                return

    # ---- reporting ------------------------------------------------------------------

    def status_report(self) -> dict[str, Any]:
        return {
            "node": {
                "id": self.node_id,
                "version": self.version,
                "hostname": socket.gethostname(),
                "started_at": self.started_at,
                "uptime_s": round(time.time() - self.started_at, 1),
                "http": self.addresses.http,
            },
            "manager": self.manager.status_report(),
            "mesh": self.peering.status(),
            "hardware": self.hardware,
        }

    def api_advert(self) -> dict[str, Any] | None:
        """Where peers can reach this node's HTTP API and WebSocket (in its capability advert)."""
        if not self.addresses.http:
            return None  # not listening yet
        port = urlsplit(self.addresses.http[0]).port
        advert: dict[str, Any] = {
            "port": port,
            "protocols": ["http", "websocket"],
            "auth": bool(self.config.server.api_keys),  # peers hold no keys: they won't use it
        }
        if self.config.server.host not in ("0.0.0.0", "::", ""):
            advert["host"] = self.config.server.host
        if self.config.mesh.public_url:
            advert["url"] = self.config.mesh.public_url
        return advert

    def inference_health(self) -> dict[str, Any]:
        """Seed 002's `/v1/health/inference`: the primary provider and each fallback."""
        chain = self.config.inference.chain()
        if chain:
            primary_id, fallback_ids = chain[0], chain[1:]
        else:
            others = sorted((b for b in self.manager.backends() if b.id != self.local.id), key=lambda b: b.priority)
            primary_id, fallback_ids = self.local.id, [b.id for b in others]
        return {
            "primary": self._provider_health(primary_id),
            "fallbacks": [self._provider_health(backend_id) for backend_id in fallback_ids],
        }

    def _provider_health(self, backend_id: str) -> dict[str, Any]:
        backend = self.manager.get(backend_id)
        healthy = backend.status in (BackendStatus.HEALTHY, BackendStatus.DEGRADED)
        entry: dict[str, Any] = {
            "type": backend_id,
            "backend_type": backend.backend_type.value,
            "healthy": healthy,
            "status": backend.status.value,
            "models": sorted({card.id for card in backend.capabilities.models}) if healthy else [],
        }
        if backend.status_detail:
            entry["error"] = backend.status_detail
        return entry

    def readiness(self) -> tuple[bool, str]:
        if not self.manager.accepting:
            return False, "shutting down"
        loaded = {card.id for card in self.manager.list_models() if card.loaded}
        missing = [m for m in self.config.models.preload if self.manager.catalog.resolve(Task.CHAT, m) not in loaded]
        if missing:
            return False, f"loading {', '.join(missing)}"
        return True, "ready"


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
