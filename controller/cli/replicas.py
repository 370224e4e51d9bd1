"""`vmrepl restore-points list` and `vmrepl replica`: each VM replica of a job as its target reports it, its
restore points, and a rollback on request."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import grpc
import typer
from google.protobuf import timestamp_pb2

from controller.cli.common import JsonOpt, as_json, call, cell_time, conn, err, mib, out, shown, table
from vmrepl.v1 import common_pb2
from vmrepl.v1 import controller_pb2 as api

replica_app = typer.Typer(help="VM replicas on their targets.", no_args_is_help=True)
CONSISTENCY_WORDS = {
    common_pb2.CONSISTENCY_CRASH: "crash",
    common_pb2.CONSISTENCY_APPLICATION: "application",
}
# `disks`: the ids `restore-points export --disk` takes.
COLUMNS = ["restore point", "created (UTC)", "size", "consistency", "restorable", "disks"]


def bare(name: str) -> str:
    """The id at the end of a resource name (`jobs/J/restorePoints/ID` -> ID), as other commands take it."""
    return name.rsplit("/", 1)[-1]


def _time(ts: timestamp_pb2.Timestamp) -> str:
    return ts.ToDatetime().isoformat(timespec="seconds") if ts.seconds or ts.nanos else ""


def replica_words(r: api.JobReplica) -> str:
    """A replica's state as a sentence: where it stands between restore points, and its newest rollback when
    that came after its newest point."""
    session = bare(r.session)
    words = {
        common_pb2.REPLICA_STATE_EMPTY: "no restore point yet",
        common_pb2.REPLICA_STATE_AT_POINT: f"at restore point {bare(r.base_point)}",
        common_pb2.REPLICA_STATE_WRITING: f"session {session} writing: between points",
        common_pb2.REPLICA_STATE_RESUMABLE: f"session {session} stopped; resumable from the same checkpoint",
    }.get(r.state, "state unknown")
    newest = max((p.create_time.ToDatetime(dt.UTC) for p in r.restore_points), default=None)
    if r.rolled_back_session and r.HasField("rolled_back_time"):
        at = r.rolled_back_time.ToDatetime(dt.UTC)
        if newest is None or at >= newest:
            words = f"rolled back session {bare(r.rolled_back_session)} at {_time(r.rolled_back_time)}; {words}"
    return words


def point_row(p: api.JobRestorePoint, *, restorable: str) -> list[object]:
    consistency = CONSISTENCY_WORDS.get(p.consistency, "unknown")
    return [
        bare(p.name),
        cell_time(p.create_time),
        mib(p.size_bytes) if p.size_bytes else "unknown",
        consistency,
        restorable,
        ", ".join(d.disk_id for d in p.disks),
    ]


def _recorded(job: str) -> list[api.JobRestorePoint]:
    """The job's points as the controller's database records them (every page)."""
    points: list[api.JobRestorePoint] = []
    token = ""
    while True:
        request = api.ListJobRestorePointsRequest(parent=f"jobs/{job}", page_size=1000, page_token=token)
        page = call(conn.stub().ListJobRestorePoints, request)
        points += page.restore_points
        token = page.next_page_token
        if not token:
            return points


def _ask_replicas(job: str) -> api.ListJobReplicasResponse | None:
    """The target's view, or None when the controller cannot give it (a controller without the call)."""
    try:
        reply: api.ListJobReplicasResponse = conn.stub().ListJobReplicas(
            api.ListJobReplicasRequest(parent=f"jobs/{job}"), timeout=60
        )
        return reply
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):  # type: ignore[attr-defined]
            err.print(f"[red]error[/red]: {e.code().name}: {shown(e.details())}")  # type: ignore[attr-defined]
            raise typer.Exit(1) from None
        err.print(f"replicas cannot be listed ({e.code().name}): the controller's records follow")  # type: ignore[attr-defined]
        return None


def list_points(job: str, *, as_json_: bool) -> None:
    """`restore-points list JOB`: per VM its replica's state and points; where the target cannot be asked,
    the points the controller recorded, marked so."""
    reply = _ask_replicas(job)
    if as_json_ and reply is not None:
        as_json(reply)
        return
    recorded = _recorded(job) if reply is None or any(r.error for r in reply.replicas) else []
    if as_json_:
        as_json(api.ListJobRestorePointsResponse(restore_points=recorded))
        return
    replicas = list(reply.replicas) if reply is not None else _from_records(recorded)
    for r in replicas:
        title = f"{r.vm_name or r.vm_id} ({r.vm_id})" if r.vm_name != r.vm_id else r.vm_id
        if r.error or reply is None:
            rows = [point_row(p, restorable="unknown") for p in recorded if p.vm_id == r.vm_id]
            table(f"{title}: target unreachable ({r.error or 'not asked'}); as the controller recorded", COLUMNS, rows)
            continue
        rows = [point_row(p, restorable="yes" if p.restorable else "no") for p in r.restore_points]
        if rows:
            table(f"{title}: {replica_words(r)}", COLUMNS, rows)
        else:  # a line, not the headings of an empty table
            out.print(f"{shown(title)}: {shown(replica_words(r))}")
    if not replicas:
        out.print(f"jobs/{job} has no VM replicas")


def _from_records(points: list[api.JobRestorePoint]) -> list[api.JobReplica]:
    vms: dict[str, str] = {}
    for p in points:
        vms.setdefault(p.vm_id, p.vm_name or p.vm_id)
    return [api.JobReplica(vm_id=i, vm_name=n) for i, n in sorted(vms.items(), key=lambda v: v[1])]


@replica_app.command("rollback", help="Return a VM's replica that is between points to its newest restore point.")
def replica_rollback(
    job: str,
    vm: Annotated[str, typer.Option(help="the VM's id or name as the job lists it")],
    as_json_: JsonOpt = False,
) -> None:
    r = call(conn.stub().RollbackJobReplica, api.RollbackJobReplicaRequest(job=f"jobs/{job}", vm=vm))
    if as_json_:
        as_json(r)
        return
    out.print(f"{shown(r.vm_name or r.vm_id)}: {shown(replica_words(r))}")
