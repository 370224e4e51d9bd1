"""Webhooks on session end: delivered once after a failed attempt, failure-only mode, token never shown."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from google.protobuf import field_mask_pb2

from tests.integration.controller_env import ControllerEnv
from vmrepl.v1 import controller_pb2 as api

pytestmark = pytest.mark.integration
TOKEN = "T0KEN-5ecret-in-the-path"


class Hook:
    """An HTTP endpoint that refuses its first POST with 503, then accepts; it records every attempt."""

    def __init__(self) -> None:
        self.attempts: list[tuple[int, dict[str, Any]]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = 503 if not hook.attempts else 200
                hook.attempts.append((status, body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/{TOKEN}"

    def delivered(self) -> list[dict[str, Any]]:
        return [b for status, b in self.attempts if status == 200]


def test_a_webhook_is_delivered_once_after_a_retry(ctl_raw: ControllerEnv) -> None:
    hook = Hook()
    ctl_raw.restart_controller(webhook_backoff_seconds=0.2)
    ctl_raw.configure(webhook=api.Webhook(url=hook.url))
    session = ctl_raw.run_job()
    deadline = time.monotonic() + 20
    while not hook.delivered():
        assert time.monotonic() < deadline, f"no delivery: {hook.attempts}"
        time.sleep(0.1)
    time.sleep(2)  # nothing more arrives
    assert [s for s, _ in hook.attempts] == [503, 200]
    body = hook.delivered()[0]
    assert body["session"] == session.name and body["job"] == "jobs/job1" and body["state"] == "succeeded"
    assert int(body["statistics"]["bytes_sent"]) > 0 and body["statistics"]["restore_points"] == 2

    job = ctl_raw.client().GetJob(api.GetJobRequest(name="jobs/job1"))
    assert job.webhook.url.startswith("http://127.0.0.1:") and TOKEN not in job.webhook.url
    assert TOKEN not in (ctl_raw.work / "controller.log").read_text()

    mask = field_mask_pb2.FieldMask(paths=["webhook"])
    failures_only = api.Job(name="jobs/job1", webhook=api.Webhook(url=hook.url, failures_only=True))
    ctl_raw.client().UpdateJob(api.UpdateJobRequest(job=failures_only, update_mask=mask))
    assert ctl_raw.run_job().state == api.SESSION_STATE_SUCCEEDED
    time.sleep(2)
    assert len(hook.attempts) == 2, "a succeeded session is not sent in failure-only mode"


WH_USER, WH_PASSWORD, WH_TOKEN = "hookuser-3c9e", "hookpw-5ecret-9f3a", "tok-5ecret-77b1"


class AuthHook:
    """An endpoint that accepts a POST only with the URL's basic-auth userinfo and query token."""

    def __init__(self) -> None:
        self.accepted: list[dict[str, Any]] = []
        self.refused = 0
        hook = self
        expected = "Basic " + base64.b64encode(f"{WH_USER}:{WH_PASSWORD}".encode()).decode()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ok = self.headers.get("Authorization") == expected and self.path == f"/notify?token={WH_TOKEN}"
                if ok:
                    hook.accepted.append(body)
                else:
                    hook.refused += 1
                self.send_response(200 if ok else 401)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        port = self.server.server_port
        self.url = f"http://{WH_USER}:{WH_PASSWORD}@127.0.0.1:{port}/notify?token={WH_TOKEN}"


def _leaks(data: bytes) -> list[str]:
    return [s for s in (WH_USER, WH_PASSWORD, WH_TOKEN) if s.encode() in data]


def test_webhook_userinfo_and_query_appear_in_no_reply_cli_output_log_or_file(ctl_raw: ControllerEnv) -> None:
    hook = AuthHook()
    ctl_raw.restart_controller(level="debug", webhook_backoff_seconds=0.2)
    ctl_raw.configure(vms=("vm2",))
    stub, reader = ctl_raw.client(), ctl_raw.client("reader")
    job = api.Job(
        host="hosts/lab",
        target="targets/target",
        replica_root="replicas/hooked",
        vms=[api.JobVm(vm="vm2")],
        webhook=api.Webhook(url=hook.url),
    )
    replies: list[Any] = [stub.CreateJob(api.CreateJobRequest(job_id="hooked", job=job))]
    session = ctl_raw.run_job("hooked")
    assert session.state == api.SESSION_STATE_SUCCEEDED, session.error
    deadline = time.monotonic() + 20
    while not hook.accepted:  # the notifier still uses the whole URL, credentials included
        assert time.monotonic() < deadline and not hook.refused, f"not delivered: refused {hook.refused}"
        time.sleep(0.1)
    assert hook.accepted[0]["session"] == session.name

    shown = reader.GetJob(api.GetJobRequest(name="jobs/hooked"))
    assert shown.webhook.url == f"http://127.0.0.1:{hook.server.server_port}/…", shown.webhook.url
    mask = field_mask_pb2.FieldMask(paths=["webhook"])
    # Sending back what a reply showed keeps the stored URL: a read-modify-write does not break delivery.
    back = api.Job(name="jobs/hooked", webhook=api.Webhook(url=shown.webhook.url, failures_only=True))
    replies.append(stub.UpdateJob(api.UpdateJobRequest(job=back, update_mask=mask)))
    replies += [
        shown,
        stub.GetJob(api.GetJobRequest(name="jobs/hooked")),
        reader.ListJobs(api.ListJobsRequest()),
        stub.ListJobs(api.ListJobsRequest()),
        reader.GetSession(api.GetSessionRequest(name=session.name)),
    ]
    for r in replies:
        assert not _leaks(r.SerializeToString()), r
    for args in (("job", "show", "hooked"), ("job", "show", "hooked", "--json"), ("job", "list", "--json")):
        out = ctl_raw.cli(*args)
        assert not _leaks((out.stdout + out.stderr).encode()), args
    reader_cli = ctl_raw.cli("--identity", "reader", "job", "show", "hooked", "--json")
    assert not _leaks(reader_cli.stdout.encode())

    ctl_raw.controller.stop()  # flush: every line the controller wrote at debug level, the database at rest
    debug_lines = ctl_raw.controller.events()
    assert any(e.get("level") == "debug" for e in debug_lines), "the controller did log at debug level"
    for f in ctl_raw.work.rglob("*"):
        if f.is_file():
            assert not _leaks(f.read_bytes()), f
