"""Replica operations: failover, planned failover, undo, permanent failover, failback and its commit or undo,
test failover and its stop (docs/failover.md).

`plans` is the pure state machine (each operation's steps, which step undoes which, what a restart does),
`runner` walks one VM through it with every step written through the journal before it acts, `steps` holds
what each step does, `service` starts operation sessions, continues them after a crash and stops test
failovers at their deadline.
"""
