"""Researchers' routes: the query API (read scope), the dashboard's pages and login, and the
hands on the wheel (admin scope, every action audited with who, when and why).

Responses are typed pydantic models, so the OpenAPI page documents them and numbers travel as
JSON numbers. Lists page with opaque cursors: base64url of a small JSON object holding the last
key seen (a subject id; a sort value and a volunteer id), so a walk over a list visits every item
once even while other items change.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

import numpy as np
import numpy.typing as npt
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app import aggregation, answers, levels, store
from app.api_engine import configured
from app.auth import READ_COOKIE, Authenticator
from app.bodies import read_limited
from app.errors import Conflict, Forbidden, InputError, NotFound, Unauthorized, http_status
from app.models import Retirement, Subject, Volunteer, Workflow, WorkflowSubject, utcnow
from app.workflows import WorkflowConfig

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_PAGE = 1000
NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL: such a value is refused as input
HOUR_BUCKETS_UP_TO = timedelta(days=3)  # longer spans are counted per day
PAGE_POLICY = (
    "default-src 'self'; img-src * data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)

# --- response models -------------------------------------------------------------------------


class SubjectItem(BaseModel):
    """A subject's state in a workflow."""

    subject_id: int
    status: str = Field(description="live, retired or contested")
    pending: bool = Field(description="votes arrived that are not applied yet")
    label: str | None = Field(description="the most probable class (MAP)")
    posterior: dict[str, float] | None = Field(description="P(class | votes) per class")
    classifications: int
    views: int = Field(description="classifications that count (one per volunteer)")
    reason: str | None = Field(description="retirement reason (Panoptes' set)")
    retired_label: str | None
    retired_at: datetime | None
    is_gold: bool
    gold: str | None = Field(description="the gold label, when one is known")
    marks_risk: dict[str, float] | None
    updated_at: datetime


class SubjectPage(BaseModel):
    workflow_id: int
    items: list[SubjectItem]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: done")


class HistoryStep(BaseModel):
    """The posterior after `votes` counted votes; the vote that moved it there."""

    votes: int
    posterior: dict[str, float]
    volunteer_id: int | None
    answer: str | None


class SubjectHistory(BaseModel):
    """SWAP's trajectory of one subject under the current skills, in arrival order."""

    workflow_id: int
    subject_id: int
    classes: list[str]
    status: str
    label: str | None
    retired_label: str | None
    reason: str | None
    gold: str | None
    steps: list[HistoryStep]


class ClusterItem(BaseModel):
    """Marks of different volunteers taken to be one object."""

    id: int
    tool: int | None
    tool_label: str | None
    frame: int | None
    box: list[float] = Field(description="consensus box [x1, y1, x2, y2], top-left origin")
    p_real: float
    p_off: float
    kept: bool
    n_marks: int
    n_views: int
    members: list[int] = Field(description="ids of its marks")


class MarkItem(BaseModel):
    id: int
    classification_id: int
    volunteer_id: int
    task: str
    tool: int
    frame: int
    kind: str
    box: list[float] = Field(description="[x1, y1, x2, y2], top-left origin")
    cluster_id: int | None


class ImageLocation(BaseModel):
    type: str
    url: str


class SubjectClusters(BaseModel):
    """A subject's clusters with every mark drawn on it, and the image they were drawn on."""

    workflow_id: int
    subject_id: int
    width: float | None
    height: float | None
    locations: list[ImageLocation]
    marks_risk: dict[str, float] | None
    clusters: list[ClusterItem]
    marks: list[MarkItem]


class VolunteerItem(BaseModel):
    volunteer_id: int
    key: str
    kind: str
    excluded: bool
    votes: int = Field(description="classifications in this workflow")
    information_per_vote_bits: float | None
    confusion_diagonal: dict[str, float] | None = Field(
        description="P(answer k | truth k) per class; for binary, P(yes|yes) and P(no|no)"
    )


class VolunteerPage(BaseModel):
    workflow_id: int
    classes: list[str]
    positive_class: str | None
    sort: str
    order: str
    total: int
    items: list[VolunteerItem]
    next_cursor: str | None


class RetirementBucket(BaseModel):
    start: datetime
    retired: int = Field(description="retirement events in the bucket")
    cumulative: int


class WorkflowSummary(BaseModel):
    workflow_id: int
    name: str | None
    classes: list[str]
    subjects: int
    live: int
    retired: int
    contested: int
    classifications: int = Field(description="classifications spent on the workflow's subjects")
    cap: int | None
    baseline_classifications: int | None = Field(description="cap x subjects (fixed count)")
    saving: float | None = Field(description="1 - classifications / baseline")
    bucket: Literal["hour", "day"]
    retirement_rate: list[RetirementBucket]


class Trajectory(BaseModel):
    subject_id: int
    status: str
    label: str | None
    retired_label: str | None
    posterior: list[list[float]] = Field(description="(votes + 1) x classes")


class TrajectoryPage(BaseModel):
    workflow_id: int
    classes: list[str]
    positive_class: str | None
    trajectories: list[Trajectory]


