"""`vmrepl jobs`: Replication jobs."""

from __future__ import annotations

import enum
import json
from typing import Annotated

import typer
from google.protobuf import field_mask_pb2, json_format

from controller.cli.common import EXIT_FAILED, JsonOpt, as_json, call, conn, err, out, table
from controller.cli.sessions import exit_code, follow
from controller.scheduling.schedule import schedule_json, schedule_message
from vmrepl.domain import BLOCK_SIZE_RULE, JOB_DEFAULTS, ChangeTracking, Compression
from vmrepl.errors import InvalidArgument
from vmrepl.v1 import common_pb2
from vmrepl.v1 import controller_pb2 as api

job_app = typer.Typer(help="Replication jobs.", no_args_is_help=True)
# The API's name; `--keep` stays as the short spelling scripts and docs already use.
# Bounds on the numbers the API keeps unsigned: a negative one stopped the CLI with a traceback (protobuf's
# ValueError) instead of a usage line; 0 kept points would be taken as unset (the default, 7) without a word.
_KEEP = typer.Option("--restore-points-to-keep", "--keep", min=1, help="restore points to keep (at least 1)")
_FULL_CHECK_EVERY = typer.Option(
    min=0, help="every N sessions compare every block's digest instead of trusting the host's changed ranges; 0: never"
)


# The API's unit (the field's name says mbps): megabytes, not megabits, a factor of 8 an operator must not guess.
_BANDWIDTH = typer.Option(help="MB/s (10^6 bytes per second, not megabits) on the wire; 0: unlimited")
_FORMAT = typer.Option(
    "--replica-format",
    help="raw or vhdx (default: the host's own, vhdx on Hyper-V, raw on a file host); fixed once the job has "
    "restore points",
)


def _replica_format(text: str) -> common_pb2.DiskFormat.ValueType:
    """--replica-format as the API's enum: raw or vhdx; empty for the host's own."""
    formats = {"": common_pb2.DISK_FORMAT_UNSPECIFIED, "raw": common_pb2.DISK_FORMAT_RAW}
    formats["vhdx"] = common_pb2.DISK_FORMAT_VHDX
    if text.lower() not in formats:
        err.print(f"[red]error[/red]: --replica-format must be raw or vhdx, not {text!r}")
        raise typer.Exit(2)
    return formats[text.lower()]


_FORMAT_WORDS = {
    common_pb2.DISK_FORMAT_UNSPECIFIED: "the host's own (raw on a file host, vhdx on Hyper-V)",
    common_pb2.DISK_FORMAT_RAW: "raw",
    common_pb2.DISK_FORMAT_VHDX: "vhdx",
}


_FAILOVER_HOST = typer.Option("--failover-host", help="host id where failed-over and test VMs run")
_NETWORK_MAP = typer.Option("--network-map", help="SRC=DST: a source switch's counterpart there (repeat)")
_FAILBACK_TARGET = typer.Option("--failback-target", help="target id that writes the original disks in a failback")


def _network_map(items: list[str]) -> list[api.NetworkMapping]:
    out_: list[api.NetworkMapping] = []
    for item in items:
        src, eq, dst = item.partition("=")
        if not (src and eq and dst):
            raise typer.BadParameter(f"{item!r} is not SRC=DST (e.g. LAN=DR-LAN)", param_hint="--network-map")
        out_.append(api.NetworkMapping(source_switch=src, target_switch=dst))
    return out_


def _failover_settings(job: api.Job, host: str | None, network_map: list[str] | None, back: str | None) -> list[str]:
    """The failover flags into the job; the update mask's paths they set ("" unsets a host or target)."""
    paths: list[str] = []
    if host is not None:
        job.failover_host, paths = f"hosts/{host}" if host else "", [*paths, "failover_host"]
    if network_map is not None:
        job.network_mapping.extend(_network_map(network_map))
        paths.append("network_mapping")
    if back is not None:
        job.failback_target, paths = f"targets/{back}" if back else "", [*paths, "failback_target"]
    return paths


def _choices(kind: type[enum.StrEnum]) -> str:
    return ", ".join(e.value for e in kind)


def _job_vms(vm: list[str], exclude_disk: list[str]) -> list[api.JobVm]:
    """The job's VMs with their excluded disks. An exclusion whose VM is not one of --vm would be dropped
    without a word (and the disk replicated after all), so it is a usage error, as is one without VM:."""
    excluded: dict[str, list[str]] = {}
    for item in exclude_disk:
        name, colon, disk = item.partition(":")
        if not (name and colon and disk):
            raise typer.BadParameter(f"{item!r} is not VM:DISK (e.g. web01:scsi0-1)", param_hint="--exclude-disk")
        if name not in vm:
            raise typer.BadParameter(
                f"{item!r}: {name!r} is not one of the job's --vm ({', '.join(vm)}); name the VM as --vm does",
                param_hint="--exclude-disk",
            )
        excluded.setdefault(name, []).append(disk)
    return [api.JobVm(vm=v, excluded_disks=excluded.get(v, [])) for v in vm]


