"""Webhooks on session end: delivered once after a failed attempt, failure-only mode, token never shown."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from google.protobuf import field_mask_pb2

from protos.vmrepl.v1 import controller_pb2 as api
from tests.integration.controller_env import ControllerEnv

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
