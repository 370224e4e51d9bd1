"""`vmrepl infra` and `vmrepl job create`: options that would be silently dropped are usage errors; a host's
and a credential's settings can be changed in place (a rotated password, a CA bundle forgotten at host-add)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from controller.cli import common, sessions
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

    def GetHost(self, request: api.GetHostRequest, timeout: float) -> api.Host:
        winrm = api.WinRmSettings(auth="basic", port=38109, ca_bundle="/etc/vmrepl/hv-ca.pem")
        provider = "file" if request.name == "hosts/lab" else "hyperv"
        return api.Host(name=request.name, provider=provider, address="hv01", credential="credentials/c", winrm=winrm)

    def UpdateHost(self, request: api.UpdateHostRequest, timeout: float) -> api.Host:
        self.sent.append(request)
        return request.host

    def GetSession(self, request: api.GetSessionRequest, timeout: float) -> api.Session:
        error = "localhost: WinRM refused the credentials of the user HV01\\r (basic); check the host's credential"
        return api.Session(name=request.name, job="jobs/hv", state=api.SESSION_STATE_FAILED, error=error)

    def ListCredentials(self, request: Any, timeout: float) -> api.ListCredentialsResponse:
        return api.ListCredentialsResponse()

    def ListHosts(self, request: Any, timeout: float) -> api.ListHostsResponse:
        hv = api.Host(name="hosts/hv01", provider="hyperv", address="hv01", credential="credentials/c")
        ca = api.WinRmSettings(auth="basic", port=15986, ca_bundle="/etc/vmrepl/ca.pem")
        hv2 = api.Host(name="hosts/hv02", provider="hyperv", address="hv02", credential="credentials/c", winrm=ca)
        http = api.Host(name="hosts/hv03", provider="hyperv", address="hv03", winrm=api.WinRmSettings(scheme="http"))
        return api.ListHostsResponse(
            hosts=[api.Host(name="hosts/lab", provider="file", address="/srv/lab"), hv, hv2, http]
        )

    def ListProxies(self, request: Any, timeout: float) -> api.ListProxiesResponse:
        return api.ListProxiesResponse()

    def ListTargets(self, request: Any, timeout: float) -> api.ListTargetsResponse:
        return api.ListTargetsResponse()

    def UpdateCredential(self, request: api.UpdateCredentialRequest, timeout: float) -> api.Credential:
        self.sent.append(request)
        return request.credential


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    stub = FakeApi()
    monkeypatch.setattr(common.conn, "_stub", stub)
    return stub


def _flat(output: str) -> str:
    """The output as one line: rich folds an error box at the terminal's width."""
    return " ".join(output.replace("│", " ").split())


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
    assert words in _flat(result.output), result.output
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
    assert "--provider hyperv" in _flat(result.output), result.output
    assert fake.sent == []


def test_winrm_options_reach_the_api_for_a_hyperv_host(fake: FakeApi) -> None:
    args = ["--provider", "hyperv", "--credential", "c", "--winrm-scheme", "http", "--winrm-port", "5985"]
    result = CliRunner().invoke(app, ["infra", "host-add", "hv01", "--address", "hv01.corp", *args])
    assert result.exit_code == 0, result.output
    (req,) = fake.sent
    assert (req.host.winrm.scheme, req.host.winrm.port, req.host.credential) == ("http", 5985, "credentials/c")


