"""the worker's CPU time per attempt (user + system, with the descendants it waited for),
beside its wall time: how many cores each stage keeps busy

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 02:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stage_attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("worker_cpu_seconds", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stage_attempts", schema=None) as batch_op:
        batch_op.drop_column("worker_cpu_seconds")
