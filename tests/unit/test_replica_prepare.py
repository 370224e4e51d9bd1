"""replica.prepare and the stream checks: which earlier transfer a session may continue, and what a
crash leaves uncertain."""

from __future__ import annotations

from pathlib import Path

import pytest

from target_agent import replica
from tests import frames
from vmrepl.batch import PassDigest
from vmrepl.block import DIGEST_SIZE, UNKNOWN_DIGEST
from vmrepl.errors import FailedPrecondition, TransferCancelled
from vmrepl.extent import MiB

SIZE = 8 * MiB


def _prepare(disk_dir: Path, session_id: str, checkpoint_id: str = "cp1", **kw: object) -> replica.DiskState:
    guard = kw.pop("guard", None) or replica.DiskGuard()
    return replica.prepare(
        disk_dir, guard=guard, disk_size=kw.pop("disk_size", SIZE), block_size=MiB,  # type: ignore[arg-type]
        session_id=session_id, checkpoint_id=checkpoint_id, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def _interrupted(disk_dir: Path, session_id: str, offset: int, *, frontier: int = -1, pass_number: int = 0) -> None:
    _prepare(disk_dir, session_id)
    st = replica.load_state(disk_dir)
    st.state, st.committed_offset, st.session_digest = replica.RECEIVING, offset, PassDigest(0xAB)
    st.frontier, st.pass_number = frontier, pass_number
    replica.save_state(disk_dir, st)


def _write_digests(disk_dir: Path, value: bytes) -> None:
    (disk_dir / replica.DIGESTS_FILE).write_bytes(value * (SIZE // MiB))


def _digests(disk_dir: Path) -> list[bytes]:
    raw = (disk_dir / replica.DIGESTS_FILE).read_bytes()
    return [raw[i : i + DIGEST_SIZE] for i in range(0, len(raw), DIGEST_SIZE)]


def test_same_session_and_checkpoint_keeps_offset(tmp_path: Path) -> None:
    _interrupted(tmp_path, "s1", 3 * MiB)
    st = _prepare(tmp_path, "s1")
    assert (st.session_id, st.committed_offset) == ("s1", 3 * MiB)


def test_same_session_with_a_new_checkpoint_starts_a_new_pass_at_zero(tmp_path: Path) -> None:
    # A VM retried within its session takes a new checkpoint: the first attempt's offset is worthless.
    _interrupted(tmp_path, "s1", 3 * MiB)
    st = _prepare(tmp_path, "s1", "cp2")
    assert (st.committed_offset, st.state, st.checkpoint_id, st.session_digest) == (
        0,
        replica.PREPARED,
        "cp2",
        PassDigest(),
    )


def test_a_complete_disk_prepared_for_a_new_checkpoint_starts_over(tmp_path: Path) -> None:
    _interrupted(tmp_path, "s1", SIZE)
    st = replica.load_state(tmp_path)
    st.state = replica.COMPLETE
    replica.save_state(tmp_path, st)
    again = _prepare(tmp_path, "s1", "cp2")
    assert (again.committed_offset, again.state) == (0, replica.PREPARED)


def test_new_session_starts_at_zero(tmp_path: Path) -> None:
    _interrupted(tmp_path, "s1", 3 * MiB)
    st = _prepare(tmp_path, "s2")
    assert (st.session_id, st.committed_offset, st.state) == ("s2", 0, replica.PREPARED)


def test_continuing_session_takes_over_offset_and_digest(tmp_path: Path) -> None:
    _interrupted(tmp_path, "s1", 3 * MiB)
    st = _prepare(tmp_path, "s2", resume_session_id="s1")
    assert (st.session_id, st.committed_offset, st.session_digest) == ("s2", 3 * MiB, PassDigest(0xAB))
    assert replica.load_state(tmp_path).session_id == "s2"  # durable, so a retried prepare of s2 keeps it too
    again = _prepare(tmp_path, "s2", resume_session_id="s1")
    assert again.committed_offset == 3 * MiB


def test_continuing_from_another_checkpoint_starts_over(tmp_path: Path) -> None:
    _interrupted(tmp_path, "s1", 3 * MiB)
    st = _prepare(tmp_path, "s2", "cp9", resume_session_id="s1")
    assert st.committed_offset == 0


def test_a_held_checkpoint_is_continued_whichever_session_held_it_last_but_not_another_geometry(
    tmp_path: Path,
) -> None:
    """The checkpoint names the transfer: a session holding it whose prepares never reached the target (it
    was down) hands the hold on, so the session id a continuing prepare names may be one the target never
    saw. Starting over there would leave a disk the controller counts as done with the point's bytes."""
    _interrupted(tmp_path, "s1", 3 * MiB)
    st = _prepare(tmp_path, "s3", resume_session_id="s2")  # s2 held cp1 but never reached the target
    assert (st.session_id, st.committed_offset) == ("s3", 3 * MiB)
    assert _prepare(tmp_path, "s4", "cp1").committed_offset == 0  # naming no held session: a restart
    _interrupted(tmp_path, "s4", 3 * MiB)
    st = _prepare(tmp_path, "s5", resume_session_id="s4", disk_size=16 * MiB)
    assert st.committed_offset == 0


def test_a_second_pass_is_never_continued(tmp_path: Path) -> None:
    # Pass 1 compares the whole disk after a failed verification; a new proxy transfer starts at pass 0.
    _interrupted(tmp_path, "s1", 3 * MiB, pass_number=1)
    assert _prepare(tmp_path, "s1").committed_offset == 0


def test_a_committed_session_is_never_prepared_again(tmp_path: Path) -> None:
    _interrupted(tmp_path, "s1", SIZE)
    st = replica.load_state(tmp_path)
    st.state = replica.COMMITTED
    replica.save_state(tmp_path, st)
    with pytest.raises(FailedPrecondition, match="never written again"):
        _prepare(tmp_path, "s1")
    assert _prepare(tmp_path, "s2").state == replica.PREPARED  # the next session is welcome


def test_prepare_forgets_digests_between_the_committed_offset_and_the_frontier(tmp_path: Path) -> None:
    _interrupted(tmp_path, "s1", 2 * MiB, frontier=5 * MiB)
    _write_digests(tmp_path, b"\x11" * DIGEST_SIZE)
    _prepare(tmp_path, "s2")  # a fresh session: only what the interrupted pass may have torn goes
    d = _digests(tmp_path)
    assert d[:2] == [b"\x11" * DIGEST_SIZE] * 2
    assert d[2:5] == [UNKNOWN_DIGEST] * 3
    assert d[5:] == [b"\x11" * DIGEST_SIZE] * 3
    assert replica.load_state(tmp_path).frontier == 0


def test_resuming_forgets_the_uncertain_tail_too(tmp_path: Path) -> None:
    _interrupted(tmp_path, "s1", 2 * MiB, frontier=4 * MiB)
    _write_digests(tmp_path, b"\x22" * DIGEST_SIZE)
    st = _prepare(tmp_path, "s1")
    assert (st.committed_offset, st.frontier) == (2 * MiB, 2 * MiB)
    assert _digests(tmp_path)[2:4] == [UNKNOWN_DIGEST] * 2 and _digests(tmp_path)[4] == b"\x22" * DIGEST_SIZE


def test_a_state_without_a_frontier_forgets_everything_past_the_committed_offset(tmp_path: Path) -> None:
    _interrupted(tmp_path, "s1", 2 * MiB)  # frontier -1: written before frontiers existed
    _write_digests(tmp_path, b"\x33" * DIGEST_SIZE)
    _prepare(tmp_path, "s1")
    assert _digests(tmp_path)[2:] == [UNKNOWN_DIGEST] * 6


def _check(st: replica.DiskState, **over: object) -> None:
    args: dict[str, object] = {
        "session_id": "s1",
        "checkpoint_id": "cp1",
        "disk_size": SIZE,
        "block_size": MiB,
        "pass_number": 0,
    }
    args.update(over)
    replica.check_stream(st, "disk0", **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "pass_number", "over", "message"),
    [
        (replica.RECEIVING, 0, {"checkpoint_id": "cp2"}, "only from its own checkpoint"),
        (replica.RECEIVING, 0, {"session_id": "s2"}, "not prepared for session s2"),
        (replica.COMMITTED, 0, {}, "restore point holds"),
        (replica.COMPLETE, 0, {"pass_number": 2}, "past the last pass"),
        (replica.COMPLETE, 0, {"pass_number": 2**32 - 1}, "past the last pass"),
        (replica.RECEIVING, 0, {"pass_number": 1}, "only a complete pass 0"),
        (replica.COMPLETE, 1, {"pass_number": 0}, "older than"),
    ],
)
def test_streams_the_disk_refuses(state: str, pass_number: int, over: dict[str, object], message: str) -> None:
    st = replica.DiskState(SIZE, MiB, "s1", state, checkpoint_id="cp1", pass_number=pass_number)
    with pytest.raises(FailedPrecondition, match=message):
        _check(st, **over)


def test_the_next_pass_follows_a_complete_one() -> None:
    _check(replica.DiskState(SIZE, MiB, "s1", replica.COMPLETE, checkpoint_id="cp1"), pass_number=1)
    _check(replica.DiskState(SIZE, MiB, "s1", replica.RECEIVING, checkpoint_id="cp1", pass_number=1), pass_number=1)


def test_a_prepare_stops_a_stream_still_open_on_the_disk(tmp_path: Path) -> None:
    """An earlier attempt's stream writes nothing once the disk is prepared again: its writes would lie past
    the frontier the prepare recorded."""
    guard = replica.DiskGuard()
    _prepare(tmp_path, "s1", guard=guard)
    stream = replica.ReplicaStream(
        tmp_path, guard, session_id="s1", checkpoint_id="cp1", disk_size=SIZE, block_size=MiB, pass_number=0
    )
    block = b"\x01" * MiB
    try:
        stream.apply(frames.decoded(0, [block], disk_size=SIZE, block_size=MiB))
        _prepare(tmp_path, "s1", guard=guard)
        with pytest.raises(TransferCancelled):
            stream.apply(frames.decoded(MiB, [block], disk_size=SIZE, block_size=MiB))
    finally:
        stream.close()
    assert _digests(tmp_path)[1] == UNKNOWN_DIGEST


def test_a_failed_verification_condemns_the_checkpoints_change_tracking(tmp_path: Path) -> None:
    _interrupted(tmp_path, "s1", 3 * MiB, pass_number=1)
    st = replica.load_state(tmp_path)
    st.tracking_failed = True  # pass 1 was opened: sampled verification failed
    replica.save_state(tmp_path, st)
    again = _prepare(tmp_path, "s1")  # a new transfer of the same checkpoint starts over ...
    assert (again.pass_number, again.committed_offset, again.tracking_failed) == (0, 0, True)  # ... distrusting
    assert _prepare(tmp_path, "s2", resume_session_id="s1").tracking_failed  # a continuing session too
    assert not _prepare(tmp_path, "s3", "cp2").tracking_failed  # another checkpoint: tracking is trusted again
