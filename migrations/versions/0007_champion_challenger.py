"""runs: champion and challenger; run_events (who served, promoted, rolled back and when);
shadow_predictions (the challenger's answers, stored but not returned)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 07:10:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("challenger_since", sa.DateTime(timezone=True), nullable=True)
        )
    op.create_table(
        "run_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(200), nullable=True),
        sa.Column(
            "previous_run_id",
            sa.Integer(),
            sa.ForeignKey("runs.id", ondelete="SET NULL"),
            nullable=True,
        ),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_run_events_run_id", "run_events", ["run_id"])
    op.create_index("ix_run_events_created_at", "run_events", ["created_at"])
    op.create_table(
        "shadow_predictions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "prediction_id",
            sa.Integer(),
            sa.ForeignKey("predictions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("decision", sa.String(8), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("confidences", sa.JSON(), nullable=False),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_shadow_predictions_prediction_id", "shadow_predictions", ["prediction_id"])
    op.create_index("ix_shadow_predictions_run_id", "shadow_predictions", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_shadow_predictions_run_id", table_name="shadow_predictions")
    op.drop_index("ix_shadow_predictions_prediction_id", table_name="shadow_predictions")
    op.drop_table("shadow_predictions")
    op.drop_index("ix_run_events_created_at", table_name="run_events")
    op.drop_index("ix_run_events_run_id", table_name="run_events")
    op.drop_table("run_events")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("challenger_since")
