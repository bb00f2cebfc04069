"""The online update's database round trips, counted, and what the merged reads must still do.

`update_subjects` runs for every subject a volunteer classifies; on PostgreSQL each statement is a
round trip of about a millisecond, far more than its arithmetic, so the number of statements is
its cost. These tests pin that number (so it cannot creep back up unnoticed) and check that the
merged reads keep the results of the separate ones they replaced: the posterior equals the one
`subject_history` computes on its own reads, and gold from experts and subject metadata still
lands, with an upload still winning.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from sqlalchemy import event, select, update
from sqlalchemy.engine import Engine

from app import aggregation, answers, store
from app.models import Gold, Volunteer, Workflow, WorkflowSubject
from app.parsing import parse_classification
from app.service import Service
from app.workflows import load_config
from tests import payloads as p

WF = p.WORKFLOW
CONFIG = {
    "classes": ["featured", "smooth"],
    "question": {
        "task": "T0",
        "answers": [
            {"index": 0, "label": "Featured", "class": "featured"},
            {"index": 1, "label": "Smooth", "class": "smooth"},
        ],
    },
    "retirement": {"kind": "risk", "risk_bound": 0.05, "min_views": 3},
}
# Statements `update_subjects` sends for one question-task subject once the skill snapshot is
# cached: the subject's status, metadata and gold (with the snapshot's time); its votes with the
# experts' answers and the voters' gold answers since the snapshot; the two writes. It was 9.
STATEMENTS_PER_UPDATE = 4


@contextmanager
def counted(engine: Engine) -> Iterator[list[str]]:
    """The SQL statements sent through `engine` inside the block (an executemany counts once)."""
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


def store_votes(service: Service, classifications: list[dict[str, Any]]) -> None:
    with service.sessions.begin() as session:
        store.record_classifications(
            session, [parse_classification(c) for c in classifications], ip_salt="salt"
        )


def configure(service: Service) -> None:
    with service.sessions.begin() as session:
        session.add(Workflow(id=WF, config=CONFIG))


def update_one(service: Service, subject_id: int) -> tuple[dict[str, Any], list[str]]:
    """One subject's update in its own transaction; its state and the statements it sent."""
    with service.sessions.begin() as session:
        workflow = session.get(Workflow, WF)
        assert workflow is not None and workflow.config is not None
        config = load_config(workflow.config)
        with counted(service.engine) as statements:
            (state,) = aggregation.update_subjects(session, workflow, config, [subject_id])
    return state, statements


def test_one_subject_update_sends_few_statements_and_keeps_its_posterior(
    service: Service,
) -> None:
    """After a refit, with gold answers stored since it, one subject's update sends at most
    STATEMENTS_PER_UPDATE statements (the first one also reads the snapshot into the cache),
    and its posterior is the last row of the trajectory computed from separate reads."""
    configure(service)
    votes = [(200 + s, u, (s + (u % 4 == 0)) % 2) for s in range(6) for u in range(1, 9)]
    store_votes(service, [p.classic(i + 1, s, u, a) for i, (s, u, a) in enumerate(votes)])
    with service.sessions.begin() as session:
        store.upsert_gold(session, WF, {200: "featured", 201: "smooth"}, source="upload")
    aggregation.refit(service.sessions, WF)
    later = [(202, 9, 1), (202, 10, 0), (200, 9, 1), (201, 10, 1)]  # gold answers after the refit
    store_votes(service, [p.classic(100 + i, s, u, a) for i, (s, u, a) in enumerate(later)])

    first, cold = update_one(service, 202)
    again, warm = update_one(service, 202)
    assert len(warm) <= STATEMENTS_PER_UPDATE, warm
    assert len(cold) <= STATEMENTS_PER_UPDATE + 1, cold  # + the snapshot's arrays
    assert first["posterior"] == again["posterior"]
    assert first["n_views"] == 10
    with service.sessions() as session:
        workflow = session.get(Workflow, WF)
        assert workflow is not None and workflow.config is not None
        history = aggregation.subject_history(session, workflow, load_config(workflow.config), 202)
        row = session.get(WorkflowSubject, (WF, 202))
        assert row is not None and not row.pending
    assert len(history) == 11
    assert max(abs(a - b) for a, b in zip(history[-1], first["posterior"], strict=True)) < 1e-12
    assert row.posterior == first["posterior"]


