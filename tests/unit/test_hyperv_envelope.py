"""Reading what the Hyper-V host's scripts print: the stdout envelope with PowerShell 5.1's JSON quirks,
and CLIXML on stderr. Fixtures: tests/fixtures/hyperv/ (SOURCES.md says which parts are real captures)."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from vmrepl.errors import HostError, HostOutputError, VmreplError
from vmrepl.providers.hyperv.clixml import StderrLine, decode_stderr, stderr_message
from vmrepl.providers.hyperv.envelope import PsDateTime, PsList, as_list, read_envelope
from vmrepl.rpc import status_for

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "hyperv"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


class VmState(IntEnum):  # Microsoft.HyperV.PowerShell.VMState, as 5.1 prints it: an integer
    Other = 1
    Running = 2
    Off = 3


class VhdFormat(IntEnum):
    VHD = 2
    VHDX = 3


class VhdType(IntEnum):
    Fixed = 2
    Dynamic = 3
    Differencing = 4


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Vm(_Model):
    VMName: str
    VMId: str
    State: VmState
    Version: str
    Generation: int


class Vhd(_Model):
    DiskIdentifier: str
    Size: int
    VhdFormat: VhdFormat
    VhdType: VhdType
    Path: str
    ParentPath: str | None


class VmHost(_Model):
    Name: str
    ID: str
    OverallState: int
    VirtualizationPlatform: int
    HyperVVersion: str


class Item(_Model):
    Name: str
    CreationTime: PsDateTime
    LastWriteTime: PsDateTime
    Parent: str


J2 = Vm(
    VMName="测试虚拟机1", VMId="4f27bc34-0d01-4057-bc93-a4c556d61644", State=VmState.Off, Version="5.0", Generation=2
)


# ---- results and the 5.1 quirks -----------------------------------------------------------------------


def test_one_vm_printed_without_its_array_is_a_list_of_one() -> None:
    # get-vm-one.json also carries a UTF-8 BOM, the 5.1 pretty format and a non-ASCII name in UTF-8.
    assert read_envelope(fixture("get-vm-one.json"), PsList[Vm]) == [J2]


def test_several_vms_are_a_list_and_escaped_non_ascii_names_stay_intact() -> None:
    vms: list[Vm] = read_envelope(fixture("get-vm-two.json"), PsList[Vm])
    assert [v.VMName for v in vms] == ["测试虚拟机1", "web01"]
    assert vms[0] == J2
    assert vms[1].State is VmState.Running


def test_no_vm_is_an_empty_list() -> None:
    assert read_envelope(fixture("get-vm-none.json"), PsList[Vm]) == []


def test_non_ascii_name_survives_utf8_bytes_and_str_alike() -> None:
    raw = fixture("get-vm-one.json")
    assert read_envelope(raw.decode("utf-8"), PsList[Vm])[0].VMName == "测试虚拟机1"
    assert "测试虚拟机1".encode() in raw  # the fixture holds the name as UTF-8, not as \u escapes


def test_enums_printed_as_integers_become_intenums() -> None:
    vhd = read_envelope(fixture("get-vhd-avhdx.json"), Vhd)
    assert vhd.VhdFormat is VhdFormat.VHDX and vhd.VhdType is VhdType.Differencing
    assert vhd.Size == 136365211648
    assert vhd.Path.endswith("CentOS7_04455719-5F4C-4ED1-AA4B-631F44AB561C.avhdx")
    assert vhd.ParentPath == r"C:\Users\Public\Documents\Hyper-V\Virtual Hard Disks\CentOS7.vhdx"


def test_whitespace_around_the_json_is_ignored() -> None:
    raw = fixture("get-vmhost.json")
    assert raw[:1].isspace() and raw.rstrip(b"\n")[-1:].isspace()
    host = read_envelope(raw, VmHost)
    assert (host.Name, host.HyperVVersion, host.OverallState) == ("hyperv03.hyper.com", "10.0.14393.0", 0)


def test_ps51_dates_become_aware_utc_datetimes() -> None:
    item = read_envelope(fixture("get-item-dates.json"), Item)
    assert item.CreationTime == datetime(2015, 7, 7, 2, 38, 21, 491000, tzinfo=UTC)
    # Get-Date's {"value": "\/Date(ms)\/", "DisplayHint": 2, "DateTime": "...02:13:02"} (a BST local time)
    assert item.LastWriteTime == datetime(2024, 7, 14, 1, 13, 2, 928000, tzinfo=UTC)
    assert item.CreationTime.utcoffset() is not None and item.LastWriteTime.tzinfo is UTC


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('"2024-07-14T02:13:02.9280000Z"', datetime(2024, 7, 14, 2, 13, 2, 928000, tzinfo=UTC)),
        ('"2024-07-14T03:13:02.9280000+01:00"', datetime(2024, 7, 14, 2, 13, 2, 928000, tzinfo=UTC)),
        ('"\\/Date(-1000)\\/"', datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ],
)
def test_iso_dates_with_an_offset_are_read_as_utc(text: str, expected: datetime) -> None:
    got: datetime = read_envelope(_result(text), PsDateTime)
    assert got == expected and got.tzinfo is UTC


def test_as_list() -> None:
    assert as_list(None) == []
    assert as_list({"a": 1}) == [{"a": 1}]
    assert as_list("x") == ["x"]
    assert as_list([1, 2]) == [1, 2]
    assert as_list([]) == []


# ---- error envelopes -------------------------------------------------------------------------------------


def test_error_envelope_with_a_wmi_code_raises_host_error() -> None:
    with pytest.raises(HostError) as e:
        read_envelope(fixture("error-createsnapshot.json"), PsList[Vm])
    assert (e.value.host, e.value.operation, e.value.code) == (
        "hyperv03.hyper.com",
        "Msvm_VirtualSystemSnapshotService.CreateSnapshot",
        32775,
    )
    assert "current state" in e.value.description and "32775" in str(e.value)
    code, message = status_for(e.value)
    assert code.name == "FAILED_PRECONDITION" and "CreateSnapshot" in message


def test_error_envelope_of_a_cmdlet_has_no_code_and_keeps_non_ascii() -> None:
    with pytest.raises(HostError) as e:
        read_envelope(fixture("error-cmdlet.json"), Vm)
    assert e.value.code is None and "测试虚拟机2" in e.value.description
    assert "return code" not in str(e.value)


def test_an_error_envelope_wins_over_a_result_type_it_would_not_match() -> None:
    # The error is raised as HostError even though its fields are nothing like a Vm.
    with pytest.raises(HostError):
        read_envelope(fixture("error-createsnapshot.json"), Vm)


# ---- refusals ----------------------------------------------------------------------------------------------

OK = '{"ok":true,"host":"hv01","operation":"Get-VM","result":%s}'


def _result(payload: str) -> str:
    return OK % payload


VM_JSON = '{"VMName":"a","VMId":"x","State":3,"Version":"9.0","Generation":2}'


@pytest.mark.parametrize(
    ("stdout", "says"),
    [
        (b"", "printed nothing"),
        (b"\xef\xbb\xbf \r\n", "printed nothing"),
        ((_result(VM_JSON) + "\r\n" + _result(VM_JSON)).encode(), "more than one JSON document"),
        (_result(VM_JSON).encode() + b"WARNING: Resulting JSON is truncated", "more than one JSON document"),
        (_result(VM_JSON)[:-20].encode(), "not complete JSON"),
        (b"The command line is too long.", "not complete JSON"),
        (b"[" + _result(VM_JSON).encode() + b"]", "JSON list, not an envelope"),
        (b'"ok"', "JSON str, not an envelope"),
        (b'{"ok":true,"ok":false,"host":"h","operation":"o","result":null}', "key 'ok' twice"),
        (_result('{"Size":NaN}').encode(), "NaN"),
        (b"\xff\xfe{\x00", "not UTF-8"),
        (b'{"host":"h","operation":"o","result":null}', "not an envelope: ok: Field required"),
        (b'{"ok":"true","host":"h","operation":"o","result":null}', "not an envelope: ok"),
        (b'{"ok":true,"operation":"o","result":[]}', "host: Field required"),
        (b'{"ok":true,"host":"","operation":"o","result":[]}', "host: String should have at least 1"),
        (b'{"ok":true,"host":"h","operation":"o"}', "result: Field required"),
        (b'{"ok":true,"host":"h","operation":"o","result":[],"extra":1}', "extra: Extra inputs"),
        (b'{"ok":false,"host":"h","operation":"o","code":5}', "error envelope is malformed: message"),
        (b'{"ok":false,"host":"h","operation":"o","message":"m"}', "error envelope is malformed: code"),
        (b'{"ok":false,"host":"h","operation":"o","message":"m","code":"32775"}', "malformed: code"),
        (b'{"ok":false,"host":7,"operation":"o","message":"m","code":1}', "malformed: host"),
    ],
)
def test_anything_but_exactly_one_envelope_is_refused(stdout: bytes, says: str) -> None:
    with pytest.raises(HostOutputError) as e:
        read_envelope(stdout, PsList[Vm])
    assert says in str(e.value)
    assert isinstance(e.value, VmreplError) and status_for(e.value)[0].name == "INTERNAL"


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        # An enum as a string, or a number as a string, is not what the scripts print: refused, not coerced.
        ('{"VMName":"a","VMId":"x","State":"3","Version":"9.0","Generation":2}', "result.0.State"),
        ('{"VMName":"a","VMId":"x","State":"Off","Version":"9.0","Generation":2}', "result.0.State"),
        ('{"VMName":"a","VMId":"x","State":3,"Version":"9.0","Generation":"2"}', "result.0.Generation"),
        ('{"VMName":"a","VMId":"x","State":3,"Version":9.0,"Generation":2}', "result.0.Version"),
        ('{"VMName":"a","VMId":"x","State":3,"Version":"9.0","Generation":true}', "result.0.Generation"),
        ('{"VMName":"a","VMId":"x","State":99,"Version":"9.0","Generation":2}', "result.0.State"),
        ('{"VMName":"a","VMId":"x","State":3,"Version":"9.0"}', "result.0.Generation: Field required"),
        # Depth truncation turns a nested object into its ToString(): a string where an object belongs.
        ('"@{VMName=a; VMId=x}"', "result.0: Input should be an object"),
        ('[{"value":[1,2],"Count":2}]', "result.0.VMName: Field required"),
    ],
)
def test_values_of_the_wrong_type_are_refused(payload: str, says: str) -> None:
    with pytest.raises(HostOutputError) as e:
        read_envelope(_result(payload), PsList[Vm])
    assert says in str(e.value)


@pytest.mark.parametrize(
    "payload", ['"2024-07-14T02:13:02"', '"\\/Date(abc)\\/"', '"yesterday"', "1436236701491", '{"value":"x"}']
)
def test_bad_or_zoneless_dates_are_refused(payload: str) -> None:
    with pytest.raises(HostOutputError) as e:
        read_envelope(_result(payload), PsDateTime)
    assert "result" in str(e.value)


# ---- CLIXML on stderr --------------------------------------------------------------------------------------


def test_clixml_error_stream_decodes_like_pywinrm() -> None:
    lines = decode_stderr(fixture("stderr-write-error.clixml"))
    assert lines[0] == StderrLine("Error", 'Write-Error "Error" : Error')
    assert all(line.stream == "Error" for line in lines)
    assert [line.text for line in lines][-1] == "    + PSComputerName        : localhost"
    assert not any("_x000D_" in line.text for line in lines)
    assert len(lines) == 6


def test_clixml_progress_records_are_dropped_and_escapes_decoded() -> None:
    lines = decode_stderr(fixture("stderr-progress-warning.clixml"))
    # _x005F_ is a literal underscore, so "_x005F_x0041_" reads "_x0041_", not "A".
    assert lines == [StderrLine("warning", "VM _x0041_ name: 测试虚拟机1")]
    assert "Preparing modules" not in stderr_message(fixture("stderr-progress-warning.clixml"))


@pytest.mark.parametrize(
    "stderr",
    [
        b'#< CLIXML\r\n<Objs><S S="Error">unclosed',
        b'#< CLIXML\r\n<!DOCTYPE x [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><Objs><S S="Error">&b;</S></Objs>',
        b'#< CLIXML\r\n<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><Objs><S S="Error">&e;</S></Objs>',
        b"#< CLIXML\r\n\xff\xfe<Objs>",
    ],
)
def test_malformed_or_hostile_clixml_falls_back_to_raw_text(stderr: bytes) -> None:
    lines = decode_stderr(stderr)
    assert lines and lines[0] == StderrLine("", "#< CLIXML")
    assert all(line.stream == "" for line in lines)
    assert "root:" not in stderr_message(stderr)
    assert "aaaaaaaa" not in stderr_message(stderr)  # the entities were never expanded


def test_plain_stderr_is_split_into_lines() -> None:
    assert decode_stderr("The command line is too long.\r\n\r\n") == [StderrLine("", "The command line is too long.")]
    assert decode_stderr(b"") == []


def test_strings_inside_objects_are_properties_not_stream_lines() -> None:
    stderr = (
        '#< CLIXML\r\n<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
        '<Obj S="information" RefId="0"><MS><S N="Source">C:\\script.ps1</S></MS></Obj>'
        '<S S="Error">denied_x000D__x000A_</S></Objs>'
    )
    assert decode_stderr(stderr) == [StderrLine("Error", "denied")]
