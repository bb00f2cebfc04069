"""Applying stored classifications to subjects, and refitting volunteers' skills.

A subject's state is a pure function of its stored classifications, the workflow's skill snapshot
and its config, so applying is idempotent and order-independent: duplicate deliveries, retried
jobs and crashed workers cannot change the result. The numbers come from `app.answers`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import text, update
from sqlalchemy.orm import Session, sessionmaker

from app import answers, clusters, levels, marks, parsing, store
from app.errors import InputError
from app.models import Workflow, WorkflowSubject, as_utc, utcnow
from app.workflows import WorkflowConfig, load_config

IntArray = npt.NDArray[np.int64]
log = logging.getLogger("gzx.aggregation")


def select_votes(votes: Sequence[store.VoteRow], config: WorkflowConfig) -> list[store.VoteRow]:
    """The classifications that count: recent enough, and one per volunteer per subject.

    `votes` are ordered by subject, platform `created_at`, then id; the repeat policy keeps the
    first (Caesar's default) or the last classification of each volunteer on each subject.
    """
    oldest = config.min_version()
    usable = [v for v in votes if oldest is None or (v.version is not None and v.version >= oldest)]
    chosen: dict[tuple[int, int], store.VoteRow] = {}
    for vote in usable:
        key = (vote.subject_id, vote.volunteer_id)
        if config.repeats == "keep_last" or key not in chosen:
            chosen[key] = vote
    kept = {id(v) for v in chosen.values()}
    return [v for v in usable if id(v) in kept]


def class_of_vote(value: int | None, label: str | None, config: WorkflowConfig) -> int | None:
    """The class an answer maps to (by index, else by label), or None."""
    if config.question is None:
        return None
    if value is not None:
        return config.class_of_index().get(value)
    if label is not None:
        return config.class_of_label().get(label)
    return None


def class_prior(config: WorkflowConfig) -> npt.NDArray[np.float64] | None:
    """The workflow's fixed class prior, or None when it is learned."""
    given = config.priors.class_prior
    if not given:
        return None
    prior = np.array([float(given.get(name, 0.0)) for name in config.classes])
    result: npt.NDArray[np.float64] = prior / prior.sum()
    return result


def skills_for(
    session: Session,
    workflow_id: int,
    config: WorkflowConfig,
    snapshot: store.Snapshot | None,
    volunteer_ids: IntArray,
    gold_votes: Sequence[store.GoldVote] | None = None,
) -> answers.Skills:
    """Skills of the given volunteers (in that order): the snapshot's counts plus their answers on
    gold subjects stored since it was taken. Without a snapshot everyone is the average volunteer.
    `gold_votes`: those answers when the caller read them already (of these volunteers or more,
    as `store.gold_votes_of` orders them).
    """
    K = len(config.classes)
    counts = np.zeros((volunteer_ids.size, K, K))
    if snapshot is not None:
        known = snapshot.volunteer_ids
        if known.size:
            position = np.clip(np.searchsorted(known, volunteer_ids), 0, known.size - 1)
            found = known[position] == volunteer_ids
            counts[found] = snapshot.counts[position[found]]
        alpha, prior = snapshot.alpha, snapshot.class_prior
    else:
        alpha = answers.population_alpha(counts, config.priors.confusion_strength)
        prior = np.full(K, 1.0 / K)
    fixed = class_prior(config)
    if fixed is not None:
        prior = fixed
    if config.question is not None and volunteer_ids.size:
        after = snapshot.last_view_id if snapshot is not None else 0
        rows = gold_votes
        if rows is None:
            rows = store.gold_votes_of(
                session, workflow_id, volunteer_ids.tolist(), config.question.task, after
            )
        index = {int(v): i for i, v in enumerate(volunteer_ids)}
        seen: set[tuple[int, int]] = set()
        for volunteer, subject, _created, value, label, gold in rows:
            if volunteer not in index:
                continue
            answer = class_of_vote(value, label, config)
            truth = config.classes.index(gold) if gold in config.classes else None
            if answer is None or truth is None or (volunteer, subject) in seen:
                continue
            seen.add((volunteer, subject))
            counts[index[volunteer], truth, answer] += 1.0
    return answers.Skills(counts, np.asarray(alpha), np.asarray(prior))


def subject_history(
    session: Session, workflow: Workflow, config: WorkflowConfig, subject_id: int
) -> list[list[float]]:
    """The posterior after 0, 1, .., n counted votes of one subject, in arrival order, with the
    current skills (SWAP's trajectory), computed when asked for."""
    votes = gather_votes(session, workflow.id, config, [subject_id])
    volunteers, local = np.unique(votes.volunteer, return_inverse=True)
    skills = skills_for(
        session, workflow.id, config, current_snapshot(session, workflow), volunteers
    )
    history = answers.posterior_history(local, votes.answer, skills)
    return [[float(x) for x in row] for row in history]


def current_snapshot(session: Session, workflow: Workflow) -> store.Snapshot | None:
    if workflow.skill_snapshot_id is None:
        return None
    return store.load_snapshot(session, workflow.skill_snapshot_id)


@dataclass(frozen=True)
class SubjectVotes:
    """The votes that count for a batch of subjects, as arrays (subject positions in the batch)."""

    position: IntArray
    volunteer: IntArray  # volunteer row ids
    answer: IntArray  # classes
    n_views: IntArray
    n_classifications: IntArray
    counts: IntArray  # (S,K) votes per class
    views: list[tuple[int, int]]  # (subject, volunteer) of every classification that counts
    kept_classifications: set[int]


def gather_votes(
    session: Session, workflow_id: int, config: WorkflowConfig, subject_ids: Sequence[int]
) -> SubjectVotes:
    task = config.question.task if config.question else None
    rows = store.subject_votes(session, workflow_id, subject_ids, task)
    return votes_of_rows(rows, config, subject_ids)


def votes_of_rows(
    rows: Sequence[store.VoteRow], config: WorkflowConfig, subject_ids: Sequence[int]
) -> SubjectVotes:
    """The votes that count among stored rows (`store.subject_votes`), as arrays."""
    position_of = {s: i for i, s in enumerate(subject_ids)}
    n_classifications = np.zeros(len(subject_ids), dtype=np.int64)
    first: list[store.VoteRow] = []
    seen: set[int] = set()
    for row in rows:
        if row.classification_id not in seen:  # one answer per classification
            seen.add(row.classification_id)
            first.append(row)
            n_classifications[position_of[row.subject_id]] += 1
    kept = select_votes(first, config)
    n_views = np.zeros(len(subject_ids), dtype=np.int64)
    position, volunteer, answer = [], [], []
    for row in kept:
        n_views[position_of[row.subject_id]] += 1
        k = class_of_vote(row.answer_value, row.answer_label, config)
        if k is not None:
            position.append(position_of[row.subject_id])
            volunteer.append(row.volunteer_id)
            answer.append(k)
    K = max(len(config.classes), 1)
    p, u, a = (np.asarray(x, dtype=np.int64) for x in (position, volunteer, answer))
    counts = np.bincount(p * K + a, minlength=len(subject_ids) * K).reshape(-1, K)
    views = [(row.subject_id, row.volunteer_id) for row in kept]
    kept_ids = {row.classification_id for row in kept}
    return SubjectVotes(p, u, a, n_views, n_classifications, counts, views, kept_ids)


def gold_from_signals(
    session: Session,
    workflow_id: int,
    config: WorkflowConfig,
    contexts: dict[int, store.SubjectContext],
    experts: Sequence[tuple[int, int | None, str | None]],
) -> tuple[dict[int, str], bool]:
    """Gold that the platform's own data carries: an expert's gold-standard classification, or a
    training subject's feedback answer in its metadata. Uploaded gold always wins over these.
    Stores the new labels; returns every gold label of the subjects, these included, and whether
    a stored label changed."""
    gold = {s: c.gold_label for s, c in contexts.items() if c.gold_label is not None}
    if config.question is None:
        return gold, False
    labels: dict[int, str] = {}
    for subject, context in contexts.items():
        if context.metadata is None:
            continue
        try:
            signal = parsing.gold_from_metadata(context.metadata)
        except InputError:
            continue  # malformed feedback keys: not truth we can use
        if signal is None:
            continue
        for rule in signal.rules:
            k = class_of_vote(rule.answer_index, rule.answer_label, config)
            if k is not None:
                labels[subject] = config.classes[k]
                break
    for subject, value, label in experts:
        k = class_of_vote(value, label, config)
        if k is not None:
            labels[subject] = config.classes[k]
    by_source = {s: label for s, label in labels.items() if contexts[s].gold_source != "upload"}
    if by_source:
        known = {s: gold[s] for s in by_source if s in gold}
        changed = store.upsert_gold(
            session, workflow_id, by_source, source="platform", existing=known
        )
        gold.update(by_source)
        return gold, bool(changed)
    return gold, False


def update_subjects(
    session: Session, workflow: Workflow, config: WorkflowConfig, subject_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """Recompute the given subjects from all their stored classifications and decide retirement.

    The question task gives a posterior per class; the drawing task gives clusters and a risk.
    A retired subject stays retired; if its most probable answer is no longer the one it retired
    with (a refit moved the skills, or later votes disagree), it is marked `contested` for a
    researcher to review. Subjects retired by the cap are not contested.
    """
    # Four statements when the snapshot is cached (an online update pays for each round trip):
    # the subjects' status, metadata and gold with the snapshot's time; their votes with the
    # experts' answers and the voters' gold answers since the snapshot; the two writes.
    contexts, snapshot_created = store.subject_contexts(
        session, workflow.id, subject_ids, workflow.skill_snapshot_id
    )
    snapshot = None
    gold_votes: list[store.GoldVote] | None = []
    if config.question is not None:
        if workflow.skill_snapshot_id is not None:
            snapshot = store.load_snapshot(session, workflow.skill_snapshot_id, snapshot_created)
        rows, experts, gold_votes = store.subject_votes_and_experts(
            session,
            workflow.id,
            subject_ids,
            config.question.task,
            snapshot.last_view_id if snapshot is not None else 0,
        )
    else:
        rows, experts = store.subject_votes(session, workflow.id, subject_ids, None), []
    gold, gold_changed = gold_from_signals(session, workflow.id, config, contexts, experts)
    if gold_changed:  # the gold answers were read before the new labels: read them again
        gold_votes = None
    votes = votes_of_rows(rows, config, subject_ids)
    S = len(subject_ids)
    states: list[dict[str, Any]] = [
        {
            "subject_id": s,
            "n_classifications": int(votes.n_classifications[i]),
            "n_views": int(votes.n_views[i]),
            "counts": votes.counts[i].tolist(),
        }
        for i, s in enumerate(subject_ids)
    ]
    is_gold = np.array([s in gold for s in subject_ids], dtype=bool)
    settled: list[npt.NDArray[np.bool_]] = []
    reasons: npt.NDArray[np.str_] = np.full(S, answers.CONSENSUS, dtype="<U20")
    if config.question is not None:
        posterior = _answer_posteriors(
            session, workflow, config, subject_ids, votes, gold, snapshot, gold_votes
        )
        for i, state in enumerate(states):
            state.update(
                posterior=[float(x) for x in posterior[i]],
                label=config.classes[int(posterior[i].argmax())],
            )
        rule = replace(config.retirement_rule(), cap=None, min_views=1)
        decided = answers.decide_retirement(posterior, votes.n_views, np.zeros(S, bool), rule)
        settled.append(decided != answers.NOT_RETIRED)
        reasons = np.where(decided != answers.NOT_RETIRED, decided, reasons)
    if config.drawing is not None:
        is_gold |= np.array([contexts[s].gold_boxes is not None for s in subject_ids], dtype=bool)
        drawing = clusters.update_clusters(
            session, workflow, config, subject_ids, votes.views, votes.kept_classifications
        )
        settled.append(drawing.settled)
        for i, state in enumerate(states):
            state["marks_risk"] = drawing.risk[i]
        if config.question is None:
            reasons = np.where(drawing.empty, answers.NOTHING_HERE, answers.CONSENSUS)
    combined = (
        np.logical_and.reduce(settled)
        if config.retirement.combine == "all"
        else (np.logical_or.reduce(settled))
    )
    final = np.where(combined, reasons, answers.NOT_RETIRED)
    cap = config.retirement.cap
    if cap is not None:
        final = np.where(~combined & (votes.n_views >= cap), answers.CLASSIFICATION_COUNT, final)
    final = np.where(is_gold | (votes.n_views < config.retirement.min_views), "", final)
    _record_decisions(session, workflow, contexts, states, final, votes.n_views)
    levels.evaluate_after_apply(session, workflow.id, config, subject_ids, gold)  # views unapplied
    store.save_subject_states(session, workflow.id, states)
    return states


def _answer_posteriors(
    session: Session,
    workflow: Workflow,
    config: WorkflowConfig,
    subject_ids: Sequence[int],
    votes: SubjectVotes,
    gold: dict[int, str],
    snapshot: store.Snapshot | None,
    gold_votes: Sequence[store.GoldVote] | None,
) -> npt.NDArray[np.float64]:
    """Posterior per class (S,K) under the current skills; gold subjects are their gold label."""
    volunteers, local = np.unique(votes.volunteer, return_inverse=True)
    skills = skills_for(session, workflow.id, config, snapshot, volunteers, gold_votes)
    posterior = answers.subject_posteriors(
        votes.position, local, votes.answer, len(subject_ids), skills
    )
    for i, s in enumerate(subject_ids):
        if s in gold and gold[s] in config.classes:
            posterior[i] = np.eye(len(config.classes))[config.classes.index(gold[s])]
    return posterior


def _record_decisions(
    session: Session,
    workflow: Workflow,
    contexts: dict[int, store.SubjectContext],
    states: list[dict[str, Any]],
    reasons: npt.NDArray[np.str_],
    n_views: IntArray,
) -> None:
    """Retire live subjects that are now settled (an event each, inserted together); flag
    retired ones whose answer changed as contested. Their status was read with their context."""
    now = utcnow()
    events: list[dict[str, Any]] = []
    for i, state in enumerate(states):
        row = contexts[state["subject_id"]]
        status = row.status
        reason = str(reasons[i])
        label = state.get("label")
        if status == "live" and reason:
            events.append(
                {
                    "workflow_id": workflow.id,
                    "subject_id": state["subject_id"],
                    "reason": reason,
                    "posterior": state.get("posterior"),
                    "n_votes": int(n_views[i]),
                    "source": "online",
                    "created_at": now,
                }
            )
            state.update(status="retired", reason=reason, retired_at=now, retired_label=label)
        elif (
            status == "retired"
            and row.reason != answers.CLASSIFICATION_COUNT
            and label != row.retired_label
        ):
            # Contested: the answer it was retired with is no longer the most probable one.
            state.update(status="contested")
    store.insert_retirements(session, events)  # one statement for the batch


def apply_pending(sessions: sessionmaker[Session], workflow_id: int, batch_size: int = 50) -> int:
    """Apply every pending subject of a workflow, a batch per transaction; returns how many."""
    total = 0
    while True:
        with sessions.begin() as session:
            workflow = session.get(Workflow, workflow_id)
            if workflow is None or workflow.config is None:
                return total
            config = load_config(workflow.config)
            store.commit_without_waiting_for_disk(session)
            subject_ids = store.claim_pending_subjects(session, workflow_id, batch_size)
            if not subject_ids:
                return total
            # Read the skill snapshot only now that the subjects are ours: a refit switches the
            # snapshot and marks every subject pending in one transaction, so either we see its
            # snapshot, or its marking waits for our locks and the subjects come round again.
            session.refresh(workflow)
            config = load_config(workflow.config or {})
            update_subjects(session, workflow, config, subject_ids)
        total += len(subject_ids)


class _Clock:
    """Logs how long each step of a long job took."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.last = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        log.info("%s: %s in %.2f s", self.what, step, now - self.last)
        self.last = now


@dataclass(frozen=True)
class RefitReport:
    snapshot_id: int
    n_votes: int
    n_subjects: int
    n_volunteers: int
    n_iter: int
    converged: bool
    mark_snapshot_id: int | None = None


def votes_that_count(table: store.VoteTable, repeats: str) -> npt.NDArray[np.bool_]:
    """The repeat policy, vectorised over a whole workflow: one vote per volunteer per subject,
    the first (or last) by platform created_at, ties by classification id; unmapped answers out."""
    order = np.lexsort(
        (table.classification_id, table.created_us, table.volunteer_id, table.subject_id)
    )
    s, u = table.subject_id[order], table.volunteer_id[order]
    new_pair = np.ones(order.size, dtype=bool)
    if repeats == "keep_first":
        new_pair[1:] = (s[1:] != s[:-1]) | (u[1:] != u[:-1])
    else:
        new_pair[:-1] = (s[1:] != s[:-1]) | (u[1:] != u[:-1])
    result = np.zeros(order.size, dtype=bool)
    result[order[new_pair]] = True
    return result & (table.answer >= 0)


def workflow_votes(session: Session, workflow_id: int, config: WorkflowConfig) -> store.VoteTable:
    assert config.question is not None
    return store.all_votes(
        session,
        workflow_id,
        config.question.task,
        config.class_of_index(),
        config.class_of_label(),
        config.min_version(),
    )


def write_refit_results(
    session: Session,
    workflow_id: int,
    config: WorkflowConfig,
    subjects: IntArray,
    vote_subject: IntArray,
    posterior: npt.NDArray[np.float64],
    gold_items: list[tuple[int, int]],
) -> None:
    """Every subject of the fit recomputed at once: posterior, label, retirement, contested."""
    n_views = np.bincount(vote_subject, minlength=subjects.size)
    is_gold = np.zeros(subjects.size, dtype=bool)
    is_gold[[g[0] for g in gold_items]] = True
    reasons = answers.decide_retirement(posterior, n_views, is_gold, config.retirement_rule())
    labels = posterior.argmax(axis=1)
    existing = store.subject_statuses(session, workflow_id)
    now = utcnow()
    rows, events = [], []
    for i, subject_id in enumerate(subjects.tolist()):
        status, retired_label, old_reason = existing.get(subject_id, ("live", None, None))
        label = config.classes[int(labels[i])]
        reason = str(reasons[i])
        row = {
            "subject_id": subject_id,
            "posterior": posterior[i].tolist(),
            "label": label,
            "status": status,
            "reason": old_reason,
            "retired_at": None,
            "retired_label": retired_label,
        }
        if status == "live" and reason:
            row.update(status="retired", reason=reason, retired_at=now, retired_label=label)
            events.append(
                {
                    "workflow_id": workflow_id,
                    "subject_id": subject_id,
                    "reason": reason,
                    "posterior": row["posterior"],
                    "n_votes": int(n_views[i]),
                    "source": "refit",
                    "created_at": now,
                }
            )
        elif (
            status == "retired"
            and old_reason != answers.CLASSIFICATION_COUNT
            and label != retired_label
        ):
            row.update(status="contested")
        rows.append(row)
    store.write_subject_results(session, workflow_id, rows)
    store.insert_retirements(session, events)


def refit(sessions: sessionmaker[Session], workflow_id: int) -> RefitReport:
    """Re-learn every volunteer from everything stored, as one transaction per workflow.

    The question task: EM over all votes, a new skill snapshot, and every subject's posterior and
    retirement written under it in bulk (subjects whose votes arrived during the refit stay
    pending for the next apply). The drawing task: mark skills learned from gold boxes and by EM,
    a new mark snapshot, and every subject queued to be clustered again with it.
    """
    with sessions.begin() as session:
        if store.is_postgres(session):
            # One refit per workflow at a time, across every worker.
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": workflow_id})
        workflow = session.get(Workflow, workflow_id)
        if workflow is None or workflow.config is None:
            raise LookupError(f"workflow {workflow_id} is not configured")
        config = load_config(workflow.config)
        report = RefitReport(0, 0, 0, 0, 0, True)
        if config.question is not None:
            report = _refit_answers(session, workflow_id, config, bulk=config.drawing is None)
            levels.evaluate(session, workflow_id, config)  # every volunteer, on the new skills
        if config.drawing is not None:
            mark_snapshot = _refit_marks(session, workflow, config)
            session.execute(
                update(WorkflowSubject)
                .where(WorkflowSubject.workflow_id == workflow_id)
                .values(**store.pending_values())
            )
            report = replace(report, mark_snapshot_id=mark_snapshot)
        started = time.perf_counter()  # the commit of a large refit is a step of its own
    log.info(
        "refit of workflow %s: committed in %.2f s", workflow_id, time.perf_counter() - started
    )
    return report


def human_pool(session: Session, volunteer_ids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Which of these volunteers form the population prior: everyone but the machines.

    A machine volunteer votes on every subject, so pooled in it would dominate the population's
    skill, and every human the refit does not know yet would inherit the model's accuracy (on the
    synthetic sky a 90%-accurate model made a one-human retirement look safe, and retired wrong).
    """
    machines = store.machine_volunteer_ids(session)
    pool: npt.NDArray[np.bool_] = ~np.isin(volunteer_ids, machines)
    return pool


def _refit_answers(
    session: Session, workflow_id: int, config: WorkflowConfig, *, bulk: bool
) -> RefitReport:
    clock = _Clock(f"refit of workflow {workflow_id}")
    table = workflow_votes(session, workflow_id, config)
    clock.lap(f"read {table.subject_id.size:,} votes")
    keep = votes_that_count(table, config.repeats)
    classes = table.answer
    subjects, s = np.unique(table.subject_id[keep], return_inverse=True)
    volunteers, u = np.unique(table.volunteer_id[keep], return_inverse=True)
    gold = store.gold_labels(session, workflow_id)
    gold_pos = np.searchsorted(subjects, np.array(sorted(gold), dtype=np.int64))
    gold_items = [
        (pos, config.classes.index(gold[sid]))
        for pos, sid in zip(gold_pos, sorted(gold), strict=True)
        if pos < subjects.size and subjects[pos] == sid and gold[sid] in config.classes
    ]
    result = answers.fit(
        s,
        u,
        classes[keep],
        n_subjects=subjects.size,
        n_volunteers=volunteers.size,
        n_classes=len(config.classes),
        gold_subject=np.array([g[0] for g in gold_items], dtype=np.int64),
        gold_label=np.array([g[1] for g in gold_items], dtype=np.int64),
        prior_strength=config.priors.confusion_strength,
        class_prior=class_prior(config),
        pool=human_pool(session, volunteers),
    )
    clock.lap(f"EM ({result.n_iter} sweeps)")
    snapshot_id = store.save_snapshot(
        session,
        workflow_id,
        volunteers.astype(np.int64),
        result.skills.counts,
        result.skills.alpha,
        result.skills.class_prior,
        n_votes=int(keep.sum()),
        last_view_id=table.last_view_id,
        n_iter=result.n_iter,
        converged=result.converged,
    )
    clock.lap("snapshot saved")
    if bulk:
        write_refit_results(session, workflow_id, config, subjects, s, result.posterior, gold_items)
        clock.lap(f"{subjects.size:,} subjects written")
        store.mark_pending_after(session, workflow_id, table.last_view_id)
        clock.lap("newer votes left pending")
    return RefitReport(
        snapshot_id,
        int(keep.sum()),
        int(subjects.size),
        int(volunteers.size),
        result.n_iter,
        result.converged,
    )


def _refit_marks(session: Session, workflow: Workflow, config: WorkflowConfig) -> int:
    """Mark skills from gold boxes and EM over every stored mark; returns the mark snapshot."""
    assert config.drawing is not None
    views = store.workflow_views(session, workflow.id)
    kept: dict[tuple[int, int], int] = {}
    for classification_id, subject, volunteer, _ in views:  # ordered by created_at
        if config.repeats == "keep_last" or (subject, volunteer) not in kept:
            kept[(subject, volunteer)] = classification_id
    rows = store.workflow_marks(session, workflow.id, config.drawing.task)
    data = clusters.mark_input(config, rows, list(kept), set(kept.values()))
    everyone, local = np.unique(
        np.concatenate([data.mark_volunteer, data.view_volunteer]), return_inverse=True
    )
    n_marks = data.mark_volunteer.size
    gold = store.gold_boxes(session, workflow.id)
    group_of: dict[int, list[int]] = {}
    for g, (subject, _, _) in enumerate(data.groups):
        group_of.setdefault(subject, []).append(g)
    gold_box, gold_group = [], []
    for subject, boxes in gold.items():
        for box in boxes:
            for g in group_of.get(subject, []):
                gold_box.append([float(x) for x in box[:4]])
                gold_group.append(g)
    skills = marks.learn_skills(
        data.box,
        data.mark_group,
        local[:n_marks],
        data.view_group,
        local[n_marks:],
        n_volunteers=everyone.size,
        gold_boxes=np.array(gold_box, dtype=np.float64).reshape(-1, 4),
        gold_subject=np.array(gold_group, dtype=np.int64),
        gold_subjects=np.array([g for s in gold for g in group_of.get(s, [])], dtype=np.int64),
        pool=human_pool(session, everyone),
    )
    arrays = np.stack(
        [
            getattr(skills, name) if getattr(skills, name) is not None else np.zeros(everyone.size)
            for name in store.MARK_ARRAYS
        ]
    )
    population = {
        "p_fn": skills.pop_p_fn,
        "f": skills.pop_f,
        "p_fp": skills.pop_p_fp,
        "sigma": skills.pop_sigma,
        "obj_prior": skills.obj_prior,
        "object_rate": skills.object_rate,
    }
    return store.save_mark_snapshot(session, workflow.id, everyone, arrays, population)


def preview_retirement(
    session: Session, workflow: Workflow, config: WorkflowConfig, rule: answers.RetirementRule
) -> dict[str, Any]:
    """What a candidate rule would have done on the stored votes, replayed in arrival order with
    the current skills: subjects retired, classifications saved, and accuracy on gold subjects
    (scored as if they were not gold)."""
    if config.question is None:
        raise InputError("the workflow has no question task", field="question")
    table = workflow_votes(session, workflow.id, config)
    keep = votes_that_count(table, config.repeats)
    classes = table.answer
    order = np.lexsort(
        (table.classification_id[keep], table.created_us[keep], table.subject_id[keep])
    )
    subject = table.subject_id[keep][order]
    volunteer = table.volunteer_id[keep][order]
    answer = classes[keep][order]
    K = len(config.classes)
    if subject.size == 0:
        return {
            "subjects": 0,
            "would_retire": 0,
            "classifications": 0,
            "classifications_used": 0,
            "classifications_saved": 0,
            "gold_subjects_scored": 0,
            "accuracy_on_gold": None,
            "reasons": {},
        }
    volunteers, local = np.unique(volunteer, return_inverse=True)
    skills = skills_for(
        session, workflow.id, config, current_snapshot(session, workflow), volunteers
    )
    loglik = np.log(answers.confusion(skills))[local, :, answer]  # (V, K): log Θ_u[:, answer]
    new_subject = np.r_[True, subject[1:] != subject[:-1]]
    starts = np.flatnonzero(new_subject)
    group = np.cumsum(new_subject) - 1  # each vote's subject, 0..S-1
    running = np.cumsum(loglik, axis=0)
    before = np.vstack([np.zeros((1, K)), running])[starts]  # the sum before each subject begins
    log_post = running - before[group] + np.log(skills.class_prior)
    post = np.exp(log_post - log_post.max(axis=1, keepdims=True))
    post /= post.sum(axis=1, keepdims=True)
    n_views = np.arange(subject.size) - starts[group] + 1
    reasons = answers.decide_retirement(post, n_views, np.zeros(subject.size, dtype=bool), rule)
    hits = np.flatnonzero(reasons != answers.NOT_RETIRED)
    first = np.full(starts.size, -1)
    hit_groups, first_of_group = np.unique(group[hits], return_index=True)
    first[hit_groups] = hits[first_of_group]
    totals = np.diff(np.r_[starts, subject.size])
    retired = first >= 0
    used = np.where(retired, first - starts + 1, totals)
    gold = store.gold_labels(session, workflow.id)
    correct = scored = 0
    for g, sid in enumerate(subject[starts].tolist()):
        if retired[g] and gold.get(sid) in config.classes:
            scored += 1
            correct += int(config.classes[int(post[first[g]].argmax())] == gold[sid])
    return {
        "subjects": int(starts.size),
        "would_retire": int(retired.sum()),
        "classifications": int(subject.size),
        "classifications_used": int(used.sum()),
        "classifications_saved": int(subject.size - used.sum()),
        "gold_subjects_scored": scored,
        "accuracy_on_gold": (correct / scored) if scored else None,
        "reasons": {
            str(r): int(c)
            for r, c in zip(*np.unique(reasons[first[retired]], return_counts=True), strict=True)
        },
    }


def due_refits(session: Session) -> list[int]:
    """Workflows whose configured refit interval has passed since their last skill snapshot."""
    now = utcnow()
    due = []
    for workflow in session.query(Workflow).filter(Workflow.config.is_not(None)):
        interval = (workflow.config or {}).get("refit_interval_s")
        if not interval:
            continue
        last = None
        if workflow.skill_snapshot_id is not None:
            last = store.snapshot_time(session, workflow.skill_snapshot_id)
        if last is None or (now - as_utc(last)).total_seconds() >= float(interval):
            due.append(workflow.id)
    return due
