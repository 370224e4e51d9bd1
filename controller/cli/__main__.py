"""`python -m controller.cli`: the operator CLI."""

from controller.cli.main import main

main()
