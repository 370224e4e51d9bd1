"""The controller with real proxy and target processes: CLI, API, retention, roles, secrets."""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from controller import lab
from controller.engine.journal import CRASH_EXIT_CODE
from tests.integration.controller_env import ControllerEnv, make_env
from tests.support.replicas import assert_replicas_identical
from vmrepl.extent import MiB
from vmrepl.v1 import common_pb2, target_pb2
from vmrepl.v1 import controller_pb2 as api

pytestmark = pytest.mark.integration


def test_full_then_incremental_through_the_cli(ctl: ControllerEnv) -> None:
    t, p = ctl.target.address, ctl.proxy.address
    ctl.cli("infra", "target-add", "target", "--address", t)
    ctl.cli("infra", "proxy-add", "proxy1", "--address", p)
    ctl.cli("infra", "host-add", "lab", "--address", str(ctl.host))
    ctl.cli("job", "create", "job1", "--host", "lab", "--target", "target", "--vm", "vm1", "--vm", "vm2")
    full = ctl.cli("job", "start", "job1", "--wait")
    assert "succeeded" in full.stdout
    assert_replicas_identical(ctl)

    ctl.cli("lab", "write", str(ctl.host), "vm1", "--blocks", "6", "--seed", "3")
    incr = ctl.cli("job", "start", "job1", "--wait", "--json")
    session = json.loads(incr.stdout)
    assert session["state"] == "SESSION_STATE_SUCCEEDED"
    assert_replicas_identical(ctl)
    modes = {(v["vm_name"], d["disk_id"]): d["change_mode"] for v in session["vms"] for d in v["disks"]}
    assert set(modes.values()) == {"ranges"}, modes  # the file host's change tracking, since the last point
    sent = int(session["stats"]["bytes_sent"])
    assert sent < 8 << 20, "an incremental of 6 small writes sends a few MiB at most"

    sessions = json.loads(ctl.cli("session", "list", "--json").stdout)["sessions"]
    assert [s["state"] for s in sessions] == ["SESSION_STATE_SUCCEEDED"] * 2
    shown = ctl.cli("session", "show", sessions[0]["name"].removeprefix("sessions/")).stdout
    assert "disk1" in shown and "ranges" in shown
    # --json is ListJobReplicas' reply: per VM replica, its points as the target holds them.
    replicas = json.loads(ctl.cli("restore-points", "list", "job1", "--json").stdout)["replicas"]
    points = [p for r in replicas for p in r["restore_points"]]
    assert len(points) == 4 and all(p["restorable"] for p in points)  # two VMs, two sessions
    assert "job1" in ctl.cli("job", "list").stdout


def test_retention_keeps_exactly_n_points_in_the_database_and_on_the_target(ctl_db: ControllerEnv) -> None:
    ctl_db.configure(restore_points_to_keep=2)
    for _ in range(4):
        assert ctl_db.run_job().state == api.SESSION_STATE_SUCCEEDED
    points = ctl_db.points()
    assert len(points) == 4  # 2 per VM
    target = ctl_db.target_stub()
    for vm in ("vm1", "vm2"):
        vm_id = ctl_db.vm(vm).manifest.id
        on_target = target.ListRestorePoints(target_pb2.ListRestorePointsRequest(replica_path=f"replicas/job1/{vm_id}"))
        kept = {p.id for p in on_target.restore_points}
        assert kept == {p.name.rsplit("/", 1)[1] for p in points if p.vm_id == vm_id}
        assert len(kept) == 2


# An offset past any integer the database takes (it used to end as INTERNAL: OverflowError).
HUGE_OFFSET = base64.urlsafe_b64encode(b"o:" + b"9" * 40).decode()
# Well-formed keyset tokens whose time is a valid ISO date that no UTC time can hold (OverflowError).
EARLIEST_IN_UTC = base64.urlsafe_b64encode(b'["sessions","0001-01-01T00:00:00+14:00","x"]').decode()
LATEST_IN_UTC = base64.urlsafe_b64encode(b'["restorePoints","9999-12-31T23:59:59-14:00","x"]').decode()


