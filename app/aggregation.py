"""Applying stored classifications to subjects: the step every job and the sweeper run.

A subject's state is a pure function of its stored classifications and the workflow config, so
applying is idempotent and order-independent: duplicate deliveries, retried jobs and crashed
workers cannot change the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app import store
from app.models import Workflow
from app.workflows import WorkflowConfig, load_config


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
    kept = set(id(v) for v in chosen.values())
    return [v for v in usable if id(v) in kept]


def class_of_vote(vote: store.VoteRow, config: WorkflowConfig) -> int | None:
    """The class a vote's answer maps to (by index, else by label), or None."""
    if config.question is None:
        return None
    if vote.answer_value is not None:
        return config.class_of_index().get(vote.answer_value)
    if vote.answer_label is not None:
        return config.class_of_label().get(vote.answer_label)
    return None


def update_subjects(
    session: Session, workflow_id: int, config: WorkflowConfig, subject_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """Recompute the given subjects from all their stored classifications."""
    task = config.question.task if config.question else None
    votes = store.subject_votes(session, workflow_id, subject_ids, task)
    raw_count: dict[int, int] = {}
    seen_classification: set[int] = set()
    for vote in votes:
        if vote.classification_id not in seen_classification:
            seen_classification.add(vote.classification_id)
            raw_count[vote.subject_id] = raw_count.get(vote.subject_id, 0) + 1
    unique_votes = _first_answer_per_classification(votes)
    kept = select_votes(unique_votes, config)
    n_classes = len(config.classes)
    states = {
        s: {
            "subject_id": s,
            "n_classifications": raw_count.get(s, 0),
            "n_views": 0,
            "counts": [0] * n_classes,
        }
        for s in subject_ids
    }
    for vote in kept:
        state = states[vote.subject_id]
        state["n_views"] += 1
        k = class_of_vote(vote, config)
        if k is not None:
            state["counts"][k] += 1
    result = list(states.values())
    store.save_subject_states(session, workflow_id, result)
    return result


def _first_answer_per_classification(votes: Sequence[store.VoteRow]) -> list[store.VoteRow]:
    seen: set[int] = set()
    unique = []
    for vote in votes:
        if vote.classification_id not in seen:
            seen.add(vote.classification_id)
            unique.append(vote)
    return unique


def apply_pending(sessions: sessionmaker[Session], workflow_id: int, batch_size: int = 500) -> int:
    """Apply every pending subject of a workflow, a batch per transaction; returns how many."""
    total = 0
    while True:
        with sessions.begin() as session:
            workflow = session.get(Workflow, workflow_id)
            if workflow is None or workflow.config is None:
                return total
            config = load_config(workflow.config)
            subject_ids = store.claim_pending_subjects(session, workflow_id, batch_size)
            if not subject_ids:
                return total
            update_subjects(session, workflow_id, config, subject_ids)
        total += len(subject_ids)
