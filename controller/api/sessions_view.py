"""A session as the API shows it: states from the database, figures from the live progress when running."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from typing import Any

from controller.api.resources import timestamp
from controller.db.enums import OperationStepState, SessionKind, SessionState, TaskState, VmState
from controller.db.models import OperationVm, Session, SessionVm, Task
from controller.observability.statistics import Shares, compression_ratio, rate, shares
from vmrepl.domain import Consistency
from vmrepl.progress import StageBusy, TransferFigures
from vmrepl.v1 import common_pb2, proxy_pb2
from vmrepl.v1 import controller_pb2 as api

# The database's session, VM and task states as the API's enums, name for name (a test checks none is left out).
SESSION_STATES: dict[SessionState, api.SessionState.ValueType] = {
    s: api.SessionState.Value(f"SESSION_STATE_{s.name}") for s in SessionState
}
VM_STATES: dict[VmState, api.VmState.ValueType] = {s: api.VmState.Value(f"VM_STATE_{s.name}") for s in VmState}
TASK_STATES: dict[TaskState, api.DiskTaskState.ValueType] = {
    s: api.DiskTaskState.Value(f"DISK_TASK_STATE_{s.name}") for s in TaskState
}
SESSION_KINDS: dict[SessionKind, api.SessionKind.ValueType] = {
    s: api.SessionKind.Value(f"SESSION_KIND_{s.name}") for s in SessionKind
}
# An operation VM's state: rolling back is a step under way, as running.
STEP_STATES: dict[OperationStepState, api.OperationStep.ValueType] = {
    OperationStepState.PLANNED: api.OPERATION_STEP_PLANNED,
    OperationStepState.RUNNING: api.OPERATION_STEP_RUNNING,
    OperationStepState.ROLLING_BACK: api.OPERATION_STEP_RUNNING,
    OperationStepState.DONE: api.OPERATION_STEP_DONE,
    OperationStepState.FAILED: api.OPERATION_STEP_FAILED,
    OperationStepState.ROLLED_BACK: api.OPERATION_STEP_ROLLED_BACK,
}


def _shares_msg(s: Shares) -> api.StageShares:
    return api.StageShares(source=s.source, proxy=s.proxy, network=s.network, target=s.target)


def figures_msg(msg: api.DiskTask, f: TransferFigures) -> None:
    """A disk's figures into its message: the counters, the passes and what was verified, and the rate,
    ratio, stage shares and bottleneck computed from them (msg.committed_offset is set first)."""
    msg.bytes_read, msg.bytes_data, msg.bytes_sent = f.bytes_read, f.bytes_data, f.bytes_sent
    msg.skipped.CopyFrom(f.skipped.to_proto())
    msg.resumes, msg.passes = f.resumes, f.passes
    if f.sample.sampled_blocks:
        msg.sample.CopyFrom(f.sample.to_proto())
    if f.full_check is not None:
        msg.full_check.CopyFrom(f.full_check.to_proto())
    msg.verification = f.verification
    msg.duration_seconds = f.elapsed_seconds
    msg.rate_bytes_per_second = rate(msg.committed_offset, f.elapsed_seconds)
    msg.compression_ratio = compression_ratio(f.bytes_data, f.bytes_sent)
    s = shares([(f.busy, f.elapsed_seconds)])
    msg.busy.CopyFrom(_shares_msg(s))
    msg.bottleneck = s.bottleneck()


def disk_msg(t: Task, proxies: dict[str, str], live: proxy_pb2.TransferProgress | None) -> api.DiskTask:
    msg = api.DiskTask(
        disk_id=t.disk_id,
        state=TASK_STATES[t.state],
        start=t.start,
        change_mode=t.change_mode,
        change_fallback=t.fallback_reason,
        disk_size=t.disk_size,
        committed_offset=t.committed_offset,
        error=t.error,
        proxy=f"proxies/{proxies[t.proxy_id]}" if t.proxy_id in proxies else "",
    )
    figures = TransferFigures.from_json(t.stats)
    if live is not None and t.state in (TaskState.STARTING, TaskState.RUNNING):  # fresher than the row's figures
        msg.committed_offset, figures = live.committed_offset, TransferFigures.from_progress(live)
    figures_msg(msg, figures)
    return msg


def session_msg(
    row: Session,
    job_name: str,
    vms: list[SessionVm],
    tasks: list[Task],
    *,
    proxies: dict[str, str],
    live: dict[str, proxy_pb2.TransferProgress],
    operation_vms: list[OperationVm] | None = None,
) -> api.Session:
    out_vms = []
    # A failback's transfer commits a point on its failback folder only: no restore point of the job to name.
    job_points = row.kind is SessionKind.REPLICATION
    for v in vms:
        disks = [disk_msg(t, proxies, live.get(t.id)) for t in tasks if t.vm_id == v.vm_id]
        out_vms.append(
            api.SessionVm(
                vm_id=v.vm_id,
                vm_name=v.vm_name,
                state=VM_STATES[v.state],
                checkpoint_id=v.checkpoint_id,
                restore_point=f"jobs/{job_name}/restorePoints/{v.restore_point_id}"
                if v.restore_point_id and job_points
                else "",
                error=v.error,
                disks=disks,
                attempt=v.attempt,
                consistency=_consistency(v),
                consistency_fallback=v.consistency_fallback,
            )
        )
    stats = session_stats(
        [d for v in out_vms for d in v.disks], restore_points=sum(1 for v in vms if v.restore_point_id and job_points)
    )
    stats.duration_seconds = _duration(row)
    stats.rate_bytes_per_second = rate(stats.bytes_processed, stats.duration_seconds)
    msg = api.Session(
        name=f"sessions/{row.id}",
        job=f"jobs/{job_name}",
        state=SESSION_STATES[row.state],
        start_time=timestamp(row.started_at),
        end_time=timestamp(row.ended_at),
        error=row.error,
        vms=out_vms,
        stats=stats,
        kind=SESSION_KINDS[row.kind],
    )
    if row.kind is SessionKind.OPERATION:
        msg.operation = api.ReplicaOperation.Value(f"REPLICA_OPERATION_{row.operation.upper()}")
        msg.operation_vms.extend(operation_vm_msg(v, job_name, tasks, proxies, live) for v in operation_vms or [])
    return msg


def operation_vm_msg(
    v: OperationVm,
    job_name: str,
    tasks: list[Task],
    proxies: dict[str, str],
    live: dict[str, proxy_pb2.TransferProgress],
) -> api.OperationVm:
    """One VM of an operation session; `disks` are a failback's transfer tasks (recorded under the session)."""
    end = v.ended_at or dt.datetime.now(dt.UTC)
    step = v.step if v.state is not OperationStepState.ROLLING_BACK else f"undo: {v.step}"
    return api.OperationVm(
        vm_id=v.vm_id,
        vm_name=v.vm_name,
        group=v.group,
        state=STEP_STATES[v.state],
        step_name=step,
        restore_point=f"jobs/{job_name}/restorePoints/{v.point_id}" if v.point_id else "",
        error=v.error,
        bytes_copied=v.bytes_copied,
        bytes_read=v.bytes_read,
        bytes_sent=v.bytes_sent,
        blocks_differing=v.blocks_differing,
        duration_seconds=max(0.0, (end - v.started_at).total_seconds()) if v.started_at else 0.0,
        disks=[disk_msg(t, proxies, live.get(t.id)) for t in tasks if t.vm_id == v.vm_id],
    )