def _hours(**days: list[tuple[int, int]]) -> api.PermittedHours:
    hours = api.PermittedHours()
    for day, spans in days.items():
        getattr(hours, day).extend(api.HourSpan(start_hour=a, end_hour=b) for a, b in spans)
    return hours


def _bad_job_calls(stub: Any) -> list[tuple[str, Callable[[], Any]]]:
    job = api.Job(host="hosts/lab", target="targets/target", replica_root="r/j", vms=[api.JobVm(vm="vm1")])

    def job_with(**over: Any) -> Callable[[], Any]:
        j = api.Job()
        j.CopyFrom(job)
        for k, v in over.items():
            if k == "vms":
                del j.vms[:]
                j.vms.extend(v)
            elif k in ("schedule", "webhook", "guest_processing", "exclusions"):
                getattr(j, k).CopyFrom(v)
            else:
                setattr(j, k, v)
        return lambda: stub.CreateJob(api.CreateJobRequest(job_id="jx", job=j))

    return [
        ("job.host", job_with(host="lab")),
        ("job.target", job_with(target="nope/target")),
        ("job.replica_root", job_with(replica_root="../escape")),
        # job1's is replicas/job1 on the same target: neither the same, nor around it, nor inside it
        ("job.replica_root", job_with(replica_root="replicas/job1")),
        ("job.replica_root", job_with(replica_root="Replicas/JOB1")),
        ("job.replica_root", job_with(replica_root="replicas")),
        ("job.replica_root", job_with(replica_root="replicas/job1/more")),
        ("job.vms[0].vm", job_with(vms=[api.JobVm(vm="vm1\x00")])),
        ("job.vms", job_with(vms=[])),
        ("job.vms[1].vm", job_with(vms=[api.JobVm(vm="vm1"), api.JobVm(vm="vm1")])),
        ("job.restore_points_to_keep", job_with(restore_points_to_keep=-1)),
        ("job.compression", job_with(compression="zstd")),
        ("job.block_size", job_with(block_size=12345)),
        ("job.bandwidth_limit_mbps", job_with(bandwidth_limit_mbps=-5)),
        ("job.change_tracking", job_with(change_tracking="sometimes")),
        ("job.checkpoint_hold_seconds", job_with(checkpoint_hold_seconds=5)),
        ("job.retries", job_with(retries=11)),
        ("job.retry_wait_seconds", job_with(retry_wait_seconds=100000)),
        ("job.full_check_every", job_with(full_check_every=1001)),
        ("job.replica_format", job_with(replica_format=common_pb2.DISK_FORMAT_VHD)),
        ("job.webhook.url", job_with(webhook=api.Webhook(url="ftp://hooks.example/x"))),
        ("job.schedule.cron", job_with(schedule=api.Schedule(kind=api.SCHEDULE_KIND_CRON, cron="every night"))),
        (
            "job.schedule.timezone",
            job_with(schedule=api.Schedule(kind=api.SCHEDULE_KIND_INTERVAL, every_minutes=5, timezone="CET+1")),
        ),
        ("job.schedule.after_job", job_with(schedule=api.Schedule(kind=api.SCHEDULE_KIND_AFTER_JOB, after_job="job1"))),
        # A cron expression with no kind (a client's misspelt kind arrives so): not a silently manual job.
        ("job.schedule.kind", job_with(schedule=api.Schedule(cron="0 22 * * *"))),
        ("job.schedule.permitted.sat[0]", job_with(schedule=api.Schedule(permitted=_hours(sat=[(6, 30)])))),
        ("job.guest_processing.credential", job_with(guest_processing=api.GuestProcessing(credential="guest"))),
        ("job.exclusions.guest_paths[1]", job_with(exclusions=common_pb2.GuestExclusions(guest_paths=["/a", ""]))),
    ]


