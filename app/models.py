"""The ORM models: gzx's schema. The database is the source of truth; Redis only carries work.

Platform ids (workflow, subject, classification) are kept as the platform's integers. Everything a
subject's posterior depends on is stored here, so any state can be rebuilt by re-applying it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JSONValue = JSON().with_variant(JSONB(), "postgresql")
Id = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; gzx stores UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSONValue,
        list[Any]: JSONValue,
        Any: JSONValue,
    }


class Workflow(Base):
    """One Zooniverse workflow; `config` is None until a researcher configures it."""

    __tablename__ = "workflows"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str | None] = mapped_column(String(200))
    config: Mapped[dict[str, Any] | None] = mapped_column(JSONValue)
    config_hash: Mapped[str | None] = mapped_column(String(64))
    skill_snapshot_id: Mapped[int | None] = mapped_column(Integer)
    mark_snapshot_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Subject(Base):
    """An image (or set of frames) shown to volunteers; metadata and image locations."""

    __tablename__ = "subjects"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    subject_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSONValue, default=dict)
    locations: Mapped[list[Any]] = mapped_column(JSONValue, default=list)
    width: Mapped[float | None] = mapped_column(Float)
    height: Mapped[float | None] = mapped_column(Float)
    platform_retired: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Volunteer(Base):
    """A logged-in user (`user:<id>`), an anonymous session (`anon:<hash>`) or a machine (`ml:`)."""

    __tablename__ = "volunteers"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # user | anonymous | machine
    platform_user_id: Mapped[int | None] = mapped_column(BigInteger)
    login: Mapped[str | None] = mapped_column(String(200))
    ip_hash: Mapped[str | None] = mapped_column(String(64))
    excluded: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    forgotten_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Classification(Base):
    """One volunteer's submission, immutable and unique by its platform id; raw JSON kept."""

    __tablename__ = "classifications"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    workflow_id: Mapped[int] = mapped_column(ForeignKey("workflows.id"), index=True)
    volunteer_id: Mapped[int] = mapped_column(ForeignKey("volunteers.id"), index=True)
    workflow_version: Mapped[str | None] = mapped_column(String(32))
    version_major: Mapped[int | None] = mapped_column(Integer)
    version_minor: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    source: Mapped[str] = mapped_column(String(16))
    gold_standard: Mapped[bool | None] = mapped_column(Boolean)
    expert: Mapped[str | None] = mapped_column(String(32))
    subject_ids: Mapped[list[Any]] = mapped_column(JSONValue)
    raw: Mapped[dict[str, Any]] = mapped_column(JSONValue)


class View(Base):
    """The fact that a volunteer saw a subject (every classification is one, marks or not)."""

    __tablename__ = "views"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    classification_id: Mapped[int] = mapped_column(ForeignKey("classifications.id"), unique=True)
    workflow_id: Mapped[int] = mapped_column(BigInteger)
    subject_id: Mapped[int] = mapped_column(BigInteger)
    volunteer_id: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    applied_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # (workflow, volunteer): the volunteer list and the export's skills.csv count a workflow's
    # views per volunteer; with this index PostgreSQL reads them in order from the index alone.
    __table_args__ = (
        Index("ix_views_workflow_subject", "workflow_id", "subject_id"),
        Index("ix_views_workflow_volunteer", "workflow_id", "volunteer_id"),
    )


class Answer(Base):
    """The value given to a question task: an index (stream, Caesar) or a label (CSV export).

    Who answered, when and on which workflow version are copied from the classification, so that
    a refit reads one table instead of joining four.
    """

    __tablename__ = "answers"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    classification_id: Mapped[int] = mapped_column(ForeignKey("classifications.id"), index=True)
    workflow_id: Mapped[int] = mapped_column(BigInteger)
    subject_id: Mapped[int] = mapped_column(BigInteger)
    task: Mapped[str] = mapped_column(String(64))
    value: Mapped[int | None] = mapped_column(Integer)
    label: Mapped[str | None] = mapped_column(Text)
    volunteer_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    version_major: Mapped[int | None] = mapped_column(Integer)
    version_minor: Mapped[int | None] = mapped_column(Integer)
    __table_args__ = (Index("ix_answers_workflow_subject", "workflow_id", "subject_id"),)


class Mark(Base):
    """A box or point drawn in a drawing task; corners x1,y1 (top-left) to x2,y2."""

    __tablename__ = "marks"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    classification_id: Mapped[int] = mapped_column(ForeignKey("classifications.id"), index=True)
    workflow_id: Mapped[int] = mapped_column(BigInteger)
    subject_id: Mapped[int] = mapped_column(BigInteger)
    task: Mapped[str] = mapped_column(String(64))
    tool: Mapped[int] = mapped_column(Integer)
    frame: Mapped[int] = mapped_column(Integer, default=0)
    kind: Mapped[str] = mapped_column(String(16))
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    x2: Mapped[float] = mapped_column(Float)
    y2: Mapped[float] = mapped_column(Float)
    details: Mapped[list[Any] | None] = mapped_column(JSONValue)
    __table_args__ = (Index("ix_marks_workflow_subject", "workflow_id", "subject_id"),)


