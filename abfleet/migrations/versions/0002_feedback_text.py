"""Feedback may carry free text (the original project's comments, and text beside any kind),
and /api/metrics reads a covering index of predictions.

Revision ID: 0002
Revises: 0001

The column is nullable: existing rows have none, and no decision reads it. The index
(variant, created_at, latency_ms) lets the summary's one aggregate query read the index alone
(`abfleet bench pipeline`, job `summary`: 0.7 to 1.5 s for 800,000 predictions on SQLite,
against 4 s and more through the created_at index and the table).
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
    op.create_index("ix_predictions_summary", "predictions", ["variant", "created_at", "latency_ms"])


def downgrade() -> None:
    op.drop_index("ix_predictions_summary", table_name="predictions")
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("feedback_text")
