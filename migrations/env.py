"""Alembic environment: batch mode, because SQLite cannot ALTER most things in place."""

from alembic import context
from sqlmodel import SQLModel, create_engine

import app.models  # noqa: F401  (registers every table on SQLModel.metadata)
from app.models.base import UtcDateTime

config = context.config
target_metadata = SQLModel.metadata


def render_item(kind: str, item, _autogen_context):
    """UtcDateTime only converts in Python: the column is a plain DateTime, and a migration
    must not import the app."""
    if kind == "type" and isinstance(item, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        render_as_batch=True,
        render_item=render_item,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        with create_engine(config.get_main_option("sqlalchemy.url")).begin() as connection:
            _run(connection)
    else:
        _run(connection)


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                      render_item=render_item)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
