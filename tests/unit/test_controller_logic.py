"""The controller's pure decisions: placement, retention, states, resume planning, recovery."""

import datetime as dt

import pytest

from controller.db.enums import SessionState, TaskState, VmState
from controller.engine.placement import ProxySlot, choose_proxy
from controller.engine.retention import points_to_delete
from controller.engine.states import (
    ChangeChoice,
    DiskStart,
    HeldCheckpointView,
    IllegalTransition,
    Recovery,
    check_task_transition,
    choose_change,
    full_check_due,
    plan_vm,
    reconcile_task,
    session_outcome,
    vm_after_transfers,
    vm_restore_point_due,
)
from vmrepl.domain import ChangeMode, ChangeTracking

T0 = dt.datetime(2026, 11, 25, 12, tzinfo=dt.UTC)


def slot(
    name: str, *, running: int = 0, max_tasks: int = 2, hosts: set[str] | None = None, healthy: bool = True
) -> ProxySlot:
    return ProxySlot(name, name, healthy, max_tasks, running, frozenset(hosts or set()))


def test_proxy_serving_the_host_comes_first_then_the_least_loaded() -> None:
    local = slot("local", running=1, hosts={"hv1"})
    idle = slot("idle")
    assert choose_proxy([idle, local], host_id="hv1") is local
    assert choose_proxy([idle, local], host_id="hv2") is idle
    full = slot("local", running=2, hosts={"hv1"})
    assert choose_proxy([full, idle], host_id="hv1") is idle
    assert choose_proxy([slot("down", healthy=False), full], host_id="hv1") is None
    picked = choose_proxy([slot("b"), slot("a")], host_id="x")
    assert picked is not None and picked.name == "a"  # stable among equals


def test_retention_keeps_the_newest() -> None:
    pts = [("p3", T0 + dt.timedelta(hours=3)), ("p1", T0), ("p2", T0 + dt.timedelta(hours=1))]
    assert points_to_delete(pts, 2) == ["p1"]
    assert points_to_delete(pts, 5) == []
    assert points_to_delete(pts, 1) == ["p1", "p2"]
    with pytest.raises(ValueError):
        points_to_delete(pts, 0)


def test_task_transitions() -> None:
    assert check_task_transition(TaskState.PENDING, TaskState.STARTING) is TaskState.STARTING
    for old, new in [(TaskState.SUCCEEDED, TaskState.RUNNING), (TaskState.PENDING, TaskState.SUCCEEDED)]:
        with pytest.raises(IllegalTransition):
            check_task_transition(old, new)


def test_session_outcomes_and_restore_points() -> None:
    s, r, f = TaskState.SUCCEEDED, TaskState.RESUMABLE, TaskState.FAILED
    assert session_outcome([s, s], stopped=False) is SessionState.SUCCEEDED
    assert session_outcome([s, r], stopped=True) is SessionState.INCOMPLETE
    # A stop that came after every disk succeeded left nothing undone; one that came before anything was
    # planned left everything.
    assert session_outcome([s, s], stopped=True) is SessionState.SUCCEEDED
    assert session_outcome([], stopped=True) is SessionState.INCOMPLETE
    assert session_outcome([s, r, f], stopped=False) is SessionState.FAILED
    with pytest.raises(IllegalTransition):
        session_outcome([s, TaskState.RUNNING], stopped=False)
    assert vm_restore_point_due([s, s]) and not vm_restore_point_due([s, r]) and not vm_restore_point_due([])


def test_resume_before_the_deadline_and_compare_after() -> None:
    held = HeldCheckpointView("cp1", T0 + dt.timedelta(hours=24), frozenset({"d1"}))
    early = plan_vm(["d0", "d1"], held, now=T0)
    assert early.reuse_checkpoint == "cp1"
    assert early.disks == {"d0": DiskStart.FRESH, "d1": DiskStart.RESUME}
    late = plan_vm(["d0", "d1"], held, now=T0 + dt.timedelta(hours=25))
    assert late.reuse_checkpoint is None
    assert late.disks == {"d0": DiskStart.FRESH, "d1": DiskStart.COMPARE}  # never append to a torn replica
    assert plan_vm(["d0"], None, now=T0).disks == {"d0": DiskStart.FRESH}


