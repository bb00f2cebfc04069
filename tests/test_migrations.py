"""The Alembic migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from app.db import alembic_config
from app.models import Base


def schema_differences(url: str) -> list[object]:
    engine = create_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection)
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()
    return list(differences)


def test_migrations_match_the_models_on_postgres(pg_url: str) -> None:
    """`alembic upgrade head` on the real PostgreSQL leaves nothing for autogenerate to add."""
    assert schema_differences(pg_url) == []


def test_migrations_go_down_and_up_again_on_sqlite(sqlite_url: str) -> None:
    """On SQLite the schema matches the models, and downgrading to nothing and back works."""
    assert schema_differences(sqlite_url) == []
    command.downgrade(alembic_config(sqlite_url), "base")
    command.upgrade(alembic_config(sqlite_url), "head")
    assert schema_differences(sqlite_url) == []
