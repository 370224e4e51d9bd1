"""API load against a real controller: calls are bounded per client certificate and in total (the excess
gets RESOURCE_EXHAUSTED with a retry hint), and a flood of reads does not hold up the session engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session as OrmSession

from controller.db.models import Job, Session, SessionVm, Task, now
from tests.integration.controller_env import ControllerEnv
from tests.support.certs import tls_settings
from vmrepl.call_limits import RETRY_AFTER_KEY
from vmrepl.rpc import secure_channel
from vmrepl.v1 import controller_pb2 as api
from vmrepl.v1 import controller_pb2_grpc

pytestmark = pytest.mark.integration
PER_CLIENT = 4
FLOOD = 200


def _seed_sessions(db: Path, job: str, n: int) -> None:
    """n ended sessions of `job`, two VMs and three disks each, written while the controller is stopped:
    the history a controller has after a few months, which a page of ListSessions reads."""
    engine = create_engine(f"sqlite:///{db}")
    with OrmSession(engine) as s, s.begin():
        job_id = s.scalars(select(Job.id).where(Job.name == job)).one()
        for _ in range(n):
            sid = uuid.uuid4().hex
            s.add(Session(id=sid, job_id=job_id, state="succeeded", started_at=now(), ended_at=now()))
            for vm, disks in (("vm1", ("disk0", "disk1")), ("vm2", ("disk0",))):
                s.add(SessionVm(session_id=sid, vm_id=vm, vm_name=vm, state="done"))
                for d in disks:
                    s.add(Task(session_id=sid, vm_id=vm, vm_name=vm, disk_id=d, state="succeeded", disk_size=8 << 20))
    engine.dispose()


def _stub(ctl: ControllerEnv, identity: str) -> tuple[grpc.aio.Channel, Any]:
    channel = secure_channel(ctl.controller.address, tls_settings(ctl.certs, identity))
    return channel, controller_pb2_grpc.ControllerServiceStub(channel)


async def _outcome(call: Any) -> tuple[grpc.StatusCode, str | None]:
    try:
        await call
        return grpc.StatusCode.OK, None
    except grpc.aio.AioRpcError as e:
        trailing = dict(e.trailing_metadata() or ())
        return e.code(), trailing.get(RETRY_AFTER_KEY)


async def test_per_client_limit_refuses_the_excess_with_a_retry_hint(ctl_raw: ControllerEnv) -> None:
    ctl_raw.restart_controller(api_calls_per_client=PER_CLIENT, api_calls_total=64)
    ctl_raw.configure(vms=("vm1",), bandwidth_limit_mbps=2)  # runs long enough to be watched
    session = ctl_raw.client().StartJob(api.StartJobRequest(name="jobs/job1"))
    reader_ch, reader = _stub(ctl_raw, "reader")
    op_ch, operator = _stub(ctl_raw, "operator")
    try:
        # Watches of a running session stay open: exactly PER_CLIENT places of the reader are taken.
        watches = [reader.WatchSession(api.WatchSessionRequest(name=session.name)) for _ in range(PER_CLIENT)]
        for w in watches:
            assert (await w.read()).name == session.name
        code, retry = await _outcome(reader.ListJobs(api.ListJobsRequest(), timeout=10))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and retry == "1000", (code, retry)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await reader.GetJob(api.GetJobRequest(name="jobs/job1"), timeout=10)
        assert "retry in 1 s" in (err.value.details() or "")
        one_more = reader.WatchSession(api.WatchSessionRequest(name=session.name), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await one_more.read()
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        # Another certificate is not held up by the reader's, nor is the health check.
        assert (await operator.GetJob(api.GetJobRequest(name="jobs/job1"), timeout=10)).name == "jobs/job1"
        for w in watches:
            w.cancel()
        deadline = time.monotonic() + 10  # the places come back as the server sees the cancels
        while (
            code := (await _outcome(reader.ListJobs(api.ListJobsRequest(), timeout=10)))[0]
        ) is not grpc.StatusCode.OK:
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, code
            await asyncio.sleep(0.1)
        await operator.StopJob(api.StopJobRequest(name="jobs/job1"), timeout=10)
    finally:
        await reader_ch.close()
        await op_ch.close()


async def _flood(address: str, certs: str, n: int) -> dict[str, int]:
    channel = secure_channel(address, tls_settings(Path(certs), "reader"), max_message_bytes=64 << 20)
    stub = controller_pb2_grpc.ControllerServiceStub(channel)
    calls = [_outcome(stub.ListSessions(api.ListSessionsRequest(page_size=1000), timeout=60)) for _ in range(n)]
    outcomes = await asyncio.gather(*calls)
    await channel.close()
    summary: dict[str, int] = {}
    for code, retry in outcomes:
        key = code.name if code is not grpc.StatusCode.RESOURCE_EXHAUSTED else f"{code.name}:{retry}"
        summary[key] = summary.get(key, 0) + 1
    return summary


def flood_main() -> None:
    """The flooding client, as a process of its own (its CPU is not the test's): address, certs dir, n."""
    print(json.dumps(asyncio.run(_flood(sys.argv[1], sys.argv[2], int(sys.argv[3])))))


async def test_a_flood_of_reads_does_not_starve_the_session_engine(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure(vms=("vm2",))
    ctl_raw.controller.stop()
    _seed_sessions(ctl_raw.work / "controller" / "controller.db", "job1", 300)
    ctl_raw.restart_controller(api_calls_per_client=PER_CLIENT, api_calls_total=16)
    op_ch, operator = _stub(ctl_raw, "operator")
    flood = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from tests.integration.test_api_load import flood_main; flood_main()",
        ctl_raw.controller.address,
        str(ctl_raw.certs.directory),
        str(FLOOD),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        session = await operator.StartJob(api.StartJobRequest(name="jobs/job1"), timeout=10)
        started = time.monotonic()
        latencies = []
        while flood.returncode is None:
            t0 = time.monotonic()
            await operator.GetJob(api.GetJobRequest(name="jobs/job1"), timeout=30)
            latencies.append(time.monotonic() - t0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(flood.wait(), 0.05)
        out, _ = await asyncio.wait_for(flood.communicate(), 60)
        assert flood.returncode == 0
        codes = json.loads(out)
        assert sum(codes.values()) == FLOOD and set(codes) <= {"OK", "RESOURCE_EXHAUSTED:1000"}, codes
        assert codes.get("OK", 0) >= PER_CLIENT and codes.get("RESOURCE_EXHAUSTED:1000", 0) > 0, codes
        # Generous bounds for a loaded 2-core machine (GetJob takes ~10 ms, with the flood's burst of
        # arrivals now and then a second): without the bounds, the flood held GetJob past 30 s.
        assert max(latencies) < 10.0, latencies
        while (s := await operator.GetSession(api.GetSessionRequest(name=session.name), timeout=30)).state in (
            api.SESSION_STATE_RUNNING,
            api.SESSION_STATE_STOPPING,
        ):
            assert time.monotonic() - started < 30, "the session is held up by the flood"
            await asyncio.sleep(0.1)
        assert s.state == api.SESSION_STATE_SUCCEEDED, s.error
        page = await operator.ListSessions(api.ListSessionsRequest(page_size=1000), timeout=30)
        assert len(page.sessions) == 100 and page.sessions[0].name == session.name  # bounded, newest first
    finally:
        if flood.returncode is None:
            flood.kill()
            await flood.wait()
        await op_ch.close()


def test_a_session_started_between_two_pages_is_neither_repeated_nor_makes_one_skipped(
    ctl_raw: ControllerEnv,
) -> None:
    """Sessions list newest first, paged by key: the page after a token starts after that token's session,
    so one started meanwhile (newer than all) shifts nothing. Paged by offset, it would push the first
    page's last session onto the second page."""
    ctl_raw.configure(vms=("vm2",))
    ctl_raw.controller.stop()
    _seed_sessions(ctl_raw.work / "controller" / "controller.db", "job1", 7)
    ctl_raw.restart_controller()
    stub = ctl_raw.client()
    everything = [s.name for s in stub.ListSessions(api.ListSessionsRequest(page_size=100)).sessions]
    assert len(everything) == 7
    first = stub.ListSessions(api.ListSessionsRequest(page_size=3))
    started = stub.StartJob(api.StartJobRequest(name="jobs/job1"))
    seen, token = [s.name for s in first.sessions], first.next_page_token
    while token:
        page = stub.ListSessions(api.ListSessionsRequest(page_size=3, page_token=token))
        seen, token = seen + [s.name for s in page.sessions], page.next_page_token
    assert seen == everything, "each session once, in order, none left out"
    assert started.name not in seen  # newer than the first page: the next listing's first
    assert ctl_raw.wait_session(started.name).state == api.SESSION_STATE_SUCCEEDED
    newest = stub.ListSessions(api.ListSessionsRequest(page_size=3)).sessions
    assert [s.name for s in newest] == [started.name, *everything[:2]]
