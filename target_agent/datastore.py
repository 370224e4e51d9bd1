"""Where replicas live inside the datastore root, and the checks that keep them there.

Every path a caller names is relative, made of plain name components, and
resolves (symlinks followed) inside the root. See docs/target-agent.md for
the layout.

Names starting with '.' are the target's own: no caller's path can name them (a plain name starts with a
letter or digit), so they never collide with a replica. `.mounts/` holds the mount records
(target_agent.mounts), `.trash/` what DeleteReplica is removing, and `.failback/` the failback disks: the
one such name a replica path may start with (`.failback/<job>/<vm>`), so a failback folder can never be a
job's replica.
"""

from __future__ import annotations

import os
from pathlib import Path

from vmrepl.disk.fileio import make_dirs
from vmrepl.names import FAILBACK_ROOT, check_name, check_replica_path, resolve_inside

__all__ = ["FAILBACK_ROOT", "Datastore"]
MOUNTS_DIR = ".mounts"
TRASH_DIR = ".trash"


class Datastore:
    def __init__(self, root: Path) -> None:
        make_dirs(root)
        self.root = Path(os.path.realpath(root))

    def vm_dir(self, replica_path: str) -> Path:
        parts = check_replica_path("replica_path", replica_path)
        return resolve_inside("replica_path", self.root.joinpath(*parts), [self.root], what="the datastore root")

    def disk_dir(self, replica_path: str, disk_id: str) -> Path:
        vm = self.vm_dir(replica_path)
        check_name("disk_id", disk_id)
        return resolve_inside("disk_id", vm / "disks" / disk_id, [self.root], what="the datastore root")

    @property
    def mounts_dir(self) -> Path:
        return self.root / MOUNTS_DIR

    @property
    def trash_dir(self) -> Path:
        return self.root / TRASH_DIR
