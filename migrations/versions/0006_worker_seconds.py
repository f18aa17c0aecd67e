"""the worker's own wall time per attempt (spawn to exit), apart from the supervisor's
claim, request and commit around it

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 23:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stage_attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("worker_seconds", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stage_attempts", schema=None) as batch_op:
        batch_op.drop_column("worker_seconds")
