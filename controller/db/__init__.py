"""The controller's configuration database: SQLAlchemy 2 (async), Alembic migrations applied at start.

SQLite (aiosqlite) is the embedded default; PostgreSQL (asyncpg) works through the same code by URL.
"""
