"""A client in another language (Node.js: @grpc/grpc-js with @grpc/proto-loader, tests/node/job_client.js)
against a real controller: it compiles the .proto files with protos/ as its only include path, sends a
job's schedule, guest processing and exclusions as plain objects, and reads them back unchanged."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from controller.scheduling.schedule import schedule_json
from tests.conftest import need_tool
from tests.integration.controller_env import ControllerEnv
from vmrepl.v1 import controller_pb2 as api

pytestmark = pytest.mark.integration
NODE_DIR = Path(__file__).resolve().parents[1] / "node"

SCHEDULE = {
    "kind": "SCHEDULE_KIND_CRON",
    "cron": "30 22 * * 1-5",
    "timezone": "Europe/Berlin",
    "permitted": {
        "mon": [{"start_hour": 0, "end_hour": 6}, {"start_hour": 20, "end_hour": 24}],
        "sat": [{"start_hour": 0, "end_hour": 24}],
    },
    "enforce_window": False,
}
GUEST = {"enabled": True, "ignore_failures": True}
EXCLUSIONS = {"skip_pagefile": True, "guest_paths": ["C:\\temp"]}


def _node_client(ctl: ControllerEnv, job_id: str, request: dict[str, Any]) -> dict[str, Any]:
    node = need_tool("node")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        message = f"run `npm ci` in {NODE_DIR} (.ci/run does)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    out = subprocess.run(
        [node, str(NODE_DIR / "job_client.js"), ctl.controller.address, str(ctl.certs.directory), job_id],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    reply: dict[str, Any] = json.loads(out.stdout)
    return reply


def _as_read(value: Any) -> Any:
    """A message as a proto3 reader that fills no defaults shows it: a zero is not on the wire."""
    if isinstance(value, dict):
        return {k: _as_read(v) for k, v in value.items() if v != 0 or isinstance(v, bool)}
    return [_as_read(v) for v in value] if isinstance(value, list) else value


def test_a_node_client_sets_a_schedule_and_reads_it_back(ctl_raw: ControllerEnv) -> None:
    ctl_raw.configure()  # the target, proxy and host the job names
    job = {
        "host": "hosts/lab",
        "target": "targets/target",
        "replica_root": "replicas/nightly",
        "vms": [{"vm": "vm1"}],
        "schedule": SCHEDULE,
        "guest_processing": GUEST,
        "exclusions": EXCLUSIONS,
    }
    # The JSON grammar's kind name where the enum's belongs: its library sends the kind unspecified.
    bad_job = {**job, "replica_root": "replicas/bad", "schedule": {"kind": "cron", "cron": "0 22 * * *"}}
    reply = _node_client(ctl_raw, "nightly", {"job": job, "bad_job": bad_job})

    for seen in (reply["created"], reply["read"]):
        assert seen["schedule"] == _as_read(SCHEDULE)
        assert seen["guest_processing"] == GUEST and seen["exclusions"] == EXCLUSIONS
    assert reply["bad"]["code"] == "INVALID_ARGUMENT" and "job.schedule.kind" in reply["bad"]["details"], reply
    # What the controller stored is the schedule its scheduler runs, as the Python client sees it too.
    stored = ctl_raw.client().GetJob(api.GetJobRequest(name="jobs/nightly")).schedule
    assert schedule_json(stored) == {
        "kind": "cron",
        "cron": "30 22 * * 1-5",
        "timezone": "Europe/Berlin",
        "permitted": {"mon": [[0, 6], [20, 24]], "sat": [[0, 24]]},
        "enforce_window": False,
    }
