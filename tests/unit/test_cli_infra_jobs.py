"""`vmrepl infra host-add` and `vmrepl job create`: options that would be silently dropped are usage errors."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from controller.cli import common
from controller.cli.main import app
from vmrepl.v1 import controller_pb2 as api


class FakeApi:
    """Records what the CLI sends; a usage error must send nothing."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def CreateJob(self, request: api.CreateJobRequest, timeout: float) -> api.Job:
        self.sent.append(request)
        return api.Job(name=f"jobs/{request.job_id}")

    def CreateHost(self, request: api.CreateHostRequest, timeout: float) -> api.Host:
        self.sent.append(request)
        return api.Host(name=f"hosts/{request.host_id}")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    stub = FakeApi()
    monkeypatch.setattr(common.conn, "_stub", stub)
    return stub


JOB = ["job", "create", "web", "--host", "hv01", "--target", "t", "--vm", "web01", "--vm", "db01"]


@pytest.mark.parametrize(
    ("item", "words"),
    [
        ("web1:scsi0-1", "'web1' is not one of the job's --vm (web01, db01)"),  # a typo in the VM's name
        ("scsi0-1", "VM:DISK"),  # the VM left out
        ("web01:", "VM:DISK"),
    ],
)
def test_an_exclusion_that_names_no_vm_of_the_job_is_a_usage_error(fake: FakeApi, item: str, words: str) -> None:
    # It was dropped without a word: the job then replicated the disk the operator meant to leave out.
    result = CliRunner().invoke(app, [*JOB, "--exclude-disk", item])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.replace("│", " ").split()), result.output
    assert fake.sent == []


def test_an_exclusion_reaches_the_api_with_its_vm(fake: FakeApi) -> None:
    result = CliRunner().invoke(app, [*JOB, "--exclude-disk", "db01:scsi0-1", "--exclude-disk", "db01:ide0-0"])
    assert result.exit_code == 0, result.output
    (req,) = fake.sent
    assert [(v.vm, list(v.excluded_disks)) for v in req.job.vms] == [("web01", []), ("db01", ["scsi0-1", "ide0-0"])]


@pytest.mark.parametrize("option", [["--winrm-port", "5986"], ["--winrm-auth", "basic"], ["--winrm-scheme", "http"],
                                    ["--winrm-ca-bundle", "/etc/ca.pem"]])  # fmt: skip
def test_winrm_options_on_a_file_host_are_a_usage_error(fake: FakeApi, option: list[str]) -> None:
    # Forgetting --provider hyperv made a file host and dropped the WinRM settings without a word.
    result = CliRunner().invoke(app, ["infra", "host-add", "hv01", "--address", "hv01.corp", *option])
    assert result.exit_code == 2, result.output
    assert "--provider hyperv" in " ".join(result.output.replace("│", " ").split()), result.output
    assert fake.sent == []


def test_winrm_options_reach_the_api_for_a_hyperv_host(fake: FakeApi) -> None:
    args = ["--provider", "hyperv", "--credential", "c", "--winrm-scheme", "http", "--winrm-port", "5985"]
    result = CliRunner().invoke(app, ["infra", "host-add", "hv01", "--address", "hv01.corp", *args])
    assert result.exit_code == 0, result.output
    (req,) = fake.sent
    assert (req.host.winrm.scheme, req.host.winrm.port, req.host.credential) == ("http", 5985, "credentials/c")
