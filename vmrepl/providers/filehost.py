"""The file-backed provider: a host is a folder, a VM a subfolder with a `vm.toml` manifest.

It behaves like Hyper-V where replication can see it:

* A checkpoint freezes the disks: while it exists, writes made through the
  provider (`write`, used by `vmrepl lab write`) go to an overlay per disk,
  and the base image is what the proxy reads. Removing the checkpoint merges
  the overlay back into the base; the merge is idempotent, so a crash in the
  middle is finished by the next removal.
* Change tracking: every write through the provider is logged with a
  sequence number. A checkpoint's reference is the sequence at its creation,
  so `changed_ranges(cp, disk, since=earlier_reference)` answers like RCT's
  `GetVirtualDiskChanges`. Writes made to the images by other means are not
  tracked — the situation sampled verification exists for.

Layout of a VM folder (docs/file-provider.md):
    vm.toml                  name, id, disks (paths relative to the folder)
    <disk images>
    .vmrepl/lock             serialises writers across processes
    .vmrepl/changes.log      one JSON line per write: seq, disk, offset, length
    .vmrepl/checkpoint.json  the checkpoint: id, created_at, reference, state (active | merging)
    .vmrepl/overlay/<disk>.raw and .map   bytes written under the checkpoint, and where
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import tomllib
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vmrepl.disk import open_reader
from vmrepl.disk.fileio import PositionalFile, atomic_write, exclusive_lock
from vmrepl.errors import FailedPrecondition, InvalidArgument, NotFound
from vmrepl.extent import Extent, merge
from vmrepl.names import check_name, check_relative, resolve_inside
from vmrepl.providers.base import Checkpoint, DiskInCheckpoint, DiskInfo, Provider, VmInfo

MANIFEST = "vm.toml"
STATE_DIR = ".vmrepl"
_COPY_CHUNK = 4 << 20


class DiskManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    path: str = Field(description="image path relative to the VM folder")
    format: Literal["raw", "vhdx", "vhd"] = "raw"

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_name("id", v)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        check_relative("path", v)
        return v


class VmManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    id: str
    disks: list[DiskManifest] = Field(min_length=1)


def load_manifest(vm_dir: Path) -> VmManifest:
    try:
        data = tomllib.loads((vm_dir / MANIFEST).read_text(encoding="utf-8"))
        return VmManifest(**data)
    except FileNotFoundError as e:
        raise NotFound(f"{vm_dir} has no {MANIFEST}") from e
    except (tomllib.TOMLDecodeError, ValidationError) as e:
        raise InvalidArgument(str(vm_dir / MANIFEST), str(e)) from e


def write_manifest(vm_dir: Path, manifest: VmManifest) -> None:
    lines = [f"name = {json.dumps(manifest.name)}", f"id = {json.dumps(manifest.id)}"]
    for d in manifest.disks:
        lines += ["", "[[disks]]", f"id = {json.dumps(d.id)}", f"path = {json.dumps(d.path)}"]
        lines.append(f"format = {json.dumps(d.format)}")
    atomic_write(vm_dir / MANIFEST, ("\n".join(lines) + "\n").encode())


class FileVm:
    """One VM folder; every method blocks (the provider runs them in threads)."""

    def __init__(self, vm_dir: Path, host: str) -> None:
        self.dir = vm_dir
        self.host = host
        self.manifest = load_manifest(vm_dir)
        self.state = vm_dir / STATE_DIR
        (self.state / "overlay").mkdir(parents=True, exist_ok=True)

    def _disk(self, disk_id: str) -> DiskManifest:
        for d in self.manifest.disks:
            if d.id == disk_id:
                return d
        raise NotFound(f"VM {self.manifest.name} has no disk {disk_id!r}")

    def image(self, disk_id: str) -> Path:
        return resolve_inside(
            f"disks.{disk_id}.path", self.dir / self._disk(disk_id).path, [self.dir], what="the VM folder"
        )

    def size(self, disk_id: str) -> int:
        with open_reader(self._disk(disk_id).format, self.image(disk_id)) as r:
            return r.size

    def info(self) -> VmInfo:
        disks = tuple(DiskInfo(d.id, str(self.image(d.id)), d.format, self.size(d.id)) for d in self.manifest.disks)
        return VmInfo(self.manifest.id, self.manifest.name, self.host, disks)

    # -- checkpoints ---------------------------------------------------------------------------

    def _checkpoint_state(self) -> dict[str, object] | None:
        try:
            data: dict[str, object] = json.loads((self.state / "checkpoint.json").read_text())
            return data
        except FileNotFoundError:
            return None

    def _as_checkpoint(self, raw: dict[str, object]) -> Checkpoint:
        disks = tuple(
            DiskInCheckpoint(d.id, str(self.image(d.id)), d.format, self.size(d.id)) for d in self.manifest.disks
        )
        return Checkpoint(
            str(raw["id"]), self.manifest.id, float(str(raw["created_at"])), f"seq:{raw['reference']}", disks
        )

    def create_checkpoint(self) -> Checkpoint:
        with exclusive_lock(self.state / "lock"):
            current = self._checkpoint_state()
            if current is not None and current["state"] == "merging":
                self._merge()
            elif current is not None:
                raise FailedPrecondition(
                    f"VM {self.manifest.name} already has checkpoint {current['id']}; remove it first"
                )
            raw: dict[str, object] = {
                "id": uuid.uuid4().hex,
                "created_at": time.time(),
                "reference": self._last_seq(),
                "state": "active",
            }
            atomic_write(self.state / "checkpoint.json", json.dumps(raw).encode())
            return self._as_checkpoint(raw)

    def list_checkpoints(self) -> list[Checkpoint]:
        raw = self._checkpoint_state()
        return [self._as_checkpoint(raw)] if raw is not None and raw["state"] == "active" else []

    def remove_checkpoint(self, checkpoint_id: str) -> None:
        with exclusive_lock(self.state / "lock"):
            raw = self._checkpoint_state()
            if raw is None:
                return  # already removed: idempotent
            if raw["id"] != checkpoint_id:
                raise NotFound(f"VM {self.manifest.name} has no checkpoint {checkpoint_id}")
            raw["state"] = "merging"
            atomic_write(self.state / "checkpoint.json", json.dumps(raw).encode())
            self._merge()

    def _merge(self) -> None:
        """Copy every overlay into its base, make it durable, then drop overlays and the checkpoint."""
        for d in self.manifest.disks:
            overlay, extents = self._overlay(d.id)
            if not extents:
                continue
            src = PositionalFile(overlay)
            dst = PositionalFile(self.image(d.id), writable=True)
            try:
                for e in extents:
                    for pos in range(e.offset, e.end, _COPY_CHUNK):
                        buf = bytearray(min(_COPY_CHUNK, e.end - pos))
                        src.read_into(memoryview(buf), pos)
                        dst.write(buf, pos)
                dst.sync()
            finally:
                src.close()
                dst.close()
        for d in self.manifest.disks:
            for suffix in (".raw", ".map"):
                (self.state / "overlay" / f"{d.id}{suffix}").unlink(missing_ok=True)
        (self.state / "checkpoint.json").unlink(missing_ok=True)

    def _overlay(self, disk_id: str) -> tuple[Path, list[Extent]]:
        base = self.state / "overlay" / disk_id
        try:
            lines = (base.with_suffix(".map")).read_text().splitlines()
        except FileNotFoundError:
            return base.with_suffix(".raw"), []
        return base.with_suffix(".raw"), merge(Extent(*json.loads(line)) for line in lines if line)

    # -- writes and change tracking ------------------------------------------------------------

    def _last_seq(self) -> int:
        try:
            with open(self.state / "changes.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() == 0:
                    return 0
                f.seek(max(0, f.tell() - 4096))
                return int(json.loads(f.read().splitlines()[-1])["seq"])
        except FileNotFoundError:
            return 0

    def write(self, disk_id: str, offset: int, data: bytes) -> None:
        """Write as the guest would: into the overlay while a checkpoint exists, else into the disk."""
        d = self._disk(disk_id)
        if d.format != "raw":
            raise FailedPrecondition(f"disk {disk_id} is {d.format}; the lab writes raw disks only")
        size = self.size(disk_id)
        if offset < 0 or offset + len(data) > size:
            raise InvalidArgument("offset", f"[{offset}, +{len(data)}) is outside disk {disk_id}")
        with exclusive_lock(self.state / "lock"):
            raw = self._checkpoint_state()
            if raw is not None and raw["state"] == "merging":
                self._merge()
                raw = None
            self._log_change(disk_id, offset, len(data))
            # Under a checkpoint the write goes to the overlay; the base stays as the checkpoint froze it.
            path = self.state / "overlay" / f"{disk_id}.raw" if raw is not None else self.image(disk_id)
            f = PositionalFile(path, writable=True, create=raw is not None)
            try:
                if f.size() < size:
                    f.truncate(size)
                f.write(data, offset)
                f.sync()
            finally:
                f.close()
            if raw is not None:  # recorded after the data: the merge must never copy bytes not written
                with open(self.state / "overlay" / f"{disk_id}.map", "a") as m:
                    m.write(json.dumps([offset, len(data)]) + "\n")

    def _log_change(self, disk_id: str, offset: int, length: int) -> None:
        # Logged, durably, before the data changes: a crash in between makes the tracker report a range
        # that did not change (harmless, it is sent again), never miss one that did.
        entry = {"seq": self._last_seq() + 1, "disk": disk_id, "offset": offset, "length": length}
        with open(self.state / "changes.log", "a") as log:
            log.write(json.dumps(entry) + "\n")
            log.flush()
            os.fsync(log.fileno())

    def read_current(self, disk_id: str, offset: int, length: int) -> bytes:
        """The disk as the guest sees it now: the base, with the overlay on top."""
        buf = bytearray(length)
        with open_reader(self._disk(disk_id).format, self.image(disk_id)) as r:
            r.read_into(memoryview(buf), offset)
        overlay, extents = self._overlay(disk_id)
        if extents:
            f = PositionalFile(overlay)
            try:
                for e in extents:
                    lo, hi = max(e.offset, offset), min(e.end, offset + length)
                    if lo < hi:
                        f.read_into(memoryview(buf)[lo - offset : hi - offset], lo)
            finally:
                f.close()
        return bytes(buf)

    def changed_ranges(self, checkpoint: Checkpoint, disk_id: str, since: str) -> list[Extent] | None:
        try:
            lo = int(since.removeprefix("seq:"))
            hi = int(checkpoint.reference.removeprefix("seq:"))
        except ValueError:
            return None
        if not since.startswith("seq:") or lo > hi:
            return None
        out = []
        try:
            with open(self.state / "changes.log") as log:
                for line in log:
                    e = json.loads(line)
                    if lo < e["seq"] <= hi and e["disk"] == disk_id:
                        out.append(Extent(e["offset"], e["length"]))
        except FileNotFoundError:
            pass
        return merge(out)


class FileHostProvider(Provider):
    """Every subfolder of `root` holding a vm.toml is a VM."""

    def __init__(self, root: Path, *, host: str = "localhost") -> None:
        self.root = root
        self.host = host

    def _vms(self) -> list[FileVm]:
        return [FileVm(p.parent, self.host) for p in sorted(self.root.glob(f"*/{MANIFEST}"))]

    def vm(self, ref: str) -> FileVm:
        for vm in self._vms():
            if ref in (vm.manifest.id, vm.manifest.name):
                return vm
        raise NotFound(f"no VM with id or name {ref!r} on file host {self.root}")

    async def list_vms(self) -> list[VmInfo]:
        return await asyncio.to_thread(lambda: [vm.info() for vm in self._vms()])

    async def get_vm(self, ref: str) -> VmInfo:
        return await asyncio.to_thread(lambda: self.vm(ref).info())

    def _configuration(self, vm_id: str) -> bytes:
        return (self.vm(vm_id).dir / MANIFEST).read_bytes()

    async def vm_configuration(self, vm_id: str) -> bytes:
        return await asyncio.to_thread(self._configuration, vm_id)

    async def create_checkpoint(self, vm_id: str) -> Checkpoint:
        return await asyncio.to_thread(lambda: self.vm(vm_id).create_checkpoint())

    async def list_checkpoints(self, vm_id: str) -> list[Checkpoint]:
        return await asyncio.to_thread(lambda: self.vm(vm_id).list_checkpoints())

    async def changed_ranges(self, checkpoint: Checkpoint, disk_id: str, since: str) -> list[Extent] | None:
        return await asyncio.to_thread(lambda: self.vm(checkpoint.vm_id).changed_ranges(checkpoint, disk_id, since))

    async def remove_checkpoint(self, vm_id: str, checkpoint_id: str) -> None:
        await asyncio.to_thread(lambda: self.vm(vm_id).remove_checkpoint(checkpoint_id))
