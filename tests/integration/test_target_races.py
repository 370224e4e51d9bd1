"""The target's disk state against races and crashes a controller or a proxy can cause by being late.

Each test runs a real target process and plays the controller and a proxy against it with their own
certificates; a power cut is simulated after kill -9 by putting back what the cut may lose.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc

from controller import lab
from controller.engine.agents import target_client
from tests.integration import test_transfer_admission as admission
from tests.integration.test_transfer_admission import (  # noqa: F401  (start_target is a fixture)
    BS,
    CHECKPOINT,
    SESSION,
    StartTarget,
    channel,
    open_frame,
    open_stream,
    prepare_disks,
    start_target,
)
from tests.support.certs import tls_settings
from vmrepl.block import DIGEST_SIZE, digest, is_zero, zero_digest
from vmrepl.v1 import target_pb2

PATH = "jobs/race"
BLOCKS = 16


def block_frame(seq: int, data: bytes) -> bytes:
    """Batch `seq` of a one-block-per-batch stream: block `seq` holds `data`."""
    return admission.block_frame(seq, data, blocks=BLOCKS)


def disk_dir(target: lab.AgentProcess) -> Path:
    return target.config.parent / "datastore" / PATH / "disks" / "disk0"


async def digest_on_file(path: Path, block: int, want: bytes, within: float = 20.0) -> None:
    """Wait until the target has recorded `want` as block `block`'s digest (it is in the page cache)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        raw = path.read_bytes()
        if raw[block * DIGEST_SIZE : (block + 1) * DIGEST_SIZE] == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"block {block}'s digest never reached {path}")


def vouching(disk: Path) -> list[int]:
    """Blocks whose recorded digest is known and differs from what the data file holds."""
    table = (disk / "digests.bin").read_bytes()
    out = []
    with open(disk / "data.raw", "rb") as f:
        for i in range(BLOCKS):
            d = table[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
            if d == bytes(DIGEST_SIZE):
                continue
            data = f.read(BS) if f.seek(i * BS) == i * BS else b""
            if d != (zero_digest(BS) if is_zero(data) else digest(data)):
                out.append(i)
    return out


async def next_session_digests(target: lab.AgentProcess, lab_certs: lab.LabCerts, *, disk_size: int) -> bytes:
    """Prepare the disk for a next session and read its digests, as a digest comparison does."""
    client = target_client(target.address, tls_settings(lab_certs, "controller"))
    try:
        await client.stub.PrepareReplicaDisk(
            target_pb2.PrepareReplicaDiskRequest(
                replica_path=PATH,
                disk_id="disk0",
                disk_size=disk_size,
                block_size=BS,
                session_id=SESSION + "-next",
                checkpoint_id=CHECKPOINT + "-next",
            ),
            timeout=10,
        )
        request = target_pb2.ReadDigestsRequest(replica_path=PATH, disk_id="disk0")
        return b"".join([c.digests async for c in client.stub.ReadDigests(request, timeout=10)])
    finally:
        await client.close()


async def test_a_prepare_while_an_older_stream_still_writes_leaves_no_digest_to_vouch_after_a_power_cut(
    start_target: StartTarget,  # noqa: F811  (the fixture imported above)
    lab_certs: lab.LabCerts,
) -> None:
    """The controller prepares the disk again (a retry, another proxy) while the earlier proxy's stream is
    still alive on the target. Whatever that stream writes after the prepare must stay inside the frontier
    the state file records, or a power cut leaves digests vouching for data that never reached the disk."""
    target = start_target()
    disk_size = BLOCKS * BS
    await prepare_disks(target, lab_certs, [PATH], disk_size=disk_size)
    disk = disk_dir(target)
    blocks = [os.urandom(BS) for _ in range(BLOCKS)]
    async with channel(target.address, tls_settings(lab_certs, "proxy")) as ch:
        # A window of 64: the target commits every 32 batches, so nothing below is committed.
        call, answer = await open_stream(ch, open_frame(lab_certs, PATH, disk_size=disk_size, window=64))
        assert answer.HasField("accept"), answer
        for seq in range(3):
            await call.write(block_frame(seq, blocks[seq]))
        await digest_on_file(disk / "digests.bin", 2, digest(blocks[2]))
        # The controller's retry: the same session and checkpoint, so the transfer resumes.
        await prepare_disks(target, lab_certs, [PATH], disk_size=disk_size)
        late = []
        for seq in range(3, 6):
            try:
                await call.write(block_frame(seq, blocks[seq]))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                break  # the target ended the older stream: nothing more from it
            late.append(seq)
        if late:  # what the target accepted, give it time to write it (or refuse it)
            await asyncio.sleep(1.0)
        target.kill()
    # The power cut: nothing written after the last flush (the prepare's) reached the data file, while
    # the digest file's pages did. Put the data back as it was: a sparse, zero disk.
    with open(disk / "data.raw", "r+b") as f:
        for seq in range(3, BLOCKS):
            f.seek(seq * BS)
            f.write(bytes(BS))
    target.start()
    # The next session prepares the disk and reads its digests, as a digest comparison does.
    table = await next_session_digests(target, lab_certs, disk_size=disk_size)
    assert table == (disk / "digests.bin").read_bytes()
    assert vouching(disk) == [], f"digests vouch for blocks the power cut lost (late writes: {late})"