class WorkflowSubject(Base):
    """A subject's state within one workflow: pending work, counts, posterior, status."""

    __tablename__ = "workflow_subjects"
    workflow_id: Mapped[int] = mapped_column(ForeignKey("workflows.id"), primary_key=True)
    subject_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    pending: Mapped[bool] = mapped_column(Boolean, default=True)
    # When it last became pending (kept while it stays pending): claims take the oldest first,
    # and the queue-lag metric reads it.
    pending_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(16), default="live")  # live|retired|contested
    n_classifications: Mapped[int] = mapped_column(Integer, default=0)
    n_views: Mapped[int] = mapped_column(Integer, default=0)
    counts: Mapped[list[Any] | None] = mapped_column(JSONValue)
    posterior: Mapped[list[Any] | None] = mapped_column(JSONValue)
    label: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(String(32))
    retired_label: Mapped[str | None] = mapped_column(String(200))
    marks_risk: Mapped[dict[str, Any] | None] = mapped_column(JSONValue)
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (Index("ix_workflow_subjects_pending", "workflow_id", "pending"),)


class Gold(Base):
    """Known truth for a subject in a workflow: a class label and/or boxes."""

    __tablename__ = "gold"
    workflow_id: Mapped[int] = mapped_column(ForeignKey("workflows.id"), primary_key=True)
    subject_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    label: Mapped[str | None] = mapped_column(String(200))
    boxes: Mapped[list[Any] | None] = mapped_column(JSONValue)
    source: Mapped[str] = mapped_column(String(32))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Retirement(Base):
    """The decision that a subject is settled: an event, never silently undone."""

    __tablename__ = "retirements"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    workflow_id: Mapped[int] = mapped_column(ForeignKey("workflows.id"))
    subject_id: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(32))
    posterior: Mapped[list[Any] | None] = mapped_column(JSONValue)
    n_votes: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16), default="online")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (Index("ix_retirements_workflow_subject", "workflow_id", "subject_id"),)


class Effect(Base):
    """What a retirement (or a volunteer's new level) causes outside.

    Subject effects hang off a retirement (Panoptes retire, webhook, Caesar reduction); user
    effects off a volunteer level (webhook, Caesar user reduction). Each is unique per cause and
    kind, so it can be retried but never fire twice.
    """

    __tablename__ = "effects"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    retirement_id: Mapped[int | None] = mapped_column(ForeignKey("retirements.id"))
    workflow_id: Mapped[int] = mapped_column(BigInteger)
    subject_id: Mapped[int | None] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSONValue)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    level_id: Mapped[int | None] = mapped_column(ForeignKey("volunteer_levels.id"))
    volunteer_id: Mapped[int | None] = mapped_column(Integer)
    __table_args__ = (
        UniqueConstraint("retirement_id", "kind", name="uq_effects_retirement_kind"),
        UniqueConstraint("level_id", "kind", name="uq_effects_level_kind"),
    )


class VolunteerLevel(Base):
    """A volunteer reached a level of a workflow (Gravity Spy's promotion): once, never undone.

    `lower` holds the lower ends of the 90% intervals of the volunteer's per-class accuracy at the
    moment the level was reached; `votes` their number of votes then.
    """

    __tablename__ = "volunteer_levels"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    workflow_id: Mapped[int] = mapped_column(ForeignKey("workflows.id"))
    volunteer_id: Mapped[int] = mapped_column(ForeignKey("volunteers.id"))
    level: Mapped[str] = mapped_column(String(64))
    lower: Mapped[dict[str, Any]] = mapped_column(JSONValue, default=dict)
    votes: Mapped[int] = mapped_column(Integer, default=0)
    reached_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (
        UniqueConstraint("workflow_id", "volunteer_id", "level", name="uq_volunteer_levels"),
    )


