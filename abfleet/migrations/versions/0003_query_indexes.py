"""Indexes for the jobs' queries: windows by time, arms by variant and version, people by user.

Revision ID: 0003
Revises: 0002

The hourly evaluation counts and samples each arm's predictions and feedback since the
experiment started (`abfleet.aggregates`, `abfleet.sampling`), the drift job the last days'
predictions; per-user aggregates group by user. predictions.created_at has its index since
0001. On PostgreSQL, CREATE INDEX holds off writes to the table while it builds (a few
seconds per million rows); the servers' spools hold predictions meanwhile.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# name → (table, columns)
INDEXES = {
    "ix_predictions_arm": ("predictions", ["variant", "model_version", "created_at"]),
    "ix_predictions_user_id": ("predictions", ["user_id"]),
    "ix_feedback_arm": ("feedback", ["variant", "model_version", "kind", "created_at"]),
    "ix_feedback_created_at": ("feedback", ["created_at"]),
    "ix_feedback_user_id": ("feedback", ["user_id"]),
}


def upgrade() -> None:
    for name, (table, columns) in INDEXES.items():
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, (table, _columns) in INDEXES.items():
        op.drop_index(name, table_name=table)
