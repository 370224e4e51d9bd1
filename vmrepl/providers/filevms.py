"""The VM folders of a file host: their `vm.toml` manifests, and an index that finds a VM by reference.

The index parses a manifest once and again only when its file changes (device, inode, size, mtime and
ctime differ): a lookup costs a listing of the host folder and one `stat` per VM folder, not a parse of
every manifest. A folder whose manifest cannot be used (not TOML, an unknown key, a bad disk entry, a
symbolic link) is kept with the reason, so it fails alone: a reference to it gets that reason, and
every other VM is found as usual. References resolve by id first, then by a name only one folder
carries; a VM whose id another folder also carries is refused, naming both folders, because
checkpoints and replicas are keyed by id.
"""

from __future__ import annotations

import os
import threading
import tomllib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vmrepl.disk.fileio import atomic_write
from vmrepl.domain import DiskFormat
from vmrepl.errors import FailedPrecondition, InvalidArgument, NotFound, VmreplError
from vmrepl.names import check_name, check_relative
from vmrepl.providers.safefs import Folder

MANIFEST = "vm.toml"
MANIFEST_LIMIT = 1 << 20


class DiskManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    path: str = Field(description="image path relative to the VM folder")
    format: DiskFormat = DiskFormat.RAW

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

    @model_validator(mode="after")
    def _distinct(self) -> VmManifest:
        # A disk is found by its id; two disks over one image would write each other's bytes.
        for what, values in (("id", [d.id for d in self.disks]), ("path", [d.path for d in self.disks])):
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"disks: {what} {', '.join(twice)} is used by more than one disk")
        return self


