"""A transfer's figures, one schema: the proxy's progress message -> the task's database JSON -> the API."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from google.protobuf import json_format
from sqlalchemy import select

from controller.api.sessions_view import disk_msg, session_msg, session_stats
from controller.db.connect import open_database
from controller.db.enums import SessionKind
from controller.db.models import Host, Job, Session, SessionVm, Target, Task
from tests.support.controller_db import seeded_sqlite_url
from vmrepl.progress import FullCheckFigures, Sample, TransferFigures
from vmrepl.v1 import common_pb2, proxy_pb2
from vmrepl.v1 import controller_pb2 as api

MiB = 1 << 20
# Fields of TransferProgress the figures do not carry, and where they go instead.
NOT_FIGURES = {
    "transfer_id",  # tasks.transfer_id, chosen by the controller
    "session_id",
    "disk_id",
    "state",  # the task's state
    "disk_size",  # tasks.disk_size, planned
    "committed_offset",  # tasks.committed_offset
    "error_code",  # tasks.error
    "error_message",
}


def _progress() -> proxy_pb2.TransferProgress:
    """A changed-range transfer whose sample differed, re-run as a digest comparison."""
    return proxy_pb2.TransferProgress(
        transfer_id="t1",
        session_id="s1",
        disk_id="disk0",
        state=proxy_pb2.TRANSFER_STATE_COMPLETED,
        disk_size=64 * MiB,
        bytes_read=80 * MiB,
        bytes_data=20 * MiB,
        bytes_sent=9 * MiB,
        skipped=common_pb2.SkippedBytes(zero=3 * MiB, unallocated=8 * MiB, unchanged=30 * MiB, excluded=MiB),
        busy=proxy_pb2.StageBusy(source_read=6.0, compress=2.0, network_wait=1.0, target_write=4.0, threads=2),
        committed_offset=64 * MiB,
        resumes=1,
        elapsed_seconds=10.0,
        passes=2,
        sample=common_pb2.SampledVerification(sampled_blocks=16, mismatched_blocks=3),
    )


def test_every_progress_field_is_a_figure_or_stored_elsewhere() -> None:
    figures = set(TransferFigures.model_fields) | {"sample"}
    wire = {f.name for f in proxy_pb2.TransferProgress.DESCRIPTOR.fields}
    assert wire - NOT_FIGURES == figures, "a new TransferProgress field needs a place in TransferFigures"


async def test_figures_round_trip_from_the_progress_message_through_the_database_to_the_api(tmp_path: Path) -> None:
    p = _progress()
    engine, sessions = await open_database(await seeded_sqlite_url(tmp_path / "c.db"))
    try:
        async with sessions() as db, db.begin():
            host, target = Host(name="h", provider="file", address="/h"), Target(name="t", address="t:1")
            db.add_all([host, target])
            await db.flush()
            job = Job(name="j", host_id=host.id, target_id=target.id, replica_root="r")
            db.add(job)
            await db.flush()
            session = Session(job_id=job.id, state="succeeded")
            db.add(session)
            await db.flush()
            db.add(SessionVm(session_id=session.id, vm_id="vm1", vm_name="vm1", state="done"))
            db.add(
                Task(
                    session_id=session.id,
                    vm_id="vm1",
                    vm_name="vm1",
                    disk_id="disk0",
                    state="succeeded",
                    change_mode="ranges",
                    disk_size=p.disk_size,
                    committed_offset=p.committed_offset,
                    stats=TransferFigures.from_progress(p).to_json(),
                )
            )
        async with sessions() as db:
            task = (await db.execute(select(Task))).scalar_one()
            row = (await db.execute(select(Session))).scalar_one()
            vms = list((await db.execute(select(SessionVm))).scalars())
    finally:
        await engine.dispose()

    assert TransferFigures.from_json(task.stats) == TransferFigures.from_progress(p)
    stored = disk_msg(task, {}, None)
    for field in ("bytes_read", "bytes_data", "bytes_sent", "skipped", "resumes", "passes", "sample"):
        assert getattr(stored, field) == getattr(p, field), field
    assert stored.duration_seconds == 10.0 and stored.compression_ratio == 20 / 9
    assert stored.busy.source == 0.3 and stored.busy.target == 0.4 and stored.bottleneck == "target"
    assert stored.verification == "sample differed (3 of 16 unsent blocks): re-run as digest comparison, pass 2"
    # A running task shows the live message instead: the same figures, the same API message.
    task.state, task.stats, task.committed_offset = "running", {}, 0
    live = disk_msg(task, {}, p)
    live.state = api.DISK_TASK_STATE_SUCCEEDED
    assert live == stored
    task.state, task.stats, task.committed_offset = (
        "succeeded",
        TransferFigures.from_progress(p).to_json(),
        p.committed_offset,
    )

    api_session = session_msg(row, "j", vms, [task], proxies={}, live={})
    shown = json_format.MessageToDict(api_session, preserving_proto_field_name=True)  # what `--json` prints
    disk = shown["vms"][0]["disks"][0]
    assert disk["passes"] == 2 and disk["sample"] == {"sampled_blocks": 16, "mismatched_blocks": 3}
    assert disk["verification"].startswith("sample differed")
    assert shown["stats"]["bytes_sent"] == str(9 * MiB) and shown["stats"]["skipped"]["unchanged"] == str(30 * MiB)


def test_figures_stored_by_the_earlier_controller_still_read() -> None:
    # What the controller before the typed schema wrote in tasks.stats (its progress_stats).
    earlier = {
        "bytes_read": 5,
        "bytes_data": 4,
        "bytes_sent": 3,
        "skipped": {"zero": 1, "unallocated": 2, "unchanged": 0, "excluded": 0},
        "resumes": 1,
        "passes": 1,
        "elapsed_seconds": 2.5,
        "busy": {"source_read": 1.0, "compress": 0.5, "network_wait": 0.25, "target_write": 0.5, "threads": 2.0},
        "verification": "passed: 16 unsent blocks sampled, all match the replica",
    }
    f = TransferFigures.from_json(earlier)
    assert (f.bytes_read, f.bytes_data, f.bytes_sent, f.resumes, f.passes) == (5, 4, 3, 1, 1)
    assert f.skipped.unallocated == 2 and f.busy.threads == 2 and f.elapsed_seconds == 2.5
    assert f.sample == Sample() and f.verification == ""  # the words are not figures: not carried over
    assert TransferFigures.from_json({}) == TransferFigures() == TransferFigures.from_json(None)
    assert TransferFigures.from_json({"bytes_sent": -1}) == TransferFigures()  # never a negative count


def test_verification_words() -> None:
    assert Sample().words(1) == ""
    assert Sample(sampled_blocks=16).words(1) == "sampled 16 unsent blocks: equal"
    assert Sample(sampled_blocks=16, mismatched_blocks=1).words(2) == (
        "sample differed (1 of 16 unsent blocks): re-run as digest comparison, pass 2"
    )


def test_a_full_checks_findings_travel_to_the_api_and_say_what_was_repaired() -> None:
    found = common_pb2.FullCheck(
        differed_blocks=5,
        repaired_blocks=3,
        repaired_ranges=[
            common_pb2.ByteRange(offset=0, length=2 * MiB),
            common_pb2.ByteRange(offset=9 * MiB, length=MiB),
        ],
    )
    p = proxy_pb2.TransferProgress(passes=1, full_check=found)
    f = TransferFigures.from_json(TransferFigures.from_progress(p).to_json())
    assert f.full_check is not None and f.full_check.to_proto() == found
    assert f.verification == (
        "full check: 3 blocks differed from the replica although the host's change tracking did not report them; "
        f"repaired at byte offset+length 0+{2 * MiB}, {9 * MiB}+{MiB}"
    )
    task = Task(
        vm_id="vm1", disk_id="disk0", state="succeeded", start="fresh", change_mode="compare", stats=f.to_json()
    )
    disk = disk_msg(task, {}, None)
    assert disk.full_check == found and disk.verification == f.verification
    other = api.DiskTask(full_check=common_pb2.FullCheck(differed_blocks=1))
    assert session_stats([disk, other, api.DiskTask()], restore_points=1).blocks_repaired == 3


def test_full_check_words() -> None:
    assert FullCheckFigures().words() == "full check: every block equals the replica"
    assert FullCheckFigures(differed_blocks=1).words() == (
        "full check: 1 block differed from the replica, all reported by the host's change tracking; none repaired"
    )
    many = FullCheckFigures(differed_blocks=20, repaired_blocks=20, repaired_ranges=[(i * 10, 1) for i in range(13)])
    assert many.words(shown=2) == (
        "full check: 20 blocks differed from the replica although the host's change tracking did not report them; "
        "repaired at byte offset+length 0+1, 10+1 and 11 more ranges"
    )
    assert TransferFigures().full_check is None and TransferFigures().verification == ""


def test_a_failback_transfers_point_is_no_restore_point_of_the_job() -> None:
    """The failback's VM in its operation session carries the point committed on the failback folder: the
    session names no restore point of the job and counts none (`session list`'s points column)."""
    started = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    vm = SessionVm(session_id="s1", vm_id="fo-vm", vm_name="web01_replica", state="done", restore_point_id="p9")
    for kind, points, name in ((SessionKind.OPERATION, 0, ""), (SessionKind.REPLICATION, 1, "jobs/j/restorePoints/p9")):
        row = Session(id="s1", job_id="j1", state="succeeded", started_at=started, ended_at=started, kind=kind)
        row.operation, row.error = "failback", ""
        msg = session_msg(row, "j", [vm], [], proxies={}, live={})
        assert (msg.stats.restore_points, msg.vms[0].restore_point) == (points, name)