def test_credential_add_with_an_unset_variable_says_so(fake: FakeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    # Sent empty, the API answered "secret: is required", which did not say the export was missing.
    monkeypatch.delenv("HV01_SECRET", raising=False)
    result = CliRunner().invoke(app, ["infra", "credential-add", "c", "--username", "u", "--secret-env", "HV01_SECRET"])
    assert result.exit_code == 2 and "HV01_SECRET is not set" in _flat(result.output), result.output
    assert fake.sent == []


def test_credential_update_rotates_the_secret_only(fake: FakeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HV01_SECRET", "new-password")
    result = CliRunner().invoke(app, ["infra", "credential-update", "c", "--secret-env", "HV01_SECRET"])
    assert result.exit_code == 0 and "updated credentials/c" in _flat(result.output), result.output
    (req,) = fake.sent
    assert (list(req.update_mask.paths), req.secret, req.credential.name) == (
        ["secret"],
        "new-password",
        "credentials/c",
    )
    assert CliRunner().invoke(app, ["infra", "credential-update", "c"]).exit_code == 2  # nothing to change


def test_host_update_merges_the_winrm_options_given_into_the_hosts_own(fake: FakeApi) -> None:
    # The API replaces Host.winrm as a whole: sending only the new port would have reset auth and the CA bundle.
    result = CliRunner().invoke(app, ["infra", "host-update", "hv01", "--winrm-port", "5986"])
    assert result.exit_code == 0 and "updated hosts/hv01" in _flat(result.output), result.output
    (req,) = fake.sent
    assert list(req.update_mask.paths) == ["winrm"]
    w = req.host.winrm
    assert (w.auth, w.port, w.ca_bundle, req.host.address) == ("basic", 5986, "/etc/vmrepl/hv-ca.pem", "hv01")


def test_host_update_clears_a_setting_given_empty_and_changes_the_credential(fake: FakeApi) -> None:
    args = ["infra", "host-update", "hv01", "--winrm-ca-bundle", "", "--credential", "c2", "--address", "hv01.corp"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (req,) = fake.sent
    assert list(req.update_mask.paths) == ["address", "credential", "winrm"]
    assert (req.host.winrm.ca_bundle, req.host.winrm.port, req.host.credential) == ("", 38109, "credentials/c2")
    assert req.host.address == "hv01.corp"


@pytest.mark.parametrize(("args", "words"), [([], "at least one option"), (["--winrm-port", "1"], "a file host")])
def test_host_update_with_nothing_to_change_or_winrm_on_a_file_host_is_a_usage_error(
    fake: FakeApi, args: list[str], words: str
) -> None:
    result = CliRunner().invoke(app, ["infra", "host-update", "lab", *args])
    assert result.exit_code == 2 and words in _flat(result.output), result.output
    assert fake.sent == []


def test_infra_list_shows_each_hyperv_hosts_winrm_settings_with_the_defaults(
    fake: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only --json showed them: what host-add or host-update stored (a port, a CA bundle) could not be checked.
    console = Console(width=200, record=True, file=io.StringIO())
    monkeypatch.setattr(common, "out", console)
    result = CliRunner().invoke(app, ["infra", "list"])
    assert result.exit_code == 0, result.output
    text = _flat(console.export_text())
    assert "hosts/hv01 hyperv hv01 credentials/c ntlm over https:5986, the system's CAs" in text
    assert "basic over https:15986, CA /etc/vmrepl/ca.pem" in text
    assert "ntlm over http:5985 " in text + " "
    assert "hosts/lab file /srv/lab" in text


def test_credential_update_new_secret_prompts_hidden(fake: FakeApi) -> None:
    result = CliRunner().invoke(app, ["infra", "credential-update", "c", "--new-secret"], input="rotated\n")
    assert result.exit_code == 0 and "rotated" not in result.output, result.output  # not echoed
    (req,) = fake.sent
    assert (list(req.update_mask.paths), req.secret) == (["secret"], "rotated")


def test_session_show_of_a_session_that_never_planned_shows_its_error_without_empty_tables(
    fake: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A wrong WinRM password ends the session before it has VMs: two tables of headings only followed the error.
    console = Console(width=120, record=True, file=io.StringIO())
    monkeypatch.setattr(common, "out", console)
    monkeypatch.setattr(sessions, "out", console)
    result = CliRunner().invoke(app, ["session", "show", "5449ecca085b44499a4b155054705cfc"])
    assert result.exit_code == 0, result.output
    text = console.export_text()
    assert "WinRM refused the credentials" in _flat(text) and "failed" in text
    assert "bottleneck" not in text and "passes" not in text
