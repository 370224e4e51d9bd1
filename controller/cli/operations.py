"""`vmrepl replica failover|planned-failover|undo-failover|permanent-failover|failback|commit-failback|
undo-failback|test-failover|stop-test JOB --vm VM`: start a replica operation and follow it (each VM's step as
it goes, then a summary; exit 0 only when it succeeded), and `vmrepl replica show JOB --vm VM`: where a VM
stands and where its failed-over copy runs. docs/failover.md says what each operation does to the data."""

from __future__ import annotations

from typing import Annotated

import typer

from controller.cli.common import JsonOpt, as_json, call, cell_time, conn, err, mib, out, shown, table
from controller.cli.replicas import bare, replica_app
from controller.cli.sessions import exit_code, watch
from vmrepl.v1 import controller_pb2 as api

VmOpt = Annotated[list[str] | None, typer.Option("--vm", help="VM id or name (repeat: run in parallel)")]
GroupOpt = Annotated[
    list[str] | None,
    typer.Option("--group", help="VMs run in parallel, comma-separated (repeat: groups run in order)"),
]
WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="follow the operation to its end")]
STEP_WORDS = {
    api.OPERATION_STEP_PLANNED: "planned",
    api.OPERATION_STEP_RUNNING: "running",
    api.OPERATION_STEP_DONE: "done",
    api.OPERATION_STEP_FAILED: "failed",
    api.OPERATION_STEP_ROLLED_BACK: "rolled back",
}
STATE_WORDS = {
    api.REPLICA_VM_STATE_REPLICATING: "replicating",
    api.REPLICA_VM_STATE_FAILING_OVER: "failing over",
    api.REPLICA_VM_STATE_FAILED_OVER: "failed over",
    api.REPLICA_VM_STATE_FAILING_BACK: "failing back",
    api.REPLICA_VM_STATE_FAILED_BACK: "failed back",
    api.REPLICA_VM_STATE_PERMANENT: "failed over permanently (left the job)",
}


def groups_of(vm: list[str] | None, group: list[str] | None) -> list[api.VmGroup]:
    """--vm names one group; each --group one more, in order."""
    groups = [api.VmGroup(vms=list(vm))] if vm else []
    for g in group or []:
        names = [v.strip() for v in g.split(",") if v.strip()]
        if not names:
            raise typer.BadParameter(f"{g!r} names no VM", param_hint="--group")
        groups.append(api.VmGroup(vms=names))
    if not groups:
        raise typer.BadParameter("name a VM (--vm VM, or --group VM1,VM2)", param_hint="--vm")
    return groups


def follow_operation(name: str, *, quiet: bool = False) -> api.Session:
    """Each VM's step as it changes, then the outcome per VM; returns the final session."""
    last, seen = api.Session(), dict[str, tuple[int, str]]()
    for s in watch(name):
        last = s
        for v in s.operation_vms:
            now_at = (v.state, v.step_name)
            if seen.get(v.vm_id) != now_at and not quiet:
                err.print(f"{shown(v.vm_name)}: {STEP_WORDS.get(v.state, '?')} {shown(v.step_name)}".rstrip())
            seen[v.vm_id] = now_at
    if not quiet:
        operation_summary(last)
    return last


def operation_summary(s: api.Session) -> None:
    ok = s.state == api.SESSION_STATE_SUCCEEDED
    colour = "green" if ok else "red"
    out.print(f"{s.name} [{colour}]{'succeeded' if ok else 'failed'}[/{colour}]")
    rows = [
        [
            v.group,
            v.vm_name,
            STEP_WORDS.get(v.state, "?"),
            v.step_name,
            bare(v.restore_point),
            mib(v.bytes_copied) if v.bytes_copied else "",
            f"{mib(v.bytes_sent)} sent, {v.blocks_differing} blocks differed" if v.bytes_read else "",
            shown(v.error),
        ]
        for v in s.operation_vms
    ]
    table("VMs", ["group", "vm", "state", "step", "restore point", "copied", "failback", "error"], rows)


def _start(job: str, operation: api.ReplicaOperation.ValueType, groups: list[api.VmGroup], **fields: object) -> None:
    wait, as_json_ = bool(fields.pop("wait", True)), bool(fields.pop("as_json_", False))
    request = api.StartReplicaOperationRequest(job=f"jobs/{job}", operation=operation, groups=groups, **fields)  # type: ignore[arg-type]
    s = call(conn.stub().StartReplicaOperation, request)
    if not wait:
        as_json(s) if as_json_ else out.print(f"started {s.name}")
        return
    final = follow_operation(s.name, quiet=as_json_)
    if as_json_:
        as_json(final)
    raise typer.Exit(exit_code(final))


PointOpt = Annotated[str, typer.Option("--point", help="restore point id (default: the newest)")]


@replica_app.command("failover", help="Run the VM from a restore point on the job's failover host.")
def failover(
    job: str,
    vm: VmOpt = None,
    group: GroupOpt = None,
    point: PointOpt = "",
    wait: WaitOpt = True,
    as_json_: JsonOpt = False,
) -> None:
    _start(job, api.REPLICA_OPERATION_FAILOVER, groups_of(vm, group), point=point, wait=wait, as_json_=as_json_)


@replica_app.command("planned-failover", help="Shut the source VM down, replicate once more, then fail over.")
def planned_failover(
    job: str, vm: VmOpt = None, group: GroupOpt = None, wait: WaitOpt = True, as_json_: JsonOpt = False
) -> None:
    _start(job, api.REPLICA_OPERATION_PLANNED_FAILOVER, groups_of(vm, group), wait=wait, as_json_=as_json_)


