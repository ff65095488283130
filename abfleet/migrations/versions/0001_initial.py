"""The store's tables as the first migration-managed release defines them.

Revision ID: 0001
Revises: (none)

A frozen copy of abfleet.store's tables at this revision (later changes go in later
revisions, never here). `abfleet.migrations` also uses METADATA to complete a store created
before migrations existed, before stamping it with this revision.
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

METADATA = sa.MetaData()

sa.Table(
    "predictions",
    METADATA,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("variant", sa.String(16), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("location", sa.String(128), nullable=False),
    sa.Column("total_sqft", sa.Float, nullable=False),
    sa.Column("bhk", sa.Integer, nullable=False),
    sa.Column("bath", sa.Integer, nullable=False),
    sa.Column("estimated_price", sa.Float, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("user_id", sa.String(128)),
)

sa.Table(
    "feedback",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("prediction_id", sa.String(32), sa.ForeignKey("predictions.id"), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("feedback_type", sa.String(16), nullable=False),
    sa.Column("feedback_value", sa.Float),
    sa.Column("ape", sa.Float),
    sa.Column("variant", sa.String(16), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("received_by", sa.String(16)),
    sa.Column("user_id", sa.String(128)),
    sa.UniqueConstraint("prediction_id", "kind", name="one_feedback_of_a_kind"),
)

sa.Table(
    "decisions",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("production_version", sa.String(32)),
    sa.Column("candidate_version", sa.String(32)),
    sa.Column("applied", sa.Boolean, nullable=False),
    sa.Column("reasons", sa.Text, nullable=False),
    sa.Column("details", sa.Text, nullable=False),
)

sa.Table(
    "fleet_state",
    METADATA,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


def upgrade() -> None:
    METADATA.create_all(op.get_bind())


def downgrade() -> None:
    METADATA.drop_all(op.get_bind())
