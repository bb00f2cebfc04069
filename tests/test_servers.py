"""The private throwaway servers of tests/servers.py start, die and come back."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
import redis

from tests.servers import PostgresServer, RedisServer, ServerUnavailable


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer(dbname="gzx_private")
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    with server:
        yield server


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    try:
        server = RedisServer(persistent=True)
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    with server:
        yield server


def _pg_answers(server: PostgresServer) -> bool:
    try:
        with psycopg.connect(server.conninfo, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


@pytest.mark.postgres
def test_a_killed_private_postgres_restarts_with_its_committed_rows(
    private_postgres: PostgresServer,
) -> None:
    """SIGKILL of the postmaster takes the server down; start() recovers the committed rows."""
    pg = private_postgres
    with psycopg.connect(pg.conninfo) as conn:
        conn.execute("CREATE TABLE kept (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO kept VALUES (1, 'before the crash')")
        conn.commit()

    pg.kill()
    assert not pg.is_running()
    assert not pg.is_accepting()
    assert not _pg_answers(pg)

    pg.start()
    with psycopg.connect(pg.conninfo) as conn:
        rows = conn.execute("SELECT id, note FROM kept").fetchall()
    assert rows == [(1, "before the crash")]


@pytest.mark.postgres
def test_a_private_postgres_stops_and_restarts_on_the_same_url(
    private_postgres: PostgresServer,
) -> None:
    """stop(), start() and restart() keep the URL and the data of a private server."""
    pg = private_postgres
    url = pg.url
    assert url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    assert url.endswith("/gzx_private")
    with psycopg.connect(pg.conninfo, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (7)")

    pg.stop(mode="immediate")
    assert not pg.is_running()
    assert not _pg_answers(pg)

    pg.start()
    pg.restart()
    assert pg.url == url
    with psycopg.connect(pg.conninfo) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(7,)]


@pytest.mark.redis
def test_a_killed_private_redis_goes_down_and_comes_back(private_redis: RedisServer) -> None:
    """SIGKILL takes a private Redis down; start() brings it back on the same URL with its AOF."""
    rd = private_redis
    client = redis.Redis.from_url(rd.url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.set("gzx:kept", "yes")
        assert client.get("gzx:kept") == b"yes"

        rd.kill()
        assert not rd.is_running()
        assert not rd.ping()
        with pytest.raises(redis.ConnectionError):
            client.ping()

        rd.start()
        assert client.ping()
        assert client.get("gzx:kept") == b"yes"

        rd.flushall()
        assert client.get("gzx:kept") is None
        rd.stop()
        assert not rd.ping()
    finally:
        client.close()
