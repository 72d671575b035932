"""The PostgreSQL schema, managed by Alembic: its migrations are plain SQL in migrations/versions/
(one file per step, applied in order), recorded in the table VERSION_TABLE.

`migrate` brings a database to the newest revision when a store opens. Replicas that start
together take turns: the upgrade runs in one transaction holding the store's writer lock
(server/storage/postgresql/backend.py), so one of them migrates, the others find it done, and
no writer sees a half-built schema. A database migrated by a newer voxauth is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.pool import NullPool

from server.errors import StorageError

VERSION_TABLE = "voxauth_schema_version"
_MIGRATIONS = Path(__file__).with_name("migrations")
_CONNECT_TIMEOUT_SECONDS = 10
"""How long opening one connection may take: an unreachable database fails the call, never
hangs it."""


def migrate(
    conninfo: str,
    *,
    lock: tuple[int, int],
    created: Callable[[psycopg.Connection[Any]], None],
) -> None:
    """Upgrades the database at `conninfo` to the newest revision, under the advisory
    transaction lock `lock`; `created` is called on the upgrade's connection, in its
    transaction, when it made the schema from nothing. Raises StorageError."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    scripts = ScriptDirectory.from_config(config)
    # SQLAlchemy only carries Alembic: the connection is psycopg's own, opened as the
    # backend's are (the conninfo may be a URI or key=value words, which a SQLAlchemy URL
    # could not both say).
    engine = sqlalchemy.create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(conninfo), poolclass=NullPool
    )
    try:
        with engine.connect() as connection, connection.begin():
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(%s, %s)", lock)
            current = MigrationContext.configure(
                connection, opts={"version_table": VERSION_TABLE}
            ).get_current_revision()
            if current is not None and not _known(scripts, current):
                raise StorageError(
                    f"the database has schema revision {current}, unknown to this voxauth "
                    f"(newest {scripts.get_current_head()}): upgrade voxauth"
                )
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            if current is None:
                raw = connection.connection.dbapi_connection
                assert isinstance(raw, psycopg.Connection)
                created(raw)
    except CommandError as exc:
        raise StorageError(f"cannot migrate the database: {exc}") from exc
    except sqlalchemy.exc.DBAPIError as exc:
        raise StorageError(f"cannot migrate the database: {exc.orig}") from exc
    finally:
        engine.dispose()


def with_defaults(conninfo: str) -> str:
    """`conninfo` with a connect timeout and voxauth's name (for pg_stat_activity) unless it
    sets them itself."""
    given = psycopg.conninfo.conninfo_to_dict(conninfo)
    defaults = {"connect_timeout": str(_CONNECT_TIMEOUT_SECONDS), "application_name": "voxauth"}
    return psycopg.conninfo.make_conninfo(
        conninfo, **{name: value for name, value in defaults.items() if name not in given}
    )


def holds_schema(conninfo: str) -> bool:
    """Whether the database at `conninfo` holds a voxauth schema (of any revision). Raises
    StorageError if it cannot be reached."""
    try:
        with psycopg.connect(with_defaults(conninfo)) as conn:
            row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (VERSION_TABLE,)).fetchone()
    except psycopg.Error as exc:
        raise StorageError(f"cannot read the database: {exc}") from exc
    return bool(row and row[0])


def _known(scripts: ScriptDirectory, revision: str) -> bool:
    try:
        return scripts.get_revision(revision) is not None
    except CommandError:
        return False
