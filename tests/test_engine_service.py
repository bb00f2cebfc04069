"""The answer engine inside the service: posteriors, retirement, gold, refit, contested subjects,
and equality with the offline `gzx aggregate` on the same votes."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.models import Retirement
from app.offline_answers import aggregate_csv
from app.pipeline import InProcessDispatcher
from app.service import Service
from tests import payloads as p

WF = p.WORKFLOW


def config(**retirement: Any) -> dict[str, Any]:
    return {
        "classes": ["featured", "smooth"],
        "question": {
            "task": "T0",
            "answers": [
                {"index": 0, "label": "Featured", "class": "featured"},
                {"index": 1, "label": "Smooth", "class": "smooth"},
            ],
        },
        "retirement": {"min_views": 3, **retirement},
    }


def settle(service: Service) -> None:
    assert isinstance(service.dispatcher, InProcessDispatcher)
    assert service.dispatcher.wait_idle(30)


def simulate(
    seed: int = 1, n_subjects: int = 40, n_volunteers: int = 15
) -> list[tuple[int, int, int]]:
    """(subject, volunteer, answer) votes from volunteers of mixed skill; truth = subject % 2."""
    rng = np.random.default_rng(seed)
    accuracy = rng.choice([0.95, 0.85, 0.5, 0.2], size=n_volunteers, p=[0.5, 0.3, 0.1, 0.1])
    votes = []
    for s in range(n_subjects):
        for u in rng.choice(n_volunteers, size=7, replace=False):
            truth = s % 2
            answer = truth if rng.random() < accuracy[u] else 1 - truth
            votes.append((1000 + s, int(u) + 1, int(answer)))
    return votes


def post_votes(client: TestClient, votes: list[tuple[int, int, int]], first_id: int = 1) -> None:
    body = [p.classic(first_id + i, s, u, a) for i, (s, u, a) in enumerate(votes)]
    for start in range(0, len(body), 100):
        assert client.post("/v1/classifications", json=body[start : start + 100]).status_code == 200


def test_agreeing_votes_retire_a_subject_with_an_event(service: Service) -> None:
    """Three agreeing votes under a loose risk rule retire the subject, recorded as an event."""
    client = TestClient(service.app)
    client.put(f"/v1/workflows/{WF}", json=config(kind="risk", risk_bound=0.3))
    post_votes(client, [(77, 1, 0), (77, 2, 0)])
    settle(service)
    assert client.get(f"/v1/workflows/{WF}/subjects/77").json()["status"] == "live"
    post_votes(client, [(77, 3, 0)], first_id=10)
    settle(service)
    subject = client.get(f"/v1/workflows/{WF}/subjects/77").json()
    assert subject["status"] == "retired"
    assert subject["reason"] == "consensus"
    assert subject["label"] == "featured"
    assert abs(sum(subject["posterior"].values()) - 1) < 1e-12
    assert len(subject["history"]) == 4  # the prior, then after each of 3 votes
    with service.sessions() as session:
        events = session.scalars(select(Retirement)).all()
    assert [(e.subject_id, e.reason, e.n_votes) for e in events] == [(77, "consensus", 3)]


def test_the_cap_retires_as_classification_count(service: Service) -> None:
    """A split subject retires at the cap with Panoptes' classification_count reason."""
    client = TestClient(service.app)
    client.put(f"/v1/workflows/{WF}", json=config(kind="none", cap=4))
    post_votes(client, [(5, 1, 0), (5, 2, 1), (5, 3, 0), (5, 4, 1)])
    settle(service)
    subject = client.get(f"/v1/workflows/{WF}/subjects/5").json()
    assert (subject["status"], subject["reason"]) == ("retired", "classification_count")


def test_the_service_equals_gzx_aggregate_after_a_refit(service: Service, tmp_path: Path) -> None:
    """After a refit, every posterior the API serves equals the offline engine's on those votes."""
    client = TestClient(service.app)
    client.put(f"/v1/workflows/{WF}", json=config(kind="none"))
    votes = simulate()
    post_votes(client, votes)
    gold = {1000: "smooth", 1001: "featured", 1002: "smooth"}
    response = client.put(
        f"/v1/workflows/{WF}/gold",
        json={"subjects": [{"subject_id": s, "label": label} for s, label in gold.items()]},
    )
    assert response.status_code == 200 and response.json()["changed"] == 3
    settle(service)
    answers_csv, gold_csv, out = tmp_path / "a.csv", tmp_path / "g.csv", tmp_path / "post.csv"
    names = ["featured", "smooth"]
    with answers_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject", "volunteer", "answer"])
        writer.writerows((s, u, names[a]) for s, u, a in votes)
    with gold_csv.open("w", newline="") as handle:
        csv.writer(handle).writerows([("subject", "label"), *gold.items()])
    aggregate_csv(answers_csv, out, gold_path=gold_csv)
    with out.open() as handle:
        offline = {int(row["subject"]): row for row in csv.DictReader(handle)}
    for subject_id, row in offline.items():
        served = client.get(f"/v1/workflows/{WF}/subjects/{subject_id}").json()
        if abs(served["posterior"]["featured"] - 0.5) > 1e-9:  # an exact tie may go either way
            assert served["label"] == row["label"], (served["posterior"], row)
        for name in names:
            assert (
                abs(served["posterior"][name] - float(row[f"p_{name}"])) < 1e-6
            )  # the CSV has 6 decimals


