"""Which modules of the `controller` extra each program needs, and the one-line refusal when one is missing.

Apart from `controller/__init__.py` so that `python -m controller.cli` can check without importing the
package's daemon entry point (the CLI must not import the daemon's layers; import-linter checks it)."""

from __future__ import annotations

import importlib.util

# The modules of the `controller` extra (pyproject.toml) each program imports; tzdata is data only.
DAEMON_NEEDS = ("sqlalchemy", "alembic", "aiosqlite", "croniter", "httpx", "winrm")
CLI_NEEDS = ("typer", "rich")


def require_extra(program: str, modules: tuple[str, ...]) -> None:
    """Exit with a message naming the extra when one of `modules` is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(
            f"{program} needs the controller extra: pip install 'vmrepl[controller]' (missing: {', '.join(missing)})"
        )
