"""scheduler: dispatches, worker capacity and models, run priority, serving secrets, stored adapters

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 09:15:10.190914
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('deployment', schema=None) as batch_op:
        batch_op.add_column(sa.Column('artifact_digest', sqlmodel.sql.sqltypes.AutoString(), nullable=False, server_default=''))
        batch_op.drop_column('adapter_path')

    with op.batch_alter_table('inference_server', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dispatch_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column('dispatched_worker_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('gpu_ids', sa.JSON(), nullable=False, server_default='[]'))
        batch_op.add_column(sa.Column('worker_instance', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column('api_key', sqlmodel.sql.sqltypes.AutoString(), nullable=False, server_default=''))

    with op.batch_alter_table('modelentry', schema=None) as batch_op:
        batch_op.add_column(sa.Column('fingerprint', sqlmodel.sql.sqltypes.AutoString(), nullable=False, server_default=''))

    with op.batch_alter_table('run', schema=None) as batch_op:
        batch_op.add_column(sa.Column('priority', sa.Enum('high', 'normal', 'low', name='runpriority'), nullable=False, server_default='normal'))
        batch_op.add_column(sa.Column('queued_at', sa.DateTime(timezone=True), nullable=False, server_default=sa.func.current_timestamp()))
        batch_op.add_column(sa.Column('dispatch_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column('dispatched_worker_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('worker_instance', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column('has_adapter', sa.Boolean(), nullable=False, server_default=sa.false()))
    # Queued in creation order; a run that reported a final adapter has one.
    op.execute("UPDATE run SET queued_at = created_at, has_adapter = (adapter_path IS NOT NULL)")
    with op.batch_alter_table('run', schema=None) as batch_op:
        batch_op.drop_column('output_dir')
        batch_op.drop_column('adapter_path')

    with op.batch_alter_table('worker', schema=None) as batch_op:
        batch_op.add_column(sa.Column('advertise_host', sqlmodel.sql.sqltypes.AutoString(), nullable=False, server_default='127.0.0.1'))
        batch_op.add_column(sa.Column('cpu_train_slots', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('serve_slots', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('models', sa.JSON(), nullable=False, server_default='{}'))
        batch_op.add_column(sa.Column('instance_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False, server_default=''))



def downgrade() -> None:
    with op.batch_alter_table('worker', schema=None) as batch_op:
        batch_op.drop_column('instance_id')
        batch_op.drop_column('models')
        batch_op.drop_column('serve_slots')
        batch_op.drop_column('cpu_train_slots')
        batch_op.drop_column('advertise_host')

    with op.batch_alter_table('run', schema=None) as batch_op:
        batch_op.add_column(sa.Column('adapter_path', sa.VARCHAR(), nullable=True))
        batch_op.add_column(sa.Column('output_dir', sa.VARCHAR(), nullable=True))
        batch_op.drop_column('has_adapter')
        batch_op.drop_column('worker_instance')
        batch_op.drop_column('dispatched_at')
        batch_op.drop_column('dispatched_worker_id')
        batch_op.drop_column('dispatch_id')
        batch_op.drop_column('queued_at')
        batch_op.drop_column('priority')

    with op.batch_alter_table('modelentry', schema=None) as batch_op:
        batch_op.drop_column('fingerprint')

    with op.batch_alter_table('inference_server', schema=None) as batch_op:
        batch_op.drop_column('api_key')
        batch_op.drop_column('worker_instance')
        batch_op.drop_column('gpu_ids')
        batch_op.drop_column('dispatched_at')
        batch_op.drop_column('dispatched_worker_id')
        batch_op.drop_column('dispatch_id')

    with op.batch_alter_table('deployment', schema=None) as batch_op:
        batch_op.add_column(sa.Column('adapter_path', sa.VARCHAR(), nullable=True))
        batch_op.drop_column('artifact_digest')