class WorkflowItem(BaseModel):
    id: int
    name: str | None
    configured: bool
    subjects: int
    live: int
    retired: int
    contested: int


class AuditItem(BaseModel):
    id: int
    workflow_id: int
    who: str
    at: datetime
    reason: str
    action: str
    target: str
    details: dict[str, Any]


class AuditPage(BaseModel):
    workflow_id: int
    items: list[AuditItem]
    next_cursor: str | None


class LevelItem(BaseModel):
    """A level a volunteer reached: once, never undone."""

    id: int = Field(description="in the order levels were reached")
    volunteer_id: int
    volunteer: str = Field(description="the volunteer's key, e.g. user:123")
    user_id: int | None = Field(description="the platform's user id (null once forgotten)")
    level: str
    level_number: int | None = Field(description="1 = the first configured level; null: removed")
    lower_90: dict[str, float] = Field(
        description="per class, the lower end of the 90% interval of P(answer = k | truth = k)"
    )
    votes: int = Field(description="the votes that skill rested on when the level was reached")
    reached_at: datetime


class LevelPage(BaseModel):
    workflow_id: int
    items: list[LevelItem]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: done")


class ActionResult(BaseModel):
    """What an admin action did, and its audit entry."""

    audit: AuditItem
    changed: bool = Field(description="false: it was so already (the action is idempotent)")
    subject: SubjectItem | None = None
    subjects_pending: int | None = None
    refit: dict[str, Any] | None = None


# --- request bodies --------------------------------------------------------------------------


class Reasoned(BaseModel):
    reason: str = Field(min_length=1, max_length=2000, description="why (kept in the audit)")

    @field_validator("reason")
    @classmethod
    def _words(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("give a reason")
        if "\x00" in value:
            raise ValueError("a reason cannot hold NUL characters")
        return value.strip()


class Resolution(Reasoned):
    decision: Literal["confirm", "reopen"] = Field(
        description="confirm: retired with its current answer; reopen: live again"
    )


class GoldCorrection(Reasoned):
    label: str = Field(min_length=1, max_length=200)


# --- helpers ---------------------------------------------------------------------------------


def encode_cursor(value: dict[str, Any]) -> str:
    raw = json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The object inside a cursor; 422 naming `cursor` for anything this module did not write."""
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise InputError("cursor is not one this API handed out", field="cursor") from None
    if not isinstance(value, dict) or set(value) != set(keys):
        raise InputError("cursor is not one this API handed out", field="cursor")
    for key in keys:
        item = value[key]
        ok = isinstance(item, int | float) and not isinstance(item, bool)
        if not ok or not math.isfinite(item) or abs(item) > 2**63 - 1:
            raise InputError("cursor is not one this API handed out", field="cursor")
    return value


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def subject_item(
    row: WorkflowSubject, classes: list[str], gold: str | None, is_gold: bool
) -> SubjectItem:
    posterior = row.posterior
    return SubjectItem(
        subject_id=row.subject_id,
        status=row.status,
        pending=row.pending,
        label=row.label,
        posterior=dict(zip(classes, map(float, posterior), strict=False)) if posterior else None,
        classifications=row.n_classifications,
        views=row.n_views,
        reason=row.reason,
        retired_label=row.retired_label,
        retired_at=_aware(row.retired_at),
        is_gold=is_gold,
        gold=gold,
        marks_risk=row.marks_risk,
        updated_at=_aware(row.updated_at) or utcnow(),
    )


def audit_item(entry: Any) -> AuditItem:
    return AuditItem(
        id=entry.id,
        workflow_id=entry.workflow_id,
        who=entry.who,
        at=_aware(entry.created_at) or utcnow(),
        reason=entry.reason,
        action=entry.action,
        target=entry.target,
        details=dict(entry.details or {}),
    )


def positive_class(config: WorkflowConfig) -> str | None:
    """The class a binary workflow's "yes" is (the retirement rule's positive class)."""
    if len(config.classes) != 2:
        return None
    return config.classes[config.retirement_rule().positive_class]


def image_locations(locations: list[Any]) -> list[ImageLocation]:
    """Panoptes' locations ([{"image/png": url}, ...]) as (type, url) pairs."""
    found = []
    for location in locations or []:
        if isinstance(location, dict):
            for kind, url in location.items():
                if isinstance(url, str):
                    found.append(ImageLocation(type=str(kind), url=url))
        elif isinstance(location, str):
            found.append(ImageLocation(type="", url=location))
    return found


@dataclass(frozen=True)
class VolunteerTable:
    """Everyone who classified in a workflow: ids (sorted), views, and from the skills in bulk
    the information per vote (U,) and the confusion diagonals (U,K) (None without a question)."""

    ids: npt.NDArray[np.int64]
    votes: npt.NDArray[np.int64]
    information: npt.NDArray[np.float64] | None
    diagonal: npt.NDArray[np.float64] | None


