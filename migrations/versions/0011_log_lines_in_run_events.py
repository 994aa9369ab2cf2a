"""log lines in run events: a run's log lines are kept once, as its `log` events (with their offset
and a `log_key` that makes a re-sent line a no-op), instead of in both runevent and runlogline

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 12:30:00.000000
"""

import json
from collections import defaultdict
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('runevent', schema=None) as batch_op:
        batch_op.add_column(sa.Column('log_key', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.create_unique_constraint('uq_runevent_run_id_log_key', ['run_id', 'log_key'])

    # Both tables were written in one transaction per report, in the same order: a run's k-th log
    # event is its k-th stored line. The line's row is the complete one (it has the offset).
    bind = op.get_bind()
    lines, events = defaultdict(list), defaultdict(list)
    for row in bind.execute(sa.text(
            'SELECT run_id, attempt, source, "offset", line FROM runlogline ORDER BY id')):
        lines[row.run_id].append(row)
    for row in bind.execute(sa.text("SELECT id, run_id FROM runevent WHERE kind = 'log' ORDER BY id")):
        events[row.run_id].append(row.id)
    for run_id, run_lines in lines.items():
        for index, line in enumerate(run_lines):
            data = json.dumps({"attempt": line.attempt, "source": line.source, "offset": line.offset,
                               "line": line.line})
            key = f"{line.attempt}:{line.source}:{line.offset}"
            if index < len(events[run_id]):
                bind.execute(sa.text("UPDATE runevent SET data = :data, log_key = :key WHERE id = :id"),
                             {"data": data, "key": key, "id": events[run_id][index]})
            else:  # a line without its event (none expected): streamed after the run's others
                bind.execute(sa.text(
                    "INSERT INTO runevent (run_id, kind, data, log_key, created_at) "
                    "VALUES (:run_id, 'log', :data, :key, CURRENT_TIMESTAMP)"),
                    {"run_id": run_id, "data": data, "key": key})

    with op.batch_alter_table('runlogline', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_runlogline_run_id'))
    op.drop_table('runlogline')


def downgrade() -> None:
    op.create_table(
        'runlogline',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('source', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('offset', sa.Integer(), nullable=False),
        sa.Column('line', sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['run.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('run_id', 'attempt', 'source', 'offset'),
    )
    with op.batch_alter_table('runlogline', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_runlogline_run_id'), ['run_id'], unique=False)
    op.execute(
        'INSERT INTO runlogline (run_id, attempt, source, "offset", line) '
        "SELECT run_id, json_extract(data, '$.attempt'), json_extract(data, '$.source'), "
        "json_extract(data, '$.offset'), json_extract(data, '$.line') "
        "FROM runevent WHERE kind = 'log' AND log_key IS NOT NULL ORDER BY id"
    )
    with op.batch_alter_table('runevent', schema=None) as batch_op:
        batch_op.drop_constraint('uq_runevent_run_id_log_key', type_='unique')
        batch_op.drop_column('log_key')