def _bad_name_and_page_calls(stub: Any) -> list[tuple[str, Callable[[], Any]]]:
    return [
        ("name", lambda: stub.GetJob(api.GetJobRequest(name="job1"))),
        ("name", lambda: stub.GetHost(api.GetHostRequest(name=""))),
        ("name", lambda: stub.StartJob(api.StartJobRequest(name="jobs/UPPER"))),
        ("name", lambda: stub.StopJob(api.StopJobRequest(name="job1"))),
        ("name", lambda: stub.DeleteTarget(api.DeleteTargetRequest(name="target"))),
        ("name", lambda: stub.GetSession(api.GetSessionRequest(name="sessions/../x"))),
        ("name", lambda: next(iter(stub.WatchSession(api.WatchSessionRequest(name="x"))))),
        ("job", lambda: stub.ListSessions(api.ListSessionsRequest(job="job1"))),
        ("page_size", lambda: stub.ListJobs(api.ListJobsRequest(page_size=-1))),
        ("page_token", lambda: stub.ListHosts(api.ListHostsRequest(page_token="garbage"))),
        ("page_token", lambda: stub.ListSessions(api.ListSessionsRequest(page_token=HUGE_OFFSET))),
        ("page_token", lambda: stub.ListTargets(api.ListTargetsRequest(page_token=HUGE_OFFSET))),
        ("page_token", lambda: stub.ListSessions(api.ListSessionsRequest(page_token=EARLIEST_IN_UTC))),
        (
            "page_token",
            lambda: stub.ListJobRestorePoints(
                api.ListJobRestorePointsRequest(parent="jobs/job1", page_token=LATEST_IN_UTC)
            ),
        ),
        (
            "page_token",
            lambda: stub.ListJobs(api.ListJobsRequest(page_token=base64.urlsafe_b64encode(b"\xff").decode())),
        ),
        ("parent", lambda: stub.ListJobRestorePoints(api.ListJobRestorePointsRequest(parent="job1"))),
        ("parent", lambda: stub.ListJobReplicas(api.ListJobReplicasRequest(parent="job1"))),
        ("job", lambda: stub.RollbackJobReplica(api.RollbackJobReplicaRequest(job="job1", vm="vm1"))),
        ("vm", lambda: stub.RollbackJobReplica(api.RollbackJobReplicaRequest(job="jobs/job1", vm=""))),
    ]


def _bad_host_calls(stub: Any, work: Path) -> list[tuple[str, Callable[[], Any]]]:
    def file_host(address: str) -> Callable[[], Any]:
        return lambda: stub.CreateHost(
            api.CreateHostRequest(host_id="h2", host=api.Host(provider="file", address=address))
        )

    return [
        ("host_id", lambda: stub.CreateHost(api.CreateHostRequest(host_id="", host=api.Host(provider="file")))),
        (
            "host.provider",
            lambda: stub.CreateHost(api.CreateHostRequest(host_id="h2", host=api.Host(provider="vmware"))),
        ),
        (
            "host.address",
            lambda: stub.CreateHost(
                api.CreateHostRequest(host_id="h2", host=api.Host(provider="file", address="rel/x"))
            ),
        ),
        ("host.address", file_host("/")),
        ("host.address", file_host("/etc")),
        ("host.address", file_host("/usr/lib")),
        ("host.address", file_host("/dev/null")),
        ("host.address", file_host(str(work / "controller.toml"))),  # a file, not a folder
        ("host.address", file_host(str(work / "no-such-folder"))),
        ("host.address", file_host(f"{work}/host\x00/x")),
        ("host.address", file_host("/tmp")),
        (
            "host.address",
            lambda: stub.CreateHost(
                api.CreateHostRequest(host_id="h3", host=api.Host(provider="hyperv", address="hv\x00"))
            ),
        ),
    ]