@job_app.command("create", help="Create a replication job (manual unless --schedule).")
def job_create(
    job_id: str,
    host: Annotated[str, typer.Option(help="host id")],
    target: Annotated[str, typer.Option(help="target id")],
    vm: Annotated[list[str], typer.Option(help="VM id or name (repeat)")],
    replica_root: Annotated[str, typer.Option(help="folder in the target's datastore")] = "",
    restore_points_to_keep: Annotated[int, _KEEP] = JOB_DEFAULTS.restore_points_to_keep,
    compression: Annotated[str, typer.Option(help=_choices(Compression))] = JOB_DEFAULTS.compression.value,
    block_size: Annotated[int, typer.Option(min=0, help=f"bytes; {BLOCK_SIZE_RULE}")] = JOB_DEFAULTS.block_size,
    bandwidth_mbps: Annotated[float, _BANDWIDTH] = 0.0,
    change_tracking: Annotated[str, typer.Option(help=_choices(ChangeTracking))] = JOB_DEFAULTS.change_tracking.value,
    exclude_disk: Annotated[list[str] | None, typer.Option(help="VM:DISK not replicated (repeat)")] = None,
    schedule: Annotated[str, typer.Option(help='JSON, e.g. {"kind": "cron", "cron": "0 22 * * *"} (docs/cli.md)')] = "",
    webhook: Annotated[str, typer.Option(help="URL POSTed a JSON summary when a session ends")] = "",
    webhook_failures_only: Annotated[bool, typer.Option(help="notify failed sessions only")] = False,
    retries: Annotated[
        int, typer.Option(min=0, help="times a failed VM is tried again in the session")
    ] = JOB_DEFAULTS.retries,
    retry_wait: Annotated[int, typer.Option(min=0, help="seconds before a retry")] = JOB_DEFAULTS.retry_wait_seconds,
    full_check_every: Annotated[int, _FULL_CHECK_EVERY] = JOB_DEFAULTS.full_check_every,
    replica_format: Annotated[str, _FORMAT] = "",
    failover_host: Annotated[str, _FAILOVER_HOST] = "",
    network_map: Annotated[list[str] | None, _NETWORK_MAP] = None,
    failback_target: Annotated[str, _FAILBACK_TARGET] = "",
    as_json_: JsonOpt = False,
) -> None:
    job = api.Job(
        host=f"hosts/{host}",
        target=f"targets/{target}",
        replica_root=replica_root or f"replicas/{job_id}",
        vms=_job_vms(vm, exclude_disk or []),
        restore_points_to_keep=restore_points_to_keep,
        compression=compression,
        block_size=block_size,
        bandwidth_limit_mbps=bandwidth_mbps,
        change_tracking=change_tracking,
        retries=retries,
        retry_wait_seconds=retry_wait,
        full_check_every=full_check_every,
        replica_format=_replica_format(replica_format),
    )
    _failover_settings(job, failover_host, network_map or [], failback_target)
    if schedule:
        job.schedule.CopyFrom(_schedule_option(schedule))
    if webhook:
        job.webhook.CopyFrom(api.Webhook(url=webhook, failures_only=webhook_failures_only))
    j = call(conn.stub().CreateJob, api.CreateJobRequest(job_id=job_id, job=job))
    if as_json_:
        as_json(j)
    else:
        out.print(f"created {j.name}")


def _schedule_option(text: str) -> api.Schedule:
    """--schedule: the JSON grammar of docs/controller.md ("Scheduling"), as the API's typed Schedule."""
    try:
        value = json.loads(text)
    except ValueError as e:
        err.print(f"[red]error[/red]: --schedule is not JSON: {e}")
        raise typer.Exit(2) from None
    if not isinstance(value, dict):
        err.print("[red]error[/red]: --schedule must be a JSON object")
        raise typer.Exit(2)
    try:
        return schedule_message(value)
    except InvalidArgument as e:
        err.print(f"[red]error[/red]: INVALID_ARGUMENT: {e}")  # as the API would answer
        raise typer.Exit(EXIT_FAILED) from None


@job_app.command("list", help="List the jobs.")
def job_list(as_json_: JsonOpt = False) -> None:
    r = call(conn.stub().ListJobs, api.ListJobsRequest())
    if as_json_:
        as_json(r)
        return
    rows = [[j.name, j.host, j.target, ", ".join(v.vm for v in j.vms), j.restore_points_to_keep] for j in r.jobs]
    table("jobs", ["name", "host", "target", "vms", "keep"], rows)


