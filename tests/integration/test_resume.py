"""A broken stream resumes from the target's committed offset and re-sends little."""

from __future__ import annotations

import asyncio
import contextlib

from tests.integration.conftest import Lab
from tests.support.replicas import qemu_identical
from vmrepl.extent import MiB
from vmrepl.v1 import proxy_pb2

WINDOW_BATCHES = 16  # the proxy's default
BATCH_DATA = 4 * MiB  # the proxy's default batch size


def resent_bytes(lab_env: Lab, needed: int) -> int:
    """Data bytes the target received beyond what the disk needed (its batch_received log lines)."""
    received = sum(int(e["data_bytes"]) for e in lab_env.target_events("batch_received"))  # type: ignore[call-overload]
    return received - needed


async def test_target_killed_mid_stream_resumes(lab_env: Lab, data_bytes: int) -> None:
    size = lab_env.image.stat().st_size
    spec = lab_env.spec("s-kill", bandwidth_limit_mbps=50)
    task = asyncio.create_task(lab_env.replicate(spec, target_address=lab_env.target.address))
    killed_at = 0
    for _ in range(600):
        await asyncio.sleep(0.05)
        with contextlib.suppress(Exception):
            c = (await lab_env.replica_disk()).committed_offset
            if size // 4 <= c <= size * 3 // 4:
                lab_env.target.kill()
                killed_at = c
                break
    assert killed_at, "never saw the committed offset between 25% and 75%"
    port = lab_env.target.port
    await asyncio.sleep(1.0)  # the proxy finds the target gone and starts reconnecting
    lab_env.target.env["VMREPL_TARGET_LISTEN"] = f"127.0.0.1:{port}"
    lab_env.target.start()
    result = await asyncio.wait_for(task, 120)
    assert result.state == proxy_pb2.TRANSFER_STATE_COMPLETED and result.resumes >= 1
    assert qemu_identical(lab_env.image, lab_env.replica())
    opened = lab_env.target_events("stream_opened")
    assert int(str(opened[-1]["resume_offset"])) >= killed_at
    resent = resent_bytes(lab_env, data_bytes)
    assert 0 <= resent <= WINDOW_BATCHES * BATCH_DATA + BATCH_DATA, resent


class Relay:
    """A TCP relay that cuts every connection once `cut_after` bytes went from client to server."""

    def __init__(self, upstream_port: int, cut_after: int) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.forwarded = 0
        self.cuts = 0
        self._writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [w, uw]
        await asyncio.gather(self._pump(r, uw, count=True), self._pump(ur, w, count=False), return_exceptions=True)

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, *, count: bool) -> None:
        try:
            while data := await r.read(256 * 1024):
                w.write(data)
                await w.drain()
                if count:
                    self.forwarded += len(data)
                    if self.cuts == 0 and self.forwarded >= self.cut_after:
                        self.cut()
                        return
        finally:
            w.close()

    def cut(self) -> None:
        self.cuts += 1
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_connection_cut_by_the_network_resumes(lab_env: Lab, data_bytes: int) -> None:
    relay = Relay(lab_env.target.port, cut_after=50 * MiB)
    await relay.start()
    try:
        result = await asyncio.wait_for(
            lab_env.replicate(lab_env.spec("s-cut"), target_address=f"127.0.0.1:{relay.port}"), 120
        )
    finally:
        await relay.close()
    assert relay.cuts == 1
    assert result.state == proxy_pb2.TRANSFER_STATE_COMPLETED and result.resumes >= 1
    assert qemu_identical(lab_env.image, lab_env.replica())
    resent = resent_bytes(lab_env, data_bytes)
    assert 0 <= resent <= WINDOW_BATCHES * BATCH_DATA + BATCH_DATA, resent
