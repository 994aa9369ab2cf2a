"""deploy merged: a deployment served merged into its base (an export job first) or as a whole model

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01 12:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('deployment', schema=None) as batch_op:
        batch_op.add_column(sa.Column('served_as', sa.String(), nullable=False, server_default='lora'))
        batch_op.add_column(sa.Column('export_id', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('deployment', schema=None) as batch_op:
        batch_op.drop_column('export_id')
        batch_op.drop_column('served_as')
