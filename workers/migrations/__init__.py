"""Alembic migrations of the job store (run by workers.db.migrate)."""