def test_disks_done_under_the_held_checkpoint_are_marked_done_until_its_deadline() -> None:
    held = HeldCheckpointView("cp1", T0 + dt.timedelta(hours=1), frozenset({"d1"}), frozenset({"d0"}))
    assert plan_vm(["d0", "d1", "d2"], held, now=T0).disks == {
        "d0": DiskStart.DONE,
        "d1": DiskStart.RESUME,
        "d2": DiskStart.FRESH,
    }
    late = plan_vm(["d0", "d1"], held, now=T0 + dt.timedelta(hours=2))
    assert late.disks == {"d0": DiskStart.FRESH, "d1": DiskStart.COMPARE}


def test_vm_after_transfers() -> None:
    s, r, f = TaskState.SUCCEEDED, TaskState.RESUMABLE, TaskState.FAILED
    assert vm_after_transfers([s, s]) is VmState.COMMITTING
    assert vm_after_transfers([s, r]) is VmState.HOLDING
    assert vm_after_transfers([f, r]) is VmState.HOLDING  # the resumable disk keeps the checkpoint
    assert vm_after_transfers([s, f]) is VmState.RELEASING


@pytest.mark.parametrize(
    ("start", "tracking", "last", "expected"),
    [
        (DiskStart.FRESH, "auto", None, ChangeChoice(ChangeMode.FULL)),
        (DiskStart.FRESH, "off", None, ChangeChoice(ChangeMode.FULL)),
        (DiskStart.FRESH, "auto", "seq:4", ChangeChoice(ChangeMode.RANGES, "seq:4")),
        (DiskStart.FRESH, "on", "seq:4", ChangeChoice(ChangeMode.RANGES, "seq:4")),
        (DiskStart.FRESH, "off", "seq:4", ChangeChoice(ChangeMode.COMPARE)),
        (DiskStart.FRESH, "auto", "", ChangeChoice(ChangeMode.COMPARE)),  # a point without a reference
        (DiskStart.COMPARE, "auto", "seq:4", ChangeChoice(ChangeMode.COMPARE)),
        (DiskStart.COMPARE, "auto", None, ChangeChoice(ChangeMode.COMPARE)),
        (DiskStart.DONE, "auto", "seq:4", ChangeChoice(ChangeMode.RANGES, "seq:9")),
        (DiskStart.DONE, "auto", None, ChangeChoice(ChangeMode.RANGES, "seq:9")),
        (DiskStart.DONE, "off", "seq:4", ChangeChoice(ChangeMode.COMPARE)),
    ],
)
def test_choose_change(start: DiskStart, tracking: str, last: str | None, expected: ChangeChoice) -> None:
    got = choose_change(
        start, tracking=ChangeTracking(tracking), last_point_reference=last, checkpoint_reference="seq:9"
    )
    assert got == expected


@pytest.mark.parametrize(
    ("start", "tracking", "last", "expected"),
    [
        # Would use changed ranges: a full check compares digests, keeping the reference (for the repaired count).
        (DiskStart.FRESH, "auto", "seq:3", ChangeChoice(ChangeMode.COMPARE, "seq:3", full_check=True)),
        (DiskStart.FRESH, "on", "seq:3", ChangeChoice(ChangeMode.COMPARE, "seq:3", full_check=True)),
        # Every other choice stays: a first full, a comparison anyway, a disk completed from a held checkpoint.
        (DiskStart.FRESH, "auto", None, ChangeChoice(ChangeMode.FULL)),
        (DiskStart.FRESH, "off", "seq:3", ChangeChoice(ChangeMode.COMPARE)),
        (DiskStart.FRESH, "auto", "", ChangeChoice(ChangeMode.COMPARE)),
        (DiskStart.COMPARE, "auto", "seq:3", ChangeChoice(ChangeMode.COMPARE)),
        (DiskStart.DONE, "auto", "seq:3", ChangeChoice(ChangeMode.RANGES, "seq:9")),
    ],
)
def test_a_full_check_compares_digests_where_changed_ranges_would_be_trusted(
    start: DiskStart, tracking: str, last: str | None, expected: ChangeChoice
) -> None:
    got = choose_change(
        start,
        tracking=ChangeTracking(tracking),
        last_point_reference=last,
        checkpoint_reference="seq:9",
        full_check=True,
    )
    assert got == expected


