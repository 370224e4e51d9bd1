"""The CLI's tables as an operator's 120-column terminal shows them (a fake API behind the real commands)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import typer.main
from rich.console import Console
from typer.testing import CliRunner

from controller.cli import common, sessions
from controller.cli.main import app
from vmrepl.v1 import controller_pb2 as api

SESSION = "sessions/5449ecca085b44499a4b155054705cfc"
RERUN = "sample differed (3 of 16 unsent blocks): re-run as digest comparison, pass 2"


class FakeApi:
    def GetSession(self, request: api.GetSessionRequest, timeout: float) -> api.Session:
        disk = api.DiskTask(
            disk_id="disk0",
            state=api.DISK_TASK_STATE_SUCCEEDED,
            change_mode="incremental",
            disk_size=256 << 20,
            passes=2,
            verification=RERUN,
        )
        vm = api.SessionVm(vm_name="demo-vm", disks=[disk])
        return api.Session(name=request.name, job="jobs/demo", state=api.SESSION_STATE_SUCCEEDED, vms=[vm])

    def ListSessions(self, request: api.ListSessionsRequest, timeout: float) -> api.ListSessionsResponse:
        return api.ListSessionsResponse(
            sessions=[api.Session(name=SESSION, job="jobs/demo", state=api.SESSION_STATE_SUCCEEDED)]
        )


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Console:
    console = Console(width=120, record=True, file=io.StringIO())
    monkeypatch.setattr(common, "out", console)  # table() prints here
    monkeypatch.setattr(sessions, "out", console)  # the session summary
    monkeypatch.setattr(common.conn, "_stub", FakeApi())
    return console


def _run(terminal: Console, *args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return terminal.export_text().replace("│", " ").replace("\n", " ")


def test_session_show_on_a_120_column_terminal_shows_the_passes_and_what_was_verified(terminal: Console) -> None:
    """Found with `make demo`: in one 15-column table the verification column read `veri…`, its value nothing."""
    shown = " ".join(_run(terminal, "session", "show", SESSION).split())
    assert "verified" in shown and "passes" in shown
    for word in RERUN.split():
        assert word in shown, shown


def test_session_list_shows_whole_names_to_copy(terminal: Console) -> None:
    """Found with `make demo`: the name column ended `…705…`; `session show` of that copy is refused."""
    shown = _run(terminal, "session", "list")
    assert "…" not in shown and "5449ecca085b44499a4b155054705" in shown.replace(" ", "")


def test_session_list_says_which_sessions_are_replica_operations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found as a new user: a failover's session read like a replication that made no point."""

    class WithOperation(FakeApi):
        def ListSessions(self, request: api.ListSessionsRequest, timeout: float) -> api.ListSessionsResponse:
            op = api.Session(
                name=SESSION.replace("5449", "6666"),
                job="jobs/demo",
                state=api.SESSION_STATE_SUCCEEDED,
                kind=api.SESSION_KIND_OPERATION,
                operation=api.REPLICA_OPERATION_UNDO_FAILOVER,
            )
            return api.ListSessionsResponse(sessions=[op, *super().ListSessions(request, timeout).sessions])

    console = Console(width=120, record=True, file=io.StringIO())
    monkeypatch.setattr(common, "out", console)
    monkeypatch.setattr(common.conn, "_stub", WithOperation())
    assert CliRunner().invoke(app, ["session", "list"]).exit_code == 0
    lines = console.export_text().splitlines()
    op = next(i for i, line in enumerate(lines) if SESSION.replace("5449", "6666") in line)
    replication = next(i for i, line in enumerate(lines) if SESSION in line)
    assert "undo" in lines[op] and "failover" in lines[op] + lines[op + 1]  # the points column: no point, the operation
    assert "failover" not in lines[replication] and " 0 " in lines[replication]


