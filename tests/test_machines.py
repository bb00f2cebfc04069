"""Machine volunteers through the HTTP API, on the real PostgreSQL and on SQLite.

A model's predictions enter as classifications of `ml:<model>@<version>`; subjects of its training
export are kept but never voted; a repeat changes nothing; its skill is learned on gold like
anyone's, so its vote moves a posterior exactly as a volunteer of that measured skill would;
boxes become marks and clusters; every bad body is a 4xx naming the field; calibration compares
its scores with gold."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from app import machines
from app.db import migrate
from app.models import (
    Answer,
    Classification,
    MachineModel,
    Mark,
    Prediction,
    Subject,
    View,
    Volunteer,
    WorkflowSubject,
)
from app.pipeline import InProcessDispatcher
from app.service import Service, build_service
from app.settings import Settings
from tests import payloads as p
from tests import strategies

WF = p.WORKFLOW
CLASSES = ["featured", "smooth"]
TABLES = (
    Classification,
    View,
    Answer,
    Mark,
    Volunteer,
    Subject,
    WorkflowSubject,
    Prediction,
    MachineModel,
)


def question_config(**retirement: Any) -> dict[str, Any]:
    """A question-only workflow with a fixed, even class prior (so a posterior can be computed
    by hand from the confusion matrices the API serves) and, unless told, no retirement."""
    return {
        "classes": CLASSES,
        "question": {
            "task": "T0",
            "answers": [
                {"index": 0, "label": "Featured", "class": "featured"},
                {"index": 1, "label": "Smooth", "class": "smooth"},
            ],
        },
        "priors": {"class_prior": {"featured": 0.5, "smooth": 0.5}},
        "retirement": retirement or {"kind": "none"},
    }


def settle(service: Service) -> None:
    assert isinstance(service.dispatcher, InProcessDispatcher)
    assert service.dispatcher.wait_idle(30)


def configure(client: TestClient, config: dict[str, Any], workflow_id: int = WF) -> None:
    response = client.put(f"/v1/workflows/{workflow_id}", json=config)
    assert response.status_code == 200, response.text


def post_votes(
    client: TestClient,
    votes: list[tuple[int, int, int]],
    first_id: int = 1,
    workflow_id: int = WF,
) -> None:
    """Human votes (subject, user, answer index) as classic classifications."""
    body = [
        p.classic(first_id + i, s, u, a, workflow_id=workflow_id)
        for i, (s, u, a) in enumerate(votes)
    ]
    for start in range(0, len(body), 100):
        response = client.post("/v1/classifications", json=body[start : start + 100])
        assert response.status_code == 200, response.text


def predictions_body(
    predictions: list[dict[str, Any]], model: str = "zoobot", version: str = "1", **extra: Any
) -> dict[str, Any]:
    return {"model": model, "version": version, "predictions": predictions, **extra}


def probabilities(featured: float) -> dict[str, float]:
    return {"featured": featured, "smooth": 1.0 - featured}


def post_predictions(client: TestClient, body: Any, workflow_id: int = WF) -> Any:
    return client.post(f"/v1/workflows/{workflow_id}/predictions", json=body)


def posterior(client: TestClient, subject_id: int) -> dict[str, float]:
    response = client.get(f"/v1/workflows/{WF}/subjects/{subject_id}")
    assert response.status_code == 200, response.text
    return dict(response.json()["posterior"])


def row_counts(service: Service) -> dict[str, int]:
    with service.sessions() as session:
        return {
            t.__tablename__: int(session.scalar(select(func.count()).select_from(t)) or 0)
            for t in TABLES
        }


def run_export(client: TestClient, rules: dict[str, Any], workflow_id: int = WF) -> str:
    response = client.post(f"/v1/workflows/{workflow_id}/exports", json=rules)
    assert response.status_code == 202, response.text
    export_id = str(response.json()["id"])
    for _ in range(400):
        found = client.get(f"/v1/exports/{export_id}").json()
        if found["status"] in ("done", "failed"):
            assert found["status"] == "done", found["error"]
            return export_id
        time.sleep(0.05)
    raise AssertionError("the export did not finish")


EVERY_SUBJECT = {"retired_only": False, "answer_bounds": [0.5, 0.5], "val_fraction": 0.3}


# --- entering predictions ------------------------------------------------------------------------


def test_predictions_enter_as_votes_of_a_machine_volunteer_and_move_posteriors(
    service: Service,
) -> None:
    """A post creates `ml:<model>@<version>` (kind machine), stores one classification per
    subject with a deterministic negative id, makes unknown subjects, and its most probable class
    pulls the posterior as a vote."""
    client = TestClient(service.app)
    configure(client, question_config())
    post_votes(client, [(10, 1, 1)])
    settle(service)
    before = posterior(client, 10)
    body = predictions_body(
        [
            {"subject_id": 10, "probabilities": probabilities(0.9)},
            {"subject_id": 12, "probabilities": probabilities(0.2)},
        ]
    )
    response = post_predictions(client, body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["volunteer"] == "ml:zoobot@1"
    assert (answer["accepted"], answer["in_training"], answer["duplicates"]) == (2, 0, 0)
    settle(service)
    after = posterior(client, 10)
    # Before any refit both are average volunteers: the machine's "featured" cancels the
    # human's "smooth" exactly.
    assert before["featured"] < 0.5
    assert after["featured"] == pytest.approx(0.5, abs=1e-12)
    new = client.get(f"/v1/workflows/{WF}/subjects/12").json()
    assert new["classifications"] == 1 and new["label"] == "smooth"
    volunteer = client.get(f"/v1/workflows/{WF}/volunteers/ml:zoobot@1").json()
    assert (volunteer["kind"], volunteer["votes"]) == ("machine", 2)
    assert volunteer["volunteer_id"] == answer["volunteer_id"]
    listed = client.get(f"/v1/workflows/{WF}/volunteers").json()["items"]
    assert {(v["key"], v["kind"]) for v in listed} == {
        ("user:1", "user"),
        ("ml:zoobot@1", "machine"),
    }
    with service.sessions() as session:
        stored = session.scalars(select(Prediction).order_by(Prediction.subject_id)).all()
        ids = [s.classification_id for s in stored]
        assert ids == [machines.classification_id(WF, "ml:zoobot@1", s) for s in (10, 12)]
        assert all(i is not None and i < 0 for i in ids)
        sources = session.scalars(select(Classification.source).where(Classification.id < 0))
        assert list(sources) == ["machine", "machine"]
        assert session.get(Subject, 12) is not None
        values = session.execute(
            select(Answer.subject_id, Answer.value).where(Answer.classification_id < 0)
        ).all()
        assert sorted(values) == [(10, 0), (12, 1)]


def test_a_repeated_post_changes_nothing(service: Service) -> None:
    """The same model version on the same subjects again (even with other numbers) is a
    duplicate: the same posteriors, the same rows, the first prediction kept."""
    client = TestClient(service.app)
    configure(client, question_config())
    post_votes(client, [(10, 1, 1), (11, 2, 0)])
    first = [
        {"subject_id": 10, "probabilities": probabilities(0.9)},
        {"subject_id": 11, "probabilities": probabilities(0.3)},
    ]
    assert post_predictions(client, predictions_body(first)).json()["accepted"] == 2
    settle(service)
    before = {s: posterior(client, s) for s in (10, 11)}
    counts = row_counts(service)
    changed = [
        {"subject_id": 10, "probabilities": probabilities(0.1)},
        {"subject_id": 11, "probabilities": probabilities(0.99)},
    ]
    again = post_predictions(client, predictions_body(changed))
    assert again.status_code == 200, again.text
    assert (again.json()["accepted"], again.json()["duplicates"]) == (0, 2)
    settle(service)
    assert {s: posterior(client, s) for s in (10, 11)} == before
    assert row_counts(service) == counts
    with service.sessions() as session:
        kept = session.scalar(select(Prediction.probabilities).where(Prediction.subject_id == 10))
    assert kept == probabilities(0.9)


def test_a_new_model_version_is_a_new_volunteer(service: Service) -> None:
    """Version 2 of the same model votes again on the same subject, as another volunteer."""
    client = TestClient(service.app)
    configure(client, question_config())
    one = post_predictions(
        client, predictions_body([{"subject_id": 5, "probabilities": probabilities(0.8)}])
    ).json()
    two = post_predictions(
        client,
        predictions_body([{"subject_id": 5, "probabilities": probabilities(0.8)}], version="2"),
    ).json()
    assert one["volunteer_id"] != two["volunteer_id"]
    assert (two["volunteer"], two["accepted"]) == ("ml:zoobot@2", 1)
    settle(service)
    assert client.get(f"/v1/workflows/{WF}/subjects/5").json()["classifications"] == 2


def test_subjects_of_the_training_export_are_stored_but_never_voted(service: Service) -> None:
    """Every subject of the export's manifest (train and val) and of `training_subjects` gets a
    prediction row with in_training and no classification; the others vote. The export is fixed
    by the first post (another is a 409), must exist, be done and belong to the workflow."""
    client = TestClient(service.app)
    configure(client, question_config())
    post_votes(client, [(s, 1, s % 2) for s in range(20, 30)])
    settle(service)
    export_id = run_export(client, EVERY_SUBJECT)
    manifest = client.get(f"/v1/exports/{export_id}/files/manifest.json").json()
    in_export = manifest["subjects"]["train"] + manifest["subjects"]["val"]
    assert sorted(in_export) == list(range(20, 30)) and manifest["subjects"]["val"]
    before = {s: posterior(client, s) for s in range(20, 30)}
    items = [{"subject_id": s, "probabilities": probabilities(0.95)} for s in range(20, 30)]
    items += [{"subject_id": s, "probabilities": probabilities(0.95)} for s in (40, 41)]
    body = predictions_body(items, export_id=export_id, training_subjects=[41])
    response = post_predictions(client, body)
    assert response.status_code == 200, response.text
    assert (response.json()["accepted"], response.json()["in_training"]) == (1, 11)
    settle(service)
    assert {s: posterior(client, s) for s in range(20, 30)} == before
    key = "ml:zoobot@1"
    with service.sessions() as session:
        machine = session.scalar(select(Volunteer.id).where(Volunteer.key == key))
        voted = session.scalars(select(View.subject_id).where(View.volunteer_id == machine))
        assert list(voted) == [40]
        rows = session.scalars(select(Prediction).where(Prediction.in_training.is_(True))).all()
        assert sorted(r.subject_id for r in rows) == [*range(20, 30), 41]
        assert all(r.classification_id is None for r in rows)
        model = session.scalar(select(MachineModel))
        assert model is not None and model.export_id == export_id
    listed = client.get(f"/v1/workflows/{WF}/machines").json()["machines"]
    assert [
        (m["key"], m["export_id"], m["training_subjects"], m["predictions"], m["votes"])
        for m in listed
    ] == [(key, export_id, 11, 12, 1)]
    assert listed[0]["in_training"] == 11
    calibration = f"/v1/workflows/{WF}/machines/{key}/calibration"
    assert client.get(calibration).json()["predictions"] == 1
    assert client.get(calibration, params={"include_training": True}).json()["predictions"] == 12

    other = run_export(client, EVERY_SUBJECT)
    conflict = post_predictions(
        client,
        predictions_body(
            [{"subject_id": 50, "probabilities": probabilities(0.5)}], export_id=other
        ),
    )
    assert (conflict.status_code, conflict.json()["field"]) == (409, "export_id")
    late = post_predictions(
        client,
        predictions_body(
            [{"subject_id": 51, "probabilities": probabilities(0.5)}],
            export_id=export_id,
            training_subjects=[40],
        ),
    )
    assert (late.status_code, late.json()["field"]) == (409, "training_subjects")
    unknown = post_predictions(
        client,
        predictions_body(
            [{"subject_id": 50, "probabilities": probabilities(0.5)}],
            version="2",
            export_id=str(uuid.uuid4()),
        ),
    )
    assert (unknown.status_code, unknown.json()["field"]) == (422, "export_id")
    configure(client, question_config(), workflow_id=WF + 1)
    post_votes(client, [(90, 1, 0)], first_id=900, workflow_id=WF + 1)
    settle(service)
    foreign = run_export(client, EVERY_SUBJECT, workflow_id=WF + 1)
    elsewhere = post_predictions(
        client,
        predictions_body(
            [{"subject_id": 50, "probabilities": probabilities(0.5)}],
            version="3",
            export_id=foreign,
        ),
    )
    assert (elsewhere.status_code, elsewhere.json()["field"]) == (422, "export_id")
    assert "belongs to workflow" in elsewhere.json()["message"]


def test_two_concurrent_posts_of_the_same_predictions_enter_them_once(pg_service: Service) -> None:
    """Two requests racing with the same first post of a model version (on PostgreSQL): one
    registers the model and enters every prediction, the other finds them all duplicates."""
    client = TestClient(pg_service.app)
    configure(client, question_config())
    items = [{"subject_id": s, "probabilities": probabilities(0.7)} for s in range(1, 201)]
    body = predictions_body(items, training_subjects=[1, 2])
    barrier = threading.Barrier(2)
    answers: list[dict[str, Any]] = []

    def post() -> None:
        barrier.wait()
        response = post_predictions(TestClient(pg_service.app), body)
        assert response.status_code == 200, response.text
        answers.append(response.json())

    threads = [threading.Thread(target=post) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 2
    assert sorted(a["accepted"] for a in answers) == [0, 198]
    assert sorted(a["duplicates"] for a in answers) == [0, 200]
    assert sum(a["in_training"] for a in answers) == 2
    assert answers[0]["volunteer_id"] == answers[1]["volunteer_id"]
    counts = row_counts(pg_service)
    assert (counts["classifications"], counts["predictions"], counts["machine_models"]) == (
        198,
        200,
        1,
    )


def test_posting_needs_the_ingest_scope_and_reading_the_read_scope(tmp_path: Path) -> None:
    """With credentials configured, a read token cannot post predictions (403) and an ingest
    token can; the machine list and calibration want the read scope."""
    url = f"sqlite:///{tmp_path / 'scopes.db'}"
    migrate(url)
    service = build_service(
        Settings(
            database_url=url,
            export_dir=tmp_path / "exports",
            sweep_interval_s=3600,
            tokens="adm=admin;ing=ingest;rd=read",
        )
    )
    try:
        client = TestClient(service.app)
        admin = {"Authorization": "Bearer adm"}
        assert client.put(f"/v1/workflows/{WF}", json=question_config(), headers=admin).is_success
        body = predictions_body([{"subject_id": 1, "probabilities": probabilities(0.6)}])
        url_post = f"/v1/workflows/{WF}/predictions"
        assert client.post(url_post, json=body).status_code == 401
        read = {"Authorization": "Bearer rd"}
        assert client.post(url_post, json=body, headers=read).status_code == 403
        ingest = {"Authorization": "Bearer ing"}
        assert client.post(url_post, json=body, headers=ingest).status_code == 200
        listing = f"/v1/workflows/{WF}/machines"
        assert client.get(listing, headers=ingest).status_code == 403
        assert client.get(listing, headers=read).json()["machines"][0]["votes"] == 1
        calibration = f"{listing}/ml:zoobot@1/calibration"
        assert client.get(calibration, headers=read).status_code == 200
    finally:
        service.close()


# --- skills learned like anyone's --------------------------------------------------------------


def crowd(
    truth: dict[int, int], seed: int, machine_accuracy: dict[str, float | None]
) -> tuple[list[tuple[int, int, int]], dict[str, list[dict[str, Any]]]]:
    """Three human votes per subject from eight volunteers of mixed skill, and for each machine
    version a prediction per subject that is right with its accuracy (a machine of accuracy None
    always says "featured")."""
    rng = np.random.default_rng(seed)
    accuracy = [0.9, 0.85, 0.8, 0.75, 0.9, 0.7, 0.85, 0.8]
    votes = []
    for s, k in truth.items():
        for u in rng.choice(8, size=3, replace=False):
            votes.append((s, int(u) + 1, k if rng.random() < accuracy[u] else 1 - k))
    predicted: dict[str, list[dict[str, Any]]] = {}
    for version, right in machine_accuracy.items():
        items = []
        for s, k in truth.items():
            answer = 0 if right is None else (k if rng.random() < right else 1 - k)
            p_featured = 0.85 if answer == 0 else 0.15
            items.append({"subject_id": s, "probabilities": probabilities(p_featured)})
        predicted[version] = items
    return votes, predicted


def served_confusion(client: TestClient, key: str) -> np.ndarray:
    response = client.get(f"/v1/workflows/{WF}/volunteers/{key}")
    assert response.status_code == 200, response.text
    return np.array(response.json()["confusion"])


def by_hand(
    subject_votes: list[tuple[str, int]], theta: dict[str, np.ndarray], prior: np.ndarray
) -> np.ndarray:
    """P(truth | votes) ∝ π_k Π_votes Θ_u[k, answer], computed here from the served matrices."""
    log_post = np.log(prior).copy()
    for key, answer in subject_votes:
        log_post += np.log(theta[key][:, answer])
    post = np.exp(log_post - log_post.max())
    return np.asarray(post / post.sum())


def learn(
    service: Service,
    truth: dict[int, int],
    n_gold: int,
    machine_accuracy: dict[str, float | None],
) -> tuple[TestClient, dict[int, list[tuple[str, int]]]]:
    """Humans vote, gold is uploaded, machines post, a refit learns everyone; returns every
    subject's votes as (volunteer key, answer)."""
    client = TestClient(service.app)
    configure(client, question_config())
    votes, predicted = crowd(truth, 3, machine_accuracy)
    post_votes(client, votes)
    gold = [{"subject_id": s, "label": CLASSES[k]} for s, k in list(truth.items())[:n_gold]]
    assert client.put(f"/v1/workflows/{WF}/gold", json={"subjects": gold}).status_code == 200
    for version, items in predicted.items():
        response = post_predictions(client, predictions_body(items, version=version))
        assert response.status_code == 200 and response.json()["accepted"] == len(truth)
    settle(service)
    refit = client.post(f"/v1/workflows/{WF}/refit")
    assert refit.status_code == 200, refit.text
    settle(service)
    by_subject: dict[int, list[tuple[str, int]]] = {s: [] for s in truth}
    for s, u, a in votes:
        by_subject[s].append((f"user:{u}", a))
    for version, items in predicted.items():
        for item in items:
            answer = 0 if item["probabilities"]["featured"] > 0.5 else 1
            by_subject[item["subject_id"]].append((f"ml:zoobot@{version}", answer))
    return client, by_subject


