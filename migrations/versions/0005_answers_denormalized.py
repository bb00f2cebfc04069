"""answers carry their volunteer, time and workflow version (refits read one table)

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("answers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("volunteer_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("created_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("version_major", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("version_minor", sa.Integer(), nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "UPDATE answers AS a SET volunteer_id = c.volunteer_id, created_at = c.created_at,"
            " version_major = c.version_major, version_minor = c.version_minor"
            " FROM classifications AS c WHERE c.id = a.classification_id"
        )
    else:
        columns = ("volunteer_id", "created_at", "version_major", "version_minor")
        op.execute(
            "UPDATE answers SET "
            + ", ".join(
                f"{name} = (SELECT c.{name} FROM classifications c"
                " WHERE c.id = answers.classification_id)"
                for name in columns
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("answers", schema=None) as batch_op:
        batch_op.drop_column("version_minor")
        batch_op.drop_column("version_major")
        batch_op.drop_column("created_at")
        batch_op.drop_column("volunteer_id")
