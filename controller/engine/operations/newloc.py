"""The steps of a failback to a new location (plans.NEW_LOCATION_PLANS): the failed-over VM's data written into
a new VM on another host (a file host), which then becomes the job's VM when the failback is committed.

* place-new: where the new VM goes, decided once and kept in the row (a folder of its own under the host's
  folder, one raw image per disk of the failed-over VM, of its size); nothing is made yet.
* the transfer (steps.Steps._transfer with ReverseRequest.create): the failback target creates each image
  empty (PrepareFailbackDisk create: its digests are the zero block's, so every block the failed-over VM
  holds that is not zero travels) and writes it; undone, the target removes the images it made.
* register-new / start-new: the VM registered in that folder from the point's captured configuration, and
  started; unregister-new / stop-new undo them.
* discard-new (undo failback): the failback folder deleted with the images it made.
* adopt-new (commit failback): the job names the new VM instead of the original, and replicates it from the
  new host when that is another one (a job of this VM alone: checked when the failback was asked for).

Every step is idempotent: the place is read back from the row, the images are made by the target under a
record (an image already made is answered as it is), the register is idempotent by folder, power by state,
and the adoption rewrites the job's reference only where it still names the original.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from controller.db.models import Job, JobVm, OperationVm, RestorePoint
from controller.engine.operations.context import HostView
from controller.engine.operations.plans import Step
from controller.engine.runtime import replica_folder
from vmrepl.domain import DiskFormat
from vmrepl.errors import FailedPrecondition
from vmrepl.names import check_name
from vmrepl.providers.base import VmDiskSpec, VmSpec

if TYPE_CHECKING:
    from controller.engine.operations.steps import Steps

Found = dict[str, Any]
# What a failback to a new location keeps in its operation row, and what its commit or undo takes over.
NEW_KEYS = (
    "new_host_id",
    "new_folder",
    "new_folder_path",
    "new_vm_id",
    "new_vm_name",
    "original_disks",
    "failback_path",
)
# The providers a new location may be on: the target writes the images into the host's folder.
NEW_LOCATION_PROVIDERS = ("file",)


def new_folder_name(vm_name: str, row_id: str) -> str:
    """The new VM's folder: the VM's name made a plain folder name, and the operation row (unique)."""
    plain = re.sub(r"[^A-Za-z0-9._-]", "_", vm_name).lstrip(".")[:64] or "vm"
    return f"{plain}-failback-{row_id[:12]}"


class NewLocation:
    def __init__(self, steps: Steps) -> None:
        self.steps = steps
        self.ctx = steps.ctx

    def acts(self) -> dict[Step, Callable[[OperationVm], Awaitable[Found]]]:
        return {
            Step.PLACE_NEW: self._place,
            Step.REGISTER_NEW: self._register,
            Step.UNREGISTER_NEW: self._unregister,
            Step.START_NEW: self._start,
            Step.STOP_NEW: self._stop,
            Step.DISCARD_NEW: self._discard,
            Step.ADOPT_NEW: self._adopt,
        }

    async def host(self, row: OperationVm) -> HostView:
        host_id = str(row.data.get("new_host_id", ""))
        if not host_id or self.ctx.hosts is None:
            raise FailedPrecondition(f"VM {row.vm_name}: no new location is recorded for its failback")
        host = await self.ctx.hosts(host_id)
        if host.provider_kind not in NEW_LOCATION_PROVIDERS:
            raise FailedPrecondition(
                f"host {host.name} is a {host.provider_kind} host: a failback to a new location is built for "
                "file hosts only"
            )
        return host

    async def _place(self, row: OperationVm) -> Found:
        if row.data.get("new_folder"):  # decided before a crash: the same place again
            return {}
        host = await self.host(row)
        vm = await self.steps._host().get_vm(self.steps._running_vm(row))
        folder = new_folder_name(row.vm_name, row.id)
        path = f"{host.address.rstrip('/')}/{folder}"
        disks = [[check_name("disk_id", d.disk_id), f"{path}/{d.disk_id}.raw", DiskFormat.RAW.value] for d in vm.disks]
        if not disks:
            raise FailedPrecondition(f"the failed-over VM {vm.name} has no disk to fail back")
        failback_path = f".failback/{self.ctx.job_id}/{replica_folder(row.vm_id)}-{row.id[:12]}"
        return {"new_folder": folder, "new_folder_path": path, "original_disks": disks, "failback_path": failback_path}

    async def _spec(self, row: OperationVm) -> VmSpec:
        async with self.steps.journal.read() as db:
            point = await db.get(RestorePoint, row.point_id) if row.point_id else None
        vm = await self.steps._host().get_vm(self.steps._running_vm(row))
        sizes = {d.disk_id: d.size for d in vm.disks}
        return VmSpec(
            name=row.vm_name,
            folder=str(row.data["new_folder"]),
            configuration=(point.vm_configuration or b"") if point is not None else b"",
            disks=tuple(
                VmDiskSpec(disk_id=str(d), path=f"{d}.raw", format=DiskFormat.RAW, size=sizes[str(d)])
                for d, _, _ in row.data["original_disks"]
            ),
        )

    async def _register(self, row: OperationVm) -> Found:
        host = await self.host(row)
        vm = await host.provider.register_vm(await self._spec(row))
        return {"new_vm_id": vm.vm_id, "new_vm_name": vm.name}

    async def _unregister(self, row: OperationVm) -> Found:
        vm = str(row.data.get("new_vm_id", ""))
        if vm:  # nothing registered before a crash in the register step: nothing to remove
            await (await self.host(row)).provider.unregister_vm(vm)
        return {}

    async def _start(self, row: OperationVm) -> Found:
        vm = str(row.data.get("new_vm_id", ""))
        if not vm:
            raise FailedPrecondition(f"VM {row.vm_name}: no new VM is recorded")
        await (await self.host(row)).provider.start_vm(vm)
        return {}

    async def _stop(self, row: OperationVm) -> Found:
        vm = str(row.data.get("new_vm_id", ""))
        if vm:
            await (await self.host(row)).provider.stop_vm(vm)
        return {}

    async def _discard(self, row: OperationVm) -> Found:
        await self.ctx.reverse.discard(self.steps._reverse_request(row))
        return {}

    async def _adopt(self, row: OperationVm) -> Found:
        """The job's VM becomes the new VM (by its id); its host the new host when that is another."""
        new_vm, host_id = str(row.data.get("new_vm_id", "")), str(row.data.get("new_host_id", ""))
        if not new_vm or not host_id:
            raise FailedPrecondition(f"VM {row.vm_name}: no new VM is recorded")
        async with self.steps.journal.change(
            "job's VM moved to its new location", session_id=self.ctx.session_id
        ) as db:
            job = await db.get(Job, self.ctx.job_id)
            if job is None:
                raise FailedPrecondition(f"job {self.ctx.job_name} no longer exists")
            refs = list(await db.scalars(select(JobVm).where(JobVm.job_id == job.id)))
            if host_id != job.host_id:
                others = [r for r in refs if r.vm_ref not in (row.vm_id, row.vm_name, new_vm)]
                if others:
                    raise FailedPrecondition(
                        f"job {job.name} has other VMs now: the new VM of {row.vm_name} runs on another host and "
                        "needs a job of its own"
                    )
                job.host_id = host_id
            matching = [r for r in refs if r.vm_ref in (row.vm_id, row.vm_name)]
            if matching and not any(r.vm_ref == new_vm for r in refs):
                matching.pop(0).vm_ref = new_vm
            for r in matching:  # the VM named twice (by id and by name): one reference is left
                await db.delete(r)
        return {}
