"""DeleteReplica: a VM replica removed whole (its disks, restore points, configurations and metadata).

Refused while a mount that is not flattened names the replica (its VM would lose its base). The replica's
folder is first renamed into `<datastore_root>/.trash/` (one durable rename: a crash leaves the replica
whole or gone, never half), then removed from there; what a crash leaves in the trash is removed when the
target starts (`empty_trash`). A failback folder's parent `.failback/<job>/` goes with its last VM's folder
(target_agent.failback.drop_empty_parents).
"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

from target_agent import mounts, restore_points, vm_replica
from target_agent.datastore import Datastore
from target_agent.failback import FAILBACK_FILE, drop_empty_parents
from target_agent.mount_registry import REGISTRY_DIR
from vmrepl.disk.fileio import make_dirs, remove, remove_tree, rename
from vmrepl.errors import FailedPrecondition

# What a replica's folder holds (target_agent.replica, restore_points, mount_registry, failback): anything
# else (another replica nested inside, a file of someone else's) is never removed with it.
_REPLICA_ENTRIES = frozenset(
    {
        restore_points.POINTS_FILE,
        restore_points.CONFIG_DIR,
        restore_points.GIVEN_AWAY_FILE,
        "disks",
        REGISTRY_DIR,
        FAILBACK_FILE,
    }
)


def delete_replica(ds: Datastore, guards: vm_replica.Guards, replica_path: str) -> bool:
    """Remove the replica at `replica_path`; False when there is none."""
    vm_dir = ds.vm_dir(replica_path)
    try:
        st = os.lstat(vm_dir)
    except FileNotFoundError:
        drop_empty_parents(ds.root, vm_dir)  # a deletion cut short after its rename: its parents still go
        return False
    if not stat.S_ISDIR(st.st_mode):
        raise FailedPrecondition(f"replica {replica_path} is not a folder: refused")
    with restore_points.vm_lock(vm_dir):
        live = [r.mount_id for r in mounts.list_records(ds, replica_path) if r.state != mounts.FLATTENED]
        if live:
            raise FailedPrecondition(
                f"replica {replica_path} is mounted ({', '.join(live)}): UnmountPoint (or FlattenMount) first"
            )
        _check_entries(vm_dir, replica_path)
        for d in vm_replica.disk_dirs(vm_dir):  # a stream still open on a disk stops touching it
            with guards(d).lock:
                guards(d).claim_locked()
        if ds.trash_dir.is_symlink():
            raise FailedPrecondition(f"{ds.trash_dir} is a symbolic link: move the folder itself back in place")
        make_dirs(ds.trash_dir)
        doomed = ds.trash_dir / uuid.uuid4().hex
        rename(vm_dir, doomed)
    drop_empty_parents(ds.root, vm_dir)  # a failback folder's `.failback/<job>/`, once no VM's is in it
    remove_tree(doomed)
    return True


def _check_entries(vm_dir: Path, replica_path: str) -> None:
    for entry in os.scandir(vm_dir):
        name = entry.name[: -len(".tmp")] if entry.name.endswith(".tmp") else entry.name
        if name not in _REPLICA_ENTRIES:
            raise FailedPrecondition(
                f"replica {replica_path} holds {entry.name}, which is no part of a replica (another replica inside "
                "it?): nothing was deleted"
            )


def empty_trash(ds: Datastore) -> None:
    """Finish the deletions a crash cut short."""
    trash = ds.trash_dir
    if trash.is_symlink() or not trash.is_dir():
        return
    for entry in os.scandir(trash):
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            remove_tree(path)
        else:
            remove(path)
