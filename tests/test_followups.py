"""Follow-ups of the closed loop: an export whose writer died is written again, exactly once,
and a live writer's is never taken; the export webhook is recorded and retried with backoff;
views are indexed by (workflow, volunteer); SQLite keeps planner statistics; a refit's new
retirements and levels go out at once. On the real PostgreSQL and Redis, and on SQLite where
the embedded mode runs the same code. A real local HTTP server receives the webhooks."""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from rq import Queue, SimpleWorker
from sqlalchemy import func, select, text, update

from app import db, effects, exports, store
from app import service as service_module
from app.db import make_engine, migrate
from app.models import Effect, Export, View, VolunteerLevel, as_utc, utcnow
from app.pipeline import AGGREGATE_QUEUE, EFFECTS_QUEUE, EXPORTS_QUEUE, InProcessDispatcher
from app.service import Service, build_service
from app.settings import Settings, get_settings
from tests import payloads as p
from tests.conftest import _truncate
from workers import jobs
from workers.context import reset_context

WF = p.WORKFLOW
SECRET = "s3cret"
YES, NO = 0, 1
GOLD_YES = list(range(1, 16))
GOLD_NO = list(range(101, 116))


class Receiver:
    """A real HTTP server on 127.0.0.1 that records every request and answers 500 to the first
    `failures[part]` requests whose path contains `part`."""

    def __init__(self) -> None:
        self.failures: dict[str, int] = {}
        self.requests: list[tuple[str, dict[str, str], bytes, int]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                self._answer()

            def do_PUT(self) -> None:
                self._answer()

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                status = 200
                with receiver.lock:
                    for part, left in receiver.failures.items():
                        if part in self.path and left > 0:
                            receiver.failures[part] = left - 1
                            status = 500
                    receiver.requests.append((self.path, dict(self.headers), body, status))
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def to(self, part: str) -> list[tuple[str, dict[str, str], bytes, int]]:
        with self.lock:
            return [r for r in self.requests if part in r[0]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def signed_by(headers: dict[str, str], body: bytes, secret: str = SECRET) -> bool:
    stamp = headers["X-Gzx-Timestamp"]
    digest = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["X-Gzx-Signature"], "sha256=" + digest)


def question_config(**exports_settings: Any) -> dict[str, Any]:
    """A yes/no question, no drawing: exports of it are quick (labels, skills, manifest)."""
    return {
        "classes": ["yes", "no"],
        "question": {
            "task": "T0",
            "answers": [{"index": YES, "class": "yes"}, {"index": NO, "class": "no"}],
        },
        "retirement": {"min_views": 3, "cap": 6},
        "exports": exports_settings,
    }


def settle(svc: Service) -> None:
    assert isinstance(svc.dispatcher, InProcessDispatcher)
    assert svc.dispatcher.wait_idle(30)


def workflow_with_votes(svc: Service, **exports_settings: Any) -> TestClient:
    client = TestClient(svc.app)
    assert client.put(f"/v1/workflows/{WF}", json=question_config(**exports_settings)).is_success
    votes = [p.classic(10 + 10 * s + u, 70 + s, u, YES) for s in range(3) for u in range(1, 5)]
    assert client.post("/v1/classifications", json=votes).status_code == 200
    settle(svc)
    return client


def export_with_dead_writer(svc: Service, attempts: int = 1) -> str:
    """An export a writer claimed (`attempts` writers so far) and stopped beating an hour ago,
    with the partial directories dead writers leave behind."""
    with svc.sessions.begin() as session:
        export_id = exports.create_export(session, WF, exports.scheduled_rules(session, WF))
        session.flush()
        an_hour_ago = utcnow() - timedelta(hours=1)
        session.execute(
            update(Export)
            .where(Export.id == export_id)
            .values(
                status="running",
                attempts=attempts,
                created_at=an_hour_ago,
                claimed_at=an_hour_ago,
                heartbeat_at=an_hour_ago,
            )
        )
    final = exports.export_directory(svc.settings, export_id)
    for stale in (f"{final.name}.partial-{attempts}", f"{final.name}.partial"):
        (final.parent / stale).mkdir(parents=True)
        (final.parent / stale / "labels.csv").write_text("half a file from a dead writer")
    return export_id


def stored(svc: Service, export_id: str) -> Export:
    with svc.sessions() as session:
        found = session.get(Export, export_id)
        assert found is not None
        return found


# --- 1. exports whose writer died ---------------------------------------------------------------


@pytest.fixture
def rq_service(
    pg_url: str, redis_url: str, redis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Service]:
    """A service over the real PostgreSQL and Redis; workers here read the same settings."""
    monkeypatch.setenv("GZX_DATABASE_URL", pg_url)
    monkeypatch.setenv("GZX_REDIS_URL", redis_url)
    monkeypatch.setenv("GZX_EXPORT_DIR", str(tmp_path / "exports"))
    get_settings.cache_clear()
    reset_context()
    svc = build_service(
        Settings(database_url=pg_url, redis_url=redis_url, export_dir=tmp_path / "exports")
    )
    _truncate(svc)
    yield svc
    svc.close()
    get_settings.cache_clear()
    reset_context()


def work(redis: Redis, *queues: str) -> None:
    SimpleWorker([Queue(q, connection=redis) for q in queues], connection=redis).work(burst=True)


def rq_workflow(svc: Service, redis: Redis, **exports_settings: Any) -> TestClient:
    client = TestClient(svc.app)
    assert client.put(f"/v1/workflows/{WF}", json=question_config(**exports_settings)).is_success
    votes = [p.classic(10 + 10 * s + u, 70 + s, u, YES) for s in range(3) for u in range(1, 5)]
    assert client.post("/v1/classifications", json=votes).status_code == 200
    work(redis, AGGREGATE_QUEUE)
    return client


def test_an_export_whose_writer_died_is_written_again_exactly_once(
    rq_service: Service, redis: Redis, receiver: Receiver
) -> None:
    """Running, with no heartbeat for an hour: run_schedules queues it again (twice, from two
    runs); one job claims it, removes the dead writer's partial files and finishes it; the other
    finds it taken. One webhook, one train job, the files the manifest lists and nothing else."""
    client = rq_workflow(rq_service, redis, webhook_url=f"{receiver.url}/hook")
    export_id = export_with_dead_writer(rq_service)
    final = exports.export_directory(rq_service.settings, export_id)
    assert jobs.start_scheduled_exports() == [export_id]
    jobs.run_schedules()
    assert Queue(EXPORTS_QUEUE, connection=redis).count == 2
    work(redis, EXPORTS_QUEUE)
    export = stored(rq_service, export_id)
    assert (export.status, export.attempts) == ("done", 2)
    assert sorted(path.name for path in final.parent.iterdir()) == [export_id]
    listed = client.get(f"/v1/exports/{export_id}").json()["files"]
    assert sorted(path.name for path in final.iterdir()) == listed
    assert "dead writer" not in (final / "labels.csv").read_text()
    hooks = receiver.to("/hook")
    assert len(hooks) == 1 and json.loads(hooks[0][2])["export_id"] == export_id
    assert [job.args for job in Queue("train", connection=redis).jobs] == [(export_id,)]
    jobs.run_schedules()
    assert Queue(EXPORTS_QUEUE, connection=redis).count == 0


def test_a_live_writers_export_is_never_taken(service: Service, receiver: Receiver) -> None:
    """A running export whose writer beat a moment ago is not queued again by the sweeper, and
    a second writer asked to write it skips it: status, claim and files stay the writer's."""
    workflow_with_votes(service)
    export_id = export_with_dead_writer(service)
    with service.sessions.begin() as session:
        session.execute(update(Export).where(Export.id == export_id).values(heartbeat_at=utcnow()))
        assert exports.to_rerun(session) == []
    assert exports.write_export(service.sessions, service.settings, export_id) == "skipped"
    service_module.sweep(service.settings, service.sessions)
    export = stored(service, export_id)
    assert (export.status, export.attempts) == ("running", 1)
    final = exports.export_directory(service.settings, export_id)
    assert (final.parent / f"{final.name}.partial-1" / "labels.csv").exists()  # untouched


def test_a_writer_beats_while_it_writes_so_a_short_lease_does_not_lose_it(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a beat every 50 ms, a writer busy for 0.4 s keeps a 0.2 s lease: the sweeper, asked
    in the middle, finds nothing abandoned; the heartbeat moved after the claim."""
    workflow_with_votes(service)
    monkeypatch.setattr(exports, "HEARTBEAT_S", 0.05)
    build = exports.build_export
    seen: dict[str, Any] = {}

    def slow_build(*args: Any, **kwargs: Any) -> dict[str, Any]:
        time.sleep(0.4)
        with service.sessions.begin() as session:
            seen["abandoned"] = exports.abandoned(session, lease_s=0.2)
            row = session.scalars(select(Export)).one()
            seen["claimed_at"], seen["heartbeat_at"] = row.claimed_at, row.heartbeat_at
        return build(*args, **kwargs)

    monkeypatch.setattr(exports, "build_export", slow_build)
    with service.sessions.begin() as session:
        export_id = exports.create_export(session, WF, exports.scheduled_rules(session, WF))
    assert exports.write_export(service.sessions, service.settings, export_id) == "done"
    assert seen["abandoned"] == []
    assert seen["heartbeat_at"] > seen["claimed_at"]


def test_the_embedded_sweeper_finishes_a_dead_writers_export(service: Service) -> None:
    """Without Redis the service's own sweep claims the export again and writes it."""
    workflow_with_votes(service)
    export_id = export_with_dead_writer(service)
    service_module.sweep(service.settings, service.sessions)
    export = stored(service, export_id)
    assert (export.status, export.attempts) == ("done", 2)
    final = exports.export_directory(service.settings, export_id)
    assert sorted(path.name for path in final.parent.iterdir()) == [export_id]


def test_a_writer_that_stalled_past_its_lease_keeps_nothing(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writer A stalls past its lease; writer B claims the export and finishes it. When A comes
    back it can neither mark the export nor move its files into place: what is served is B's."""
    workflow_with_votes(service)
    with service.sessions.begin() as session:
        export_id = exports.create_export(session, WF, exports.scheduled_rules(session, WF))
    build = exports.build_export
    outcomes: list[str] = []

    def build_then_stall(session: Any, directory: Path, *args: Any) -> dict[str, Any]:
        manifest = build(session, directory, *args)
        if directory.name.endswith(".partial-1"):  # writer A, and only A, stalls here
            (directory / "written-by-a").write_text("a")
            with service.sessions.begin() as other:
                other.execute(
                    update(Export)
                    .where(Export.id == export_id)
                    .values(heartbeat_at=utcnow() - timedelta(hours=1))
                )
            outcomes.append(exports.write_export(service.sessions, service.settings, export_id))
        return manifest

    monkeypatch.setattr(exports, "build_export", build_then_stall)
    outcomes.append(exports.write_export(service.sessions, service.settings, export_id))
    assert outcomes == ["done", "skipped"]  # B, then A
    export = stored(service, export_id)
    assert (export.status, export.attempts) == ("done", 2)
    final = exports.export_directory(service.settings, export_id)
    assert sorted(path.name for path in final.parent.iterdir()) == [export_id]
    assert not (final / "written-by-a").exists()


def test_two_writers_racing_for_a_dead_writers_export_claim_it_once(pg_service: Service) -> None:
    """Two threads claim the same abandoned export at the same moment on PostgreSQL: one wins."""
    workflow_with_votes(pg_service)
    for _ in range(5):
        export_id = export_with_dead_writer(pg_service)
        barrier = threading.Barrier(2)
        claims: list[Any] = []

        def claim(
            export_id: str = export_id,
            barrier: threading.Barrier = barrier,
            claims: list[Any] = claims,
        ) -> None:
            barrier.wait()
            claims.append(exports._claim(pg_service.sessions, export_id))

        threads = [threading.Thread(target=claim) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(c is None for c in claims) == [False, True]
        assert [c.attempt for c in claims if c is not None] == [2]


def test_an_export_whose_writers_keep_dying_fails_after_three(service: Service) -> None:
    """Three writers died on it (out of memory, say): it is marked failed, not retried."""
    workflow_with_votes(service)
    export_id = export_with_dead_writer(service, attempts=exports.MAX_WRITERS)
    with service.sessions.begin() as session:
        assert exports.to_rerun(session) == []
    assert exports.write_export(service.sessions, service.settings, export_id) == "skipped"
    export = stored(service, export_id)
    assert export.status == "failed"
    assert export.error is not None and "stopped 3 times" in export.error


# --- 2. the export webhook, recorded and retried -------------------------------------------------


def make_due(svc: Service, export_id: str) -> None:
    """Time passes: the webhook's next try is due."""
    with svc.sessions.begin() as session:
        session.execute(
            update(Export).where(Export.id == export_id).values(webhook_next_at=utcnow())
        )


def test_a_failing_export_webhook_is_retried_with_backoff_until_it_succeeds(
    service: Service, receiver: Receiver
) -> None:
    """The receiver answers 500 twice, then 200. Each try is recorded with the effects' backoff
    (5 s, then 10 s); the sweeper retries only when due; after the success nothing more is sent.
    Every try is signed and carries the same Idempotency-Key."""
    receiver.failures = {"/hook": 2}
    client = workflow_with_votes(service, webhook_url=f"{receiver.url}/hook", webhook_secret=SECRET)
    response = client.post(f"/v1/workflows/{WF}/exports", json={})
    export_id = response.json()["id"]
    for _ in range(200):
        if stored(service, export_id).webhook_attempts:
            break
        time.sleep(0.05)
    for attempt, wait in ((1, 5), (2, 10)):
        export = stored(service, export_id)
        assert (export.webhook_status, export.webhook_attempts) == ("failed", attempt)
        assert export.webhook_error is not None and "answered 500" in export.webhook_error
        assert export.webhook_next_at is not None
        delay = as_utc(export.webhook_next_at) - utcnow()
        assert wait - 2 < delay.total_seconds() <= wait
        shown = client.get(f"/v1/exports/{export_id}").json()["webhook"]
        assert (shown["status"], shown["attempts"]) == ("failed", attempt)
        assert shown["next_attempt_at"] == as_utc(export.webhook_next_at).isoformat()
        service_module.sweep(service.settings, service.sessions)
        assert len(receiver.to("/hook")) == attempt  # not due yet: nothing sent
        make_due(service, export_id)
        service_module.sweep(service.settings, service.sessions)
    make_due(service, export_id)
    service_module.sweep(service.settings, service.sessions)
    hooks = receiver.to("/hook")
    assert [status for *_, status in hooks] == [500, 500, 200]
    assert all(signed_by(headers, body) for _, headers, body, _ in hooks)
    assert {headers["Idempotency-Key"] for _, headers, _, _ in hooks} == {f"gzx-export-{export_id}"}
    assert json.loads(hooks[-1][2])["export_id"] == export_id
    described = client.get(f"/v1/exports/{export_id}").json()["webhook"]
    assert described == {
        "status": "done",
        "attempts": 3,
        "next_attempt_at": None,
        "last_error": None,
    }


def test_the_rq_sweeper_queues_due_export_webhooks(
    rq_service: Service, redis: Redis, receiver: Receiver
) -> None:
    """With Redis the sweep queues one delivery job on "effects"; a worker sends the webhook."""
    receiver.failures = {"/hook": 1}
    client = rq_workflow(rq_service, redis, webhook_url=f"{receiver.url}/hook")
    export_id = client.post(f"/v1/workflows/{WF}/exports", json={}).json()["id"]
    work(redis, EXPORTS_QUEUE)
    assert stored(rq_service, export_id).webhook_status == "failed"
    effects_queue = Queue(EFFECTS_QUEUE, connection=redis)

    def webhook_jobs() -> int:
        return sum(j.func_name.endswith("deliver_export_webhooks") for j in effects_queue.jobs)

    jobs.sweep()
    assert webhook_jobs() == 0  # not due for 5 s
    make_due(rq_service, export_id)
    jobs.sweep()
    assert webhook_jobs() == 1
    work(redis, EFFECTS_QUEUE)
    export = stored(rq_service, export_id)
    assert (export.webhook_status, export.webhook_attempts) == ("done", 2)
    assert [status for *_, status in receiver.to("/hook")] == [500, 200]


# --- 3. views by (workflow, volunteer) ------------------------------------------------------------


def test_the_volunteer_counts_read_the_workflow_volunteer_index(service: Service) -> None:
    """The query behind GET /v1/workflows/{id}/volunteers reads views through the new index."""
    workflow_with_votes(service)
    query = (
        select(View.volunteer_id, func.count())
        .where(View.workflow_id == WF)
        .group_by(View.volunteer_id)
        .order_by(View.volunteer_id)
    )
    with service.sessions() as session:
        compiled = str(query.compile(session.get_bind(), compile_kwargs={"literal_binds": True}))
        if store.is_postgres(session):
            session.execute(text("SET LOCAL enable_seqscan = off"))
            plan = session.execute(text(f"EXPLAIN {compiled}")).scalars().all()
        else:
            plan = [row[-1] for row in session.execute(text(f"EXPLAIN QUERY PLAN {compiled}"))]
        ids, votes = store.volunteer_vote_counts(session, WF)
    assert any("ix_views_workflow_volunteer" in line for line in plan), plan
    assert len(ids) == 4 and votes.tolist() == [3, 3, 3, 3]  # four volunteers, three votes each


# --- 4. SQLite statistics -------------------------------------------------------------------------


def statistics(path: Path) -> set[str]:
    """The tables sqlite_stat1 holds statistics of (empty when it does not exist)."""
    with sqlite3.connect(path) as conn:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'").fetchone():
            return set()
        return {row[0] for row in conn.execute("SELECT tbl FROM sqlite_stat1")}


def sqlite_workload(tmp_path: Path) -> tuple[Service, Path]:
    path = tmp_path / "fresh.db"
    migrate(f"sqlite:///{path}")
    assert statistics(path) == set()
    svc = build_service(
        Settings(database_url=f"sqlite:///{path}", export_dir=tmp_path, sweep_interval_s=3600)
    )
    client = workflow_with_votes(svc)
    for s in range(3):
        assert client.get(f"/v1/workflows/{WF}/subjects/{70 + s}").status_code == 200
    assert client.get(f"/v1/workflows/{WF}/volunteers").status_code == 200
    assert client.post(f"/v1/workflows/{WF}/refit").status_code == 200
    settle(svc)
    return svc, path


def test_sqlite_gathers_statistics_when_its_connections_close(tmp_path: Path) -> None:
    """A fresh file has no sqlite_stat1; after a workload, closing the service's connections
    runs PRAGMA optimize, which analyses the tables the workload's queries used."""
    svc, path = sqlite_workload(tmp_path)
    svc.close()
    gathered = statistics(path)
    assert {"views", "answers", "workflow_subjects"} <= gathered, gathered


def test_long_lived_sqlite_connections_optimize_now_and_then(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the service runs (no connection closed), pooled connections optimize as they go
    back to the pool, at most every OPTIMIZE_EVERY_S (0 here)."""
    monkeypatch.setattr(db, "OPTIMIZE_EVERY_S", 0.0)
    svc, path = sqlite_workload(tmp_path)
    try:
        assert {"views", "answers"} <= statistics(path)
        with svc.engine.connect() as conn:
            busy = conn.execute(text("PRAGMA busy_timeout")).scalar()
        assert busy == db.BUSY_TIMEOUT_S * 1000  # the short wait of optimize was undone
    finally:
        svc.close()


def test_a_new_sqlite_connection_analyses_tables_it_has_not_used(tmp_path: Path) -> None:
    """Rows written without statistics: the engine's first connection analyses them on open
    (optimize=0x10002 from SQLite 3.46; before, gzx's own check of never-analysed tables)."""
    path = tmp_path / "plain.db"
    migrate(f"sqlite:///{path}")
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO views (classification_id, workflow_id, subject_id, volunteer_id,"
            " created_at) VALUES (?, 1, ?, ?, '2026-01-01')",
            [(i, i % 50, i % 7) for i in range(2000)],
        )
    engine = make_engine(Settings(database_url=f"sqlite:///{path}"))
    try:
        with engine.connect():
            assert "views" in statistics(path)
    finally:
        engine.dispose()


# --- 5. a refit's retirements and levels go out at once -------------------------------------------


def levels_config(url: str) -> dict[str, Any]:
    """Strict retirement (risk 0.05): two agreeing votes from volunteers of unknown skill are not
    enough (P = 0.84); once gold shows them reliable, the refit retires those subjects."""
    return {
        "classes": ["yes", "no"],
        "question": {
            "task": "T0",
            "answers": [{"index": YES, "class": "yes"}, {"index": NO, "class": "no"}],
        },
        "retirement": {"kind": "risk", "risk_bound": 0.05, "min_views": 2},
        "levels": [{"name": "apprentice", "min_accuracy": 0.6, "min_gold_votes": 10}],
        "effects": {"webhook_url": f"{url}/hook", "webhook_secret": SECRET},
    }


def votes_before_gold(client: TestClient) -> None:
    votes = []
    for user in (41, 42, 43):
        for n in range(8):
            votes.append(p.classic(user * 1000 + 2 * n, GOLD_YES[n], user, YES))
            votes.append(p.classic(user * 1000 + 2 * n + 1, GOLD_NO[n], user, NO))
    votes += [p.classic(90000 + 10 * s + u, 500 + s, u, YES) for s in range(3) for u in (41, 42)]
    assert client.post("/v1/classifications", json=votes).status_code == 200


def upload_gold(client: TestClient) -> dict[str, Any]:
    gold = [{"subject_id": s, "label": "yes"} for s in GOLD_YES]
    gold += [{"subject_id": s, "label": "no"} for s in GOLD_NO]
    response = client.put(f"/v1/workflows/{WF}/gold", json={"subjects": gold})
    assert response.status_code == 200, response.text
    return dict(response.json())


def announced(receiver: Receiver) -> list[tuple[str, Any]]:
    """(event, subject or volunteer) of every webhook that arrived, sorted."""
    out = []
    for _, headers, body, _ in receiver.to("/hook"):
        assert signed_by(headers, body)
        event = json.loads(body)
        if event.get("event") == "volunteer.level":
            out.append(("level", event["volunteer"]))
        else:
            out.append(("retired", event["subject_id"]))
    return sorted(out)


EXPECTED = [
    ("level", "user:41"),
    ("level", "user:42"),
    ("level", "user:43"),
    ("retired", 500),
    ("retired", 501),
    ("retired", 502),
]


def test_a_refits_new_retirements_and_levels_are_delivered_at_once(
    service: Service, receiver: Receiver
) -> None:
    """Embedded: the refit that a gold upload runs records three retirements and three levels;
    their webhooks arrive as soon as the dispatcher is idle, with no sweep (it is an hour off)."""
    client = TestClient(service.app)
    assert client.put(f"/v1/workflows/{WF}", json=levels_config(receiver.url)).is_success
    votes_before_gold(client)
    settle(service)
    assert client.get(f"/v1/workflows/{WF}/subjects/500").json()["status"] == "live"
    assert receiver.to("/hook") == []
    assert upload_gold(client)["refit"]["queued"] is False
    settle(service)
    assert announced(receiver) == EXPECTED
    with service.sessions() as session:
        assert {e.status for e in session.scalars(select(Effect))} == {"done"}
        assert session.scalar(select(func.count()).select_from(VolunteerLevel)) == 3
        assert effects.workflows_with_due_effects(session) == []


def test_the_refit_job_queues_the_delivery_of_what_it_recorded(
    rq_service: Service, redis: Redis, receiver: Receiver
) -> None:
    """With Redis the refit job queues a delivery on "effects" when it recorded retirements or
    levels; a worker sends them, before any sweep."""
    client = TestClient(rq_service.app)
    assert client.put(f"/v1/workflows/{WF}", json=levels_config(receiver.url)).is_success
    votes_before_gold(client)
    work(redis, AGGREGATE_QUEUE)
    Queue(EFFECTS_QUEUE, connection=redis).empty()
    assert upload_gold(client)["refit"]["queued"] is True
    work(redis, AGGREGATE_QUEUE)
    assert Queue(EFFECTS_QUEUE, connection=redis).count >= 1
    work(redis, EFFECTS_QUEUE)
    assert announced(receiver) == EXPECTED
    assert jobs.refit_workflow(WF)["effects_queued"] is False  # nothing new the second time
