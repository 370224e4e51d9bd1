"""The controller daemon (entry point in controller.entry) and the operator CLI (controller.cli.run)."""
