"""The one module that talks to the database. It uses the session it is given and never commits:
the route or the job that calls it owns the transaction (`with sessions.begin() as session:`).

Writes are set-based (one statement per table per batch), sorted by key so that concurrent
batches take row locks in the same order and cannot deadlock.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import (
    JSON,
    BigInteger,
    Table,
    any_,
    bindparam,
    case,
    cast,
    delete,
    func,
    literal,
    literal_column,
    null,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import BindParameter

from app.models import (
    Answer,
    AuditEntry,
    Classification,
    Cluster,
    Gold,
    Mark,
    MarkSnapshot,
    Retirement,
    SkillSnapshot,
    Subject,
    View,
    Volunteer,
    Workflow,
    WorkflowSubject,
    as_utc,
    utcnow,
)
from app.parsing import ParsedClassification, ParsedSubject
from app.workflows import parse_version


def _insert(session: Session, model: Any) -> Any:
    """An INSERT that knows ON CONFLICT for the session's dialect."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(model)
    return sqlite.insert(model)


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


@dataclass(frozen=True)
class VolunteerIdentity:
    key: str
    kind: str
    platform_user_id: int | None
    login: str | None
    ip_hash: str | None


def hash_ip(ip: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}:{ip}".encode()).hexdigest()[:32]


def identify_volunteer(parsed: ParsedClassification, ip_salt: str) -> VolunteerIdentity:
    """Who made a classification: a logged-in user, an anonymous session, or a machine.

    Only `app.machines` builds classifications with source "machine" (no platform payload can
    set a source); their `anonymous_key` is the model version's key `ml:<model>@<version>`.
    """
    if parsed.source == "machine" and parsed.anonymous_key:
        return VolunteerIdentity(parsed.anonymous_key, "machine", None, None, None)
    if parsed.user_id is not None:
        return VolunteerIdentity(
            f"user:{parsed.user_id}", "user", parsed.user_id, parsed.user_login, None
        )
    if parsed.anonymous_key:
        session_hash = parsed.anonymous_key.removeprefix("not-logged-in-")
        return VolunteerIdentity(
            f"anon:{session_hash}", "anonymous", None, None, hash_ip(session_hash, ip_salt)
        )
    if parsed.user_ip:
        ip_hash = hash_ip(parsed.user_ip, ip_salt)
        return VolunteerIdentity(f"anon:{ip_hash}", "anonymous", None, None, ip_hash)
    return VolunteerIdentity(f"anon:classification-{parsed.id}", "anonymous", None, None, None)


@dataclass(frozen=True)
class RecordResult:
    """What became of each classification of a batch, in input order."""

    outcomes: list[str]  # "stored" | "duplicate"
    workflow_ids: set[int]


def record_classifications(
    session: Session, items: Sequence[ParsedClassification], *, ip_salt: str
) -> RecordResult:
    """Store classifications once each; a repeat delivery only adds what the first one lacked."""
    if not items:
        return RecordResult([], set())
    now = utcnow()
    first_of: dict[int, ParsedClassification] = {}
    for parsed in items:
        first_of.setdefault(parsed.id, parsed)
    unique = sorted(first_of.values(), key=lambda p: p.id)

    plan = _postgres_plan() if is_postgres(session) else None
    if plan is not None:
        inserted = _record_on_postgres(session, plan, unique, ip_salt, now)
        _enrich_duplicates(session, [p for p in unique if p.id not in inserted], ip_salt)
        return _result(items, inserted, [p for p in unique if p.id in inserted])

    _ensure_workflows(session, {p.workflow_id for p in unique}, now)
    volunteer_ids = _ensure_volunteers(session, unique, ip_salt, now)
    _upsert_subjects(session, unique, now)

    rows = [
        {
            "id": p.id,
            "workflow_id": p.workflow_id,
            "volunteer_id": volunteer_ids[p.id],
            "workflow_version": p.workflow_version,
            "version_major": (parse_version(p.workflow_version) or (None, None))[0],
            "version_minor": (parse_version(p.workflow_version) or (None, None))[1],
            "created_at": p.created_at,
            "received_at": now,
            "source": p.source,
            "gold_standard": p.gold_standard,
            "expert": p.expert,
            "subject_ids": list(p.subject_ids),
            "raw": _raw_of(p),
        }
        for p in unique
    ]
    statement = _insert(session, Classification).on_conflict_do_nothing(index_elements=["id"])
    inserted = set(session.scalars(statement.returning(Classification.id), rows).all())
    fresh = [p for p in unique if p.id in inserted]
    _enrich_duplicates(session, [p for p in unique if p.id not in inserted], ip_salt)
    _insert_votes(session, fresh, volunteer_ids, now)
    return _result(items, inserted, fresh)


def _result(
    items: Sequence[ParsedClassification],
    inserted: set[int],
    fresh: Sequence[ParsedClassification],
) -> RecordResult:
    outcomes = []
    seen: set[int] = set()
    for parsed in items:
        outcomes.append(
            "stored" if parsed.id in inserted and parsed.id not in seen else "duplicate"
        )
        seen.add(parsed.id)
    return RecordResult(outcomes, {p.workflow_id for p in fresh})


# --- PostgreSQL: the whole batch in one round trip ----------------------------------------------
#
# The rows travel as one JSON document per statement (jsonb_to_recordset), and the statements go
# in one psycopg pipeline: workflows, volunteers, subjects (fill-ins, then new ones), then one
# statement whose data-modifying CTEs insert the classifications (ON CONFLICT DO NOTHING) and,
# for those actually inserted, their views, answers, marks and pending flags. Each statement
# sees the ones before it (READ COMMITTED takes a new snapshot per statement), so volunteer ids
# are looked up in SQL, never fetched. Inserts are ordered by key, as in the generic path.
# Column defaults come from the models; a model this code does not know how to fill (a new
# NOT NULL column, a JSON default) sends every batch down the generic path instead.

_JSONB_FALSY = "('null', 'false', '0', '\"\"', '[]', '{}')"


def _falsy(column: str) -> str:
    """SQL for Python's `not value` on a stored JSON column."""
    return f"({column} IS NULL OR {column} IN {_JSONB_FALSY})"


@dataclass(frozen=True)
class _InsertPlan:
    sql: str
    defaults: tuple[tuple[str, Any], ...]  # (parameter name, column default)

    def params(self, now: datetime, **values: Any) -> dict[str, Any]:
        out = dict(values, now=now)
        for name, default in self.defaults:
            out[name] = now if default.is_callable else default.arg
        return out


@dataclass(frozen=True)
class _PostgresPlan:
    workflows: _InsertPlan
    volunteers: _InsertPlan
    subjects_fill: str
    subjects_new: _InsertPlan
    classifications: _InsertPlan


def _insert_plan(model: Any, supplied: dict[str, str], template: str) -> _InsertPlan | None:
    """INSERT INTO the model's table: `supplied` columns, then its other Python-side defaults."""
    table = model.__table__
    columns, values, defaults = list(supplied), list(supplied.values()), []
    for column in table.columns:
        if column.name in supplied:
            continue
        if column.default is None:
            if column.nullable or column.server_default is not None or column.autoincrement is True:
                continue
            return None  # NOT NULL with nothing to fill it
        if isinstance(column.type, JSON) or (
            column.default.is_callable and column.default.arg is not utcnow
        ):
            return None
        if not (column.default.is_callable or column.default.is_scalar):
            return None
        name = f"default_{table.name}_{column.name}"
        columns.append(column.name)
        values.append(f"%({name})s")
        defaults.append((name, column.default))
    sql = template.format(table=table.name, columns=", ".join(columns), values=", ".join(values))
    return _InsertPlan(sql, tuple(defaults))


