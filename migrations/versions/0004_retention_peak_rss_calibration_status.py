"""retention marks on artifacts and products, worker peak RSS per attempt, and the reason a
calibration set was made unusable or retired

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 14:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("artifacts", "products"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("pruned_at", sa.DateTime(), nullable=True))
            batch_op.add_column(sa.Column("pruned_rule", sa.String(length=64), nullable=True))
    with op.batch_alter_table("stage_attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("peak_rss_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("calibration_sets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("calibration_sets", schema=None) as batch_op:
        batch_op.drop_column("status_reason")
    with op.batch_alter_table("stage_attempts", schema=None) as batch_op:
        batch_op.drop_column("peak_rss_bytes")
    for table in ("products", "artifacts"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("pruned_rule")
            batch_op.drop_column("pruned_at")
