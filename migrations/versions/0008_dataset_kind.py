"""dataset kind: sft, ranking (preference pairs), kto or pretrain; existing datasets are sft

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 12:05:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('dataset', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                'kind',
                sa.Enum('sft', 'ranking', 'kto', 'pretrain', name='datasetkind'),
                nullable=False,
                server_default='sft',
            )
        )
        batch_op.create_index('ix_dataset_kind', ['kind'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('dataset', schema=None) as batch_op:
        batch_op.drop_index('ix_dataset_kind')
        batch_op.drop_column('kind')
