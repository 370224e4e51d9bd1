"""The daemon's entry point, `vmrepl-controller` (the CLI's is controller.cli.run).

An agent host installs vmrepl without extras; the controller needs `pip install 'vmrepl[controller]'`.
The entry point checks for it before importing anything that needs it, so a missing extra is one line
naming it rather than a traceback.
"""

from __future__ import annotations

from controller.extras import DAEMON_NEEDS, require_extra


def daemon() -> None:
    """`vmrepl-controller` and `python -m controller`."""
    require_extra("vmrepl-controller", DAEMON_NEEDS)
    from controller.serve import main

    main()
