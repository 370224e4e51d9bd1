"""Replica operations in one process: the session engine's world (tests.support.engine) with a failover host,
restore points seeded on the fake target and in the database, hosts that register and power VMs in memory, a
fake reverse transfer, and a journal that "kills" the controller right after its Nth committed change."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from controller.db.enums import SessionState
from controller.db.models import Host, Job, RestorePoint, Session, SessionVm, now
from controller.engine.journal import Journal
from controller.engine.operations.context import ReverseFigures, ReverseRequest
from controller.engine.operations.service import Operations
from controller.engine.providers import Providers
from tests.support.engine import FakeProvider, World, make_world
from vmrepl.domain import PowerState
from vmrepl.errors import FailedPrecondition, VmreplError
from vmrepl.providers.base import DiskInfo, Provider, VmInfo, VmSpec
from vmrepl.v1 import common_pb2, target_pb2

REPLICA = "jobs/job1/vm1"


class Killed(BaseException):
    """The controller died right after a committed change (what test_crash_at_transition does, in-process)."""


class CrashingJournal(Journal):
    """A journal whose Nth committed state change is the last: the change commits, then the run dies."""

    def __init__(self, inner: Journal, *, crash_at: int) -> None:
        super().__init__(inner._sessions)
        self.crash_at_change = crash_at

    @asynccontextmanager
    async def change(self, what: str, **ids: Any) -> AsyncIterator[AsyncSession]:
        async with super().change(what, **ids) as db:
            yield db
        if self.crash_at_change and self.changes == self.crash_at_change:
            raise Killed(f"killed after change {self.changes}: {what}")


class Faults:
    """Errors raised by the next calls of a method (by name), one each."""

    def __init__(self) -> None:
        self.by_method: dict[str, list[VmreplError]] = {}
        self.calls: list[tuple[str, str]] = []

    def hit(self, method: str, key: str) -> None:
        self.calls.append((method, key))
        pending = self.by_method.get(method)
        if pending:
            raise pending.pop(0)

    def fail(self, method: str, error: VmreplError | None = None) -> None:
        self.by_method.setdefault(method, []).append(error or FailedPrecondition(f"{method} failed (test)"))


class PowerHost(FakeProvider):
    """A host whose VMs are powered on and off, and on which VMs are registered from a VmSpec, in memory."""

    def __init__(self, vms: dict[str, tuple[str, ...]] | None = None) -> None:
        super().__init__(vms or {})
        self.power: dict[str, PowerState] = dict.fromkeys(self.vms, PowerState.RUNNING)
        self.specs: dict[str, VmSpec] = {}  # by registered VM id
        self.faults = Faults()

    async def get_vm(self, ref: str) -> VmInfo:
        vm = await super().get_vm(ref)
        return VmInfo(vm.vm_id, vm.name, vm.host, vm.disks, power=self.power.get(vm.vm_id, PowerState.OFF))

    async def register_vm(self, spec: VmSpec) -> VmInfo:
        self.faults.hit("register_vm", spec.folder)
        for vm_id, known in self.specs.items():  # idempotent by folder
            if known.folder == spec.folder:
                return VmInfo(vm_id, known.name, "failover", (), power=self.power[vm_id])
        vm_id = f"reg-{len(self.specs) + 1}"
        self.specs[vm_id], self.power[vm_id] = spec, PowerState.OFF
        # Found by get_vm from then on, with the spec's disks (a failback reads the failed-over VM's).
        disks = tuple(DiskInfo(d.disk_id, d.path, d.format, d.size) for d in spec.disks)
        self.vms[vm_id] = VmInfo(vm_id, spec.name, "failover", disks)
        return VmInfo(vm_id, spec.name, "failover", (), power=PowerState.OFF)

    async def unregister_vm(self, vm_id: str) -> None:
        self.faults.hit("unregister_vm", vm_id)
        if self.power.get(vm_id) is PowerState.RUNNING:
            raise FailedPrecondition(f"VM {vm_id} is running")
        self.specs.pop(vm_id, None)
        self.power.pop(vm_id, None)
        self.vms.pop(vm_id, None)

    async def start_vm(self, vm_id: str) -> None:
        self.faults.hit("start_vm", vm_id)
        self._known(vm_id)
        self.power[vm_id] = PowerState.RUNNING

    async def stop_vm(self, vm_id: str) -> None:
        self.faults.hit("stop_vm", vm_id)
        self._known(vm_id)
        self.power[vm_id] = PowerState.OFF

    async def shutdown_vm(self, vm_id: str, *, wait_seconds: float) -> None:
        self.faults.hit("shutdown_vm", vm_id)
        self._known(vm_id)
        self.power[vm_id] = PowerState.OFF

    async def merge_vm_disks(self, vm_id: str) -> None:
        self.faults.hit("merge_vm_disks", vm_id)
        if self.power.get(vm_id) is PowerState.RUNNING:  # as HyperVProvider: Hyper-V merges only while off
            raise FailedPrecondition(f"VM {vm_id} is running: a differencing disk is merged only while it is off")

    def _known(self, vm_id: str) -> None:
        if vm_id not in self.power:
            raise FailedPrecondition(f"no VM {vm_id} on this host")

    def running(self) -> list[str]:
        return [v for v, p in self.power.items() if p is PowerState.RUNNING and v in self.specs]


class MappedProviders(Providers):
    def __init__(self, by_host: dict[str, Provider]) -> None:
        super().__init__(None)
        self.by_host = by_host

    async def for_host(self, db: AsyncSession, host: Host) -> Provider:
        return self.by_host[host.id]


@dataclass
class FakeReverse:
    """The failback's reverse transfer: records each call; `faults` raised by the next calls by name."""

    faults: Faults = field(default_factory=Faults)
    figures: ReverseFigures = field(
        default_factory=lambda: ReverseFigures(bytes_read=8 << 20, bytes_sent=1 << 20, blocks_differing=1)
    )
    state: str = ""  # "", "transferred", "rolled back", "finished"

    async def transfer(self, request: ReverseRequest) -> ReverseFigures:
        self.faults.hit("transfer", request.replica_path)
        self.state = "transferred"
        return self.figures

    async def roll_back(self, request: ReverseRequest) -> None:
        self.faults.hit("roll_back", request.replica_path)
        self.state = "rolled back"

    async def finish(self, request: ReverseRequest) -> None:
        self.faults.hit("finish", request.replica_path)
        self.state = "finished"

    async def discard(self, request: ReverseRequest) -> None:
        self.faults.hit("discard", request.replica_path)
        self.state = "discarded"


