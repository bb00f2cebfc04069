"""Marks inside the service: clusters with P(real) on every apply, views without marks as
evidence, mark skills learned at refit, and equality with the offline `gzx aggregate-marks`."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from app.offline_marks import aggregate_marks_csv
from app.pipeline import InProcessDispatcher
from app.service import Service
from tests import payloads as p

WF = p.WORKFLOW


def config(**retirement: Any) -> dict[str, Any]:
    return {
        "drawing": {
            "task": "T1",
            "tools": [{"index": 1, "type": "rectangle", "label": "Clump", "category": "clump"}],
        },
        "retirement": {"min_views": 3, **retirement},
    }


def settle(service: Service) -> None:
    assert isinstance(service.dispatcher, InProcessDispatcher)
    assert service.dispatcher.wait_idle(30)


def post(
    client: TestClient,
    items: list[tuple[int, int, list[tuple[float, float, float, float]]]],
    first_id: int = 1,
) -> None:
    """(subject, volunteer, boxes as x, y, w, h) -> classic classifications with T1 marks."""
    body = [p.classic(first_id + i, s, u, None, boxes=b) for i, (s, u, b) in enumerate(items)]
    for start in range(0, len(body), 100):
        response = client.post("/v1/classifications", json=body[start : start + 100])
        assert response.status_code == 200, response.text


def test_a_viewer_who_drew_nothing_lowers_p_real(service: Service) -> None:
    """Three markers and three empty views give a lower P(real) than three markers alone."""
    client = TestClient(service.app)
    client.put(f"/v1/workflows/{WF}", json=config(kind="none"))
    box = [(100.0, 100.0, 30.0, 30.0)]
    post(client, [(1, u, box) for u in (1, 2, 3)])
    post(client, [(2, u, box) for u in (1, 2, 3)] + [(2, u, []) for u in (4, 5, 6)], first_id=10)
    settle(service)
    alone = client.get(f"/v1/workflows/{WF}/subjects/1").json()["clusters"]
    doubted = client.get(f"/v1/workflows/{WF}/subjects/2").json()["clusters"]
    assert len(alone) == len(doubted) == 1
    assert alone[0]["n_marks"] == 3 and len(alone[0]["members"]) == 3
    assert doubted[0]["p_real"] < alone[0]["p_real"]
    assert doubted[0]["n_views"] == 6
    assert alone[0]["box"] == [100.0, 100.0, 130.0, 130.0]


def test_a_volunteers_two_marks_never_share_a_cluster(service: Service) -> None:
    """Two overlapping boxes of one volunteer end up in different clusters."""
    client = TestClient(service.app)
    client.put(f"/v1/workflows/{WF}", json=config(kind="none"))
    post(client, [(3, 1, [(10.0, 10.0, 20.0, 20.0), (11.0, 11.0, 20.0, 20.0)])])
    settle(service)
    found = client.get(f"/v1/workflows/{WF}/subjects/3").json()["clusters"]
    assert len(found) == 2


def test_an_agreed_empty_subject_retires_as_nothing_here(service: Service) -> None:
    """Five volunteers who drew nothing settle a drawing-only subject as nothing_here."""
    client = TestClient(service.app)
    client.put(f"/v1/workflows/{WF}", json=config(mark_risk_bound=0.6))
    post(client, [(4, u, []) for u in range(1, 6)])
    settle(service)
    subject = client.get(f"/v1/workflows/{WF}/subjects/4").json()
    assert subject["marks_risk"]["e_missed"] < 0.6
    assert (subject["status"], subject["reason"]) == ("retired", "nothing_here")


def synthetic(
    seed: int = 2,
) -> tuple[list[tuple[int, int, list[tuple[float, ...]]]], dict[int, list]]:
    """Subjects with 0-3 objects, 6 viewers each of mixed recall and false-mark habits."""
    rng = np.random.default_rng(seed)
    recall = rng.choice([0.95, 0.8, 0.4], size=12, p=[0.5, 0.3, 0.2])
    items, truth = [], {}
    for s in range(100, 130):
        objects = [
            (rng.uniform(0, 300), rng.uniform(0, 300), rng.uniform(20, 40))
            for _ in range(int(rng.integers(0, 4)))
        ]
        truth[s] = [[x, y, x + w, y + w] for x, y, w in objects]
        for u in rng.choice(12, size=6, replace=False):
            boxes = [
                (x + rng.normal(0, 2), y + rng.normal(0, 2), w, w)
                for x, y, w in objects
                if rng.random() < recall[u]
            ]
            if rng.random() < 0.15:
                boxes.append((rng.uniform(0, 300), rng.uniform(0, 300), 25.0, 25.0))
            items.append((s, int(u) + 1, boxes))
    return items, truth


def test_the_service_equals_gzx_aggregate_marks_after_a_refit(
    service: Service, tmp_path: Path
) -> None:
    """Clusters the API serves after a refit with gold boxes equal the offline engine's."""
    client = TestClient(service.app)
    client.put(f"/v1/workflows/{WF}", json=config(kind="none"))
    items, truth = synthetic()
    post(client, items)
    gold_subjects = list(range(100, 110))
    response = client.put(
        f"/v1/workflows/{WF}/gold",
        json={"subjects": [{"subject_id": s, "boxes": truth[s]} for s in gold_subjects]},
    )
    assert response.status_code == 200, response.text
    settle(service)
    views, marks_csv = tmp_path / "views.csv", tmp_path / "marks.csv"
    gold_csv, gold_subjects_csv, out = (tmp_path / n for n in ("g.csv", "gs.csv", "out.csv"))
    with views.open("w", newline="") as v, marks_csv.open("w", newline="") as m:
        vw, mw = csv.writer(v), csv.writer(m)
        vw.writerow(["subject", "volunteer"])
        mw.writerow(["subject", "volunteer", "x1", "y1", "x2", "y2"])
        for s, u, boxes in items:
            vw.writerow([s, u])
            mw.writerows([s, u, x, y, x + w, y + h] for x, y, w, h in boxes)
    with gold_csv.open("w", newline="") as g, gold_subjects_csv.open("w", newline="") as gs:
        csv.writer(g).writerows(
            [["subject", "x1", "y1", "x2", "y2"]]
            + [[s, *b] for s in gold_subjects for b in truth[s]]
        )
        csv.writer(gs).writerows([["subject"]] + [[s] for s in gold_subjects])
    aggregate_marks_csv(
        views, marks_csv, out, gold_marks_path=gold_csv, gold_subjects_path=gold_subjects_csv
    )
    offline: dict[int, list[tuple[float, ...]]] = {}
    with out.open() as handle:
        for row in csv.DictReader(handle):
            offline.setdefault(int(row["subject"]), []).append(
                (
                    round(float(row["x1"]), 3),
                    round(float(row["y1"]), 3),
                    round(float(row["p_real"]), 4),
                )
            )
    for s in range(100, 130):
        served = client.get(f"/v1/workflows/{WF}/subjects/{s}").json()["clusters"]
        mine = sorted(
            (round(c["box"][0], 3), round(c["box"][1], 3), round(c["p_real"], 4)) for c in served
        )
        assert mine == sorted(offline.get(s, [])), s


def test_the_volunteer_endpoint_shows_mark_skills_with_intervals(service: Service) -> None:
    """After a refit, a volunteer's p_fn, f, p_fp and sigma come with 90% intervals."""
    client = TestClient(service.app)
    client.put(f"/v1/workflows/{WF}", json=config(kind="none"))
    items, truth = synthetic(seed=5)
    post(client, items)
    client.put(
        f"/v1/workflows/{WF}/gold",
        json={"subjects": [{"subject_id": s, "boxes": truth[s]} for s in range(100, 115)]},
    )
    settle(service)
    skill = client.get(f"/v1/workflows/{WF}/volunteers/user:{items[0][1]}").json()["marks"]
    assert skill["learned"] is True
    for name in ("p_fn", "f", "p_fp", "sigma"):
        low, high = skill[f"{name}_90"]
        assert low <= skill[name] <= high
    bad = client.put(
        f"/v1/workflows/{WF}/gold", json={"subjects": [{"subject_id": 1, "boxes": [[5, 5, 1, 1]]}]}
    )
    assert bad.status_code == 422 and bad.json()["field"] == "subjects[0].boxes[0]"
