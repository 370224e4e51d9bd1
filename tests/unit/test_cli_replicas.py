"""`vmrepl restore-points list`, `vmrepl replica rollback` and `--replica-format`: the real commands over a
fake API, as a 120-column terminal shows them."""

from __future__ import annotations

import datetime as dt
import io
import json

import grpc
import pytest
from google.protobuf import timestamp_pb2
from rich.console import Console
from typer.testing import CliRunner

from controller.cli import common, replicas
from controller.cli.main import app
from controller.cli.replicas import replica_words
from vmrepl.v1 import common_pb2
from vmrepl.v1 import controller_pb2 as api

JOB = "jobs/web"
S1, S2 = "5449ecca085b44499a4b155054705cfc", "9d1f0a77b2e04c4e8f3b6a1c2d3e4f50"


def _ts(hour: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt.datetime(2026, 11, 30, hour, 0, tzinfo=dt.UTC))
    return ts


def _point(point_id: str, hour: int, *, restorable: bool = True, vm: str = "vm-1") -> api.JobRestorePoint:
    return api.JobRestorePoint(
        name=f"{JOB}/restorePoints/{point_id}",
        vm_id=vm,
        vm_name="web-01",
        session=f"sessions/{S1}",
        create_time=_ts(hour),
        size_bytes=3 << 30,
        consistency=common_pb2.CONSISTENCY_APPLICATION,
        restorable=restorable,
        disks=[
            common_pb2.RestorePointDisk(disk_id="disk0", disk_size=1 << 30),
            common_pb2.RestorePointDisk(disk_id="data1"),
        ],
    )


class RpcError(grpc.RpcError):  # type: ignore[misc]  # grpc ships no types
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "no such method"


class FakeApi:
    def __init__(self, replicas: list[api.JobReplica] | None) -> None:
        self.replicas = replicas
        self.requests: list[object] = []

    def ListJobReplicas(self, request: api.ListJobReplicasRequest, timeout: float) -> api.ListJobReplicasResponse:
        self.requests.append(request)
        if self.replicas is None:
            raise RpcError(grpc.StatusCode.UNIMPLEMENTED)
        return api.ListJobReplicasResponse(replicas=self.replicas)

    def ListJobRestorePoints(
        self, request: api.ListJobRestorePointsRequest, timeout: float
    ) -> api.ListJobRestorePointsResponse:
        self.requests.append(request)
        return api.ListJobRestorePointsResponse(restore_points=[_point("rp-old", 1, restorable=False)])

    def RollbackJobReplica(self, request: api.RollbackJobReplicaRequest, timeout: float) -> api.JobReplica:
        self.requests.append(request)
        return api.JobReplica(
            vm_id="vm-1",
            vm_name="web-01",
            state=common_pb2.REPLICA_STATE_AT_POINT,
            base_point=f"{JOB}/restorePoints/rp-2",
            rolled_back_session=f"sessions/{S2}",
            rolled_back_time=_ts(5),
            restore_points=[_point("rp-2", 2)],
        )

    def CreateJob(self, request: api.CreateJobRequest, timeout: float) -> api.Job:
        self.requests.append(request)
        return api.Job(name=f"jobs/{request.job_id}")

    def UpdateJob(self, request: api.UpdateJobRequest, timeout: float) -> api.Job:
        self.requests.append(request)
        return request.job


def _terminal(monkeypatch: pytest.MonkeyPatch, fake: FakeApi) -> Console:
    console = Console(width=120, record=True, file=io.StringIO())
    monkeypatch.setattr(common, "out", console)
    monkeypatch.setattr(replicas, "out", console)
    monkeypatch.setattr(common.conn, "_stub", fake)
    return console