def test_a_batch_writes_its_states_in_a_statement_per_shape(service: Service) -> None:
    """A batch of subjects is read in the same few statements as one subject, and written with
    one executemany per set of fields (retiring subjects carry more), not one UPDATE each."""
    configure(service)
    votes = [(300 + s, u, s % 2) for s in range(8) for u in range(1, 2 + s)]  # 1..8 votes
    store_votes(service, [p.classic(i + 1, s, u, a) for i, (s, u, a) in enumerate(votes)])
    with service.sessions.begin() as session:
        workflow = session.get(Workflow, WF)
        assert workflow is not None and workflow.config is not None
        with counted(service.engine) as statements:
            states = aggregation.update_subjects(
                session, workflow, load_config(workflow.config), list(range(300, 308))
            )
    retired = [s["subject_id"] for s in states if s.get("status") == "retired"]
    assert retired and len(retired) < 8  # both shapes of state are in the batch
    updates = [s for s in statements if s.lstrip().upper().startswith("UPDATE WORKFLOW_SUBJECTS")]
    assert len(updates) == 2
    inserts = [s for s in statements if "INSERT INTO retirements" in s]
    assert len(inserts) <= 1  # the retirement events, flushed together
    assert len(statements) <= STATEMENTS_PER_UPDATE + 1 + len(inserts)
    with service.sessions() as session:
        rows = session.scalars(
            select(WorkflowSubject).where(WorkflowSubject.subject_id.in_(range(300, 308)))
        ).all()
    by_id = {r.subject_id: r for r in rows}
    for state in states:
        row = by_id[state["subject_id"]]
        assert (row.n_views, row.posterior, row.pending) == (
            state["n_views"],
            state["posterior"],
            False,
        )
        assert row.status == state.get("status", "live")


def test_expert_and_metadata_gold_still_land_and_an_upload_still_wins(service: Service) -> None:
    """The experts' answers now come with the votes and the metadata with the subject's status:
    an expert's gold-standard answer (even from an excluded volunteer) and a training subject's
    feedback answer become platform gold and clamp the posterior; uploaded gold is kept."""
    configure(service)
    crowd = [(s, u, 0) for s in (400, 401, 402) for u in range(1, 5)]
    body = [p.classic(i + 1, s, u, a) for i, (s, u, a) in enumerate(crowd)]
    for cid, subject in ((50, 400), (51, 402)):  # an expert says "smooth" on 400 and 402
        expert = p.classic(cid, subject, 99, 1)
        expert["gold_standard"] = True
        expert["expert_classifier"] = "expert"
        body.append(expert)
    store_votes(service, body)
    training = p.event(p.classic(60, 401, 5, 0))
    training["linked"]["subjects"][0]["metadata"] = {
        "#training_subject": "true",
        "#feedback_1_answer": "1",
    }
    with service.sessions.begin() as session:
        store.record_classifications(
            session,
            [parse_classification(training["data"], linked=training["linked"])],
            ip_salt="salt",
        )
        store.upsert_gold(session, WF, {402: "featured"}, source="upload")
        session.execute(update(Volunteer).where(Volunteer.key == "user:99").values(excluded=True))
    states = {s: update_one(service, s)[0] for s in (400, 401, 402)}
    with service.sessions() as session:
        gold = {g.subject_id: (g.label, g.source) for g in session.scalars(select(Gold))}
    assert gold == {
        400: ("smooth", "platform"),
        401: ("smooth", "platform"),
        402: ("featured", "upload"),
    }
    assert states[400]["posterior"] == [0.0, 1.0]
    assert states[401]["posterior"] == [0.0, 1.0]
    assert states[402]["posterior"] == [1.0, 0.0]
    assert states[400]["n_classifications"] == 4  # the excluded expert's vote is not counted
    assert states[401]["n_classifications"] == 5
    assert all(s.get("status", "live") == "live" for s in states.values())  # gold never retires


def test_gold_found_in_the_batch_teaches_the_voters_of_the_rest_of_the_batch(
    service: Service,
) -> None:
    """An expert's answer makes subject 702 gold during the update of a batch that also holds
    703: the voters' answers on 702 count in their skills for 703 at once (the gold answers are
    read again after the new label), so 703's posterior equals the one computed afterwards."""
    configure(service)
    crowd = [(702, u, 0) for u in (1, 2, 3)] + [(703, u, 0) for u in (1, 2, 3)]
    body = [p.classic(i + 1, s, u, a) for i, (s, u, a) in enumerate(crowd)]
    expert = p.classic(50, 702, 99, 1)
    expert["gold_standard"] = True
    body.append(expert)
    store_votes(service, body)
    with service.sessions.begin() as session:
        workflow = session.get(Workflow, WF)
        assert workflow is not None and workflow.config is not None
        config = load_config(workflow.config)
        states = aggregation.update_subjects(session, workflow, config, [702, 703])
    with service.sessions() as session:
        workflow = session.get(Workflow, WF)
        assert workflow is not None
        history = aggregation.subject_history(session, workflow, config, 703)
        uniform = answers.subject_posteriors(
            np.zeros(3, dtype=np.int64),
            np.arange(3),
            np.zeros(3, dtype=np.int64),
            1,
            aggregation.skills_for(session, WF, config, None, np.array([1, 2, 3]), gold_votes=[]),
        )
    assert states[0]["posterior"] == [0.0, 1.0]
    assert max(abs(a - b) for a, b in zip(history[-1], states[1]["posterior"], strict=True)) < 1e-12
    assert abs(states[1]["posterior"][0] - float(uniform[0, 0])) > 1e-6  # the gold mattered
