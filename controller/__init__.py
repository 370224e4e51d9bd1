"""The controller daemon and the operator CLI.

An agent host installs vmrepl without extras; the controller needs `pip install 'vmrepl[controller]'`.
The two entry points below check for it before importing anything that needs it, so a missing extra is
one line naming it rather than a traceback.
"""

from __future__ import annotations

from controller.extras import CLI_NEEDS, DAEMON_NEEDS, require_extra

__all__ = ["CLI_NEEDS", "DAEMON_NEEDS", "cli", "daemon", "require_extra"]


def daemon() -> None:
    """`vmrepl-controller`."""
    require_extra("vmrepl-controller", DAEMON_NEEDS)
    from controller.serve import main

    main()


def cli() -> None:
    """`vmrepl`."""
    require_extra("vmrepl", CLI_NEEDS)
    from controller.cli.main import main

    main()
