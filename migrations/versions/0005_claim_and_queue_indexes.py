"""indexes that keep claims and queue figures fast with a million finished groups: a
partial index of the claimable groups in claim order, one of the active groups by first
sight, and completion time

With planner statistics (ANALYZE, or PostgreSQL's autovacuum) saying that ``state`` has a
handful of values, SQLite scanned the whole table for a claim: 17 ms at 100,000 rows
(bench/orchestration.py). The partial indexes hold only the few live rows.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

CLAIMABLE = "state IN ('pending', 'retry_wait')"
ACTIVE = "state IN ('pending', 'retry_wait', 'running')"


def upgrade() -> None:
    op.create_index(
        "ix_groups_claimable",
        "groups",
        ["priority", "obs_start"],
        sqlite_where=sa.text(CLAIMABLE),
        postgresql_where=sa.text(CLAIMABLE),
    )
    op.create_index(
        "ix_groups_active",
        "groups",
        ["first_seen_at"],
        sqlite_where=sa.text(ACTIVE),
        postgresql_where=sa.text(ACTIVE),
    )
    op.create_index("ix_groups_completed_at", "groups", ["completed_at"])


def downgrade() -> None:
    op.drop_index("ix_groups_completed_at", table_name="groups")
    op.drop_index("ix_groups_active", table_name="groups")
    op.drop_index("ix_groups_claimable", table_name="groups")