_volunteer_tables: dict[tuple[str, int], tuple[tuple[Any, ...], VolunteerTable]] = {}
_volunteer_tables_lock = threading.Lock()


def volunteer_table(session: Session, workflow: Workflow, config: WorkflowConfig) -> VolunteerTable:
    """The workflow's volunteer table. Counting every view takes a scan of the views, so each
    process keeps the last table of each workflow for as long as nothing it depends on changed:
    no new view, the same skill snapshot, configuration and gold."""
    key = (
        store.newest_view_id(session),
        workflow.skill_snapshot_id,
        workflow.config_hash,
        store.gold_stamp(session, workflow.id),
    )
    where = (str(session.get_bind().engine.url), workflow.id)
    with _volunteer_tables_lock:
        cached = _volunteer_tables.get(where)
    if cached is not None and cached[0] == key:
        return cached[1]
    ids, votes = store.volunteer_vote_counts(session, workflow.id)
    information = diagonal = None
    if config.question is not None and ids.size:
        snapshot = aggregation.current_snapshot(session, workflow)
        skills = aggregation.skills_for(session, workflow.id, config, snapshot, ids)
        theta = answers.confusion(skills)
        K = theta.shape[1]
        diagonal = theta[:, np.arange(K), np.arange(K)]
        information = answers.information_per_vote(skills)
    table = VolunteerTable(ids, votes, information, diagonal)
    with _volunteer_tables_lock:
        if len(_volunteer_tables) >= 64:
            _volunteer_tables.clear()
        _volunteer_tables[where] = (key, table)
    return table


def find_volunteer(session: Session, given: str) -> Volunteer:
    if "\x00" in given or len(given) > 200:  # no key holds these (PostgreSQL refuses NUL)
        raise NotFound("no volunteer has that key", field="volunteer")
    found = (
        session.get(Volunteer, int(given))
        if given.isascii() and given.isdigit() and len(given) < 19
        else session.scalar(select(Volunteer).where(Volunteer.key == given))
    )
    if found is None:
        raise NotFound(f"volunteer {given[:60]} is not known", field="volunteer")
    return found


def locked_subject(session: Session, workflow_id: int, subject_id: int) -> WorkflowSubject:
    """The subject's row, locked against the apply jobs until the transaction ends."""
    row = session.get(
        WorkflowSubject,
        (workflow_id, subject_id),
        with_for_update=store.is_postgres(session),
    )
    if row is None:
        raise NotFound(
            f"subject {subject_id} has no classifications in workflow {workflow_id}",
            field="subject_id",
        )
    return row


def who_acts(request: Request) -> str:
    """Who acts: the bearer token, named by a digest of it (never the secret), or "open"."""
    auth: Authenticator = request.app.state.query_auth
    if auth.open:
        return "open"
    credential = request.headers.get("authorization", "").partition(" ")[2].strip()
    return "token:" + hashlib.sha256(credential.encode()).hexdigest()[:12]


Who = Annotated[str, Depends(who_acts)]

# --- the routes ------------------------------------------------------------------------------


