"""`python -m controller`: as `vmrepl-controller`. Through `controller.daemon`, so a host without the
controller extra gets the one line naming it rather than a traceback (found on an agent-only install)."""

from controller import daemon

daemon()
