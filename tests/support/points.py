"""A target's servicer in process with a committed restore point on disk, and a fake gRPC context, for the
tests of verification and export (no sockets)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from target_agent import replica, restore_points
from target_agent.config import TargetSettings
from target_agent.servicer import TargetAgentServicer
from vmrepl.block import digest, is_zero
from vmrepl.extent import KiB

BS = 64 * KiB
REPLICA_PATH = "jobs/vm1"


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    """A caller with the certificate `pem` (none: an address only)."""

    def __init__(self, pem: bytes = b"") -> None:
        self.pem = pem

    def auth_context(self) -> Mapping[str, Sequence[bytes]]:
        return {"x509_pem_cert": [self.pem]} if self.pem else {}

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> None:
        raise Aborted(code, details)


def servicer(root: Path, **settings: Any) -> TargetAgentServicer:
    root.mkdir(parents=True, exist_ok=True)
    key = root / "controller.pub"
    key.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    values = {
        "datastore_root": root / "store",
        "controller_public_keys": [key],
        "tls": {"ca_file": root / "ca.pem", "cert_file": root / "t.pem", "key_file": root / "t.key"},
        **settings,
    }
    return TargetAgentServicer(TargetSettings.model_validate(values))


def disk_bytes(blocks: int, *, tail: int = 0, zero_every: int = 5, seed: int = 1) -> bytes:
    """`blocks` blocks of BS (every `zero_every`-th all zeros, the rest random) and a short block of `tail`."""
    out = bytearray()
    rnd = random.Random(seed)
    for b in range(blocks):
        out += bytes(BS) if b % zero_every == 0 else rnd.randbytes(BS)
    return bytes(out + rnd.randbytes(tail))


def commit_disk(
    s: TargetAgentServicer,
    data: bytes,
    *,
    disk_id: str = "disk0",
    session: str = "s1",
    replica_path: str = REPLICA_PATH,
    zeros_written: bool = False,
) -> restore_points.Point:
    """A replica disk holding `data` as a completed transfer (zero blocks left as holes, or written as
    zeros with `zeros_written`; every block's digest recorded), committed as a restore point of `session`."""
    disk = s.datastore.disk_dir(replica_path, disk_id)
    replica.prepare(
        disk,
        guard=s.receiver.guard(disk),
        disk_size=len(data),
        block_size=BS,
        session_id=session,
        checkpoint_id=f"cp-{session}",
    )
    digests = replica.DigestStore(disk / replica.DIGESTS_FILE, block_size=BS, disk_size=len(data))
    with open(disk / replica.DATA_FILE, "r+b") as f:
        for off in range(0, len(data), BS):
            block = data[off : off + BS]
            if zeros_written or not is_zero(block):
                f.seek(off)
                f.write(block)
            digests.put(off, digest(block))
    digests.close()
    st = replica.load_state(disk)
    st.state, st.committed_offset, st.frontier = replica.COMPLETE, len(data), len(data)
    replica.save_state(disk, st)
    return restore_points.commit(
        s.datastore.vm_dir(replica_path),
        session_id=session,
        checkpoint_id=f"cp-{session}",
        disk_ids=[disk_id],
        guard=s.receiver.guard,
    )


def data_file(s: TargetAgentServicer, disk_id: str = "disk0") -> Path:
    return s.datastore.disk_dir(REPLICA_PATH, disk_id) / replica.DATA_FILE


def overwrite(path: Path, offset: int, data: bytes) -> None:
    """Change the replica's bytes behind its digests' back (a bit flipped on the target's disk)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
