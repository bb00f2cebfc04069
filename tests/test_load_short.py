"""The load benchmark's short mode (`benchmarks/load.py --short`) as a CI check.

It runs the real thing as a subprocess: `gzx serve` and two `gzx worker`s over the test
PostgreSQL (its own database, gzx_test_load, dropped and created) and the test Redis (its own
db, 12, flushed), 10 s of open-loop ingest at 100/s, a burst of 2,000, and the drain. Only the
invariants are asserted here (every classification stored and counted exactly once, no failed
request, the queue drained, lag measured); the latency and lag targets are for the full run on a
quiet machine, and the CI machine is shared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
LOAD_DATABASE = "gzx_test_load"
LOAD_REDIS_DB = 12

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


def _urls() -> tuple[str, str]:
    pg = make_url(
        os.environ.get(
            "GZX_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/gzx_test"
        )
    ).set(database=LOAD_DATABASE)
    redis = os.environ.get("GZX_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    base = redis.rsplit("/", 1)[0] if redis.count("/") > 2 else redis
    return pg.render_as_string(hide_password=False), f"{base}/{LOAD_REDIS_DB}"


def _reachable(pg_url: str, redis_url: str) -> None:
    url = make_url(pg_url)
    try:
        psycopg.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 5432,
            user=url.username or "postgres",
            password=url.password,
            dbname="postgres",
            connect_timeout=5,
        ).close()
        Redis.from_url(redis_url, socket_timeout=5).ping()
    except (psycopg.OperationalError, RedisError) as error:
        message = f"PostgreSQL or Redis is not reachable ({error}); run scripts/test.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_load_short(tmp_path: Path) -> None:
    pg_url, redis_url = _urls()
    _reachable(pg_url, redis_url)
    out = tmp_path / "load.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "load.py"),
            "--short",
            "--database-url",
            pg_url,
            "--redis-url",
            redis_url,
            "--out",
            str(out),
            "--logs",
            str(tmp_path / "logs"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    r = json.loads(out.read_text())
    sustained, burst, counts = r["sustained"], r["burst"], r["counts"]

    # Everything sent was answered 200: no 5xx, no refusal, no connection error.
    assert sustained["statuses"] == {"200": 1000}
    assert burst["statuses"] == {"200": 2000 // burst["batch"]}
    assert r["verdict"]["http_5xx"] == 0 and r["verdict"]["failed_requests"] == 0
    assert counts["probes_failed"] == 0
    # Stored exactly once, counted once in the subjects' state, nothing left to apply.
    sent = 1000 + 2000 + counts["probes"]
    assert counts["sent"] == sent
    assert counts["classifications"] == counts["views"] == sent
    assert counts["distinct_view_classifications"] == sent
    assert counts["sum_subject_n_classifications"] == sent
    assert counts["exactly_once"]
    assert counts["pending_subjects"] == 0 and counts["views_not_applied"] == 0
    # The queue drained after the burst, within the short mode's deadline.
    assert burst["drain"]["no_pending_after_s"] is not None
    assert burst["drain"]["lag_under_2s_after_s"] is not None
    # Lag was measured three ways, for every sustained classification in the database.
    lag = sustained["commit_to_applied_lag"]
    assert lag["n"] == lag["applied"] == 1000
    assert 0 <= lag["p50_s"] <= lag["p99_s"] <= lag["max_s"]
    assert sustained["metrics_lag"]["samples"] >= 5
    assert sustained["probe"]["n"] >= 3 and sustained["probe"]["not_applied_in_120s"] == 0
    # The open-loop sender kept its schedule (what the server answered is another matter).
    assert sustained["classifications_per_s"] > 50
    # Memory was sampled for every process, every second.
    memory = sustained["memory"]
    assert {"api", "worker1", "worker2", "pg_backends", "redis_used"} <= set(memory)
    assert all(alive for alive in r["processes_alive_at_end"].values())