def parse_manifest(data: bytes, where: Path) -> VmManifest:
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InvalidArgument(str(where), f"is not UTF-8 text: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(str(where), f"is not valid TOML: {e}") from e
    try:
        return VmManifest.model_validate(raw)
    except ValidationError as e:
        raise InvalidArgument(str(where), str(e)) from e


def load_manifest(vm_dir: Path) -> VmManifest:
    with Folder.open(vm_dir) as d:
        data = d.read(MANIFEST, limit=MANIFEST_LIMIT)
    if data is None:
        raise NotFound(f"{vm_dir} has no {MANIFEST}")
    return parse_manifest(data, vm_dir / MANIFEST)


def _toml_string(value: str) -> str:
    """A TOML basic string. Not json.dumps: its surrogate-pair escapes of characters past U+FFFF, and a raw
    U+007F, are not TOML (a VM named with an emoji would get a vm.toml nothing can read)."""
    out = []
    for c in value:
        if c in ('"', "\\"):
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def manifest_text(manifest: VmManifest) -> bytes:
    """The manifest as `vm.toml`."""
    lines = [f"name = {_toml_string(manifest.name)}", f"id = {_toml_string(manifest.id)}"]
    for d in manifest.disks:
        lines += ["", "[[disks]]", f"id = {_toml_string(d.id)}", f"path = {_toml_string(d.path)}"]
        lines.append(f"format = {_toml_string(d.format)}")
    return ("\n".join(lines) + "\n").encode()


def write_manifest(vm_dir: Path, manifest: VmManifest) -> None:
    atomic_write(vm_dir / MANIFEST, manifest_text(manifest))


@dataclass(frozen=True, slots=True)
class VmFolder:
    """One folder of the host: its manifest, or why it cannot be used."""

    name: str
    stamp: tuple[int, ...]
    manifest: VmManifest | None = None
    error: VmreplError | None = None
    # The id and name an unusable manifest gives, so a reference to it gets its error.
    claims: frozenset[str] = frozenset()

    @property
    def vm(self) -> VmManifest:
        if self.manifest is None:
            raise self.error or FailedPrecondition(f"folder {self.name} holds no usable VM")
        return self.manifest


def _claims(data: bytes | None) -> frozenset[str]:
    try:
        raw = tomllib.loads((data or b"").decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return frozenset()
    return frozenset(v for k, v in raw.items() if k in ("id", "name") and isinstance(v, str))


def _shared(root: Path, vm_id: str, folders: list[str]) -> str:
    return (
        f"VM id {vm_id} is used by more than one folder on file host {root}: {', '.join(folders)} "
        f"(copying a VM folder copies its id: give each its own id in its {MANIFEST})"
    )


class VmIndex:
    """The host folder's VM folders, parsed as they change. Thread-safe."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.parses = 0  # manifests parsed so far: what the index saves is visible in tests and benchmarks
        self._known: dict[str, VmFolder] = {}
        self._lock = threading.Lock()

    def folders(self) -> list[VmFolder]:
        with self._lock, Folder.open(self.root) as top:
            found: dict[str, VmFolder] = {}
            for entry in top.names():
                if entry.name.startswith("."):  # vmrepl's own (.vmrepl-host) and hidden folders: not VMs
                    continue
                folder = self._folder(top, entry)
                if folder is not None:
                    found[entry.name] = folder
            self._known = found
        return sorted(found.values(), key=lambda f: f.name)

    def _folder(self, top: Folder, entry: os.DirEntry[str]) -> VmFolder | None:
        if entry.is_symlink():
            reason = "a VM folder must be a real folder inside the host folder"
            return VmFolder(entry.name, (), error=FailedPrecondition(f"{entry.path} is a symbolic link: {reason}"))
        if not entry.is_dir(follow_symlinks=False):
            return None
        try:
            st = os.stat(f"{entry.name}/{MANIFEST}", dir_fd=top.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None  # not a VM folder
        except OSError as e:
            return VmFolder(entry.name, (), error=FailedPrecondition(f"{entry.path}/{MANIFEST}: {e.strerror}"))
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        known = self._known.get(entry.name)
        if known is not None and known.stamp == stamp:
            return known
        self.parses += 1
        data: bytes | None = None
        try:
            with top.child(entry.name) as d:
                data = d.read(MANIFEST, limit=MANIFEST_LIMIT)
            if data is None:
                return None  # removed meanwhile
            return VmFolder(entry.name, stamp, manifest=parse_manifest(data, self.root / entry.name / MANIFEST))
        except VmreplError as e:
            return VmFolder(entry.name, stamp, error=e, claims=_claims(data))

    def find(self, ref: str) -> VmFolder:
        """The folder of the VM `ref` names: by id, else by a name only one folder carries."""
        folders = self.folders()
        usable = [f for f in folders if f.manifest is not None]
        chosen = [f for f in usable if f.vm.id == ref] or [f for f in usable if f.vm.name == ref]
        if not chosen:
            for f in folders:
                if f.error is not None and (ref == f.name or ref in f.claims):
                    raise f.error.with_traceback(None)  # the same error each time it is asked for
            raise NotFound(f"no VM with id or name {ref!r} on file host {self.root}")
        if len(chosen) > 1 and chosen[0].vm.id != ref:
            candidates = ", ".join(f"folder {f.name} (id {f.vm.id})" for f in chosen)
            raise FailedPrecondition(
                f"VM name {ref!r} is ambiguous on file host {self.root}: {candidates}; name the VM by its id"
            )
        twins = [f.name for f in usable if f.vm.id == chosen[0].vm.id]
        if len(twins) > 1:
            raise FailedPrecondition(_shared(self.root, chosen[0].vm.id, twins))
        return chosen[0]

    def check_unique_ids(self) -> None:
        """Refuse a host where two folders carry one VM id, naming them."""
        by_id: dict[str, list[str]] = defaultdict(list)
        for f in self.folders():
            if f.manifest is not None:
                by_id[f.manifest.id].append(f.name)
        shared = [_shared(self.root, vm_id, names) for vm_id, names in by_id.items() if len(names) > 1]
        if shared:
            raise FailedPrecondition("; ".join(shared))