@functools.cache
def _postgres_plan() -> _PostgresPlan | None:
    workflows = _insert_plan(
        Workflow,
        {"id": "w", "created_at": "%(now)s", "updated_at": "%(now)s"},
        "INSERT INTO {table} ({columns}) SELECT {values}"
        " FROM unnest(%(ids)s::bigint[]) AS w ORDER BY w ON CONFLICT (id) DO NOTHING",
    )
    volunteers = _insert_plan(
        Volunteer,
        {
            "key": "v.key",
            "kind": "v.kind",
            "platform_user_id": "v.platform_user_id",
            "login": "v.login",
            "ip_hash": "v.ip_hash",
            "created_at": "%(now)s",
        },
        "INSERT INTO {table} ({columns}) SELECT {values} FROM jsonb_to_recordset(%(doc)s::jsonb)"
        " AS v(key text, kind text, platform_user_id bigint, login text, ip_hash text)"
        ' ORDER BY v.key COLLATE "C" ON CONFLICT (key) DO NOTHING',
    )
    subjects_new = _insert_plan(
        Subject,
        {
            "id": "s.id",
            "metadata": "COALESCE(s.metadata, '{}')",
            "locations": "COALESCE(s.locations, '[]')",
            "width": "s.width",
            "height": "s.height",
            "platform_retired": "COALESCE(s.retired, false)",
            "updated_at": "%(now)s",
        },
        "INSERT INTO {table} ({columns}) SELECT {values} FROM jsonb_to_recordset(%(doc)s::jsonb)"
        " AS s(id bigint, metadata jsonb, locations jsonb, width float8, height float8,"
        " retired boolean) ORDER BY s.id ON CONFLICT (id) DO NOTHING",
    )
    view = _insert_plan(
        View,
        {
            "classification_id": "id",
            "workflow_id": "workflow_id",
            "subject_id": "subject_id",
            "volunteer_id": "volunteer_id",
            "created_at": "created_at",
        },
        "INSERT INTO {table} ({columns}) SELECT {values} FROM fresh ORDER BY id",
    )
    answer = _insert_plan(
        Answer,
        {
            "classification_id": "f.id",
            "workflow_id": "f.workflow_id",
            "subject_id": "f.subject_id",
            "task": "a.task",
            "value": "a.value",
            "label": "a.label",
            "volunteer_id": "f.volunteer_id",
            "created_at": "f.created_at",
            "version_major": "f.version_major",
            "version_minor": "f.version_minor",
        },
        "INSERT INTO {table} ({columns}) SELECT {values} FROM fresh AS f,"
        " ROWS FROM (jsonb_to_recordset(f.answers) AS (task text, value int, label text))"
        " WITH ORDINALITY AS a(task, value, label, n) ORDER BY f.id, a.n",
    )
    mark = _insert_plan(
        Mark,
        {
            "classification_id": "f.id",
            "workflow_id": "f.workflow_id",
            "subject_id": "f.subject_id",
            "task": "m.task",
            "tool": "m.tool",
            "frame": "m.frame",
            "kind": "m.kind",
            "x1": "m.x1",
            "y1": "m.y1",
            "x2": "m.x2",
            "y2": "m.y2",
            "details": "COALESCE(m.details, 'null')",
        },
        "INSERT INTO {table} ({columns}) SELECT {values} FROM fresh AS f,"
        " ROWS FROM (jsonb_to_recordset(f.marks) AS (task text, tool int, frame int, kind text,"
        " x1 float8, y1 float8, x2 float8, y2 float8, details jsonb))"
        " WITH ORDINALITY AS m(task, tool, frame, kind, x1, y1, x2, y2, details, n)"
        " ORDER BY f.id, m.n",
    )
    pending = _insert_plan(
        WorkflowSubject,
        {
            "workflow_id": "workflow_id",
            "subject_id": "subject_id",
            "pending": "true",
            "pending_since": "%(now)s",
            "updated_at": "%(now)s",
        },
        "INSERT INTO {table} ({columns}) SELECT DISTINCT {values} FROM fresh"
        " ORDER BY workflow_id, subject_id ON CONFLICT (workflow_id, subject_id)"
        " DO UPDATE SET pending = true, updated_at = excluded.updated_at,"
        " pending_since = CASE WHEN workflow_subjects.pending"
        " THEN COALESCE(workflow_subjects.pending_since, excluded.pending_since)"
        " ELSE excluded.pending_since END",
    )
    classification = _insert_plan(
        Classification,
        {
            "id": "id",
            "workflow_id": "workflow_id",
            "volunteer_id": "volunteer_id",
            "workflow_version": "workflow_version",
            "version_major": "version_major",
            "version_minor": "version_minor",
            "created_at": "created_at",
            "received_at": "%(now)s",
            "source": "source",
            "gold_standard": "gold_standard",
            "expert": "expert",
            "subject_ids": "subject_ids",
            "raw": "raw",
        },
        "INSERT INTO {table} ({columns}) SELECT {values} FROM staged ORDER BY id"
        " ON CONFLICT (id) DO NOTHING RETURNING id",
    )
    parts = (workflows, volunteers, subjects_new, view, answer, mark, pending, classification)
    if any(part is None for part in parts):
        return None
    assert workflows and volunteers and subjects_new and view and answer and mark and pending
    assert classification
    classifications = _InsertPlan(
        f"""WITH input AS (
  SELECT * FROM jsonb_to_recordset(%(doc)s::jsonb) AS t(
    id bigint, workflow_id bigint, volunteer_key text, workflow_version text,
    version_major int, version_minor int, created_at timestamptz, source text,
    gold_standard boolean, expert text, subject_ids jsonb, raw jsonb, subject_id bigint,
    answers jsonb, marks jsonb)
), staged AS (
  SELECT input.*, v.id AS volunteer_id
  FROM input LEFT JOIN volunteers AS v ON v.key = input.volunteer_key
), inserted AS (
  {classification.sql}
), fresh AS (
  SELECT staged.* FROM staged JOIN inserted USING (id) WHERE staged.subject_id IS NOT NULL
), new_views AS (
  {view.sql}
), new_answers AS (
  {answer.sql}
), new_marks AS (
  {mark.sql}
), new_pending AS (
  {pending.sql}
)
SELECT id FROM inserted""",
        tuple(
            default
            for part in (classification, view, answer, mark, pending)
            for default in part.defaults
        ),
    )
    subjects_fill = f"""UPDATE subjects AS s SET
  metadata = CASE WHEN i.metadata IS NOT NULL AND {_falsy("s.metadata")}
    THEN i.metadata ELSE s.metadata END,
  locations = CASE WHEN i.locations IS NOT NULL AND {_falsy("s.locations")}
    THEN i.locations ELSE s.locations END,
  width = CASE WHEN i.width IS NOT NULL AND s.width IS NULL THEN i.width ELSE s.width END,
  height = CASE WHEN i.width IS NOT NULL AND s.width IS NULL THEN i.height ELSE s.height END,
  platform_retired = CASE WHEN i.retired AND NOT COALESCE(s.platform_retired, false)
    THEN true ELSE s.platform_retired END,
  updated_at = %(now)s
FROM jsonb_to_recordset(%(doc)s::jsonb) AS i(id bigint, metadata jsonb, locations jsonb,
  width float8, height float8, retired boolean)
WHERE s.id = i.id AND (
  (i.metadata IS NOT NULL AND {_falsy("s.metadata")})
  OR (i.locations IS NOT NULL AND {_falsy("s.locations")})
  OR (i.width IS NOT NULL AND s.width IS NULL)
  OR (i.retired AND NOT COALESCE(s.platform_retired, false)))"""
    return _PostgresPlan(workflows, volunteers, subjects_fill, subjects_new, classifications)


def _record_on_postgres(
    session: Session,
    plan: _PostgresPlan,
    unique: Sequence[ParsedClassification],
    ip_salt: str,
    now: datetime,
) -> set[int]:
    """Store a batch (unique ids, sorted) in one pipeline; the ids actually inserted."""
    identities = {p.id: identify_volunteer(p, ip_salt) for p in unique}
    volunteers = [
        {
            "key": i.key,
            "kind": i.kind,
            "platform_user_id": i.platform_user_id,
            "login": i.login,
            "ip_hash": i.ip_hash,
        }
        for i in {i.key: i for i in identities.values()}.values()
    ]
    subjects = []
    for subject_id, entry in _incoming_subjects(unique).items():
        size = entry["size"] or (None, None)
        subjects.append(
            {
                "id": subject_id,
                "metadata": entry["metadata"] or None,
                "locations": entry["locations"] or None,
                "width": size[0],
                "height": size[1],
                "retired": bool(entry["retired"]),
            }
        )
    records = []
    for p in unique:
        version = parse_version(p.workflow_version) or (None, None)
        records.append(
            {
                "id": p.id,
                "workflow_id": p.workflow_id,
                "volunteer_key": identities[p.id].key,
                "workflow_version": p.workflow_version,
                "version_major": version[0],
                "version_minor": version[1],
                "created_at": p.created_at.isoformat(),
                "source": p.source,
                "gold_standard": p.gold_standard,
                "expert": p.expert,
                "subject_ids": list(p.subject_ids),
                "raw": _raw_of(p),
                "subject_id": p.subject_ids[0] if p.subject_ids else None,
                "answers": [
                    {"task": a.task, "value": a.index, "label": a.label} for a in p.answers
                ],
                "marks": [
                    {
                        "task": m.task,
                        "tool": m.tool,
                        "frame": m.frame,
                        "kind": m.kind,
                        "x1": m.x1,
                        "y1": m.y1,
                        "x2": m.x2,
                        "y2": m.y2,
                        "details": list(m.details) or None,
                    }
                    for m in p.marks
                ],
            }
        )
    workflow_ids = sorted({p.workflow_id for p in unique})
    connection = session.connection().connection.driver_connection
    assert connection is not None
    with connection.cursor() as cursor, connection.cursor() as last:
        with connection.pipeline():  # one Sync, at the end: one round trip for the batch
            cursor.execute(plan.workflows.sql, plan.workflows.params(now, ids=workflow_ids))
            cursor.execute(
                plan.volunteers.sql, plan.volunteers.params(now, doc=json.dumps(volunteers))
            )
            if subjects:
                doc = json.dumps(subjects)
                cursor.execute(plan.subjects_fill, {"now": now, "doc": doc})
                cursor.execute(plan.subjects_new.sql, plan.subjects_new.params(now, doc=doc))
            last.execute(
                plan.classifications.sql,
                plan.classifications.params(now, doc=json.dumps(records)),
            )
        return {row[0] for row in last.fetchall()}


