"""audit log append-only: the database itself refuses to change or delete an audit entry

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01 13:05:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0014'
down_revision: str | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REFUSALS = {'update': 'UPDATE', 'delete': 'DELETE'}


def upgrade() -> None:
    # SQLite only (the panel's database; another one keeps the panel's own rule: no route does it).
    if op.get_bind().dialect.name != 'sqlite':
        return
    for name, event in REFUSALS.items():
        op.execute(f"CREATE TRIGGER audit_entry_no_{name} BEFORE {event} ON audit_entry "
                   f"BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END")


def downgrade() -> None:
    if op.get_bind().dialect.name != 'sqlite':
        return
    for name in REFUSALS:
        op.execute(f"DROP TRIGGER IF EXISTS audit_entry_no_{name}")
