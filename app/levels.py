"""Volunteer levels: Gravity Spy's promotion of a volunteer once every class is answered well.

Gravity Spy (Zevin et al. 2017) learns each volunteer's confusion matrix from gold subjects and
moves the volunteer to a harder workflow once the accuracy on every class passes a threshold; on
Caesar that is a user reducer plus a `promote_user` rule. gzx decides the same thing with its
uncertainty in view: a volunteer reaches a level when the LOWER end of the 90% credible interval
of Θ_u[k, k] = P(answer = k | truth = k) passes the level's threshold for every class k, so three
lucky answers never promote anyone.

Shapes: U volunteers, K classes, L levels. `lower` is (U,K), the lower 90% bounds of the diagonal;
`gold_per_class` (U,K) the answers on gold subjects of each true class.

A level, once reached, is a `VolunteerLevel` row: written once (INSERT .. ON CONFLICT DO NOTHING,
so concurrent evaluators cannot both win) and never undone, even if the volunteer's skill falls
later. Its user effects (a signed webhook, a Caesar user reduction) hang off that row and are
delivered by `app.effects`. Only logged-in volunteers (`user:`) are ever promoted: anonymous
sessions, machines and excluded or forgotten volunteers are left out.

Evaluation runs after every refit (every volunteer with gold answers or a learned matrix) and
after every apply, for the volunteers whose answers on gold subjects were just applied.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from app import aggregation, answers, store
from app.models import (
    Answer,
    Classification,
    Gold,
    View,
    Volunteer,
    VolunteerLevel,
    Workflow,
    as_utc,
    utcnow,
)
from app.workflows import Level, WorkflowConfig

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

INTERVAL = 0.9
"""The credible interval whose lower end must pass a level's threshold."""

CHUNK = 5000
"""Volunteer ids per IN list (PostgreSQL and SQLite both cap the parameters of one statement)."""


# --- the decision (pure) ---------------------------------------------------------------------


def thresholds(levels: Sequence[Level], classes: Sequence[str]) -> FloatArray:
    """The accuracy each level asks of each class, (L,K)."""
    return np.array(
        [[level.threshold(name) for name in classes] for level in levels], dtype=np.float64
    ).reshape(len(levels), len(classes))


def diagonal_lower(skills: answers.Skills, level: float = INTERVAL) -> FloatArray:
    """The lower ends of the `level` credible intervals of Θ_u[k, k], (U,K)."""
    lower, _ = answers.credible_intervals(skills, level)
    return np.diagonal(lower, axis1=1, axis2=2).copy()


def gold_skills(gold_counts: FloatArray) -> answers.Skills:
    """Skills resting on gold answers alone: counts N_u (U,K,K) under a flat Dirichlet(1) prior
    per row, so a volunteer without gold answers has a wide interval and reaches nothing."""
    K = gold_counts.shape[-1]
    return answers.Skills(gold_counts, np.ones((K, K)), np.full(K, 1.0 / K))


def highest_level(
    levels: Sequence[Level],
    classes: Sequence[str],
    lower: dict[str, FloatArray],
    gold_per_class: FloatArray,
) -> IntArray:
    """The position (0..L-1) of the highest level each volunteer passes, or -1: (U,).

    `lower` holds the (U,K) lower bounds by skill source ("gold", "confusion"). Levels are
    ordered, so passing a later level implies every earlier one even if an earlier level's own
    test (a per-class threshold, a gold minimum) would fail.
    """
    n = gold_per_class.shape[0]
    best = np.full(n, -1, dtype=np.int64)
    limits = thresholds(levels, classes)
    gold_total = gold_per_class.sum(axis=1)
    for position, level in enumerate(levels):
        passes = np.all(lower[level.skill_from] >= limits[position], axis=1)
        passes &= gold_total >= level.min_gold_votes
        passes &= np.all(gold_per_class >= level.min_gold_per_class, axis=1)
        best = np.where(passes, position, best)
    return best