def _bad_calls(stub: Any, work: Path) -> list[tuple[str, Callable[[], Any]]]:
    return [
        ("credential_id", lambda: stub.CreateCredential(api.CreateCredentialRequest(credential_id="Bad Id"))),
        (
            "secret",
            lambda: stub.CreateCredential(
                api.CreateCredentialRequest(credential_id="c1", credential=api.Credential(username="u"))
            ),
        ),
        (
            "credential.username",
            lambda: stub.CreateCredential(api.CreateCredentialRequest(credential_id="c1", secret="x")),
        ),
        *_bad_host_calls(stub, work),
        (
            "proxy.address",
            lambda: stub.CreateProxy(api.CreateProxyRequest(proxy_id="p2", proxy=api.Proxy(address="nope"))),
        ),
        (
            "proxy.max_tasks",
            lambda: stub.CreateProxy(
                api.CreateProxyRequest(proxy_id="p2", proxy=api.Proxy(address="h:1", max_tasks=1000))
            ),
        ),
        (
            "proxy.hosts[0]",
            lambda: stub.CreateProxy(
                api.CreateProxyRequest(proxy_id="p2", proxy=api.Proxy(address="h:1", hosts=["x"]))
            ),
        ),
        ("target.address", lambda: stub.CreateTarget(api.CreateTargetRequest(target_id="t2", target=api.Target()))),
        *_bad_job_calls(stub),
        (
            "update_mask",
            lambda: stub.UpdateJob(
                api.UpdateJobRequest(
                    job=api.Job(name="jobs/job1"), update_mask=field_mask_pb2.FieldMask(paths=["name"])
                )
            ),
        ),
        *_bad_name_and_page_calls(stub),
    ]