def _raw_of(parsed: ParsedClassification) -> dict[str, Any]:
    return {
        "annotations": parsed.annotations,
        "metadata": parsed.metadata,
        "subject_ids": list(parsed.subject_ids),
        "project_id": parsed.project_id,
        "classifier_version": parsed.classifier_version,
    }


def _ensure_workflows(session: Session, workflow_ids: set[int], now: datetime) -> None:
    rows = [{"id": w, "created_at": now, "updated_at": now} for w in sorted(workflow_ids)]
    session.execute(_insert(session, Workflow).on_conflict_do_nothing(index_elements=["id"]), rows)


def _ensure_volunteers(
    session: Session, items: Sequence[ParsedClassification], ip_salt: str, now: datetime
) -> dict[int, int]:
    """Volunteer row id for each classification id, creating volunteers on first sight."""
    identity = {p.id: identify_volunteer(p, ip_salt) for p in items}
    by_key = {i.key: i for i in identity.values()}
    rows = [
        {
            "key": i.key,
            "kind": i.kind,
            "platform_user_id": i.platform_user_id,
            "login": i.login,
            "ip_hash": i.ip_hash,
            "excluded": False,
            "created_at": now,
        }
        for i in sorted(by_key.values(), key=lambda i: i.key)
    ]
    session.execute(
        _insert(session, Volunteer).on_conflict_do_nothing(index_elements=["key"]), rows
    )
    ids = dict(
        session.execute(select(Volunteer.key, Volunteer.id).where(Volunteer.key.in_(by_key))).all()
    )
    return {cid: ids[i.key] for cid, i in identity.items()}


def _subject_size(parsed: ParsedClassification) -> tuple[float, float] | None:
    dimensions = (
        parsed.metadata.get("subject_dimensions") if isinstance(parsed.metadata, dict) else None
    )
    if isinstance(dimensions, list) and dimensions and isinstance(dimensions[0], dict):
        width, height = dimensions[0].get("naturalWidth"), dimensions[0].get("naturalHeight")
        if (
            isinstance(width, int | float)
            and isinstance(height, int | float)
            and width > 0
            and height > 0
        ):
            return float(width), float(height)
    return None


def _upsert_subjects(
    session: Session, items: Sequence[ParsedClassification], now: datetime
) -> None:
    """Create subjects on first sight; fill in metadata, locations and size a later copy brings."""
    _merge_subjects(session, _incoming_subjects(items), now)


def _incoming_subjects(items: Sequence[ParsedClassification]) -> dict[int, dict[str, Any]]:
    """What a batch says of each of its subjects (the first copy that says something wins)."""
    incoming: dict[int, dict[str, Any]] = {}
    for parsed in items:
        described = {s.id: s for s in parsed.subjects}
        size = _subject_size(parsed)
        for position, subject_id in enumerate(parsed.subject_ids):
            entry = incoming.setdefault(
                subject_id, {"metadata": {}, "locations": [], "size": None, "retired": False}
            )
            subject: ParsedSubject | None = described.get(subject_id)
            if subject is not None:
                entry["metadata"] = entry["metadata"] or dict(subject.metadata)
                entry["locations"] = entry["locations"] or list(subject.locations)
                entry["retired"] = entry["retired"] or bool(subject.retired)
            if position == 0 and size is not None:
                entry["size"] = entry["size"] or size
    return incoming


def _merge_subjects(session: Session, incoming: dict[int, dict[str, Any]], now: datetime) -> None:
    if not incoming:
        return
    existing = {s.id: s for s in session.scalars(select(Subject).where(Subject.id.in_(incoming)))}
    new_rows = []
    for subject_id in sorted(incoming):
        entry = incoming[subject_id]
        size = entry["size"] or (None, None)
        stored = existing.get(subject_id)
        if stored is None:
            new_rows.append(
                {
                    "id": subject_id,
                    "subject_metadata": entry["metadata"],
                    "locations": entry["locations"],
                    "width": size[0],
                    "height": size[1],
                    "platform_retired": entry["retired"],
                    "updated_at": now,
                }
            )
            continue
        changes: dict[str, Any] = {}
        if entry["metadata"] and not stored.subject_metadata:
            changes["subject_metadata"] = entry["metadata"]
        if entry["locations"] and not stored.locations:
            changes["locations"] = entry["locations"]
        if size[0] is not None and stored.width is None:
            changes["width"], changes["height"] = size
        if entry["retired"] and not stored.platform_retired:
            changes["platform_retired"] = True
        if changes:
            changes["updated_at"] = now
            for name, value in changes.items():
                setattr(stored, name, value)
    if new_rows:
        session.execute(
            _insert(session, Subject).on_conflict_do_nothing(index_elements=["id"]), new_rows
        )


def upsert_subject_rows(session: Session, subjects: Iterable[ParsedSubject]) -> None:
    """Store subjects from a subject export (metadata, locations, platform retirement)."""
    incoming = {
        s.id: {
            "metadata": dict(s.metadata),
            "locations": list(s.locations),
            "size": None,
            "retired": bool(s.retired),
        }
        for s in subjects
    }
    _merge_subjects(session, incoming, utcnow())


def _enrich_duplicates(
    session: Session, duplicates: Sequence[ParsedClassification], ip_salt: str
) -> None:
    """A richer copy (a stream event after a Caesar body) adds what the first lacked: gold flags,
    and the volunteer of an anonymous classification that arrived first with nothing to tell its
    session by (a Caesar body has no IP). Answers never change."""
    for parsed in duplicates:
        if parsed.gold_standard is None and parsed.expert is None:
            continue
        session.execute(
            update(Classification)
            .where(Classification.id == parsed.id, Classification.gold_standard.is_(None))
            .values(gold_standard=parsed.gold_standard, expert=parsed.expert)
        )
    known = {p.id: identify_volunteer(p, ip_salt) for p in duplicates}
    known = {cid: i for cid, i in known.items() if not i.key.startswith("anon:classification-")}
    if not known:
        return
    placeholders = dict(
        session.execute(
            select(Volunteer.key, Volunteer.id).where(
                Volunteer.key.in_([f"anon:classification-{cid}" for cid in known])
            )
        ).all()
    )
    if not placeholders:
        return
    now = utcnow()
    for cid, identity in sorted(known.items()):
        placeholder = placeholders.get(f"anon:classification-{cid}")
        if placeholder is None:
            continue
        session.execute(
            _insert(session, Volunteer).on_conflict_do_nothing(index_elements=["key"]),
            [
                {
                    "key": identity.key,
                    "kind": identity.kind,
                    "platform_user_id": identity.platform_user_id,
                    "login": identity.login,
                    "ip_hash": identity.ip_hash,
                    "excluded": False,
                    "created_at": now,
                }
            ],
        )
        volunteer = session.scalar(select(Volunteer.id).where(Volunteer.key == identity.key))
        moved = session.scalars(
            update(Classification)
            .where(Classification.id == cid, Classification.volunteer_id == placeholder)
            .values(volunteer_id=volunteer)
            .returning(Classification.id)
        ).all()
        if moved:
            session.execute(
                update(View).where(View.classification_id == cid).values(volunteer_id=volunteer)
            )
            session.execute(
                update(Answer).where(Answer.classification_id == cid).values(volunteer_id=volunteer)
            )
            view = session.execute(
                select(View.workflow_id, View.subject_id).where(View.classification_id == cid)
            ).first()
            if view is not None:
                mark_subjects_pending(session, [(view[0], view[1])], now)


def _insert_votes(
    session: Session,
    fresh: Sequence[ParsedClassification],
    volunteer_ids: dict[int, int],
    now: datetime,
) -> None:
    """Views, answers and marks of newly stored classifications; their subjects become pending.

    A classification's answers and marks belong to its first subject (Caesar's convention for
    multi-subject classifications); every subject id stays in the stored classification.
    """
    if not fresh:
        return
    views, answers, marks = [], [], []
    pending: set[tuple[int, int]] = set()
    for p in fresh:
        if not p.subject_ids:
            continue
        subject_id = p.subject_ids[0]
        pending.add((p.workflow_id, subject_id))
        views.append(
            {
                "classification_id": p.id,
                "workflow_id": p.workflow_id,
                "subject_id": subject_id,
                "volunteer_id": volunteer_ids[p.id],
                "created_at": p.created_at,
            }
        )
        version = parse_version(p.workflow_version) or (None, None)
        for a in p.answers:
            answers.append(
                {
                    "classification_id": p.id,
                    "workflow_id": p.workflow_id,
                    "subject_id": subject_id,
                    "task": a.task,
                    "value": a.index,
                    "label": a.label,
                    "volunteer_id": volunteer_ids[p.id],
                    "created_at": p.created_at,
                    "version_major": version[0],
                    "version_minor": version[1],
                }
            )
        for m in p.marks:
            marks.append(
                {
                    "classification_id": p.id,
                    "workflow_id": p.workflow_id,
                    "subject_id": subject_id,
                    "task": m.task,
                    "tool": m.tool,
                    "frame": m.frame,
                    "kind": m.kind,
                    "x1": m.x1,
                    "y1": m.y1,
                    "x2": m.x2,
                    "y2": m.y2,
                    "details": list(m.details) or None,
                }
            )
    for model, rows in ((View, views), (Answer, answers), (Mark, marks)):
        if rows:
            session.execute(_insert(session, model), rows)
    mark_subjects_pending(session, pending, now)


