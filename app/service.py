"""Assembling a running service from settings: engine, Redis, job dispatcher, HTTP app."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI
from redis import Redis
from rq import Queue
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app import aggregation, effects, exports, store
from app.api import create_app
from app.db import make_engine, make_sessionmaker
from app.ingest import GroupCommitter
from app.pipeline import (
    AGGREGATE_QUEUE,
    Dispatcher,
    InProcessDispatcher,
    RQDispatcher,
    newest_outcomes,
    record_job_time,
)
from app.settings import Settings


@dataclass
class Service:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    redis: Redis | None
    dispatcher: Dispatcher
    committer: GroupCommitter
    app: FastAPI

    def close(self) -> None:
        self.committer.close()
        self.dispatcher.close()
        self.engine.dispose()


def sweep(settings: Settings, sessions: sessionmaker[Session]) -> list[int]:
    """One pass of the embedded sweeper (what `rq cron` runs with Redis): due refits, effects
    that are new or due again, scheduled exports and exports whose writer was lost (queued long
    ago, or running with an expired lease), and export webhooks due again. Returns the
    workflows with pending subjects, for the dispatcher to apply."""
    with sessions() as session:
        due = aggregation.due_refits(session)
    for workflow_id in due:
        aggregation.refit(sessions, workflow_id)
    with sessions() as session:
        retries = effects.workflows_with_due_effects(session)
    for workflow_id in retries:
        effects.deliver_effects(sessions, settings, workflow_id)
    with sessions.begin() as session:
        scheduled = [
            exports.create_export(session, w, exports.scheduled_rules(session, w))
            for w in exports.due_exports(session)
        ]
        scheduled += exports.to_rerun(session)
    for export_id in scheduled:
        if exports.write_export(sessions, settings, export_id) == "done":
            exports.notify_done(sessions, export_id)
    exports.deliver_due_webhooks(sessions)
    with sessions() as session:
        return store.workflows_with_pending(session)


def in_process_dispatcher(
    settings: Settings, sessions: sessionmaker[Session]
) -> InProcessDispatcher:
    """The embedded mode's job runner: the same job functions, in a thread of this process."""

    def apply(workflow_id: int) -> Any:
        started = time.perf_counter()
        applied = aggregation.apply_pending(sessions, workflow_id, settings.apply_batch_size)
        record_job_time(None, time.perf_counter() - started)
        if applied:
            effects.deliver_effects(sessions, settings, workflow_id)
        return applied

    def deliver(workflow_id: int) -> Any:
        return effects.deliver_effects(sessions, settings, workflow_id)

    return InProcessDispatcher(
        apply, lambda: sweep(settings, sessions), settings.sweep_interval_s, deliver=deliver
    )


def refit_runner(
    sessions: sessionmaker[Session], dispatcher: Dispatcher, redis: Redis | None
) -> Callable[[int], dict[str, Any]]:
    """Refit now, in this process (embedded), or queue the refit job (with Redis). After an
    embedded refit, the apply of what it left pending, and the effects of the retirements and
    levels it recorded, are handed to the dispatcher right away."""

    def run(workflow_id: int) -> dict[str, Any]:
        if redis is not None:
            job = Queue(AGGREGATE_QUEUE, connection=redis).enqueue(
                "workers.jobs.refit_workflow", workflow_id, job_timeout=3600
            )
            return {"queued": True, "job_id": job.id}
        with sessions() as session:
            before = newest_outcomes(session, workflow_id)
        report = aggregation.refit(sessions, workflow_id)
        dispatcher.notify([workflow_id])
        with sessions() as session:
            if newest_outcomes(session, workflow_id) != before:
                dispatcher.notify_effects([workflow_id])
        return {"queued": False, **asdict(report)}

    return run


def build_service(settings: Settings) -> Service:
    """Everything `gzx serve` runs: RQ when GZX_REDIS_URL is set, in-process jobs otherwise."""
    engine = make_engine(settings)
    sessions = make_sessionmaker(engine)
    redis = Redis.from_url(settings.redis_url) if settings.redis_url else None
    dispatcher: Dispatcher = (
        RQDispatcher(redis) if redis is not None else in_process_dispatcher(settings, sessions)
    )
    committer = GroupCommitter(sessions, dispatcher, ip_salt=settings.ip_salt)
    app = create_app(
        settings, sessions, dispatcher, committer, refit_runner(sessions, dispatcher, redis), redis
    )
    return Service(settings, engine, sessions, redis, dispatcher, committer, app)
