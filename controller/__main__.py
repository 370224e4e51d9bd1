"""`python -m controller`: as `vmrepl-controller` (the extra checked first: one line naming it, not a traceback)."""

from controller.entry import daemon

daemon()
