"""The VM configuration kept with each restore point: CommitRestorePoint stores it beside restore-points.json
(configurations/<point id>.bin, durable before the record that names it), ListRestorePoints and the commit's
reply return it, retention deletes it with its point, a retried commit answers the same point, and a power cut
never leaves a listed point without its configuration (the target's own code under vmrepl.disk.powercut)."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import grpc
import pytest

from target_agent import replica, restore_points, vm_replica
from target_agent.datastore import Datastore
from target_agent.servicer import TargetAgentServicer
from tests.support import powerloss
from tests.support.points import BS, REPLICA_PATH, Aborted, FakeContext, servicer
from tests.support.powerloss import Run, Session
from vmrepl.batch import DecodedBatch, DecodedExtent, PassDigest
from vmrepl.block import digest
from vmrepl.disk import powercut
from vmrepl.disk.fileio import PositionalFile, atomic_write, rename
from vmrepl.domain import MAX_VM_CONFIGURATION
from vmrepl.errors import FailedPrecondition
from vmrepl.v1 import common_pb2, target_pb2

SIZE = 8 * BS


def config(name: str, size: int = 3000) -> bytes:
    """A Hyper-V style configuration (JSON, non-ASCII names included), padded to `size` bytes."""
    doc = {"name": name, "generation": 2, "secure_boot": True, "nics": [{"switch": "Externe Verbindung é"}]}
    raw = json.dumps(doc, ensure_ascii=False).encode()
    return raw + b" " * (size - len(raw))


def complete(s: TargetAgentServicer, session: str) -> None:
    """A session's transfer of disk0 reached the end of the disk (not yet a restore point)."""
    vm, disk = s.datastore.vm_dir(REPLICA_PATH), s.datastore.disk_dir(REPLICA_PATH, "disk0")
    cp = f"cp-{session}"
    vm_replica.prepare_disk(
        vm, disk, guards=s.receiver.guard, disk_size=SIZE, block_size=BS, session_id=session, checkpoint_id=cp
    )
    stream = replica.ReplicaStream(
        disk, s.receiver.guard(disk), session_id=session, checkpoint_id=cp, disk_size=SIZE, block_size=BS, pass_number=0
    )
    try:
        block = random.Random(session).randbytes(BS)
        ext = DecodedExtent(0, BS, digest(block), block)
        stream.apply(DecodedBatch(0, SIZE, True, [ext], PassDigest(), BS))
        stream.commit(stream.mark(SIZE, final=True))
    finally:
        stream.close()


async def commit(s: TargetAgentServicer, session: str, configuration: bytes = b"") -> target_pb2.RestorePoint:
    request = target_pb2.CommitRestorePointRequest(
        replica_path=REPLICA_PATH,
        session_id=session,
        checkpoint_id=f"cp-{session}",
        disk_ids=["disk0"],
        consistency=common_pb2.CONSISTENCY_CRASH,
        vm_configuration=configuration,
    )
    return await s.CommitRestorePoint(request, FakeContext())  # type: ignore[arg-type]


async def listed(s: TargetAgentServicer) -> list[tuple[str, bytes]]:
    reply = await s.ListRestorePoints(target_pb2.ListRestorePointsRequest(replica_path=REPLICA_PATH), FakeContext())  # type: ignore[arg-type]
    return [(p.session_id, p.vm_configuration) for p in reply.restore_points]


def config_files(s: TargetAgentServicer) -> list[str]:
    folder = s.datastore.vm_dir(REPLICA_PATH) / restore_points.CONFIG_DIR
    return sorted(os.listdir(folder)) if folder.is_dir() else []


async def test_each_point_keeps_its_configuration_beside_the_list(tmp_path: Path) -> None:
    s = servicer(tmp_path)
    big = config("web01", MAX_VM_CONFIGURATION)  # exactly the limit
    replies = {}
    for session, cfg in (("s1", config("web01")), ("s2", b""), ("s3", big)):
        complete(s, session)
        replies[session] = await commit(s, session, cfg)
        assert replies[session].vm_configuration == cfg
    assert await listed(s) == [("s1", config("web01")), ("s2", b""), ("s3", big)]
    ids = {sid: r.id for sid, r in replies.items()}
    assert config_files(s) == sorted([f"{ids['s1']}.bin", f"{ids['s3']}.bin"])  # none for a point without one
    points_file = s.datastore.vm_dir(REPLICA_PATH) / restore_points.POINTS_FILE
    assert points_file.stat().st_size < 4096  # the list names the files; it does not hold them
    # A restarted target reads the same from the files.
    again = servicer(tmp_path)
    assert await listed(again) == await listed(s)