def test_predictions_change_posteriors_as_a_volunteer_of_their_measured_skill(
    service: Service, tmp_path: Path
) -> None:
    """After a refit with gold, every non-gold posterior the API serves equals π Π Θ_u[:, answer]
    computed here from the served confusion matrices, the machine's learned one included; the
    machine's vote moves it; the machine shows in the skills export with kind machine."""
    truth = {100 + i: i % 2 for i in range(40)}
    client, votes = learn(service, truth, 20, {"1": 0.9})
    machine = client.get(f"/v1/workflows/{WF}/volunteers/ml:zoobot@1").json()
    assert (machine["kind"], machine["gold_votes"]) == ("machine", 20)
    assert min(machine["confusion"][0][0], machine["confusion"][1][1]) > 0.7
    keys = {key for subject in votes.values() for key, _ in subject}
    theta = {key: served_confusion(client, key) for key in keys}
    prior = np.array([0.5, 0.5])
    moved = 0.0
    for s in list(truth)[20:]:
        served = posterior(client, s)
        expected = by_hand(votes[s], theta, prior)
        assert served["featured"] == pytest.approx(expected[0], abs=1e-9), s
        humans_only = by_hand([v for v in votes[s] if v[0].startswith("user:")], theta, prior)
        moved = max(moved, abs(expected[0] - humans_only[0]))
    assert moved > 0.2
    export_id = run_export(client, EVERY_SUBJECT)
    skills = client.get(f"/v1/exports/{export_id}/files/skills.csv").text
    rows = {row["key"]: row for row in csv.DictReader(io.StringIO(skills))}
    assert rows["ml:zoobot@1"]["kind"] == "machine"
    assert float(rows["ml:zoobot@1"]["confusion_featured_featured"]) == pytest.approx(
        machine["confusion"][0][0], abs=1e-6
    )