# --- reading what the decision needs ---------------------------------------------------------


def _promotable(query: Any) -> Any:
    """Only logged-in volunteers that still count and can still be told apart."""
    return query.where(
        Volunteer.kind == "user",
        Volunteer.excluded.is_(False),
        Volunteer.forgotten_at.is_(None),
        Volunteer.platform_user_id.is_not(None),
    )


def _chunks(ids: Sequence[int]) -> Iterable[list[int]]:
    for start in range(0, len(ids), CHUNK):
        yield list(ids[start : start + CHUNK])


def promotable_volunteers(session: Session, volunteer_ids: Sequence[int]) -> list[int]:
    """Those of `volunteer_ids` that may be promoted, sorted."""
    found: list[int] = []
    for chunk in _chunks(sorted(set(volunteer_ids))):
        found.extend(
            session.scalars(_promotable(select(Volunteer.id).where(Volunteer.id.in_(chunk))))
        )
    return sorted(found)


def _gold_rows(
    session: Session, workflow_id: int, config: WorkflowConfig, volunteer_ids: Sequence[int] | None
) -> list[Any]:
    """(volunteer, subject, classification, value, label, gold label) of promotable volunteers'
    answers on gold subjects, in the order the repeat policy reads them.

    Answers carry their volunteer and time (copied from the classification), so the whole
    workflow is one join of answers with gold; a few volunteers are found through the index on
    classifications.volunteer_id.
    """
    assert config.question is not None
    query = _promotable(
        select(
            Answer.volunteer_id,
            Answer.subject_id,
            Answer.classification_id,
            Answer.value,
            Answer.label,
            Gold.label,
        )
        .join(
            Gold, and_(Gold.workflow_id == Answer.workflow_id, Gold.subject_id == Answer.subject_id)
        )
        .join(Volunteer, Volunteer.id == Answer.volunteer_id)
        .where(
            Answer.workflow_id == workflow_id,
            Answer.task == config.question.task,
            Gold.label.is_not(None),
        )
    )
    oldest = config.min_version()
    if oldest is not None:
        query = query.where(
            or_(
                Answer.version_major > oldest[0],
                and_(Answer.version_major == oldest[0], Answer.version_minor >= oldest[1]),
            )
        )
    query = query.order_by(
        Answer.volunteer_id,
        Answer.subject_id,
        Answer.created_at,
        Answer.classification_id,
        Answer.id,
    )
    if volunteer_ids is None:
        return list(session.execute(query).all())
    rows: list[Any] = []
    for chunk in _chunks(sorted(set(volunteer_ids))):
        theirs = select(Classification.id).where(
            Classification.workflow_id == workflow_id, Classification.volunteer_id.in_(chunk)
        )
        rows.extend(session.execute(query.where(Answer.classification_id.in_(theirs))).all())
    return rows


@dataclass(frozen=True)
class GoldAnswers:
    """Answers on gold subjects as one-hot counts: `counts` (U,K,K) for `volunteer_ids` (U,)."""

    volunteer_ids: IntArray
    counts: FloatArray

    def subset(self, volunteer_ids: Sequence[int]) -> GoldAnswers:
        """The counts of these volunteers (sorted; zero for one without gold answers)."""
        ids = np.array(sorted(volunteer_ids), dtype=np.int64)
        counts = np.zeros((ids.size, *self.counts.shape[1:]))
        if self.volunteer_ids.size and ids.size:
            position = np.clip(
                np.searchsorted(self.volunteer_ids, ids), 0, self.volunteer_ids.size - 1
            )
            found = self.volunteer_ids[position] == ids
            counts[found] = self.counts[position[found]]
        return GoldAnswers(ids, counts)