def log_entry(line: dict[str, Any]) -> api.SessionLogEntry:
    fields = {k: v for k, v in line.items() if k not in ("timestamp", "level", "event", "session_id", "logger")}
    entry = api.SessionLogEntry(level=str(line.get("level", "")), event=str(line.get("event", "")))
    entry.fields.update(json.loads(json.dumps(fields, default=str)))
    with contextlib.suppress(ValueError, TypeError):
        entry.time.FromJsonString(str(line.get("timestamp", "")))
    return entry


def _consistency(v: SessionVm) -> common_pb2.Consistency.ValueType:
    """The checkpoint's consistency once one was taken (the row's default means nothing before)."""
    taken = v.checkpoint_id or v.restore_point_id or v.reference_kept
    return Consistency.from_stored(v.consistency) if taken else common_pb2.CONSISTENCY_UNSPECIFIED


def _duration(row: Session) -> float:
    if row.started_at is None:
        return 0.0
    end = row.ended_at or dt.datetime.now(dt.UTC)
    return max(0.0, (end - row.started_at).total_seconds())


def session_stats(disks: list[api.DiskTask], *, restore_points: int) -> api.SessionStats:
    """Totals over the session's disks; the bottleneck over all their busy time."""
    stats = api.SessionStats(
        disk_bytes=sum(d.disk_size for d in disks),
        bytes_read=sum(d.bytes_read for d in disks),
        bytes_sent=sum(d.bytes_sent for d in disks),
        bytes_data=sum(d.bytes_data for d in disks),
        bytes_processed=sum(d.committed_offset for d in disks),
        restore_points=restore_points,
        blocks_repaired=sum(d.full_check.repaired_blocks for d in disks),
        change_tracking_fallbacks=sum(1 for d in disks if d.change_fallback),
    )
    for d in disks:
        for k in ("zero", "unallocated", "unchanged", "excluded"):
            setattr(stats.skipped, k, getattr(stats.skipped, k) + getattr(d.skipped, k))
    # Each disk's shares weighted by its duration: the stage that was busy longest overall.
    weighted = [
        (StageBusy(source_read=d.busy.source * d.duration_seconds, compress=d.busy.proxy * d.duration_seconds,
                   network_wait=d.busy.network * d.duration_seconds, target_write=d.busy.target * d.duration_seconds),
         d.duration_seconds)
        for d in disks
    ]  # fmt: skip
    s = shares(weighted)
    stats.busy.CopyFrom(_shares_msg(s))
    stats.bottleneck = s.bottleneck()
    stats.compression_ratio = compression_ratio(stats.bytes_data, stats.bytes_sent)
    return stats
