"""The PowerShell scripts the package ships (vmrepl/providers/hyperv/ps/), checked without Windows.

* every file, and every text sent (`scripts.text(name)`), parses with the tree-sitter PowerShell grammar;
* every WMI class, method, method parameter and property the scripts name is in `WMI`, a table taken from
  Microsoft's documentation of `root\\virtualization\\v2` (one page cited per class); every other member
  they use is a cmdlet's output property or .NET member listed in `OTHER_MEMBERS`, with its source;
* parameters are read only by common.ps1, from $env:VMREPL_PARAMS;
* each `[pscustomobject]@{...}` a script prints has exactly the fields of a result model (models.py);
* the layout `powershell.exe -Command -` needs: it runs stdin statement by statement and ends a multi-line
  statement at a blank line, so each script is one `Invoke-Vmrepl` call and no statement has a blank line inside.

Under CI=true a missing tree-sitter fails the module instead of skipping it.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from vmrepl.providers.hyperv import models as m
from vmrepl.providers.hyperv import scripts

try:
    import tree_sitter
    import tree_sitter_powershell
except ImportError:  # pragma: no cover - depends on the environment
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("tree-sitter-powershell is not installed (pip install '.[dev]')", allow_module_level=True)

LEARN = "https://learn.microsoft.com/en-us/windows/win32/hyperv_v2/"

# class -> (documentation page, properties, {method: parameters}); only what the scripts may use, as documented.
WMI: dict[str, tuple[str, set[str], dict[str, set[str]]]] = {
    "Msvm_ComputerSystem": (
        LEARN + "msvm-computersystem",
        {"Name", "ElementName", "EnabledState"},
        # requeststatechange-msvm-computersystem
        {"RequestStateChange": {"RequestedState", "Job", "TimeoutPeriod"}},
    ),
    "Msvm_ShutdownComponent": (
        LEARN + "msvm-shutdowncomponent",
        set(),
        # msvm-shutdowncomponent-initiateshutdown
        {"InitiateShutdown": {"Force", "Reason"}},
    ),
    "Msvm_VirtualHardDiskSettingData": (
        LEARN + "msvm-virtualharddisksettingdata",
        # Type 4 = Differencing, Format 3 = VHDX (the page's value lists)
        {"Type", "Format", "Path", "ParentPath"},
        {},
    ),
    "Msvm_VirtualSystemSettingData": (
        LEARN + "msvm-virtualsystemsettingdata",
        {"InstanceID", "ElementName", "VirtualSystemIdentifier", "VirtualSystemType", "CreationTime", "Parent"},
        {},
    ),
    "Msvm_VirtualSystemSnapshotSettingData": (
        LEARN + "msvm-virtualsystemsnapshotsettingdata",
        {"ConsistencyLevel", "GuestBackupType", "IgnoreNonSnapshottableDisks"},
        {},
    ),
    "Msvm_StorageAllocationSettingData": (
        LEARN + "msvm-storageallocationsettingdata",
        {"InstanceID", "ResourceType", "HostResource", "Parent"},
        {},
    ),
    "Msvm_VirtualSystemReferencePoint": (
        LEARN + "msvm-virtualsystemreferencepoint",
        {
            "InstanceID",
            "ReferencePointType",
            "ConsistencyLevel",
            "VirtualSystemIdentifier",
            "HasAssociatedData",
            "VirtualDiskIdentifiers",
            "ResilientChangeTrackingIdentifiers",
        },
        {},
    ),
    "Msvm_ConcreteJob": (
        LEARN + "msvm-concretejob",
        {"InstanceID", "JobState", "PercentComplete", "ErrorCode", "ErrorDescription", "ErrorSummaryDescription"},
        {},
    ),
    "Msvm_VirtualSystemSnapshotService": (
        LEARN + "msvm-virtualsystemsnapshotservice",
        set(),
        {
            # createsnapshot-msvm-virtualsystemsnapshotservice
            "CreateSnapshot": {"AffectedSystem", "SnapshotSettings", "SnapshotType", "ResultingSnapshot", "Job"},
            # destroysnapshot-msvm-virtualsystemsnapshotservice
            "DestroySnapshot": {"AffectedSnapshot", "Job"},
            # msvm-virtualsystemsnapshotservice-converttoreferencepoint
            "ConvertToReferencePoint": {"AffectedSnapshot", "ReferencePointSettings", "ResultingReferencePoint", "Job"},
        },
    ),
    "Msvm_VirtualSystemReferencePointService": (
        LEARN + "msvm-virtualsystemreferencepointservice",
        set(),
        # msvm-virtualsystemreferencepointservice-destroyreferencepoint
        {"DestroyReferencePoint": {"AffectedReferencePoint", "Job"}},
    ),
    "Msvm_ImageManagementService": (
        LEARN + "msvm-imagemanagementservice",
        set(),
        {
            # msvm-imagemanagementservice-getvirtualdiskchanges
            "GetVirtualDiskChanges": {
                "Path",
                "LimitId",
                "TargetSnapshotId",
                "ByteOffset",
                "ByteLength",
                "ProcessedByteLength",
                "ChangedByteOffsets",
                "ChangedByteLengths",
                "Job",
            },
            # createvirtualharddisk-msvm-imagemanagementservice
            "CreateVirtualHardDisk": {"VirtualDiskSettingData", "Job"},
            # mergevirtualharddisk-msvm-imagemanagementservice
            "MergeVirtualHardDisk": {"SourcePath", "DestinationPath", "Job"},
        },
    ),
    "Msvm_VirtualSystemManagementService": (
        LEARN + "msvm-virtualsystemmanagementservice",
        set(),
        {
            # modifysystemsettings-msvm-virtualsystemmanagementservice
            "ModifySystemSettings": {"SystemSettings", "Job"},
            # destroysystem-msvm-virtualsystemmanagementservice
            "DestroySystem": {"AffectedSystem", "Job"},
        },
    ),
    # Associations (Antecedent/Dependent or GroupComponent/PartComponent references only).
    "Msvm_SnapshotOfVirtualSystem": (LEARN + "msvm-snapshotofvirtualsystem", set(), {}),
    "Msvm_ReferencePointOfVirtualSystem": (LEARN + "msvm-referencepointofvirtualsystem", set(), {}),
    "Msvm_SettingsDefineState": (LEARN + "msvm-settingsdefinestate", set(), {}),
    "Msvm_VirtualSystemSettingDataComponent": (LEARN + "msvm-virtualsystemsettingdatacomponent", set(), {}),
    "Msvm_AffectedJobElement": (LEARN + "msvm-affectedjobelement", set(), {}),
    "Msvm_SystemDevice": (LEARN + "msvm-systemdevice", set(), {}),
}

# common.ps1's functions that return one WMI instance, by class: what `Invoke-VmreplMethod -Target $x` may
# call a method on when $x came from one of them.
INSTANCE_GETTERS = {
    "Get-VmreplComputerSystem": "Msvm_ComputerSystem",
    "Find-VmreplComputerSystem": "Msvm_ComputerSystem",
    "Get-VmreplShutdownComponent": "Msvm_ShutdownComponent",
}

# Members the scripts use that are not WMI's: Hyper-V cmdlets' output objects (learn.microsoft.com/powershell/
# module/hyper-v/<cmdlet>, and the real captures in the fact sheet 3.1/3.3), and .NET / PowerShell members.
OTHER_MEMBERS: dict[str, set[str]] = {
    "Get-VM (VirtualMachine)": {
        "Id",
        "Name",
        "State",
        "Generation",
        "Version",
        "ProcessorCount",
        "MemoryStartup",
        "DynamicMemoryEnabled",
        "MemoryMinimum",
        "MemoryMaximum",
        "CheckpointType",
        "Notes",
    },
    "Get-VMHardDiskDrive (HardDiskDrive)": {
        "Path",
        "DiskNumber",
        "ControllerType",
        "ControllerNumber",
        "ControllerLocation",
        "VMName",
    },
    "Get-VHD (VirtualHardDisk)": {"Size", "VhdFormat", "VhdType", "BlockSize", "LogicalSectorSize", "ParentPath"},
    "Get-VMNetworkAdapter (VMNetworkAdapter)": {"Name", "SwitchName", "MacAddress", "DynamicMacAddressEnabled"},
    "Get-VMNetworkAdapterVlan (VMNetworkAdapterVlanSetting)": {"OperationMode", "AccessVlanId"},
    "Get-VMFirmware (VMFirmware)": {"SecureBoot", "SecureBootTemplate"},
    "Get-VMSecurity (VMSecurity)": {"TpmEnabled"},
    "Get-VMFibreChannelHba (VMFibreChannelHba)": {"SanName"},
    "Get-VMSwitch (VMSwitch)": {"Name", "SwitchType"},
    "Get-VM (VirtualMachine), for Add-VMHardDiskDrive / Get-VM -Id": {"Id"},
    # register_vm and merge_vm_disks read their list items' fields (the params models) like $Params'.
    "models.NewDisk, NewNic, MergeDisk": (
        set(m.NewDisk.model_fields) | set(m.NewNic.model_fields) | set(m.MergeDisk.model_fields)
    ),
    "Get-VMHostSupportedVersion (VMHostSupportedVersion)": {"Version"},
    "Win32_OperatingSystem, Get-Item (FileInfo.VersionInfo)": {"Caption", "VersionInfo", "ProductVersion"},
    "CimInstance / CimClass / CimMethodResult": {"CimClass", "CimClassName", "CimClassProperties", "ReturnValue"},
    "ErrorRecord / InvocationInfo / CommandInfo": {
        "Exception",
        "Message",
        "InvocationInfo",
        "MyCommand",
        "CommandType",
    },
    ".NET": {
        "ToString",
        "Length",
        "Count",
        "Contains",
        "ContainsKey",
        "Add",
        "ToArray",
        "ToUniversalTime",
        "AddSeconds",
        "UtcNow",
        "Build",
        "MachineName",
        "OSVersion",
        "Out",
        "Write",
        "Flush",
        "OutputEncoding",
        "UTF8",
        "Unicode",
        "GetString",
        "FromBase64String",
        "Create",
        "Serialize",
        "None",
        "Empty",
        "TryParse",
        "Min",
        "GetNewClosure",
        "new",
    },
    "Invoke-VmreplMethod's reply (common.ps1)": {"Output", "Job"},
}

_PARSER = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))
FILES = ["common", *scripts.SCRIPTS]


def parse(text: str) -> tree_sitter.Tree:
    return _PARSER.parse(text.encode("utf-8"))


def nodes(node: tree_sitter.Node, kind: str) -> Iterator[tree_sitter.Node]:
    if node.type == kind:
        yield node
    for child in node.children:
        yield from nodes(child, kind)


def text_of(node: tree_sitter.Node) -> str:
    return (node.text or b"").decode("utf-8")


def problems(tree: tree_sitter.Tree) -> list[str]:
    found: list[str] = []

    def walk(n: tree_sitter.Node) -> None:
        if n.type == "ERROR" or n.is_missing:
            found.append(f"{n.type} at line {n.start_point[0] + 1}: {text_of(n)[:60]!r}")
        for c in n.children:
            walk(c)

    walk(tree.root_node)
    return found


def all_sources() -> dict[str, str]:
    return {name: scripts.source(name) for name in FILES}


def wmi_members() -> set[str]:
    names: set[str] = set()
    for _, properties, methods in WMI.values():
        names |= properties | set(methods)
        for parameters in methods.values():
            names |= parameters
    return names


# ---- parsing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_every_shipped_file_parses(name: str) -> None:
    assert problems(parse(scripts.source(name))) == []


@pytest.mark.parametrize("name", list(scripts.SCRIPTS))
def test_every_text_sent_parses(name: str) -> None:
    tree = parse(scripts.text(name))
    assert problems(tree) == [] and not tree.root_node.has_error


def test_the_parser_does_find_errors() -> None:
    # The check above cannot pass vacuously: a broken script is reported.
    assert problems(parse("function Broken {\n    if ($x -eq 1 {\n}\n"))
    assert problems(parse("$x = @{ a = 1"))


def test_scripts_are_ascii() -> None:
    # The text goes over stdin: ASCII reads the same in any code page the shell might have.
    for name, source in all_sources().items():
        assert source.isascii(), name


# ---- WMI names against Microsoft's documentation --------------------------------------------------------


def test_every_wmi_class_is_documented() -> None:
    for name, source in all_sources().items():
        for cls in set(re.findall(r"\bMsvm_\w+", source)):
            assert cls in WMI, f"{name}.ps1 uses {cls}, which is not in the table"


def test_every_wmi_method_and_its_arguments_are_documented() -> None:
    methods = {method: (cls, params) for cls, (_, _, ms) in WMI.items() for method, params in ms.items()}
    seen: set[str] = set()
    for name, source in all_sources().items():
        services = dict(re.findall(r"\$(\w+) = Get-VmreplService -ClassName (Msvm_\w+)", source))
        for var, getter in re.findall(r"\$(\w+) = ([\w-]+) ", source):
            if getter in INSTANCE_GETTERS:
                services[var] = INSTANCE_GETTERS[getter]
        tree = parse(source)
        hashes = {var: keys for var, keys in hash_assignments(tree)}
        for target, method, args in re.findall(
            r"Invoke-VmreplMethod -Target \$(\w+) -MethodName (\w+) -Arguments \$(\w+)", source
        ):
            assert method in methods, f"{name}: {method}"
            cls, params = methods[method]
            assert services.get(target) == cls, f"{name}: {method} is called on {services.get(target)}, not {cls}"
            assert hashes[args] <= params, f"{name}: {method} given {hashes[args] - params}"
            seen.add(method)
        for method in re.findall(r"-MethodName (\w+)", source):
            assert method in methods, f"{name}: {method}"
    assert seen == set(methods), "every documented method in the table is used (the table has nothing stale)"


def hash_assignments(tree: tree_sitter.Tree) -> Iterator[tuple[str, set[str]]]:
    for assignment in nodes(tree.root_node, "assignment_expression"):
        left = text_of(assignment.children[0]).strip()
        value = assignment.child_by_field_name("value")
        if not left.startswith("$") or value is None:
            continue
        literal = next(nodes(value, "hash_literal_expression"), None)
        if literal is not None and text_of(value).lstrip().startswith("@{"):
            yield left[1:], hash_keys(literal)


def hash_keys(literal: tree_sitter.Node) -> set[str]:
    body = next((c for c in literal.children if c.type == "hash_literal_body"), None)
    if body is None:
        return set()
    return {text_of(e.children[0]).strip() for e in body.children if e.type == "hash_entry"}


def test_every_member_used_is_documented() -> None:
    allowed = wmi_members() | set().union(*OTHER_MEMBERS.values())
    for name, source in all_sources().items():
        used = {
            text_of(n).strip("\"'")
            for n in nodes(parse(source).root_node, "member_name")
            # the parameters model's fields are checked against the model below
            if n.parent is None or text_of(n.parent.children[0]) != "$Params"
        }
        assert used <= allowed, f"{name}.ps1 uses members not in the tables: {sorted(used - allowed)}"
        # PascalCase keys of hashtables given to WMI (method arguments, embedded-instance properties)
        for literal in nodes(parse(source).root_node, "hash_literal_expression"):
            keys = {k for k in hash_keys(literal) if k[:1].isupper()}
            assert keys <= wmi_members() | {"Output", "Job"}, f"{name}.ps1: {sorted(keys - wmi_members())}"


def test_the_member_check_can_fail() -> None:
    used = {text_of(n) for n in nodes(parse("$rp.ResilientChangeTrackingIds").root_node, "member_name")}
    assert used == {"ResilientChangeTrackingIds"} and not used <= wmi_members()


@pytest.mark.parametrize("name", list(scripts.SCRIPTS))
def test_scripts_use_exactly_their_parameters(name: str) -> None:
    used = {
        text_of(n.children[-1])
        for n in nodes(parse(scripts.source(name)).root_node, "member_access")
        if text_of(n.children[0]) == "$Params"
    }
    assert used == set(scripts.SCRIPTS[name].params.model_fields)


# ---- parameters only through common.ps1 -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(scripts.SCRIPTS))
def test_scripts_read_parameters_only_through_common(name: str) -> None:
    source = scripts.source(name)
    assert "VMREPL_PARAMS" not in source and "$env:" not in source.lower().replace("$env:systemroot", "")
    assert "$Params" in source or scripts.SCRIPTS[name].params is m.NoParams
    code = [line for line in scripts.source("common").splitlines() if not line.lstrip().startswith("#")]
    assert sum(line.count("$env:VMREPL_PARAMS") for line in code) == 1


# ---- results match the models ------------------------------------------------------------------------------


def result_models(annotation: Any) -> set[type[BaseModel]]:
    """The models a result type prints, nested lists included (PsList[Model] is Annotated[list[Model], ...])."""
    found: set[type[BaseModel]] = set()
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        found.add(annotation)
        for f in annotation.model_fields.values():
            found |= result_models(f.annotation)
        return found
    for arg in typing.get_args(annotation):
        found |= result_models(arg)
    return found


def printed_objects(source: str) -> list[set[str]]:
    """The key sets of every `[pscustomobject]@{...}` in a script."""
    objects = []
    for cast in nodes(parse(source).root_node, "cast_expression"):
        if text_of(cast.children[0]).lower() != "[pscustomobject]":
            continue
        literal = next(nodes(cast, "hash_literal_expression"), None)
        if literal is not None:  # `[pscustomobject]$envelope` converts a dictionary built elsewhere
            objects.append(hash_keys(literal))
    return objects


def fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def test_every_printed_object_is_a_result_model() -> None:
    models = set().union(*(result_models(s.result) for s in scripts.SCRIPTS.values()))
    shapes = {frozenset(fields(model)): model for model in models}
    for name, source in all_sources().items():
        for keys in printed_objects(source):
            assert frozenset(keys) in shapes, f"{name}.ps1 prints {sorted(keys)}, which matches no result model"


@pytest.mark.parametrize("name", list(scripts.SCRIPTS))
def test_every_model_of_a_result_is_printed(name: str) -> None:
    printed = {frozenset(keys) for keys in printed_objects(scripts.text(name))}
    for model in result_models(scripts.SCRIPTS[name].result):
        assert frozenset(fields(model)) in printed, f"{name} never prints a {model.__name__}"


def test_the_model_check_can_fail() -> None:
    assert printed_objects("[pscustomobject]@{ removed = $true; extra = 1 }") == [{"removed", "extra"}]
    assert frozenset({"removed", "extra"}) != frozenset(fields(m.Removed))


# ---- the layout `powershell.exe -Command -` needs ---------------------------------------------------------


def top_level(tree: tree_sitter.Tree) -> list[tree_sitter.Node]:
    program = tree.root_node
    statements = next((c for c in program.children if c.type == "statement_list"), None)
    return [] if statements is None else [c for c in statements.children if c.type not in ("comment", ";")]


@pytest.mark.parametrize("name", list(scripts.SCRIPTS))
def test_statements_are_complete_at_each_blank_line(name: str) -> None:
    text = scripts.text(name)
    lines = text.split("\n")
    for statement in top_level(parse(text)):
        first, last = statement.start_point[0], statement.end_point[0]
        inside = [i + 1 for i in range(first, last + 1) if not lines[i].strip()]
        assert inside == [], f"{name}: blank line inside the statement at line {first + 1}: {inside}"
        if last > first:
            assert last + 1 < len(lines) and not lines[last + 1].strip(), f"{name}: no blank line after line {last + 1}"


@pytest.mark.parametrize("name", list(scripts.SCRIPTS))
def test_each_script_is_one_invoke_vmrepl_call(name: str) -> None:
    statements = top_level(parse(scripts.source(name)))
    assert len(statements) == 1 and text_of(statements[0]).startswith("Invoke-Vmrepl '")


def test_common_only_defines() -> None:
    # Nothing in common.ps1 can fail outside Invoke-Vmrepl's try: settings, assignments and functions.
    prologue = (
        "Set-StrictMode ",
        "$ErrorActionPreference = ",
        "$ProgressPreference = ",
        "Remove-TypeData ",
        "[Console]::OutputEncoding = ",
        "$Vmrepl",
    )
    for statement in top_level(parse(scripts.source("common"))):
        text = text_of(statement)
        assert statement.type == "function_statement" or text.startswith(prologue), text[:80]
