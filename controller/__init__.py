"""The controller daemon and the operator CLI.

An agent host installs vmrepl without extras; the controller needs `pip install 'vmrepl[controller]'`.
The two entry points below check for it before importing anything that needs it, so a missing extra is
one line naming it rather than a traceback.
"""

from __future__ import annotations

import importlib.util

# The modules of the `controller` extra (pyproject.toml) each program imports; tzdata is data only.
DAEMON_NEEDS = ("sqlalchemy", "alembic", "aiosqlite", "croniter", "httpx")
CLI_NEEDS = ("typer", "rich")


def require_extra(program: str, modules: tuple[str, ...]) -> None:
    """Exit with a message naming the extra when one of `modules` is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(
            f"{program} needs the controller extra: pip install 'vmrepl[controller]' (missing: {', '.join(missing)})"
        )


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