async def test_a_retried_commit_answers_the_same_point_and_configuration(tmp_path: Path) -> None:
    s = servicer(tmp_path)
    complete(s, "s1")
    first = await commit(s, "s1", config("web01"))
    assert await commit(s, "s1", config("web01")) == first
    # A retry that captured the configuration again (and got other bytes) gets the point as committed.
    assert (await commit(s, "s1", config("web01-recaptured"))).vm_configuration == config("web01")
    assert await listed(s) == [("s1", config("web01"))] and len(config_files(s)) == 1


async def test_a_configuration_past_the_limit_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    s = servicer(tmp_path)
    complete(s, "s1")
    with pytest.raises(Aborted) as e:
        await commit(s, "s1", bytes(MAX_VM_CONFIGURATION + 1))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "vm_configuration" in e.value.details
    assert await listed(s) == [] and config_files(s) == []
    assert replica.load_state(s.datastore.disk_dir(REPLICA_PATH, "disk0")).state == replica.COMPLETE
    assert (await commit(s, "s1", b"{}")).vm_configuration == b"{}"  # the session can still commit


async def test_retention_deletes_the_configuration_with_its_point(tmp_path: Path) -> None:
    s = servicer(tmp_path)
    ids = {}
    for session in ("s1", "s2", "s3", "s4"):
        complete(s, session)
        ids[session] = (await commit(s, session, config(session))).id
    vm = s.datastore.vm_dir(REPLICA_PATH)
    restore_points.delete(vm, ids["s1"], guard=s.receiver.guard)  # the oldest
    restore_points.delete(vm, ids["s3"], guard=s.receiver.guard)  # between others: its rollback data folded
    assert await listed(s) == [("s2", config("s2")), ("s4", config("s4"))]
    assert config_files(s) == sorted([f"{ids['s2']}.bin", f"{ids['s4']}.bin"])


async def test_files_no_point_names_are_dropped_at_the_next_commit(tmp_path: Path) -> None:
    """What a crash between the configuration's write and the list's leaves (and a cut temporary)."""
    s = servicer(tmp_path)
    complete(s, "s1")
    kept = (await commit(s, "s1", config("s1"))).id
    folder = s.datastore.vm_dir(REPLICA_PATH) / restore_points.CONFIG_DIR
    (folder / "0123456789abcdef0123456789abcdef.bin").write_bytes(config("lost"))
    (folder / "0123456789abcdef0123456789abcdef.bin.tmp").write_bytes(b"torn")
    complete(s, "s2")
    new = (await commit(s, "s2", config("s2"))).id
    assert config_files(s) == sorted([f"{kept}.bin", f"{new}.bin"])


async def test_a_configuration_changed_on_disk_or_in_the_list_is_refused(tmp_path: Path) -> None:
    s = servicer(tmp_path)
    complete(s, "s1")
    p = await commit(s, "s1", config("s1"))
    vm = s.datastore.vm_dir(REPLICA_PATH)
    path = restore_points.configuration_file(vm, p.id)
    path.write_bytes(config("s1").replace(b"web", b"WEB").replace(b"s1", b"S1"))  # same size, other bytes
    with pytest.raises(Aborted) as e:
        await listed(s)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "not the one committed" in e.value.details
    path.unlink()
    with pytest.raises(Aborted, match="is missing"):
        await listed(s)
    doc = json.loads((vm / restore_points.POINTS_FILE).read_bytes())
    doc["restore_points"][0]["configuration_sha256"] = "../../etc"
    (vm / restore_points.POINTS_FILE).write_text(json.dumps(doc))
    with pytest.raises(FailedPrecondition, match="configuration_sha256"):
        restore_points.list_points(vm)
    doc["restore_points"][0].update(configuration_sha256="", configuration_size=5)
    (vm / restore_points.POINTS_FILE).write_text(json.dumps(doc))
    with pytest.raises(FailedPrecondition, match="configuration_sha256"):
        restore_points.list_points(vm)


async def test_a_linked_configurations_folder_is_refused(tmp_path: Path) -> None:
    s = servicer(tmp_path)
    complete(s, "s1")
    await commit(s, "s1", config("s1"))
    vm = s.datastore.vm_dir(REPLICA_PATH)
    elsewhere = tmp_path / "elsewhere"
    (vm / restore_points.CONFIG_DIR).rename(elsewhere)
    (vm / restore_points.CONFIG_DIR).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(Aborted, match="configurations is a symbolic link"):
        await listed(s)


