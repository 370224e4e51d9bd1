"""The file provider's own journal of checkpoints: records it sealed, so it uses no record it did not write.

A VM folder's `.vmrepl/checkpoint.json` says which checkpoint exists and whether its overlays are being
merged into the disks. Anyone who can write the VM folder could plant one (with an overlay that is a link
to a file they cannot read, for the merge to copy into the disk). So each record carries an HMAC-SHA256
over its fields (the VM's id included, so a record copied from another VM does not pass) with a key kept
outside every VM folder, in `<host>/.vmrepl-host/checkpoint.key`: 32 random bytes, mode 0600, made by
the first checkpoint on the host. A record without a valid seal is refused with a clear error, never
used.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
import threading
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vmrepl.errors import FailedPrecondition
from vmrepl.providers.safefs import Folder

HOST_DIR = ".vmrepl-host"
KEY_FILE = "checkpoint.key"
_KEY_BYTES = 32
_DOMAIN = b"vmrepl checkpoint record v1\n"


class CheckpointRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    vm_id: str
    id: str = Field(pattern=r"^[0-9a-f]{32}$")
    created_at: float
    reference: int = Field(ge=0)
    state: Literal["active", "merging"]


class _Sealed(BaseModel):
    model_config = ConfigDict(extra="forbid")

    record: CheckpointRecord
    seal: str = Field(pattern=r"^[0-9a-f]{64}$")


def _mac(key: bytes, record: CheckpointRecord) -> str:
    body = json.dumps(record.model_dump(), sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, _DOMAIN + body, hashlib.sha256).hexdigest()


def _check_private(fd: int, where: Path, *, mode_mask: int) -> None:
    st = os.fstat(fd)
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise FailedPrecondition(f"{where} is not owned by the user vmrepl runs as: refused")
    if stat.S_IMODE(st.st_mode) & mode_mask:
        raise FailedPrecondition(f"{where} may be changed or read by other users (mode {st.st_mode:o}): refused")


class HostKey:
    """The host's sealing key, read (or made) once per provider."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def get(self, *, create: bool) -> bytes | None:
        with self._lock:
            if self._key is None:
                self._key = self._load(create=create)
            return self._key

    def _current(self) -> bytes:
        """The key to seal with, checked against the file: one deleted while vmrepl runs is written back
        (every record sealed so far needs it, and a guest's acknowledged writes live in their overlays);
        one replaced is refused."""
        with self._lock:
            if self._key is None:
                self._key = self._load(create=True)
            elif (on_disk := self._load(create=False, restore=self._key)) != self._key:
                raise FailedPrecondition(
                    f"{self.root / HOST_DIR / KEY_FILE} changed while vmrepl was running: refused (put back the "
                    "key vmrepl made; records sealed with another key cannot be checked)"
                    if on_disk is not None
                    else f"cannot write back {self.root / HOST_DIR / KEY_FILE}"
                )
            if self._key is None:  # _load(create=True) makes one or raises
                raise FailedPrecondition(f"no checkpoint key in {self.root / HOST_DIR}")
            return self._key

    def _load(self, *, create: bool, restore: bytes | None = None) -> bytes | None:
        with Folder.open(self.root) as top:
            d = top.child(HOST_DIR, create=True) if create or restore else top.maybe_child(HOST_DIR)
            if d is None:
                return None
            with d:
                _check_private(d.fd, d.path, mode_mask=0o022)
                if (create or restore) and not d.exists(KEY_FILE):
                    _make_key(d, restore)
                try:
                    fd = d.open_file(KEY_FILE, own=True)
                except FileNotFoundError:
                    return None
                try:
                    _check_private(fd, d.path / KEY_FILE, mode_mask=0o077)
                    key = os.pread(fd, _KEY_BYTES + 1, 0)
                finally:
                    os.close(fd)
        if len(key) != _KEY_BYTES:
            raise FailedPrecondition(f"{self.root / HOST_DIR / KEY_FILE} is not a vmrepl key: refused")
        return key

    def seal(self, record: CheckpointRecord) -> bytes:
        key = self._current()
        return json.dumps({"record": record.model_dump(), "seal": _mac(key, record)}).encode()

    def open(self, data: bytes, *, where: Path, vm_id: str) -> CheckpointRecord:
        """The record in `data` if this host's key sealed it for VM `vm_id`; else a clear refusal."""

        def refuse(why: str) -> FailedPrecondition:
            return FailedPrecondition(
                f"{where} was not written by vmrepl ({why}): vmrepl will not use it. Check the VM folder, "
                f"then remove {where.parent} to take checkpoints of this VM again"
            )

        key = self.get(create=False)
        if key is None:
            raise FailedPrecondition(
                f"{where} was not written by vmrepl, or its key was deleted: there is no host checkpoint key "
                f"{self.root / HOST_DIR / KEY_FILE}. If it was deleted, put it back from a backup; removing "
                f"{where.parent} takes checkpoints again but discards the guest writes its overlays hold"
            )
        try:
            sealed = _Sealed.model_validate_json(data)
        except ValidationError as e:
            raise refuse(f"not a sealed record: {e.error_count()} problem(s), first {e.errors()[0]['msg']}") from e
        if not hmac.compare_digest(sealed.seal, _mac(key, sealed.record)):
            raise refuse("its seal does not match")
        if sealed.record.vm_id != vm_id:
            raise refuse(f"it belongs to VM {sealed.record.vm_id}, not {vm_id}")
        return sealed.record


def _make_key(d: Folder, key: bytes | None = None) -> None:
    """Write a new key (or `key` back) under a temporary name and link it into place: of two processes
    making one at once, one wins and both use its key."""
    tmp = f"{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=d.fd)
    try:
        os.write(fd, key or secrets.token_bytes(_KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        with contextlib.suppress(FileExistsError):
            os.link(tmp, KEY_FILE, src_dir_fd=d.fd, dst_dir_fd=d.fd, follow_symlinks=False)
    finally:
        os.unlink(tmp, dir_fd=d.fd)
    d.sync()
