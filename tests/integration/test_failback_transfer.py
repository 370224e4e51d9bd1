"""The failback transfer with real agents: the session engine in this process (its database, journal and
controller.engine.reverse), a real proxy and a real target on loopback with mTLS.

The original VM's disk is on a file host under the target's failback_roots. The failed-over VM is a file-host
VM whose disk is a layer (vmrepl.disk.layer) over a copy of the original (what a replica at the point holds),
changed in a few blocks after failover. The transfer reads the layer disk from a checkpoint of it, compares
digests with the original's and writes only what differs onto the original itself (PrepareFailbackDisk's hard
link): afterwards the original equals the failed-over VM, it is the same file, and only the changed blocks
travelled. Cut halfway by a controller crash and undone, the original is back as it was, byte for byte."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from controller import lab
from controller.db.connect import open_database, sqlite_url
from controller.db.enums import SessionKind, SessionState, TaskState
from controller.db.models import Host, Job, JobVm, Proxy, Session, Target, Task
from controller.engine.agents import AgentPool
from controller.engine.journal import Journal
from controller.engine.operations.context import ReverseRequest
from controller.engine.reverse import FailbackTransfers
from controller.engine.runtime import EngineParts, TargetView
from controller.engine.slots import SlotBoard
from tests.conftest import need_tool
from tests.support.certs import tls_settings
from vmrepl.disk import open_reader
from vmrepl.disk.layer import create_layer, open_layer
from vmrepl.domain import ChangeMode, DiskFormat
from vmrepl.extent import KiB, MiB
from vmrepl.providers.filehost import DiskManifest, FileHostProvider, VmManifest, write_manifest
from vmrepl.security.ticket import load_signing_key

BLOCK = 64 * KiB
SIZE = 16 * MiB


@dataclass
class Failback:
    parts: EngineParts
    db: AsyncEngine
    pool: AgentPool
    request: ReverseRequest
    original: Path  # the original VM's disk
    original_format: DiskFormat
    failed_over: FileHostProvider
    fo_vm: str
    datastore: Path

    def original_bytes(self) -> bytes:
        with open_reader(self.original_format, self.original) as disk:
            buf = bytearray(disk.size)
            disk.read_into(memoryview(buf), 0)
        return bytes(buf)

    def failed_over_bytes(self) -> bytes:
        layer = self.failed_over.vm(self.fo_vm).dir / "disk0.layer"
        with open_layer(layer) as disk:
            buf = bytearray(disk.size)
            disk.read_into(memoryview(buf), 0)
        return bytes(buf)

    async def tasks(self) -> list[Task]:
        async with self.parts.journal.read() as db:
            return list(await db.scalars(select(Task).where(Task.session_id == self.request.session_id)))


def _failed_over_vm(host: Path, original: Path) -> str:
    """A VM as failover leaves it on a file host: a layer disk over the point's bytes (here a copy of the
    original, as the replica at the point holds them)."""
    vm_id = uuid.uuid4().hex
    folder = host / "web01-failover"
    folder.mkdir(parents=True)
    shutil.copyfile(original, folder / "disk0.base.raw")
    create_layer(
        folder,
        "disk0",
        size=SIZE,
        base="disk0.base.raw",
        base_format=DiskFormat.RAW,
        stores=["disk0.point", "disk0.top"],
    )
    manifest = VmManifest(
        name="web01-failover", id=vm_id, disks=[DiskManifest(id="disk0", path="disk0.layer", format=DiskFormat.LAYER)]
    )
    write_manifest(folder, manifest)
    return vm_id


async def _rows(parts: EngineParts, proxy: lab.AgentProcess, target: lab.AgentProcess, **job: object) -> dict[str, str]:
    async with parts.journal.write() as db:
        source, failover = (
            Host(name="orig", provider="file", address="/"),
            Host(name="fo", provider="file", address="/"),
        )
        t = Target(name="target", address=target.address)
        db.add_all([source, failover, t, Proxy(name="proxy", address=proxy.address)])
        await db.flush()
        settings: dict[str, object] = {"retries": 0, **job}
        j = Job(name="job1", host_id=source.id, target_id=t.id, replica_root="jobs/job1", block_size=BLOCK, **settings)
        j.vms = [JobVm(vm_ref="web01")]
        db.add(j)
        await db.flush()
        s = Session(job_id=j.id, state=SessionState.RUNNING, kind=SessionKind.OPERATION, operation="failback")
        db.add(s)
        await db.flush()
        return {"job": j.id, "session": s.id, "target": t.id, "failover": failover.id}


@pytest.fixture
async def failback_env(
    tmp_path: Path, lab_certs: lab.LabCerts, request: pytest.FixtureRequest
) -> AsyncIterator[Failback]:
    settings = dict(getattr(request, "param", {}))
    fmt = DiskFormat(settings.pop("format", "raw"))
    hosts = tmp_path / "hosts"
    originals = hosts / "orig"
    (originals / "web01").mkdir(parents=True)
    content = tmp_path / "content.raw"
    lab.make_mixed_image(content, SIZE, block=BLOCK)
    fo_host = hosts / "failover"
    fo_vm = _failed_over_vm(fo_host, content)
    original = originals / "web01" / f"disk0.{fmt.value}"
    if fmt is DiskFormat.RAW:
        shutil.copyfile(content, original)
    else:  # a Hyper-V host's own kind of disk, made by another tool than vmrepl
        need_tool("qemu-img")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", str(content), str(original)], check=True)
    target = lab.AgentProcess(
        "target_agent",
        lab.target_config(tmp_path, lab_certs, level="debug", failback_roots=[str(originals)]),
        tmp_path / "target.log",
    )
    proxy = lab.AgentProcess(
        "proxy_agent", lab.proxy_config(tmp_path, lab_certs, sources=hosts), tmp_path / "proxy.log"
    )
    engine, sessions = await open_database(sqlite_url(tmp_path / "controller.db"))
    pool = AgentPool(tls_settings(lab_certs, "controller"))
    parts = EngineParts(
        journal=Journal(sessions), agents=pool, slots=SlotBoard(), signing_key=load_signing_key(lab_certs.signing_key)
    )
    try:
        target.start()
        proxy.start()
        ids = await _rows(parts, proxy, target, **settings)
        view = TargetView(
            target_id=ids["target"], name="target", address=target.address, tls_server_name="", max_tasks=4
        )
        req = ReverseRequest(
            session_id=ids["session"],
            job_id=ids["job"],
            vm_id="web01",
            vm_name="web01",
            source_host_id=ids["failover"],
            source=FileHostProvider(fo_host),
            source_vm_id=fo_vm,
            target=view,
            replica_path=f".failback/{ids['job']}/web01",
            original_disks=(("disk0", str(original), fmt),),
            block_size=BLOCK,
        )
        yield Failback(
            parts, engine, pool, req, original, fmt, FileHostProvider(fo_host), fo_vm, tmp_path / "datastore"
        )
    finally:
        await pool.close()
        await engine.dispose()
        proxy.stop()
        target.stop()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("failback_env", [{}, {"format": "vhdx"}], indirect=True, ids=["raw", "vhdx"])
async def test_only_the_changed_blocks_travel_back_and_the_original_then_equals_the_failed_over_vm(
    failback_env: Failback,
) -> None:
    env = failback_env
    inode = os.stat(env.original).st_ino
    vm = env.failed_over.vm(env.fo_vm)
    # The failed-over VM's changes: two whole blocks, a few bytes inside a third, and a block zeroed.
    await asyncio.to_thread(vm.write, "disk0", 5 * BLOCK, os.urandom(BLOCK))
    await asyncio.to_thread(vm.write, "disk0", 100 * BLOCK, os.urandom(BLOCK))
    await asyncio.to_thread(vm.write, "disk0", 200 * BLOCK + 4000, b"changed after failover")
    before = env.original_bytes()
    zeroed = next(b for b in range(SIZE // BLOCK) if any(before[b * BLOCK : (b + 1) * BLOCK]))
    await asyncio.to_thread(vm.write, "disk0", zeroed * BLOCK, bytes(BLOCK))
    assert env.failed_over_bytes() != before

    transfers = FailbackTransfers(env.parts)
    figures = await asyncio.wait_for(transfers.transfer(env.request), 120)

    # Three blocks travelled with data (the zeroed one as a zero extent): nothing else.
    assert figures.blocks_differing == 3, figures
    assert 0 < figures.bytes_sent <= 3 * BLOCK + 4 * KiB and figures.bytes_read > 0
    (task,) = await env.tasks()
    assert (task.state, task.change_mode, task.vm_id) == (TaskState.SUCCEEDED, ChangeMode.COMPARE.value, env.fo_vm)
    # The original holds the failed-over VM's disk, in the same file (the failback wrote it in place).
    assert env.original_bytes() == env.failed_over_bytes()
    assert os.stat(env.original).st_ino == inode
    assert not vm.list_checkpoints()  # the checkpoint the proxy read from is gone

    # The failback kept: its folder goes, the original stays as it is now.
    now = _sha(env.original)
    await transfers.finish(env.request)
    assert not (env.datastore / env.request.replica_path).exists()
    assert _sha(env.original) == now and os.stat(env.original).st_ino == inode


async def _cut_halfway(env: Failback) -> tuple[str, FailbackTransfers]:
    """Half the failed-over VM's blocks changed, the failback started at 1 MB/s (it takes seconds) and the
    controller killed once the original is partly written: the original's hash before, and the transfers."""
    before = _sha(env.original)
    vm = env.failed_over.vm(env.fo_vm)
    for b in range(0, SIZE // BLOCK, 2):
        await asyncio.to_thread(vm.write, "disk0", b * BLOCK, os.urandom(BLOCK))
    transfers = FailbackTransfers(env.parts)
    run = asyncio.create_task(transfers.transfer(env.request))
    for _ in range(400):  # until the target has written part of the original (in place: the file changes)
        await asyncio.sleep(0.05)
        if _sha(env.original) != before:
            break
    assert not run.done() and _sha(env.original) != before  # written in place, halfway
    run.cancel()  # the controller dies; the proxy and the target go on
    with pytest.raises(asyncio.CancelledError):
        await run
    return before, transfers


@pytest.mark.parametrize("failback_env", [{"bandwidth_limit_mbps": 1.0}], indirect=True)
async def test_a_failback_cut_by_a_controller_crash_and_undone_leaves_the_original_as_it_was(
    failback_env: Failback,
) -> None:
    env = failback_env
    inode = os.stat(env.original).st_ino
    before, transfers = await _cut_halfway(env)
    await asyncio.wait_for(transfers.roll_back(env.request), 120)  # after the restart the step is undone
    assert _sha(env.original) == before and os.stat(env.original).st_ino == inode
    assert not (env.datastore / env.request.replica_path).exists()
    assert not env.failed_over.vm(env.fo_vm).list_checkpoints()
    (task,) = await env.tasks()
    assert task.state is TaskState.RESUMABLE  # cancelled on the proxy before the rollback


@pytest.mark.parametrize("failback_env", [{"bandwidth_limit_mbps": 1.0}], indirect=True)
async def test_a_failback_cut_by_a_controller_crash_is_continued_to_the_end(failback_env: Failback) -> None:
    env = failback_env
    _, transfers = await _cut_halfway(env)
    figures = await asyncio.wait_for(transfers.transfer(env.request), 120)  # after the restart: continued
    assert env.original_bytes() == env.failed_over_bytes()
    # The transfer the proxy went on with was watched again, not started over: each changed block once.
    assert figures.blocks_differing == SIZE // BLOCK // 2
    (task,) = await env.tasks()
    assert task.state is TaskState.SUCCEEDED and not env.failed_over.vm(env.fo_vm).list_checkpoints()
