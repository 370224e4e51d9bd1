"""`vmrepl lab`: a file host's VM powered off and on (a failback needs the original off), and the
provider's refusals as one line with exit 1, not a traceback; a sample VM too small to hold its files is a
usage error before anything is made."""

from __future__ import annotations

import asyncio
from pathlib import Path

from typer.testing import CliRunner

from controller import lab
from controller.cli.main import app
from vmrepl.domain import PowerState
from vmrepl.providers.filehost import FileHostProvider

MiB = 1 << 20


def test_stop_vm_and_start_vm_set_the_power_the_provider_reads(tmp_path: Path) -> None:
    host = tmp_path / "host"
    lab.create_raw_vm(host, "web01", size=4 * MiB)
    runner = CliRunner()
    stopped = runner.invoke(app, ["lab", "stop-vm", str(host), "web01"])
    assert stopped.exit_code == 0 and "web01 is off" in stopped.output
    info = asyncio.run(FileHostProvider(host).get_vm("web01"))
    assert info.power is PowerState.OFF
    refused = runner.invoke(app, ["lab", "write", str(host), "web01", "--blocks", "1"])
    assert refused.exit_code == 1 and "VM web01 is off: start it first" in refused.output
    assert "Traceback" not in refused.output
    started = runner.invoke(app, ["lab", "start-vm", str(host), "web01"])
    assert started.exit_code == 0 and "web01 is running" in started.output
    assert runner.invoke(app, ["lab", "write", str(host), "web01", "--blocks", "1"]).exit_code == 0


def test_an_unknown_vm_is_one_line_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "host").mkdir()
    for cmd in ("stop-vm", "start-vm", "write"):
        result = CliRunner().invoke(app, ["lab", cmd, str(tmp_path / "host"), "nosuch"])
        assert result.exit_code == 1 and "no VM with id or name 'nosuch'" in result.output, cmd


def test_a_sample_vm_smaller_than_its_files_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["lab", "create-vm", str(tmp_path), "v", "--size-mib", "16"])
    assert result.exit_code == 2 and not (tmp_path / "v").exists()