class MachineModel(Base):
    """One version of a model that classifies as a volunteer (`ml:<model>@<version>`).

    `training_subjects` lists the subjects of the export it was trained on (train and validation
    splits): its predictions there are kept for calibration but never counted as votes.
    """

    __tablename__ = "machine_models"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    workflow_id: Mapped[int] = mapped_column(ForeignKey("workflows.id"))
    volunteer_id: Mapped[int] = mapped_column(ForeignKey("volunteers.id"))
    model: Mapped[str] = mapped_column(String(100))
    version: Mapped[str] = mapped_column(String(64))
    export_id: Mapped[str | None] = mapped_column(String(36))
    training_subjects: Mapped[list[Any]] = mapped_column(JSONValue, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (
        UniqueConstraint("workflow_id", "volunteer_id", name="uq_machine_models_volunteer"),
    )


class Prediction(Base):
    """A machine volunteer's output for one subject: class probabilities and/or scored boxes.

    Unique per model version and subject. `classification_id` is the classification it entered as
    (None when the subject was in the model's training export).
    """

    __tablename__ = "predictions"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    workflow_id: Mapped[int] = mapped_column(BigInteger)
    subject_id: Mapped[int] = mapped_column(BigInteger)
    volunteer_id: Mapped[int] = mapped_column(Integer)
    classification_id: Mapped[int | None] = mapped_column(BigInteger)
    probabilities: Mapped[dict[str, Any] | None] = mapped_column(JSONValue)
    boxes: Mapped[list[Any] | None] = mapped_column(JSONValue)
    in_training: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (
        UniqueConstraint(
            "workflow_id", "volunteer_id", "subject_id", name="uq_predictions_model_subject"
        ),
    )


class Export(Base):
    """An immutable, versioned snapshot of reliable labels with a manifest.

    A writer claims a queued export by raising `attempts` (its claim is that number) and keeps
    `heartbeat_at` fresh while it writes; a running export whose heartbeat is older than the lease
    lost its writer and may be claimed again. The export-done webhook is an outbox of one: its
    status, attempts, next try and last error, retried with the effects' backoff.
    """

    __tablename__ = "exports"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    workflow_id: Mapped[int] = mapped_column(ForeignKey("workflows.id"))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    rules: Mapped[dict[str, Any] | None] = mapped_column(JSONValue)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSONValue)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    webhook_status: Mapped[str | None] = mapped_column(String(16))
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    webhook_next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    webhook_error: Mapped[str | None] = mapped_column(Text)


class SkillSnapshot(Base):
    """Every volunteer's learned skill at one refit: the arrays of `app.answers.Skills`.

    `counts` holds the soft counts (U,K,K) of the volunteers in `volunteer_ids` (float64 bytes) as
    the refit learned them from every view up to `last_view_id`; answers on gold subjects that
    arrive later are added to them live, so a gold answer changes its volunteer's skill at once.
    """

    __tablename__ = "skill_snapshots"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    workflow_id: Mapped[int] = mapped_column(ForeignKey("workflows.id"), index=True)
    n_classes: Mapped[int] = mapped_column(Integer)
    volunteer_ids: Mapped[bytes] = mapped_column(LargeBinary)
    counts: Mapped[bytes] = mapped_column(LargeBinary)
    alpha: Mapped[list[Any]] = mapped_column(JSONValue)
    class_prior: Mapped[list[Any]] = mapped_column(JSONValue)
    n_votes: Mapped[int] = mapped_column(Integer)
    last_view_id: Mapped[int] = mapped_column(BigInteger, default=0)
    n_iter: Mapped[int] = mapped_column(Integer)
    converged: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Cluster(Base):
    """Marks of different volunteers taken to be one object, with P(real) and a consensus box.

    Recomputed, with all its subject's clusters, whenever the subject is applied; `members` are
    the ids of its marks (at most one per volunteer).
    """

    __tablename__ = "clusters"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    workflow_id: Mapped[int] = mapped_column(BigInteger)
    subject_id: Mapped[int] = mapped_column(BigInteger)
    tool: Mapped[int] = mapped_column(Integer)
    frame: Mapped[int] = mapped_column(Integer)
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    x2: Mapped[float] = mapped_column(Float)
    y2: Mapped[float] = mapped_column(Float)
    p_real: Mapped[float] = mapped_column(Float)
    p_off: Mapped[float] = mapped_column(Float)
    n_marks: Mapped[int] = mapped_column(Integer)
    n_views: Mapped[int] = mapped_column(Integer)
    kept: Mapped[bool] = mapped_column(Boolean)
    members: Mapped[list[Any]] = mapped_column(JSONValue)
    __table_args__ = (Index("ix_clusters_workflow_subject", "workflow_id", "subject_id"),)


class MarkSnapshot(Base):
    """Every volunteer's mark skill at one refit (`app.marks.MarkSkills` as arrays).

    `arrays` holds float64 bytes of shape (8, U): p_fn, f, p_fp, sigma and their effective counts,
    for the volunteers in `volunteer_ids`; `population` the values for everyone else.
    """

    __tablename__ = "mark_snapshots"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    workflow_id: Mapped[int] = mapped_column(ForeignKey("workflows.id"), index=True)
    volunteer_ids: Mapped[bytes] = mapped_column(LargeBinary)
    arrays: Mapped[bytes] = mapped_column(LargeBinary)
    population: Mapped[dict[str, Any]] = mapped_column(JSONValue)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEntry(Base):
    """A researcher's hand on the wheel: who did what to which target, when, and why."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    workflow_id: Mapped[int] = mapped_column(BigInteger)
    who: Mapped[str] = mapped_column(String(200))  # the token's name, or "open"
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    reason: Mapped[str] = mapped_column(Text)  # why, in the researcher's words
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(200))  # `subject:<id>`, `volunteer:<id>`
    details: Mapped[dict[str, Any]] = mapped_column(JSONValue, default=dict)
    __table_args__ = (Index("ix_audit_workflow_id", "workflow_id", "id"),)
