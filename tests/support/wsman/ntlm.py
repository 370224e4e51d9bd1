"""NTLM over HTTP with WinRM message encryption, as Windows does it (fact sheet 4.5, 4.6).

pyspnego's pure-Python NTLM acceptor checks the client's proof; its credentials come from the file named by the
NTLM_USER_FILE environment variable (pyspnego reads nothing else), so `user_file` sets it while a server runs.
The framing is MS-WSMV 2.2.9.1.1, byte for byte as pywinrm's winrm/encryption.py builds and parses it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import spnego
from spnego.exceptions import SpnegoError

PROTOCOL = "application/HTTP-SPNEGO-session-encrypted"
CONTENT_TYPE = f'multipart/encrypted;protocol="{PROTOCOL}";boundary="Encrypted Boundary"'
BOUNDARY = b"--Encrypted Boundary"
_HEAD = re.compile(
    rb"--Encrypted Boundary\r\n\tContent-Type: application/HTTP-SPNEGO-session-encrypted\r\n"
    rb"\tOriginalContent: type=application/soap\+xml;charset=UTF-8;Length=(\d{1,9})\r\n"
    rb"--Encrypted Boundary\r\n\tContent-Type: application/octet-stream\r\n",
    re.IGNORECASE,
)
_END = BOUNDARY + b"--\r\n"
SIGNATURE_LENGTH = 16  # an NTLMv2 message signature


class EncryptionError(Exception):
    """The body is not a well-formed, correctly sealed multipart/encrypted message."""


@contextmanager
def user_file(username: str, password: str) -> Iterator[Path]:
    """A 0600 credential file (DOMAIN:USER:PASSWORD) named by NTLM_USER_FILE until the block ends."""
    domain, _, user = username.rpartition("\\")
    with tempfile.TemporaryDirectory(prefix="wsman-ntlm-") as directory:
        path = Path(directory) / "users"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{domain}:{user}:{password}\n")
        before = os.environ.get("NTLM_USER_FILE")
        os.environ["NTLM_USER_FILE"] = str(path)
        try:
            yield path
        finally:
            if before is None:
                os.environ.pop("NTLM_USER_FILE", None)
            else:
                os.environ["NTLM_USER_FILE"] = before


class Acceptor:
    """One TCP connection's NTLM state: NTLM authenticates the connection, not each request."""

    def __init__(self) -> None:
        self._ctx: spnego.ContextProxy | None = None

    @property
    def complete(self) -> bool:
        return self._ctx is not None and self._ctx.complete

    def step(self, header: str | None) -> tuple[bool, str]:
        """Feed an `Authorization` header; (authenticated, WWW-Authenticate value for a 401)."""
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() not in ("negotiate", "ntlm") or not token:
            self._ctx = None
            return False, "Negotiate"
        try:
            raw = base64.b64decode(token.strip(), validate=True)
            if raw.startswith(b"NTLMSSP\x00\x01"):  # a NEGOTIATE message starts a new handshake
                self._ctx = spnego.server(protocol="ntlm", options=spnego.NegotiateOptions.use_ntlm)
            if self._ctx is None or self._ctx.complete:
                raise EncryptionError("an NTLM token out of sequence")
            reply = self._ctx.step(raw)
        except (binascii.Error, SpnegoError, EncryptionError, ValueError):
            self._ctx = None  # wrong password, garbled or replayed token: start again
            return False, "Negotiate"
        if self._ctx.complete:
            return True, ""
        return False, "Negotiate " + base64.b64encode(reply or b"").decode()

    def unwrap(self, content_type: str, body: bytes) -> bytes:
        """The plaintext SOAP message of an encrypted request (EncryptionError if it is not one)."""
        if self._ctx is None or f'protocol="{PROTOCOL}"'.lower() not in content_type.lower():
            raise EncryptionError("the message is not encrypted")
        head = _HEAD.match(body)
        if head is None or not body.endswith(_END):
            raise EncryptionError("malformed multipart/encrypted body")
        payload = body[head.end() : len(body) - len(_END)]
        if len(payload) < 4 + SIGNATURE_LENGTH or struct.unpack("<I", payload[:4])[0] != SIGNATURE_LENGTH:
            raise EncryptionError("bad signature length")
        try:
            plain = self._ctx.unwrap(payload[4:]).data  # signature followed by the sealed message
        except SpnegoError as e:
            raise EncryptionError(f"signature check failed: {e}") from None
        if len(plain) != int(head.group(1)):
            raise EncryptionError("decrypted length differs from OriginalContent")
        return plain

    def wrap(self, message: bytes) -> bytes:
        """A reply body sealed for this connection, framed as the request was."""
        assert self._ctx is not None and self._ctx.complete, "wrap before authentication"
        sealed = self._ctx.wrap(message, encrypt=True).data
        return (
            BOUNDARY + b"\r\n\tContent-Type: " + PROTOCOL.encode() + b"\r\n"
            b"\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length="
            + str(len(message)).encode()
            + b"\r\n"
            + BOUNDARY
            + b"\r\n\tContent-Type: application/octet-stream\r\n"
            + struct.pack("<I", SIGNATURE_LENGTH)
            + sealed
            + _END
        )
