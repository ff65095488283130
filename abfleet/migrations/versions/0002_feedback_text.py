"""Feedback may carry free text: the original project's comments, and text beside any kind.

Revision ID: 0002
Revises: 0001

A nullable column: existing rows have none, and no decision reads it.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.add_column(sa.Column("feedback_text", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("feedback_text")
