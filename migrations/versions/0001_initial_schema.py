"""initial schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-25 19:51:31.356374
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "groups",
        sa.Column("group_id", sa.String(length=32), nullable=False),
        sa.Column("obs_start", sa.DateTime(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("stage", sa.String(length=32), nullable=True),
        sa.Column("state_reason", sa.Text(), nullable=True),
        sa.Column("error_category", sa.String(length=16), nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("pointing_dec_deg", sa.Float(), nullable=True),
        sa.Column("is_calibrator", sa.Boolean(), nullable=False),
        sa.Column("calibrator_name", sa.String(length=32), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("crash_count", sa.Integer(), nullable=False),
        sa.Column("fallback_tier", sa.Integer(), nullable=False),
        sa.Column("fencing_token", sa.BigInteger(), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("correlation_id", sa.String(length=36), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("completed_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("group_id", name=op.f("pk_groups")),
    )
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_groups_obs_start"), ["obs_start"], unique=False)
        batch_op.create_index(
            "ix_groups_runnable", ["state", "priority", "obs_start"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_groups_state"), ["state"], unique=False)

    op.create_table(
        "calibration_sets",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("group_id", sa.String(length=32), nullable=False),
        sa.Column("calibrator", sa.String(length=32), nullable=False),
        sa.Column("solved_at", sa.DateTime(), nullable=False),
        sa.Column("valid_from", sa.DateTime(), nullable=False),
        sa.Column("valid_until", sa.DateTime(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"], ["groups.group_id"], name=op.f("fk_calibration_sets_group_id_groups")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibration_sets")),
    )
    with op.batch_alter_table("calibration_sets", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_calibration_sets_group_id"), ["group_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_calibration_sets_valid_from"), ["valid_from"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_calibration_sets_valid_until"), ["valid_until"], unique=False
        )

    op.create_table(
        "stage_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("group_id", sa.String(length=32), nullable=False),
        sa.Column("stage", sa.String(length=32), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("fallback_tier", sa.Integer(), nullable=False),
        sa.Column("fencing_token", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("workdir", sa.String(length=1024), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("pgid", sa.Integer(), nullable=True),
        sa.Column("proc_start_time", sa.Float(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("error_category", sa.String(length=16), nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error_type", sa.String(length=128), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("hint", sa.Text(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("correlation_id", sa.String(length=36), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"], ["groups.group_id"], name=op.f("fk_stage_attempts_group_id_groups")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stage_attempts")),
    )
    with op.batch_alter_table("stage_attempts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_stage_attempts_group_id"), ["group_id"], unique=False)

    op.create_table(
        "subband_files",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("group_id", sa.String(length=32), nullable=True),
        sa.Column("subband", sa.Integer(), nullable=False),
        sa.Column("file_time", sa.DateTime(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("mtime_ns", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason_category", sa.String(length=16), nullable=True),
        sa.Column("reason_code", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("first_seen_at", sa.DateTime(), nullable=False),
        sa.Column("observed_at", sa.DateTime(), nullable=False),
        sa.Column("ready_at", sa.DateTime(), nullable=True),
        sa.Column("ntimes", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["group_id"], ["groups.group_id"], name=op.f("fk_subband_files_group_id_groups")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subband_files")),
        sa.UniqueConstraint("path", name=op.f("uq_subband_files_path")),
    )
    with op.batch_alter_table("subband_files", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_subband_files_group_id"), ["group_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_subband_files_status"), ["status"], unique=False)

    op.create_table(
        "transitions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("group_id", sa.String(length=32), nullable=False),
        sa.Column("from_state", sa.String(length=32), nullable=True),
        sa.Column("to_state", sa.String(length=32), nullable=False),
        sa.Column("stage", sa.String(length=32), nullable=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("fencing_token", sa.BigInteger(), nullable=False),
        sa.Column("category", sa.String(length=16), nullable=True),
        sa.Column("code", sa.String(length=64), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("hint", sa.Text(), nullable=True),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("correlation_id", sa.String(length=36), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"], ["groups.group_id"], name=op.f("fk_transitions_group_id_groups")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_transitions")),
    )
    with op.batch_alter_table("transitions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_transitions_group_id"), ["group_id"], unique=False)

    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("group_id", sa.String(length=32), nullable=False),
        sa.Column("attempt_id", sa.Integer(), nullable=True),
        sa.Column("stage", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["attempt_id"],
            ["stage_attempts.id"],
            name=op.f("fk_artifacts_attempt_id_stage_attempts"),
        ),
        sa.ForeignKeyConstraint(
            ["group_id"], ["groups.group_id"], name=op.f("fk_artifacts_group_id_groups")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_artifacts")),
        sa.UniqueConstraint("path", name=op.f("uq_artifacts_path")),
    )
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_artifacts_group_id"), ["group_id"], unique=False)

    op.create_table(
        "calibration_tables",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("set_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("interp", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["set_id"],
            ["calibration_sets.id"],
            name=op.f("fk_calibration_tables_set_id_calibration_sets"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibration_tables")),
        sa.UniqueConstraint("set_id", "kind", name=op.f("uq_calibration_tables_set_id")),
    )
    with op.batch_alter_table("calibration_tables", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_calibration_tables_set_id"), ["set_id"], unique=False)

    op.create_table(
        "products",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("group_id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=True),
        sa.Column("calibration_tier", sa.String(length=32), nullable=True),
        sa.Column("calibration_set_id", sa.Integer(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["calibration_set_id"],
            ["calibration_sets.id"],
            name=op.f("fk_products_calibration_set_id_calibration_sets"),
        ),
        sa.ForeignKeyConstraint(
            ["group_id"], ["groups.group_id"], name=op.f("fk_products_group_id_groups")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_products")),
    )
    with op.batch_alter_table("products", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_products_group_id"), ["group_id"], unique=False)

    op.create_table(
        "quality_assessments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("group_id", sa.String(length=32), nullable=False),
        sa.Column("attempt_id", sa.Integer(), nullable=True),
        sa.Column("stage", sa.String(length=32), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("verdict", sa.String(length=8), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["attempt_id"],
            ["stage_attempts.id"],
            name=op.f("fk_quality_assessments_attempt_id_stage_attempts"),
        ),
        sa.ForeignKeyConstraint(
            ["group_id"], ["groups.group_id"], name=op.f("fk_quality_assessments_group_id_groups")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quality_assessments")),
    )
    with op.batch_alter_table("quality_assessments", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_quality_assessments_group_id"), ["group_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("quality_assessments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_quality_assessments_group_id"))

    op.drop_table("quality_assessments")
    with op.batch_alter_table("products", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_products_group_id"))

    op.drop_table("products")
    with op.batch_alter_table("calibration_tables", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_calibration_tables_set_id"))

    op.drop_table("calibration_tables")
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_artifacts_group_id"))

    op.drop_table("artifacts")
    with op.batch_alter_table("transitions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_transitions_group_id"))

    op.drop_table("transitions")
    with op.batch_alter_table("subband_files", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_subband_files_status"))
        batch_op.drop_index(batch_op.f("ix_subband_files_group_id"))

    op.drop_table("subband_files")
    with op.batch_alter_table("stage_attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_stage_attempts_group_id"))

    op.drop_table("stage_attempts")
    with op.batch_alter_table("calibration_sets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_calibration_sets_valid_until"))
        batch_op.drop_index(batch_op.f("ix_calibration_sets_valid_from"))
        batch_op.drop_index(batch_op.f("ix_calibration_sets_group_id"))

    op.drop_table("calibration_sets")
    with op.batch_alter_table("groups", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_groups_state"))
        batch_op.drop_index("ix_groups_runnable")
        batch_op.drop_index(batch_op.f("ix_groups_obs_start"))

    op.drop_table("groups")
