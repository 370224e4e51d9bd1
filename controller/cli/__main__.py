"""`python -m controller.cli`: as `vmrepl`, the extra checked first (one line naming it, not a traceback).
Not through controller.entry, which also reaches the daemon: the CLI imports none of the daemon's layers."""

from controller.extras import CLI_NEEDS, require_extra

require_extra("vmrepl", CLI_NEEDS)

from controller.cli.main import main  # noqa: E402 - only once the check passed

main()