def add_query_routes(
    app: FastAPI,
    sessions: sessionmaker[Session],
    auth: Authenticator,
    run_refit: Callable[[int], dict[str, Any]],
    notify: Callable[[list[int]], None],
) -> None:
    """Register the query API, the admin actions and the dashboard on `app`."""
    read = [Depends(auth.require("read"))]
    admin = [Depends(auth.require("admin"))]

    app.state.query_auth = auth  # read by `who_acts`

    # --- the query API -----------------------------------------------------------------------

    @app.get("/v1/workflows", tags=["workflows"], dependencies=read)
    def list_workflows() -> list[WorkflowItem]:
        """Every workflow gzx knows, with its subjects per status."""
        with sessions() as session:
            counts: dict[int, dict[str, int]] = {}
            query = select(
                WorkflowSubject.workflow_id, WorkflowSubject.status, func.count()
            ).group_by(WorkflowSubject.workflow_id, WorkflowSubject.status)
            for workflow_id, status, n in session.execute(query).all():
                counts.setdefault(workflow_id, {})[status] = int(n)
            items = []
            for workflow in session.scalars(select(Workflow).order_by(Workflow.id)):
                by_status = counts.get(workflow.id, {})
                items.append(
                    WorkflowItem(
                        id=workflow.id,
                        name=workflow.name,
                        configured=workflow.config is not None,
                        subjects=sum(by_status.values()),
                        live=by_status.get("live", 0),
                        retired=by_status.get("retired", 0),
                        contested=by_status.get("contested", 0),
                    )
                )
            return items

    @app.get("/v1/workflows/{workflow_id}/subjects", tags=["subjects"], dependencies=read)
    def list_subjects(
        workflow_id: int,
        cursor: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        status: Literal["live", "retired", "contested"] | None = None,
        label: Annotated[str | None, Query(max_length=200, pattern=NO_NUL)] = None,
        posterior_class: Annotated[
            str | None,
            Query(max_length=200, pattern=NO_NUL, description="the class the bounds apply to"),
        ] = None,
        posterior_min: Annotated[float | None, Query(ge=0, le=1)] = None,
        posterior_max: Annotated[float | None, Query(ge=0, le=1)] = None,
        gold: bool | None = None,
        updated_since: datetime | None = None,
    ) -> SubjectPage:
        """Subjects in id order, `limit` a page, filtered by status, MAP label, a posterior range
        on one class (`posterior_class` with `posterior_min` / `posterior_max`), gold or not, and
        last update. Follow `next_cursor` until it is null: every subject comes once."""
        after = int(decode_cursor(cursor, ("after",))["after"]) if cursor else None
        with sessions() as session:
            _, config = configured(session, workflow_id)
            class_index = None
            if posterior_min is not None or posterior_max is not None:
                if posterior_class is None:
                    if len(config.classes) != 2:
                        raise InputError(
                            "name the class of the posterior range", field="posterior_class"
                        )
                    posterior_class = positive_class(config)
                if posterior_class not in config.classes:
                    raise InputError(
                        f"posterior_class is not one of {config.classes}", field="posterior_class"
                    )
                class_index = config.classes.index(posterior_class)
            since = updated_since
            if since is not None and since.tzinfo is None:
                since = since.replace(tzinfo=UTC)
            if since is not None and not store.is_postgres(session):
                since = since.astimezone(UTC).replace(tzinfo=None)  # SQLite compares text
            rows = store.subjects_page(
                session,
                workflow_id,
                after=after,
                limit=limit,
                status=status,
                label=label,
                posterior_class=class_index,
                posterior_min=posterior_min,
                posterior_max=posterior_max,
                gold=gold,
                updated_since=since,
            )
            items = [subject_item(r, config.classes, g, known) for r, g, known in rows]
        more = len(items) == limit
        return SubjectPage(
            workflow_id=workflow_id,
            items=items,
            next_cursor=encode_cursor({"after": items[-1].subject_id}) if more else None,
        )

    @app.get(
        "/v1/workflows/{workflow_id}/subjects/{subject_id}/history",
        tags=["subjects"],
        dependencies=read,
    )
    def subject_history(workflow_id: int, subject_id: int) -> SubjectHistory:
        """The posterior after each counted vote, in arrival order, under the current skills
        (SWAP's trajectory), with who voted what."""
        with sessions() as session:
            workflow, config = configured(session, workflow_id)
            state = session.get(WorkflowSubject, (workflow_id, subject_id))
            if state is None:
                raise NotFound(
                    f"subject {subject_id} has no classifications in workflow {workflow_id}",
                    field="subject_id",
                )
            steps: list[HistoryStep] = []
            if config.question is not None:
                votes = aggregation.gather_votes(session, workflow_id, config, [subject_id])
                volunteers, local = np.unique(votes.volunteer, return_inverse=True)
                skills = aggregation.skills_for(
                    session,
                    workflow_id,
                    config,
                    aggregation.current_snapshot(session, workflow),
                    volunteers,
                )
                history = answers.posterior_history(local, votes.answer, skills)
                for n, row in enumerate(history):
                    steps.append(
                        HistoryStep(
                            votes=n,
                            posterior=dict(zip(config.classes, map(float, row), strict=True)),
                            volunteer_id=int(votes.volunteer[n - 1]) if n else None,
                            answer=config.classes[int(votes.answer[n - 1])] if n else None,
                        )
                    )
            gold = store.gold_labels(session, workflow_id, [subject_id]).get(subject_id)
            return SubjectHistory(
                workflow_id=workflow_id,
                subject_id=subject_id,
                classes=config.classes,
                status=state.status,
                label=state.label,
                retired_label=state.retired_label,
                reason=state.reason,
                gold=gold,
                steps=steps,
            )

    @app.get(
        "/v1/workflows/{workflow_id}/subjects/{subject_id}/clusters",
        tags=["subjects"],
        dependencies=read,
    )
    def subject_clusters(workflow_id: int, subject_id: int) -> SubjectClusters:
        """The subject's clusters (consensus box, P(real), P(off)), every mark drawn on it with
        the cluster it joined, and the image locations and size they were drawn on."""
        with sessions() as session:
            _, config = configured(session, workflow_id)
            state = session.get(WorkflowSubject, (workflow_id, subject_id))
            if state is None:
                raise NotFound(
                    f"subject {subject_id} has no classifications in workflow {workflow_id}",
                    field="subject_id",
                )
            subject = session.get(Subject, subject_id)
            found = [c for c in store.clusters_of(session, workflow_id, subject_id) if c.n_marks]
            cluster_of = {m: c.id for c in found for m in c.members}
            clusters = []
            for c in found:
                tool = config.tool(c.tool) if c.tool >= 0 else None
                clusters.append(
                    ClusterItem(
                        id=c.id,
                        tool=c.tool if c.tool >= 0 else None,
                        tool_label=(tool.label if tool is not None else None),
                        frame=c.frame if c.frame >= 0 else None,
                        box=[c.x1, c.y1, c.x2, c.y2],
                        p_real=c.p_real,
                        p_off=c.p_off,
                        kept=c.kept,
                        n_marks=c.n_marks,
                        n_views=c.n_views,
                        members=[int(m) for m in c.members],
                    )
                )
            marks = [
                MarkItem(
                    id=i,
                    classification_id=cid,
                    volunteer_id=vid,
                    task=task,
                    tool=tool_index,
                    frame=frame,
                    kind=kind,
                    box=[x1, y1, x2, y2],
                    cluster_id=cluster_of.get(i),
                )
                for i, cid, vid, tool_index, frame, task, kind, x1, y1, x2, y2 in (
                    store.subject_mark_rows(session, workflow_id, subject_id)
                )
            ]
            return SubjectClusters(
                workflow_id=workflow_id,
                subject_id=subject_id,
                width=subject.width if subject else None,
                height=subject.height if subject else None,
                locations=image_locations(subject.locations if subject else []),
                marks_risk=state.marks_risk,
                clusters=clusters,
                marks=marks,
            )

    @app.get("/v1/workflows/{workflow_id}/volunteers", tags=["volunteers"], dependencies=read)
    def list_volunteers(
        workflow_id: int,
        sort: Literal["votes", "information"] = "votes",
        order: Literal["desc", "asc"] = "desc",
        cursor: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    ) -> VolunteerPage:
        """Everyone who classified in the workflow, with votes, information per vote (bits) and
        the diagonal of their confusion matrix, sorted by votes or by information per vote
        (ties by volunteer id), a page at a time."""
        after = decode_cursor(cursor, ("value", "id")) if cursor else None
        with sessions() as session:
            workflow, config = configured(session, workflow_id)
            table = volunteer_table(session, workflow, config)
            ids, votes = table.ids, table.votes
            information, diagonal = table.information, table.diagonal
            value = votes.astype(np.float64)
            if sort == "information":
                value = information if information is not None else np.zeros(ids.size)
            sign = -1.0 if order == "desc" else 1.0
            keyed = sign * value
            position = np.lexsort((ids, keyed))
            if after is not None:
                last_key, last_id = sign * float(after["value"]), int(after["id"])
                later = (keyed[position] > last_key) | (
                    (keyed[position] == last_key) & (ids[position] > last_id)
                )
                position = position[later]
            page = position[:limit]
            people = store.volunteers_by_id(session, ids[page].tolist())
            items = []
            for i in page.tolist():
                volunteer = people[int(ids[i])]
                items.append(
                    VolunteerItem(
                        volunteer_id=int(ids[i]),
                        key=volunteer.key,
                        kind=volunteer.kind,
                        excluded=volunteer.excluded,
                        votes=int(votes[i]),
                        information_per_vote_bits=(
                            float(information[i]) if information is not None else None
                        ),
                        confusion_diagonal=(
                            dict(zip(config.classes, map(float, diagonal[i]), strict=True))
                            if diagonal is not None
                            else None
                        ),
                    )
                )
            more = position.size > limit
            last = page[-1] if page.size else None
            return VolunteerPage(
                workflow_id=workflow_id,
                classes=config.classes,
                positive_class=positive_class(config),
                sort=sort,
                order=order,
                total=int(ids.size),
                items=items,
                next_cursor=(
                    encode_cursor({"value": float(value[last]), "id": int(ids[last])})
                    if more and last is not None
                    else None
                ),
            )

    @app.get("/v1/workflows/{workflow_id}/summary", tags=["workflows"], dependencies=read)
    def workflow_summary(
        workflow_id: int, bucket: Literal["auto", "hour", "day"] = "auto"
    ) -> WorkflowSummary:
        """How far the workflow is: subjects live / retired / contested, classifications spent
        against the fixed-count baseline (the cap times the subjects), and retirements per hour
        or day (`auto`: hours for up to three days of retirements, else days)."""
        with sessions() as session:
            workflow, config = configured(session, workflow_id)
            counts = store.status_counts(session, workflow_id)
            spent = store.classifications_spent(session, workflow_id)
            if bucket == "auto":
                first, last = store.retirement_span(session, workflow_id)
                long = first is not None and last is not None and last - first > HOUR_BUCKETS_UP_TO
                bucket = "day" if long else "hour"
            rate = store.retirements_per_bucket(session, workflow_id, bucket)
        subjects = sum(counts.values())
        cap = config.retirement.cap
        baseline = cap * subjects if cap is not None else None
        running = 0
        buckets = []
        for start, n in rate:
            running += n
            buckets.append(RetirementBucket(start=start, retired=n, cumulative=running))
        return WorkflowSummary(
            workflow_id=workflow_id,
            name=workflow.name,
            classes=config.classes,
            subjects=subjects,
            live=counts.get("live", 0),
            retired=counts.get("retired", 0),
            contested=counts.get("contested", 0),
            classifications=spent,
            cap=cap,
            baseline_classifications=baseline,
            saving=(1.0 - spent / baseline) if baseline else None,
            bucket=bucket,
            retirement_rate=buckets,
        )

    @app.get("/v1/workflows/{workflow_id}/trajectories", tags=["subjects"], dependencies=read)
    def trajectories(
        workflow_id: int, per_status: Annotated[int, Query(ge=1, le=200)] = 40
    ) -> TrajectoryPage:
        """SWAP-style trajectories for a fixed sample of up to `per_status` subjects of each
        status: the posterior after 0, 1, .., n votes under the current skills."""
        with sessions() as session:
            workflow, config = configured(session, workflow_id)
            result: list[Trajectory] = []
            if config.question is not None:
                sample = store.subject_sample(session, workflow_id, per_status)
                ids = [s for s, _ in sample]
                votes = aggregation.gather_votes(session, workflow_id, config, ids)
                volunteers, local = np.unique(votes.volunteer, return_inverse=True)
                skills = aggregation.skills_for(
                    session,
                    workflow_id,
                    config,
                    aggregation.current_snapshot(session, workflow),
                    volunteers,
                )
                states = {
                    row.subject_id: row
                    for row in session.scalars(
                        select(WorkflowSubject).where(
                            WorkflowSubject.workflow_id == workflow_id,
                            WorkflowSubject.subject_id.in_(ids),
                        )
                    )
                }
                for position, (subject_id, status) in enumerate(sample):
                    mine = votes.position == position
                    history = answers.posterior_history(local[mine], votes.answer[mine], skills)
                    state = states[subject_id]
                    result.append(
                        Trajectory(
                            subject_id=subject_id,
                            status=status,
                            label=state.label,
                            retired_label=state.retired_label,
                            posterior=[[float(x) for x in row] for row in history],
                        )
                    )
            return TrajectoryPage(
                workflow_id=workflow_id,
                classes=config.classes,
                positive_class=positive_class(config),
                trajectories=result,
            )

    @app.get("/v1/workflows/{workflow_id}/levels", tags=["volunteers"], dependencies=read)
    def list_levels(
        workflow_id: int,
        level: Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_NUL)] = None,
        cursor: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    ) -> LevelPage:
        """Who reached which volunteer level and when (Gravity Spy's promotions), in the order
        reached, `limit` a page, optionally one `level` only."""
        after = int(decode_cursor(cursor, ("after",))["after"]) if cursor else None
        with sessions() as session:
            _, config = configured(session, workflow_id)
            rows = levels.levels_page(session, workflow_id, after, limit, level)
            items = [
                LevelItem(
                    id=row.id,
                    volunteer_id=volunteer.id,
                    volunteer=volunteer.key,
                    user_id=volunteer.platform_user_id,
                    **levels.describe(row, config),
                )
                for row, volunteer in rows
            ]
        more = len(items) == limit
        return LevelPage(
            workflow_id=workflow_id,
            items=items,
            next_cursor=encode_cursor({"after": items[-1].id}) if more else None,
        )

    @app.get("/v1/workflows/{workflow_id}/audit", tags=["admin"], dependencies=read)
    def list_audit(
        workflow_id: int,
        cursor: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    ) -> AuditPage:
        """Researchers' actions on the workflow, newest first: who, when, why, what, on what."""
        before = int(decode_cursor(cursor, ("before",))["before"]) if cursor else None
        with sessions() as session:
            configured(session, workflow_id)
            entries = store.audit_page(session, workflow_id, before, limit)
            items = [audit_item(e) for e in entries]
        more = len(items) == limit
        return AuditPage(
            workflow_id=workflow_id,
            items=items,
            next_cursor=encode_cursor({"before": items[-1].id}) if more else None,
        )

    # --- hands on the wheel (admin) ----------------------------------------------------------

    def subject_result(
        session: Session, workflow_id: int, row: WorkflowSubject, config: WorkflowConfig
    ) -> SubjectItem:
        gold = store.gold_labels(session, workflow_id, [row.subject_id]).get(row.subject_id)
        known = bool(store.gold_sources(session, workflow_id, [row.subject_id]))
        return subject_item(row, config.classes, gold, known)

    def retire(session: Session, row: WorkflowSubject, reason: str) -> None:
        """Retire a subject by hand: an event, so its effects follow like any retirement's."""
        now = utcnow()
        session.add(
            Retirement(
                workflow_id=row.workflow_id,
                subject_id=row.subject_id,
                reason=reason,
                posterior=row.posterior,
                n_votes=row.n_views,
                source="manual",
                created_at=now,
            )
        )
        row.status, row.reason, row.retired_at = "retired", reason, now
        row.retired_label, row.updated_at = row.label, now

    def make_live(row: WorkflowSubject) -> None:
        """Live again: the rule decides at its next vote (not at once, which could re-retire it
        before anyone has looked again)."""
        row.status, row.reason, row.retired_at, row.retired_label = "live", None, None, None
        row.updated_at = utcnow()

    def before_of(row: WorkflowSubject) -> dict[str, Any]:
        return {
            "status": row.status,
            "reason": row.reason,
            "label": row.label,
            "retired_label": row.retired_label,
        }

    def act_on_subject(
        workflow_id: int,
        subject_id: int,
        actor: str,
        reason: str,
        action: str,
        change: Callable[[Session, WorkflowSubject], bool],
    ) -> ActionResult:
        """Lock the subject, apply `change` (True when it changed anything), audit, answer."""
        with sessions.begin() as session:
            _, config = configured(session, workflow_id)
            row = locked_subject(session, workflow_id, subject_id)
            before = before_of(row)
            changed = change(session, row)
            entry = store.record_audit(
                session,
                workflow_id,
                who=actor,
                reason=reason,
                action=action,
                target=f"subject:{subject_id}",
                details={"before": before, "after": before_of(row), "changed": changed},
            )
            return ActionResult(
                audit=audit_item(entry),
                changed=changed,
                subject=subject_result(session, workflow_id, row, config),
            )

    @app.post(
        "/v1/workflows/{workflow_id}/subjects/{subject_id}/resolve",
        tags=["admin"],
        dependencies=admin,
    )
    def resolve_subject(
        workflow_id: int, subject_id: int, body: Resolution, actor: Who
    ) -> ActionResult:
        """Resolve a contested subject: `confirm` retires it with its current answer (a new
        retirement event, whose effects follow), `reopen` makes it live again."""

        def resolve(session: Session, row: WorkflowSubject) -> bool:
            if row.status != "contested":
                raise Conflict(f"subject {subject_id} is {row.status}, not contested", "status")
            if body.decision == "confirm":
                retire(session, row, row.reason or answers.CONSENSUS)
            else:
                make_live(row)
            return True

        return act_on_subject(
            workflow_id, subject_id, actor, body.reason, f"resolve_{body.decision}", resolve
        )

    @app.post(
        "/v1/workflows/{workflow_id}/subjects/{subject_id}/retire",
        tags=["admin"],
        dependencies=admin,
    )
    def retire_subject(
        workflow_id: int, subject_id: int, body: Reasoned, actor: Who
    ) -> ActionResult:
        """Retire a live subject by hand (reason `other`): a retirement event, whose effects
        follow. Idempotent: a subject already retired (or contested) stays as it is."""

        def retire_live(session: Session, row: WorkflowSubject) -> bool:
            if row.status != "live":
                return False
            retire(session, row, "other")
            return True

        return act_on_subject(workflow_id, subject_id, actor, body.reason, "retire", retire_live)

    @app.post(
        "/v1/workflows/{workflow_id}/subjects/{subject_id}/unretire",
        tags=["admin"],
        dependencies=admin,
    )
    def unretire_subject(
        workflow_id: int, subject_id: int, body: Reasoned, actor: Who
    ) -> ActionResult:
        """Make a retired (or contested) subject live again; its retirement events stay, and the
        rule decides again at its next vote. Idempotent: a live subject stays live."""

        def unretire(_session: Session, row: WorkflowSubject) -> bool:
            if row.status == "live":
                return False
            make_live(row)
            return True

        return act_on_subject(workflow_id, subject_id, actor, body.reason, "unretire", unretire)

    def set_excluded(
        workflow_id: int, volunteer: str, excluded: bool, reason: str, actor: str
    ) -> ActionResult:
        with sessions.begin() as session:
            configured(session, workflow_id)
            found = find_volunteer(session, volunteer)
            changed = found.excluded != excluded
            touched: list[tuple[int, int]] = []
            if changed:
                found.excluded = excluded
                touched = store.subjects_of_volunteer(session, found.id)
                store.mark_subjects_pending(session, touched)
            entry = store.record_audit(
                session,
                workflow_id,
                who=actor,
                reason=reason,
                action="exclude_volunteer" if excluded else "include_volunteer",
                target=f"volunteer:{found.id}",
                details={"key": found.key, "subjects_pending": len(touched), "changed": changed},
            )
            result = ActionResult(
                audit=audit_item(entry), changed=changed, subjects_pending=len(touched)
            )
        notify(sorted({w for w, _ in touched}))
        return result

    @app.post(
        "/v1/workflows/{workflow_id}/volunteers/{volunteer}/exclude",
        tags=["admin"],
        dependencies=admin,
    )
    def exclude_volunteer(
        workflow_id: int, volunteer: str, body: Reasoned, actor: Who
    ) -> ActionResult:
        """Leave a volunteer (a bot, a vandal) out of aggregation: every subject they classified
        is recomputed without their votes, and the next refit learns without them."""
        return set_excluded(workflow_id, volunteer, True, body.reason, actor)

    @app.post(
        "/v1/workflows/{workflow_id}/volunteers/{volunteer}/include",
        tags=["admin"],
        dependencies=admin,
    )
    def include_volunteer(
        workflow_id: int, volunteer: str, body: Reasoned, actor: Who
    ) -> ActionResult:
        """Bring an excluded volunteer back: the subjects they classified are recomputed."""
        return set_excluded(workflow_id, volunteer, False, body.reason, actor)

    @app.put(
        "/v1/workflows/{workflow_id}/subjects/{subject_id}/gold",
        tags=["admin"],
        dependencies=admin,
    )
    def correct_gold(
        workflow_id: int, subject_id: int, body: GoldCorrection, actor: Who
    ) -> ActionResult:
        """Correct (or set) a subject's gold label; the volunteers re-learn (a refit), as after
        a gold upload."""
        with sessions.begin() as session:
            _, config = configured(session, workflow_id)
            if body.label not in config.classes:
                raise InputError(f"label is not one of {config.classes}", field="label")
            previous = store.gold_labels(session, workflow_id, [subject_id]).get(subject_id)
            changed = store.upsert_gold(
                session, workflow_id, {subject_id: body.label}, source="upload"
            )
            entry = store.record_audit(
                session,
                workflow_id,
                who=actor,
                reason=body.reason,
                action="correct_gold",
                target=f"subject:{subject_id}",
                details={"before": previous, "after": body.label, "changed": bool(changed)},
            )
            result = ActionResult(audit=audit_item(entry), changed=bool(changed))
        if changed:
            result.refit = run_refit(workflow_id)
        return result

    # --- the dashboard -----------------------------------------------------------------------

    assets = {
        name: ((STATIC_DIR / name).read_bytes(), media)
        for name, media in (
            ("dashboard.js", "text/javascript; charset=utf-8"),
            ("dashboard.css", "text/css; charset=utf-8"),
        )
    }
    page = (STATIC_DIR / "index.html").read_text()
    login_page = (STATIC_DIR / "login.html").read_text()
    headers = {"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-store"}
    require_read = auth.require("read")

    def asset(name: str) -> Response:
        body, media = assets[name]
        return Response(body, media_type=media, headers={"Cache-Control": "no-cache"})

    # The dashboard's code and style are open, like /docs: they are the package's code and hold
    # no data; every number they show comes from the read routes.
    @app.get("/static/dashboard.js", include_in_schema=False)
    def dashboard_js() -> Response:
        return asset("dashboard.js")

    @app.get("/static/dashboard.css", include_in_schema=False)
    def dashboard_css() -> Response:
        return asset("dashboard.css")

    def login_form(target: str, message: str, status: int) -> HTMLResponse:
        html = login_page.replace("{{next}}", _escape(target)).replace(
            "{{message}}", _escape(message)
        )
        return HTMLResponse(html, status_code=status, headers=headers)

    def dashboard(request: Request) -> Response:
        """The dashboard's page for a reader; a browser without a credential gets the login
        form, any other client gzx's JSON 401/403."""
        try:
            require_read(request)
        except (Unauthorized, Forbidden) as error:
            if "text/html" not in request.headers.get("accept", ""):
                raise
            message = "" if isinstance(error, Unauthorized) else "That token cannot read."
            return login_form(request.url.path, message, http_status(error))
        return HTMLResponse(page, headers=headers)

    @app.get("/", include_in_schema=False)
    def home(request: Request) -> Response:
        return dashboard(request)

    @app.get("/workflows/{workflow_id}", include_in_schema=False)
    def workflow_page(request: Request, workflow_id: int) -> Response:
        return dashboard(request)

    @app.get("/workflows/{workflow_id}/subjects/{subject_id}", include_in_schema=False)
    def subject_page(request: Request, workflow_id: int, subject_id: int) -> Response:
        return dashboard(request)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        """The dashboard's login form (`token`, `next`): a token with the read (or admin) scope
        becomes a Secure, HttpOnly, SameSite=Strict cookie that the read routes accept. A
        bearer header may stand for the form's token."""
        form = parse_qs((await read_limited(request)).decode("utf-8", errors="replace"))
        token = (form.get("token") or [""])[0].strip()
        target = (form.get("next") or ["/"])[0]
        if not target.startswith("/") or target.startswith("//") or "\\" in target:
            target = "/"
        if auth.open:
            return RedirectResponse(target, status_code=303)
        browser = bool(token) or "text/html" in request.headers.get("accept", "")
        if not token:
            scheme, _, credential = request.headers.get("authorization", "").partition(" ")
            token = credential.strip() if scheme.lower() == "bearer" else ""
        scopes = auth.scopes_of_token(token) if token else None
        if scopes is None or not {"read", "admin"} & scopes:
            error: Unauthorized | Forbidden = (
                Unauthorized("a token with the read scope is required", field="authorization")
                if scopes is None
                else Forbidden("this token lacks the 'read' scope", field="authorization")
            )
            if not browser:
                raise error
            return login_form(target, "That is not a token with the read scope.", 401)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            READ_COOKIE,
            token,
            max_age=30 * 24 * 3600,
            path="/",
            secure=True,
            httponly=True,
            samesite="strict",
        )
        return response


def _escape(text: str) -> str:
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&#39;")
    )
