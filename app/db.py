"""Database engine and sessions. The web app is the only writer of this database."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Annotated

from alembic import command
from alembic.config import Config as AlembicConfig
from fastapi import Depends
from sqlalchemy import Engine, event
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, create_engine

from app.settings import MIGRATIONS_DIR, PROJECT_ROOT, get_settings


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        in_memory = url in ("sqlite://", "sqlite:///:memory:")
        # A file database never makes a checkout wait (max_overflow=-1): a long-lived SSE stream
        # holds its session, and 20 simultaneous dashboards exhausted the default pool.
        pool_options = {} if in_memory else {"pool_size": 10, "max_overflow": -1}
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False},
            poolclass=StaticPool if in_memory else None,
            **pool_options,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    settings.path()  # the data dir holds the SQLite file
    return make_engine(settings.sqlalchemy_url)


def get_session() -> Iterator[Session]:
    with Session(get_engine()) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def alembic_config(url: str) -> AlembicConfig:
    config = AlembicConfig(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url)
    return config


def migrate(engine: Engine | None = None) -> None:
    """Bring the schema to the newest migration (run at start-up and by `tuneboard migrate`)."""
    engine = engine or get_engine()
    config = alembic_config(str(engine.url))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
