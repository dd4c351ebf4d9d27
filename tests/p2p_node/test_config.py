"""Configuration: defaults < TOML < environment < flags, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.strategies import Strategy
from p2p_node.config import ConfigError, load_config


def test_defaults_serve_the_embedded_models_on_localhost_8000() -> None:
    config = load_config(env={})
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8000)
    assert config.models.default_chat == "SmolLM2-135M-Instruct"
    assert config.models.default_embedding == "all-MiniLM-L6-v2"
    assert config.models.aliases["bge-base-en"] == "all-MiniLM-L6-v2"
    assert config.models.aliases["qwen-coder-1.5b"] == "SmolLM2-135M-Instruct"


def test_toml_then_environment_then_flags_take_precedence(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[server]\nport = 9000\nhost = "0.0.0.0"\n[batching]\nmax_batch_size = 4\n')
    config = load_config(path, env={"P2P_NODE_PORT": "9100", "MAX_BATCH_SIZE": "16"})
    assert config.server.host == "0.0.0.0"
    assert config.server.port == 9100
    assert config.batching.max_batch_size == 16
    flagged = load_config(path, env={"P2P_NODE_PORT": "9100"}, overrides={"server": {"port": 9200}})
    assert flagged.server.port == 9200


def test_seed_environment_names_are_honoured() -> None:
    config = load_config(
        env={
            "BATCH_TIMEOUT_MS": "25",
            "LOAD_BALANCING_STRATEGY": "round-robin",
            "HEALTH_CHECK_INTERVAL": "60",
            "HEALTH_CHECK_TIMEOUT": "5",
            "P2P_NODE_MODEL_ALIASES": "gpt-4=SmolLM2-135M-Instruct",
            "P2P_NODE_PRELOAD": "",
        }
    )
    assert config.batching.batch_timeout_ms == 25
    assert config.routing.strategy is Strategy.ROUND_ROBIN
    assert config.routing.health_check_interval == 60
    assert config.models.aliases == {"gpt-4": "SmolLM2-135M-Instruct"}


def test_hedging_is_configured_in_the_file_or_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("[routing]\nstrategy = 'best_performance'\nhedge_after = 3\n")
    config = load_config(path, env={"P2P_NODE_HEDGE_RATIO": "0"})
    assert (config.routing.hedge_after, config.routing.hedge_ratio) == (3.0, 0.0)
    assert load_config(env={}).routing.hedge_ratio == 0.1


def test_config_file_from_environment_variable(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("[server]\nport = 9300\n")
    assert load_config(env={"P2P_NODE_CONFIG": str(path)}).server.port == 9300


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[server]\nport = 70000\n", {}, "server.port"),
        ("[server]\nprot = 1\n", {}, "server.prot"),
        ("[routing]\nstrategy = 'fastest'\n", {}, "unknown load-balancing strategy"),
        ("[server\n", {}, "not valid TOML"),
        ("", {"MAX_BATCH_SIZE": "lots"}, "MAX_BATCH_SIZE"),
        ("", {"P2P_NODE_MODEL_ALIASES": "nonsense"}, "NAME=MODEL"),
        ("", {"P2P_NODE_PEER_PROTOCOLS": "http,carrier-pigeon"}, "mesh.peer_protocols"),
        ("[routing]\nhedge_ratio = 2\n", {}, "routing.hedge_ratio"),
        ("", {"P2P_NODE_HEDGE_AFTER": "0.5"}, "routing.hedge_after"),
    ],
)
def test_bad_configuration_names_the_problem(tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path, env=env)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})


def test_cross_encoder_path_becomes_the_default_reranker(tmp_path: Path) -> None:
    config = load_config(env={"P2P_NODE_CROSS_ENCODER_PATH": str(tmp_path)})
    assert config.models.default_rerank == "cross-encoder"
    assert config.models.rerank["cross-encoder"] == str(tmp_path)
    assert config.models.aliases["bge-reranker"] == "cross-encoder"


def test_peers_are_reached_over_http_and_websocket_too_unless_configured_otherwise() -> None:
    assert load_config(env={}).mesh.peer_protocols == ["http", "websocket"]
    only_libp2p = load_config(env={"P2P_NODE_PEER_PROTOCOLS": ""})
    assert only_libp2p.mesh.peer_protocols == []
