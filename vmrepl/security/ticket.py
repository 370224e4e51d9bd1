"""Transfer tickets: the controller's Ed25519-signed permission for one disk stream.

The signature covers a domain-separation prefix and the serialised ticket,
so a signature made for anything else never verifies as a ticket.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from vmrepl.errors import ConfigError, TicketError
from vmrepl.v1 import ticket_pb2

_DOMAIN = b"vmrepl.v1.TransferTicket\x00"
MAX_TICKET_BYTES = 4096


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the ticket-signing key {path}: {e}") from e
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return key


def load_public_keys(paths: Iterable[Path]) -> dict[str, ed25519.Ed25519PublicKey]:
    keys: dict[str, ed25519.Ed25519PublicKey] = {}
    for path in paths:
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the controller public key {path}: {e}") from e
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ConfigError(f"{path} is not an Ed25519 public key")
        keys[key_id(key)] = key
    if not keys:
        raise ConfigError("no controller public key configured: targets accept no transfer without one")
    return keys


def sign_ticket(
    key: ed25519.Ed25519PrivateKey,
    *,
    session_id: str,
    disk_id: str,
    replica_path: str,
    checkpoint_id: str,
    proxy: str,
    expires_unix: float,
    audience: str = "",
) -> bytes:
    """A ticket for `proxy` (its certificate name) to stream one disk of one session from one checkpoint."""
    if not checkpoint_id or not proxy:
        raise TicketError("a ticket must name the checkpoint and the proxy")
    ticket = ticket_pb2.TransferTicket(
        session_id=session_id,
        disk_id=disk_id,
        replica_path=replica_path,
        checkpoint_id=checkpoint_id,
        proxy=proxy,
        expires_unix=int(expires_unix),
        audience=audience,
        nonce=os.urandom(16),
    ).SerializeToString()
    signed = ticket_pb2.SignedTicket(
        ticket=ticket, signature=key.sign(_DOMAIN + ticket), key_id=key_id(key.public_key())
    )
    return signed.SerializeToString()


def verify_ticket(
    blob: bytes,
    keys: dict[str, ed25519.Ed25519PublicKey],
    *,
    session_id: str,
    disk_id: str,
    replica_path: str,
    audience: str,
    peer: str,
    checkpoint_id: str | None = None,
    now: float | None = None,
) -> ticket_pb2.TransferTicket:
    """The ticket, if it is signed by a known controller key, names exactly this transfer and `peer` (the
    caller's certificate name) is the proxy it is for. `checkpoint_id` None: any checkpoint (the caller
    checks it against what it holds)."""
    ticket = _open_signed(blob, keys)
    if ticket.expires_unix < (time.time() if now is None else now):
        raise TicketError("ticket has expired")
    wanted = {"session_id": session_id, "disk_id": disk_id, "replica_path": replica_path}
    if checkpoint_id is not None:
        wanted["checkpoint_id"] = checkpoint_id
    for field, value in wanted.items():
        if getattr(ticket, field) != value:
            raise TicketError(f"ticket is for another {field.replace('_', ' ')}")
    if not ticket.proxy or ticket.proxy != peer:
        # A ticket copied from a log or another proxy is worthless to anyone but the proxy it names.
        raise TicketError(f"ticket is not for certificate {peer!r}")
    if not ticket.checkpoint_id:
        raise TicketError("ticket names no checkpoint")
    if ticket.audience and ticket.audience != audience:
        raise TicketError("ticket is for another target")
    return ticket


def _open_signed(blob: bytes, keys: dict[str, ed25519.Ed25519PublicKey]) -> ticket_pb2.TransferTicket:
    if len(blob) > MAX_TICKET_BYTES:
        raise TicketError("ticket is too large")
    try:
        signed = ticket_pb2.SignedTicket.FromString(blob)
        key = keys.get(signed.key_id)
        if key is None:
            raise TicketError("ticket is signed by an unknown key")
        key.verify(signed.signature, _DOMAIN + signed.ticket)
        return ticket_pb2.TransferTicket.FromString(signed.ticket)
    except InvalidSignature as e:
        raise TicketError("ticket signature does not verify") from e
    except TicketError:
        raise
    except Exception as e:  # protobuf DecodeError
        raise TicketError("ticket does not parse") from e