@job_app.command("show", help="Show one job's settings.")
def job_show(job_id: str, as_json_: JsonOpt = False) -> None:
    j = call(conn.stub().GetJob, api.GetJobRequest(name=f"jobs/{job_id}"))
    if as_json_:
        as_json(j)
        return
    d = json_format.MessageToDict(j, preserving_proto_field_name=True)
    if j.HasField("schedule"):
        d["schedule"] = schedule_json(j.schedule)  # as --schedule takes it
    # As --replica-format takes it; unset (the API's default) is a choice too, so it is shown.
    d["replica_format"] = _FORMAT_WORDS.get(j.replica_format, str(d.get("replica_format", "")))
    table(
        j.name, ["setting", "value"], [[k, json.dumps(v) if isinstance(v, (list, dict)) else v] for k, v in d.items()]
    )


@job_app.command("update", help="Change the settings given; the others stay.")
def job_update(
    job_id: str,
    restore_points_to_keep: Annotated[int | None, _KEEP] = None,
    change_tracking: Annotated[str | None, typer.Option(help=_choices(ChangeTracking))] = None,
    bandwidth_mbps: Annotated[float | None, _BANDWIDTH] = None,
    disabled: Annotated[bool | None, typer.Option("--disabled/--enabled")] = None,
    schedule: Annotated[str | None, typer.Option(help='JSON schedule; "{}" for manual only')] = None,
    full_check_every: Annotated[int | None, _FULL_CHECK_EVERY] = None,
    replica_format: Annotated[str | None, _FORMAT] = None,
    failover_host: Annotated[str | None, _FAILOVER_HOST] = None,
    network_map: Annotated[list[str] | None, _NETWORK_MAP] = None,
    failback_target: Annotated[str | None, _FAILBACK_TARGET] = None,
) -> None:
    job = api.Job(name=f"jobs/{job_id}")
    paths = _failover_settings(job, failover_host, network_map, failback_target)
    if replica_format is not None:
        job.replica_format, paths = _replica_format(replica_format), [*paths, "replica_format"]
    if restore_points_to_keep is not None:
        job.restore_points_to_keep, paths = restore_points_to_keep, [*paths, "restore_points_to_keep"]
    if change_tracking is not None:
        job.change_tracking, paths = change_tracking, [*paths, "change_tracking"]
    if bandwidth_mbps is not None:
        job.bandwidth_limit_mbps, paths = bandwidth_mbps, [*paths, "bandwidth_limit_mbps"]
    if disabled is not None:
        job.disabled, paths = disabled, [*paths, "disabled"]
    if schedule is not None:
        job.schedule.CopyFrom(_schedule_option(schedule))
        paths.append("schedule")
    if full_check_every is not None:
        job.full_check_every, paths = full_check_every, [*paths, "full_check_every"]
    if not paths:
        err.print("nothing to update")
        raise typer.Exit(2)
    req = api.UpdateJobRequest(job=job, update_mask=field_mask_pb2.FieldMask(paths=paths))
    out.print(f"updated {call(conn.stub().UpdateJob, req).name}")


@job_app.command("delete", help="Delete a job (refused while its session runs; the replicas on the target are left).")
def job_delete(job_id: str) -> None:
    call(conn.stub().DeleteJob, api.DeleteJobRequest(name=f"jobs/{job_id}"))
    out.print(f"deleted jobs/{job_id}")


@job_app.command("start", help="Start a session of the job now (--wait: follow it to its end).")
def job_start(
    job_id: str,
    wait: Annotated[bool, typer.Option("--wait", help="follow the session; exit 0 only if it succeeded")] = False,
    full_check: Annotated[
        bool, typer.Option("--full-check", help="compare every block's digest instead of trusting changed ranges")
    ] = False,
    as_json_: JsonOpt = False,
) -> None:
    s = call(conn.stub().StartJob, api.StartJobRequest(name=f"jobs/{job_id}", full_check=full_check))
    if not wait:
        as_json(s) if as_json_ else out.print(f"started {s.name}")
        return
    final = follow(s.name, quiet=as_json_)
    if as_json_:
        as_json(final)
    raise typer.Exit(exit_code(final))


@job_app.command("stop", help="Stop the job's running session (its disks stay resumable).")
def job_stop(job_id: str) -> None:
    s = call(conn.stub().StopJob, api.StopJobRequest(name=f"jobs/{job_id}"))
    out.print(f"stopping {s.name}; its disks stay resumable")
