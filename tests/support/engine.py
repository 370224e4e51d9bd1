"""The session engine in one process for tests: the real database (SQLite in a folder) and Journal,
fake agents (tests.support.agents) and a fake provider. No sockets, no child processes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.db.connect import open_database
from controller.db.enums import SessionState, TaskState, VmState
from controller.db.models import Host, Job, JobVm, Proxy, Session, SessionVm, Target, Task
from controller.engine.journal import Journal
from controller.engine.runtime import EngineParts, SessionContext, TargetView
from controller.engine.sessions import job_view
from controller.engine.slots import SlotBoard
from tests.support.agents import FakeAgents, FakeProxy, FakeTarget
from tests.support.controller_db import seeded_sqlite_url
from vmrepl.domain import DiskFormat
from vmrepl.errors import NotFound
from vmrepl.extent import Extent, MiB
from vmrepl.providers.base import (
    CRASH_CONSISTENT,
    Checkpoint,
    CheckpointRequest,
    DiskInCheckpoint,
    DiskInfo,
    Provider,
    Untracked,
    VmInfo,
)

DISK_SIZE = 8 * MiB


class FakeProvider(Provider):
    """A host whose VMs have disks of DISK_SIZE; checkpoints live in memory. `changes` is what change
    tracking reports per disk id (absent: the host cannot say)."""

    def __init__(self, vms: dict[str, tuple[str, ...]]) -> None:
        self.vms = {
            vm_id: VmInfo(
                vm_id, vm_id, "host", tuple(DiskInfo(d, f"/src/{vm_id}/{d}", DiskFormat.RAW, DISK_SIZE) for d in disks)
            )
            for vm_id, disks in vms.items()
        }
        self.checkpoints: dict[str, list[Checkpoint]] = {}
        self.created = 0
        self.removed: list[str] = []
        self.changes: dict[str, list[Extent]] = {}

    async def list_vms(self) -> list[VmInfo]:
        return list(self.vms.values())

    async def get_vm(self, ref: str) -> VmInfo:
        for vm in self.vms.values():
            if ref in (vm.vm_id, vm.name):
                return vm
        raise NotFound(f"no VM {ref}")

    async def vm_configuration(self, vm_id: str) -> bytes:
        return b"{}"

    async def create_checkpoint(self, vm_id: str, request: CheckpointRequest = CRASH_CONSISTENT) -> Checkpoint:
        self.created += 1
        n = self.created
        disks = tuple(
            DiskInCheckpoint(d.disk_id, f"{d.locator}@cp{n}", d.format, d.size) for d in self.vms[vm_id].disks
        )
        cp = Checkpoint(f"cp{n}", vm_id, time.time(), f"ref{n}", disks)
        self.checkpoints.setdefault(vm_id, []).append(cp)
        return cp

    async def list_checkpoints(self, vm_id: str) -> list[Checkpoint]:
        return list(self.checkpoints.get(vm_id, []))

    async def changed_ranges(self, checkpoint: Checkpoint, disk_id: str, since: str) -> list[Extent] | Untracked:
        changes = self.changes.get(disk_id)
        return Untracked("the fake host tracks no changes of this disk") if changes is None else changes

    async def remove_checkpoint(self, vm_id: str, checkpoint_id: str) -> None:
        kept = [c for c in self.checkpoints.get(vm_id, []) if c.checkpoint_id != checkpoint_id]
        if len(kept) != len(self.checkpoints.get(vm_id, [])):
            self.removed.append(checkpoint_id)
        self.checkpoints[vm_id] = kept


@dataclass
class World:
    db: AsyncEngine
    journal: Journal
    parts: EngineParts
    sc: SessionContext
    proxy: FakeProxy
    target: FakeTarget
    provider: FakeProvider
    signing_key: ed25519.Ed25519PrivateKey
    proxy_id: str

    async def close(self) -> None:
        await self.db.dispose()

    async def plan(self) -> dict[str, str]:
        """Rows for every VM as a session plans them with no held checkpoint: VM id -> its row id."""
        rows: dict[str, str] = {}
        async with self.journal.change("planned") as db:
            for vm in self.provider.vms.values():
                row = SessionVm(session_id=self.sc.session_id, vm_id=vm.vm_id, vm_name=vm.name, state=VmState.PLANNED)
                db.add(row)
                for d in vm.disks:
                    db.add(
                        Task(
                            session_id=self.sc.session_id,
                            vm_id=vm.vm_id,
                            vm_name=vm.name,
                            disk_id=d.disk_id,
                            disk_size=d.size,
                            state=TaskState.PENDING,
                        )
                    )
                await db.flush()
                rows[vm.vm_id] = row.id
        return rows

    async def tasks(self, vm_id: str = "") -> list[Task]:
        async with self.journal.read() as db:
            q = select(Task).where(Task.session_id == self.sc.session_id).order_by(Task.vm_id, Task.disk_id)
            return [t for t in await db.scalars(q) if not vm_id or t.vm_id == vm_id]

    async def vm_row(self, row_id: str) -> SessionVm:
        return await self.journal.load(SessionVm, row_id)


async def make_world(
    tmp_path: Path,
    *,
    vms: dict[str, tuple[str, ...]] | None = None,
    proxy_lost_after: float = 0.0,
    no_proxy_grace: float = 0.2,
    target_retry_seconds: float = 2.0,
    **job_settings: object,
) -> World:
    """One job on one host, one proxy, one target and a running session of the job, in a fresh database.
    `proxy_lost_after` 0: an unreachable proxy is given up on at once (tests need no waiting);
    `target_retry_seconds`: how long a target out of reach is asked again."""
    engine, sessions = await open_database(await seeded_sqlite_url(tmp_path / "controller.db"))
    journal = Journal(sessions)
    async with journal.write() as db:
        host = Host(name="host", provider="file", address=str(tmp_path))
        target = Target(name="target", address="target:1")
        proxy = Proxy(name="proxy1", address="proxy1:1")
        db.add_all([host, target, proxy])
        await db.flush()
        settings: dict[str, object] = {"retries": 0, "retry_wait_seconds": 0, **job_settings}
        job = Job(name="job1", host_id=host.id, target_id=target.id, replica_root="jobs/job1", **settings)
        job.vms = [JobVm(vm_ref=v) for v in (vms or {"vm1": ("disk0",)})]
        db.add(job)
        await db.flush()
        session = Session(job_id=job.id, state=SessionState.RUNNING)
        db.add(session)
        await db.flush()
        target_view = TargetView(
            target_id=target.id, name=target.name, address=target.address, tls_server_name="", max_tasks=4
        )
        ids = (session.id, job_view(job), proxy.id)
    fake_proxy, fake_target = FakeProxy("proxy1:1", name="proxy1"), FakeTarget("target:1")
    provider = FakeProvider(vms or {"vm1": ("disk0",)})
    key = ed25519.Ed25519PrivateKey.generate()
    parts = EngineParts(
        journal=journal,
        agents=FakeAgents(fake_proxy, fake_target),
        slots=SlotBoard(no_proxy_grace=no_proxy_grace),
        signing_key=key,
        proxy_lost_after=proxy_lost_after,
        target_retry_seconds=target_retry_seconds,
    )
    sc = SessionContext(session_id=ids[0], job=ids[1], target=target_view, provider=provider)
    return World(engine, journal, parts, sc, fake_proxy, fake_target, provider, key, ids[2])
