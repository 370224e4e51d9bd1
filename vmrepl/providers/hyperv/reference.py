"""The reference string of a kept RCT reference point, and how disks are paired with what the host lists.

`keep_reference` turns a recovery checkpoint into a reference point and records, in the string the restore
point keeps, what a later `changed_ranges` needs: the reference point's InstanceID (to see that it still
exists and to destroy it), the VM it belongs to, and per disk the RCT id to pass as `LimitId` with the
disk's virtual size then (a resize makes the ranges meaningless). Compact JSON with sorted keys, e.g.

    {"d":{"scsi0-0":["rctX:5bfde23b:ce75:4303:b54f:6c18394f105c:00000001",42949672960]},"rp":"...","v":1,"vm":"..."}

The string comes back from the database and the target later, so it is parsed strictly (`parse`).

Disks are paired by the WMI InstanceID of their `Msvm_StorageAllocationSettingData`, never by position. A
drive's InstanceID is `Microsoft:<settings GUID>\\<controller id>\\<controller address>\\<location>\\L`:
the first part names the settings it belongs to (the VM's, or a snapshot's), the rest the drive's slot,
which is the same in the VM and in each of its snapshots. A reference point's `VirtualDiskIdentifiers`
and a snapshot's disks are matched to the VM's drives by the whole InstanceID when it is equal, else by
the slot.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from vmrepl.errors import PathError
from vmrepl.names import check_name

# What the restore point's reference column may hold; a VM with so many disks that their RCT ids do not fit
# keeps those that do (the others fall back to digests, with the reason).
REFERENCE_LIMIT = 4096
VERSION: Literal[1] = 1

_Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]
_Size = Annotated[int, Field(ge=0, le=2**63 - 1)]


class _Reference(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    v: Literal[1]
    rp: _Id
    vm: _Id
    d: dict[str, tuple[_Id, _Size]]


@dataclass(frozen=True, slots=True)
class RctDisk:
    rct_id: str
    size: int


@dataclass(frozen=True, slots=True)
class RctReference:
    reference_point_id: str
    vm_id: str
    disks: Mapping[str, RctDisk]


class BadReference(ValueError):
    """A reference string that is not one `encode` made."""


def encode(ref: RctReference) -> str:
    model = _Reference(
        v=VERSION,
        rp=ref.reference_point_id,
        vm=ref.vm_id,
        d={k: (d.rct_id, d.size) for k, d in ref.disks.items()},
    )
    return json.dumps(model.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse(text: str) -> RctReference:
    """The reference a string holds; BadReference saying why when it is not one `encode` made."""
    if not text:
        raise BadReference("the reference is empty (the restore point was taken without an RCT reference point)")
    if len(text.encode("utf-8", "surrogatepass")) > REFERENCE_LIMIT:
        raise BadReference(f"the reference is longer than {REFERENCE_LIMIT} bytes")
    try:
        model = _Reference.model_validate_json(text)
        for disk_id in model.d:
            check_name("disk_id", disk_id)
    except (ValidationError, PathError) as e:
        raise BadReference(f"the reference is not an RCT reference vmrepl wrote ({_first_error(e)})") from None
    disks = {k: RctDisk(rct_id, size) for k, (rct_id, size) in model.d.items()}
    return RctReference(reference_point_id=model.rp, vm_id=model.vm, disks=disks)


def _first_error(e: ValidationError | PathError) -> str:
    if isinstance(e, PathError):
        return str(e)
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "document"
    return f"{where}: {err['msg']}"


def slot(instance_id: str) -> str:
    """The drive slot of a SASD InstanceID: what follows the settings' own id, compared without case."""
    _, sep, rest = instance_id.partition("\\")
    return (rest if sep else instance_id).upper()


T = TypeVar("T")


def pair(instance_ids: Iterable[str], items: Iterable[T], key: Callable[[T], str]) -> dict[str, T]:
    """Each InstanceID of `instance_ids` that names one of `items` (by `key`, the item's InstanceID), to it.

    Exact InstanceIDs first, then the slot; an id naming no item, or a slot two items share, is left out:
    the caller decides what a missing pair means. Never by position."""
    exact: dict[str, T] = {}
    by_slot: dict[str, list[T]] = {}
    for item in items:
        exact[key(item).upper()] = item
        by_slot.setdefault(slot(key(item)), []).append(item)
    out: dict[str, T] = {}
    for iid in instance_ids:
        found = exact.get(iid.upper())
        if found is None:
            candidates = by_slot.get(slot(iid), [])
            found = candidates[0] if len(candidates) == 1 else None
        if found is not None:
            out[iid] = found
    return out