def test_a_machine_mostly_wrong_on_gold_barely_moves_posteriors(service: Service) -> None:
    """On mostly-smooth subjects, a machine that always says "featured" is wrong on most gold:
    its learned matrix has nearly equal rows (no information per vote) and its vote shifts a
    log-odds by little, while a good machine's shifts it by a lot."""
    truth = {200 + i: 0 if i % 5 == 0 else 1 for i in range(40)}
    client, votes = learn(service, truth, 20, {"bad": None, "good": 0.9})
    bad = client.get(f"/v1/workflows/{WF}/volunteers/ml:zoobot@bad").json()
    good = client.get(f"/v1/workflows/{WF}/volunteers/ml:zoobot@good").json()
    wrong = sum(1 for s, k in list(truth.items())[:20] if k != 0)
    assert wrong >= 15
    assert bad["information_per_vote_bits"] < 0.05 < 0.3 < good["information_per_vote_bits"]
    theta_bad, theta_good = np.array(bad["confusion"]), np.array(good["confusion"])
    shift_bad = abs(math.log(theta_bad[0, 0] / theta_bad[1, 0]))
    shift_good = min(
        abs(math.log(theta_good[0, 0] / theta_good[1, 0])),
        abs(math.log(theta_good[0, 1] / theta_good[1, 1])),
    )
    assert shift_bad < 0.15 < 1.5 < shift_good
    keys = {key for subject in votes.values() for key, _ in subject}
    theta = {key: served_confusion(client, key) for key in keys}
    prior = np.array([0.5, 0.5])
    for s in list(truth)[20:]:
        without_bad = by_hand([v for v in votes[s] if v[0] != "ml:zoobot@bad"], theta, prior)
        assert abs(posterior(client, s)["featured"] - without_bad[0]) < 0.02


