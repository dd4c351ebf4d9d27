"""The node's identity key: created once with mode 0600, the same peer id after restarts."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from p2p_node.mesh.identity import IdentityError, load_or_create_identity, peer_id_of


def test_first_start_creates_a_private_key_and_later_starts_reuse_it(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "identity.key"
    first = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_identity(path)
    assert peer_id_of(first) == peer_id_of(again)
    assert peer_id_of(first).startswith("12D3KooW")  # an Ed25519 libp2p peer id


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    load_or_create_identity(path)
    path.chmod(0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_identity(path)


def test_a_corrupt_key_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(b"not a key")
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="not an Ed25519 private key"):
        load_or_create_identity(path)
