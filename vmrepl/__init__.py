"""vmrepl: the shared library of the controller, the proxy agent and the target agent."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vmrepl")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
