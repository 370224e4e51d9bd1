import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from vmrepl.errors import PathError, TicketError
from vmrepl.names import check_name, check_relative, check_replica_path
from vmrepl.security.ticket import key_id, sign_ticket, verify_ticket

KEY = ed25519.Ed25519PrivateKey.generate()
KEYS = {key_id(KEY.public_key()): KEY.public_key()}
WANT: dict[str, Any] = {
    "session_id": "s1",
    "disk_id": "d1",
    "replica_path": "jobs/vm1",
    "audience": "target",
    "peer": "proxy-a",
    "checkpoint_id": "cp1",
}


def ticket(**over: object) -> bytes:
    args: dict[str, object] = {
        "session_id": "s1",
        "disk_id": "d1",
        "replica_path": "jobs/vm1",
        "checkpoint_id": "cp1",
        "proxy": "proxy-a",
        "expires_unix": time.time() + 60,
        "audience": "target",
    }
    args.update(over)
    key = args.pop("key", KEY)
    return sign_ticket(key, **args)  # type: ignore[arg-type]


def test_valid_ticket_verifies() -> None:
    t = verify_ticket(ticket(), KEYS, **WANT)
    assert t.session_id == "s1" and t.expires_unix > time.time()


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (lambda: ticket(key=ed25519.Ed25519PrivateKey.generate()), "unknown key"),
        (lambda: ticket(expires_unix=time.time() - 1), "expired"),
        (lambda: ticket(proxy="proxy-b"), "not for certificate 'proxy-a'"),
        (lambda: ticket(checkpoint_id="cp2"), "another checkpoint id"),
        (lambda: ticket(disk_id="d2"), "another disk id"),
        (lambda: ticket(session_id="s2"), "another session id"),
        (lambda: ticket(replica_path="jobs/vm2"), "another replica path"),
        (lambda: ticket(audience="other"), "another target"),
        (lambda: b"\x00garbage", "does not parse"),
        (lambda: b"x" * 5000, "too large"),
    ],
)
def test_bad_tickets_are_refused(blob, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TicketError, match=message):
        verify_ticket(blob(), KEYS, **WANT)


def test_a_ticket_names_its_proxy_and_checkpoint() -> None:
    with pytest.raises(TicketError, match="checkpoint and the proxy"):
        ticket(proxy="")
    with pytest.raises(TicketError, match="checkpoint and the proxy"):
        ticket(checkpoint_id="")


def test_tampered_ticket_fails_the_signature() -> None:
    from vmrepl.v1 import ticket_pb2

    signed = ticket_pb2.SignedTicket.FromString(ticket())
    inner = ticket_pb2.TransferTicket.FromString(signed.ticket)
    inner.disk_id = "d2"
    signed.ticket = inner.SerializeToString()
    with pytest.raises(TicketError, match="signature"):
        verify_ticket(signed.SerializeToString(), KEYS, **{**WANT, "disk_id": "d2"})


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "-x", "a b", "x" * 129, "é"])
def test_bad_names(bad: str) -> None:
    with pytest.raises(PathError):
        check_name("f", bad)


@pytest.mark.parametrize("bad", ["", "/abs", "a/../b", "a//b", "C:/x", "a\\b", "./a", "/".join("a" * 9)])
def test_bad_relative_paths(bad: str) -> None:
    with pytest.raises(PathError):
        check_relative("f", bad)


def test_a_replica_path_may_start_with_the_failback_folder_and_nothing_else_hidden() -> None:
    assert check_replica_path("f", ".failback/job1/vm1") == [".failback", "job1", "vm1"]
    assert check_replica_path("f", "jobs/vm1") == ["jobs", "vm1"]
    for bad in (".failback", ".failback/", ".failback/../x", ".failback/.mounts/x", ".mounts/x", "a/.failback/b"):
        with pytest.raises(PathError):
            check_replica_path("f", bad)


def test_datastore_refuses_symlink_escape(tmp_path: Path) -> None:
    from target_agent.datastore import Datastore

    root = tmp_path / "root"
    ds = Datastore(root)
    (tmp_path / "outside").mkdir()
    (root / "evil").symlink_to(tmp_path / "outside")
    with pytest.raises(PathError, match="outside the datastore"):
        ds.vm_dir("evil/vm1")
    assert ds.disk_dir("jobs/vm1", "disk0") == ds.root / "jobs" / "vm1" / "disks" / "disk0"
