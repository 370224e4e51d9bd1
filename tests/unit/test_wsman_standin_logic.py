"""The WS-Management stand-in's pure parts: command-line rules, CLIXML, request parsing (no sockets)."""

from __future__ import annotations

import pytest

from tests.support.wsman import CMD_LINE_LIMIT, POWERSHELL_STDIN, CommandRunner, ScriptRegistry, ScriptResult, soap
from tests.support.wsman.runner import CREATE_PROCESS_LIMIT, clixml_error


def test_command_line_rules() -> None:
    runner = CommandRunner(ScriptRegistry())
    assert runner.check_command_line(POWERSHELL_STDIN, skip_cmd_shell=False) is None
    assert (
        runner.check_command_line("PowerShell.exe  -NoProfile -NonInteractive -Command -", skip_cmd_shell=False) is None
    )
    other = runner.check_command_line("powershell -encodedcommand AAAA", skip_cmd_shell=False)
    assert other is not None and other.exit_code == 9009 and b"'powershell' is not recognized" in other.stderr
    long_line = POWERSHELL_STDIN + " " * (CMD_LINE_LIMIT - len(POWERSHELL_STDIN) + 1)
    refused = runner.check_command_line(long_line, skip_cmd_shell=False)
    assert refused == ScriptResult(stderr=b"The command line is too long.\r\n", exit_code=1)
    assert runner.check_command_line(long_line, skip_cmd_shell=True) is None  # CreateProcess allows 32,767
    assert runner.check_command_line("x" * (CREATE_PROCESS_LIMIT + 1), skip_cmd_shell=True) is not None


def test_scripts_dispatch_on_exact_text() -> None:
    registry = ScriptRegistry()
    registry.register("Get-VM", lambda c: ScriptResult(stdout=c.script.encode()))
    runner = CommandRunner(registry)
    assert runner.run_script("Get-VM") == ScriptResult(stdout=b"Get-VM")
    refused = runner.run_script("Get-VM ")  # not the registered text
    assert refused.exit_code == 1 and refused.stderr.startswith(b"#< CLIXML\r\n")


def test_clixml_lines_escaped() -> None:
    assert clixml_error("a<b\nc") == (
        b'#< CLIXML\r\n<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
        b'<S S="Error">a&lt;b_x000D__x000A_</S><S S="Error">c_x000D__x000A_</S></Objs>'
    )


@pytest.mark.parametrize(
    "data",
    [b"not xml", b"<a/>", f'<s:Envelope xmlns:s="{soap.S}"><s:Header/><s:Body/></s:Envelope>'.encode()],
)
def test_bad_requests_are_faults(data: bytes) -> None:
    with pytest.raises(soap.BadRequest) as raised:
        soap.parse_request(data)
    assert raised.value.code == soap.CODE_SCHEMA


def test_durations() -> None:
    assert soap.parse_timeout("PT20S") == 20.0
    assert soap.parse_timeout("PT7200.000S") == 7200.0
    for bad in ("P1D", "PTnanS", "PTinfS", "PT-1S", "PTS"):
        with pytest.raises(soap.BadRequest):
            soap.parse_timeout(bad)
