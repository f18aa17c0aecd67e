"""a calibrated group's measurement set: size unknown (0) where it may have been recorded
before calibrate wrote into the MS

calibrate writes MODEL_DATA and CORRECTED_DATA into the convert MS in place. Before commit
72b1a89 its commit did not record the MS's new size, so the state check (``check-state``,
and the periodic state-check job) called every such MS a size mismatch, and ``--repair``
would have requeued completed groups from convert. Rows written since are right, but
nothing in the database tells the two apart; so the convert MS row of every group whose
calibrate has committed gets size 0, which the state check reads as "size unknown": it still
finds the MS if it is missing, and calibrate's next commit records its size again.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27 08:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        sa.text(
            """
            UPDATE artifacts SET bytes = 0
            WHERE stage = 'convert' AND kind = 'ms' AND pruned_at IS NULL
              AND group_id IN (
                SELECT group_id FROM stage_attempts
                WHERE stage = 'calibrate' AND outcome = 'succeeded'
              )
            """
        )
    )


def downgrade() -> None:
    pass  # the sizes it forgot were the suspect ones; there is nothing to restore
