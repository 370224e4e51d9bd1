"""What each step of an operation does, for one VM. Every step is idempotent (a crash re-runs the step it was
in): the target's mount calls are idempotent by mount id, a provider's register by folder, start and stop by
state. A step returns what it found for the steps after it (kept in operation_vms.data)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from sqlalchemy import select

from controller.db.enums import SessionKind
from controller.db.models import OperationVm, RestorePoint, Session, SessionVm
from controller.engine.agents import relayed
from controller.engine.journal import Journal
from controller.engine.operations.context import OperationContext, ReverseRequest
from controller.engine.operations.newloc import NewLocation
from controller.engine.operations.plans import Operation, Step
from controller.engine.runtime import replica_folder
from controller.engine.states import ACTIVE_SESSION
from vmrepl.domain import DiskFormat, PowerState
from vmrepl.errors import FailedPrecondition
from vmrepl.providers.base import Provider, VmDiskSpec, VmSpec
from vmrepl.v1 import target_pb2

Found = dict[str, Any]
# Hyper-V names a VM in at most 100 characters, and New-VM makes a folder of its name.
MAX_VM_NAME = 100
_NOT_IN_A_NAME = re.compile(r'[\\/:*?"<>|\x00-\x1f]')


def failover_vm_name(vm_name: str, suffix: str) -> str:
    """The failed-over (or test) VM's name: the source's, made a plain Windows name (its forbidden characters
    as `_`) and shortened so the suffix, which tells a replica or one test's VM from another, stays whole."""
    plain = _NOT_IN_A_NAME.sub("_", vm_name).strip(" .") or "vm"
    return plain[: MAX_VM_NAME - len(suffix)] + suffix


def mount_id_for(ctx: OperationContext, row: OperationVm) -> str:
    """The target's mount of this VM: a test's carries the test id (several tests of one VM may run), a
    failover's the operation row (letters, digits, '-', as MountPointRequest.mount_id allows)."""
    if ctx.operation is Operation.TEST_FAILOVER:
        return f"test-{row.data['test_id']}"
    return f"fo-{row.id}"


