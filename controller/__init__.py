"""The controller daemon and the operator CLI (entry points in controller.entry)."""
