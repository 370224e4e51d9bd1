"""Restore points an operation or a test failover holds: retention never deletes them."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.db.enums import OperationStepState, ReplicaVmState
from controller.db.models import OperationVm, ReplicaVm, Session, TestFailover

_HOLDING = (
    ReplicaVmState.FAILING_OVER,
    ReplicaVmState.FAILED_OVER,
    ReplicaVmState.FAILING_BACK,
    ReplicaVmState.FAILED_BACK,
)
_UNDER_WAY = (OperationStepState.PLANNED, OperationStepState.RUNNING, OperationStepState.ROLLING_BACK)


async def held_points(db: AsyncSession, job_id: str, vm_id: str) -> frozenset[str]:
    """The VM's points held: failed over to, mounted by a test, or named by an operation under way."""
    failed_over = await db.scalars(
        select(ReplicaVm.point_id).where(
            ReplicaVm.job_id == job_id, ReplicaVm.vm_id == vm_id, ReplicaVm.state.in_(_HOLDING)
        )
    )
    tests = await db.scalars(
        select(TestFailover.point_id).where(TestFailover.job_id == job_id, TestFailover.vm_id == vm_id)
    )
    operations = await db.scalars(
        select(OperationVm.point_id)
        .join(Session, Session.id == OperationVm.session_id)
        .where(Session.job_id == job_id, OperationVm.vm_id == vm_id, OperationVm.state.in_(_UNDER_WAY))
    )
    return frozenset(p for p in (*failed_over, *tests, *operations) if p)


@dataclass(frozen=True, slots=True)
class Pause:
    """Which VMs a replication session leaves out, and why."""

    only: frozenset[str]
    paused: dict[str, str]

    def skips(self, vm_id: str) -> bool:
        return vm_id in self.paused or bool(self.only and vm_id not in self.only)


async def paused_vms(db: AsyncSession, session_id: str, job_id: str) -> Pause:
    """VMs failed over (or being moved) are left out with why, and so are those the session is not for (a
    planned failover's last incremental replicates its VM only). The VM a session is limited to is replicated
    whatever its state: that session is the operation's own step."""
    session = await db.get(Session, session_id)
    only = frozenset(str(v) for v in session.only_vms) if session is not None else frozenset()
    paused: dict[str, str] = {}
    for rv in await db.scalars(select(ReplicaVm).where(ReplicaVm.job_id == job_id)):
        if rv.state is not ReplicaVmState.REPLICATING and rv.vm_id not in only:
            paused[rv.vm_id] = f"VM {rv.vm_name or rv.vm_id} is {rv.state.value.replace('_', ' ')}: replication paused"
    return Pause(only, paused)
