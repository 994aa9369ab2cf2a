"""preference metrics: DPO/KTO rewards per logged step and the held-out pair accuracy (RM, DPO eval)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 12:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ('rewards_chosen', 'rewards_rejected', 'rewards_accuracies', 'rewards_margins', 'eval_accuracy')


def upgrade() -> None:
    with op.batch_alter_table('runmetric', schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('runmetric', schema=None) as batch_op:
        for name in reversed(COLUMNS):
            batch_op.drop_column(name)
