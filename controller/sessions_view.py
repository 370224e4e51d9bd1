"""A session as the API shows it: states from the database, figures from the live progress when running."""

from __future__ import annotations

from controller.db.models import Session, SessionVm, Task
from controller.resources import timestamp
from protos.vmrepl.v1 import controller_pb2 as api
from protos.vmrepl.v1 import proxy_pb2

SESSION_STATES = {
    "running": api.SESSION_STATE_RUNNING,
    "stopping": api.SESSION_STATE_STOPPING,
    "succeeded": api.SESSION_STATE_SUCCEEDED,
    "incomplete": api.SESSION_STATE_INCOMPLETE,
    "failed": api.SESSION_STATE_FAILED,
}


def _skipped(raw: object) -> proxy_pb2.SkippedBytes:
    d = raw if isinstance(raw, dict) else {}
    return proxy_pb2.SkippedBytes(
        **{k: int(d.get(k, 0) or 0) for k in ("zero", "unallocated", "unchanged", "excluded")}
    )


def disk_msg(t: Task, proxies: dict[str, str], live: proxy_pb2.TransferProgress | None) -> api.DiskTask:
    msg = api.DiskTask(
        disk_id=t.disk_id,
        state=t.state,
        start=t.start,
        change_mode=t.change_mode,
        disk_size=t.disk_size,
        committed_offset=t.committed_offset,
        bytes_read=int(t.stats.get("bytes_read", 0) or 0),
        bytes_sent=int(t.stats.get("bytes_sent", 0) or 0),
        skipped=_skipped(t.stats.get("skipped")),
        resumes=int(t.stats.get("resumes", 0) or 0),
        error=t.error,
        proxy=f"proxies/{proxies[t.proxy_id]}" if t.proxy_id in proxies else "",
    )
    if live is not None and t.state in ("starting", "running"):  # fresher than the last figures written
        msg.committed_offset, msg.bytes_read, msg.bytes_sent = live.committed_offset, live.bytes_read, live.bytes_sent
        msg.skipped.CopyFrom(live.skipped)
        msg.resumes = live.resumes
    return msg


def session_msg(
    row: Session,
    job_name: str,
    vms: list[SessionVm],
    tasks: list[Task],
    *,
    proxies: dict[str, str],
    live: dict[str, proxy_pb2.TransferProgress],
) -> api.Session:
    out_vms = []
    for v in vms:
        disks = [disk_msg(t, proxies, live.get(t.id)) for t in tasks if t.vm_id == v.vm_id]
        out_vms.append(
            api.SessionVm(
                vm_id=v.vm_id,
                vm_name=v.vm_name,
                state=v.state,
                checkpoint_id=v.checkpoint_id,
                restore_point=f"jobs/{job_name}/restorePoints/{v.restore_point_id}" if v.restore_point_id else "",
                error=v.error,
                disks=disks,
            )
        )
    all_disks = [d for v in out_vms for d in v.disks]
    stats = api.SessionStats(
        disk_bytes=sum(d.disk_size for d in all_disks),
        bytes_read=sum(d.bytes_read for d in all_disks),
        bytes_sent=sum(d.bytes_sent for d in all_disks),
        restore_points=sum(1 for v in vms if v.restore_point_id),
    )
    for d in all_disks:
        for k in ("zero", "unallocated", "unchanged", "excluded"):
            setattr(stats.skipped, k, getattr(stats.skipped, k) + getattr(d.skipped, k))
    return api.Session(
        name=f"sessions/{row.id}",
        job=f"jobs/{job_name}",
        state=SESSION_STATES.get(row.state, api.SESSION_STATE_UNSPECIFIED),
        start_time=timestamp(row.started_at),
        end_time=timestamp(row.ended_at),
        error=row.error,
        vms=out_vms,
        stats=stats,
    )
