"""batch probe: the micro-batch probe cache, a run's batch plan, a config's automatic micro-batch

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op



revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'batch_probe',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('key_fields', sa.JSON(), nullable=False),
        sa.Column('gpu_name', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column('total_mib', sa.Float(), nullable=False),
        sa.Column('overhead_mib', sa.Float(), nullable=False),
        sa.Column('base_mib', sa.Float(), nullable=False),
        sa.Column('seq_len', sa.Integer(), nullable=False),
        sa.Column('measurements', sa.JSON(), nullable=False),
        sa.Column('probe_s', sa.Float(), nullable=False),
        sa.Column('load_s', sa.Float(), nullable=False),
        sa.Column('versions', sa.JSON(), nullable=False),
        sa.Column('worker_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('key'),
    )
    with op.batch_alter_table('run', schema=None) as batch_op:
        batch_op.add_column(sa.Column('batch_plan', sa.JSON(), nullable=False, server_default='{}'))
    # Configs made before: their runs keep the split they were written with.
    with op.batch_alter_table('train_config', schema=None) as batch_op:
        batch_op.add_column(sa.Column('auto_batch', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('train_config', schema=None) as batch_op:
        batch_op.drop_column('auto_batch')
    with op.batch_alter_table('run', schema=None) as batch_op:
        batch_op.drop_column('batch_plan')
    op.drop_table('batch_probe')
