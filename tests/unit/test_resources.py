"""The API's validation and conversions that need no database: webhook URLs, page tokens, paths."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from controller.api import paging, sessions_view
from controller.api import resources as res
from controller.api.resources import jobs as jobs_res
from controller.db.enums import TaskState, VmState
from controller.db.secrets import SecretBox
from controller.engine.runtime import replica_folder
from controller.observability.webhooks import redact_url
from vmrepl.errors import FailedPrecondition, InvalidArgument
from vmrepl.v1 import common_pb2
from vmrepl.v1 import controller_pb2 as api

HOOK_URL = "https://hookuser:hook-pw-1d7c@hooks.example:8443/notify/T0K-path?token=tok-q-5e2a"


def test_redacted_webhook_urls_show_scheme_host_and_port_only() -> None:
    cases = {
        HOOK_URL: "https://hooks.example:8443/…",
        "http://user@[::1]:81": "http://[::1]:81/…",
        "https://hooks.example": "https://hooks.example",
        "https://hooks.example/": "https://hooks.example",
        "https://hooks.example/?k=v": "https://hooks.example/…",
        "https://hooks.example#frag": "https://hooks.example/…",
        "https://h:99999/": "(unreadable URL)",
    }
    for url, shown in cases.items():
        assert redact_url(url) == shown, url


def test_a_webhook_is_stored_sealed_and_a_shown_url_sent_back_keeps_it() -> None:
    box = SecretBox([Fernet.generate_key()])
    stored = jobs_res._webhook(api.Webhook(url=HOOK_URL), box, current=None)
    assert box.open(stored["sealed_url"].encode()) == HOOK_URL and "tok-q" not in str(stored)
    again = jobs_res._webhook(api.Webhook(url=stored["shown_url"], failures_only=True), box, current=stored)
    assert again == {**stored, "failures_only": True}
    other = jobs_res._webhook(api.Webhook(url="http://other.example/x"), box, current=stored)
    assert box.open(other["sealed_url"].encode()) == "http://other.example/x"
    assert jobs_res._webhook(api.Webhook(), box, current=stored) == {}
    for bad in ("ftp://h/x", "https://h:99999/", "https://h/\x00", "http:///nohost", "https://h/" + "x" * 2048):
        with pytest.raises(InvalidArgument, match=r"^job\.webhook\.url:"):
            jobs_res._webhook(api.Webhook(url=bad), box, current=None)
    # A shown URL copied into another job (found in review): it would lose the credentials silently.
    with pytest.raises(InvalidArgument, match="redacted URL"):
        jobs_res._webhook(api.Webhook(url=stored["shown_url"]), box, current=None)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


def test_page_tokens_round_trip_and_anything_else_is_invalid_argument() -> None:
    from controller.api.base import BY_NAME, SESSIONS
    from controller.db.models import Job, Session

    t = dt.datetime(2026, 11, 30, 17, 1, 2, 345678, tzinfo=dt.UTC)  # as the database returns it: aware UTC
    token = SESSIONS.token(Session(started_at=t, id="ab12"))
    assert SESSIONS.parse(token) == [t, "ab12"]
    assert BY_NAME[Job].parse(BY_NAME[Job].token(Job(name="web"))) == ["web"]
    assert paging.line_offset(paging.line_token(42)) == 42 and paging.line_offset("") == 0
    bad = [
        "garbage",
        b64(b"o:" + b"9" * 40),  # an old offset token, past every integer type
        b64(b"\xff"),
        b64(json.dumps(["sessions", "not a time", "x"]).encode()),
        b64(json.dumps(["sessions", t.isoformat()]).encode()),
        b64(json.dumps(["sessions", t.replace(tzinfo=None).isoformat(), "x"]).encode()),  # no offset: no reply's
        b64(json.dumps(["jobs", "web"]).encode()),  # another list's token
        b64(json.dumps(["sessions", 5, "x"]).encode()),
        b64(json.dumps(["sessions", "0001-01-01T00:00:00+14:00", "x"]).encode()),  # no UTC time: OverflowError
        b64(json.dumps(["sessions", "9999-12-31T23:59:59-14:00", "x"]).encode()),
        "A" * 2000,
    ]
    for token in bad:
        with pytest.raises(InvalidArgument, match=r"^page_token:"):
            SESSIONS.parse(token)
    for token in (b64(json.dumps(["line", 10**40]).encode()), b64(json.dumps(["line", -1]).encode()), bad[0]):
        with pytest.raises(InvalidArgument, match=r"^page_token:"):
            paging.line_offset(token)
    with pytest.raises(InvalidArgument, match=r"^page_size:"):
        paging.page_size(-1)
    assert paging.page_size(0) == paging.DEFAULT_PAGE and paging.page_size(10**9) == paging.MAX_PAGE
    assert paging.page_size(10**9, paging.MAX_SESSION_PAGE) == 100


def test_replica_roots_overlap_when_one_is_the_other_or_inside_it() -> None:
    assert res.roots_overlap("replicas/web", "replicas/web")
    assert res.roots_overlap("replicas/web", "Replicas/WEB")  # a Windows target ignores case
    assert res.roots_overlap("replicas", "replicas/web")
    assert res.roots_overlap("replicas/web/sql", "replicas/web")
    assert not res.roots_overlap("replicas/web", "replicas/web2")
    assert not res.roots_overlap("replicas/web", "archive/web")


def test_a_file_hosts_folder_is_an_existing_folder_outside_the_systems(tmp_path: Path) -> None:
    (tmp_path / "hosts").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "to-etc").symlink_to("/etc")
    assert res.check_host_folder("host.address", str(tmp_path / "hosts")) == str(tmp_path / "hosts")
    bad = {
        "/": "root of the file system",
        "/etc": "system folder /etc",
        "/usr/share": "system folder /usr",
        "/dev/null": "not a folder",
        "/tmp": "a system folder",
        str(tmp_path / "file"): "not a folder",
        str(tmp_path / "missing"): "not a folder",
        str(tmp_path / "to-etc"): "system folder /etc",  # followed
        "relative/hosts": "absolute",
        f"{tmp_path}/hosts\x00": "NUL",
    }
    for address, why in bad.items():
        with pytest.raises(InvalidArgument, match=r"^host\.address: ") as err:
            res.check_host_folder("host.address", address)
        assert why in str(err.value), (address, str(err.value))


def test_a_replica_folder_is_the_vm_id_as_one_plain_name() -> None:
    assert replica_folder("5f0c1c1e-3b7e-4e55-9d0e-0c3e4f1a2b3c") == "5f0c1c1e-3b7e-4e55-9d0e-0c3e4f1a2b3c"
    for vm_id in ("evil/nested", "..", ".", "", "a\\b", "/abs", "x" * 129):
        with pytest.raises(FailedPrecondition, match="cannot name a replica folder"):
            replica_folder(vm_id)


def test_every_vm_and_disk_state_of_the_engine_is_one_api_enum_value_and_back() -> None:
    assert set(sessions_view.VM_STATES) == {s.value for s in VmState}
    assert set(sessions_view.VM_STATES.values()) == set(api.VmState.values()) - {api.VM_STATE_UNSPECIFIED}
    assert set(sessions_view.TASK_STATES) == {s.value for s in TaskState}
    all_tasks = set(api.DiskTaskState.values()) - {api.DISK_TASK_STATE_UNSPECIFIED}
    assert set(sessions_view.TASK_STATES.values()) == all_tasks


def test_guest_processing_and_exclusions_are_stored_as_json_and_read_back_typed() -> None:
    guest = api.GuestProcessing(enabled=True, credential="credentials/guest", ignore_failures=True)
    exclusions = common_pb2.GuestExclusions(skip_swap=True, skip_deleted=True, guest_paths=["/tmp", "C:\\temp"])
    for msg in (guest, exclusions):
        stored = jobs_res.settings_json(msg)
        assert json.loads(json.dumps(stored)) == stored  # a plain JSON object, by the proto field names
        assert jobs_res.settings_message(type(msg), stored) == msg
    assert jobs_res.settings_json(api.GuestProcessing()) == {}
    # A row from when any JSON object was taken: what the message lacks was never read, and is left out.
    old = jobs_res.settings_message(api.GuestProcessing, {"enabled": True, "vss_mode": "full"})
    assert old == api.GuestProcessing(enabled=True)
    assert jobs_res.settings_message(api.GuestProcessing, {"enabled": "sometimes"}) == api.GuestProcessing()
