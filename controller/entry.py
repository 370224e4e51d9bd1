"""The controller's two entry points, `vmrepl-controller` and `vmrepl`.

An agent host installs vmrepl without extras; the controller needs `pip install 'vmrepl[controller]'`.
Each entry point checks for it before importing anything that needs it, so a missing extra is one line
naming it rather than a traceback. (Here rather than in `controller/__init__.py`: a function `cli` there
would be replaced by the subpackage `controller.cli` as soon as that is imported.)
"""

from __future__ import annotations

from controller.extras import CLI_NEEDS, DAEMON_NEEDS, require_extra


def daemon() -> None:
    """`vmrepl-controller` and `python -m controller`."""
    require_extra("vmrepl-controller", DAEMON_NEEDS)
    from controller.serve import main

    main()


def cli() -> None:
    """`vmrepl` and `python -m controller.cli`."""
    require_extra("vmrepl", CLI_NEEDS)
    from controller.cli.main import main

    main()
