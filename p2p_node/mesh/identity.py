"""The node's persistent Ed25519 identity: its libp2p peer id survives restarts."""

from __future__ import annotations

import os
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID


class IdentityError(Exception):
    pass


def load_or_create_identity(path: Path) -> KeyPair:
    """Read the private key at `path`, or create one there (mode 0600) on first start."""
    path = path.expanduser()
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise IdentityError(f"identity key {path} is readable by others; run: chmod 600 {path}")
        try:
            private = Ed25519PrivateKey.from_bytes(path.read_bytes())
        except Exception as exc:  # a truncated or foreign file
            raise IdentityError(f"identity key {path} is not an Ed25519 private key: {exc}") from None
        return KeyPair(private, private.get_public_key())
    path.parent.mkdir(parents=True, exist_ok=True)
    key_pair = create_new_key_pair()
    # Created with 0600 from the start: never a moment where others could read it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pair.private_key.to_bytes())
    return key_pair


def peer_id_of(key_pair: KeyPair) -> str:
    return str(ID.from_pubkey(key_pair.public_key))
