"""evaluations and exports: evaluation jobs of base models and of runs' adapters; merged-model exports

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 10:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    text = sqlmodel.sql.sqltypes.AutoString
    op.create_table(
        'evaluation',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=True),
        sa.Column('checkpoint', text(), nullable=True),
        sa.Column('adapter_digest', text(), nullable=False),
        sa.Column('model_path', text(), nullable=False),
        sa.Column('model_fingerprint', text(), nullable=False),
        sa.Column('template', text(), nullable=False),
        sa.Column('cutoff_len', sa.Integer(), nullable=False),
        sa.Column('backend', text(), nullable=False),
        sa.Column('dataset_id', sa.Integer(), nullable=True),
        sa.Column('source', text(), nullable=False),
        sa.Column('formatting', text(), nullable=False),
        sa.Column('row_indices', sa.JSON(), nullable=False),
        sa.Column('rows_digest', text(length=64), nullable=False),
        sa.Column('max_rows', sa.Integer(), nullable=False),
        sa.Column('max_new_tokens', sa.Integer(), nullable=False),
        sa.Column('base_evaluation_id', sa.Integer(), nullable=True),
        sa.Column('status', sa.Enum('queued', 'starting', 'running', 'succeeded', 'failed', 'cancelled', 'lost',
                                    name='evaluationstatus'), nullable=False),
        sa.Column('status_reason', text(), nullable=False),
        sa.Column('gpus_requested', sa.Integer(), nullable=False),
        sa.Column('dispatch_id', text(), nullable=True),
        sa.Column('dispatched_worker_id', text(), nullable=True),
        sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('gpu_ids', sa.JSON(), nullable=False),
        sa.Column('worker_id', text(), nullable=True),
        sa.Column('worker_instance', text(), nullable=True),
        sa.Column('cancel_requested', sa.Boolean(), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('metrics', sa.JSON(), nullable=False),
        sa.Column('rows_evaluated', sa.Integer(), nullable=False),
        sa.Column('generate_s', sa.Float(), nullable=True),
        sa.Column('elapsed_s', sa.Float(), nullable=True),
        sa.Column('versions', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['run_id'], ['run.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('evaluation', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_evaluation_run_id'), ['run_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_evaluation_rows_digest'), ['rows_digest'], unique=False)
        batch_op.create_index(batch_op.f('ix_evaluation_status'), ['status'], unique=False)
    op.create_table(
        'model_export',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('checkpoint', text(), nullable=True),
        sa.Column('adapter_digest', text(), nullable=False),
        sa.Column('model_path', text(), nullable=False),
        sa.Column('template', text(), nullable=False),
        sa.Column('export_size', sa.Integer(), nullable=False),
        sa.Column('status', sa.Enum('queued', 'starting', 'running', 'succeeded', 'failed', 'cancelled', 'lost',
                                    name='evaluationstatus'), nullable=False),
        sa.Column('status_reason', text(), nullable=False),
        sa.Column('gpus_requested', sa.Integer(), nullable=False),
        sa.Column('dispatch_id', text(), nullable=True),
        sa.Column('dispatched_worker_id', text(), nullable=True),
        sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('gpu_ids', sa.JSON(), nullable=False),
        sa.Column('worker_id', text(), nullable=True),
        sa.Column('cancel_requested', sa.Boolean(), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('model_id', sa.Integer(), nullable=True),
        sa.Column('size', sa.Integer(), nullable=False),
        sa.Column('elapsed_s', sa.Float(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['run_id'], ['run.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('model_export', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_export_run_id'), ['run_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_model_export_status'), ['status'], unique=False)


def downgrade() -> None:
    op.drop_table('model_export')
    op.drop_table('evaluation')
