"""Replication sessions driven through the target's own code in process (prepare, ReplicaStream, commit), on
any replica path, and the reads the mount and failback tests compare: a point's bytes as
`points.open_point_disk` gives them, a mount's disk as the layer reader gives it."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from target_agent import mounts, points, replica, restore_points, vm_replica
from target_agent.datastore import Datastore
from target_agent.replica import DiskGuard
from vmrepl.batch import BatchDecoder, BatchEncoder
from vmrepl.block import digest, is_zero
from vmrepl.disk.base import DiskReader, open_reader
from vmrepl.disk.layer import open_layer
from vmrepl.domain import Compression, DiskFormat

BS = 64 * 1024  # the API's smallest block size: PrepareFailbackDisk takes no less


def image(blocks: int, seed: int, *, tail: int = 0) -> bytes:
    """`blocks` blocks (every fifth all zeros, the rest random) and a short block of `tail` bytes."""
    rnd = random.Random(seed)
    out = b"".join(bytes(BS) if i % 5 == 2 else rnd.randbytes(BS) for i in range(blocks))
    return out + rnd.randbytes(tail)


def changed(data: bytes, seed: int, *, share: float = 0.4) -> bytes:
    """`data` with a share of its blocks changed: data to data, data to zeros, zeros to data."""
    rnd = random.Random(seed)
    out = bytearray(data)
    blocks = -(-len(data) // BS)
    for i in rnd.sample(range(blocks), max(1, int(blocks * share))):
        n = min(BS, len(data) - i * BS)
        out[i * BS : i * BS + n] = bytes(n) if rnd.random() < 0.3 else rnd.randbytes(n)
    return bytes(out)


def read_all(reader: DiskReader) -> bytes:
    buf = bytearray(reader.size)
    reader.read_into(memoryview(buf), 0)
    return bytes(buf)


def differ(got: bytes | bytearray | memoryview, want: bytes | bytearray | memoryview) -> str:
    """ "" when equal, else where they first differ. Tests assert `not differ(a, b)` rather than `a == b`:
    with CI set, pytest diffs unequal bytes in full (difflib over every line of their repr), which takes
    hours for a disk image, so a failure would show as a timeout instead of this line."""
    if got == want:
        return ""
    a, b = bytes(got), bytes(want)
    at = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
    return f"{len(a)} bytes, {len(b)} wanted; first difference at offset {at}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Replica:
    """One VM replica of the datastore at `root`, written by sessions run here."""

    root: Path
    replica_path: str = "jobs/vm1"
    disk_id: str = "disk0"
    replica_format: str = "raw"
    guards: dict[Path, DiskGuard] = field(default_factory=dict)
    images: dict[str, bytes] = field(default_factory=dict)  # session -> the disk it left

    @property
    def store(self) -> Datastore:
        return Datastore(self.root)

    @property
    def vm_dir(self) -> Path:
        return self.store.vm_dir(self.replica_path)

    @property
    def disk_dir(self) -> Path:
        return self.store.disk_dir(self.replica_path, self.disk_id)

    def guard(self, disk_dir: Path) -> DiskGuard:
        return self.guards.setdefault(disk_dir, DiskGuard())

    def prepare(self, sid: str, size: int, *, checkpoint: str = "", resume: str = "") -> replica.DiskState:
        return vm_replica.prepare_disk(
            self.vm_dir,
            self.disk_dir,
            guards=self.guard,
            disk_size=size,
            block_size=BS,
            session_id=sid,
            checkpoint_id=checkpoint or f"cp-{sid}",
            resume_session_id=resume,
            replica_format=self.replica_format,
        )

    def stream(self, sid: str, data: bytes, *, base: bytes | None, stop_after: int = 0, checkpoint: str = "") -> None:
        """The blocks of `data` that differ from `base` (all with None), two blocks' range per batch."""
        s = replica.ReplicaStream(
            self.disk_dir,
            self.guard(self.disk_dir),
            session_id=sid,
            checkpoint_id=checkpoint or f"cp-{sid}",
            disk_size=len(data),
            block_size=BS,
            pass_number=0,
        )
        dec = BatchDecoder(disk_size=len(data), block_size=BS, start=s.resume_offset)
        try:
            step = 2 * BS
            for seq, start in enumerate(range(s.resume_offset, len(data), step)):
                end = min(len(data), start + step)
                enc = BatchEncoder(seq=seq, start=start, end=end, final=end == len(data), compression=Compression.NONE)
                for at in range(start, end, BS):
                    block = data[at : min(end, at + BS)]
                    if base is not None and base[at : at + len(block)] == block:
                        continue
                    if is_zero(block):
                        enc.add_zero(at, len(block))
                    else:
                        enc.add_data(at, block, digest(block))
                batch = dec.receive(enc.finish().frame).decode()
                s.apply(batch)
                if batch.final or seq % 3 == 2:
                    s.commit(s.mark(end, final=batch.final))
                if seq + 1 == stop_after:
                    return
        finally:
            s.close()

    def commit(self, sid: str, *, checkpoint: str = "") -> restore_points.Point:
        return restore_points.commit(
            self.vm_dir,
            session_id=sid,
            checkpoint_id=checkpoint or f"cp-{sid}",
            disk_ids=[self.disk_id],
            guard=self.guard,
        )

    def session(self, sid: str, data: bytes, *, base: bytes | None = None) -> restore_points.Point:
        """A whole session: prepared, streamed (only what differs from `base`), committed."""
        self.prepare(sid, len(data))
        self.stream(sid, data, base=base)
        self.images[sid] = data
        return self.commit(sid)

    def point_bytes(self, point_id: str) -> bytes:
        pd = points.open_point_disk(self.vm_dir, point_id, self.disk_id)
        try:
            return read_all(pd)
        finally:
            pd.close()

    def point_digests(self, point_id: str) -> bytes:
        pd = points.open_point_disk(self.vm_dir, point_id, self.disk_id)
        try:
            return pd.digests(0, pd.blocks)
        finally:
            pd.close()

    def data_bytes(self) -> bytes:
        st = replica.load_state(self.disk_dir)
        reader = open_reader(DiskFormat(st.replica_format), replica.data_file(self.disk_dir, st.replica_format))
        try:
            return read_all(reader)
        finally:
            reader.close()


def mount_bytes(rec: mounts.MountRecord, disk_id: str = "disk0") -> bytes:
    """A mount's disk as the host would read it (a layer disk, or the VHDX)."""
    d = next(d for d in rec.disks if d.disk_id == disk_id)
    path = Path(rec.folder) / d.path
    reader: DiskReader = (
        open_layer(path) if d.format == DiskFormat.LAYER.value else open_reader(DiskFormat(d.format), path)
    )
    try:
        return read_all(reader)
    finally:
        reader.close()
