"""Chaos: sessions of a real controller, proxy and target, each hit at a random moment by a fault (kill -9
of one of the three, or a simulated power cut of the target, then a restart); random writes to the VMs
between sessions.

After every session, whatever its end: the restore points in the controller's database are the target's,
and a VM has a checkpoint exactly when the session holds it for a resume. After every session that
`succeeded`: each VM's replica equals its source at that session's checkpoint and no checkpoint is left.
No session may take longer than SESSION_BOUND. After the loop, a session without a fault must succeed.

The seed decides every choice (writes, fault, moment); processes' timing does not repeat, so a failure
replays as the same sequence of choices, not necessarily the same interleaving. Settings:
VMREPL_CHAOS_SECONDS (how long to start new steps, default 80) and VMREPL_CHAOS_SEED.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import random
import shutil
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from controller import lab
from tests.integration.controller_env import ControllerEnv
from tests.support.replicas import qemu_identical, sha256
from vmrepl.disk import powercut
from vmrepl.extent import MiB
from vmrepl.v1 import controller_pb2 as api
from vmrepl.v1 import target_pb2

pytestmark = pytest.mark.integration

CHAOS_SECONDS = float(os.environ.get("VMREPL_CHAOS_SECONDS", "80"))
SESSION_BOUND = 90.0  # seconds from StartJob to the session's end, fault and recovery included
FIRST_PACE = 1.5  # seconds: a session's length here before one has been measured (0.5-3 s, with the load)
BLOCK = 64 * 1024  # the job's block size: 128 blocks per 8 MiB disk, so verification samples a subset

# A fault strikes the running system and leaves it running again. It gets its own random stream, so what
# it draws does not shift the loop's choices.
Fault = Callable[[ControllerEnv, random.Random], None]


def kill_and_restart(which: str) -> Fault:
    def fault(env: ControllerEnv, rng: random.Random) -> None:
        agent: lab.AgentProcess = getattr(env, which)
        agent.kill()
        time.sleep(rng.uniform(0, 0.5))  # down for a moment
        agent.start()  # on the same port (pinned), as a service manager restarts it

    return fault


def power_cut_target(env: ControllerEnv, rng: random.Random) -> None:
    """kill -9 keeps the page cache; a power cut also loses a random subset of what the target had not made
    durable: file pages, creates, renames (vmrepl.disk.powercut)."""
    env.target.kill()
    powercut.cut(env.work / "powercut", rng)
    time.sleep(rng.uniform(0, 0.5))
    env.target.start()


FAULTS: dict[str, Fault] = {name: kill_and_restart(name) for name in ("controller", "proxy", "target")}
FAULTS["target power cut"] = power_cut_target


@dataclass
class Write:
    vm: str
    disk: str
    offset: int
    data: bytes = field(repr=False)
    tracked: bool  # through the provider (change tracking sees it), or behind its back into the image


@dataclass
class Step:
    number: int
    writes: list[Write]
    fault: str | None
    moment: float  # when the fault strikes, as a fraction of a session's usual length (Pace)
    fault_rng: random.Random
    skipped: list[Write] = field(default_factory=list)  # untracked writes not made: a checkpoint existed
    delay: float = 0.0  # seconds after StartJob the fault struck
    during: bool = False  # whether it struck before the session ended

    def label(self, seed: int) -> str:
        return f"chaos seed {seed} step {self.number} fault {self.fault or 'none'} after {self.delay:.2f}s"

    def outcome(self, session: api.Session) -> str:
        state = api.SessionState.Name(session.state).removeprefix("SESSION_STATE_").lower()
        return f"{self.fault or 'none'}{' during the session' if self.during else ''}: {state}"


@dataclass
class Pace:
    """A session's usual length on this machine now (the median of the last sessions no fault hit), so that
    the seed's moments land inside sessions whether the machine is idle or loaded."""

    lengths: list[float] = field(default_factory=lambda: [FIRST_PACE])

    def seconds(self, moment: float) -> float:
        recent = sorted(self.lengths[-5:])
        return moment * recent[len(recent) // 2]

    def measured(self, seconds: float) -> None:
        self.lengths.append(seconds)


def _writes(rng: random.Random, vm: str, disk: str, size: int) -> list[Write]:
    out = []
    for _ in range(rng.choice((0, 0, 1, 2, 4))):
        offset = rng.randrange(size)
        length = min(rng.choice((512, 4096, 65536, 300_000, MiB)), size - offset)
        out.append(Write(vm, disk, offset, rng.randbytes(length), tracked=True))
    if rng.random() < 0.15:  # now and then a large rewrite, so that transfers last
        offset = rng.randrange(size // 2)
        out.append(Write(vm, disk, offset, rng.randbytes(size // 2), tracked=True))
    if rng.random() < 0.25:
        # Untracked, in the disk's first block: sampled verification always checks the first unsent
        # blocks, so it must find the change (a write anywhere else may rightly go unnoticed).
        offset = rng.randrange(BLOCK - 4096)
        out.append(Write(vm, disk, offset, rng.randbytes(4096), tracked=False))
    return out


def plan_step(seed: int, number: int, disks: list[tuple[str, str, int]], *, faults: bool = True) -> Step:
    """The step's choices, from the seed and the step number alone."""
    rng = random.Random(f"{seed}:{number}")
    writes = [w for vm, disk, size in disks for w in _writes(rng, vm, disk, size)]
    fault = rng.choice([*sorted(FAULTS), *sorted(FAULTS), None]) if faults else None
    moment = rng.uniform(0, 1.2)  # now and then just after the session's end
    return Step(number, writes, fault, moment, random.Random(f"{seed}:{number}:fault"))


def _held_checkpoint(env: ControllerEnv, vm: str) -> str | None:
    """The VM's checkpoint as the provider reads it (its sealed record), or None."""
    checkpoints = env.vm(vm).list_checkpoints()
    return checkpoints[0].checkpoint_id if checkpoints else None


def apply_writes(env: ControllerEnv, step: Step) -> None:
    for w in step.writes:
        vm = env.vm(w.vm)
        if w.tracked:
            vm.write(w.disk, w.offset, w.data)  # what `vmrepl lab write` does: into the overlay under a checkpoint
        elif (vm.state / "checkpoint.json").exists():
            step.skipped.append(w)  # the image is frozen under a checkpoint: nothing writes it
        else:
            fd = os.open(vm.image(w.disk), os.O_WRONLY)
            try:
                os.pwrite(fd, w.data, w.offset)
                os.fsync(fd)
            finally:
                os.close(fd)


@dataclass
class Expected:
    """Each disk's content at the session's checkpoint, whichever checkpoint the session ends up using: the
    one held from an earlier session (the base image, frozen), or a new one (the disk as the guest sees it)."""

    held: dict[str, str | None]
    frozen: dict[tuple[str, str], Path]
    current: dict[tuple[str, str], Path]

    def at(self, vm: str, disk: str, checkpoint_id: str) -> Path:
        return self.frozen[vm, disk] if checkpoint_id == self.held[vm] else self.current[vm, disk]


def snapshot(env: ControllerEnv, into: Path) -> Expected:
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir()
    held: dict[str, str | None] = {}
    frozen, current = {}, {}
    for vm_name, disk in env.disks():
        vm = env.vm(vm_name)
        held[vm_name] = _held_checkpoint(env, vm_name)
        frozen[vm_name, disk] = shutil.copyfile(vm.image(disk), into / f"{vm_name}-{disk}.frozen")
        current[vm_name, disk] = into / f"{vm_name}-{disk}.current"
        current[vm_name, disk].write_bytes(vm.read_current(disk, 0, vm.size(disk)))
    return Expected(held, frozen, current)


def check_restore_points(env: ControllerEnv) -> None:
    """The controller's restore points are the target's, per VM: none lost, none made twice."""
    points = env.points()
    target = env.target_stub()
    for name in env.vm_names():
        vm_id = env.vm(name).manifest.id
        mine = {p.name.rsplit("/", 1)[1] for p in points if p.vm_id == vm_id}
        request = target_pb2.ListRestorePointsRequest(replica_path=f"replicas/job1/{vm_id}")
        try:
            theirs = {p.id for p in target.ListRestorePoints(request, timeout=10).restore_points}
        except grpc.RpcError as e:
            if e.code() is not grpc.StatusCode.NOT_FOUND:
                raise
            theirs = set()
        if mine != theirs:
            raise AssertionError(
                f"{name}: restore points only in the database: {sorted(mine - theirs)}, "
                f"only on the target: {sorted(theirs - mine)}"
            )


# What each restore point must read back as: its disks' sha256 at the point's checkpoint, by point id.
PointImages = dict[str, dict[str, str]]


def check_oldest_points(env: ControllerEnv, images: PointImages) -> None:
    """Every point is restorable on the target, and each VM's oldest point (read through its rollback data,
    after any kill or power cut) is byte for byte its source at that point's checkpoint."""
    target = env.target_stub()
    for name in env.vm_names():
        vm_id = env.vm(name).manifest.id
        path = f"replicas/job1/{vm_id}"
        listed = target.GetReplica(target_pb2.GetReplicaRequest(replica_path=path), timeout=10).restore_points
        assert all(p.restorable for p in listed), f"{name}: a point that cannot be restored"
        known = [p for p in listed if p.id in images]
        if not known:
            continue
        oldest = known[0]
        for disk, want in images[oldest.id].items():
            read = target.ReadReplicaDisk(
                target_pb2.ReadReplicaDiskRequest(replica_path=path, restore_point_id=oldest.id, disk_id=disk),
                timeout=60,
            )
            got = bytearray()
            for chunk in read:
                if len(got) < chunk.disk_size:  # what no chunk sends reads as zeros
                    got.extend(bytes(chunk.disk_size - len(got)))
                got[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
            assert hashlib.sha256(got).hexdigest() == want, f"{name}/{disk}: point {oldest.id} reads wrong"


def check_checkpoints(env: ControllerEnv, session: api.Session) -> None:
    """However a session ended, a VM has a checkpoint exactly when the session holds it for a resume."""
    for v in session.vms:
        has = _held_checkpoint(env, v.vm_name)
        if v.state == api.VM_STATE_HELD:
            assert has == v.checkpoint_id, f"{v.vm_name}: held {v.checkpoint_id}, the provider has {has}"
        else:
            assert has is None, f"{v.vm_name}: checkpoint {has} left behind by a VM that ended {v.state}"
            assert not (env.vm(v.vm_name).state / "checkpoint.json").exists(), f"{v.vm_name}: checkpoint left"


def check_succeeded(env: ControllerEnv, session: api.Session, expected: Expected, images: PointImages) -> None:
    """Every replica equals its source at the session's checkpoint (remembered for its restore point)."""
    assert {v.vm_name for v in session.vms} == set(expected.held), "every VM of the job is in the session"
    for v in session.vms:
        assert v.state == api.VM_STATE_DONE and v.restore_point, f"{v.vm_name}: {v.state} {v.error}"
        for d in v.disks:
            source = expected.at(v.vm_name, d.disk_id, v.checkpoint_id)
            replica = env.replica(v.vm_name, d.disk_id)
            images.setdefault(v.restore_point.rsplit("/", 1)[1], {})[d.disk_id] = sha256(source)
            assert qemu_identical(source, replica), (
                f"{v.vm_name}/{d.disk_id}: the replica differs from the source at checkpoint {v.checkpoint_id} "
                f"({'held from before' if source == expected.frozen[v.vm_name, d.disk_id] else 'new'}); "
                f"task start={d.start} mode={d.change_mode} resumes={d.resumes}"
            )


def run_step(env: ControllerEnv, step: Step, scratch: Path, pace: Pace, images: PointImages) -> api.Session:
    apply_writes(env, step)
    expected = snapshot(env, scratch)
    started = time.monotonic()
    name = env.client().StartJob(api.StartJobRequest(name="jobs/job1"), timeout=30).name
    struck = 0.0
    if step.fault is not None:
        time.sleep(max(0.0, pace.seconds(step.moment) - (time.monotonic() - started)))
        struck, step.delay = time.time(), time.monotonic() - started
        FAULTS[step.fault](env, step.fault_rng)
    session = env.wait_session(name, timeout=max(1.0, SESSION_BOUND - (time.monotonic() - started)))
    took = time.monotonic() - started
    held = sum(v.checkpoint_id == expected.held[v.vm_name] for v in session.vms)
    step.during = bool(struck) and struck < session.end_time.ToDatetime(tzinfo=dt.UTC).timestamp()
    if not step.during:
        pace.measured((session.end_time.ToDatetime() - session.start_time.ToDatetime()).total_seconds())
    print(
        f"step {step.number}: {step.outcome(session)} in {took:.1f}s, "
        f"{len(step.writes)} writes ({len(step.skipped)} skipped)"
        + (f", {held} VMs on a held checkpoint" if held else "")
        + (f": {session.error}" if session.error else "")
    )
    check_restore_points(env)
    check_checkpoints(env, session)
    if session.state == api.SESSION_STATE_SUCCEEDED:
        check_succeeded(env, session, expected, images)
    check_oldest_points(env, images)
    return session


@contextmanager
def labelled(seed: int, step: Step, env: ControllerEnv) -> Iterator[None]:
    """A failure names the seed, the step and its fault, and where the logs are."""
    try:
        yield
    except Exception as e:
        raise AssertionError(
            f"{step.label(seed)} (replay: VMREPL_CHAOS_SEED={seed}; logs in {env.work}; "
            f"untracked writes skipped under a checkpoint: {len(step.skipped)}): {type(e).__name__}: {e}"
        ) from e


def _pin_port(agent: lab.AgentProcess) -> None:
    """Restart the agent on the port it has now: the controller knows the agents by address."""
    settings = tomllib.loads(agent.config.read_text())
    settings["listen"] = agent.address
    lab.write_toml(agent.config, settings)


def _setup(env: ControllerEnv) -> list[tuple[str, str, int]]:
    env.restart_controller(proxy_lost_seconds=5)  # a killed proxy is noticed within seconds, not a minute
    env.target.stop()
    powercut.start(env.work / "powercut", env.work / "datastore")  # the target records for power cuts
    env.target.env[powercut.ENV] = str(env.work / "powercut")
    env.target.start()
    for agent in (env.controller, env.proxy, env.target):
        _pin_port(agent)
    env.configure(block_size=BLOCK, retries=1, retry_wait_seconds=1, restore_points_to_keep=1000)
    return [(vm, disk, env.vm(vm).size(disk)) for vm, disk in env.disks()]


@pytest.mark.timeout(int(CHAOS_SECONDS) + 4 * int(SESSION_BOUND))
def test_random_kills_during_sessions_never_yield_a_wrong_replica(ctl_raw: ControllerEnv) -> None:
    seed = int(os.environ.get("VMREPL_CHAOS_SEED") or random.SystemRandom().randrange(10**9))
    print(f"chaos seed {seed} (replay: VMREPL_CHAOS_SEED={seed})")
    disks = _setup(ctl_raw)
    ends: Counter[str] = Counter()
    pace = Pace()
    images: PointImages = {}
    deadline, number = time.monotonic() + CHAOS_SECONDS, 0
    while time.monotonic() < deadline:
        number += 1
        step = plan_step(seed, number, disks)
        with labelled(seed, step, ctl_raw):
            session = run_step(ctl_raw, step, ctl_raw.work / "expected", pace, images)
        ends[step.outcome(session)] += 1
    final = plan_step(seed, number + 1, disks, faults=False)
    with labelled(seed, final, ctl_raw):
        session = run_step(ctl_raw, final, ctl_raw.work / "expected", pace, images)
        assert session.state == api.SESSION_STATE_SUCCEEDED, f"after the chaos: {session.error}"
    print(f"chaos seed {seed}: {number} steps, {dict(sorted(ends.items()))}")
