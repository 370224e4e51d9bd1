"""Restore points and VM replicas: the database's rows and the target's answers as the API's messages.

The target's answers are checked before they become resource names: an id that is not a plain name (a
target's bug, or one that is not ours) is refused here, for that VM alone."""

from __future__ import annotations

from typing import Any

from controller.api.resources.common import timestamp
from controller.db.models import RestorePoint
from vmrepl.domain import Consistency, DiskFormat
from vmrepl.names import check_name
from vmrepl.v1 import common_pb2, target_pb2
from vmrepl.v1 import controller_pb2 as api


def point_name(job_name: str, point_id: str) -> str:
    return f"jobs/{job_name}/restorePoints/{point_id}"


def _disk(raw: Any) -> common_pb2.RestorePointDisk:
    if not isinstance(raw, dict):
        return common_pb2.RestorePointDisk()
    fmt = str(raw.get("format", ""))
    return common_pb2.RestorePointDisk(
        disk_id=str(raw.get("disk_id", "")),
        disk_size=int(raw.get("disk_size", 0)),
        format=DiskFormat(fmt).to_proto()
        if fmt in DiskFormat._value2member_map_
        else common_pb2.DISK_FORMAT_UNSPECIFIED,
    )


def point_msg(job_name: str, row: RestorePoint) -> api.JobRestorePoint:
    """A point as the controller's database records it. Whether the target still holds its data is the
    target's to say (ListJobReplicas): `restorable` stays false here."""
    return api.JobRestorePoint(
        name=point_name(job_name, row.id),
        vm_id=row.vm_id,
        session=f"sessions/{row.session_id}",
        create_time=timestamp(row.created_at),
        vm_name=row.vm_name,
        size_bytes=row.size_bytes,
        consistency=Consistency.from_stored(row.consistency),
        disks=[_disk(d) for d in row.disks],
        vm_configuration=row.vm_configuration or b"",
    )


def target_point_msg(
    job_name: str, vm_id: str, vm_name: str, p: target_pb2.RestorePoint, row: RestorePoint | None
) -> api.JobRestorePoint:
    """A point as the target holds it, with what only the database knows (the VM's name; the consistency
    of a point the target recorded before it kept one)."""
    check_name("restore_point.id", p.id)
    check_name("restore_point.session_id", p.session_id)
    consistency = p.consistency
    if consistency == common_pb2.CONSISTENCY_UNSPECIFIED and row is not None:
        consistency = Consistency.from_stored(row.consistency)
    return api.JobRestorePoint(
        name=point_name(job_name, p.id),
        vm_id=vm_id,
        session=f"sessions/{p.session_id}",
        create_time=p.created_at,
        vm_name=vm_name,
        size_bytes=sum(d.disk_size for d in p.disks),
        consistency=consistency,
        restorable=p.restorable,
        disks=list(p.disks),
        # The target leaves it out of Replica replies (its list does not need it); the database keeps a copy.
        vm_configuration=p.vm_configuration or (row.vm_configuration or b"" if row is not None else b""),
    )


def replica_msg(
    job_name: str, vm_id: str, vm_name: str, replica: target_pb2.Replica, rows: dict[str, RestorePoint]
) -> api.JobReplica:
    """A VM replica as its target reports it. Raises InvalidArgument for an answer that names no plain id."""
    for field, value in (("session_id", replica.session_id), ("base_point_id", replica.base_point_id)):
        if value:
            check_name(f"replica.{field}", value)
    if replica.rolled_back_session_id:
        check_name("replica.rolled_back_session_id", replica.rolled_back_session_id)
    return api.JobReplica(
        vm_id=vm_id,
        vm_name=vm_name,
        state=replica.state,
        session=f"sessions/{replica.session_id}" if replica.session_id else "",
        base_point=point_name(job_name, replica.base_point_id) if replica.base_point_id else "",
        rolled_back_session=f"sessions/{replica.rolled_back_session_id}" if replica.rolled_back_session_id else "",
        rolled_back_time=replica.rolled_back_at if replica.HasField("rolled_back_at") else None,
        restore_points=[target_point_msg(job_name, vm_id, vm_name, p, rows.get(p.id)) for p in replica.restore_points],
    )
