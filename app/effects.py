"""Effects of a retirement outside gzx: Panoptes retirement, a signed webhook, a Caesar reduction.

Retirements are events in the database; this module turns each into one effect row per configured
kind (an outbox), then delivers due effects, grouping Panoptes retirements in batches of at most
100 subject ids per reason. Each effect is recorded with its status and retried with exponential
backoff; one that succeeded is never sent again. Delivery is at-least-once only across a crash
between the send and the commit of its status (Panoptes' retire is idempotent; webhooks carry an
Idempotency-Key). With `dry_run`, or for subjects the platform had already retired, effects are
recorded as skipped and nothing is sent, so a backfill cannot flood Panoptes.

A volunteer's new level (`app.levels`) is a cause too: user effects hang off the level row (one
per level and kind, like retirements' per retirement and kind): a signed webhook (event
"volunteer.level") and a PUT to Caesar's user-reductions API, whose data lets a Caesar user rule
with the `promote_user` effect move the volunteer to a harder workflow. They share the outbox,
the claim with SKIP LOCKED, the retries and the backoff; `dry_run` records them as skipped.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from app import store
from app.levels import describe, level_number
from app.models import (
    Effect,
    Retirement,
    Subject,
    Volunteer,
    VolunteerLevel,
    Workflow,
    utcnow,
)
from app.settings import Settings
from app.workflows import WorkflowConfig, load_config

log = logging.getLogger("gzx.effects")

PANOPTES_REASONS = {
    "classification_count",
    "flagged",
    "nothing_here",
    "consensus",
    "other",
    "human",
}
MAX_ATTEMPTS = 8
BATCH = 100
LEVEL_WEBHOOK = "level_webhook"
LEVEL_CAESAR = "caesar_user"


def backoff(attempts: int) -> timedelta:
    """Seconds before the next try: 5 s, 10 s, 20 s ... capped at an hour."""
    return timedelta(seconds=min(3600, 5 * 2 ** max(0, attempts - 1)))


def kinds_of(config: WorkflowConfig) -> list[str]:
    effects = config.effects
    kinds = []
    if effects.panoptes:
        kinds.append("panoptes")
    if effects.webhook_url:
        kinds.append("webhook")
    if effects.caesar_url:
        kinds.append("caesar")
    return kinds


def materialize(session: Session, workflow_id: int, config: WorkflowConfig) -> int:
    """One effect row per configured kind for every retirement that has none yet."""
    kinds = kinds_of(config)
    if not kinds:
        return 0
    query = (
        select(Retirement.id, Retirement.subject_id, Subject.platform_retired)
        .outerjoin(Subject, Subject.id == Retirement.subject_id)
        .outerjoin(Effect, Effect.retirement_id == Retirement.id)
        .where(Retirement.workflow_id == workflow_id, Effect.id.is_(None))
        .order_by(Retirement.id)
    )
    causes = []
    for retirement_id, subject_id, platform_retired in session.execute(query).all():
        why = "dry run" if config.effects.dry_run else None
        if why is None and platform_retired:
            why = "retired on the platform"
        causes.append(({"retirement_id": retirement_id, "subject_id": subject_id}, why))
    return _write_outbox(session, workflow_id, kinds, causes, "retirement_id")


def _write_outbox(
    session: Session,
    workflow_id: int,
    kinds: list[str],
    causes: list[tuple[dict[str, Any], str | None]],
    cause_column: str,
) -> int:
    """One effect row per kind for each cause (its columns, and why it is skipped or None);
    a row that already exists for the cause and kind is left as it is. Returns rows offered."""
    now = utcnow()
    rows = [
        {
            **columns,
            "workflow_id": workflow_id,
            "kind": kind,
            "status": "skipped" if why else "pending",
            "attempts": 0,
            "next_attempt_at": now,
            "last_error": why,
            "created_at": now,
        }
        for columns, why in causes
        for kind in kinds
    ]
    if rows:
        statement = store._insert(session, Effect).on_conflict_do_nothing(
            index_elements=[cause_column, "kind"]
        )
        session.execute(statement, rows)
    return len(rows)


def level_kinds_of(config: WorkflowConfig) -> list[str]:
    """The user effects of a new level: a webhook and a Caesar user reduction, as configured."""
    kinds = []
    if config.effects.webhook_url:
        kinds.append(LEVEL_WEBHOOK)
    if config.effects.caesar_url:
        kinds.append(LEVEL_CAESAR)
    return kinds


def materialize_levels(session: Session, workflow_id: int, config: WorkflowConfig) -> int:
    """One effect row per configured kind for every recorded level that has none yet.

    A forgotten volunteer's level is skipped: the platform id it would carry is erased.
    """
    kinds = level_kinds_of(config)
    if not kinds:
        return 0
    query = (
        select(VolunteerLevel.id, VolunteerLevel.volunteer_id, Volunteer.platform_user_id)
        .join(Volunteer, Volunteer.id == VolunteerLevel.volunteer_id)
        .outerjoin(Effect, Effect.level_id == VolunteerLevel.id)
        .where(VolunteerLevel.workflow_id == workflow_id, Effect.id.is_(None))
        .order_by(VolunteerLevel.id)
    )
    causes = []
    for level_id, volunteer_id, user_id in session.execute(query).all():
        why = "dry run" if config.effects.dry_run else None
        if why is None and user_id is None:
            why = "volunteer forgotten"
        causes.append(({"level_id": level_id, "volunteer_id": volunteer_id}, why))
    return _write_outbox(session, workflow_id, kinds, causes, "level_id")


@dataclass(frozen=True)
class Due:
    effect: Effect
    retirement: Retirement


def claim_due(session: Session, workflow_id: int, limit: int = 500) -> list[Due]:
    now = utcnow()
    query = (
        select(Effect, Retirement)
        .join(Retirement, Retirement.id == Effect.retirement_id)
        .where(
            Effect.workflow_id == workflow_id,
            or_(Effect.status == "pending", Effect.status == "failed"),
            or_(Effect.next_attempt_at.is_(None), Effect.next_attempt_at <= now),
        )
        .order_by(Effect.id)
        .limit(limit)
    )
    if store.is_postgres(session):
        query = query.with_for_update(skip_locked=True, of=Effect)
    return [Due(e, r) for e, r in session.execute(query).all()]


@dataclass(frozen=True)
class LevelDue:
    effect: Effect
    level: VolunteerLevel
    volunteer: Volunteer


def claim_due_levels(session: Session, workflow_id: int, limit: int = 500) -> list[LevelDue]:
    """User effects of levels that are due, locked for this deliverer (others skip them)."""
    now = utcnow()
    query = (
        select(Effect, VolunteerLevel, Volunteer)
        .join(VolunteerLevel, VolunteerLevel.id == Effect.level_id)
        .join(Volunteer, Volunteer.id == VolunteerLevel.volunteer_id)
        .where(
            Effect.workflow_id == workflow_id,
            or_(Effect.status == "pending", Effect.status == "failed"),
            or_(Effect.next_attempt_at.is_(None), Effect.next_attempt_at <= now),
        )
        .order_by(Effect.id)
        .limit(limit)
    )
    if store.is_postgres(session):
        query = query.with_for_update(skip_locked=True, of=Effect)
    return [LevelDue(e, level, v) for e, level, v in session.execute(query).all()]


def settle(effect: Effect, error: Exception | None, now: datetime) -> bool:
    """Record one attempt: done, or failed (dead after MAX_ATTEMPTS) with its next try."""
    effect.attempts += 1
    if error is None:
        effect.status, effect.last_error = "done", None
        return True
    effect.status = "dead" if effect.attempts >= MAX_ATTEMPTS else "failed"
    effect.last_error = str(error)[:500]
    effect.next_attempt_at = now + backoff(effect.attempts)
    return False


Sender = Callable[[str, Sequence[Due]], None]


def _panoptes_sender(
    settings: Settings, workflow_id: int
) -> tuple[Callable[[list[int], str], None], Callable[[], None]]:
    """(send, close): retire subject ids with one reason through panoptes-client."""
    from panoptes_client import Panoptes

    client = Panoptes(
        endpoint=settings.panoptes_endpoint,
        client_id=settings.panoptes_client_id,
        client_secret=settings.panoptes_client_secret,
    )

    def send(subject_ids: list[int], reason: str) -> None:
        response = client.http_request(
            "POST",
            f"/workflows/{workflow_id}/retired_subjects",
            json={"subject_ids": subject_ids, "retirement_reason": reason},
        )
        if response.status_code >= 300:
            raise RuntimeError(f"Panoptes answered {response.status_code}")

    return send, client.session.close


def panoptes_reason(reason: str) -> str:
    """Panoptes accepts a fixed set of reasons; anything else goes as "other"."""
    return reason if reason in PANOPTES_REASONS else "other"


def signed_post(url: str, secret: str | None, payload: dict[str, Any], key: str) -> None:
    """POST `payload` as JSON, signed with HMAC-SHA256(secret, timestamp + "." + body) when a
    secret is set; raises on any answer of 300 or more (the caller records and retries it)."""
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    stamp = str(int(time.time()))
    headers = {"content-type": "application/json", "Idempotency-Key": key, "X-Gzx-Timestamp": stamp}
    if secret:
        digest = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256)
        headers["X-Gzx-Signature"] = "sha256=" + digest.hexdigest()
    response = httpx.post(url, content=body, headers=headers, timeout=10)
    if response.status_code >= 300:
        raise RuntimeError(f"{url} answered {response.status_code}")


def reduction(retirement: Retirement, label: str | None) -> dict[str, Any]:
    return {
        "subject_id": retirement.subject_id,
        "workflow_id": retirement.workflow_id,
        "reason": retirement.reason,
        "posterior": retirement.posterior,
        "label": label,
        "votes": retirement.n_votes,
        "retired_at": retirement.created_at.isoformat(),
        "retire": True,
    }


def deliver(
    session: Session, settings: Settings, workflow_id: int, config: WorkflowConfig, due: list[Due]
) -> dict[str, int]:
    """Send due effects; record success, or failure with the time of the next try."""
    now = utcnow()
    sent = failed = 0

    def outcome(items: Sequence[Due], error: Exception | None) -> None:
        nonlocal sent, failed
        for item in items:
            if settle(item.effect, error, now):
                sent += 1
            else:
                failed += 1

    by_kind: dict[str, list[Due]] = defaultdict(list)
    for item in due:
        by_kind[item.effect.kind].append(item)
    labels = store.subject_labels(session, workflow_id, [d.retirement.subject_id for d in due])
    if by_kind.get("panoptes"):
        send, close = _panoptes_sender(settings, workflow_id)
        by_reason: dict[str, list[Due]] = defaultdict(list)
        for item in by_kind["panoptes"]:
            by_reason[panoptes_reason(item.retirement.reason)].append(item)
        try:
            for reason, items in sorted(by_reason.items()):
                for start in range(0, len(items), BATCH):
                    chunk = items[start : start + BATCH]
                    try:
                        send([d.retirement.subject_id for d in chunk], reason)
                        outcome(chunk, None)
                    except Exception as error:  # every failure is recorded and retried
                        log.warning("Panoptes retirement failed: %s", error)
                        outcome(chunk, error)
        finally:
            close()
    for item in by_kind.get("webhook", []):
        payload = reduction(item.retirement, labels.get(item.retirement.subject_id))
        try:
            signed_post(
                config.effects.webhook_url or "",
                config.effects.webhook_secret,
                payload,
                f"gzx-effect-{item.effect.id}",
            )
            outcome([item], None)
        except Exception as error:
            outcome([item], error)
    for item in by_kind.get("caesar", []):
        try:
            push_to_caesar(
                settings, config, item.retirement, labels.get(item.retirement.subject_id)
            )
            outcome([item], None)
        except Exception as error:
            outcome([item], error)
    return {"sent": sent, "failed": failed}


def push_to_caesar(
    settings: Settings, config: WorkflowConfig, retirement: Retirement, label: str | None
) -> None:
    """PUT the subject's reduction to Caesar's subject-reductions API."""
    url = (
        f"{(config.effects.caesar_url or '').rstrip('/')}/workflows/{retirement.workflow_id}"
        f"/subject_reductions/{config.effects.caesar_reducer_key}"
    )
    body = {
        "reduction": {
            "subject_id": retirement.subject_id,
            "subgroup": "_default",
            "data": reduction(retirement, label),
        }
    }
    headers = {"Authorization": f"Bearer {settings.caesar_token}"} if settings.caesar_token else {}
    response = httpx.put(url, json=body, headers=headers, timeout=10)
    if response.status_code >= 300:
        raise RuntimeError(f"Caesar answered {response.status_code}")


def level_event(item: LevelDue, config: WorkflowConfig) -> dict[str, Any]:
    """The webhook body of a new level."""
    return {
        "event": "volunteer.level",
        "workflow_id": item.level.workflow_id,
        "volunteer_id": item.volunteer.id,
        "volunteer": item.volunteer.key,
        "user_id": item.volunteer.platform_user_id,
        **describe(item.level, config),
    }


def user_reduction(session: Session, item: LevelDue, config: WorkflowConfig) -> dict[str, Any]:
    """The data of the volunteer's Caesar user reduction: their HIGHEST level now, not the level
    of this effect, so a retried push of an earlier level can never move Caesar backwards."""
    rows = session.scalars(
        select(VolunteerLevel).where(
            VolunteerLevel.workflow_id == item.level.workflow_id,
            VolunteerLevel.volunteer_id == item.volunteer.id,
        )
    ).all()
    known = [r for r in rows if level_number(config, r.level) is not None]
    best = max(known, key=lambda r: level_number(config, r.level) or 0, default=item.level)
    return {
        **describe(best, config),
        "levels": [
            r.level for r in sorted(known, key=lambda r: level_number(config, r.level) or 0)
        ],
        "volunteer": item.volunteer.key,
    }


def push_user_reduction(
    settings: Settings, config: WorkflowConfig, workflow_id: int, user_id: int, data: dict[str, Any]
) -> None:
    """PUT a volunteer's reduction to Caesar's user-reductions API; Caesar re-runs its user rules
    (and so `promote_user`) when the data changed."""
    url = (
        f"{(config.effects.caesar_url or '').rstrip('/')}/workflows/{workflow_id}"
        f"/user_reductions/{config.effects.caesar_user_reducer_key}"
    )
    body = {"reduction": {"user_id": user_id, "subgroup": "_default", "data": data}}
    headers = {"Authorization": f"Bearer {settings.caesar_token}"} if settings.caesar_token else {}
    response = httpx.put(url, json=body, headers=headers, timeout=10)
    if response.status_code >= 300:
        raise RuntimeError(f"Caesar answered {response.status_code}")


def deliver_levels(
    session: Session,
    settings: Settings,
    workflow_id: int,
    config: WorkflowConfig,
    due: list[LevelDue],
) -> dict[str, int]:
    """Send due user effects of levels; record success, or failure with the next try's time."""
    now = utcnow()
    sent = failed = 0
    for item in due:
        error: Exception | None = None
        try:
            user_id = item.volunteer.platform_user_id
            if user_id is None or item.volunteer.kind != "user":
                item.effect.status, item.effect.last_error = "skipped", "volunteer forgotten"
                continue
            if item.effect.kind == LEVEL_WEBHOOK:
                signed_post(
                    config.effects.webhook_url or "",
                    config.effects.webhook_secret,
                    level_event(item, config),
                    f"gzx-effect-{item.effect.id}",
                )
            elif item.effect.kind == LEVEL_CAESAR:
                data = user_reduction(session, item, config)
                push_user_reduction(settings, config, workflow_id, user_id, data)
            else:
                raise RuntimeError(f"unknown user effect {item.effect.kind!r}")
        except Exception as caught:  # every failure is recorded and retried
            log.warning("user effect %s failed: %s", item.effect.id, caught)
            error = caught
        if settle(item.effect, error, now):
            sent += 1
        else:
            failed += 1
    return {"sent": sent, "failed": failed}


