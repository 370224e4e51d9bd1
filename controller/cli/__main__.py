"""`python -m controller.cli`: as `vmrepl`, the extra checked first. (Not through `controller.cli()`: once
this package is imported, `controller.cli` names the package, not that function.)"""

from controller.extras import CLI_NEEDS, require_extra

require_extra("vmrepl", CLI_NEEDS)

from controller.cli.main import main  # noqa: E402 - only once the check passed

main()