# --- boxes -----------------------------------------------------------------------------------


def test_boxes_at_or_above_the_threshold_become_marks_and_join_clusters(service: Service) -> None:
    """A box of a rectangle tool's category is a rectangle mark, one of a point tool's category a
    point at its centre; boxes under the threshold are kept in the prediction but drawn by no one;
    the machine's marks join the humans' clusters."""
    client = TestClient(service.app)
    configure(client, p.clump_config())
    humans = [p.classic(k, 300, k, 0, boxes=[(50, 50, 20, 30)], tool=1) for k in (1, 2)]
    assert client.post("/v1/classifications", json=humans).status_code == 200
    boxes = [
        {"x1": 10, "y1": 10, "x2": 30, "y2": 30, "score": 0.9, "category": "clump"},
        {"x1": 51, "y1": 49, "x2": 71, "y2": 81, "score": 0.8, "category": "odd_clump"},
        {"x1": 100, "y1": 100, "x2": 110, "y2": 110, "score": 0.3, "category": "clump"},
    ]
    item = {"subject_id": 300, "probabilities": {"clumpy": 0.8, "not_clumpy": 0.2}, "boxes": boxes}
    response = post_predictions(client, predictions_body([item], model="frcnn"))
    assert response.status_code == 200, response.text
    low = post_predictions(
        client,
        predictions_body(
            [{"subject_id": 301, "boxes": boxes}], model="frcnn", version="2", score_threshold=0.25
        ),
    )
    assert low.status_code == 200, low.text
    settle(service)
    machine_id = machines.classification_id(WF, "ml:frcnn@1", 300)
    with service.sessions() as session:
        drawn = session.execute(
            select(Mark.id, Mark.tool, Mark.kind, Mark.x1, Mark.y1, Mark.x2, Mark.y2)
            .where(Mark.classification_id == machine_id)
            .order_by(Mark.tool)
        ).all()
        assert [tuple(row)[1:] for row in drawn] == [
            (0, "point", 20.0, 20.0, 20.0, 20.0),
            (1, "rectangle", 51.0, 49.0, 71.0, 81.0),
        ]
        kept = session.scalar(select(Prediction.boxes).where(Prediction.subject_id == 300))
        assert kept is not None and [b["score"] for b in kept] == [0.9, 0.8, 0.3]
        low_id = machines.classification_id(WF, "ml:frcnn@2", 301)
        n_low = session.scalar(
            select(func.count()).select_from(Mark).where(Mark.classification_id == low_id)
        )
        assert n_low == 3
        answer = session.scalar(select(Answer.value).where(Answer.classification_id == machine_id))
        assert answer == 0
    clusters = client.get(f"/v1/workflows/{WF}/subjects/300/clusters").json()["clusters"]
    mark_ids = {row[0] for row in drawn}
    rectangle = next(c for c in clusters if c["tool"] == 1)
    assert rectangle["n_marks"] == 3 and mark_ids & set(rectangle["members"])
    point = next(c for c in clusters if c["tool"] == 0)
    assert point["members"] == [drawn[0][0]]


