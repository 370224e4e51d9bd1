"""`python -m controller.cli`: as `vmrepl`."""

from controller.cli import run

run()