@pytest.mark.parametrize(
    ("every", "recent", "due"),
    [
        (0, [False] * 50, False),  # never
        (1, [], True),  # every session
        (1, [True], True),
        (2, [True], False),  # the first full, then one changed-range session
        (2, [False, True], True),  # ... then the check
        (2, [True, False], False),
        (10, [False] * 8 + [True], False),
        (10, [False] * 9, True),
        (10, [False] * 9 + [True], True),
        (10, [False] * 3, False),  # fewer sessions than the period, none compared: not yet
        (3, [False, True, False], False),
    ],
)
def test_a_full_check_is_due_every_n_sessions(every: int, recent: list[bool], due: bool) -> None:
    assert full_check_due(every=every, requested=False, recent=recent) is due


def test_a_full_check_asked_for_is_due_even_when_the_job_never_checks() -> None:
    assert full_check_due(every=0, requested=True, recent=[]) is True
    assert full_check_due(every=10, requested=True, recent=[True]) is True


@pytest.mark.parametrize(
    ("state", "knows", "want"),
    [
        (TaskState.SUCCEEDED, None, Recovery.KEEP),
        (TaskState.RESUMABLE, False, Recovery.KEEP),
        (TaskState.RUNNING, True, Recovery.REATTACH),
        (TaskState.STARTING, True, Recovery.REATTACH),
        (TaskState.RUNNING, False, Recovery.RESUME),
        (TaskState.RUNNING, None, Recovery.RESUME),
        (TaskState.STARTING, False, Recovery.RESUME),
        (TaskState.PENDING, None, Recovery.RESUME),
    ],
)
def test_recovery_after_a_controller_restart(state: TaskState, knows: bool | None, want: Recovery) -> None:
    assert reconcile_task(state, proxy_knows_transfer=knows) is want


def test_bottleneck_is_the_stage_with_the_largest_share() -> None:
    from controller.observability.statistics import Shares, compression_ratio, rate, shares
    from vmrepl.progress import StageBusy

    # 10 s transfer, 2 threads: source 12 s summed = 0.6 per thread; target 8 s = 0.8.
    s = shares([(StageBusy(source_read=12.0, compress=4.0, network_wait=1.0, target_write=8.0, threads=2), 10.0)])
    assert s == Shares(source=0.6, proxy=0.2, network=0.1, target=0.8)
    assert s.bottleneck() == "target"
    slow_source = shares([(StageBusy(source_read=19.0, compress=2.0, target_write=3.0, threads=2), 10.0)])
    assert slow_source.bottleneck() == "source"
    two = shares([(StageBusy(network_wait=9.0), 10.0), (StageBusy(compress=1.0, threads=1), 10.0)])
    assert two.bottleneck() == "network" and two.network == 0.45
    assert shares([]).bottleneck() == "" and Shares().bottleneck() == ""
    assert rate(100, 4.0) == 25.0 and rate(1, 0) == 0.0
    assert compression_ratio(300, 100) == 3.0 and compression_ratio(5, 0) == 0.0


def test_a_free_slot_goes_to_the_session_served_least_then_the_longest_waiting() -> None:
    from collections import Counter

    from controller.engine.slots import Waiter, yields_to

    big1 = Waiter("big", "t", since=1, usable=frozenset({"p"}))
    big2 = Waiter("big", "t", since=2, usable=frozenset({"p"}))
    small = Waiter("small", "t", since=3, usable=frozenset({"p"}))
    waiters = [big1, big2, small]
    served = Counter({"big": 1})
    assert yields_to(big1, waiters, served, "p") and not yields_to(small, waiters, served, "p")
    served["small"] = 1
    assert not yields_to(big1, waiters, served, "p") and yields_to(small, waiters, served, "p")  # tie: oldest
    # Only waiters that could use the same proxy and target count.
    other_target = Waiter("small", "t2", since=0, usable=frozenset({"p"}))
    other_proxy = Waiter("small", "t", since=0, usable=frozenset({"q"}))
    assert not yields_to(big1, [big1, other_target, other_proxy], Counter(), "p")