def gold_answers(
    session: Session, workflow_id: int, config: WorkflowConfig, volunteer_ids: Sequence[int] | None
) -> GoldAnswers:
    """Every counted answer on a gold subject of these volunteers (all promotable volunteers with
    one, when None): one per volunteer and subject, chosen by the workflow's repeat policy."""
    K = len(config.classes)
    by_index, by_label = config.class_of_index(), config.class_of_label()
    class_of = {name: k for k, name in enumerate(config.classes)}
    chosen: dict[tuple[int, int], tuple[int, int]] = {}
    last_classification = None
    for volunteer, subject, classification, value, label, gold in _gold_rows(
        session, workflow_id, config, volunteer_ids
    ):
        if classification == last_classification:
            continue  # one answer per classification (its rows are adjacent)
        last_classification = classification
        key = (volunteer, subject)
        if config.repeats == "keep_first" and key in chosen:
            continue
        answer = by_index.get(value, -1) if value is not None else by_label.get(label, -1)
        chosen[key] = (answer, class_of.get(gold, -1))
    ids = np.array(
        sorted(volunteer_ids) if volunteer_ids is not None else sorted({v for v, _ in chosen}),
        dtype=np.int64,
    )
    counts = np.zeros((ids.size, K, K))
    position = {int(v): i for i, v in enumerate(ids)}
    for (volunteer, _), (answer, truth) in chosen.items():
        if answer >= 0 and truth >= 0:
            counts[position[volunteer], truth, answer] += 1.0
    return GoldAnswers(ids, counts)


# --- recording levels ------------------------------------------------------------------------


def evaluate(
    session: Session,
    workflow_id: int,
    config: WorkflowConfig,
    volunteer_ids: Sequence[int] | None = None,
) -> int:
    """Record every level that these volunteers (every candidate of the workflow when None) have
    newly reached; returns how many rows were written. Idempotent and safe to run concurrently."""
    if not config.levels or config.question is None:
        return 0
    needs_matrix = any(level.skill_from == "confusion" for level in config.levels)
    snapshot = None
    if needs_matrix:
        snapshot_id = session.scalar(
            select(Workflow.skill_snapshot_id).where(Workflow.id == workflow_id)
        )
        snapshot = store.load_snapshot(session, snapshot_id) if snapshot_id is not None else None
    everyone: GoldAnswers | None = None
    if volunteer_ids is None:
        everyone = gold_answers(session, workflow_id, config, None)  # read once, subset below
        candidates = everyone.volunteer_ids.tolist()
        if snapshot is not None:
            candidates = promotable_volunteers(
                session, sorted({*candidates, *snapshot.volunteer_ids.tolist()})
            )
    else:
        candidates = promotable_volunteers(session, volunteer_ids)
    reached = reached_levels(session, workflow_id, candidates)
    top = config.levels[-1].name
    candidates = [v for v in candidates if top not in reached.get(v, set())]
    if not candidates:
        return 0
    gold = (
        gold_answers(session, workflow_id, config, candidates)
        if everyone is None
        else everyone.subset(candidates)
    )
    ids = gold.volunteer_ids
    lower = {"gold": diagonal_lower(gold_skills(gold.counts))}
    votes = {"gold": gold.counts.sum(axis=(1, 2))}
    if needs_matrix:
        learned = aggregation.skills_for(session, workflow_id, config, snapshot, ids)
        lower["confusion"] = diagonal_lower(learned)
        votes["confusion"] = learned.counts.sum(axis=(1, 2))
    best = highest_level(config.levels, config.classes, lower, gold.counts.sum(axis=2))
    now = utcnow()
    rows = []
    for i in np.flatnonzero(best >= 0).tolist():
        volunteer = int(ids[i])
        for level in config.levels[: int(best[i]) + 1]:
            if level.name in reached.get(volunteer, set()):
                continue
            source = level.skill_from
            rows.append(
                {
                    "workflow_id": workflow_id,
                    "volunteer_id": volunteer,
                    "level": level.name,
                    "lower": {
                        name: round(float(lower[source][i, k]), 6)
                        for k, name in enumerate(config.classes)
                    },
                    "votes": round(float(votes[source][i])),
                    "reached_at": now,
                }
            )
    if not rows:
        return 0
    # Rows in one order (volunteer, then level order) in every evaluator: two concurrent
    # inserts of overlapping rows wait on each other instead of deadlocking.
    statement = (
        store._insert(session, VolunteerLevel)
        .on_conflict_do_nothing(index_elements=["workflow_id", "volunteer_id", "level"])
        .returning(VolunteerLevel.id)
    )
    return len(session.execute(statement, rows).all())


