"""jobs: name, estimate, stage log; evaluation jobs (kind, parent_id) and their result

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("name", sa.String(100)))
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="distill"))
        batch.add_column(sa.Column("parent_id", sa.String(40)))
        batch.add_column(sa.Column("estimate", sa.JSON()))
        batch.add_column(sa.Column("stage_log", sa.JSON()))
        batch.add_column(sa.Column("result", sa.JSON()))
    op.create_index("ix_jobs_parent_id", "jobs", ["parent_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_parent_id", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for column in ("result", "stage_log", "estimate", "parent_id", "kind", "name"):
            batch.drop_column(column)
