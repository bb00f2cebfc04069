"""Engines, sessions and migrations. Creating an engine is explicit: importing has no effects."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings

log = logging.getLogger("gzx.db")

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


OPTIMIZE_EVERY_S = 60.0
OPTIMIZE_BUSY_MS = 100
BUSY_TIMEOUT_S = 30
CHECKS_ALL_TABLES = sqlite3.sqlite_version_info >= (3, 46, 0)  # optimize's 0x10000 bit


def make_engine(settings: Settings) -> Engine:
    """An engine for the configured database (SQLite gets WAL, a busy timeout, and statistics
    kept by `PRAGMA optimize`)."""
    if settings.is_sqlite:
        engine = create_engine(
            settings.database_url,
            connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_S},
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "checkin", _optimize_now_and_then)
        event.listen(engine, "close", _optimize_before_closing)
        return engine
    return create_engine(settings.database_url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
    # SQLite's advice for long-lived connections: optimize with 0x10002 when one opens (every
    # table checked, not only those this connection used; SQLite 3.46 and later), then now and
    # then while it lives. PostgreSQL's autovacuum does this by itself.
    _optimize(dbapi_connection, "PRAGMA optimize=0x10002")
    record.info["optimized_at"] = time.monotonic()


def _optimize(dbapi_connection: Any, statement: str) -> None:
    """Run `PRAGMA optimize`: usually a check of a few counters, now and then an ANALYZE of a
    table whose statistics are missing or that grew 25-fold since. Without statistics SQLite's
    planner guesses, and a guess made a level evaluation take 350 ms instead of 11 ms.

    The analysis is left whole (no `analysis_limit`): a sampled one misjudges the leading column
    of gzx's indexes, the workflow, by orders of magnitude (1,001 views per workflow where a
    million-view table has 500,000), while a whole ANALYZE of a million views takes ~0.15 s and
    the 25-fold rule makes it rare. It needs the write lock, and waits `OPTIMIZE_BUSY_MS` for
    it, not the usual 30 s, so a reader returning its connection is never held up long; a busy
    database is optimized at the next turn."""
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={OPTIMIZE_BUSY_MS}")
            cursor.execute(statement).fetchall()
            if not CHECKS_ALL_TABLES:
                _analyze_new_tables(cursor)
        finally:
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
            cursor.close()
    except sqlite3.Error as error:
        log.debug("%s skipped: %s", statement, error)


def _analyze_new_tables(cursor: Any) -> None:
    """ANALYZE every indexed table that has rows and no statistics yet: what optimize's 0x10000
    does from SQLite 3.46. Before, optimize looks only at the tables this connection's queries
    used, and forgets them when another connection changes the schema (the first ANALYZE creates
    sqlite_stat1), so a table could stay without statistics for good. Costs one `LIMIT 1` read
    per such table; later growth is left to optimize's own 25-fold check."""
    present = cursor.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'").fetchone()
    analysed = (
        {row[0] for row in cursor.execute("SELECT DISTINCT tbl FROM sqlite_stat1")}
        if present
        else set()
    )
    indexed = {
        row[0]
        for row in cursor.execute(
            "SELECT DISTINCT tbl_name FROM sqlite_master WHERE type = 'index'"
        )
    }
    for table in sorted(indexed - analysed):
        quoted = '"' + table.replace('"', '""') + '"'
        if (
            not table.startswith("sqlite_")
            and cursor.execute(f"SELECT 1 FROM {quoted} LIMIT 1").fetchone()
        ):
            cursor.execute(f"ANALYZE {quoted}")


def _optimize_now_and_then(dbapi_connection: Any, record: Any) -> None:
    """When a connection goes back to the pool: optimize, at most every `OPTIMIZE_EVERY_S` per
    connection. Before SQLite 3.46 plain `PRAGMA optimize` looks only at the tables whose indexes
    this connection's queries used, so each pooled connection does it for its own."""
    if dbapi_connection is None:
        return
    now = time.monotonic()
    if now - record.info.get("optimized_at", 0.0) < OPTIMIZE_EVERY_S:
        return
    record.info["optimized_at"] = now
    _optimize(dbapi_connection, "PRAGMA optimize")


def _optimize_before_closing(dbapi_connection: Any, _record: Any) -> None:
    """SQLite's advice for short-lived connections (a `gzx import`, an engine disposed of)."""
    if dbapi_connection is not None:
        _optimize(dbapi_connection, "PRAGMA optimize")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def migrate(database_url: str, revision: str = "head") -> None:
    """Bring the database at `database_url` to `revision` (the latest by default)."""
    command.upgrade(alembic_config(database_url), revision)
