"""No process a test starts outlives it: the fixtures stop the agent running now (not the first one they
started), on every path, and stopping or killing an agent reaches whatever it started."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controller import lab

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

# Run by a nested pytest with the project's fixtures: each test restarts agents, one fails on purpose, and
# the last one checks that no process the others started is still running.
NESTED_TESTS = """
import os
from pathlib import Path

PIDS = Path(os.environ["VMREPL_TEST_PID_FILE"])


def _record(*agents):
    with PIDS.open("a") as f:
        f.writelines(f"{a.proc.pid}\\n" for a in agents)


async def test_restart_proxy(lab_env):
    _record(lab_env.proxy, lab_env.target)
    lab_env.restart_proxy(batch_bytes=1048576)
    _record(lab_env.proxy)


def test_restart_controller_and_proxy(ctl_raw):
    _record(ctl_raw.controller, ctl_raw.proxy, ctl_raw.target)
    ctl_raw.restart_controller()
    ctl_raw.proxy.kill()
    ctl_raw.proxy.start()
    _record(ctl_raw.controller, ctl_raw.proxy)


async def test_fails_after_a_restart(lab_env):
    lab_env.restart_proxy()
    _record(lab_env.proxy)
    raise AssertionError("failing on purpose: the teardown must stop the restarted proxy all the same")


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_zz_no_process_left():
    left = [pid for pid in map(int, PIDS.read_text().split()) if alive(pid)]
    assert not left, f"still running after their tests ended: {left}"
"""


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited but not yet reaped, does not count); as `alive` in NESTED_TESTS."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_if_ours(pid: int) -> None:
    """Clean up after a failure of this test: kill a leaked agent, checking its command line first."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return
    if re.search(rb"-m\x00(proxy_agent|target_agent|controller)\x00", cmdline):
        os.kill(pid, signal.SIGKILL)


def test_every_agent_a_test_started_is_stopped_when_it_ends(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.conftest", "tests.integration.conftest"]\n')
    (tmp_path / "test_nested.py").write_text(NESTED_TESTS)
    pids = tmp_path / "pids"
    env = {**os.environ, "PYTHONPATH": str(REPO), "VMREPL_TEST_PID_FILE": str(pids)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    cmd += ["--basetemp", str(tmp_path / "nested-tmp"), "test_nested.py"]
    try:
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)
        report = out.stdout[-4000:] + out.stderr[-2000:]
        summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
        assert re.match(r"^1 failed, 3 passed in ", summary), report  # no error in any teardown either
        recorded = [int(p) for p in pids.read_text().split()]
        assert len(recorded) == 9, recorded  # 3, 5 and 1 agents
        assert not [p for p in recorded if alive(p)], f"still running after pytest exited: {report}"
    finally:
        for pid in (int(p) for p in pids.read_text().split()) if pids.exists() else ():
            _kill_if_ours(pid)


FAKE_AGENT = """
import json, subprocess, sys, time
from pathlib import Path

child = subprocess.Popen(["sleep", "300"])
Path(sys.argv[2] + ".child").write_text(str(child.pid))
print(json.dumps({"event": "listening", "port": 1}), flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_stopping_an_agent_stops_what_it_started(tmp_path: Path, how: str) -> None:
    (tmp_path / "fake_agent.py").write_text(FAKE_AGENT)
    config = tmp_path / "fake.toml"
    agent = lab.AgentProcess("fake_agent", config, tmp_path / "fake.log", env={"PYTHONPATH": str(tmp_path)})
    agent.start()
    child = int(Path(f"{config}.child").read_text())
    try:
        assert agent in lab.running_agents()
        agent.stop(timeout=5) if how == "stop" else agent.kill()
        deadline = time.monotonic() + 5
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), f"{how} left the agent's child {child} running"
        assert agent not in lab.running_agents()
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_test_run_ended_by_sigterm_stops_its_agents(tmp_path: Path) -> None:
    (tmp_path / "fake_agent.py").write_text(FAKE_AGENT)
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.conftest"]\n')
    (tmp_path / "test_nested.py").write_text(
        "import os, time\n"
        "from pathlib import Path\n"
        "from controller import lab\n\n"
        "def test_runs_an_agent(tmp_path):\n"
        "    agent = lab.AgentProcess('fake_agent', tmp_path / 'fake.toml', tmp_path / 'fake.log')\n"
        "    agent.start()\n"
        f"    Path({str(tmp_path / 'pid')!r}).write_text(str(agent.pid))\n"
        "    time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{tmp_path}"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    cmd += ["--basetemp", str(tmp_path / "nested-tmp"), "test_nested.py"]
    run = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_file, agent = tmp_path / "pid", 0
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        agent = int(pid_file.read_text())
        run.send_signal(signal.SIGTERM)
        assert run.wait(30) == -signal.SIGTERM
        assert not alive(agent), "the agent outlived the test run that SIGTERM ended"
    finally:
        run.kill()
        run.wait()
        if agent and alive(agent):
            os.kill(agent, signal.SIGKILL)
