"""The target's files carry a format version: files written before versions (tests/fixtures/formats_v1,
written by the code of that time) still load, and a file from a newer vmrepl is refused, never misread."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from target_agent import replica, restore_points
from vmrepl.batch import DATA, PassDigest
from vmrepl.block import DIGEST_SIZE, digest
from vmrepl.errors import FailedPrecondition
from vmrepl.extent import MiB

FIXTURES = Path(__file__).parent.parent / "fixtures" / "formats_v1" / "vm"
BLOCK = bytes(range(256)) * (MiB // 256)  # block 0 of disk0 in the fixture


@pytest.fixture
def vm(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES, tmp_path / "vm"))


def test_format_1_disk_state_and_digests_load(vm: Path) -> None:
    st = replica.load_state(vm / "disks" / "disk0")
    assert (st.session_id, st.checkpoint_id, st.state, st.committed_offset) == ("s1", "cp1", "receiving", MiB)
    assert st.session_digest == PassDigest().add(0, MiB, DATA, digest(BLOCK))
    block_size, table = replica.read_digests(vm / "disks" / "disk0", 0, 0)
    assert block_size == MiB and table[:DIGEST_SIZE] == digest(BLOCK) and len(table) == 4 * DIGEST_SIZE
    fresh = replica.load_state(vm / "disks" / "disk1")  # a prepared disk: format 1 wrote "" as its digest
    assert (fresh.state, fresh.session_digest) == ("prepared", PassDigest())


def test_format_1_disk_resumes_and_is_rewritten_in_the_current_format(vm: Path) -> None:
    disk = vm / "disks" / "disk0"
    st = replica.prepare(
        disk, guard=replica.DiskGuard(), disk_size=4 * MiB, block_size=MiB, session_id="s1", checkpoint_id="cp1"
    )
    assert st.committed_offset == MiB and st.session_digest == PassDigest().add(0, MiB, DATA, digest(BLOCK))
    raw = json.loads((disk / replica.STATE_FILE).read_text())
    assert raw["format"] == replica.STATE_FORMAT and raw["digests_format"] == replica.DIGESTS_FORMAT
    assert replica.load_state(disk) == st
    assert replica.read_digests(disk, 0, 1)[1] == digest(BLOCK)  # below the committed offset: still vouched for


def test_format_1_restore_points_load_and_a_commit_rewrites_them(vm: Path) -> None:
    (p,) = restore_points.list_points(vm)
    assert (p.id, p.session_id, p.checkpoint_id, p.created_at) == ("0123456789abcdef" * 2, "s0", "cp0", 1700000000.5)
    assert [(d.disk_id, d.disk_size) for d in p.disks] == [("disk1", 4 * MiB)]
    st = replica.load_state(vm / "disks" / "disk1")
    st.session_id, st.checkpoint_id, st.state = "s2", "cp2", replica.COMPLETE
    replica.save_state(vm / "disks" / "disk1", st)
    restore_points.commit(
        vm, session_id="s2", checkpoint_id="cp2", disk_ids=["disk1"], guard=lambda _: replica.DiskGuard()
    )
    raw = json.loads((vm / restore_points.POINTS_FILE).read_text())
    assert raw["format"] == restore_points.POINTS_FORMAT
    assert [q.session_id for q in restore_points.list_points(vm)] == ["s0", "s2"]


def _rewrite(path: Path, **changes: object) -> None:
    raw = json.loads(path.read_text())
    if isinstance(raw, list):
        raw = {"restore_points": raw}
    path.write_text(json.dumps(raw | changes))


def test_a_disk_state_from_a_newer_vmrepl_is_refused(vm: Path) -> None:
    disk = vm / "disks" / "disk0"
    _rewrite(disk / replica.STATE_FILE, format=99)
    with pytest.raises(FailedPrecondition, match=r"format 99.*newer"):
        replica.load_state(disk)
    with pytest.raises(FailedPrecondition, match="format 99"):
        replica.prepare(
            disk, guard=replica.DiskGuard(), disk_size=4 * MiB, block_size=MiB, session_id="s1", checkpoint_id="cp1"
        )
    assert json.loads((disk / replica.STATE_FILE).read_text())["format"] == 99  # left as it was


def test_a_digest_store_from_a_newer_vmrepl_is_refused(vm: Path) -> None:
    disk = vm / "disks" / "disk0"
    _rewrite(disk / replica.STATE_FILE, format=replica.STATE_FORMAT, digests_format=7)
    with pytest.raises(FailedPrecondition, match=r"digests\.bin has format 7"):
        replica.read_digests(disk, 0, 0)
    with pytest.raises(FailedPrecondition, match=r"digests\.bin has format 7"):
        replica.ReplicaStream(
            disk, replica.DiskGuard(), session_id="s1", checkpoint_id="cp1", disk_size=4 * MiB, block_size=MiB,
            pass_number=0,
        )  # fmt: skip


def test_restore_points_from_a_newer_vmrepl_are_refused(vm: Path) -> None:
    _rewrite(vm / restore_points.POINTS_FILE, format=3)
    with pytest.raises(FailedPrecondition, match=r"format 3.*newer"):
        restore_points.list_points(vm)


@pytest.mark.parametrize("text", ['{"format": "2"}', '"a string"', '{"format": 2, "restore_points": [{"id": 1}]}'])
def test_restore_points_that_are_not_a_list_of_points_are_refused(vm: Path, text: str) -> None:
    (vm / restore_points.POINTS_FILE).write_text(text)
    with pytest.raises(FailedPrecondition, match=r"restore-points\.json"):
        restore_points.list_points(vm)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"committed_offset": "abc"}, "committed_offset is 'abc'"),
        ({"disk_size": None}, "disk_size is None"),
        ({"state": 5}, "state is 5"),
        ({"state": "exploded"}, "state is 'exploded', out of range"),
        ({"pass_number": "0"}, "pass_number is '0'"),
        ({"tracking_failed": "yes"}, "tracking_failed is 'yes'"),
        ({"committed_offset": 10**30}, "committed_offset is 1000000000000000000000000000000, out of range"),
        ({"block_size": 0}, "block_size is 0, out of range"),
        ({"disk_size": -1}, "disk_size is -1, out of range"),
        ({"frontier": 1.5}, "frontier is 1.5"),
        ({"session_digest": None}, "session_digest is None"),  # read as a zero digest before
        ({"session_digest": "zz"}, "session_digest: a pass digest is 32 hex digits"),
        # int(.., 16) took these as digests
        ({"session_digest": "0_" * 15 + "00"}, "session_digest: a pass digest is 32 hex digits"),
        ({"session_digest": " " + "f" * 30 + " "}, "session_digest: a pass digest is 32 hex digits"),
        ({"format": 10**400}, r"no valid format version|format 1000000000000000000000000000000000000\.\.\."),
    ],
)
def test_a_disk_state_of_wrong_types_or_ranges_is_refused_naming_the_file_and_left_alone(
    vm: Path, changes: dict[str, object], named: str
) -> None:
    """Found by planting such files: they loaded as they were, so a prepare then failed with a TypeError
    (an internal error) or, for a wrong size or state, silently started the disk afresh over them."""
    disk = vm / "disks" / "disk0"
    _rewrite(disk / replica.STATE_FILE, **changes)
    before = (disk / replica.STATE_FILE).read_bytes()
    with pytest.raises(FailedPrecondition, match=rf"replica disk disk0: state\.json.*({named})"):
        replica.load_state(disk)
    with pytest.raises(FailedPrecondition, match=r"state\.json"):
        replica.prepare(
            disk, guard=replica.DiskGuard(), disk_size=4 * MiB, block_size=MiB, session_id="s2", checkpoint_id="cp2"
        )
    assert (disk / replica.STATE_FILE).read_bytes() == before


@pytest.mark.parametrize(
    "point",
    [
        {"id": "p1", "session_id": "s", "created_at": 1, "disks": [{"disk_id": "d", "disk_size": "big"}]},
        {"id": "p1", "session_id": "s", "created_at": 1, "disks": [{"disk_id": 5, "disk_size": 1}]},
        {"id": "p1", "session_id": "s", "created_at": 1, "disks": [{"disk_id": "d", "disk_size": -1}]},
        {"id": "p1", "session_id": "s", "created_at": "nan", "disks": []},
    ],
)
def test_restore_points_with_values_of_the_wrong_type_are_refused_and_left_alone(
    vm: Path, point: dict[str, object]
) -> None:
    path = vm / restore_points.POINTS_FILE
    path.write_text(json.dumps({"format": restore_points.POINTS_FORMAT, "restore_points": [point]}))
    before = path.read_bytes()
    with pytest.raises(FailedPrecondition, match=r"restore-points\.json of vm holds something that is not a restore"):
        restore_points.list_points(vm)
    with pytest.raises(FailedPrecondition, match=r"restore-points\.json"):
        restore_points.commit(vm, session_id="s9", checkpoint_id="c9", disk_ids=[], guard=lambda _: replica.DiskGuard())
    assert path.read_bytes() == before


@pytest.mark.parametrize("key", ["disk_size", "block_size", "session_id", "state"])
def test_a_disk_state_missing_a_key_is_refused_naming_it(vm: Path, key: str) -> None:
    path = vm / "disks" / "disk0" / replica.STATE_FILE
    raw = json.loads(path.read_text())
    del raw[key]
    path.write_text(json.dumps(raw))
    with pytest.raises(FailedPrecondition, match=rf"replica disk disk0: state\.json: {key} is missing"):
        replica.load_state(vm / "disks" / "disk0")
    assert json.loads(path.read_text()) == raw