# --- calibration ------------------------------------------------------------------------------


def test_calibration_bins_the_predicted_probability_against_gold_and_retired_labels(
    service: Service,
) -> None:
    """The reliability table counts, averages and scores each bin as computed here; retired
    subjects form their own table; a volunteer that is not a machine is a 404."""
    client = TestClient(service.app)
    configure(client, question_config(kind="risk", risk_bound=0.3, min_views=3))
    post_votes(client, [(s, u, 1) for s in (60, 61) for u in (1, 2, 3)])
    gold = {50: "featured", 51: "featured", 52: "smooth", 53: "smooth", 54: "featured"}
    response = client.put(
        f"/v1/workflows/{WF}/gold",
        json={"subjects": [{"subject_id": s, "label": label} for s, label in gold.items()]},
    )
    assert response.status_code == 200
    given = {50: 0.95, 51: 0.92, 52: 0.35, 53: 0.91, 54: 0.55, 60: 0.1, 61: 0.97, 70: 0.6}
    items = [{"subject_id": s, "probabilities": probabilities(f)} for s, f in given.items()]
    assert post_predictions(client, predictions_body(items)).status_code == 200
    settle(service)
    retired = {s: client.get(f"/v1/workflows/{WF}/subjects/{s}").json()["label"] for s in (60, 61)}
    assert retired == {60: "smooth", 61: "smooth"}
    table = client.get(
        f"/v1/workflows/{WF}/machines/ml:zoobot@1/calibration", params={"bins": 5}
    ).json()
    for name, labels in (("gold", gold), ("retired", retired)):
        confidence = np.array([max(given[s], 1 - given[s]) for s in labels])
        correct = np.array(
            [("featured" if given[s] > 0.5 else "smooth") == labels[s] for s in labels]
        )
        part = table["classes"][name]
        assert part["n"] == len(labels)
        assert part["fraction_correct"] == pytest.approx(correct.mean())
        which = np.minimum((confidence * 5).astype(int), 4)
        ece = 0.0
        for b, row in enumerate(part["bins"]):
            inside = which == b
            assert row["n"] == int(inside.sum())
            if inside.any():
                assert row["mean_probability"] == pytest.approx(confidence[inside].mean())
                assert row["fraction_correct"] == pytest.approx(correct[inside].mean())
                ece += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
        assert part["expected_calibration_error"] == pytest.approx(ece / len(labels))
    assert table["boxes"] is None and "gold" in table["compared_with"]
    missing = client.get(f"/v1/workflows/{WF}/machines/user:1/calibration")
    assert (missing.status_code, missing.json()["field"]) == (404, "volunteer")
    by_id = client.get(f"/v1/workflows/{WF}/machines/{table['volunteer_id']}/calibration")
    assert by_id.status_code == 200 and by_id.json()["key"] == "ml:zoobot@1"


