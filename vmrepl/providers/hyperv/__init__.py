"""The Hyper-V provider (issue 12), reached over WinRM: not built yet.

What exists now is the reading side of the host's PowerShell scripts: `envelope` turns the one JSON
envelope a script prints on stdout into a typed result or a `vmrepl.errors.HostError`, and `clixml`
turns the CLIXML a script leaves on stderr into message lines. The WinRM client, the shipped scripts and
the provider itself (inventory, recovery checkpoints, RCT) will live in this package too.
"""
