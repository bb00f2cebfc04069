"""The production pipeline: ingest commits, then queues coalesced jobs on the real Redis; a real
RQ worker applies them; the sweeper recovers whatever Redis lost."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue, SimpleWorker

from app.pipeline import AGGREGATE_QUEUE
from app.service import Service, build_service
from app.settings import Settings, get_settings
from tests import payloads as p
from tests.conftest import _truncate
from workers import jobs
from workers.context import reset_context


@pytest.fixture
def rq_service(
    pg_url: str, redis_url: str, redis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Service]:
    """A service over the real PostgreSQL and Redis; workers here read the same settings."""
    monkeypatch.setenv("GZX_DATABASE_URL", pg_url)
    monkeypatch.setenv("GZX_REDIS_URL", redis_url)
    get_settings.cache_clear()
    reset_context()
    svc = build_service(Settings(database_url=pg_url, redis_url=redis_url, export_dir=tmp_path))
    _truncate(svc)
    yield svc
    svc.close()
    get_settings.cache_clear()
    reset_context()


def run_worker(redis: Redis) -> None:
    SimpleWorker([Queue(AGGREGATE_QUEUE, connection=redis)], connection=redis).work(burst=True)


def subject(client: TestClient, subject_id: int) -> dict:
    return client.get(f"/v1/workflows/{p.WORKFLOW}/subjects/{subject_id}").json()


def test_many_votes_on_one_workflow_queue_one_job(rq_service: Service, redis: Redis) -> None:
    """Ten requests for one workflow coalesce into a single queued job, which applies them all."""
    client = TestClient(rq_service.app)
    client.put(f"/v1/workflows/{p.WORKFLOW}", json=p.clump_config())
    run_worker(redis)
    for i in range(10):
        client.post("/v1/classifications", json=p.classic(1000 + i, 50 + i % 3, i, i % 2))
    assert Queue(AGGREGATE_QUEUE, connection=redis).count == 1
    run_worker(redis)
    assert sum(subject(client, 50 + k)["views"] for k in range(3)) == 10
    assert all(not subject(client, 50 + k)["pending"] for k in range(3))


def test_a_flushed_redis_loses_nothing_once_the_sweeper_runs(
    rq_service: Service, redis: Redis
) -> None:
    """Jobs queued, then Redis flushed (as if restarted empty): the sweeper re-queues the work."""
    client = TestClient(rq_service.app)
    client.put(f"/v1/workflows/{p.WORKFLOW}", json=p.clump_config())
    run_worker(redis)
    for i in range(6):
        client.post("/v1/classifications", json=p.classic(2000 + i, 70, i, 0))
    redis.flushdb()
    run_worker(redis)
    assert subject(client, 70)["pending"] is True
    assert jobs.sweep() == [p.WORKFLOW]
    run_worker(redis)
    state = subject(client, 70)
    assert state["pending"] is False
    assert state["counts"]["clumpy"] == 6


def test_a_vote_committed_while_a_job_runs_gets_a_new_job(
    rq_service: Service, redis: Redis
) -> None:
    """The debounce key is cleared when a job starts, so later votes are never stranded."""
    client = TestClient(rq_service.app)
    client.put(f"/v1/workflows/{p.WORKFLOW}", json=p.clump_config())
    run_worker(redis)
    client.post("/v1/classifications", json=p.classic(3000, 80, 1, 0))
    queue = Queue(AGGREGATE_QUEUE, connection=redis)
    assert queue.count == 1
    jobs.apply_workflow(p.WORKFLOW)  # the job runs (here, directly) ...
    client.post("/v1/classifications", json=p.classic(3001, 80, 2, 0))  # ... a vote arrives after
    assert queue.count == 2
    run_worker(redis)
    assert subject(client, 80)["counts"]["clumpy"] == 2


def test_a_killed_worker_and_a_flushed_redis_lose_nothing(
    rq_service: Service, redis: Redis, pg_url: str, redis_url: str
) -> None:
    """`gzx worker` SIGKILLed with jobs queued, Redis flushed: after the sweeper, all count."""
    import os
    import signal
    import subprocess
    import sys
    import time

    client = TestClient(rq_service.app)
    client.put(f"/v1/workflows/{p.WORKFLOW}", json=p.clump_config())
    env = {**os.environ, "GZX_DATABASE_URL": pg_url, "GZX_REDIS_URL": redis_url}
    gzx = os.path.join(os.path.dirname(sys.executable), "gzx")
    worker = subprocess.Popen(
        [gzx, "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for i in range(120):
            client.post("/v1/classifications", json=p.classic(4000 + i, 90 + i % 7, i, i % 2))
        time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    redis.flushdb()
    jobs.sweep()
    run_worker(redis)
    views = sum(subject(client, 90 + k)["views"] for k in range(7))
    assert views == 120
    assert all(not subject(client, 90 + k)["pending"] for k in range(7))


def test_a_due_refit_is_queued_by_the_schedule(rq_service: Service, redis: Redis) -> None:
    """With refit_interval_s set and no snapshot yet, the schedule queues a refit that runs."""
    client = TestClient(rq_service.app)
    client.put(f"/v1/workflows/{p.WORKFLOW}", json={**p.clump_config(), "refit_interval_s": 3600})
    client.post("/v1/classifications", json=[p.classic(5000 + i, 60, i, 0) for i in range(4)])
    assert jobs.run_schedules() == [p.WORKFLOW]
    run_worker(redis)
    stats = client.get(f"/v1/workflows/{p.WORKFLOW}/stats").json()
    assert stats["skill_snapshot_id"] is not None
    assert jobs.run_schedules() == []  # not due again for an hour
