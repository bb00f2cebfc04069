"""workflow_subjects.pending_since: when a subject last became pending

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workflow_subjects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pending_since", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE workflow_subjects SET pending_since = updated_at WHERE pending")


def downgrade() -> None:
    with op.batch_alter_table("workflow_subjects", schema=None) as batch_op:
        batch_op.drop_column("pending_since")