class Steps:
    def __init__(self, ctx: OperationContext, journal: Journal) -> None:
        self.ctx = ctx
        self.journal = journal
        self._acts: dict[Step, Callable[[OperationVm], Awaitable[Found]]] = {
            Step.SHUTDOWN_SOURCE: self._shutdown_source,
            Step.START_SOURCE: self._start_source,
            Step.LAST_INCREMENTAL: self._last_incremental,
            Step.MOUNT: self._mount,
            Step.UNMOUNT: self._unmount,
            Step.REGISTER: self._register,
            Step.UNREGISTER: self._unregister,
            Step.START: self._start,
            Step.STOP: self._stop,
            Step.MERGE: self._merge,
            Step.FLATTEN: self._flatten,
            Step.DELETE_REPLICA: self._delete_replica,
            Step.CHECK_ORIGINAL_OFF: self._check_original_off,
            Step.SHUTDOWN_FAILED_OVER: self._shutdown_failed_over,
            Step.TRANSFER: self._transfer,
            Step.ROLLBACK_TRANSFER: self._rollback_transfer,
            Step.START_ORIGINAL: self._start_original,
            Step.FINISH_TRANSFER: self._finish_transfer,
            Step.STOP_ORIGINAL: self._stop_original,
            Step.DROP_REFERENCE: self._drop_reference,
        }
        self._acts.update(NewLocation(self).acts())

    async def act(self, step: Step, row: OperationVm) -> Found:
        return await self._acts[step](row)

    # ---- helpers ----

    def replica_path(self, vm_id: str) -> str:
        return f"{self.ctx.replica_root}/{replica_folder(vm_id)}"

    def _host(self) -> Provider:
        if self.ctx.failover is None:
            raise FailedPrecondition(
                f"job {self.ctx.job_name} has no failover host (vmrepl job update --failover-host)"
            )
        return self.ctx.failover

    async def _target(self, what: str, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except grpc.aio.AioRpcError as e:
            raise relayed(e, f"target {self.ctx.target.name} ({what})") from e

    def _running_vm(self, row: OperationVm) -> str:
        vm = str(row.data.get("running_vm_id", ""))
        if not vm:
            raise FailedPrecondition(f"VM {row.vm_name}: no failed-over VM is recorded")
        return vm

    # ---- the source VM (planned failover) ----

    async def _shutdown_source(self, row: OperationVm) -> Found:
        await self.ctx.source.shutdown_vm(row.vm_id, wait_seconds=self.ctx.shutdown_seconds)
        return {}

    async def _start_source(self, row: OperationVm) -> Found:
        await self.ctx.source.start_vm(row.vm_id)
        return {}

    async def _last_incremental(self, row: OperationVm) -> Found:
        """A replication session of this VM alone (one started for it before a crash is adopted), waited
        for; its restore point is the one failed over to."""
        if self.ctx.replicator is None:
            raise FailedPrecondition("this controller cannot run a last incremental")
        session_id = await self._adoptable_session(row.vm_id) or await self.ctx.replicator.start_replication(
            self.ctx.job_id, only_vms=[row.vm_id]
        )
        while True:
            async with self.journal.read() as db:
                s = await db.get(Session, session_id)
                vm = await db.scalar(
                    select(SessionVm).where(SessionVm.session_id == session_id, SessionVm.vm_id == row.vm_id)
                )
            if s is None or s.state not in ACTIVE_SESSION:
                break
            await asyncio.sleep(self.ctx.poll_seconds)
        if vm is None or not vm.restore_point_id:
            why = vm.error if vm is not None and vm.error else "no restore point was made"
            raise FailedPrecondition(f"VM {row.vm_name}: the last incremental (session {session_id}) failed: {why}")
        return {"point_id": vm.restore_point_id, "last_incremental": session_id}

    async def _adoptable_session(self, vm_id: str) -> str:
        """A replication session of the job started since this operation began (by its last-incremental step
        before a crash): waited for rather than refused as running."""
        async with self.journal.read() as db:
            since = list(
                await db.scalars(
                    select(Session).where(
                        Session.job_id == self.ctx.job_id,
                        Session.started_at >= self.ctx.started_at,
                        Session.kind == SessionKind.REPLICATION,
                    )
                )
            )
        return next((s.id for s in since if vm_id in s.only_vms), "")

    # ---- the mount and the VM on the failover host ----

    async def _mount(self, row: OperationVm) -> Found:
        kind = (
            target_pb2.MOUNT_KIND_TEST
            if self.ctx.operation is Operation.TEST_FAILOVER
            else target_pb2.MOUNT_KIND_FAILOVER
        )
        hyperv = self.ctx.failover_provider_kind == "hyperv"
        self._host()  # no failover host: refused before the target makes anything
        request = target_pb2.MountPointRequest(
            replica_path=self.replica_path(row.vm_id),
            point_id=row.point_id,
            mount_id=mount_id_for(self.ctx, row),
            kind=kind,
            layout=target_pb2.MOUNT_LAYOUT_VHDX if hyperv else target_pb2.MOUNT_LAYOUT_LAYER,
        )
        mount: target_pb2.Mount = await self._target("MountPoint", self.ctx.target_client.mount_point(request))
        if hyperv and not mount.host_folder:
            raise FailedPrecondition(
                f"target {self.ctx.target.name} has no vm_root_host_path: "
                "the Hyper-V host cannot name the mount's folder"
            )
        return {
            "mount_id": mount.mount_id,
            "point_id": mount.point_id,
            "folder": mount.folder,
            "host_folder": mount.host_folder,
            "disks": [
                {
                    "disk_id": d.disk_id,
                    "path": d.path,
                    "format": DiskFormat.from_proto("target mount disk format", d.format).value,
                    "size": d.size,
                }
                for d in mount.disks
            ],
            "bytes_copied": mount.bytes_copied,
        }

    async def _unmount(self, row: OperationVm) -> Found:
        mount_id = str(row.data.get("mount_id", "")) or mount_id_for(self.ctx, row)
        await self._target("UnmountPoint", self.ctx.target_client.unmount_point(mount_id))
        return {}

    async def _spec(self, row: OperationVm) -> VmSpec:
        async with self.journal.read() as db:
            point = await db.get(RestorePoint, row.point_id)
        hyperv = self.ctx.failover_provider_kind == "hyperv"
        folder = str(row.data["host_folder"] if hyperv else row.data["folder"])
        disks = tuple(
            VmDiskSpec(
                disk_id=str(d["disk_id"]),
                path=f"{folder}\\{d['path']}" if hyperv else str(d["path"]),
                format=DiskFormat(str(d["format"])),
                size=int(d["size"]),
            )
            for d in row.data.get("disks", [])
        )
        test = self.ctx.operation is Operation.TEST_FAILOVER
        suffix = f"_test_{str(row.data.get('test_id', ''))[:8]}" if test else "_replica"
        return VmSpec(
            name=failover_vm_name(row.vm_name, suffix),
            folder=folder,
            configuration=(point.vm_configuration or b"") if point is not None else b"",
            disks=disks,
            networks=() if test else self.ctx.networks,
            isolated=test,
        )

    async def _register(self, row: OperationVm) -> Found:
        vm = await self._host().register_vm(await self._spec(row))
        return {"running_vm_id": vm.vm_id, "running_vm_name": vm.name}

    async def _unregister(self, row: OperationVm) -> Found:
        vm = str(row.data.get("running_vm_id", ""))
        if vm:  # nothing registered before a crash in the register step: nothing to remove
            await self._host().unregister_vm(vm)
        return {}

    async def _start(self, row: OperationVm) -> Found:
        await self._host().start_vm(self._running_vm(row))
        return {}

    async def _stop(self, row: OperationVm) -> Found:
        vm = str(row.data.get("running_vm_id", ""))
        if vm:
            await self._host().stop_vm(vm)
        return {}

    # ---- permanent failover ----

    async def _merge(self, row: OperationVm) -> Found:
        await self._host().merge_vm_disks(self._running_vm(row))
        return {}

    async def _flatten(self, row: OperationVm) -> Found:
        try:
            await self.ctx.target_client.flatten_mount(str(row.data["mount_id"]))
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND or not await self._replica_gone(row.vm_id):
                raise relayed(e, f"target {self.ctx.target.name} (FlattenMount)") from e
        return {}

    async def _replica_gone(self, vm_id: str) -> bool:
        """The mount gone and the replica too: an earlier run of this permanent failover flattened it, deleted
        the replica and dropped the mount's record (its UnmountPoint answer lost, say), so it is run again: the
        steps after go on (a file host's merge still refuses a layer that is not flattened)."""
        points = await self._target("ListRestorePoints", self.ctx.target_client.list_points(self.replica_path(vm_id)))
        return not points  # a deleted replica's folder lists no point (a given-away one is refused)

    async def _delete_replica(self, row: OperationVm) -> Found:
        await self._target("DeleteReplica", self.ctx.target_client.delete_replica(self.replica_path(row.vm_id)))
        return {}

    # ---- failback ----

    async def _check_original_off(self, row: OperationVm) -> Found:
        vm = await self.ctx.source.get_vm(row.vm_id)
        if vm.power is not PowerState.OFF:
            raise FailedPrecondition(
                f"the original VM {vm.name} is {vm.power.value}: shut it down before failing back onto its disks"
            )
        return {"original_disks": [[d.disk_id, d.locator, d.format.value] for d in vm.disks]}

    async def _shutdown_failed_over(self, row: OperationVm) -> Found:
        await self._host().shutdown_vm(self._running_vm(row), wait_seconds=self.ctx.shutdown_seconds)
        return {}

    def _reverse_request(self, row: OperationVm) -> ReverseRequest:
        target = self.ctx.failback_target or self.ctx.target
        return ReverseRequest(
            session_id=self.ctx.session_id,
            job_id=self.ctx.job_id,
            vm_id=row.vm_id,
            vm_name=row.vm_name,
            source_host_id=self.ctx.failover_host_id,
            source=self._host(),
            source_vm_id=self._running_vm(row),
            target=target,
            # A failback to a new location has a folder per attempt (place-new names it): what a failed one
            # left never stands in the way of the next, which makes other images.
            replica_path=str(
                row.data.get("failback_path") or f".failback/{self.ctx.job_id}/{replica_folder(row.vm_id)}"
            ),
            original_disks=tuple(
                (str(d), str(p), DiskFormat(str(f))) for d, p, f in row.data.get("original_disks", [])
            ),
            block_size=self.ctx.block_size,
            create=bool(row.data.get("new_host_id")),
        )

    async def _transfer(self, row: OperationVm) -> Found:
        figures = await self.ctx.reverse.transfer(self._reverse_request(row))
        return {
            "bytes_read": figures.bytes_read,
            "bytes_sent": figures.bytes_sent,
            "blocks_differing": figures.blocks_differing,
        }

    async def _rollback_transfer(self, row: OperationVm) -> Found:
        await self.ctx.reverse.roll_back(self._reverse_request(row))
        return {}

    async def _finish_transfer(self, row: OperationVm) -> Found:
        await self.ctx.reverse.finish(self._reverse_request(row))
        return {}

    async def _start_original(self, row: OperationVm) -> Found:
        await self.ctx.source.start_vm(row.vm_id)
        return {}

    async def _stop_original(self, row: OperationVm) -> Found:
        await self.ctx.source.stop_vm(row.vm_id)
        return {}

    async def _drop_reference(self, row: OperationVm) -> Found:
        """The original disks were written outside the host's change tracking: the next session compares
        digests (an empty reference, controller.engine.states.choose_change)."""
        async with self.journal.change("change-tracking reference dropped", session_id=self.ctx.session_id) as db:
            for point in await db.scalars(
                select(RestorePoint).where(RestorePoint.job_id == self.ctx.job_id, RestorePoint.vm_id == row.vm_id)
            ):
                point.reference = ""
        return {}
