"""`vmrepl`: the operator's CLI (a module per command group, assembled in controller.cli.main).

`run` is the entry point (`vmrepl`, `python -m controller.cli`): it checks the controller extra before it
imports typer and rich, so a host without it gets one line naming the extra rather than a traceback.
"""

from __future__ import annotations

from controller.extras import CLI_NEEDS, require_extra


def run() -> None:
    require_extra("vmrepl", CLI_NEEDS)
    from controller.cli.main import main

    main()