def mark_subjects_pending(
    session: Session, keys: Iterable[tuple[int, int]], now: datetime | None = None
) -> None:
    """Flag (workflow, subject) pairs as needing their posterior recomputed."""
    moment = now or utcnow()
    rows = [
        {
            "workflow_id": w,
            "subject_id": s,
            "pending": True,
            "pending_since": moment,
            "updated_at": moment,
        }
        for w, s in sorted(set(keys))
    ]
    if not rows:
        return
    statement = _insert(session, WorkflowSubject)
    statement = statement.on_conflict_do_update(
        index_elements=["workflow_id", "subject_id"],
        set_={
            "pending": True,
            "updated_at": statement.excluded.updated_at,
            "pending_since": case(
                (
                    WorkflowSubject.pending.is_(True),
                    func.coalesce(WorkflowSubject.pending_since, statement.excluded.pending_since),
                ),
                else_=statement.excluded.pending_since,
            ),
        },
    )
    session.execute(statement, rows)


def pending_values() -> dict[str, Any]:
    """UPDATE values that make subjects pending, keeping the moment of those already pending."""
    return {
        "pending": True,
        "pending_since": func.coalesce(WorkflowSubject.pending_since, utcnow()),
    }


def claim_pending_subjects(session: Session, workflow_id: int, limit: int) -> list[int]:
    """Pending subjects of a workflow, locked for this transaction (others skip them)."""
    query = (
        select(WorkflowSubject.subject_id)
        .where(WorkflowSubject.workflow_id == workflow_id, WorkflowSubject.pending.is_(True))
        .order_by(  # longest pending first
            func.coalesce(WorkflowSubject.pending_since, WorkflowSubject.updated_at),
            WorkflowSubject.subject_id,
        )
        .limit(limit)
    )
    if is_postgres(session):
        query = query.with_for_update(skip_locked=True)
    else:
        # SQLite has no row locks: take the database's write lock before reading, so no other
        # writer (a refit marking subjects pending, say) can commit between our read and write.
        session.execute(
            update(Workflow)
            .where(Workflow.id == workflow_id)
            .values(updated_at=Workflow.updated_at)
        )
    return list(session.scalars(query))


def workflows_with_pending(session: Session) -> list[int]:
    """Configured workflows that have subjects waiting to be applied."""
    query = (
        select(WorkflowSubject.workflow_id)
        .join(Workflow, Workflow.id == WorkflowSubject.workflow_id)
        .where(WorkflowSubject.pending.is_(True), Workflow.config.is_not(None))
        .distinct()
    )
    return list(session.scalars(query))


def count_pending(session: Session) -> int:
    return int(session.scalar(select(func.count()).where(WorkflowSubject.pending.is_(True))) or 0)


@dataclass(frozen=True)
class VoteRow:
    """One stored classification of a subject, with the question answer it carries (if any)."""

    classification_id: int
    subject_id: int
    volunteer_id: int
    created_at: datetime
    version: tuple[int, int] | None
    answer_value: int | None
    answer_label: str | None


def _subject_vote_query(
    workflow_id: int | BindParameter[Any],
    subject_ids: Sequence[int] | BindParameter[Any],
    task: str | BindParameter[Any] | None,
    *,
    everyone: bool,
) -> Any:
    """Views of the given subjects joined to their answer to `task`, ordered by subject, then
    arrival; `everyone` keeps excluded volunteers and adds whether each volunteer is excluded
    and whether the classification is an expert's gold standard."""
    answer = (
        select(Answer.classification_id, Answer.value, Answer.label)
        .where(
            Answer.workflow_id == workflow_id,
            Answer.subject_id.in_(subject_ids),
            Answer.task == (task if task is not None else ""),
        )
        .subquery()
    )
    columns: list[Any] = [
        View.classification_id,
        View.subject_id,
        View.volunteer_id,
        View.created_at,
        Classification.version_major,
        Classification.version_minor,
        answer.c.value,
        answer.c.label,
    ]
    if everyone:
        columns += [Volunteer.excluded, Classification.gold_standard]
    query = (
        select(*columns)
        .join(Classification, Classification.id == View.classification_id)
        .join(Volunteer, Volunteer.id == View.volunteer_id)
        .outerjoin(answer, answer.c.classification_id == View.classification_id)
        .where(View.workflow_id == workflow_id, View.subject_id.in_(subject_ids))
        .order_by(View.subject_id, View.created_at, View.classification_id)
    )
    return query if everyone else query.where(Volunteer.excluded.is_(False))


def _vote_row(row: Any) -> VoteRow:
    cid, sid, vid, created, major, minor, value, label = row[:8]
    return VoteRow(
        cid, sid, vid, created, None if major is None else (major, minor or 0), value, label
    )


def subject_votes(
    session: Session, workflow_id: int, subject_ids: Sequence[int], task: str | None
) -> list[VoteRow]:
    """Every view of the given subjects, each with its answer to `task` (None when it has none)."""
    query = _subject_vote_query(workflow_id, subject_ids, task, everyone=False)
    return [_vote_row(row) for row in session.execute(query)]


GoldVote = tuple[int, int, datetime, int | None, str | None, str]


@functools.cache
def _votes_and_gold_query(postgres: bool) -> Any:
    """The statement of `subject_votes_and_experts`, built once per dialect with bound
    parameters: building it took about 0.6 ms, a tenth of an online update's own CPU."""
    workflow: BindParameter[Any] = bindparam("workflow_id")
    subjects: BindParameter[Any] = bindparam("subject_ids", expanding=True)
    task: BindParameter[Any] = bindparam("task")
    votes_query = _subject_vote_query(workflow, subjects, task, everyone=True)
    voters = select(View.volunteer_id).where(
        View.workflow_id == workflow, View.subject_id.in_(subjects)
    )
    # On PostgreSQL `= ANY(ARRAY(...))` makes the voters a parameter computed first, so the plan
    # is `gold_votes_of`'s (their views by index); a plain IN (subquery) lets the planner scan
    # every view since the snapshot instead, 2.5x slower on the benchmark's workflow.
    voter_filter = (
        View.volunteer_id == any_(func.array(voters.scalar_subquery()))
        if postgres
        else View.volunteer_id.in_(voters)
    )
    gold_query = (
        select(
            literal(1).label("kind"),
            View.classification_id,
            View.subject_id,
            View.volunteer_id,
            View.created_at,
            null(),
            null(),
            Answer.value,
            Answer.label.label("answer_label"),
            null(),
            null(),
            Gold.label.label("gold_label"),
        )
        .join(Answer, Answer.classification_id == View.classification_id)
        .join(Gold, (Gold.workflow_id == View.workflow_id) & (Gold.subject_id == View.subject_id))
        .where(
            View.workflow_id == workflow,
            voter_filter,
            View.id > bindparam("after_view_id"),
            Answer.task == task,
            Gold.label.is_not(None),
        )
    )
    votes_part = votes_query.add_columns(null().label("gold_label"))
    votes_part = votes_part.with_only_columns(
        literal(0).label("kind"), *votes_part.selected_columns
    ).order_by(None)
    # By position (kind, subject, created_at, classification): SQLite matches a compound's
    # ORDER BY names only against the first SELECT's own labels.
    return union_all(votes_part, gold_query).order_by(*map(literal_column, ("1", "3", "5", "2")))


def subject_votes_and_experts(
    session: Session, workflow_id: int, subject_ids: Sequence[int], task: str, after_view_id: int
) -> tuple[list[VoteRow], list[tuple[int, int | None, str | None]], list[GoldVote]]:
    """`subject_votes`, `expert_answers` and the voters' `gold_votes_of` for the same subjects
    in one statement (an online update pays for each round trip).

    An expert's classification is one of the subject's views, and its answer to `task` is on
    the same row; excluded volunteers' rows are read, and kept out of the votes here, because
    an expert's gold counts whoever gave it. The gold answers (after view `after_view_id`) are
    those of everyone who saw these subjects, a superset of the voters whose answers count: the
    caller keeps its own volunteers' rows, ordered as `gold_votes_of` orders them.
    """
    query = _votes_and_gold_query(is_postgres(session))
    params = {
        "workflow_id": workflow_id,
        "subject_ids": list(subject_ids),
        "task": task,
        "after_view_id": after_view_id,
    }
    votes: list[VoteRow] = []
    experts: list[tuple[int, int | None, str | None]] = []
    gold: list[tuple[int, int, datetime, int, int | None, str | None, str]] = []
    for row in session.execute(query, params):
        if row[0] == 1:
            cid, subject, volunteer, created, value, label = row[1:5] + row[7:9]
            gold.append((volunteer, subject, created, cid, value, label, row[11]))
            continue
        vote = row[1:]
        excluded, gold_standard = vote[8], vote[9]
        if excluded is not None and not excluded:
            votes.append(_vote_row(vote))
        if gold_standard is not None and gold_standard and (vote[6], vote[7]) != (None, None):
            experts.append((vote[1], vote[6], vote[7]))
    gold.sort(key=lambda g: g[:4])  # volunteer, subject, created_at, classification
    return votes, experts, [(u, s, t, v, label, g) for u, s, t, _, v, label, g in gold]


