"""Secrets at rest: Fernet (AES-128-CBC with HMAC-SHA256) with keys from the controller's key file.

The key file holds one Fernet key per line, newest first: new secrets are
encrypted with the first, and any listed key decrypts, so keys rotate by
adding a line on top and re-encrypting at leisure.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from vmrepl.errors import ConfigError, SecurityError


def create_key_file(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(Fernet.generate_key() + b"\n")


class SecretBox:
    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ConfigError("the secret key file holds no key")
        try:
            self._fernet = MultiFernet([Fernet(k) for k in keys])
        except ValueError as e:
            raise ConfigError(f"a secret key is not a valid Fernet key: {e}") from e

    @classmethod
    def from_file(cls, path: Path) -> SecretBox:
        try:
            lines = path.read_bytes().split()
        except OSError as e:
            raise ConfigError(f"cannot read the secret key file {path}: {e.strerror}") from e
        return cls(lines)

    def seal(self, secret: str) -> bytes:
        return self._fernet.encrypt(secret.encode())

    def open(self, sealed: bytes) -> str:
        try:
            return self._fernet.decrypt(sealed).decode()
        except InvalidToken as e:
            raise SecurityError("a stored secret does not decrypt with any configured key") from e