def test_box_calibration_scores_purity_and_completeness_against_gold_boxes(
    service: Service,
) -> None:
    """Boxes on subjects with gold boxes are hits when they match one (IoU >= 0.5, one gold box
    each, highest score first); purity per score bin and completeness at each bin's lower edge;
    a refit then learns the machine's mark skill as it does a human's."""
    client = TestClient(service.app)
    configure(client, p.clump_config())
    gold = [
        {"subject_id": 80, "boxes": [[10, 10, 30, 30], [60, 60, 80, 80]]},
        {"subject_id": 81, "boxes": []},
    ]
    assert client.put(f"/v1/workflows/{WF}/gold", json={"subjects": gold}).status_code == 200

    def box(x: float, score: float) -> dict[str, Any]:
        return {"x1": x, "y1": x, "x2": x + 20, "y2": x + 20, "score": score, "category": "clump"}

    items = [
        # a hit, a duplicate of the same object (a miss: the gold box is taken), a hit, a miss
        {"subject_id": 80, "boxes": [box(10, 0.95), box(11, 0.9), box(61, 0.3), box(200, 0.1)]},
        {"subject_id": 81, "boxes": [box(5, 0.7)]},
        {"subject_id": 82, "boxes": [box(5, 0.7)]},  # no gold: not scored
    ]
    assert post_predictions(client, predictions_body(items, model="frcnn")).status_code == 200
    table = client.get(
        f"/v1/workflows/{WF}/machines/ml:frcnn@1/calibration", params={"bins": 2}
    ).json()
    boxes = table["boxes"]
    assert (boxes["n"], boxes["subjects"], boxes["gold_boxes"]) == (5, 2, 2)
    low, high = boxes["bins"]
    assert (low["n"], low["purity"]) == (2, 0.5)  # 0.3 hit, 0.1 miss
    assert (high["n"], high["purity"]) == (3, pytest.approx(1 / 3))  # 0.95 hit; 0.9, 0.7 misses
    assert (low["completeness_at_low"], high["completeness_at_low"]) == (1.0, 0.5)
    assert boxes["purity"] == pytest.approx(2 / 5)
    assert client.post(f"/v1/workflows/{WF}/refit").status_code == 200
    learned = client.get(f"/v1/workflows/{WF}/volunteers/ml:frcnn@1").json()
    assert learned["kind"] == "machine" and learned["marks"]["learned"] is True


