"""Where replicas live inside the datastore root, and the checks that keep them there.

Every path a caller names is relative, made of plain name components, and
resolves (symlinks followed) inside the root. See docs/target-agent.md for
the layout.
"""

from __future__ import annotations

import os
from pathlib import Path

from vmrepl.disk.fileio import make_dirs
from vmrepl.names import check_name, check_relative, resolve_inside


class Datastore:
    def __init__(self, root: Path) -> None:
        make_dirs(root)
        self.root = Path(os.path.realpath(root))

    def vm_dir(self, replica_path: str) -> Path:
        parts = check_relative("replica_path", replica_path)
        return resolve_inside("replica_path", self.root.joinpath(*parts), [self.root], what="the datastore root")

    def disk_dir(self, replica_path: str, disk_id: str) -> Path:
        vm = self.vm_dir(replica_path)
        check_name("disk_id", disk_id)
        return resolve_inside("disk_id", vm / "disks" / disk_id, [self.root], what="the datastore root")
