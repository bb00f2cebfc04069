"""Moving work from ingest to the aggregation step: RQ in production, a thread when embedded.

Ingest commits, THEN notifies. A notification asks for one coalesced job per workflow that applies
every pending subject of that workflow, so the cost of a job (~5-14 ms in RQ) is paid per batch,
never per vote. A Redis key per workflow debounces notifications: it is set when a job is queued
and deleted when the job starts, so a vote committed while a job runs always gets a new job.
Nothing here is state: if Redis loses everything, the sweeper finds the pending subjects again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Retirement, VolunteerLevel

log = logging.getLogger("gzx.pipeline")

AGGREGATE_QUEUE = "aggregate"
EFFECTS_QUEUE = "effects"
EXPORTS_QUEUE = "exports"
TRAIN_QUEUE = "train"
DEBOUNCE_TTL_S = 120


def debounce_key(workflow_id: int) -> str:
    return f"gzx:apply-queued:{workflow_id}"


class Dispatcher(Protocol):
    def notify(self, workflow_ids: Iterable[int]) -> None:
        """Ask for the pending subjects of these workflows to be applied (after a commit)."""

    def notify_effects(self, workflow_ids: Iterable[int]) -> None:
        """Ask for the effects of these workflows to be delivered (after a commit that recorded
        retirements or levels outside an apply, such as a refit's)."""

    def close(self) -> None:
        """Stop any background work."""


class RQDispatcher:
    """Queues `workers.jobs.apply_workflow` on the `aggregate` queue, one per workflow at a time."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.queue = Queue(AGGREGATE_QUEUE, connection=redis)

    def notify(self, workflow_ids: Iterable[int]) -> None:
        for workflow_id in sorted(set(workflow_ids)):
            try:
                if self.redis.set(debounce_key(workflow_id), 1, nx=True, ex=DEBOUNCE_TTL_S):
                    self.queue.enqueue("workers.jobs.apply_workflow", workflow_id, result_ttl=60)
            except RedisError:
                # The vote is committed; the sweeper will find its subject. Never fail ingest here.
                log.warning("could not queue workflow %s; the sweeper will pick it up", workflow_id)

    def notify_effects(self, workflow_ids: Iterable[int]) -> None:
        effects = Queue(EFFECTS_QUEUE, connection=self.redis)
        for workflow_id in sorted(set(workflow_ids)):
            try:
                effects.enqueue(
                    "workers.jobs.deliver_workflow_effects",
                    workflow_id,
                    job_id=f"effects-{workflow_id}-{time.time_ns()}",
                )
            except RedisError:
                log.warning("could not queue effects of %s; the sweeper will", workflow_id)

    def close(self) -> None:
        self.redis.close()


def start_of_job(redis: Redis, workflow_id: int) -> None:
    """Called first thing by the job: later notifications must queue a new job."""
    redis.delete(debounce_key(workflow_id))


class InProcessDispatcher:
    """Runs the same job functions in a background thread of this process (embedded mode).

    `apply` is called with a workflow id; `deliver` (when given) with a workflow whose effects were
    asked for; `sweep` returns the workflows with pending subjects and is run every
    `sweep_interval_s` seconds, so work survives a crash of this thread's current job. Every job
    runs in this one thread, so two deliveries never overlap (SQLite has no SKIP LOCKED).
    """

    def __init__(
        self,
        apply: Callable[[int], object],
        sweep: Callable[[], Iterable[int]],
        sweep_interval_s: float = 30.0,
        deliver: Callable[[int], object] | None = None,
    ) -> None:
        self._apply = apply
        self._sweep = sweep
        self._deliver = deliver
        self._interval = sweep_interval_s
        self._wanted: set[int] = set()
        self._effects: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="gzx-jobs", daemon=True)
        self._thread.start()

    def notify(self, workflow_ids: Iterable[int]) -> None:
        with self._lock:
            self._wanted.update(workflow_ids)
            self._idle.clear()
        self._wake.set()

    def notify_effects(self, workflow_ids: Iterable[int]) -> None:
        if self._deliver is None:
            return
        with self._lock:
            self._effects.update(workflow_ids)
            self._idle.clear()
        self._wake.set()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until every notified workflow has been applied and every asked delivery made
        (for tests and the demo)."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop:
            woke = self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop:
                return
            if not woke:
                try:
                    self.notify(self._sweep())
                except Exception:
                    log.exception("sweep failed")
                continue
            while True:
                job: Callable[[int], object] | None
                with self._lock:
                    if self._wanted:  # applies first: they may record retirements to deliver
                        job, workflow_id = self._apply, self._wanted.pop()
                    elif self._effects:
                        job, workflow_id = self._deliver, self._effects.pop()
                    else:
                        self._idle.set()
                        break
                try:
                    if job is not None:
                        job(workflow_id)
                except Exception:
                    log.exception(
                        "a job of workflow %s failed; the sweeper will retry", workflow_id
                    )


def newest_outcomes(session: Session, workflow_id: int) -> tuple[int | None, int | None]:
    """The newest retirement and level of a workflow (their ids). Read before and after a refit,
    they tell whether it recorded any: then their effects are asked for at once, not left to the
    sweeper (up to 30 s on), since the refit's own follow-up apply finds nothing to do when the
    refit wrote every subject itself."""
    retirement = session.scalar(
        select(func.max(Retirement.id)).where(Retirement.workflow_id == workflow_id)
    )
    level = session.scalar(
        select(func.max(VolunteerLevel.id)).where(VolunteerLevel.workflow_id == workflow_id)
    )
    return retirement, level


JOB_TIMES_KEY = "gzx:apply-seconds"
_local_job_times: deque[float] = deque(maxlen=1000)


def record_job_time(redis: Redis | None, seconds: float) -> None:
    """Keep the durations of the last 1,000 apply jobs (in Redis, shared by every worker)."""
    if redis is None:
        _local_job_times.append(seconds)
        return
    try:
        pipe = redis.pipeline()
        pipe.lpush(JOB_TIMES_KEY, seconds)
        pipe.ltrim(JOB_TIMES_KEY, 0, 999)
        pipe.execute()
    except RedisError:
        log.warning("could not record a job time")


def recent_job_times(redis: Redis | None) -> list[float]:
    if redis is None:
        return list(_local_job_times)
    return [float(x) for x in redis.lrange(JOB_TIMES_KEY, 0, -1)]