@dataclass(frozen=True)
class SubjectContext:
    """What an online update needs to know of a subject besides its votes, read in one go."""

    status: str
    retired_label: str | None
    reason: str | None
    metadata: dict[str, Any] | None  # None: no subject row
    gold_label: str | None
    gold_source: str | None  # None: no gold row
    gold_boxes: list[Any] | None


def subject_contexts(
    session: Session, workflow_id: int, subject_ids: Sequence[int], snapshot_id: int | None
) -> tuple[dict[int, SubjectContext], datetime | None]:
    """Each subject's status, metadata and gold, and when skill snapshot `snapshot_id` was taken
    (None when it does not exist or none is given), in one statement where every subject has a
    workflow row, as subjects applied by the worker do. Others (a direct call) cost two more."""
    created = (
        select(SkillSnapshot.created_at)
        .where(SkillSnapshot.id == snapshot_id)
        .scalar_subquery()
        .label("snapshot_created")
    )
    columns: list[Any] = [
        WorkflowSubject.subject_id,
        WorkflowSubject.status,
        WorkflowSubject.retired_label,
        WorkflowSubject.reason,
        Subject.id,
        Subject.subject_metadata,
        Gold.label,
        Gold.source,
        Gold.boxes,
    ]
    query = (
        select(*columns, *([created] if snapshot_id is not None else []))
        .outerjoin(Subject, Subject.id == WorkflowSubject.subject_id)
        .outerjoin(
            Gold,
            (Gold.workflow_id == WorkflowSubject.workflow_id)
            & (Gold.subject_id == WorkflowSubject.subject_id),
        )
        .where(
            WorkflowSubject.workflow_id == workflow_id,
            WorkflowSubject.subject_id.in_(subject_ids),
        )
    )
    contexts: dict[int, SubjectContext] = {}
    snapshot_created: datetime | None = None
    for row in session.execute(query):
        subject, status, retired_label, reason, known, metadata, label, source, boxes = row[:9]
        if snapshot_id is not None:
            snapshot_created = row[9]
        contexts[subject] = SubjectContext(
            status,
            retired_label,
            reason,
            (metadata or {}) if known is not None else None,
            label,
            source,
            list(boxes) if boxes is not None else None,
        )
    missing = [s for s in subject_ids if s not in contexts]
    if missing:
        metadata_of = subject_metadata(session, missing)
        gold_query = select(Gold.subject_id, Gold.label, Gold.source, Gold.boxes).where(
            Gold.workflow_id == workflow_id, Gold.subject_id.in_(missing)
        )
        gold_of = {
            s: (label, source, boxes) for s, label, source, boxes in session.execute(gold_query)
        }
        for s in missing:
            label, source, boxes = gold_of.get(s, (None, None, None))
            contexts[s] = SubjectContext(
                "live",
                None,
                None,
                metadata_of.get(s),
                label,
                source,
                list(boxes) if boxes is not None else None,
            )
        if snapshot_id is not None and len(missing) == len(set(subject_ids)):
            snapshot_created = snapshot_time(session, snapshot_id)
    return contexts, snapshot_created


def save_subject_states(
    session: Session, workflow_id: int, states: Sequence[dict[str, Any]]
) -> None:
    """Write recomputed subject states and clear their pending flags; views become applied.

    States with the same fields share one executemany (a retired subject has more fields than
    a live one), which psycopg sends as a pipeline: one round trip for a batch, not one each.
    """
    now = utcnow()
    table = WorkflowSubject.__table__
    assert isinstance(table, Table)
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for state in states:
        fields = {k: v for k, v in state.items() if k != "subject_id"}
        groups.setdefault(tuple(sorted(fields)), []).append(
            {
                "b_workflow": workflow_id,
                "b_subject": state["subject_id"],
                "pending": False,
                "pending_since": None,
                "updated_at": now,
                **fields,
            }
        )
    statement = update(table).where(
        table.c.workflow_id == bindparam("b_workflow"),
        table.c.subject_id == bindparam("b_subject"),
    )
    for rows in groups.values():
        session.execute(statement, rows)
    subject_ids = [s["subject_id"] for s in states]
    session.execute(
        update(View)
        .where(
            View.workflow_id == workflow_id,
            View.subject_id.in_(subject_ids),
            View.applied_at.is_(None),
        )
        .values(applied_at=now)
    )


# --- the answer engine's reads and writes ----------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """A stored skill snapshot, as arrays (see models.SkillSnapshot)."""

    id: int
    volunteer_ids: npt.NDArray[np.int64]  # sorted
    counts: npt.NDArray[np.float64]  # (U,K,K), learned on non-gold subjects
    alpha: npt.NDArray[np.float64]
    class_prior: npt.NDArray[np.float64]
    n_iter: int
    converged: bool
    created_at: datetime
    last_view_id: int


_snapshot_cache: OrderedDict[tuple[str, int, str], Snapshot] = OrderedDict()
_SNAPSHOTS_KEPT = 16  # a process serves a few workflows; the least recently used go


def load_snapshot(
    session: Session, snapshot_id: int, created_at: datetime | None = None
) -> Snapshot:
    """A snapshot's arrays; snapshots are immutable, so each process keeps those it read.

    The cache key holds the snapshot's creation time as well as its id, because ids may be
    reused after a database restore; a caller that read that time already (an online update
    reads it with the subjects) passes it and saves the round trip that checks it.
    """
    created = created_at
    if created is None:
        created = session.scalar(
            select(SkillSnapshot.created_at).where(SkillSnapshot.id == snapshot_id)
        )
    if created is None:
        raise LookupError(f"skill snapshot {snapshot_id} does not exist")
    bind = session.get_bind()
    url = str(bind.engine.url)
    key = (url, snapshot_id, created.isoformat())
    cached = _snapshot_cache.get(key)
    if cached is not None:
        _snapshot_cache.move_to_end(key)
        return cached
    row = session.get(SkillSnapshot, snapshot_id)
    assert row is not None
    K = row.n_classes
    ids = np.frombuffer(row.volunteer_ids, dtype=np.int64)
    snapshot = Snapshot(
        row.id,
        ids,
        np.frombuffer(row.counts, dtype=np.float64).reshape(ids.size, K, K),
        np.asarray(row.alpha, dtype=np.float64),
        np.asarray(row.class_prior, dtype=np.float64),
        row.n_iter,
        row.converged,
        row.created_at,
        row.last_view_id,
    )
    _snapshot_cache[key] = snapshot
    while len(_snapshot_cache) > _SNAPSHOTS_KEPT:
        _snapshot_cache.popitem(last=False)
    return snapshot


