"""The PowerShell scripts the package ships, by name, with what each takes and prints (models.py).

Each script is `ps/<name>.ps1`; what is sent to the host is `ps/common.ps1` (strict mode, UTF-8
output, `$ProgressPreference`, reading the parameters, printing the envelope, waiting for a WMI job) followed
by the script. The text is fixed: parameters never enter it (see winrm.py), so the host always runs exactly
what the package ships, and the test stand-in recognises a script by its exact text.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Any

from pydantic import BaseModel

from vmrepl.providers.hyperv import models as m
from vmrepl.providers.hyperv.envelope import PsList


@dataclass(frozen=True)
class Script:
    name: str
    params: type[BaseModel]
    # What read_envelope validates the result as (a model, or PsList[...] of one).
    result: Any


SCRIPTS: dict[str, Script] = {
    s.name: s
    for s in (
        Script("host_info", m.NoParams, m.HostInfo),
        Script("list_vms", m.NoParams, PsList[m.Vm]),
        # The VMs whose id or name is `vm`: none, one, or several (Hyper-V allows two VMs one name).
        Script("get_vm", m.VmParams, PsList[m.Vm]),
        Script("create_checkpoint", m.CreateCheckpointParams, m.Snapshot),
        # Every snapshot of the VM (recovery or not): the provider keeps vmrepl's and reports the others.
        Script("list_checkpoints", m.VmParams, PsList[m.Snapshot]),
        Script("remove_checkpoint", m.SnapshotParams, m.Removed),
        Script("convert_checkpoint", m.SnapshotParams, m.ReferencePoint),
        Script("list_reference_points", m.VmParams, PsList[m.ReferencePoint]),
        Script("destroy_reference_point", m.ReferencePointParams, m.Removed),
        Script("disk_changes", m.DiskChangesParams, m.DiskChanges),
        # Failover (docs/hyperv.md, "Failover on Hyper-V").
        Script("register_vm", m.RegisterVmParams, m.Vm),
        Script("unregister_vm", m.UnregisterVmParams, m.Removed),
        Script("change_vm_state", m.VmStateParams, m.Power),
        Script("shutdown_vm", m.VmTimeoutParams, m.Power),
        Script("vm_power", m.VmParams, m.Power),
        Script("merge_vm_disks", m.MergeDisksParams, m.Merged),
    )
}

_PACKAGE = "vmrepl.providers.hyperv.ps"


def source(name: str) -> str:
    """One shipped .ps1 file as it is in the package (common.ps1 included by `text`, not here)."""
    return resources.files(_PACKAGE).joinpath(f"{name}.ps1").read_text(encoding="utf-8")


@functools.cache
def text(name: str) -> str:
    """The exact script sent for `name`: common.ps1, then the script. KeyError for an unknown name."""
    script = SCRIPTS[name]
    return source("common") + "\n" + source(script.name)