def test_machine_matching_is_greedy_by_score() -> None:
    """The higher-scoring of two boxes on one gold object takes it, whatever their order."""
    predicted = np.array([[0, 0, 10, 10], [0, 0, 10, 11]], dtype=float)
    gold = np.array([[0, 0, 10, 10]], dtype=float)
    assert machines.match_boxes(predicted, np.array([0.2, 0.9]), gold).tolist() == [False, True]
    assert machines.match_boxes(predicted, np.array([0.9, 0.2]), gold).tolist() == [True, False]


# --- refusals ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """An open embedded service (SQLite) with the clump workflow configured, shared by the
    refusal tests (a refusal writes nothing, so they cannot disturb each other)."""
    directory = tmp_path_factory.mktemp("machines")
    url = f"sqlite:///{directory / 'machines.db'}"
    migrate(url)
    service = build_service(
        Settings(database_url=url, export_dir=directory / "exports", sweep_interval_s=3600)
    )
    client = TestClient(service.app)
    configure(client, p.clump_config())
    configure(client, {**p.clump_config(), "drawing": None}, workflow_id=WF + 1)
    yield service
    service.close()


def valid_body() -> dict[str, Any]:
    box = {"x1": 1.0, "y1": 2.0, "x2": 9.0, "y2": 11.0, "score": 0.93, "category": "clump"}
    return {
        "model": "clumps-frcnn",
        "version": "20261125.1",
        "export_id": None,
        "training_subjects": [7],
        "score_threshold": 0.5,
        "predictions": [
            {"subject_id": 100 + i, "probabilities": {"clumpy": 0.9, "not_clumpy": 0.1}}
            for i in range(3)
        ]
        + [{"subject_id": 123, "probabilities": None, "boxes": [box]}],
    }


def changed(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    body = valid_body()
    node: Any = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return body


P0 = ("predictions", 0)
PROB = ("predictions", 0, "probabilities")
BOX = ("predictions", 3, "boxes", 0)
MANY_BOXES = [valid_body()["predictions"][3]["boxes"][0]] * 1001
MANY = [{"subject_id": i, "probabilities": {"clumpy": 1.0}} for i in range(10_001)]
NO_Y1 = {"x1": 1, "x2": 2, "y2": 3, "score": 0.5, "category": "clump"}
REFUSALS: list[tuple[str, Any, int, str]] = [
    ("body is a list", [], 422, "body"),
    ("model pattern", changed(("model",), "a b"), 422, "model"),
    ("model missing", {k: v for k, v in valid_body().items() if k != "model"}, 422, "model"),
    ("version pattern", changed(("version",), "1/2"), 422, "version"),
    ("version too long", changed(("version",), "1" * 65), 422, "version"),
    ("export id", changed(("export_id",), "latest"), 422, "export_id"),
    ("training list", changed(("training_subjects",), "7"), 422, "training_subjects"),
    ("training id", changed(("training_subjects", 0), -7), 422, "training_subjects.0"),
    ("threshold range", changed(("score_threshold",), 1.5), 422, "score_threshold"),
    ("threshold NaN", changed(("score_threshold",), math.nan), 422, "score_threshold"),
    ("misspelt field", {**valid_body(), "score_treshold": 0.4}, 422, "score_treshold"),
    ("predictions missing", changed(("predictions",), None), 422, "predictions"),
    ("prediction kind", changed(("predictions", 1), 5), 422, "predictions.1"),
    ("subject id missing", changed(P0, {"boxes": []}), 422, "predictions.0.subject_id"),
    ("subject id bool", changed((*P0, "subject_id"), True), 422, "predictions.0.subject_id"),
    ("subject id text", changed((*P0, "subject_id"), "100"), 422, "predictions.0.subject_id"),
    ("subject id huge", changed((*P0, "subject_id"), 2**64), 422, "predictions.0.subject_id"),
    ("duplicate", changed(("predictions", 2, "subject_id"), 100), 422, "predictions.2.subject_id"),
    (
        "no prediction",
        changed(("predictions", 1, "probabilities"), None),
        422,
        "predictions.1.probabilities",
    ),
    ("unknown class", changed((*PROB, "galaxy"), 0.0), 422, "predictions.0.probabilities.galaxy"),
    (
        "negative",
        changed(PROB, {"clumpy": 1.2, "not_clumpy": -0.2}),
        422,
        "predictions.0.probabilities.clumpy",
    ),
    ("sum", changed((*PROB, "clumpy"), 0.5), 422, "predictions.0.probabilities"),
    (
        "probability NaN",
        changed((*PROB, "clumpy"), math.nan),
        422,
        "predictions.0.probabilities.clumpy",
    ),
    (
        "probability text",
        changed((*PROB, "clumpy"), "0.9"),
        422,
        "predictions.0.probabilities.clumpy",
    ),
    ("empty probabilities", changed(PROB, {}), 422, "predictions.0.probabilities"),
    ("score range", changed((*BOX, "score"), 1.01), 422, "predictions.3.boxes.0.score"),
    ("score infinite", changed((*BOX, "score"), math.inf), 422, "predictions.3.boxes.0.score"),
    ("x out of order", changed((*BOX, "x2"), 0.5), 422, "predictions.3.boxes.0.x2"),
    ("y out of order", changed((*BOX, "y2"), 2.0), 422, "predictions.3.boxes.0.y2"),
    ("x1 NaN", changed((*BOX, "x1"), math.nan), 422, "predictions.3.boxes.0.x1"),
    ("x1 beyond a float", changed((*BOX, "x1"), 10**400), 422, "predictions.3.boxes.0.x1"),
    ("y1 missing", changed(BOX, NO_Y1), 422, "predictions.3.boxes.0.y1"),
    (
        "unknown category",
        changed((*BOX, "category"), "star"),
        422,
        "predictions.3.boxes.0.category",
    ),
    ("category kind", changed((*BOX, "category"), 3), 422, "predictions.3.boxes.0.category"),
    ("boxes kind", changed(BOX[:-1], {}), 422, "predictions.3.boxes"),
    ("box field", changed((*BOX, "label"), "x"), 422, "predictions.3.boxes.0.label"),
    ("too many boxes", changed(BOX[:-1], MANY_BOXES), 413, "predictions.3.boxes"),
    ("too many predictions", changed(("predictions",), MANY), 413, "predictions"),
]


@pytest.mark.parametrize(
    ("what", "body", "status", "field"), REFUSALS, ids=[case[0] for case in REFUSALS]
)
def test_every_bad_body_is_refused_naming_the_field_and_writes_nothing(
    embedded: Service, what: str, body: Any, status: int, field: str
) -> None:
    """Each malformed value gets its 4xx with `field` naming it, and no row is written."""
    client = TestClient(embedded.app)
    before = row_counts(embedded)
    response = client.post(
        f"/v1/workflows/{WF}/predictions",
        content=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == status, (what, response.text)
    assert response.json()["field"] == field, (what, response.json())
    assert row_counts(embedded) == before


def test_the_valid_body_of_the_refusal_table_is_accepted(embedded: Service) -> None:
    """The body every refusal above starts from is accepted (so each refusal is its change)."""
    body = changed(("model",), "accepted-model")  # a model no other test here posts
    response = post_predictions(TestClient(embedded.app), body)
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 4


def test_predictions_the_workflow_cannot_take_are_refused(embedded: Service) -> None:
    """Boxes for a workflow without a drawing task, and any post to an unconfigured workflow."""
    client = TestClient(embedded.app)
    no_drawing = post_predictions(client, valid_body(), workflow_id=WF + 1)
    assert (no_drawing.status_code, no_drawing.json()["field"]) == (422, "predictions.3.boxes")
    unknown = post_predictions(client, valid_body(), workflow_id=424242)
    assert (unknown.status_code, unknown.json()["field"]) == (404, "workflow_id")
    for path in ("machines", "machines/ml:x@1/calibration"):
        missing = client.get(f"/v1/workflows/424242/{path}")
        assert (missing.status_code, missing.json()["field"]) == (404, "workflow_id")
    bins = client.get(f"/v1/workflows/{WF}/machines/ml:x@1/calibration", params={"bins": 1})
    assert (bins.status_code, bins.json()["field"]) == (422, "bins")


def _paths(value: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found: list[tuple[Any, ...]] = []
    children = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else []
    )
    for key, child in children:
        found.append((*at, key))
        found += _paths(child, (*at, key))
    return found


@st.composite
def hostile_bodies(draw: st.DrawFn) -> Any:
    """The valid body with one value anywhere replaced by any JSON value."""
    body = valid_body()
    path = draw(st.sampled_from(_paths(body)))
    hostile = copy.deepcopy(body)
    node: Any = hostile
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = draw(strategies.json_values() | strategies.HOSTILE_NUMBERS)
    return hostile


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=hostile_bodies())
def test_a_body_with_any_value_replaced_is_taken_or_refused_naming_the_field(
    embedded: Service, body: Any
) -> None:
    """200, or a 4xx whose body names the field, with nothing written; never a 500."""
    client = TestClient(embedded.app, raise_server_exceptions=False)
    before = row_counts(embedded)
    response = client.post(
        f"/v1/workflows/{WF}/predictions",
        content=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code in (200, 404, 409, 413, 422), response.text
    if response.status_code != 200:
        assert response.json().get("field"), response.text
        assert row_counts(embedded) == before