# --- power cuts ---

CUT_BS = 32 * 1024
CUT_SIZE = 24 * CUT_BS


class ConfigRun(Run):
    """powerloss.Run whose commits keep a configuration per session."""

    configs: dict[str, bytes]

    def commit_point(self, s: Session) -> None:
        self._note("point started", s)
        restore_points.commit(
            self.vm_dir,
            session_id=s.session_id,
            checkpoint_id=s.checkpoint_id,
            disk_ids=[powerloss.DISK_ID],
            guard=lambda _: self.guard,
            vm_configuration=self.configs[s.session_id],
        )
        self._note("point", s)


def record(root: Path, rng: random.Random) -> tuple[powercut.OpLog, ConfigRun]:
    """Three sessions with configurations (the last one's 1 MiB, many pages), retention deleting the first."""
    images = [rng.randbytes(CUT_SIZE) for _ in range(3)]
    sessions = [Session(f"s{i}", f"cp{i}", image) for i, image in enumerate(images, 1)]
    with powercut.recording(root) as rec:
        run = ConfigRun(root, rec, disk_size=CUT_SIZE, block_size=CUT_BS)
        run.configs = {"s1": config("s1"), "s2": config("s2", 9000), "s3": rng.randbytes(MAX_VM_CONFIGURATION)}
        base = None
        for s in sessions:
            run.prepare(s)
            run.transfer(s, base=base, batch_blocks=4, commit_every=2)
            run.commit_point(s)
            base = s.image
        run.delete_point(sessions[0])
    return rec.log(), run


def configuration_problems(dest: Path, run: ConfigRun) -> list[str]:
    """Every point a restarted target lists has exactly the configuration its commit was given."""
    vm = Datastore(dest).vm_dir(powerloss.REPLICA_PATH)
    problems = []
    for p in restore_points.list_points(vm):
        try:
            got = restore_points.read_configuration(vm, p)
        except FailedPrecondition as e:
            problems.append(f"point of {p.session_id}: {e}")
            continue
        if got != run.configs[p.session_id]:
            problems.append(f"point of {p.session_id} lists another configuration")
    return problems


def cut_all(tmp_path: Path, seed: int, n: int) -> tuple[list[str], int]:
    rng = random.Random(seed)
    root = tmp_path / "datastore"
    root.mkdir()
    log, run = record(root, rng)
    problems: list[str] = []
    cuts = powercut.cut_points(log, rng, n)
    for upto in cuts:
        dest = tmp_path / "cut"
        powercut.crash_state(log, upto, random.Random(f"{seed}-{upto}")).materialise(dest)
        found = powerloss.check_datastore(dest, run.expected(upto))
        problems += [f"cut after op {upto}: {p}" for p in found.problems + configuration_problems(dest, run)]
        shutil.rmtree(dest)
    return problems, len(cuts)


def test_power_cuts_never_leave_a_listed_point_without_its_configuration(tmp_path: Path) -> None:
    seed = int(os.environ.get("VMREPL_POWERLOSS_SEED") or random.SystemRandom().randrange(1, 1 << 31))
    problems, cuts = cut_all(tmp_path, seed, 200)
    assert cuts >= 200
    assert not problems, f"VMREPL_POWERLOSS_SEED={seed}:\n" + "\n".join(problems[:10])


def test_the_check_catches_a_configuration_written_without_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The harness can fail: a configuration renamed into place without an fsync of its data leaves listed
    points whose configuration a power cut lost or tore."""
    durable = atomic_write

    def careless(path: Path, data: bytes) -> None:
        if path.parent.name != restore_points.CONFIG_DIR:
            durable(path, data)
            return
        tmp = path.with_name(path.name + ".tmp")
        f = PositionalFile(tmp, writable=True, create=True)
        try:
            f.write(data, 0)
        finally:
            f.close()
        rename(tmp, path)  # durable as a name (it syncs the folder), but the data was never flushed

    monkeypatch.setattr(restore_points, "atomic_write", careless)
    seed = int(os.environ.get("VMREPL_POWERLOSS_SEED") or random.SystemRandom().randrange(1, 1 << 31))
    problems, _ = cut_all(tmp_path, seed, 60)
    assert any("configuration" in p for p in problems), f"seed {seed}: {problems[:5]}"
