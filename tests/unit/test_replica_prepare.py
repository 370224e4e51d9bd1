"""replica.prepare: which earlier transfer a session may continue."""

from __future__ import annotations

from pathlib import Path

from target_agent import replica
from vmrepl.extent import MiB


def _interrupted(disk_dir: Path, session_id: str, offset: int) -> None:
    replica.prepare(disk_dir, disk_size=8 * MiB, block_size=MiB, session_id=session_id)
    st = replica.load_state(disk_dir)
    st.state, st.committed_offset, st.session_digest = replica.RECEIVING, offset, "ab" * 16
    replica.save_state(disk_dir, st)


def test_same_session_keeps_offset(tmp_path: Path) -> None:
    _interrupted(tmp_path, "s1", 3 * MiB)
    st = replica.prepare(tmp_path, disk_size=8 * MiB, block_size=MiB, session_id="s1")
    assert (st.session_id, st.committed_offset) == ("s1", 3 * MiB)


def test_new_session_starts_at_zero(tmp_path: Path) -> None:
    _interrupted(tmp_path, "s1", 3 * MiB)
    st = replica.prepare(tmp_path, disk_size=8 * MiB, block_size=MiB, session_id="s2")
    assert (st.session_id, st.committed_offset, st.state) == ("s2", 0, replica.PREPARED)


def test_continuing_session_takes_over_offset_and_digest(tmp_path: Path) -> None:
    _interrupted(tmp_path, "s1", 3 * MiB)
    st = replica.prepare(tmp_path, disk_size=8 * MiB, block_size=MiB, session_id="s2", resume_session_id="s1")
    assert (st.session_id, st.committed_offset, st.session_digest) == ("s2", 3 * MiB, "ab" * 16)
    assert replica.load_state(tmp_path).session_id == "s2"  # durable, so a retried prepare of s2 keeps it too
    again = replica.prepare(tmp_path, disk_size=8 * MiB, block_size=MiB, session_id="s2", resume_session_id="s1")
    assert again.committed_offset == 3 * MiB


def test_continuing_another_session_or_geometry_starts_over(tmp_path: Path) -> None:
    _interrupted(tmp_path, "s1", 3 * MiB)
    st = replica.prepare(tmp_path, disk_size=8 * MiB, block_size=MiB, session_id="s3", resume_session_id="s0")
    assert st.committed_offset == 0
    _interrupted(tmp_path, "s4", 3 * MiB)
    st = replica.prepare(tmp_path, disk_size=16 * MiB, block_size=MiB, session_id="s5", resume_session_id="s4")
    assert st.committed_offset == 0