def _run(console: Console, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output
    return " ".join(console.export_text().replace("│", " ").split()) + result.output


# ---- the replica's state in words ---------------------------------------------------------------------


def test_each_replica_state_reads_as_a_sentence() -> None:
    at = api.JobReplica(state=common_pb2.REPLICA_STATE_AT_POINT, base_point=f"{JOB}/restorePoints/rp-7")
    assert replica_words(at) == "at restore point rp-7"
    writing = api.JobReplica(state=common_pb2.REPLICA_STATE_WRITING, session=f"sessions/{S1}")
    assert replica_words(writing) == f"session {S1} writing: between points"
    stopped = api.JobReplica(state=common_pb2.REPLICA_STATE_RESUMABLE, session=f"sessions/{S1}")
    assert replica_words(stopped) == f"session {S1} stopped; resumable from the same checkpoint"
    assert replica_words(api.JobReplica(state=common_pb2.REPLICA_STATE_EMPTY)) == "no restore point yet"


def test_a_rollback_is_told_until_a_newer_point_is_made() -> None:
    rolled = api.JobReplica(
        state=common_pb2.REPLICA_STATE_AT_POINT,
        base_point=f"{JOB}/restorePoints/rp-2",
        rolled_back_session=f"sessions/{S2}",
        rolled_back_time=_ts(5),
        restore_points=[_point("rp-2", 2)],
    )
    assert replica_words(rolled) == f"rolled back session {S2} at 2026-11-30T05:00:00; at restore point rp-2"
    rolled.restore_points.append(_point("rp-3", 6))
    rolled.base_point = f"{JOB}/restorePoints/rp-3"
    assert replica_words(rolled) == "at restore point rp-3"


# ---- the commands -------------------------------------------------------------------------------------


def test_restore_points_list_shows_each_vm_its_state_and_points(monkeypatch: pytest.MonkeyPatch) -> None:
    replica = api.JobReplica(
        vm_id="vm-1",
        vm_name="web-01",
        state=common_pb2.REPLICA_STATE_WRITING,
        session=f"sessions/{S2}",
        base_point=f"{JOB}/restorePoints/rp-2",
        restore_points=[_point("rp-1", 1), _point("rp-2", 2)],
    )
    shown = _run(_terminal(monkeypatch, FakeApi([replica])), "restore-points", "list", "web")
    assert f"web-01 (vm-1): session {S2} writing: between points" in shown
    assert "rp-1 2026-11-30 01:00:00 3,072.0 MiB application yes disk0, data1" in shown
    assert "rp-2 2026-11-30 02:00:00" in shown and "…" not in shown


def test_a_vm_whose_target_cannot_be_asked_shows_the_points_the_controller_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    down = api.JobReplica(vm_id="vm-1", vm_name="web-01", error="target t1 cannot be asked now (UNAVAILABLE)")
    fake = FakeApi([down])
    shown = _run(_terminal(monkeypatch, fake), "restore-points", "list", "web")
    assert "target unreachable (target t1 cannot be asked now (UNAVAILABLE))" in shown
    assert "rp-old 2026-11-30 01:00:00 3,072.0 MiB application unknown" in shown
    assert [type(r).__name__ for r in fake.requests] == ["ListJobReplicasRequest", "ListJobRestorePointsRequest"]


def test_a_controller_that_cannot_list_replicas_still_lists_its_records(monkeypatch: pytest.MonkeyPatch) -> None:
    shown = _run(_terminal(monkeypatch, FakeApi(None)), "restore-points", "list", "web")
    assert "cannot be listed (UNIMPLEMENTED)" in shown and "web-01 (vm-1): target unreachable" in shown
    assert "rp-old" in shown and "unknown" in shown


def test_restore_points_list_json_is_the_apis_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    replica = api.JobReplica(vm_id="vm-1", state=common_pb2.REPLICA_STATE_EMPTY)
    _terminal(monkeypatch, FakeApi([replica]))
    result = CliRunner().invoke(app, ["restore-points", "list", "web", "--json"])
    assert result.exit_code == 0 and json.loads(result.output) == {
        "replicas": [{"vm_id": "vm-1", "state": "REPLICA_STATE_EMPTY"}]
    }


def test_replica_rollback_names_the_job_and_vm_and_says_where_the_replica_is(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeApi([])
    shown = _run(_terminal(monkeypatch, fake), "replica", "rollback", "web", "--vm", "web-01")
    assert fake.requests == [api.RollbackJobReplicaRequest(job=JOB, vm="web-01")]
    assert f"web-01: rolled back session {S2} at 2026-11-30T05:00:00; at restore point rp-2" in shown


def test_replica_format_is_raw_or_vhdx_on_create_and_update(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeApi([])
    console = _terminal(monkeypatch, fake)
    create = ["job", "create", "web", "--host", "h", "--target", "t", "--vm", "web-01", "--replica-format", "vhdx"]
    _run(console, *create)
    _run(console, "job", "update", "web", "--replica-format", "raw")
    created, updated = fake.requests
    assert isinstance(created, api.CreateJobRequest) and created.job.replica_format == common_pb2.DISK_FORMAT_VHDX
    assert isinstance(updated, api.UpdateJobRequest) and list(updated.update_mask.paths) == ["replica_format"]
    assert updated.job.replica_format == common_pb2.DISK_FORMAT_RAW
    shown = _run(console, *create[:-1], "vhd", code=2)
    assert "--replica-format must be raw or vhdx" in shown and len(fake.requests) == 2


def test_restore_points_list_keeps_ids_whole_and_names_each_points_disks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found as a new user: nothing but --json said which `--disk` export takes; and the id, copied into
    `export`, must stay on one line where the terminal has room for it (the session list test shows the fold)."""
    point = "d4cd8759a2004031bf1b6f0f09760cd2"
    replica = api.JobReplica(
        vm_id="vm-1", vm_name="web-01", state=common_pb2.REPLICA_STATE_AT_POINT,
        base_point=f"{JOB}/restorePoints/{point}", restore_points=[_point(point, 1)],
    )  # fmt: skip
    console = Console(width=100, record=True, file=io.StringIO())
    monkeypatch.setattr(common, "out", console)
    monkeypatch.setattr(replicas, "out", console)
    monkeypatch.setattr(common.conn, "_stub", FakeApi([replica]))
    assert CliRunner().invoke(app, ["restore-points", "list", "web"]).exit_code == 0
    text = console.export_text()
    assert any(point in line for line in text.splitlines()), text
    assert "disks" in text  # which --disk export takes (the 120-column test reads them)


@pytest.mark.parametrize(
    ("fmt", "words"),
    [
        (common_pb2.DISK_FORMAT_VHDX, "replica_format vhdx"),
        (common_pb2.DISK_FORMAT_UNSPECIFIED, "replica_format the host's own (raw on a file host, vhdx on Hyper-V)"),
    ],
)
def test_job_show_prints_the_replica_format_as_the_option_takes_it(
    monkeypatch: pytest.MonkeyPatch, fmt: common_pb2.DiskFormat.ValueType, words: str
) -> None:
    """Found as a new user: `--replica-format vhdx` came back as `DISK_FORMAT_VHDX`, and a job left to the
    host's format showed no line at all."""

    class Jobs(FakeApi):
        def GetJob(self, request: api.GetJobRequest, timeout: float) -> api.Job:
            return api.Job(name=request.name, replica_format=fmt)

    shown = _run(_terminal(monkeypatch, Jobs([])), "job", "show", "web")
    assert words in shown and "DISK_FORMAT" not in shown


def test_the_bandwidth_option_says_its_unit() -> None:
    """Found as a new user: `--bandwidth-mbps 16` moved 15 MiB/s, megabytes where mbps reads as megabits."""
    for command in ("create", "update"):
        result = CliRunner().invoke(app, ["job", command, "--help"], env={"COLUMNS": "200"})
        assert "MB/s (10^6 bytes per second, not megabits)" in result.output, result.output


@pytest.mark.parametrize(
    "option",
    [
        ["job", "create", "web", "--host", "h", "--target", "t", "--vm", "v", "--full-check-every", "-1"],
        ["job", "create", "web", "--host", "h", "--target", "t", "--vm", "v", "--retries", "-1"],
        ["job", "create", "web", "--host", "h", "--target", "t", "--vm", "v", "--retry-wait", "-1"],
        ["job", "create", "web", "--host", "h", "--target", "t", "--vm", "v", "--block-size", "-1"],
        ["job", "create", "web", "--host", "h", "--target", "t", "--vm", "v", "--keep", "0"],
        ["job", "update", "web", "--full-check-every", "-1"],
        ["job", "update", "web", "--keep", "0"],
        ["lab", "write", "host", "vm", "--blocks", "-1"],
    ],
)
def test_a_number_out_of_range_is_a_usage_error_before_any_call(
    monkeypatch: pytest.MonkeyPatch, option: list[str]
) -> None:
    """Found as a new user: `--full-check-every -1` printed protobuf's traceback (ValueError: Value out of
    range), and `job update --keep 0` said `updated` while the job kept 7 points."""
    fake = FakeApi([])
    _terminal(monkeypatch, fake)
    result = CliRunner().invoke(app, option)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Invalid value" in result.output and fake.requests == []


def test_a_replica_without_points_is_one_line_not_an_empty_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found as a new user: a job that never ran printed a table of headings with no row under them."""
    empty = api.JobReplica(vm_id="vm-1", vm_name="web-01", state=common_pb2.REPLICA_STATE_EMPTY)
    shown = _run(_terminal(monkeypatch, FakeApi([empty])), "restore-points", "list", "web")
    assert shown.strip() == "web-01 (vm-1): no restore point yet" and "restorable" not in shown
