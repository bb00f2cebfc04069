"""RQ job functions: plain importable functions that take ids, never rows."""

from __future__ import annotations

import time

from rq import Queue

from app import aggregation, effects, store
from app.pipeline import (
    AGGREGATE_QUEUE,
    EFFECTS_QUEUE,
    RQDispatcher,
    newest_outcomes,
    record_job_time,
    start_of_job,
)
from workers.context import context


def apply_workflow(workflow_id: int) -> int:
    """Apply every pending subject of one workflow; returns how many subjects were applied."""
    ctx = context()
    if ctx.redis is not None:
        start_of_job(ctx.redis, workflow_id)
    started = time.perf_counter()
    applied = aggregation.apply_pending(ctx.sessions, workflow_id, ctx.settings.apply_batch_size)
    record_job_time(ctx.redis, time.perf_counter() - started)
    if applied and ctx.redis is not None:
        Queue(EFFECTS_QUEUE, connection=ctx.redis).enqueue(
            deliver_workflow_effects, workflow_id, job_id=f"effects-{workflow_id}-{time.time_ns()}"
        )
    return applied


def deliver_workflow_effects(workflow_id: int) -> dict[str, int]:
    """Effects of a workflow's new retirements, and retries of failed ones that are due."""
    ctx = context()
    return effects.deliver_effects(ctx.sessions, ctx.settings, workflow_id)


def sweep() -> list[int]:
    """Queue a job for every workflow with pending subjects (recovers work Redis lost), a
    delivery for every workflow with due effects, and one for the export webhooks due again."""
    from app import exports

    ctx = context()
    with ctx.sessions() as session:
        workflow_ids = store.workflows_with_pending(session)
        due_effects = effects.workflows_with_due_effects(session)
        due_webhooks = exports.due_webhooks(session, limit=1)
    if ctx.redis is None:
        if due_webhooks:
            exports.deliver_due_webhooks(ctx.sessions)
        return workflow_ids
    queue = Queue(EFFECTS_QUEUE, connection=ctx.redis)
    for workflow_id in due_effects:
        queue.enqueue(deliver_workflow_effects, workflow_id)
    if due_webhooks:
        queue.enqueue(deliver_export_webhooks)
    for workflow_id in workflow_ids:
        # Force a new job even if a (possibly lost) debounce key is still set.
        start_of_job(ctx.redis, workflow_id)
    RQDispatcher(ctx.redis).notify(workflow_ids)
    return workflow_ids


def deliver_export_webhooks() -> dict[str, int]:
    """One try of every export-done webhook that is due again (failed ones, after backoff)."""
    from app import exports

    return exports.deliver_due_webhooks(context().sessions)


def refit_workflow(workflow_id: int) -> dict[str, object]:
    """EM over every stored vote of a workflow, a new skill snapshot, then every subject again;
    the retirements and levels the refit recorded are delivered now, not at the next sweep."""
    ctx = context()
    with ctx.sessions() as session:
        before = newest_outcomes(session, workflow_id)
    report = aggregation.refit(ctx.sessions, workflow_id)
    with ctx.sessions() as session:
        recorded = newest_outcomes(session, workflow_id) != before
    if ctx.redis is not None:
        start_of_job(ctx.redis, workflow_id)
        dispatcher = RQDispatcher(ctx.redis)
        dispatcher.notify([workflow_id])
        if recorded:
            dispatcher.notify_effects([workflow_id])
    elif recorded:
        effects.deliver_effects(ctx.sessions, ctx.settings, workflow_id)
    return {
        "snapshot_id": report.snapshot_id,
        "n_votes": report.n_votes,
        "effects_queued": recorded,
    }


def run_schedules() -> list[int]:
    """Queue the refits whose workflow's interval has passed (rq cron runs this every minute)."""
    ctx = context()
    with ctx.sessions() as session:
        due = aggregation.due_refits(session)
    if ctx.redis is not None:
        queue = Queue(AGGREGATE_QUEUE, connection=ctx.redis)
        for workflow_id in due:
            queue.enqueue(
                refit_workflow, workflow_id, job_id=f"refit-{workflow_id}", job_timeout=3600
            )
    start_scheduled_exports()
    return due


def write_export_job(export_id: str) -> str:
    """Write a queued export; when done, its webhook and (with Redis) a job on the queue "train"
    carrying the export id."""
    from app import exports
    from app.pipeline import TRAIN_QUEUE

    ctx = context()
    status = exports.write_export(ctx.sessions, ctx.settings, export_id)
    settings = exports.notify_done(ctx.sessions, export_id) if status == "done" else None
    if settings is not None and ctx.redis is not None:
        Queue(TRAIN_QUEUE, connection=ctx.redis).enqueue(  # training outlasts RQ's 180 s default
            settings["train_job"], export_id, job_timeout=24 * 3600
        )
    return status


def start_scheduled_exports() -> list[str]:
    """An export of every workflow whose `exports.schedule_interval_s` has passed since its last
    one, and again every export whose writer was lost (still queued ten minutes on, or running
    with no heartbeat for longer than the lease): queued on "exports" with Redis, written right
    here without. Returns the ids it started or restarted; a writer claims each once."""
    from app import exports
    from app.pipeline import EXPORTS_QUEUE

    ctx = context()
    with ctx.sessions.begin() as session:
        started = [
            exports.create_export(
                session, workflow_id, exports.scheduled_rules(session, workflow_id)
            )
            for workflow_id in exports.due_exports(session)
        ]
        started += exports.to_rerun(session)
    for export_id in started:
        if ctx.redis is not None:
            Queue(EXPORTS_QUEUE, connection=ctx.redis).enqueue(
                write_export_job, export_id, job_timeout=3600
            )
        else:
            write_export_job(export_id)
    return started
