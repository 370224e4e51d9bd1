"""Alembic environment: runs on the connection the controller hands over (controller.db.connect.migrate)."""

from __future__ import annotations

from alembic import context

from controller.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through controller.db.connect.migrate, which passes a connection")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
