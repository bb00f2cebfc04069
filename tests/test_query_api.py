"""The query API through HTTP on PostgreSQL and SQLite: cursor pagination visits every subject
once, filters select what they say, volunteers sort by votes and by information per vote, the
summary counts effort against the fixed-count baseline, and history / clusters / trajectories
describe one subject the way the engine sees it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from app.pipeline import InProcessDispatcher
from app.service import Service
from tests import payloads as p

WF = p.WORKFLOW
CLASSES = ["clumpy", "not_clumpy"]


def crowd_config(cap: int = 8) -> dict[str, Any]:
    """A Clump-Scout-like workflow: a yes/no question and a box tool, either task settles."""
    return {
        "name": "Clumps (test crowd)",
        "classes": CLASSES,
        "question": {
            "task": "T0",
            "answers": [
                {"index": 0, "label": "Yes", "class": "clumpy"},
                {"index": 1, "label": "No", "class": "not_clumpy"},
            ],
        },
        "drawing": {
            "task": "T1",
            "tools": [{"index": 1, "type": "rectangle", "label": "Clump", "category": "clump"}],
        },
        "retirement": {
            "min_views": 3,
            "cap": cap,
            "kind": "risk",
            "risk_bound": 0.05,
            "combine": "any",
        },
    }


def settle(service: Service) -> None:
    assert isinstance(service.dispatcher, InProcessDispatcher)
    assert service.dispatcher.wait_idle(60)


def fill(
    client: TestClient,
    service: Service,
    *,
    n_subjects: int = 30,
    n_volunteers: int = 12,
    views: int = 6,
    seed: int = 4,
    location: Callable[[int], str] | None = None,
    first_subject: int = 500,
) -> dict[str, Any]:
    """A small simulated crowd of mixed skill, posted as stream events (so subjects carry an
    image location): answers to the question and boxes around each subject's clumps (truth:
    even subjects are clumpy with 1-2 clumps). Gold on the first four subjects, then a refit.
    Returns the truth and the posted (subject, volunteer) pairs."""
    rng = np.random.default_rng(seed)
    accuracy = rng.choice([0.95, 0.85, 0.5, 0.15], size=n_volunteers, p=[0.5, 0.25, 0.15, 0.1])
    recall = rng.choice([0.95, 0.7, 0.3], size=n_volunteers, p=[0.5, 0.3, 0.2])
    client.put(f"/v1/workflows/{WF}", json=crowd_config())
    truth: dict[int, int] = {}
    objects: dict[int, list[tuple[float, float, float]]] = {}
    events, pairs = [], []
    number = 0
    for i in range(n_subjects):
        subject = first_subject + i
        truth[subject] = i % 2  # 0 = clumpy
        objects[subject] = [
            (float(rng.uniform(20, 330)), float(rng.uniform(20, 330)), float(rng.uniform(25, 50)))
            for _ in range(int(rng.integers(1, 3)) if i % 2 == 0 else 0)
        ]
        for u in rng.choice(n_volunteers, size=views, replace=False):
            number += 1
            right = rng.random() < accuracy[u]
            answer = truth[subject] if right else 1 - truth[subject]
            boxes = [
                (x + rng.normal(0, 2), y + rng.normal(0, 2), w, w)
                for x, y, w in objects[subject]
                if rng.random() < recall[u]
            ]
            minute = number % 60
            created = f"2025-03-04T{10 + number // 60 % 12:02d}:{minute:02d}:04.900Z"
            data = p.classic(number, subject, int(u) + 1, answer, boxes=boxes, created_at=created)
            url = location(subject) if location else "http://127.0.0.1:9/none.png"
            events.append(p.event(data, location=url))
            pairs.append((subject, int(u) + 1))
    for start in range(0, len(events), 50):
        response = client.post("/v1/ingest/kinesis", json=p.batch(*events[start : start + 50]))
        assert response.status_code == 200, response.text
        assert response.json()["rejected"] == 0, response.json()
    gold = [
        {"subject_id": first_subject + i, "label": CLASSES[truth[first_subject + i]]}
        for i in range(4)
    ]
    assert client.put(f"/v1/workflows/{WF}/gold", json={"subjects": gold}).status_code == 200
    settle(service)
    return {"truth": truth, "objects": objects, "pairs": pairs}


def walk(client: TestClient, url: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a paged list, following next_cursor."""
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(1000):
        query = dict(params, **({"cursor": cursor} if cursor else {}))
        response = client.get(url, params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("the cursor never ended")


def test_pagination_walks_every_subject_exactly_once(service: Service) -> None:
    """Pages of 7 over 30 subjects: each id once, ascending, the same set as the stats."""
    client = TestClient(service.app)
    fill(client, service)
    items = walk(client, f"/v1/workflows/{WF}/subjects", limit=7)
    ids = [s["subject_id"] for s in items]
    assert ids == sorted(set(ids)) and len(ids) == 30
    stats = client.get(f"/v1/workflows/{WF}/stats").json()
    assert len(ids) == stats["subjects"]
    first = items[0]
    assert isinstance(first["posterior"]["clumpy"], float)
    assert abs(sum(first["posterior"].values()) - 1) < 1e-9
    assert first["classifications"] == 6 and isinstance(first["views"], int)


def test_filters_select_what_they_say(service: Service) -> None:
    """Status, label, posterior range, gold and updated_since each narrow the list correctly."""
    client = TestClient(service.app)
    fill(client, service)
    url = f"/v1/workflows/{WF}/subjects"
    everything = walk(client, url, limit=100)
    by_status = {s: [x for x in everything if x["status"] == s] for s in ("live", "retired")}
    for status, expected in by_status.items():
        got = walk(client, url, status=status, limit=5)
        assert [x["subject_id"] for x in got] == [x["subject_id"] for x in expected]
    clumpy = walk(client, url, label="clumpy")
    assert clumpy and all(x["label"] == "clumpy" for x in clumpy)
    assert len(clumpy) == sum(1 for x in everything if x["label"] == "clumpy")
    sure = walk(client, url, posterior_class="clumpy", posterior_min=0.9)
    assert sure and all(x["posterior"]["clumpy"] >= 0.9 for x in sure)
    assert len(sure) == sum(1 for x in everything if x["posterior"]["clumpy"] >= 0.9)
    middle = walk(client, url, posterior_class="not_clumpy", posterior_min=0.2, posterior_max=0.8)
    assert all(0.2 <= x["posterior"]["not_clumpy"] <= 0.8 for x in middle)
    gold = walk(client, url, gold="true")
    assert [x["subject_id"] for x in gold] == [500, 501, 502, 503]
    assert gold[0]["gold"] == "clumpy" and gold[0]["is_gold"] is True
    not_gold = walk(client, url, gold="false")
    assert len(not_gold) == 26 and not any(x["is_gold"] for x in not_gold)
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert walk(client, url, updated_since=future) == []
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert len(walk(client, url, updated_since=past)) == 30
    bad = client.get(url, params={"posterior_class": "spiral", "posterior_min": 0.5})
    assert bad.status_code == 422 and bad.json()["field"] == "posterior_class"
    bad = client.get(url, params={"cursor": "not-a-cursor"})
    assert bad.status_code == 422 and bad.json()["field"] == "cursor"
    assert client.get(url, params={"status": "asleep"}).status_code == 422
    assert client.get("/v1/workflows/999/subjects").status_code == 404


def test_volunteers_sort_by_votes_and_by_information(service: Service) -> None:
    """Both sorts page through everyone once, in order; information is bits from the skills."""
    client = TestClient(service.app)
    posted = fill(client, service)
    url = f"/v1/workflows/{WF}/volunteers"
    by_votes = walk(client, url, sort="votes", limit=5)
    assert len(by_votes) == 12 == len({v["volunteer_id"] for v in by_votes})
    votes = [v["votes"] for v in by_votes]
    assert votes == sorted(votes, reverse=True)
    counted: dict[str, int] = {}
    for _, u in posted["pairs"]:
        counted[f"user:{u}"] = counted.get(f"user:{u}", 0) + 1
    assert {v["key"]: v["votes"] for v in by_votes} == counted
    by_information = walk(client, url, sort="information", limit=5)
    bits = [v["information_per_vote_bits"] for v in by_information]
    assert bits == sorted(bits, reverse=True) and len(bits) == 12
    assert all(0.0 <= b <= 1.0 for b in bits)
    ascending = walk(client, url, sort="information", order="asc", limit=4)
    assert [v["volunteer_id"] for v in ascending] == [
        v["volunteer_id"] for v in reversed(by_information)
    ] or [v["information_per_vote_bits"] for v in ascending] == sorted(bits)
    one = by_information[0]
    single = client.get(f"{url}/{one['key']}").json()
    assert abs(single["information_per_vote_bits"] - one["information_per_vote_bits"]) < 1e-9
    assert abs(single["confusion"][0][0] - one["confusion_diagonal"]["clumpy"]) < 1e-9
    page = client.get(url, params={"limit": 3}).json()
    assert page["positive_class"] == "not_clumpy" and page["total"] == 12


def test_the_summary_counts_effort_against_the_fixed_count_baseline(service: Service) -> None:
    """Subjects per status add up; classifications spent vs cap x subjects; retirements per
    bucket add up to the retirement events."""
    client = TestClient(service.app)
    fill(client, service)
    summary = client.get(f"/v1/workflows/{WF}/summary").json()
    assert summary["subjects"] == 30
    assert summary["live"] + summary["retired"] + summary["contested"] == 30
    assert summary["classifications"] == 180
    assert summary["baseline_classifications"] == 8 * 30
    assert abs(summary["saving"] - (1 - 180 / 240)) < 1e-12
    assert summary["bucket"] == "hour"
    rate = summary["retirement_rate"]
    assert rate and rate[-1]["cumulative"] == sum(b["retired"] for b in rate)
    assert rate[-1]["cumulative"] >= summary["retired"] + summary["contested"]
    daily = client.get(f"/v1/workflows/{WF}/summary", params={"bucket": "day"}).json()
    assert daily["retirement_rate"][-1]["cumulative"] == rate[-1]["cumulative"]


def test_history_clusters_and_trajectories_describe_a_subject(service: Service) -> None:
    """History ends at the stored posterior; clusters list their marks; trajectories match."""
    client = TestClient(service.app)
    posted = fill(client, service)
    subject = 510  # clumpy, not gold
    history = client.get(f"/v1/workflows/{WF}/subjects/{subject}/history").json()
    stored = client.get(f"/v1/workflows/{WF}/subjects/{subject}").json()
    assert len(history["steps"]) == 7 and history["steps"][0]["volunteer_id"] is None
    last = history["steps"][-1]["posterior"]
    assert all(abs(last[c] - stored["posterior"][c]) < 1e-9 for c in CLASSES)
    assert [s["posterior"] for s in history["steps"]] == [
        dict(zip(CLASSES, row, strict=True)) for row in stored["history"]
    ]
    drawn = client.get(f"/v1/workflows/{WF}/subjects/{subject}/clusters").json()
    assert drawn["width"] == 424.0 and drawn["locations"][0]["type"] == "image/png"
    assert len(drawn["clusters"]) == len(stored["clusters"]) >= 1
    members = {m for c in drawn["clusters"] for m in c["members"]}
    assert members <= {m["id"] for m in drawn["marks"]}
    for mark in drawn["marks"]:
        if mark["id"] in members:
            assert mark["cluster_id"] is not None
    assert all(0.0 <= c["p_real"] <= 1.0 for c in drawn["clusters"])
    assert len(drawn["marks"]) >= len(posted["objects"][subject])
    page = client.get(f"/v1/workflows/{WF}/trajectories", params={"per_status": 5}).json()
    assert page["trajectories"] and page["positive_class"] == "not_clumpy"
    for t in page["trajectories"]:
        mine = client.get(f"/v1/workflows/{WF}/subjects/{t['subject_id']}/history").json()
        assert t["posterior"] == [[s["posterior"][c] for c in CLASSES] for s in mine["steps"]]
    assert client.get(f"/v1/workflows/{WF}/subjects/999999/history").status_code == 404
    assert client.get(f"/v1/workflows/{WF}/subjects/999999/clusters").status_code == 404


def test_the_workflow_list_and_the_openapi_page_describe_the_routes(service: Service) -> None:
    """GET /v1/workflows lists the workflow; the schema documents typed responses."""
    client = TestClient(service.app)
    fill(client, service, n_subjects=6)
    listed = client.get("/v1/workflows").json()
    assert listed == [
        {
            "id": WF,
            "name": "Clumps (test crowd)",
            "configured": True,
            "subjects": 6,
            "live": listed[0]["live"],
            "retired": listed[0]["retired"],
            "contested": listed[0]["contested"],
        }
    ]
    schema = client.get("/openapi.json").json()
    for path in (
        "/v1/workflows/{workflow_id}/subjects",
        "/v1/workflows/{workflow_id}/subjects/{subject_id}/history",
        "/v1/workflows/{workflow_id}/subjects/{subject_id}/clusters",
        "/v1/workflows/{workflow_id}/volunteers",
        "/v1/workflows/{workflow_id}/summary",
        "/v1/workflows/{workflow_id}/audit",
    ):
        ok = schema["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]
        assert "$ref" in ok["schema"], path
    assert "SubjectPage" in schema["components"]["schemas"]