def save_snapshot(
    session: Session,
    workflow_id: int,
    volunteer_ids: npt.NDArray[np.int64],
    counts: npt.NDArray[np.float64],
    alpha: npt.NDArray[np.float64],
    class_prior: npt.NDArray[np.float64],
    *,
    n_votes: int,
    last_view_id: int,
    n_iter: int,
    converged: bool,
) -> int:
    """Store a new snapshot and make it the workflow's current one; returns its id."""
    order = np.argsort(volunteer_ids)
    row = SkillSnapshot(
        workflow_id=workflow_id,
        n_classes=int(alpha.shape[0]),
        volunteer_ids=np.ascontiguousarray(volunteer_ids[order], dtype=np.int64).tobytes(),
        counts=np.ascontiguousarray(counts[order], dtype=np.float64).tobytes(),
        alpha=alpha.tolist(),
        class_prior=class_prior.tolist(),
        n_votes=n_votes,
        last_view_id=last_view_id,
        n_iter=n_iter,
        converged=converged,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    session.execute(
        update(Workflow).where(Workflow.id == workflow_id).values(skill_snapshot_id=row.id)
    )
    return row.id


def gold_labels(
    session: Session, workflow_id: int, subject_ids: Sequence[int] | None = None
) -> dict[int, str]:
    """Gold class labels of a workflow's subjects (all, or those given)."""
    query = select(Gold.subject_id, Gold.label).where(
        Gold.workflow_id == workflow_id, Gold.label.is_not(None)
    )
    if subject_ids is not None:
        query = query.where(Gold.subject_id.in_(subject_ids))
    return {s: label for s, label in session.execute(query).all() if label is not None}


def gold_votes_of(
    session: Session, workflow_id: int, volunteer_ids: Sequence[int], task: str, after_view_id: int
) -> list[tuple[int, int, datetime, int | None, str | None, str]]:
    """The answers of these volunteers on gold subjects stored after view `after_view_id`:
    (volunteer, subject, created_at, value, label, gold label), for live gold counts."""
    query = (
        select(
            View.volunteer_id,
            View.subject_id,
            View.created_at,
            Answer.value,
            Answer.label,
            Gold.label,
        )
        .join(Answer, Answer.classification_id == View.classification_id)
        .join(Gold, (Gold.workflow_id == View.workflow_id) & (Gold.subject_id == View.subject_id))
        .where(
            View.workflow_id == workflow_id,
            View.volunteer_id.in_(volunteer_ids),
            View.id > after_view_id,
            Answer.task == task,
            Gold.label.is_not(None),
        )
        .order_by(View.volunteer_id, View.subject_id, View.created_at, View.classification_id)
    )
    return [tuple(row) for row in session.execute(query).all()]  # type: ignore[misc]


def upsert_gold(
    session: Session,
    workflow_id: int,
    labels: dict[int, str],
    source: str,
    existing: dict[int, str] | None = None,
) -> list[int]:
    """Store gold labels; returns the subjects whose gold label is new or changed. `existing`:
    the stored labels of these subjects, when the caller has read them already."""
    if existing is None:
        existing = gold_labels(session, workflow_id, list(labels))
    changed = [s for s, label in labels.items() if existing.get(s) != label]
    if not changed:
        return []
    now = utcnow()
    rows = [
        {
            "workflow_id": workflow_id,
            "subject_id": s,
            "label": labels[s],
            "source": source,
            "updated_at": now,
        }
        for s in sorted(changed)
    ]
    statement = _insert(session, Gold)
    statement = statement.on_conflict_do_update(
        index_elements=["workflow_id", "subject_id"],
        set_={
            "label": statement.excluded.label,
            "source": statement.excluded.source,
            "updated_at": statement.excluded.updated_at,
        },
    )
    session.execute(statement, rows)
    return changed


def subjects_seen_by_voters_of(
    session: Session, workflow_id: int, subject_ids: Sequence[int]
) -> set[int]:
    """Every subject classified by someone who classified one of `subject_ids`."""
    voters = select(View.volunteer_id).where(
        View.workflow_id == workflow_id, View.subject_id.in_(subject_ids)
    )
    query = (
        select(View.subject_id)
        .where(View.workflow_id == workflow_id, View.volunteer_id.in_(voters))
        .distinct()
    )
    return set(session.scalars(query))


@dataclass(frozen=True)
class VoteTable:
    """Every counted answer of a workflow's question task, as columns (the refit's input)."""

    classification_id: npt.NDArray[np.int64]
    subject_id: npt.NDArray[np.int64]
    volunteer_id: npt.NDArray[np.int64]
    created_us: npt.NDArray[np.int64]  # platform created_at, microseconds since the epoch
    answer: npt.NDArray[np.int64]  # the class, -1 when the answer maps to none
    last_view_id: int


def all_votes(
    session: Session,
    workflow_id: int,
    task: str,
    class_of_index: dict[int, int],
    class_of_label: dict[str, int],
    min_version: tuple[int, int] | None,
    chunk: int = 100_000,
) -> VoteTable:
    """Every answer to `task` in a workflow stored up to now, by volunteers not excluded and on
    workflow versions not older than `min_version`, its class mapped in SQL.

    One query over the answers table alone (answers carry their volunteer, time and version): on
    PostgreSQL a binary COPY parsed straight into numpy (every column a bigint, so each row has
    the same width); elsewhere a streamed select.
    """
    last_view_id = int(session.scalar(select(func.coalesce(func.max(View.id), 0))) or 0)
    last_answer_id = int(session.scalar(select(func.coalesce(func.max(Answer.id), 0))) or 0)
    excluded = list(session.scalars(select(Volunteer.id).where(Volunteer.excluded.is_(True))))
    by_index = case(class_of_index, value=Answer.value, else_=-1) if class_of_index else literal(-1)
    by_label = case(class_of_label, value=Answer.label, else_=-1) if class_of_label else literal(-1)
    answer = case((Answer.value.is_not(None), by_index), else_=by_label)
    postgres = is_postgres(session)
    created = (
        cast(func.extract("epoch", Answer.created_at) * 1_000_000, BigInteger)
        if postgres
        else Answer.created_at
    )
    query = select(
        cast(Answer.classification_id, BigInteger),
        cast(Answer.subject_id, BigInteger),
        cast(Answer.volunteer_id, BigInteger),
        created,
        cast(answer, BigInteger),
    ).where(
        Answer.workflow_id == workflow_id,
        Answer.task == task,
        Answer.id <= last_answer_id,
        Answer.volunteer_id.is_not(None),
    )
    if excluded:
        query = query.where(Answer.volunteer_id.not_in(excluded))
    if min_version is not None:
        major, minor = min_version
        query = query.where(
            (Answer.version_major > major)
            | ((Answer.version_major == major) & (Answer.version_minor >= minor))
        )
    if postgres:
        columns = _copy_bigints(session, query, 5)
    else:
        rows: list[list[Any]] = [[] for _ in range(5)]
        for part in session.execute(query.execution_options(yield_per=chunk)).partitions():
            for index, column in enumerate(zip(*part, strict=True)):
                rows[index].extend(column)
        rows[3] = [round(as_utc(c).timestamp() * 1_000_000) for c in rows[3]]
        columns = [np.asarray(column, dtype=np.int64) for column in rows]
    cid, sid, vid, created_us, answer_class = columns
    return VoteTable(cid, sid, vid, created_us, answer_class, last_view_id)


def _copy_bigints(session: Session, query: Any, n_columns: int) -> list[npt.NDArray[np.int64]]:
    """Run `query` (every column a non-null bigint) as COPY ... TO STDOUT (FORMAT binary) and
    read the rows as a numpy structured array: 2 bytes of field count, then per field 4 bytes of
    length and 8 of big-endian value."""
    sql = str(query.compile(session.get_bind(), compile_kwargs={"literal_binds": True}))
    connection = session.connection().connection.driver_connection
    assert connection is not None
    buffer = bytearray()
    with (
        connection.cursor() as cursor,
        cursor.copy(f"COPY ({sql}) TO STDOUT (FORMAT binary)") as copy,
    ):
        for block in copy:
            buffer += block
    header = 11 + 4 + 4 + int.from_bytes(buffer[15:19], "big")
    fields: list[tuple[str, str]] = [("count", ">i2")]
    for i in range(n_columns):
        fields += [(f"length{i}", ">i4"), (f"value{i}", ">i8")]
    rows = np.frombuffer(memoryview(buffer)[header:-2], dtype=np.dtype(fields))
    return [rows[f"value{i}"].astype(np.int64) for i in range(n_columns)]


def expert_answers(
    session: Session, workflow_id: int, subject_ids: Sequence[int], task: str
) -> list[tuple[int, int | None, str | None]]:
    """(subject, value, label) of gold-standard classifications by experts on these subjects."""
    query = (
        select(View.subject_id, Answer.value, Answer.label)
        .join(Classification, Classification.id == View.classification_id)
        .join(Answer, (Answer.classification_id == View.classification_id) & (Answer.task == task))
        .where(
            View.workflow_id == workflow_id,
            View.subject_id.in_(subject_ids),
            Classification.gold_standard.is_(True),
        )
        .order_by(View.subject_id, View.created_at)
    )
    return [(s, v, label) for s, v, label in session.execute(query).all()]


def subject_metadata(session: Session, subject_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    query = select(Subject.id, Subject.subject_metadata).where(Subject.id.in_(subject_ids))
    return {s: m or {} for s, m in session.execute(query).all()}


def gold_sources(session: Session, workflow_id: int, subject_ids: Sequence[int]) -> dict[int, str]:
    query = select(Gold.subject_id, Gold.source).where(
        Gold.workflow_id == workflow_id, Gold.subject_id.in_(subject_ids)
    )
    return dict(session.execute(query).all())


def snapshot_time(session: Session, snapshot_id: int) -> datetime | None:
    return session.scalar(select(SkillSnapshot.created_at).where(SkillSnapshot.id == snapshot_id))


def subject_statuses(
    session: Session, workflow_id: int
) -> dict[int, tuple[str, str | None, str | None]]:
    """Every subject of a workflow: (status, label it retired with, retirement reason)."""
    query = select(
        WorkflowSubject.subject_id,
        WorkflowSubject.status,
        WorkflowSubject.retired_label,
        WorkflowSubject.reason,
    ).where(WorkflowSubject.workflow_id == workflow_id)
    return {s: (status, label, reason) for s, status, label, reason in session.execute(query).all()}


def write_subject_results(
    session: Session, workflow_id: int, rows: Sequence[dict[str, Any]]
) -> None:
    """Bulk-write recomputed subjects (subject_id, posterior, label, status, reason, retired_at,
    retired_label; a None retired_at keeps the stored one): on PostgreSQL through COPY into a
    temporary table and one UPDATE."""
    if not rows:
        return
    if not is_postgres(session):
        for row in rows:
            values = {k: v for k, v in row.items() if k != "subject_id"}
            if values.get("retired_at") is None:
                values.pop("retired_at", None)  # keep the stored moment of retirement
            session.execute(
                update(WorkflowSubject)
                .where(
                    WorkflowSubject.workflow_id == workflow_id,
                    WorkflowSubject.subject_id == row["subject_id"],
                )
                .values(**values)
            )
        return
    connection = session.connection().connection.driver_connection
    assert connection is not None
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TEMP TABLE gzx_results (subject_id bigint, posterior jsonb, label text,"
            " status text, reason text, retired_at timestamptz, retired_label text)"
            " ON COMMIT DROP"
        )
        columns = (
            "subject_id",
            "posterior",
            "label",
            "status",
            "reason",
            "retired_at",
            "retired_label",
        )
        with cursor.copy(f"COPY gzx_results ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(
                    [
                        row["subject_id"],
                        json.dumps(row["posterior"]),
                        row["label"],
                        row["status"],
                        row["reason"],
                        row["retired_at"],
                        row["retired_label"],
                    ]
                )
        cursor.execute(
            "UPDATE workflow_subjects AS w SET posterior = r.posterior, label = r.label,"
            " status = r.status, reason = r.reason,"
            " retired_at = COALESCE(r.retired_at, w.retired_at),"
            " retired_label = r.retired_label, updated_at = now()"
            " FROM gzx_results AS r WHERE w.workflow_id = %s AND w.subject_id = r.subject_id",
            (workflow_id,),
        )


def mark_pending_after(session: Session, workflow_id: int, last_view_id: int) -> None:
    """Subjects with views newer than `last_view_id` need applying again."""
    newer = select(View.subject_id).where(View.workflow_id == workflow_id, View.id > last_view_id)
    session.execute(
        update(WorkflowSubject)
        .where(WorkflowSubject.workflow_id == workflow_id, WorkflowSubject.subject_id.in_(newer))
        .values(**pending_values())
    )


def insert_retirements(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        session.execute(_insert(session, Retirement), list(rows))


def commit_without_waiting_for_disk(session: Session) -> None:
    """For transactions that write only derived state (posteriors, clusters, retirements decided
    from stored votes): PostgreSQL may acknowledge the commit before its WAL reaches the disk. A
    crash can then lose the whole transaction, never part of it; its subjects are still pending
    and are applied again. Votes themselves are always committed synchronously."""
    if is_postgres(session):
        session.execute(text("SET LOCAL synchronous_commit TO OFF"))


# --- marks ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarkRow:
    id: int
    classification_id: int
    subject_id: int
    volunteer_id: int
    tool: int
    frame: int
    kind: str
    box: tuple[float, float, float, float]


def _marks_query(workflow_id: int, task: str) -> Any:
    """Marks of a workflow's drawing task with who drew them, in id order."""
    return (
        select(
            Mark.id,
            Mark.classification_id,
            Mark.subject_id,
            View.volunteer_id,
            Mark.tool,
            Mark.frame,
            Mark.kind,
            Mark.x1,
            Mark.y1,
            Mark.x2,
            Mark.y2,
        )
        .join(View, View.classification_id == Mark.classification_id)
        .where(Mark.workflow_id == workflow_id, Mark.task == task)
        .order_by(Mark.id)
    )


def _mark_rows(session: Session, query: Any) -> list[MarkRow]:
    return [
        MarkRow(i, c, s, v, t, f, k, (x1, y1, x2, y2))
        for i, c, s, v, t, f, k, x1, y1, x2, y2 in session.execute(query).all()
    ]


def subject_marks(
    session: Session, workflow_id: int, subject_ids: Sequence[int], task: str
) -> list[MarkRow]:
    """The marks of a drawing task on these subjects, with who drew them."""
    query = _marks_query(workflow_id, task).where(Mark.subject_id.in_(subject_ids))
    return _mark_rows(session, query)


def replace_clusters(
    session: Session, workflow_id: int, subject_ids: Sequence[int], rows: Sequence[dict[str, Any]]
) -> None:
    """The subjects' clusters, replaced as a whole."""
    session.execute(
        delete(Cluster).where(
            Cluster.workflow_id == workflow_id, Cluster.subject_id.in_(subject_ids)
        )
    )
    if rows:
        session.execute(_insert(session, Cluster), list(rows))


def clusters_of(session: Session, workflow_id: int, subject_id: int) -> list[Cluster]:
    query = (
        select(Cluster)
        .where(Cluster.workflow_id == workflow_id, Cluster.subject_id == subject_id)
        .order_by(Cluster.tool, Cluster.frame, Cluster.p_real.desc())
    )
    return list(session.scalars(query))


def gold_boxes(
    session: Session, workflow_id: int, subject_ids: Sequence[int] | None = None
) -> dict[int, list[Any]]:
    """Gold boxes per subject whose boxes are known (an empty list: known to have none)."""
    query = select(Gold.subject_id, Gold.boxes).where(
        Gold.workflow_id == workflow_id, Gold.boxes.is_not(None)
    )
    if subject_ids is not None:
        query = query.where(Gold.subject_id.in_(subject_ids))
    return {s: list(b) for s, b in session.execute(query).all() if b is not None}


def upsert_gold_boxes(
    session: Session, workflow_id: int, boxes: dict[int, list[Any]], source: str
) -> None:
    now = utcnow()
    rows = [
        {
            "workflow_id": workflow_id,
            "subject_id": s,
            "boxes": b,
            "source": source,
            "updated_at": now,
        }
        for s, b in sorted(boxes.items())
    ]
    if not rows:
        return
    statement = _insert(session, Gold)
    statement = statement.on_conflict_do_update(
        index_elements=["workflow_id", "subject_id"],
        set_={"boxes": statement.excluded.boxes, "updated_at": statement.excluded.updated_at},
    )
    session.execute(statement, rows)


MARK_ARRAYS = ("p_fn", "f", "p_fp", "sigma", "p_fn_n", "f_n", "p_fp_n", "sigma_n")


def save_mark_snapshot(
    session: Session,
    workflow_id: int,
    volunteer_ids: npt.NDArray[np.int64],
    arrays: npt.NDArray[np.float64],
    population: dict[str, Any],
) -> int:
    """Store mark skills ((8, U) arrays in MARK_ARRAYS order) as the workflow's current ones."""
    order = np.argsort(volunteer_ids)
    row = MarkSnapshot(
        workflow_id=workflow_id,
        volunteer_ids=np.ascontiguousarray(volunteer_ids[order], dtype=np.int64).tobytes(),
        arrays=np.ascontiguousarray(arrays[:, order], dtype=np.float64).tobytes(),
        population=population,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    session.execute(
        update(Workflow).where(Workflow.id == workflow_id).values(mark_snapshot_id=row.id)
    )
    return row.id


def load_mark_snapshot(
    session: Session, snapshot_id: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], dict[str, Any]]:
    """(volunteer ids sorted, (8, U) arrays, population values) of a mark snapshot."""
    row = session.get(MarkSnapshot, snapshot_id)
    if row is None:
        raise LookupError(f"mark snapshot {snapshot_id} does not exist")
    ids = np.frombuffer(row.volunteer_ids, dtype=np.int64)
    arrays = np.frombuffer(row.arrays, dtype=np.float64).reshape(len(MARK_ARRAYS), ids.size)
    return ids, arrays, dict(row.population)


def workflow_views(session: Session, workflow_id: int) -> list[tuple[int, int, int, datetime]]:
    """Every view of a workflow: (classification, subject, volunteer, created_at), for refits."""
    query = (
        select(View.classification_id, View.subject_id, View.volunteer_id, View.created_at)
        .join(Volunteer, Volunteer.id == View.volunteer_id)
        .where(View.workflow_id == workflow_id, Volunteer.excluded.is_(False))
        .order_by(View.subject_id, View.created_at, View.classification_id)
    )
    return [(c, s, v, t) for c, s, v, t in session.execute(query).all()]


def workflow_marks(session: Session, workflow_id: int, task: str) -> list[MarkRow]:
    """Every mark of a workflow's drawing task, for refits."""
    return _mark_rows(session, _marks_query(workflow_id, task))


def forget_volunteer(session: Session, volunteer: Volunteer) -> None:
    """Erase a volunteer's personal fields; their votes stay, as an anonymous volunteer's."""
    volunteer.key = f"forgotten:{volunteer.id}"
    volunteer.kind = "anonymous"
    volunteer.platform_user_id = None
    volunteer.login = None
    volunteer.ip_hash = None
    volunteer.forgotten_at = utcnow()


def find_volunteer(session: Session, given: str) -> Volunteer | None:
    """A volunteer by key (`user:123`, `anon:...`, `ml:...`) or by platform user id."""
    if given.isascii() and given.isdigit():
        return session.scalar(select(Volunteer).where(Volunteer.key == f"user:{given}"))
    return session.scalar(select(Volunteer).where(Volunteer.key == given))


def oldest_pending_age(session: Session) -> float:
    """Seconds since the subject pending longest became pending (0 when nothing waits)."""
    since = func.coalesce(WorkflowSubject.pending_since, WorkflowSubject.updated_at)
    oldest = session.scalar(select(func.min(since)).where(WorkflowSubject.pending.is_(True)))
    if oldest is None:
        return 0.0
    return max(0.0, (utcnow() - as_utc(oldest)).total_seconds())


def subject_labels(
    session: Session, workflow_id: int, subject_ids: Sequence[int]
) -> dict[int, str]:
    query = select(WorkflowSubject.subject_id, WorkflowSubject.label).where(
        WorkflowSubject.workflow_id == workflow_id, WorkflowSubject.subject_id.in_(subject_ids)
    )
    return {s: label for s, label in session.execute(query).all() if label is not None}


# --- the research queries (app.api_query): subjects, summaries, volunteers, audit ---------------


def subjects_page(
    session: Session,
    workflow_id: int,
    *,
    after: int | None,
    limit: int,
    status: str | None = None,
    label: str | None = None,
    posterior_class: int | None = None,
    posterior_min: float | None = None,
    posterior_max: float | None = None,
    gold: bool | None = None,
    updated_since: datetime | None = None,
) -> list[tuple[WorkflowSubject, str | None, bool]]:
    """Up to `limit` subjects of a workflow with ids above `after`, in id order, each with its
    gold label and whether it is gold (a label, boxes or both): keyset pagination over the
    primary key."""
    gold_label = (
        select(Gold.label)
        .where(Gold.workflow_id == workflow_id, Gold.subject_id == WorkflowSubject.subject_id)
        .scalar_subquery()
    )
    is_gold = (
        select(Gold.subject_id)
        .where(Gold.workflow_id == workflow_id, Gold.subject_id == WorkflowSubject.subject_id)
        .exists()
    )
    query = select(WorkflowSubject, gold_label, is_gold).where(
        WorkflowSubject.workflow_id == workflow_id
    )
    if after is not None:
        query = query.where(WorkflowSubject.subject_id > after)
    if status is not None:
        query = query.where(WorkflowSubject.status == status)
    if label is not None:
        query = query.where(WorkflowSubject.label == label)
    if posterior_class is not None:
        value = WorkflowSubject.posterior[posterior_class].as_float()
        if posterior_min is not None:
            query = query.where(value >= posterior_min)
        if posterior_max is not None:
            query = query.where(value <= posterior_max)
    if gold is not None:
        query = query.where(is_gold if gold else ~is_gold)
    if updated_since is not None:
        query = query.where(WorkflowSubject.updated_at >= updated_since)
    query = query.order_by(WorkflowSubject.subject_id).limit(limit)
    return [(row, g, bool(known)) for row, g, known in session.execute(query).all()]


def status_counts(session: Session, workflow_id: int) -> dict[str, int]:
    """Subjects per status (live, retired, contested) of a workflow."""
    query = (
        select(WorkflowSubject.status, func.count())
        .where(WorkflowSubject.workflow_id == workflow_id)
        .group_by(WorkflowSubject.status)
    )
    return {status: int(n) for status, n in session.execute(query).all()}


def classifications_spent(session: Session, workflow_id: int) -> int:
    """Classifications stored for the workflow's subjects (every view counts: that is effort)."""
    query = select(func.coalesce(func.sum(WorkflowSubject.n_classifications), 0)).where(
        WorkflowSubject.workflow_id == workflow_id
    )
    return int(session.scalar(query) or 0)


def retirement_span(session: Session, workflow_id: int) -> tuple[datetime | None, datetime | None]:
    """The first and last moment a subject of the workflow retired."""
    query = select(func.min(Retirement.created_at), func.max(Retirement.created_at)).where(
        Retirement.workflow_id == workflow_id
    )
    first, last = session.execute(query).one()
    return (as_utc(first) if first else None, as_utc(last) if last else None)


def retirements_per_bucket(
    session: Session, workflow_id: int, bucket: str
) -> list[tuple[datetime, int]]:
    """Retirement events per hour or per day (UTC), oldest first, empty buckets left out."""
    if is_postgres(session):
        start: Any = func.date_trunc(bucket, func.timezone("UTC", Retirement.created_at))
    else:
        pattern = "%Y-%m-%d %H:00:00" if bucket == "hour" else "%Y-%m-%d 00:00:00"
        start = func.strftime(pattern, Retirement.created_at)
    query = (
        select(start.label("start"), func.count())
        .where(Retirement.workflow_id == workflow_id)
        .group_by(start)
        .order_by(start)
    )
    result = []
    for moment, n in session.execute(query).all():
        if isinstance(moment, str):
            moment = datetime.fromisoformat(moment)
        result.append((moment.replace(tzinfo=UTC), int(n)))
    return result


def volunteer_vote_counts(
    session: Session, workflow_id: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(volunteer ids sorted, views of each) of everyone who classified in the workflow."""
    query = (
        select(View.volunteer_id, func.count())
        .where(View.workflow_id == workflow_id)
        .group_by(View.volunteer_id)
        .order_by(View.volunteer_id)
    )
    rows = session.execute(query).all()
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    counts = np.array([r[1] for r in rows], dtype=np.int64)
    return ids, counts


def machine_volunteer_ids(session: Session) -> npt.NDArray[np.int64]:
    """Ids of the machine volunteers (`ml:` keys), sorted."""
    query = select(Volunteer.id).where(Volunteer.kind == "machine").order_by(Volunteer.id)
    return np.array(session.scalars(query).all(), dtype=np.int64)


def volunteers_by_id(session: Session, volunteer_ids: Sequence[int]) -> dict[int, Volunteer]:
    query = select(Volunteer).where(Volunteer.id.in_(list(volunteer_ids)))
    return {v.id: v for v in session.scalars(query)}


def subject_sample(session: Session, workflow_id: int, n: int) -> list[tuple[int, str]]:
    """About `n` voted subjects of each status, picked by a fixed scramble of their ids (the same
    sample on every call; no overflow for any 64-bit id)."""
    scramble = (WorkflowSubject.subject_id % 10007) * 7919 % 10007
    result: list[tuple[int, str]] = []
    for status in ("retired", "contested", "live"):
        query = (
            select(WorkflowSubject.subject_id, WorkflowSubject.status)
            .where(
                WorkflowSubject.workflow_id == workflow_id,
                WorkflowSubject.status == status,
                WorkflowSubject.n_views > 0,
            )
            .order_by(scramble, WorkflowSubject.subject_id)
            .limit(n)
        )
        result += [(int(s), str(st)) for s, st in session.execute(query).all()]
    return result


def subject_mark_rows(
    session: Session, workflow_id: int, subject_id: int
) -> list[tuple[int, int, int, int, int, str, str, float, float, float, float]]:
    """Every mark of a subject, every task: (id, classification, volunteer, tool, frame, task,
    kind, x1, y1, x2, y2)."""
    query = (
        select(
            Mark.id,
            Mark.classification_id,
            View.volunteer_id,
            Mark.tool,
            Mark.frame,
            Mark.task,
            Mark.kind,
            Mark.x1,
            Mark.y1,
            Mark.x2,
            Mark.y2,
        )
        .join(View, View.classification_id == Mark.classification_id)
        .where(Mark.workflow_id == workflow_id, Mark.subject_id == subject_id)
        .order_by(Mark.id)
    )
    return [
        (i, c, v, tool, frame, task, kind, x1, y1, x2, y2)
        for i, c, v, tool, frame, task, kind, x1, y1, x2, y2 in session.execute(query).all()
    ]


def subjects_of_volunteer(session: Session, volunteer_id: int) -> list[tuple[int, int]]:
    """(workflow, subject) of every view by a volunteer, in every workflow."""
    query = (
        select(View.workflow_id, View.subject_id)
        .where(View.volunteer_id == volunteer_id)
        .distinct()
    )
    return [(int(w), int(s)) for w, s in session.execute(query).all()]


def record_audit(
    session: Session,
    workflow_id: int,
    *,
    who: str,
    reason: str,
    action: str,
    target: str,
    details: dict[str, Any],
) -> AuditEntry:
    entry = AuditEntry(
        workflow_id=workflow_id,
        who=who,
        created_at=utcnow(),
        reason=reason,
        action=action,
        target=target,
        details=details,
    )
    session.add(entry)
    session.flush()
    return entry


def audit_page(
    session: Session, workflow_id: int, before: int | None, limit: int
) -> list[AuditEntry]:
    """The newest audit entries of a workflow (ids below `before`), newest first."""
    query = select(AuditEntry).where(AuditEntry.workflow_id == workflow_id)
    if before is not None:
        query = query.where(AuditEntry.id < before)
    return list(session.scalars(query.order_by(AuditEntry.id.desc()).limit(limit)))


def newest_view_id(session: Session) -> int:
    """The id of the newest view of any workflow (0 when there is none)."""
    return int(session.scalar(select(func.coalesce(func.max(View.id), 0))) or 0)


def gold_stamp(session: Session, workflow_id: int) -> tuple[int, str]:
    """How many gold rows a workflow has and when the last changed: a cheap change marker."""
    count, last = session.execute(
        select(func.count(), func.max(Gold.updated_at)).where(Gold.workflow_id == workflow_id)
    ).one()
    return int(count), str(last)
