"""Engine and session factory of the job store, and schema migrations (Alembic, run at start-up).

SQLite (the default, a file under DISTILL_HOME) runs in WAL mode with a busy timeout so the API and the
worker processes can share it; PostgreSQL is used when ``DISTILL_DATABASE_URL``/``DATABASE_URL`` names it.
"""

from __future__ import annotations

import fcntl
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from distill.errors import DistillError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def make_engine(url: str, schema: str | None = None) -> Engine:
    """An engine for ``url``; ``schema`` puts every table of a PostgreSQL store in that schema."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:  # DB-API objects
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Connection) -> None:
            # Writers take the write lock at BEGIN (``sqlite_immediate``), so a read-then-write transaction
            # waits on busy_timeout instead of failing midway; readers stay concurrent under WAL.
            immediate = connection.get_execution_options().get("sqlite_immediate", False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        _disable_pysqlite_autobegin(engine)
        return engine
    connect_args = {}
    if schema:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(f"bad schema name {schema!r}")
        connect_args["options"] = f"-csearch_path={schema}"
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args)


def _disable_pysqlite_autobegin(engine: Engine) -> None:
    """pysqlite opens transactions lazily on its own; turn that off so our BEGIN IMMEDIATE is the one."""

    @event.listens_for(engine, "connect")
    def _no_autobegin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None


@contextmanager
def store_errors(url: str) -> Iterator[None]:
    """At start-up, a job store that cannot be opened or migrated is one clear error (the CLI prints it)."""
    try:
        yield
    except (OSError, SQLAlchemyError) as exc:
        reason = getattr(exc, "orig", None) or exc
        target = make_url(url).render_as_string(hide_password=True)
        raise DistillError(f"cannot open the job store {target}: {' '.join(str(reason).split())[:300]}") from None


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Only one process migrates at a time (API and workers all migrate at start-up)."""
    if is_postgres(engine):
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(742211)"))
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(742211)"))
                conn.commit()
        return
    database = engine.url.database
    if not database or database == ":memory:":
        yield
        return
    lock_path = Path(database).expanduser().with_suffix(".migrate.lock")
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def migrate(engine: Engine, schema: str | None = None) -> None:
    """Bring the schema to the latest revision (idempotent)."""
    with _migration_lock(engine):
        with engine.begin() as conn:
            if schema and is_postgres(engine):
                conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        with engine.begin() as conn:
            config = alembic_config(engine.url.render_as_string(hide_password=False))
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
