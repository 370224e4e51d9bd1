"""mTLS credentials for gRPC servers and channels, and the caller's role."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from vmrepl.config import TlsSettings
from vmrepl.errors import ConfigError, PeerNotAllowed


def _read(path: Any, what: str) -> bytes:
    try:
        data: bytes = path.read_bytes()
        return data
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from e


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """Server side of mTLS: a client certificate from our CA is required."""
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file, "tls.key_file"), _read(tls.cert_file, "tls.cert_file"))],
        root_certificates=_read(tls.ca_file, "tls.ca_file"),
        require_client_auth=True,
    )


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file, "tls.ca_file"),
        private_key=_read(tls.key_file, "tls.key_file"),
        certificate_chain=_read(tls.cert_file, "tls.cert_file"),
    )


@lru_cache(maxsize=256)
def _identity(pem: bytes) -> tuple[str, str]:
    cert = x509.load_pem_x509_certificate(pem)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return (str(cn[0].value) if cn else "", str(ou[0].value) if ou else "")


def certificate_identity(path: Path) -> tuple[str, str]:
    """(name, role) of a certificate file: this program's own identity, as its peers see it."""
    return _identity(_read(path, "tls.cert_file"))


def peer_identity(context: Any) -> tuple[str, str]:
    """(name, role) from the caller's verified client certificate."""
    auth = context.auth_context()
    pem = auth.get("x509_pem_cert")
    if not pem:
        raise PeerNotAllowed("the call carries no client certificate")
    return _identity(pem[0])


def require_role(context: Any, *roles: str) -> str:
    """The caller's name, if its certificate's role is one of `roles`."""
    name, role = peer_identity(context)
    if role not in roles:
        raise PeerNotAllowed(f"certificate {name!r} has role {role!r}; this call needs {' or '.join(roles)}")
    return name