def reached_levels(
    session: Session, workflow_id: int, volunteer_ids: Sequence[int]
) -> dict[int, set[str]]:
    """The levels already recorded for these volunteers."""
    reached: dict[int, set[str]] = {}
    for chunk in _chunks(sorted(set(volunteer_ids))):
        query = select(VolunteerLevel.volunteer_id, VolunteerLevel.level).where(
            VolunteerLevel.workflow_id == workflow_id, VolunteerLevel.volunteer_id.in_(chunk)
        )
        for volunteer, level in session.execute(query):
            reached.setdefault(volunteer, set()).add(level)
    return reached


def evaluate_after_apply(
    session: Session,
    workflow_id: int,
    config: WorkflowConfig,
    subject_ids: Sequence[int],
    gold_subjects: Iterable[int],
) -> int:
    """After an apply: the volunteers whose answers on gold subjects among `subject_ids` are not
    applied yet (call before the views are marked applied), so a volunteer is promoted moments
    after answering gold, not only at the next refit. Costs nothing without levels or gold."""
    if not config.levels or config.question is None:
        return 0
    gold = sorted(set(gold_subjects) & set(subject_ids))
    if not gold:
        return 0
    query = _promotable(
        select(View.volunteer_id)
        .join(Volunteer, Volunteer.id == View.volunteer_id)
        .where(
            View.workflow_id == workflow_id,
            View.subject_id.in_(gold),
            View.applied_at.is_(None),
        )
        .distinct()
    )
    volunteers = sorted(session.scalars(query))
    if not volunteers:
        return 0
    return evaluate(session, workflow_id, config, volunteers)


# --- reading levels --------------------------------------------------------------------------


def level_number(config: WorkflowConfig, name: str) -> int | None:
    """1 for the first configured level, ...; None for a level no longer configured."""
    for position, level in enumerate(config.levels):
        if level.name == name:
            return position + 1
    return None


def describe(row: VolunteerLevel, config: WorkflowConfig) -> dict[str, Any]:
    """A recorded level as the API and the effects show it."""
    return {
        "level": row.level,
        "level_number": level_number(config, row.level),
        "lower_90": dict(row.lower or {}),
        "votes": row.votes,
        "reached_at": as_utc(row.reached_at).isoformat(),
    }


def levels_of(
    session: Session, workflow_id: int, volunteer_id: int, config: WorkflowConfig, limit: int = 100
) -> list[dict[str, Any]]:
    """A volunteer's levels in a workflow, in the order they were reached."""
    query = (
        select(VolunteerLevel)
        .where(
            VolunteerLevel.workflow_id == workflow_id, VolunteerLevel.volunteer_id == volunteer_id
        )
        .order_by(VolunteerLevel.id)
        .limit(limit)
    )
    return [describe(row, config) for row in session.scalars(query)]


def levels_page(
    session: Session, workflow_id: int, after: int | None, limit: int, level: str | None = None
) -> list[tuple[VolunteerLevel, Volunteer]]:
    """Recorded levels of a workflow in the order they were reached (by id), after id `after`."""
    query = (
        select(VolunteerLevel, Volunteer)
        .join(Volunteer, Volunteer.id == VolunteerLevel.volunteer_id)
        .where(VolunteerLevel.workflow_id == workflow_id)
        .order_by(VolunteerLevel.id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(VolunteerLevel.id > after)
    if level is not None:
        query = query.where(VolunteerLevel.level == level)
    return [(row, volunteer) for row, volunteer in session.execute(query).all()]
