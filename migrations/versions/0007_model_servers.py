"""model servers: an inference server of a registered model alone (a merged export), no adapter

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 10:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('inference_server', schema=None) as batch_op:
        batch_op.add_column(sa.Column('serves_model_alone', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('inference_server', schema=None) as batch_op:
        batch_op.drop_column('serves_model_alone')