def test_a_command_run_where_no_certificates_are_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Found as a new user: `vmrepl job list` outside the folder holding certs/ printed a traceback."""
    monkeypatch.setattr(common.conn, "_stub", None)
    result = CliRunner().invoke(app, ["--certs-dir", str(tmp_path), "job", "list"])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # typer's Exit, not the ConfigError
    assert "cannot read tls.ca_file" in result.output and "--certs-dir" in result.output


def test_every_command_says_what_it_does_in_its_groups_help() -> None:
    """Found as a new user: `vmrepl job --help` listed create, list, show ... with no word about any."""
    groups: dict[str, Any] = getattr(typer.main.get_command(app), "commands", {})
    assert set(groups) >= {"infra", "job", "session", "restore-points"}
    for name, sub in groups.items():
        assert (sub.help or "").strip(), name
        commands: dict[str, Any] = getattr(sub, "commands", {})
        assert commands, name
        for command, c in commands.items():
            assert (c.help or "").strip(), f"vmrepl {name} {command}"


@pytest.mark.parametrize("width", [120, 100])
def test_session_list_keeps_each_name_on_one_line(monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    """Found with `make demo` and a lab: a folded name (`…4ad39abd7c26f16c3854` on a second line) copied
    with the mouse is two lines, and `session show` of it is refused."""
    console = Console(width=width, record=True, file=io.StringIO())
    monkeypatch.setattr(common, "out", console)
    monkeypatch.setattr(common.conn, "_stub", FakeApi())
    assert CliRunner().invoke(app, ["session", "list"]).exit_code == 0
    text = console.export_text()
    assert any(SESSION in line for line in text.splitlines()), text


def test_in_a_narrow_terminal_the_name_folds_rather_than_squeeze_the_state(monkeypatch: pytest.MonkeyPatch) -> None:
    console = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(common, "out", console)
    monkeypatch.setattr(common.conn, "_stub", FakeApi())
    assert CliRunner().invoke(app, ["session", "list"]).exit_code == 0
    text = console.export_text()
    assert any(" state " in line for line in text.splitlines()) and "succeeded" in text, text


def test_session_show_says_a_disk_was_resumed(terminal: Console, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in a lab after `job stop` and `job start`: the resumed disk read `ranges` like any other;
    operations.md promises how each disk started (`resume`), which only --json had. In the second table:
    the first has no room left at 120 columns."""

    class Resumed(FakeApi):
        def GetSession(self, request: api.GetSessionRequest, timeout: float) -> api.Session:
            disk = api.DiskTask(disk_id="disk0", state=api.DISK_TASK_STATE_SUCCEEDED, change_mode="ranges")
            disk.start = "resume"
            vm = api.SessionVm(vm_name="demo-vm", disks=[disk])
            return api.Session(name=request.name, job="jobs/demo", state=api.SESSION_STATE_SUCCEEDED, vms=[vm])

    monkeypatch.setattr(common.conn, "_stub", Resumed())
    assert "demo-vm disk0 resume" in " ".join(_run(terminal, "session", "show", SESSION).split())


def test_session_log_prints_whole_numbers_whole(terminal: Console, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in a lab: `task_starting ... resume_offset=12582912.0`, `session_planned vms=1.0` (a Struct keeps
    every number as a double)."""

    class Log(FakeApi):
        def GetSessionLog(self, request: api.GetSessionLogRequest, timeout: float) -> api.SessionLog:
            entry = api.SessionLogEntry(level="info", event="task_starting")
            entry.fields.update({"resume_offset": 12582912, "vms": 1, "ratio": 1.5, "disk_id": "disk0"})
            return api.SessionLog(entries=[entry])

    monkeypatch.setattr(common.conn, "_stub", Log())
    monkeypatch.setattr(sessions, "out", terminal)
    words = _run(terminal, "session", "log", SESSION).split()
    assert {"resume_offset=12582912", "vms=1", "ratio=1.5", "disk_id=disk0"} <= set(words), words


def test_a_folded_start_time_folds_between_date_and_time(terminal: Console, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found with `make demo` at 120 columns: the start column read `2026-11-30T23:06:` over `01`."""

    class Started(FakeApi):
        def ListSessions(self, request: api.ListSessionsRequest, timeout: float) -> api.ListSessionsResponse:
            s = api.Session(name=SESSION, job="jobs/demo", state=api.SESSION_STATE_SUCCEEDED)
            s.start_time.FromJsonString("2026-11-30T23:06:01Z")
            s.end_time.FromJsonString("2026-11-30T23:06:02Z")
            s.stats.bytes_sent = 29 << 20
            return api.ListSessionsResponse(sessions=[s, s])

    monkeypatch.setattr(common.conn, "_stub", Started())
    assert CliRunner().invoke(app, ["session", "list"]).exit_code == 0
    lines = terminal.export_text().splitlines()
    assert any("2026-11-30" in line for line in lines) and any("23:06:01" in line for line in lines), lines
    assert any(SESSION in line for line in lines), lines
