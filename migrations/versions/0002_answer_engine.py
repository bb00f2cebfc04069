"""answer engine

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 19:05:02.599191
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "skill_snapshots",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("workflow_id", sa.BigInteger(), nullable=False),
        sa.Column("n_classes", sa.Integer(), nullable=False),
        sa.Column("volunteer_ids", sa.LargeBinary(), nullable=False),
        sa.Column("counts", sa.LargeBinary(), nullable=False),
        sa.Column(
            "alpha",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "class_prior",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("n_votes", sa.Integer(), nullable=False),
        sa.Column("last_view_id", sa.BigInteger(), nullable=False),
        sa.Column("n_iter", sa.Integer(), nullable=False),
        sa.Column("converged", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["workflows.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("skill_snapshots", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_skill_snapshots_workflow_id"), ["workflow_id"], unique=False
        )

    with op.batch_alter_table("workflow_subjects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retired_label", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workflow_subjects", schema=None) as batch_op:
        batch_op.drop_column("retired_label")

    with op.batch_alter_table("skill_snapshots", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_skill_snapshots_workflow_id"))

    op.drop_table("skill_snapshots")
