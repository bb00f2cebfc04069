"""Ingest: parsed classifications are checked against their workflow's configuration, stored
once each, and only after the commit handed to the pipeline.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

from sqlalchemy import Connection, Engine, select
from sqlalchemy.orm import Session, sessionmaker

from app import store
from app.errors import GzxError, InputError
from app.models import Workflow
from app.parsing import ParsedClassification
from app.pipeline import Dispatcher
from app.store import is_postgres
from app.workflows import WorkflowConfig, load_config

log = logging.getLogger("gzx.ingest")

HOLD_IDLE_S = 1.0  # the group-commit connection goes back to the pool after this long idle


def check_against_config(parsed: ParsedClassification, config: WorkflowConfig) -> None:
    """Reject marks from tools the configured drawing task does not have.

    Annotations of tasks the workflow does not configure are not an error: kept, and ignored.
    """
    if config.drawing is None:
        return
    configured = {tool.index for tool in config.drawing.tools}
    for position, mark in enumerate(parsed.marks):
        if mark.task == config.drawing.task and mark.tool not in configured:
            raise InputError(
                f"tool {mark.tool} is not configured for task {mark.task} "
                f"(configured tools: {sorted(configured)})",
                field=f"annotations.{mark.task}.marks[{position}].tool",
            )


def workflow_configs(session: Session, workflow_ids: set[int]) -> dict[int, WorkflowConfig]:
    if is_postgres(session):
        # In a pipeline, psycopg sends the transaction's BEGIN with this query: one round trip.
        connection = session.connection().connection.driver_connection
        assert connection is not None
        with connection.cursor() as cursor:
            with connection.pipeline():
                cursor.execute(
                    "SELECT id, config FROM workflows WHERE id = ANY(%s) AND config IS NOT NULL",
                    [sorted(workflow_ids)],
                )
            return {workflow_id: load_config(config) for workflow_id, config in cursor}
    rows = session.execute(
        select(Workflow.id, Workflow.config).where(
            Workflow.id.in_(workflow_ids), Workflow.config.is_not(None)
        )
    )
    return {workflow_id: load_config(config) for workflow_id, config in rows}


@dataclass
class IngestOutcome:
    """Per input item: "stored", "duplicate" or "rejected" (then `errors` has its reason)."""

    outcomes: list[str] = field(default_factory=list)
    errors: dict[int, dict[str, str]] = field(default_factory=dict)

    def count(self, outcome: str) -> int:
        return self.outcomes.count(outcome)


def ingest(
    sessions: sessionmaker[Session],
    dispatcher: Dispatcher,
    items: Sequence[ParsedClassification],
    *,
    ip_salt: str,
    each_stands_alone: bool,
) -> IngestOutcome:
    """Store `items` in one transaction, then notify the pipeline.

    With `each_stands_alone` (stream batches) an item that fails the configuration check is
    rejected alone; otherwise the first failure rejects the whole request.
    """
    request = _Request(items, each_stands_alone, outcome=IngestOutcome(["rejected"] * len(items)))
    with sessions.begin() as session:
        configs = workflow_configs(session, {p.workflow_id for p in items})
        accepted = _check_all(request, configs)
        result = store.record_classifications(session, [p for _, p in accepted], ip_salt=ip_salt)
    outcome = request.outcome
    assert outcome is not None
    for (position, _), stored in zip(accepted, result.outcomes, strict=True):
        outcome.outcomes[position] = stored
    dispatcher.notify(result.workflow_ids & set(configs))
    return outcome


@dataclass
class _Request:
    items: Sequence[ParsedClassification]
    each_stands_alone: bool
    done: threading.Event = field(default_factory=threading.Event)
    outcome: IngestOutcome | None = None
    error: BaseException | None = None


class GroupCommitter:
    """Commits the classifications of concurrent requests together, one transaction per group.

    Requests queue up while the previous group commits; the committer thread then takes all that
    are waiting (natural batching: no added delay when the service is idle). Each request keeps
    its own answer: with `each_stands_alone` false, an item failing the configuration check
    rejects only its own request. A failure of the transaction itself fails every request of the
    group (nothing of it is stored), and their senders retry.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        dispatcher: Dispatcher,
        *,
        ip_salt: str,
        max_items: int = 2000,
    ) -> None:
        self._sessions = sessions
        self._dispatcher = dispatcher
        self._ip_salt = ip_salt
        self._max_items = max_items
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._connection: Connection | None = None
        self._last_commit = 0.0
        self._thread = threading.Thread(target=self._run, name="gzx-group-commit", daemon=True)
        self._thread.start()

    def submit(
        self, items: Sequence[ParsedClassification], *, each_stands_alone: bool
    ) -> IngestOutcome:
        request = _Request(items, each_stands_alone)
        self._queue.put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.outcome is not None
        return request.outcome

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._release_connection()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            size = len(first.items)
            while size < self._max_items:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                group.append(more)
                size += len(more.items)
            self._commit(group)

    def _commit(self, group: list[_Request]) -> None:
        try:
            workflow_ids = self._store(group)
        except BaseException as error:  # every request of the group learns of it
            for request in group:
                request.error = error
                request.done.set()
            return
        try:
            self._dispatcher.notify(workflow_ids)  # after the commit, before anyone is answered
        except Exception:
            log.exception("notifying the pipeline failed; the sweeper will pick the work up")
        for request in group:
            request.done.set()

    def _connection_for_group(self) -> Connection | None:
        """The connection groups commit on while busy (no pool checkout and ping per group).

        It is given back after HOLD_IDLE_S without a group, or after any failure, so an idle
        service or a restarted database gets a fresh, pinged connection from the pool.
        """
        if self._connection is not None and time.monotonic() - self._last_commit > HOLD_IDLE_S:
            self._release_connection()
        bind = self._sessions.kw.get("bind")
        if self._connection is None and isinstance(bind, Engine):
            self._connection = bind.connect()
        return self._connection

    def _release_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                log.warning("closing the group-commit connection failed", exc_info=True)

    def _store(self, group: list[_Request]) -> set[int]:
        try:
            connection = self._connection_for_group()
            sessions = (
                self._sessions if connection is None else partial(self._sessions, bind=connection)
            )
            workflow_ids = self._store_on(sessions(), group)
        except BaseException:
            self._release_connection()
            raise
        self._last_commit = time.monotonic()
        return workflow_ids

    def _store_on(self, session: Session, group: list[_Request]) -> set[int]:
        with session, session.begin():
            configs = workflow_configs(session, {p.workflow_id for r in group for p in r.items})
            accepted: list[tuple[_Request, int, ParsedClassification]] = []
            for request in group:
                request.outcome = IngestOutcome(outcomes=["rejected"] * len(request.items))
                try:
                    mine = _check_all(request, configs)
                except InputError as error:
                    request.error = error
                    continue
                accepted.extend((request, position, parsed) for position, parsed in mine)
            result = store.record_classifications(
                session, [parsed for _, _, parsed in accepted], ip_salt=self._ip_salt
            )
        for (request, position, _), stored in zip(accepted, result.outcomes, strict=True):
            assert request.outcome is not None
            request.outcome.outcomes[position] = stored
        return result.workflow_ids & set(configs)


def _check_all(
    request: _Request, configs: dict[int, WorkflowConfig]
) -> list[tuple[int, ParsedClassification]]:
    """The items of one request that pass their workflow's configuration check."""
    assert request.outcome is not None
    accepted = []
    for position, parsed in enumerate(request.items):
        config = configs.get(parsed.workflow_id)
        try:
            if config is not None:
                check_against_config(parsed, config)
        except GzxError as error:
            if not request.each_stands_alone:
                raise InputError(error.message, field=f"[{position}].{error.field}") from None
            request.outcome.errors[position] = error.to_dict()
            continue
        accepted.append((position, parsed))
    return accepted
