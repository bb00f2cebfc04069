"""Faults against private PostgreSQL and Redis servers (tests/servers.py: own ports, own data
directories, so killing them disturbs no other test).

Every test ends the same way: the stored classifications are counted (each exactly once), the
service is refitted and applied, and every subject's posterior is compared with a clean batch run
(the same classifications imported once, in id order, into a fresh SQLite database, refitted and
applied there). DESIGN.md, invariant 1.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue, SimpleWorker
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app import aggregation, parsing, store
from app.db import make_engine, make_sessionmaker, migrate
from app.models import Classification, View, Workflow, WorkflowSubject, utcnow
from app.pipeline import AGGREGATE_QUEUE
from app.service import Service, build_service
from app.settings import Settings, get_settings
from app.workflows import load_config
from tests import payloads as p
from tests.conftest import _truncate
from tests.servers import PostgresServer, RedisServer, ServerUnavailable
from workers import jobs
from workers.context import reset_context

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

WF = p.WORKFLOW
SALT = "fault-salt"
TOLERANCE = 1e-9  # EM over the same votes in another volunteer order: float rounding only
CONFIG: dict[str, Any] = {
    "name": "Is it featured?",
    "classes": ["featured", "smooth"],
    "question": {
        "task": "T0",
        "answers": [
            {"index": 0, "label": "Featured", "class": "featured"},
            {"index": 1, "label": "Smooth", "class": "smooth"},
        ],
    },
    "retirement": {"kind": "risk", "risk_bound": 0.05, "min_views": 4},
}


log = logging.getLogger("gzx.tests.faults")


def report(name: str, value: object) -> None:
    """A figure for docs/reliability.md (see them with --log-cli-level=INFO)."""
    log.info("%s = %s", name, value)


# --------------------------------------------------------------------------- the private stack


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[PostgresServer, RedisServer]]:
    """One private PostgreSQL (migrated) and one private Redis for the whole module."""
    try:
        pg = PostgresServer(dbname="gzx_faults")
        rd = RedisServer()
    except ServerUnavailable as error:
        if os.environ.get("CI"):
            pytest.fail(str(error))
        pytest.skip(str(error))
    with pg, rd:
        migrate(pg.url)
        yield pg, rd


@dataclass
class Stack:
    pg: PostgresServer
    rd: RedisServer
    service: Service
    redis: Redis
    client: TestClient
    env: dict[str, str]


@pytest.fixture
def stack(
    servers: tuple[PostgresServer, RedisServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    """The service over the private servers (RQ mode), emptied; in-process jobs see them too."""
    pg, rd = servers
    pg.start()  # no-ops when running; a previous test may have left them down
    rd.start()
    rd.flushall()
    env = {
        "GZX_DATABASE_URL": pg.url,
        "GZX_REDIS_URL": rd.url,
        "GZX_IP_SALT": SALT,
        "GZX_TOKENS": "",
        "GZX_CAESAR_SECRET": "",
        "GZX_KINESIS_PASSWORD": "",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    reset_context()
    settings = Settings(
        database_url=pg.url, redis_url=rd.url, ip_salt=SALT, export_dir=tmp_path / "exports"
    )
    service = build_service(settings)
    _truncate(service)
    redis = Redis.from_url(rd.url)
    client = TestClient(service.app, raise_server_exceptions=False)
    assert client.put(f"/v1/workflows/{WF}", json=CONFIG).status_code == 200
    yield Stack(pg, rd, service, redis, client, {**os.environ, **env})
    client.close()
    service.close()
    redis.close()
    get_settings.cache_clear()
    reset_context()


# --------------------------------------------------------------------------- the crowd


def crowd(seed: int, n_subjects: int = 30, votes_each: int = 6) -> list[dict[str, Any]]:
    """Classic classifications from volunteers of mixed skill, some anonymous, some repeats.

    Truth is subject % 2. A few volunteers classify a subject twice (keep_first keeps the earlier
    by created_at, whatever the delivery order).
    """
    rng = np.random.default_rng(seed)
    n_volunteers = 25
    accuracy = rng.choice([0.95, 0.85, 0.6, 0.2], size=n_volunteers, p=[0.4, 0.3, 0.2, 0.1])
    out: list[dict[str, Any]] = []
    cid = 100_000 * seed
    for s in range(n_subjects):
        subject = 500 + s
        for u in rng.choice(n_volunteers, size=votes_each, replace=False):
            repeats = 2 if rng.random() < 0.08 else 1
            for _ in range(repeats):
                cid += 1
                answer = s % 2 if rng.random() < accuracy[u] else 1 - s % 2
                anonymous = u >= 20  # five anonymous volunteers, told apart by IP
                out.append(
                    p.classic(
                        cid,
                        subject,
                        None if anonymous else int(u) + 1,
                        int(answer),
                        created_at=f"2025-03-04T10:{cid % 60:02d}:{(cid // 60) % 60:02d}Z",
                        user_ip=f"198.51.100.{u}",
                        workflow_id=WF,
                    )
                )
    return out


def post_all(client: TestClient, items: list[dict[str, Any]], size: int = 25) -> None:
    for start in range(0, len(items), size):
        response = client.post("/v1/classifications", json=items[start : start + size])
        assert response.status_code == 200, response.text


def deliver(client: TestClient, data: dict[str, Any], route: str) -> None:
    """One classification by one of the three ingest routes."""
    if route == "kinesis":
        response = client.post("/v1/ingest/kinesis", json=p.batch(p.event(data)))
        assert response.status_code == 200 and response.json()["rejected"] == 0, response.text
    elif route == "caesar":
        response = client.post("/v1/caesar/extract", json=p.caesar(data))
        assert response.status_code == 200, response.text
    else:
        response = client.post("/v1/classifications", json=data)
        assert response.status_code == 200, response.text


# --------------------------------------------------------------------------- workers


def run_worker(redis: Redis) -> None:
    """Drain the aggregate queue with a worker in this process (RQ's SimpleWorker, burst)."""
    SimpleWorker([Queue(AGGREGATE_QUEUE, connection=redis)], connection=redis).work(burst=True)


def drain(stack: Stack) -> None:
    """What production does after any fault: the sweeper re-queues, a worker applies."""
    jobs.sweep()
    run_worker(stack.redis)
    with stack.service.sessions() as session:
        assert store.count_pending(session) == 0


def start_gzx_worker(env: dict[str, str], **extra: str) -> subprocess.Popen[bytes]:
    gzx = Path(sys.executable).with_name("gzx")
    return subprocess.Popen(
        [str(gzx), "worker"],
        env={**env, **extra},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGKILL)
    worker.wait(10)


# --------------------------------------------------------------------------- the comparison


@dataclass(frozen=True)
class SubjectState:
    n_classifications: int
    n_views: int
    counts: tuple[int, ...]
    posterior: tuple[float, ...]


def states(sessions: sessionmaker[Session]) -> dict[int, SubjectState]:
    with sessions() as session:
        rows = session.scalars(select(WorkflowSubject).where(WorkflowSubject.workflow_id == WF))
        return {
            row.subject_id: SubjectState(
                row.n_classifications,
                row.n_views,
                tuple(row.counts or ()),
                tuple(row.posterior or ()),
            )
            for row in rows
        }


def clean_batch_run(items: list[dict[str, Any]], directory: Path) -> dict[int, SubjectState]:
    """The same classifications, each once, in id order, in a fresh database: refit, apply."""
    url = f"sqlite:///{directory / 'clean.db'}"
    migrate(url)
    engine = make_engine(Settings(database_url=url))
    sessions = make_sessionmaker(engine)
    unique = {int(d["id"]): d for d in items}
    parsed = [parsing.parse_classification(unique[cid]) for cid in sorted(unique)]
    config = load_config(CONFIG)
    now = utcnow()
    with sessions.begin() as session:
        session.add(
            Workflow(
                id=WF,
                name=config.name,
                config=config.to_json(),
                config_hash=config.digest(),
                created_at=now,
                updated_at=now,
            )
        )
        session.flush()
        store.record_classifications(session, parsed, ip_salt=SALT)
    aggregation.refit(sessions, WF)
    aggregation.apply_pending(sessions, WF)
    result = states(sessions)
    engine.dispose()
    return result


def refit_and_apply(stack: Stack) -> None:
    """The production refit job (by a worker), then whatever it left pending."""
    Queue(AGGREGATE_QUEUE, connection=stack.redis).enqueue(jobs.refit_workflow, WF)
    run_worker(stack.redis)
    drain(stack)


def assert_each_stored_once(stack: Stack, items: list[dict[str, Any]]) -> None:
    """Nothing lost, nothing double-counted: one row and one view per classification id."""
    expected = {int(d["id"]) for d in items}
    with stack.service.sessions() as session:
        stored = set(session.scalars(select(Classification.id)))
        n_views = session.scalar(select(func.count()).select_from(View))
        applied = session.scalar(
            select(func.sum(WorkflowSubject.n_classifications)).where(
                WorkflowSubject.workflow_id == WF
            )
        )
    assert stored == expected
    assert n_views == len(expected)
    assert applied == len(expected)


def assert_equals_clean_run(stack: Stack, items: list[dict[str, Any]], directory: Path) -> None:
    """After a refit, every subject equals the clean batch run over the same classifications."""
    refit_and_apply(stack)
    assert_each_stored_once(stack, items)
    served = states(stack.service.sessions)
    clean = clean_batch_run(items, directory)
    assert served.keys() == clean.keys()
    for subject_id, want in clean.items():
        got = served[subject_id]
        assert (got.n_classifications, got.n_views, got.counts) == (
            want.n_classifications,
            want.n_views,
            want.counts,
        ), subject_id
        assert np.allclose(got.posterior, want.posterior, rtol=0, atol=TOLERANCE), (
            subject_id,
            got.posterior,
            want.posterior,
        )


def assert_states_are_current(stack: Stack) -> None:
    """Re-applying every subject from scratch changes nothing: no state was left stale."""
    before = states(stack.service.sessions)
    with stack.service.sessions.begin() as session:
        session.execute(
            update(WorkflowSubject).where(WorkflowSubject.workflow_id == WF).values(pending=True)
        )
    aggregation.apply_pending(stack.service.sessions, WF)
    after = states(stack.service.sessions)
    assert after.keys() == before.keys()
    for subject_id, state in after.items():
        old = before[subject_id]
        assert (old.n_classifications, old.n_views, old.counts) == (
            state.n_classifications,
            state.n_views,
            state.counts,
        ), subject_id
        assert np.allclose(old.posterior, state.posterior, rtol=0, atol=TOLERANCE), subject_id


# --------------------------------------------------------------------------- the faults


def test_duplicated_and_reordered_deliveries_equal_one_clean_run(
    stack: Stack, tmp_path: Path
) -> None:
    """Each classification sent 1-3 times by random routes in shuffled order counts exactly once."""
    items = crowd(seed=1, n_subjects=20)
    rng = random.Random(1)
    sends: list[tuple[dict[str, Any], str]] = []
    for data in items:
        # Caesar's body carries no IP: an anonymous classification is only sent by the stream and
        # the Panoptes route here (the test below covers Caesar first).
        routes = ["kinesis", "panoptes"] + (["caesar"] if data["links"]["user"] else [])
        sends += [(data, rng.choice(routes)) for _ in range(rng.randint(1, 3))]
    rng.shuffle(sends)
    for n, (data, route) in enumerate(sends):
        deliver(stack.client, data, route)
        if n % 97 == 0:
            run_worker(stack.redis)  # some of it applied online, along the way
    assert len(sends) > 1.5 * len(items)
    report("deliveries", len(sends))
    report("classifications", len(items))
    run_worker(stack.redis)
    assert_each_stored_once(stack, items)
    assert_equals_clean_run(stack, items, tmp_path)


def test_an_anonymous_vote_delivered_by_caesar_first_joins_its_stream_volunteer(
    stack: Stack, tmp_path: Path
) -> None:
    """Caesar first, then the stream: the vote belongs to the same volunteer as a clean import."""
    items = [
        p.classic(900 + k, 800 + k, None, k % 2, user_ip="198.51.100.77", workflow_id=WF)
        for k in range(4)
    ]
    for data in items:
        deliver(stack.client, data, "caesar")
        deliver(stack.client, data, "kinesis")
    drain(stack)
    with stack.service.sessions() as session:
        volunteers = set(session.scalars(select(Classification.volunteer_id)))
    assert len(volunteers) == 1


def test_a_worker_killed_mid_job_loses_nothing(stack: Stack, tmp_path: Path) -> None:
    """`gzx worker` SIGKILLed while a job is half done: the sweeper and a new worker finish it."""
    items = crowd(seed=2, n_subjects=80, votes_each=4)
    post_all(stack.client, items)
    with stack.service.sessions() as session:
        total = store.count_pending(session)
    # One subject per transaction, so the job takes long enough to be caught in the middle.
    worker = start_gzx_worker(stack.env, GZX_APPLY_BATCH_SIZE="1")
    caught_at = None
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and worker.poll() is None:
            with stack.service.sessions() as session:
                left = store.count_pending(session)
            if 0 < left < total - 5:
                worker.send_signal(signal.SIGKILL)
                caught_at = left
                break
            time.sleep(0.005)
    finally:
        stop(worker)
    assert caught_at is not None, "the worker was not caught mid-job"
    report("pending_subjects_at_kill", f"{caught_at}/{total}")
    with stack.service.sessions() as session:
        assert store.count_pending(session) > 0  # the job really was left half done
    drain(stack)
    assert_each_stored_once(stack, items)
    assert_equals_clean_run(stack, items, tmp_path)


def test_a_flushed_and_restarted_redis_loses_no_queued_work(stack: Stack, tmp_path: Path) -> None:
    """Jobs queued, Redis flushed and restarted empty, ingest during the outage: all applied."""
    items = crowd(seed=3)
    first, during, after = items[:60], items[60:120], items[120:]
    post_all(stack.client, first)
    assert Queue(AGGREGATE_QUEUE, connection=stack.redis).count >= 1
    stack.rd.flushall()
    stack.rd.kill()
    post_all(stack.client, during)  # Redis down: ingest still answers 200 (the vote is committed)
    stack.rd.start()
    run_worker(stack.redis)
    with stack.service.sessions() as session:
        stranded = store.count_pending(session)
    assert stranded > 0  # the lost jobs really were lost ...
    report("subjects_stranded_until_the_sweep", stranded)
    drain(stack)  # ... until the sweeper runs
    post_all(stack.client, after)  # and the pipeline works again afterwards
    run_worker(stack.redis)
    assert_each_stored_once(stack, items)
    assert_equals_clean_run(stack, items, tmp_path)


def test_postgres_restarted_during_ingest_answers_503_and_loses_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    """PostgreSQL SIGKILLed mid-stream: 503 with Retry-After while down; retried sends all land."""
    items = crowd(seed=4)
    batches = [items[i : i + 10] for i in range(0, len(items), 10)]
    statuses: list[int] = []
    retry_after: set[str | None] = set()
    lock = threading.Lock()
    sent = threading.Event()

    def sender(mine: list[list[dict[str, Any]]]) -> None:
        with TestClient(stack.service.app, raise_server_exceptions=False) as client:
            for batch in mine:
                for _ in range(400):
                    response = client.post("/v1/classifications", json=batch)
                    with lock:
                        statuses.append(response.status_code)
                        if response.status_code == 503:
                            retry_after.add(response.headers.get("retry-after"))
                    if response.status_code != 503:
                        break
                    time.sleep(0.02)
                sent.set()
                time.sleep(0.01)

    threads = [threading.Thread(target=sender, args=(batches[k::2],)) for k in range(2)]
    for thread in threads:
        thread.start()
    assert sent.wait(10)
    stack.pg.kill()
    time.sleep(1.0)
    stack.pg.start()
    for thread in threads:
        thread.join(60)
    assert set(statuses) == {200, 503}, sorted(set(statuses))
    assert retry_after == {"1"}
    assert statuses.count(200) == len(batches)
    report("responses_503", statuses.count(503))
    report("batches", len(batches))
    assert stack.client.get("/healthz").status_code == 200
    drain(stack)
    assert_each_stored_once(stack, items)
    assert_equals_clean_run(stack, items, tmp_path)


def test_a_refit_running_while_classifications_arrive_strands_no_vote(
    stack: Stack, tmp_path: Path
) -> None:
    """Refits in a loop while a stream arrives and a worker applies: every vote is applied."""
    items = crowd(seed=5, n_subjects=40)
    post_all(stack.client, items[:40])
    worker = start_gzx_worker(stack.env)
    done = threading.Event()
    refits: list[int] = []
    errors: list[BaseException] = []

    def refit_loop() -> None:
        while not done.is_set():
            try:
                refits.append(aggregation.refit(stack.service.sessions, WF).snapshot_id)
            except BaseException as error:
                errors.append(error)
                return

    refitter = threading.Thread(target=refit_loop)
    refitter.start()
    try:
        for start in range(40, len(items), 5):
            response = stack.client.post("/v1/classifications", json=items[start : start + 5])
            assert response.status_code == 200
            time.sleep(0.005)
    finally:
        done.set()
        refitter.join(60)
        stop(worker)
    assert not errors, errors
    assert len(refits) >= 3
    report("refits_during_ingest", len(refits))
    drain(stack)
    assert_each_stored_once(stack, items)  # before any final refit: no vote left behind
    assert_states_are_current(stack)
    assert_equals_clean_run(stack, items, tmp_path)


def test_two_workers_racing_on_one_subject_count_every_vote_once(
    stack: Stack, tmp_path: Path
) -> None:
    """Two `gzx worker`s apply one busy subject while votes and refit jobs keep coming."""
    items = [
        p.classic(
            70_000 + k,
            4242 if k % 5 else 4243,
            k + 1,
            int(k % 3 == 0),
            created_at=f"2025-03-04T11:{k // 60 % 60:02d}:{k % 60:02d}Z",
            workflow_id=WF,
        )
        for k in range(200)
    ]
    workers = [start_gzx_worker(stack.env) for _ in range(2)]
    queue = Queue(AGGREGATE_QUEUE, connection=stack.redis)
    try:
        time.sleep(1.0)  # both workers up before the votes come
        for k, data in enumerate(items):
            assert stack.client.post("/v1/classifications", json=data).status_code == 200
            if k % 20 == 0:  # extra jobs, so both workers are busy at once
                queue.enqueue(jobs.apply_workflow, WF)
            if k % 50 == 25:
                queue.enqueue(jobs.refit_workflow, WF)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (queue.count or queue.started_job_registry.count):
            time.sleep(0.05)
    finally:
        for worker in workers:
            stop(worker)
    drain(stack)
    assert_each_stored_once(stack, items)
    assert states(stack.service.sessions)[4242].n_classifications == 160
    assert_states_are_current(stack)
    assert_equals_clean_run(stack, items, tmp_path)