def test_every_bad_argument_is_invalid_argument_naming_the_field(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure()
    stub = ctl_raw.client()
    for field, call in _bad_calls(stub, ctl_raw.work):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
        assert err.value.details().startswith(f"{field}:"), (field, err.value.details())
    assert [j.name for j in stub.ListJobs(api.ListJobsRequest()).jobs] == ["jobs/job1"]  # nothing was created
    assert [h.name for h in stub.ListHosts(api.ListHostsRequest()).hosts] == ["hosts/lab"]
    # A root beside job1's is fine, as is the same root on another target.
    ok = api.Job(host="hosts/lab", target="targets/target", replica_root="replicas/job10", vms=[api.JobVm(vm="vm1")])
    stub.CreateJob(api.CreateJobRequest(job_id="job10", job=ok))
    assert stub.GetJob(api.GetJobRequest(name="jobs/job10")).full_check_every == 10  # unset: the default
    stub.CreateTarget(api.CreateTargetRequest(target_id="t2", target=api.Target(address="h:1")))
    ok.replica_root, ok.target = "replicas/job1", "targets/t2"
    stub.CreateJob(api.CreateJobRequest(job_id="job11", job=ok))
    mask = field_mask_pb2.FieldMask(paths=["target"])  # moving it to job1's target makes them overlap
    with pytest.raises(grpc.RpcError) as err:
        stub.UpdateJob(api.UpdateJobRequest(job=api.Job(name="jobs/job11", target="targets/target"), update_mask=mask))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "jobs/job1 " in err.value.details()


def test_a_hyperv_hosts_bad_winrm_setting_is_named_as_the_api_names_it(ctl_raw: ControllerEnv) -> None:
    # The client's own field names ("winrm.auth") were prefixed once more: "host.winrm.winrm.auth".
    stub = ctl_raw.client()
    cred = api.Credential(username="CORP\\svc")
    stub.CreateCredential(api.CreateCredentialRequest(credential_id="hv", credential=cred, secret="s"))
    toml = str(ctl_raw.work / "controller.toml")
    bad = [
        ("host.winrm.auth", "only over https", api.WinRmSettings(scheme="http", auth="basic")),
        ("host.winrm.auth", "'NTLM'", api.WinRmSettings(auth="NTLM")),
        ("host.winrm.scheme", "'HTTPS'", api.WinRmSettings(scheme="HTTPS")),
        ("host.winrm.port", "70000", api.WinRmSettings(port=70000)),
        ("host.winrm.ca_bundle", "https only", api.WinRmSettings(scheme="http", ca_bundle=toml)),
        ("host.winrm.ca_bundle", "not a file", api.WinRmSettings(ca_bundle=str(ctl_raw.work / "no-such.pem"))),
        # Relative to the controller's folder, not the operator's: refused, not guessed.
        ("host.winrm.ca_bundle", "absolute path", api.WinRmSettings(ca_bundle="ca.pem")),
    ]
    for field, words, winrm in bad:
        host = api.Host(provider="hyperv", address="hv1.corp", credential="credentials/hv", winrm=winrm)
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateHost(api.CreateHostRequest(host_id="hv1", host=host))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
        assert err.value.details().startswith(f"{field}: ") and words in err.value.details(), err.value.details()
    assert not list(stub.ListHosts(api.ListHostsRequest()).hosts)


def test_pages_and_updates(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure()
    stub = ctl_raw.client()
    for i in range(5):
        stub.CreateTarget(api.CreateTargetRequest(target_id=f"t{i}", target=api.Target(address=f"h{i}:7402")))
    first = stub.ListTargets(api.ListTargetsRequest(page_size=4))
    second = stub.ListTargets(api.ListTargetsRequest(page_size=4, page_token=first.next_page_token))
    names = [t.name for t in [*first.targets, *second.targets]]
    assert len(names) == 6 and len(set(names)) == 6 and not second.next_page_token
    mask = field_mask_pb2.FieldMask(paths=["restore_points_to_keep"])
    updated = stub.UpdateJob(
        api.UpdateJobRequest(job=api.Job(name="jobs/job1", restore_points_to_keep=3), update_mask=mask)
    )
    assert updated.restore_points_to_keep == 3 and updated.vms[0].vm == "vm1"  # the rest untouched
    with pytest.raises(grpc.RpcError) as err:
        stub.DeleteHost(api.DeleteHostRequest(name="hosts/lab"))
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "jobs/job1" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateTarget(api.CreateTargetRequest(target_id="t1", target=api.Target(address="h:1")))
    assert err.value.code() is grpc.StatusCode.ALREADY_EXISTS


def test_a_reader_certificate_reads_but_cannot_start_a_job(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure()
    reader = ctl_raw.client("reader")
    assert [j.name for j in reader.ListJobs(api.ListJobsRequest()).jobs] == ["jobs/job1"]
    calls: list[Callable[[], Any]] = [
        lambda: reader.StartJob(api.StartJobRequest(name="jobs/job1")),
        lambda: reader.DeleteJob(api.DeleteJobRequest(name="jobs/job1")),
        lambda: reader.CreateCredential(api.CreateCredentialRequest(credential_id="c", secret="s")),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert not list(reader.ListSessions(api.ListSessionsRequest()).sessions)
    denied = ctl_raw.cli("--identity", "reader", "job", "start", "job1", check=False)
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
    proxy_cert = ctl_raw.client("proxy")  # an agent's certificate is no API client either
    with pytest.raises(grpc.RpcError) as err:
        proxy_cert.ListJobs(api.ListJobsRequest())
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_a_credential_a_jobs_guest_processing_names_is_not_deleted_under_it(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure()
    stub = ctl_raw.client()
    stub.CreateCredential(
        api.CreateCredentialRequest(credential_id="guest", credential=api.Credential(username="u"), secret="s")
    )
    guest = api.GuestProcessing(enabled=True, credential="credentials/guest")
    job = api.Job(name="jobs/job1", guest_processing=guest)
    mask = field_mask_pb2.FieldMask(paths=["guest_processing"])
    assert stub.UpdateJob(api.UpdateJobRequest(job=job, update_mask=mask)).guest_processing == guest
    with pytest.raises(grpc.RpcError) as refused:
        stub.DeleteCredential(api.DeleteCredentialRequest(name="credentials/guest"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "jobs/job1" in refused.value.details()
    job.guest_processing.credential = ""
    stub.UpdateJob(api.UpdateJobRequest(job=job, update_mask=mask))
    stub.DeleteCredential(api.DeleteCredentialRequest(name="credentials/guest"))


def test_credentials_never_appear_in_replies_logs_or_the_database(ctl_raw: ControllerEnv) -> None:
    secret = "pa55-Wörd-that-must-not-leak-7c1e"
    stub = ctl_raw.client()
    created = stub.CreateCredential(
        api.CreateCredentialRequest(
            credential_id="hv-admin", credential=api.Credential(username="CORP\\svc"), secret=secret
        )
    )
    stub.UpdateCredential(
        api.UpdateCredentialRequest(
            credential=api.Credential(name="credentials/hv-admin"),
            update_mask=field_mask_pb2.FieldMask(paths=["secret"]),
            secret=secret + "-rotated",
        )
    )
    replies = [
        created,
        stub.GetCredential(api.GetCredentialRequest(name="credentials/hv-admin")),
        stub.ListCredentials(api.ListCredentialsRequest()),
    ]
    stub.CreateHost(
        api.CreateHostRequest(
            host_id="hv1", host=api.Host(provider="hyperv", address="hv1.corp", credential="credentials/hv-admin")
        )
    )
    replies.append(stub.GetHost(api.GetHostRequest(name="hosts/hv1")))
    for r in replies:
        assert secret.encode() not in r.SerializeToString()
    cli_out = ctl_raw.cli("infra", "list", "--json").stdout
    assert "CORP" in cli_out and secret not in cli_out
    ctl_raw.restart_controller()  # the key file is read again: secrets still decrypt (checked by no error)
    for f in ctl_raw.work.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert secret.encode() not in data and secret.encode("utf-16-le") not in data, f


@pytest.mark.parametrize(
    ("proxy_settings", "target_settings", "expected"),
    [({"test_read_delay_ms": 40.0}, {}, "source"), ({}, {"test_write_delay_ms": 150.0}, "target")],
    ids=["slow-source", "slow-target"],
)
def test_the_slowed_stage_is_named_the_bottleneck(
    tmp_path: Path,
    lab_certs: lab.LabCerts,
    proxy_settings: dict[str, object],
    target_settings: dict[str, object],
    expected: str,
) -> None:
    env = make_env(tmp_path, lab_certs, disk_mib=8, proxy_settings=proxy_settings, target_settings=target_settings)
    try:
        env.configure(vms=("vm1",))
        session = env.run_job()
        assert session.state == api.SESSION_STATE_SUCCEEDED, session.error
        for d in (d for v in session.vms for d in v.disks):
            assert d.bottleneck == expected, (d.disk_id, d.busy)
            assert d.duration_seconds > 0 and d.rate_bytes_per_second > 0 and d.compression_ratio > 1
        st = session.stats
        assert st.bottleneck == expected
        assert st.bytes_processed == st.disk_bytes and st.bytes_data >= st.bytes_sent > 0
        shown = env.cli("session", "show", session.name).stdout
        assert f"bottleneck: {expected}" in shown
    finally:
        env.stop()


def test_a_sessions_log_is_read_through_the_api(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure()
    session = ctl_raw.run_job()
    log = ctl_raw.client("reader").GetSessionLog(api.GetSessionLogRequest(name=session.name))
    events = [e.event for e in log.entries]
    for expected in (
        "session_planned",
        "checkpoint_created",
        "task_starting",
        "restore_point_committed",
        "session_ended",
    ):
        assert expected in events, events
    assert events[-1] == "session_ended" and log.entries[-1].fields["state"] == "succeeded"
    starting = [e for e in log.entries if e.event == "task_starting"]
    assert {e.fields["disk_id"] for e in starting} == {"disk0", "disk1"} and len(starting) == 3
    first = ctl_raw.client().GetSessionLog(api.GetSessionLogRequest(name=session.name, page_size=2))
    rest = ctl_raw.client().GetSessionLog(
        api.GetSessionLogRequest(name=session.name, page_size=1000, page_token=first.next_page_token)
    )
    assert [e.event for e in [*first.entries, *rest.entries]] == events
    shown = ctl_raw.cli("session", "log", session.name).stdout
    assert "restore_point_committed" in shown and "session_ended" in shown


def test_cli_sets_schedule_webhook_and_retries(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure()
    sched = '{"kind": "cron", "cron": "30 22 * * 1-5", "timezone": "Europe/Berlin"}'
    args = ["job", "create", "nightly", "--host", "lab", "--target", "target", "--vm", "vm2", "--schedule", sched]
    ctl_raw.cli(*args, "--webhook", "https://hooks.example/T/abc", "--retries", "4", "--retry-wait", "30")
    shown = json.loads(ctl_raw.cli("job", "show", "nightly", "--json").stdout)
    assert shown["schedule"] == {"kind": "SCHEDULE_KIND_CRON", "cron": "30 22 * * 1-5", "timezone": "Europe/Berlin"}
    assert '"timezone": "Europe/Berlin"' in ctl_raw.cli("job", "show", "nightly").stdout  # as --schedule takes it
    assert shown["webhook"] == {"url": "https://hooks.example/…"} and shown["retries"] == 4
    bad = ctl_raw.cli("job", "update", "nightly", "--schedule", '{"kind": "cron", "cron": "nope"}', check=False)
    assert bad.returncode == 1 and "INVALID_ARGUMENT: job.schedule.cron" in bad.stderr
    ctl_raw.cli("job", "update", "nightly", "--schedule", "{}")
    assert json.loads(ctl_raw.cli("job", "show", "nightly", "--json").stdout).get("schedule", {}) == {}  # manual


def test_an_internal_error_names_the_controllers_log(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure(vms=("vm2",))
    session = ctl_raw.run_job()
    log_file = ctl_raw.work / "controller" / "sessions" / f"{session.name.removeprefix('sessions/')}.log"
    log_file.unlink()
    log_file.mkdir()  # a session log the controller cannot read: an error no rule of the API describes
    with pytest.raises(grpc.RpcError) as err:
        ctl_raw.client("reader").GetSessionLog(api.GetSessionLogRequest(name=session.name))
    assert err.value.code() is grpc.StatusCode.INTERNAL
    assert err.value.details() == "internal error; see the controller's log"
    assert any(e.get("event") == "rpc_internal_error" for e in ctl_raw.controller.events())


def _restart_target_on_its_port(ctl: ControllerEnv) -> None:
    port = ctl.target.port
    config = lab.target_config(ctl.work, ctl.certs, listen=f"127.0.0.1:{port}", level="debug")
    ctl.target = lab.AgentProcess("target_agent", config, ctl.work / "target.log")  # stopped by the fixture
    ctl.target.start()
    assert ctl.target.port == port


def test_a_session_started_while_its_target_restarts_waits_for_it(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure(vms=("vm2",))
    assert ctl_raw.run_job().state == api.SESSION_STATE_SUCCEEDED  # the controller's channel is connected
    ctl_raw.target.stop()
    session = ctl_raw.client().StartJob(api.StartJobRequest(name="jobs/job1"))  # planning finds it down
    time.sleep(1)
    _restart_target_on_its_port(ctl_raw)
    final = ctl_raw.wait_session(session.name, timeout=60)
    assert final.state == api.SESSION_STATE_SUCCEEDED, final.error
    # And a session started right after a restart (the channel may still be waiting to reconnect).
    ctl_raw.target.stop()
    _restart_target_on_its_port(ctl_raw)
    again = ctl_raw.run_job()
    assert again.state == api.SESSION_STATE_SUCCEEDED, again.error


def test_a_stop_recorded_after_every_disk_and_restore_point_is_done_leaves_the_session_succeeded(
    ctl_raw: ControllerEnv,
) -> None:
    ctl_raw.configure(vms=("vm2",))
    ctl_raw.restart_controller(level="debug")
    assert ctl_raw.run_job().state == api.SESSION_STATE_SUCCEEDED
    changes = [e for e in ctl_raw.controller.events() if e.get("event") == "state_changed"]
    assert changes[-1]["change"] == "session ended" and changes[-2]["change"] == "vm done", changes
    # The next session stops right after its last VM is done, before the session is closed: the
    # controller exits there (test hook), and a stop is recorded meanwhile as StopJob records it.
    ctl_raw.restart_controller(test_crash_at_transition=len(changes) - 1)
    proc = ctl_raw.controller.proc
    assert proc is not None
    session = ctl_raw.client().StartJob(api.StartJobRequest(name="jobs/job1"))
    assert proc.wait(60) == CRASH_EXIT_CODE
    crash = [e for e in ctl_raw.controller.events() if e.get("event") == "crash_hook_exit"]
    assert crash[-1]["change"] == "vm done", crash
    sid = session.name.removeprefix("sessions/")
    with sqlite3.connect(ctl_raw.work / "controller" / "controller.db") as db:
        assert db.execute("UPDATE sessions SET state = 'stopping' WHERE id = ?", (sid,)).rowcount == 1
    ctl_raw.restart_controller()  # continues the stopping session: nothing is left to do but close it
    final = ctl_raw.wait_session(session.name)
    assert final.state == api.SESSION_STATE_SUCCEEDED, (final.state, final.error)
    assert len(ctl_raw.points()) == 2 and [v.state for v in final.vms] == [api.VM_STATE_DONE]


def test_a_vm_whose_id_is_no_plain_name_fails_alone_and_nests_no_replica(ctl_raw: ControllerEnv) -> None:
    from vmrepl.providers.filehost import load_manifest, write_manifest

    vm_dir = lab.create_raw_vm(ctl_raw.host, "odd", size=MiB, seed=21)
    manifest = load_manifest(vm_dir)
    manifest.id = "evil/nested"  # a folder copied and edited by hand, or another provider's id
    write_manifest(vm_dir, manifest)
    ctl_raw.configure(vms=("vm2", "odd"), retries=0)
    session = ctl_raw.run_job()
    assert session.state == api.SESSION_STATE_FAILED
    vms = {v.vm_name: v for v in session.vms}
    assert vms["vm2"].state == api.VM_STATE_DONE, vms["vm2"]
    assert vms["odd"].state == api.VM_STATE_FAILED and "cannot name a replica folder" in vms["odd"].error, vms["odd"]
    assert not (ctl_raw.work / "datastore" / "replicas" / "job1" / "evil").exists()
    assert len(ctl_raw.points()) == 1


def test_sessions_and_restore_points_page_by_key_newest_first(ctl_db: ControllerEnv) -> None:
    ctl_db.configure(vms=("vm2",))
    ran = [ctl_db.run_job().name for _ in range(3)]
    stub = ctl_db.client("reader")
    first = stub.ListSessions(api.ListSessionsRequest(page_size=2))
    rest = stub.ListSessions(api.ListSessionsRequest(page_size=2, page_token=first.next_page_token))
    assert [s.name for s in [*first.sessions, *rest.sessions]] == ran[::-1] and not rest.next_page_token
    one = stub.ListSessions(api.ListSessionsRequest(job="jobs/job1", page_size=1, page_token=first.next_page_token))
    assert [s.name for s in one.sessions] == ran[:1]
    points = stub.ListJobRestorePoints(api.ListJobRestorePointsRequest(parent="jobs/job1", page_size=2))
    more = stub.ListJobRestorePoints(
        api.ListJobRestorePointsRequest(parent="jobs/job1", page_size=2, page_token=points.next_page_token)
    )
    assert [p.session for p in [*points.restore_points, *more.restore_points]] == ran  # oldest first
    with pytest.raises(grpc.RpcError) as err:  # a token of another list
        stub.ListJobRestorePoints(api.ListJobRestorePointsRequest(parent="jobs/job1", page_token=first.next_page_token))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