@replica_app.command("undo-failover", help="Stop and remove the failed-over VM (its writes are lost); replicate again.")
def undo_failover(
    job: str, vm: VmOpt = None, group: GroupOpt = None, wait: WaitOpt = True, as_json_: JsonOpt = False
) -> None:
    _start(job, api.REPLICA_OPERATION_UNDO_FAILOVER, groups_of(vm, group), wait=wait, as_json_=as_json_)


@replica_app.command(
    "permanent-failover", help="Keep the failed-over VM for good: the replica goes, the VM leaves the job."
)
def permanent_failover(
    job: str,
    vm: VmOpt = None,
    group: GroupOpt = None,
    replicate_back_job: Annotated[
        str, typer.Option("--replicate-back-job", help="also create this job replicating the VM to the job's target")
    ] = "",
    wait: WaitOpt = True,
    as_json_: JsonOpt = False,
) -> None:
    groups = groups_of(vm, group)
    op = api.REPLICA_OPERATION_PERMANENT_FAILOVER
    _start(job, op, groups, replicate_back_job=replicate_back_job, wait=wait, as_json_=as_json_)


@replica_app.command(
    "failback",
    help="Write the failed-over VM's disks back onto the original VM (powered off), or with --to into a new VM "
    "on another (file) host.",
)
def failback(
    job: str,
    vm: VmOpt = None,
    group: GroupOpt = None,
    to: Annotated[
        str,
        typer.Option("--to", help="host id or name of a new location: a new VM is made there from the failed-over VM"),
    ] = "",
    wait: WaitOpt = True,
    as_json_: JsonOpt = False,
) -> None:
    groups = groups_of(vm, group)
    fields = {"failback_host": to if not to or to.startswith("hosts/") else f"hosts/{to}"}
    _start(job, api.REPLICA_OPERATION_FAILBACK, groups, wait=wait, as_json_=as_json_, **fields)


@replica_app.command(
    "commit-failback", help="Keep the failback: remove the failed-over VM, replicate the original again."
)
def commit_failback(
    job: str, vm: VmOpt = None, group: GroupOpt = None, wait: WaitOpt = True, as_json_: JsonOpt = False
) -> None:
    _start(job, api.REPLICA_OPERATION_COMMIT_FAILBACK, groups_of(vm, group), wait=wait, as_json_=as_json_)


@replica_app.command("undo-failback", help="Stop the original VM and run the failed-over VM again.")
def undo_failback(
    job: str, vm: VmOpt = None, group: GroupOpt = None, wait: WaitOpt = True, as_json_: JsonOpt = False
) -> None:
    _start(job, api.REPLICA_OPERATION_UNDO_FAILBACK, groups_of(vm, group), wait=wait, as_json_=as_json_)


@replica_app.command("test-failover", help="Start a restore point as an isolated copy while replication goes on.")
def test_failover(
    job: str,
    vm: VmOpt = None,
    point: PointOpt = "",
    time_limit: Annotated[int, typer.Option(min=0, help="seconds until it is stopped (0: 24 h)")] = 0,
    wait: WaitOpt = True,
    as_json_: JsonOpt = False,
) -> None:
    groups = groups_of(vm, None)
    _start(
        job,
        api.REPLICA_OPERATION_TEST_FAILOVER,
        groups,
        point=point,
        time_limit_seconds=time_limit,
        wait=wait,
        as_json_=as_json_,
    )


@replica_app.command("stop-test", help="Stop and discard a VM's test failover.")
def stop_test(
    job: str,
    vm: VmOpt = None,
    test: Annotated[str, typer.Option("--test", help="test id (default: the VM's test)")] = "",
    wait: WaitOpt = True,
    as_json_: JsonOpt = False,
) -> None:
    _start(job, api.REPLICA_OPERATION_STOP_TEST, groups_of(vm, None), test_id=test, wait=wait, as_json_=as_json_)


@replica_app.command("show", help="Where a VM stands (replicating, failed over, ...) and where its copies run.")
def replica_show(
    job: str,
    vm: Annotated[str, typer.Option("--vm", help="VM id or name (default: the job's only VM)")] = "",
    as_json_: JsonOpt = False,
) -> None:
    r = call(conn.stub().GetReplicaVm, api.GetReplicaVmRequest(job=f"jobs/{job}", vm=vm))
    if as_json_:
        as_json(r)
        return
    rows: list[list[object]] = [
        ["state", STATE_WORDS.get(r.state, "?")],
        ["since", cell_time(r.state_time)],
        ["restore point", bare(r.restore_point)],
        ["runs on", r.host],
        ["as", f"{r.running_vm_name} ({r.running_vm_id})" if r.running_vm_id else ""],
        ["folder", r.folder],
        ["last operation", r.session],
    ]
    # The VM as the heading of its column, not the table's title: a title is folded to the table's width, and a
    # VM that is replicating makes a narrow table (found in a lab: its id over three lines).
    table("replica", ["vm", f"{r.vm_name} ({r.vm_id}) in {r.job}"], [row for row in rows if row[1]])
    if r.tests:
        tests = [
            [t.test_id, bare(t.restore_point), t.host, t.vm_name, cell_time(t.start_time), cell_time(t.deadline)]
            for t in r.tests
        ]
        table("test failovers", ["test", "restore point", "host", "vm", "started (UTC)", "stops (UTC)"], tests)
