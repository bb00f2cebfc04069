"""Shared fixtures: the real PostgreSQL and Redis (from scripts/test-services.sh), SQLite files,
and a running gzx service per test over either database.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from redis import Redis
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.db import migrate
from app.models import Base
from app.service import Service, build_service
from app.settings import Settings

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/gzx_test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/15"


def _unavailable(what: str, error: Exception) -> None:
    message = f"{what} is not reachable ({error}); run the tests with scripts/test.sh"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_url() -> str:
    """A migrated PostgreSQL database for this test session (schema rebuilt by Alembic)."""
    url = os.environ.get("GZX_TEST_DATABASE_URL", DEFAULT_PG)
    parsed = make_url(url)
    try:
        admin = psycopg.connect(
            host=parsed.host or "127.0.0.1",
            port=parsed.port or 5432,
            user=parsed.username or "postgres",
            dbname="postgres",
            autocommit=True,
        )
    except psycopg.OperationalError as error:
        _unavailable("PostgreSQL", error)
    with admin:
        exists = admin.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (parsed.database,)
        ).fetchone()
        if not exists:
            admin.execute(f'CREATE DATABASE "{parsed.database}"')
    with psycopg.connect(
        host=parsed.host,
        port=parsed.port or 5432,
        user=parsed.username,
        dbname=parsed.database,
        autocommit=True,
    ) as conn:
        conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
        conn.execute("CREATE SCHEMA public")
    migrate(url)
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("GZX_TEST_REDIS_URL", DEFAULT_REDIS)
    try:
        Redis.from_url(url).ping()
    except Exception as error:
        _unavailable("Redis", error)
    return url


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    """The real Redis, flushed before and after the test."""
    client = Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'gzx.db'}"
    migrate(url)
    return url


def _truncate(service: Service) -> None:
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with service.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=["postgres", "sqlite"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    """A gzx service with in-process jobs, over the real PostgreSQL and over SQLite."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = request.getfixturevalue("sqlite_url")
    settings = Settings(
        database_url=url, redis_url=None, export_dir=tmp_path / "exports", sweep_interval_s=3600
    )
    svc = build_service(settings)
    if request.param == "postgres":
        _truncate(svc)
    yield svc
    svc.close()


@pytest.fixture
def pg_service(pg_url: str, tmp_path: Path) -> Iterator[Service]:
    """A gzx service with in-process jobs over the real PostgreSQL only."""
    settings = Settings(
        database_url=pg_url, redis_url=None, export_dir=tmp_path / "exports", sweep_interval_s=3600
    )
    svc = build_service(settings)
    _truncate(svc)
    yield svc
    svc.close()
