"""`vmrepl`: the operator's CLI, a thin client of the ControllerService API (plus `lab` helpers for demos).

Connection: --controller (VMREPL_CONTROLLER, default 127.0.0.1:7400) and a certificate from the vmrepl CA:
--certs-dir (VMREPL_CERTS_DIR) holding ca.pem and IDENTITY.pem/.key, --identity (VMREPL_IDENTITY, default
operator). Read commands take --json. `job start --wait` exits 0 only when the session succeeded (1 failed,
3 incomplete).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn
from rich.table import Table

from vmrepl.config import TlsSettings
from vmrepl.security.tls import channel_credentials
from vmrepl.v1 import controller_pb2 as api
from vmrepl.v1 import controller_pb2_grpc

app = typer.Typer(help="vmrepl: VM replication. Talks to vmrepl-controller over mTLS.", no_args_is_help=True)
infra = typer.Typer(help="Credentials, hosts, proxies and targets.", no_args_is_help=True)
job_app = typer.Typer(help="Replication jobs.", no_args_is_help=True)
session_app = typer.Typer(help="Sessions (runs of a job).", no_args_is_help=True)
points_app = typer.Typer(help="Restore points.", no_args_is_help=True)
lab_app = typer.Typer(
    help="File-backed lab VMs, for demos and tests (local, not through the API).", no_args_is_help=True
)
app.add_typer(infra, name="infra")
app.add_typer(job_app, name="job")
app.add_typer(session_app, name="session")
app.add_typer(points_app, name="restore-points")
app.add_typer(lab_app, name="lab")

out = Console()
err = Console(stderr=True)
T = TypeVar("T")
STATE_NAMES = {v: k.removeprefix("SESSION_STATE_").lower() for k, v in api.SessionState.items()}
EXIT_FAILED, EXIT_INCOMPLETE = 1, 3


class Conn:
    controller: str = "127.0.0.1:7400"
    certs_dir: Path = Path("certs")
    identity: str = "operator"
    _stub: Any = None

    def stub(self) -> Any:
        if self._stub is None:
            d = self.certs_dir
            tls = TlsSettings(
                ca_file=d / "ca.pem", cert_file=d / f"{self.identity}.pem", key_file=d / f"{self.identity}.key"
            )
            channel = grpc.secure_channel(self.controller, channel_credentials(tls))
            self._stub = controller_pb2_grpc.ControllerServiceStub(channel)
        return self._stub


conn = Conn()
JsonOpt = Annotated[bool, typer.Option("--json", help="print the API's reply as JSON")]


@app.callback()
def connection(
    controller: Annotated[str, typer.Option(envvar="VMREPL_CONTROLLER", help="controller host:port")] = conn.controller,
    certs_dir: Annotated[
        Path, typer.Option(envvar="VMREPL_CERTS_DIR", help="folder with ca.pem, IDENTITY.pem/.key")
    ] = conn.certs_dir,
    identity: Annotated[
        str, typer.Option(envvar="VMREPL_IDENTITY", help="certificate name in --certs-dir")
    ] = conn.identity,
) -> None:
    conn.controller, conn.certs_dir, conn.identity = controller, certs_dir, identity


def call(fn: Callable[..., T], request: Message) -> T:
    """One API call; a gRPC error becomes a one-line message and exit status 1."""
    try:
        return fn(request, timeout=60)
    except grpc.RpcError as e:
        err.print(f"[red]error[/red]: {e.code().name}: {e.details()}")  # type: ignore[attr-defined]
        raise typer.Exit(EXIT_FAILED) from None


def as_json(msg: Message) -> None:
    print(json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True), indent=2))


def table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*(str(v) for v in r))
    out.print(t)


def mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


# ---- infra --------------------------------------------------------------------------------------------------


@infra.command("credential-add")
def credential_add(
    cred_id: str,
    username: Annotated[str, typer.Option(help="user name")],
    secret_env: Annotated[str, typer.Option(help="read the secret from this environment variable (else prompt)")] = "",
) -> None:
    """Store a credential; the secret is encrypted by the controller and never shown again."""
    secret = os.environ.get(secret_env, "") if secret_env else typer.prompt("secret", hide_input=True)
    req = api.CreateCredentialRequest(
        credential_id=cred_id, credential=api.Credential(username=username), secret=secret
    )
    c = call(conn.stub().CreateCredential, req)
    out.print(f"created {c.name}")


@infra.command("host-add")
def host_add(
    host_id: str,
    address: Annotated[str, typer.Option(help="folder (file) or host name (hyperv)")],
    provider: Annotated[str, typer.Option(help="file or hyperv")] = "file",
    credential: Annotated[str, typer.Option(help="credential id")] = "",
) -> None:
    host = api.Host(provider=provider, address=address, credential=f"credentials/{credential}" if credential else "")
    h = call(conn.stub().CreateHost, api.CreateHostRequest(host_id=host_id, host=host))
    out.print(f"created {h.name}")


@infra.command("proxy-add")
def proxy_add(
    proxy_id: str,
    address: Annotated[str, typer.Option(help="host:port of the proxy agent")],
    max_tasks: Annotated[int, typer.Option(help="disk tasks at once")] = 4,
    host: Annotated[list[str] | None, typer.Option(help="host id it reads directly (repeat)")] = None,
    tls_server_name: Annotated[str, typer.Option(help="name in its certificate, if not the address's")] = "",
) -> None:
    proxy = api.Proxy(
        address=address,
        max_tasks=max_tasks,
        hosts=[f"hosts/{h}" for h in host or []],
        tls_server_name=tls_server_name,
    )
    p = call(conn.stub().CreateProxy, api.CreateProxyRequest(proxy_id=proxy_id, proxy=proxy))
    out.print(f"created {p.name}")


@infra.command("target-add")
def target_add(
    target_id: Annotated[str, typer.Argument(help="the target agent's configured name")],
    address: Annotated[str, typer.Option(help="host:port of the target agent")],
    max_tasks: Annotated[int, typer.Option(help="disk tasks at once")] = 4,
    tls_server_name: Annotated[str, typer.Option(help="name in its certificate, if not the address's")] = "",
) -> None:
    target = api.Target(address=address, max_tasks=max_tasks, tls_server_name=tls_server_name)
    t = call(conn.stub().CreateTarget, api.CreateTargetRequest(target_id=target_id, target=target))
    out.print(f"created {t.name}")


@infra.command("list")
def infra_list(as_json_: JsonOpt = False) -> None:
    """Credentials (never their secrets), hosts, proxies and targets."""
    s = conn.stub()
    creds = call(s.ListCredentials, api.ListCredentialsRequest())
    hosts = call(s.ListHosts, api.ListHostsRequest())
    proxies = call(s.ListProxies, api.ListProxiesRequest())
    targets = call(s.ListTargets, api.ListTargetsRequest())
    if as_json_:
        for m in (creds, hosts, proxies, targets):
            as_json(m)
        return
    table("credentials", ["name", "username"], [[c.name, c.username] for c in creds.credentials])
    table(
        "hosts",
        ["name", "provider", "address", "credential"],
        [[h.name, h.provider, h.address, h.credential] for h in hosts.hosts],
    )
    table(
        "proxies",
        ["name", "address", "max tasks", "hosts"],
        [[p.name, p.address, p.max_tasks, ", ".join(p.hosts)] for p in proxies.proxies],
    )
    table("targets", ["name", "address", "max tasks"], [[t.name, t.address, t.max_tasks] for t in targets.targets])


@infra.command("delete")
def infra_delete(
    name: Annotated[str, typer.Argument(help="credentials/ID, hosts/ID, proxies/ID or targets/ID")],
) -> None:
    s = conn.stub()
    kinds = {
        "credentials": (s.DeleteCredential, api.DeleteCredentialRequest),
        "hosts": (s.DeleteHost, api.DeleteHostRequest),
        "proxies": (s.DeleteProxy, api.DeleteProxyRequest),
        "targets": (s.DeleteTarget, api.DeleteTargetRequest),
    }
    kind = name.split("/", 1)[0]
    if kind not in kinds:
        err.print(f"[red]error[/red]: {name!r} names no credential, host, proxy or target")
        raise typer.Exit(2)
    fn, req = kinds[kind]
    call(fn, req(name=name))
    out.print(f"deleted {name}")


# ---- jobs -----------------------------------------------------------------------------------------------------


def _job_vms(vm: list[str], exclude_disk: list[str]) -> list[api.JobVm]:
    excluded: dict[str, list[str]] = {}
    for item in exclude_disk:
        name, _, disk = item.partition(":")
        excluded.setdefault(name, []).append(disk)
    return [api.JobVm(vm=v, excluded_disks=excluded.get(v, [])) for v in vm]


@job_app.command("create")
def job_create(
    job_id: str,
    host: Annotated[str, typer.Option(help="host id")],
    target: Annotated[str, typer.Option(help="target id")],
    vm: Annotated[list[str], typer.Option(help="VM id or name (repeat)")],
    replica_root: Annotated[str, typer.Option(help="folder in the target's datastore")] = "",
    keep: Annotated[int, typer.Option(help="restore points to keep")] = 7,
    compression: Annotated[str, typer.Option(help="none, fast, default")] = "default",
    block_size: Annotated[int, typer.Option(help="bytes, power of two 64 KiB..16 MiB")] = 1 << 20,
    bandwidth_mbps: Annotated[float, typer.Option(help="0: unlimited")] = 0.0,
    change_tracking: Annotated[str, typer.Option(help="auto, on, off")] = "auto",
    exclude_disk: Annotated[list[str] | None, typer.Option(help="VM:DISK not replicated (repeat)")] = None,
    schedule: Annotated[str, typer.Option(help='JSON, e.g. {"kind": "cron", "cron": "0 22 * * *"} (docs/cli.md)')] = "",
    webhook: Annotated[str, typer.Option(help="URL POSTed a JSON summary when a session ends")] = "",
    webhook_failures_only: Annotated[bool, typer.Option(help="notify failed sessions only")] = False,
    retries: Annotated[int, typer.Option(help="times a failed VM is tried again in the session")] = 2,
    retry_wait: Annotated[int, typer.Option(help="seconds before a retry")] = 60,
    as_json_: JsonOpt = False,
) -> None:
    job = api.Job(
        host=f"hosts/{host}",
        target=f"targets/{target}",
        replica_root=replica_root or f"replicas/{job_id}",
        vms=_job_vms(vm, exclude_disk or []),
        restore_points_to_keep=keep,
        compression=compression,
        block_size=block_size,
        bandwidth_limit_mbps=bandwidth_mbps,
        change_tracking=change_tracking,
        retries=retries,
        retry_wait_seconds=retry_wait,
    )
    if schedule:
        job.schedule.update(_json_option("--schedule", schedule))
    if webhook:
        job.webhook.CopyFrom(api.Webhook(url=webhook, failures_only=webhook_failures_only))
    j = call(conn.stub().CreateJob, api.CreateJobRequest(job_id=job_id, job=job))
    if as_json_:
        as_json(j)
    else:
        out.print(f"created {j.name}")


def _json_option(name: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        err.print(f"[red]error[/red]: {name} is not JSON: {e}")
        raise typer.Exit(2) from None
    if not isinstance(value, dict):
        err.print(f"[red]error[/red]: {name} must be a JSON object")
        raise typer.Exit(2)
    return value


@job_app.command("list")
def job_list(as_json_: JsonOpt = False) -> None:
    r = call(conn.stub().ListJobs, api.ListJobsRequest())
    if as_json_:
        as_json(r)
        return
    rows = [[j.name, j.host, j.target, ", ".join(v.vm for v in j.vms), j.restore_points_to_keep] for j in r.jobs]
    table("jobs", ["name", "host", "target", "vms", "keep"], rows)


@job_app.command("show")
def job_show(job_id: str, as_json_: JsonOpt = False) -> None:
    j = call(conn.stub().GetJob, api.GetJobRequest(name=f"jobs/{job_id}"))
    if as_json_:
        as_json(j)
        return
    d = json_format.MessageToDict(j, preserving_proto_field_name=True)
    table(
        j.name, ["setting", "value"], [[k, json.dumps(v) if isinstance(v, (list, dict)) else v] for k, v in d.items()]
    )


@job_app.command("update")
def job_update(
    job_id: str,
    keep: Annotated[int | None, typer.Option(help="restore points to keep")] = None,
    change_tracking: Annotated[str | None, typer.Option(help="auto, on, off")] = None,
    bandwidth_mbps: Annotated[float | None, typer.Option(help="0: unlimited")] = None,
    disabled: Annotated[bool | None, typer.Option("--disabled/--enabled")] = None,
    schedule: Annotated[str | None, typer.Option(help='JSON schedule; "{}" for manual only')] = None,
) -> None:
    job, paths = api.Job(name=f"jobs/{job_id}"), list[str]()
    if keep is not None:
        job.restore_points_to_keep, paths = keep, [*paths, "restore_points_to_keep"]
    if change_tracking is not None:
        job.change_tracking, paths = change_tracking, [*paths, "change_tracking"]
    if bandwidth_mbps is not None:
        job.bandwidth_limit_mbps, paths = bandwidth_mbps, [*paths, "bandwidth_limit_mbps"]
    if disabled is not None:
        job.disabled, paths = disabled, [*paths, "disabled"]
    if schedule is not None:
        job.schedule.update(_json_option("--schedule", schedule))
        paths.append("schedule")
    if not paths:
        err.print("nothing to update")
        raise typer.Exit(2)
    req = api.UpdateJobRequest(job=job, update_mask=field_mask_pb2.FieldMask(paths=paths))
    out.print(f"updated {call(conn.stub().UpdateJob, req).name}")


@job_app.command("delete")
def job_delete(job_id: str) -> None:
    call(conn.stub().DeleteJob, api.DeleteJobRequest(name=f"jobs/{job_id}"))
    out.print(f"deleted jobs/{job_id}")


@job_app.command("start")
def job_start(
    job_id: str,
    wait: Annotated[bool, typer.Option("--wait", help="follow the session; exit 0 only if it succeeded")] = False,
    as_json_: JsonOpt = False,
) -> None:
    s = call(conn.stub().StartJob, api.StartJobRequest(name=f"jobs/{job_id}"))
    if not wait:
        as_json(s) if as_json_ else out.print(f"started {s.name}")
        return
    final = follow(s.name, quiet=as_json_)
    if as_json_:
        as_json(final)
    raise typer.Exit(exit_code(final))


@job_app.command("stop")
def job_stop(job_id: str) -> None:
    s = call(conn.stub().StopJob, api.StopJobRequest(name=f"jobs/{job_id}"))
    out.print(f"stopping {s.name}; its disks stay resumable")


def exit_code(s: api.Session) -> int:
    if s.state == api.SESSION_STATE_SUCCEEDED:
        return 0
    return EXIT_INCOMPLETE if s.state == api.SESSION_STATE_INCOMPLETE else EXIT_FAILED


# ---- sessions -------------------------------------------------------------------------------------------------


def _watch(name: str) -> Iterator[api.Session]:
    try:
        yield from conn.stub().WatchSession(api.WatchSessionRequest(name=name))
    except grpc.RpcError as e:
        err.print(f"[red]error[/red]: {e.code().name}: {e.details()}")  # type: ignore[attr-defined]
        raise typer.Exit(EXIT_FAILED) from None


def follow(name: str, *, quiet: bool = False) -> api.Session:
    """Follow a session to its end with a progress bar per disk; returns the final state."""
    last = api.Session()
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True))
    with Progress(*columns, console=err, disable=quiet, transient=False) as bars:
        ids: dict[str, TaskID] = {}
        for s in _watch(name):
            last = s
            for vm in s.vms:
                for d in vm.disks:
                    key = f"{vm.vm_name}/{d.disk_id}"
                    if key not in ids:
                        ids[key] = bars.add_task(key, total=d.disk_size or 1)
                    bars.update(ids[key], completed=d.committed_offset, description=f"{key} {d.state}")
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
    if s.error:
        out.print(f"  error: {s.error}")


def _duration(s: api.Session) -> str:
    if not s.HasField("end_time"):
        return "running"
    return f"{s.end_time.ToDatetime().timestamp() - s.start_time.ToDatetime().timestamp():.1f} s"


@session_app.command("list")
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
            s.start_time.ToDatetime().isoformat(timespec="seconds"),
            _duration(s),
            mib(s.stats.bytes_sent),
            s.stats.restore_points,
        ]
        for s in r.sessions
    ]
    table("sessions", ["name", "job", "state", "started (UTC)", "duration", "sent", "points"], rows)


@session_app.command("show")
def session_show(session_id: str, as_json_: JsonOpt = False) -> None:
    s = call(conn.stub().GetSession, api.GetSessionRequest(name=_session_name(session_id)))
    if as_json_:
        as_json(s)
        return
    summary(s)
    rows = [
        [
            v.vm_name,
            d.disk_id,
            d.state,
            d.change_mode or d.start,
            mib(d.disk_size),
            mib(d.bytes_read),
            mib(d.bytes_sent),
            mib(d.skipped.zero),
            mib(d.skipped.unchanged),
            f"{mib(int(d.rate_bytes_per_second))}/s",
            f"{d.compression_ratio:.2f}x",
            d.bottleneck,
            d.error or v.error,
        ]
        for v in s.vms
        for d in v.disks
    ]
    cols = ["vm", "disk", "state", "change", "size", "read", "sent", "zero", "unchanged", "rate", "ratio", "bottleneck"]
    cols.append("error")
    table(f"{s.name} ({s.job})", cols, rows)


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
            fields = " ".join(f"{k}={v}" for k, v in json_format.MessageToDict(e.fields).items())
            out.print(f"{e.time.ToJsonString()} {e.level:7} {e.event} {fields}", highlight=False, markup=False)
        token = page.next_page_token
        if not token:
            return


@session_app.command("watch")
def session_watch(session_id: str) -> None:
    raise typer.Exit(exit_code(follow(_session_name(session_id))))


def _session_name(session_id: str) -> str:
    return session_id if session_id.startswith("sessions/") else f"sessions/{session_id}"


@points_app.command("list")
def points_list(job: str, as_json_: JsonOpt = False) -> None:
    r = call(conn.stub().ListRestorePoints, api.ListJobRestorePointsRequest(parent=f"jobs/{job}"))
    if as_json_:
        as_json(r)
        return
    rows = [
        [p.name, p.vm_id, p.session, p.create_time.ToDatetime().isoformat(timespec="seconds")] for p in r.restore_points
    ]
    table(f"restore points of jobs/{job}", ["name", "vm", "session", "created (UTC)"], rows)


# ---- lab ------------------------------------------------------------------------------------------------------


@lab_app.command("create-vm")
def lab_create_vm(
    host_dir: Annotated[Path, typer.Argument(help="the file host's folder")],
    name: str,
    size_mib: Annotated[int, typer.Option(help="disk size")] = 256,
    seed: Annotated[int, typer.Option(help="content seed (the VM's id is random whatever the seed)")] = 1,
) -> None:
    """A sample VM: a GPT disk with an NTFS partition (mkntfs, ntfscp) and a swap partition (mkswap)."""
    from controller.lab import create_sample_vm
    from vmrepl.providers.filehost import load_manifest

    vm_dir = create_sample_vm(host_dir, name, size=size_mib << 20, seed=seed)
    out.print(f"created VM {name} (id {load_manifest(vm_dir).id}) in {vm_dir}")


@lab_app.command("write")
def lab_write(
    host_dir: Annotated[Path, typer.Argument(help="the file host's folder")],
    vm: Annotated[str, typer.Argument(help="VM id or name")],
    disk: Annotated[str, typer.Option(help="disk id")] = "disk0",
    blocks: Annotated[int, typer.Option(help="how many 1 MiB-aligned ranges to change")] = 8,
    length: Annotated[int, typer.Option(help="bytes written in each")] = 64 << 10,
    seed: Annotated[int, typer.Option(help="random seed (offsets and data)")] = 0,
) -> None:
    """Write random data as the guest would (into the checkpoint overlay while one exists)."""
    from vmrepl.providers.filehost import FileHostProvider

    file_vm = FileHostProvider(host_dir).vm(vm)
    size = file_vm.size(disk)
    rng = random.Random(seed or time.time_ns())
    offsets = sorted(rng.sample(range(size >> 20), min(blocks, size >> 20)))
    for block in offsets:
        file_vm.write(disk, block << 20, rng.randbytes(min(length, size - (block << 20))))
    out.print(f"wrote {len(offsets)} x {length} bytes to {vm}/{disk}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
