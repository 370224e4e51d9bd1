"""The database backends the controller's tests run on."""

from __future__ import annotations

import os

# SQLite always; PostgreSQL too when a URL is given (CI gives one).
BACKENDS = ["sqlite"] + (["postgresql"] if os.environ.get("VMREPL_TEST_DATABASE_URL") else [])
