"""`vmrepl sessions`: Sessions (runs of a job) and restore points."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated

import grpc
import typer
from google.protobuf import json_format
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn

from controller.cli.common import (
    DISK_STATE_NAMES,
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    STATE_NAMES,
    JsonOpt,
    as_json,
    call,
    cell_time,
    conn,
    err,
    mib,
    out,
    shown,
    table,
)
from controller.cli.replicas import list_points
from vmrepl.v1 import controller_pb2 as api

session_app = typer.Typer(help="Sessions (runs of a job).", no_args_is_help=True)
points_app = typer.Typer(help="Restore points.", no_args_is_help=True)


def watch(name: str) -> Iterator[api.Session]:
    """The session now and at each change until it ends; a refused call is one error line and exit 1."""
    try:
        yield from conn.stub().WatchSession(api.WatchSessionRequest(name=name))
    except grpc.RpcError as e:
        err.print(f"[red]error[/red]: {e.code().name}: {shown(e.details())}")  # type: ignore[attr-defined]
        raise typer.Exit(EXIT_FAILED) from None


def follow(name: str, *, quiet: bool = False) -> api.Session:
    """Follow a session to its end with a progress bar per disk; returns the final state."""
    last = api.Session()
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True))
    with Progress(*columns, console=err, disable=quiet, transient=False) as bars:
        ids: dict[str, TaskID] = {}
        for s in watch(name):
            last = s
            for vm in s.vms:
                for d in vm.disks:
                    key = f"{vm.vm_name}/{d.disk_id}"
                    if key not in ids:
                        ids[key] = bars.add_task(key, total=d.disk_size or 1)
                    bars.update(
                        ids[key],
                        completed=d.committed_offset,
                        description=f"{key} {DISK_STATE_NAMES.get(d.state, '?')}",
                    )
    if not quiet:
        summary(last)
    return last


def summary(s: api.Session) -> None:
    state = STATE_NAMES.get(s.state, "?")
    colour = {"succeeded": "green", "incomplete": "yellow"}.get(state, "red")
    st = s.stats
    out.print(
        f"{s.name} [{colour}]{state}[/{colour}]: {st.restore_points} restore point(s), {_duration(s)}; "
        f"disks {mib(st.disk_bytes)}, read {mib(st.bytes_read)}, sent {mib(st.bytes_sent)}; skipped: "
        f"unallocated {mib(st.skipped.unallocated)}, zero {mib(st.skipped.zero)}, unchanged {mib(st.skipped.unchanged)}"
    )
    if st.bottleneck:
        b = st.busy
        out.print(
            f"  processed {mib(st.bytes_processed)} at {mib(int(st.rate_bytes_per_second))}/s, "
            f"compression {st.compression_ratio:.2f}x; busy: source {b.source:.0%}, proxy {b.proxy:.0%}, "
            f"network {b.network:.0%}, target {b.target:.0%}; bottleneck: [bold]{st.bottleneck}[/bold]"
        )
    if st.blocks_repaired:
        out.print(
            f"  [yellow]full check repaired {st.blocks_repaired} block(s)[/yellow] that differed from the replica "
            "although the host's change tracking did not report them"
        )
    if st.change_tracking_fallbacks:
        out.print(
            f"  [yellow]{st.change_tracking_fallbacks} disk(s) compared digests[/yellow]: the host's change tracking "
            "could not say what changed (reasons below)"
        )
    if s.error:
        out.print(f"  error: {shown(s.error)}")


def _duration(s: api.Session) -> str:
    if not s.HasField("end_time"):
        return "running"
    return f"{s.end_time.ToDatetime().timestamp() - s.start_time.ToDatetime().timestamp():.1f} s"


@session_app.command("list", help="List sessions, newest first.")
def session_list(job: Annotated[str, typer.Option(help="only this job's")] = "", as_json_: JsonOpt = False) -> None:
    r = call(conn.stub().ListSessions, api.ListSessionsRequest(job=f"jobs/{job}" if job else ""))
    if as_json_:
        as_json(r)
        return
    rows = [
        [
            s.name,
            s.job,
            STATE_NAMES.get(s.state, "?"),
            cell_time(s.start_time),
            _duration(s),
            mib(s.stats.bytes_sent),
            operation_word(s) or s.stats.restore_points,  # an operation makes no restore point: say which it was
        ]
        for s in r.sessions
    ]
    table("sessions", ["name", "job", "state", "started (UTC)", "duration", "sent", "points"], rows)


def operation_word(s: api.Session) -> str:
    """An operation session's operation in words (`undo failover`: a narrow column folds between them); ""
    for a replication."""
    if s.kind != api.SESSION_KIND_OPERATION:
        return ""
    return api.ReplicaOperation.Name(s.operation).removeprefix("REPLICA_OPERATION_").lower().replace("_", " ")


@session_app.command("show", help="Show one session: per disk its figures, passes and verification.")
def session_show(session_id: str, as_json_: JsonOpt = False) -> None:
    s = call(conn.stub().GetSession, api.GetSessionRequest(name=_session_name(session_id)))
    if as_json_:
        as_json(s)
        return
    if s.kind != api.SESSION_KIND_OPERATION or s.vms:  # an operation moving no data has no transfer figures
        summary(s)
    if s.kind == api.SESSION_KIND_OPERATION:
        from controller.cli.operations import operation_summary  # it imports this module

        operation_summary(s)  # each VM's steps; a failback's disks follow in the tables below
    rows = [
        [
            v.vm_name,
            d.disk_id,
            DISK_STATE_NAMES.get(d.state, "?"),
            f"{d.change_mode} (full check)" if d.HasField("full_check") else d.change_mode or d.start,
            mib(d.disk_size),
            mib(d.bytes_read),
            mib(d.bytes_sent),
            mib(d.skipped.zero),
            mib(d.skipped.unchanged),
            f"{mib(int(d.rate_bytes_per_second))}/s",
            f"{d.compression_ratio:.2f}x",
            d.bottleneck,
        ]
        for v in s.vms
        for d in v.disks
    ]
    if not s.vms:  # a session that ended before planning (a host it could not reach): the summary's error says why
        return
    cols = ["vm", "disk", "state", "change", "size", "read", "sent", "zero", "unchanged", "rate", "ratio", "bottleneck"]
    table(f"{s.name} ({s.job})", cols, rows)
    # A table of its own: as three more columns of the one above, a 120-column terminal showed "veri…".
    # `started`: fresh, resume (a stopped session's disk continued), compare or done, as operations.md says.
    checks = [
        [v.vm_name, d.disk_id, d.start, d.passes or "", d.verification, d.error or v.error]
        for v in s.vms
        for d in v.disks
    ]
    table("start, passes and verification", ["vm", "disk", "started", "passes", "verified", "error"], checks)
    for v in s.vms:  # in full: a table cell cuts the repaired offsets short, and the reasons
        if v.consistency_fallback:
            out.print(
                f"{shown(v.vm_name)}: crash-consistent, application consistency failed: {shown(v.consistency_fallback)}"
            )
        for d in v.disks:
            if d.HasField("full_check") and d.full_check.repaired_blocks:
                out.print(f"{shown(v.vm_name)}/{d.disk_id}: {shown(d.verification)}")
            if d.change_fallback:
                out.print(
                    f"{shown(v.vm_name)}/{d.disk_id}: compared digests, change tracking unavailable: "
                    f"{shown(d.change_fallback)}"
                )


def _value(v: object) -> object:
    """A log field as it was logged: a Struct keeps every number as a double, so `resume_offset=12582912.0`
    and `vms=1.0` read as fractions; whole numbers are printed whole."""
    return int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2**53 else v


@session_app.command("log")
def session_log(session_id: str, as_json_: JsonOpt = False) -> None:
    """The controller's log of one session."""
    name, token = _session_name(session_id), ""
    while True:
        page = call(conn.stub().GetSessionLog, api.GetSessionLogRequest(name=name, page_size=1000, page_token=token))
        for e in page.entries:
            if as_json_:
                print(json.dumps(json_format.MessageToDict(e, preserving_proto_field_name=True)))
                continue
            fields = " ".join(f"{k}={_value(v)}" for k, v in json_format.MessageToDict(e.fields).items())
            out.print(f"{e.time.ToJsonString()} {e.level:7} {e.event} {fields}", highlight=False, markup=False)
        token = page.next_page_token
        if not token:
            return


@session_app.command("watch", help="Follow a running session to its end.")
def sessionwatch(session_id: str) -> None:
    raise typer.Exit(exit_code(follow(_session_name(session_id))))


def _session_name(session_id: str) -> str:
    return session_id if session_id.startswith("sessions/") else f"sessions/{session_id}"


@points_app.command("list", help="List a job's restore points per VM, with each replica's state on its target.")
def points_list(job: str, as_json_: JsonOpt = False) -> None:
    list_points(job, as_json_=as_json_)


def exit_code(s: api.Session) -> int:
    if s.state == api.SESSION_STATE_SUCCEEDED:
        return 0
    return EXIT_INCOMPLETE if s.state == api.SESSION_STATE_INCOMPLETE else EXIT_FAILED
