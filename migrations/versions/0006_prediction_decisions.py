"""predictions: the decision (accept, reject, review) and its reason

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 04:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("decision", sa.String(8), nullable=True))
        batch_op.add_column(sa.Column("decision_reason", sa.String(300), nullable=True))
        batch_op.create_index("ix_predictions_decision", ["decision"])


def downgrade() -> None:
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_index("ix_predictions_decision")
        batch_op.drop_column("decision_reason")
        batch_op.drop_column("decision")
