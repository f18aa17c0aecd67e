"""subband_files.ntimes held Nblts: store integrations and the time span; record the
calibrator choice and the observed duration of each group

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 13:20:00

``subband_files.ntimes`` was the length of ``Header/time_array`` (Nblts, e.g. 111,744 at
full size), not the number of integrations. The column is renamed ``n_integrations`` and
recomputed from the file where it is still readable (raw files are only read); where it is
not, the value is cleared rather than left wrong. ``groups.obs_duration_s`` is filled from
the recomputed spans.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("subband_files", schema=None) as batch_op:
        batch_op.alter_column("ntimes", new_column_name="n_integrations")
        batch_op.add_column(sa.Column("time_span_s", sa.Float(), nullable=True))
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.add_column(sa.Column("calibrator_choice", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("obs_duration_s", sa.Float(), nullable=True))
    _recompute_integrations()


def _recompute_integrations() -> None:
    from supervisor.ingest import read_time_axis

    conn = op.get_bind()
    files = sa.table(
        "subband_files",
        sa.column("id", sa.Integer),
        sa.column("path", sa.String),
        sa.column("group_id", sa.String),
        sa.column("status", sa.String),
        sa.column("n_integrations", sa.Integer),
        sa.column("time_span_s", sa.Float),
    )
    groups = sa.table(
        "groups", sa.column("group_id", sa.String), sa.column("obs_duration_s", sa.Float)
    )
    rows = conn.execute(
        sa.select(files.c.id, files.c.path, files.c.group_id, files.c.status).where(
            files.c.n_integrations.is_not(None)
        )
    ).all()
    spans: dict[str, float] = {}
    for row_id, path, group_id, status in rows:
        try:
            axis = read_time_axis(path)
        except Exception:  # noqa: BLE001 - unreadable now: clear the wrong value
            axis = None
        conn.execute(
            sa.update(files)
            .where(files.c.id == row_id)
            .values(
                n_integrations=axis.n_integrations if axis else None,
                time_span_s=axis.span_s if axis else None,
            )
        )
        if axis and group_id and status == "ready":
            spans[group_id] = max(spans.get(group_id, 0.0), axis.span_s)
    for group_id, span in spans.items():
        conn.execute(
            sa.update(groups).where(groups.c.group_id == group_id).values(obs_duration_s=span)
        )


def downgrade() -> None:
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.drop_column("obs_duration_s")
        batch_op.drop_column("calibrator_choice")
    with op.batch_alter_table("subband_files", schema=None) as batch_op:
        batch_op.drop_column("time_span_s")
        batch_op.alter_column("n_integrations", new_column_name="ntimes")