def test_gold_teaches_a_volunteer_their_confusion_matrix(service: Service) -> None:
    """A volunteer who is always wrong on gold gets a matrix that says so, with intervals."""
    client = TestClient(service.app)
    client.put(f"/v1/workflows/{WF}", json=config(kind="none"))
    votes = [(2000 + s, 9, 1 - s % 2) for s in range(12)] + [
        (2000 + s, 8, s % 2) for s in range(12)
    ]
    post_votes(client, votes)
    gold = [{"subject_id": 2000 + s, "label": ["featured", "smooth"][s % 2]} for s in range(12)]
    assert client.put(f"/v1/workflows/{WF}/gold", json={"subjects": gold}).status_code == 200
    settle(service)
    bad = client.get(f"/v1/workflows/{WF}/volunteers/user:9").json()
    good = client.get(f"/v1/workflows/{WF}/volunteers/user:8").json()
    assert bad["confusion"][0][0] < 0.3 and good["confusion"][0][0] > 0.7
    assert (
        bad["confusion_lower_90"][0][0] <= bad["confusion"][0][0] <= bad["confusion_upper_90"][0][0]
    )
    assert good["gold_votes"] == 12
    assert good["information_per_vote_bits"] > 0.2


def test_a_refit_that_changes_its_mind_marks_the_subject_contested(service: Service) -> None:
    """Retired on two votes of unknown volunteers; gold then shows both are liars: contested."""
    client = TestClient(service.app)
    client.put(f"/v1/workflows/{WF}", json=config(kind="risk", risk_bound=0.3, min_views=2))
    post_votes(client, [(3000, 21, 0), (3000, 22, 0)])
    settle(service)
    assert client.get(f"/v1/workflows/{WF}/subjects/3000").json()["status"] == "retired"
    liars = [(3100 + s, u, 1 - s % 2) for s in range(15) for u in (21, 22)]
    post_votes(client, liars, first_id=100)
    gold = [{"subject_id": 3100 + s, "label": ["featured", "smooth"][s % 2]} for s in range(15)]
    client.put(f"/v1/workflows/{WF}/gold", json={"subjects": gold})
    settle(service)
    subject = client.get(f"/v1/workflows/{WF}/subjects/3000").json()
    assert subject["status"] == "contested"
    assert subject["label"] == "smooth"


def test_a_gold_upload_names_the_bad_field(service: Service) -> None:
    """An unknown label or a non-integer subject id gets 422 naming the entry."""
    client = TestClient(service.app)
    client.put(f"/v1/workflows/{WF}", json=config())
    bad_label = {"subjects": [{"subject_id": 1, "label": "spiral"}]}
    response = client.put(f"/v1/workflows/{WF}/gold", json=bad_label)
    assert response.status_code == 422 and response.json()["field"] == "subjects[0].label"
    csv_body = "subject,label\nabc,smooth\n"
    response = client.put(
        f"/v1/workflows/{WF}/gold", content=csv_body, headers={"content-type": "text/csv"}
    )
    assert response.status_code == 422 and response.json()["field"] == "line 2.subject_id"


def test_a_retirement_preview_counts_savings_and_gold_accuracy(service: Service) -> None:
    """A looser rule retires more subjects sooner; its accuracy on gold is reported."""
    client = TestClient(service.app)
    client.put(f"/v1/workflows/{WF}", json=config(kind="none"))
    votes = simulate(seed=3)
    post_votes(client, votes)
    gold = [{"subject_id": 1000 + s, "label": ["featured", "smooth"][s % 2]} for s in range(10)]
    client.put(f"/v1/workflows/{WF}/gold", json={"subjects": gold})
    settle(service)
    strict = client.post(
        f"/v1/workflows/{WF}/retirement-preview", json={"kind": "risk", "risk_bound": 1e-6}
    )
    loose = client.post(
        f"/v1/workflows/{WF}/retirement-preview", json={"kind": "risk", "risk_bound": 0.05}
    )
    assert strict.status_code == loose.status_code == 200, loose.text
    strict_body, loose_body = strict.json(), loose.json()
    assert loose_body["classifications"] == len(votes)
    assert loose_body["classifications_saved"] > strict_body["classifications_saved"] >= 0
    assert loose_body["would_retire"] >= strict_body["would_retire"]
    assert loose_body["gold_subjects_scored"] > 0
    assert 0.5 <= loose_body["accuracy_on_gold"] <= 1.0
    bad = client.post(f"/v1/workflows/{WF}/retirement-preview", json={"kind": "magic"})
    assert bad.status_code == 422 and bad.json()["field"] == "retirement.kind"