def deliver_effects(
    sessions: sessionmaker[Session], settings: Settings, workflow_id: int
) -> dict[str, int]:
    """The effects job: outbox rows for new retirements, then every due effect, in turn."""
    total = {"created": 0, "sent": 0, "failed": 0}
    with sessions.begin() as session:
        workflow = session.get(Workflow, workflow_id)
        if workflow is None or workflow.config is None:
            return total
        config = load_config(workflow.config)
        total["created"] = materialize(session, workflow_id, config)
        total["created"] += materialize_levels(session, workflow_id, config)
    while True:
        with sessions.begin() as session:
            due = claim_due(session, workflow_id)
            due_levels = claim_due_levels(session, workflow_id)
            if not due and not due_levels:
                return total
            results = [
                deliver(session, settings, workflow_id, config, due) if due else {},
                deliver_levels(session, settings, workflow_id, config, due_levels)
                if due_levels
                else {},
            ]
        sent = sum(r.get("sent", 0) for r in results)
        total["sent"] += sent
        total["failed"] += sum(r.get("failed", 0) for r in results)
        if sent == 0:
            return total  # everything due failed: the backoff decides when to try again


def workflows_with_due_effects(session: Session) -> list[int]:
    now = utcnow()
    query = (
        select(Effect.workflow_id)
        .where(
            or_(Effect.status == "pending", Effect.status == "failed"),
            or_(Effect.next_attempt_at.is_(None), Effect.next_attempt_at <= now),
        )
        .distinct()
    )
    pending = set(session.scalars(query))
    new = (
        select(Retirement.workflow_id)
        .outerjoin(Effect, and_(Effect.retirement_id == Retirement.id))
        .where(Effect.id.is_(None))
        .distinct()
    )
    for workflow_id in set(session.scalars(new)) - pending:
        workflow = session.get(Workflow, workflow_id)
        if workflow is not None and workflow.config and kinds_of(load_config(workflow.config)):
            pending.add(workflow_id)
    new_levels = (
        select(VolunteerLevel.workflow_id)
        .outerjoin(Effect, Effect.level_id == VolunteerLevel.id)
        .where(Effect.id.is_(None))
        .distinct()
    )
    for workflow_id in set(session.scalars(new_levels)) - pending:
        workflow = session.get(Workflow, workflow_id)
        if (
            workflow is not None
            and workflow.config
            and level_kinds_of(load_config(workflow.config))
        ):
            pending.add(workflow_id)
    return sorted(pending)