class FakeReplicator:
    """A planned failover's last incremental: a replication session of the VM that makes a restore point."""

    def __init__(self, ow: OpsWorld) -> None:
        self.ow = ow
        self.started: list[str] = []

    async def start_replication(self, job_id: str, *, only_vms: Any) -> str:
        vm_id = str(next(iter(only_vms)))
        point = await self.ow.add_point(vm_id)
        async with self.ow.w.journal.write() as db:
            s = Session(job_id=job_id, state=SessionState.SUCCEEDED, started_at=now(), only_vms=[vm_id])
            db.add(s)
            await db.flush()
            db.add(SessionVm(session_id=s.id, vm_id=vm_id, vm_name=vm_id, state="done", restore_point_id=point))
        self.started.append(s.id)
        return s.id


@dataclass
class OpsWorld:
    w: World
    source: PowerHost
    failover: PowerHost
    reverse: FakeReverse
    ops: Operations
    job_id: str
    failover_host_id: str
    points: list[str] = field(default_factory=list)

    async def add_point(self, vm_id: str = "vm1", *, age_seconds: float = 0.0) -> str:
        """A restore point of the VM on the fake target and in the database (newest last)."""
        replica = f"jobs/job1/{vm_id}"
        n = len(self.w.target.points.get(replica, []))
        point_id = f"rp-{vm_id}-{n}"
        self.w.target.points.setdefault(replica, []).append(target_pb2.RestorePoint(id=point_id, replica_path=replica))
        for d in self.source.vms[vm_id].disks:
            self.w.target.disks[(replica, d.disk_id)] = target_pb2.ReplicaDisk(
                replica_path=replica, disk_id=d.disk_id, disk_size=d.size, replica_format=common_pb2.DISK_FORMAT_RAW
            )
        async with self.w.journal.write() as db:
            db.add(
                RestorePoint(
                    id=point_id,
                    job_id=self.job_id,
                    vm_id=vm_id,
                    vm_name=vm_id,
                    session_id=self.w.sc.session_id,
                    created_at=now() - dt.timedelta(seconds=age_seconds) + dt.timedelta(milliseconds=n),
                    reference=f"ref-{n}",
                    vm_configuration=b'{"generation": 2}',
                )
            )
        self.points.append(point_id)
        return point_id

    def operations(self, journal: Journal | None = None) -> Operations:
        """Another controller process's Operations over the same database (after a crash)."""
        parts = self.w.parts
        if journal is not None:
            from dataclasses import replace

            parts = replace(parts, journal=journal)
        ops = Operations(parts, replicator=FakeReplicator(self), reverse=self.reverse)
        return ops


async def make_ops_world(tmp_path: Path, *, vms: dict[str, tuple[str, ...]] | None = None) -> OpsWorld:
    vms = vms or {"vm1": ("disk0", "disk1")}
    w = await make_world(tmp_path, vms=vms, restore_points_to_keep=3)
    source, failover = PowerHost(vms), PowerHost()
    async with w.journal.write() as db:
        (folder := tmp_path / "vm_root").mkdir()
        fhost = Host(name="failover", provider="file", address=str(folder))
        db.add(fhost)
        await db.flush()
        job_row = await db.get(Job, w.sc.job.job_id)
        assert job_row is not None
        job_row.failover_host_id = fhost.id
        job_row.network_mapping = [{"source_switch": "LAN", "target_switch": "DR-LAN"}]
        # The world's session (left running) would count as replicating every VM.
        session = await db.get(Session, w.sc.session_id)
        assert session is not None
        session.state = SessionState.SUCCEEDED
        ids = (job_row.host_id, fhost.id)
    w.parts.providers = MappedProviders({ids[0]: source, ids[1]: failover})
    reverse = FakeReverse()
    ow = OpsWorld(w, source, failover, reverse, Operations(w.parts), w.sc.job.job_id, ids[1])
    ow.ops = ow.operations()
    return ow


async def settle(ops: Operations, session_id: str) -> None:
    await asyncio.wait_for(ops.wait(session_id), 30)
