"""marks

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 19:27:14.900563
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "clusters",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("workflow_id", sa.BigInteger(), nullable=False),
        sa.Column("subject_id", sa.BigInteger(), nullable=False),
        sa.Column("tool", sa.Integer(), nullable=False),
        sa.Column("frame", sa.Integer(), nullable=False),
        sa.Column("x1", sa.Float(), nullable=False),
        sa.Column("y1", sa.Float(), nullable=False),
        sa.Column("x2", sa.Float(), nullable=False),
        sa.Column("y2", sa.Float(), nullable=False),
        sa.Column("p_real", sa.Float(), nullable=False),
        sa.Column("p_off", sa.Float(), nullable=False),
        sa.Column("n_marks", sa.Integer(), nullable=False),
        sa.Column("n_views", sa.Integer(), nullable=False),
        sa.Column("kept", sa.Boolean(), nullable=False),
        sa.Column(
            "members",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("clusters", schema=None) as batch_op:
        batch_op.create_index(
            "ix_clusters_workflow_subject", ["workflow_id", "subject_id"], unique=False
        )

    op.create_table(
        "mark_snapshots",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("workflow_id", sa.BigInteger(), nullable=False),
        sa.Column("volunteer_ids", sa.LargeBinary(), nullable=False),
        sa.Column("arrays", sa.LargeBinary(), nullable=False),
        sa.Column(
            "population",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["workflows.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("mark_snapshots", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_mark_snapshots_workflow_id"), ["workflow_id"], unique=False
        )

    with op.batch_alter_table("workflow_subjects", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "marks_risk",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )

    with op.batch_alter_table("workflows", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mark_snapshot_id", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workflows", schema=None) as batch_op:
        batch_op.drop_column("mark_snapshot_id")

    with op.batch_alter_table("workflow_subjects", schema=None) as batch_op:
        batch_op.drop_column("marks_risk")

    with op.batch_alter_table("mark_snapshots", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_mark_snapshots_workflow_id"))

    op.drop_table("mark_snapshots")
    with op.batch_alter_table("clusters", schema=None) as batch_op:
        batch_op.drop_index("ix_clusters_workflow_subject")

    op.drop_table("clusters")
