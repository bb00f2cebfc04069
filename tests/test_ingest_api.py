"""Ingest through the HTTP API, over the real PostgreSQL and over SQLite."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.models import Answer, Classification, Mark, Subject, View, Volunteer
from app.pipeline import InProcessDispatcher
from app.service import Service
from tests import payloads as p


def count(service: Service, model: Any) -> int:
    with service.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def settle(service: Service) -> None:
    assert isinstance(service.dispatcher, InProcessDispatcher)
    assert service.dispatcher.wait_idle(30)


@pytest.fixture
def client(service: Service) -> TestClient:
    return TestClient(service.app)


def configure(client: TestClient, config: dict[str, Any] | None = None) -> None:
    response = client.put(f"/v1/workflows/{p.WORKFLOW}", json=config or p.clump_config())
    assert response.status_code == 200, response.text


def test_a_kinesis_batch_stores_each_classification_once(
    client: TestClient, service: Service
) -> None:
    """A batch with a logged-in and an anonymous volunteer stores both, with views and answers."""
    configure(client)
    body = p.batch(p.event(p.classic(1, 100, 7, 0)), p.event(p.classic(2, 100, None, 1)))
    response = client.post("/v1/ingest/kinesis", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["stored"] == 2
    assert count(service, Classification) == 2
    assert count(service, View) == 2
    assert count(service, Answer) == 2
    assert count(service, Volunteer) == 2
    settle(service)
    subject = client.get(f"/v1/workflows/{p.WORKFLOW}/subjects/100").json()
    assert subject["counts"] == {"clumpy": 1, "not_clumpy": 1}
    assert subject["classifications"] == 2
    assert subject["pending"] is False


def test_a_repeated_delivery_by_any_route_changes_nothing(
    client: TestClient, service: Service
) -> None:
    """The same classification via stream, Panoptes object and Caesar body is stored once."""
    configure(client)
    data = p.classic(11, 200, 8, 0, boxes=[(10, 10, 20, 20)])
    assert client.post("/v1/caesar/extract", json=p.caesar(data)).status_code == 200
    first = client.post("/v1/ingest/kinesis", json=p.batch(p.event(data)))
    assert first.json()["duplicates"] == 1
    again = client.post("/v1/classifications", json=data)
    assert again.status_code == 200 and again.json()["duplicates"] == 1
    assert count(service, Classification) == 1
    assert count(service, Answer) == 1
    assert count(service, Mark) == 1
    settle(service)
    subject = client.get(f"/v1/workflows/{p.WORKFLOW}/subjects/200").json()
    assert subject["counts"]["clumpy"] == 1


def test_a_richer_copy_adds_image_locations_the_first_lacked(
    client: TestClient, service: Service
) -> None:
    """A Caesar body (no image URL) followed by the stream event fills in the subject's location."""
    data = p.classic(21, 300, 9, 1)
    client.post("/v1/caesar/extract", json=p.caesar(data))
    with service.sessions() as session:
        assert session.get(Subject, 300).locations == []
    client.post("/v1/ingest/kinesis", json=p.batch(p.event(data, "https://example.org/s300.png")))
    with service.sessions() as session:
        assert session.get(Subject, 300).locations == [
            {"image/png": "https://example.org/s300.png"}
        ]


def test_both_front_end_generations_give_the_same_box(client: TestClient, service: Service) -> None:
    """A classic top-left rectangle and a FEM centre rectangle of one box store equal corners."""
    configure(client)
    client.post("/v1/classifications", json=p.classic(31, 400, 1, 0, boxes=[(100, 50, 40, 20)]))
    client.post("/v1/classifications", json=p.fem(32, 400, 2, 0, boxes_centre=[(120, 60, 40, 20)]))
    with service.sessions() as session:
        marks = session.scalars(select(Mark).order_by(Mark.classification_id)).all()
    assert [(m.x1, m.y1, m.x2, m.y2) for m in marks] == [(100, 50, 140, 70)] * 2


def test_one_bad_event_neither_stalls_the_stream_nor_loses_its_neighbours(
    client: TestClient, service: Service
) -> None:
    """A malformed event is listed with its index and reason; good neighbours are stored."""
    configure(client)
    bad = p.classic(42, 500, 3, 0, boxes=[(10, 10, -5, 20)])
    body = p.batch(
        p.event(p.classic(41, 500, 2, 0)),
        p.event(bad),
        {"source": "panoptes", "type": "subject_retired", "data": {}},
        p.event(p.classic(43, 500, 4, 1)),
    )
    response = client.post("/v1/ingest/kinesis", json=body)
    assert response.status_code == 200
    answer = response.json()
    assert answer["stored"] == 2
    assert answer["skipped"] == 1
    assert answer["rejected"] == 1
    assert answer["errors"][0]["index"] == 1
    assert "width" in answer["errors"][0]["field"]
    assert count(service, Classification) == 2


def test_a_body_that_is_not_a_batch_gets_a_4xx_naming_the_field(client: TestClient) -> None:
    """A stream body without a payload list is refused with 422 naming `payload`."""
    response = client.post("/v1/ingest/kinesis", json={"events": []})
    assert response.status_code == 422
    assert response.json()["field"] == "payload"
    response = client.post(
        "/v1/ingest/kinesis", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["field"] == "body"


def test_an_unknown_tool_of_a_configured_task_is_refused(
    client: TestClient, service: Service
) -> None:
    """A mark of tool 7 in the configured drawing task gets a 4xx and nothing is written."""
    configure(client)
    bad = p.classic(51, 600, 5, 0, boxes=[(1, 1, 5, 5)], tool=7)
    response = client.post("/v1/classifications", json=[p.classic(52, 600, 6, 0), bad])
    assert response.status_code == 422
    assert "tool" in response.json()["field"]
    assert count(service, Classification) == 0


def test_annotations_of_unconfigured_tasks_are_kept_and_ignored(
    client: TestClient, service: Service
) -> None:
    """A task the workflow does not configure is stored raw and does not count."""
    configure(client)
    data = p.classic(61, 700, 5, 0)
    data["annotations"].append({"task": "T9", "value": 3})
    assert client.post("/v1/classifications", json=data).status_code == 200
    settle(service)
    with service.sessions() as session:
        stored = session.get(Classification, 61)
        assert any(a.get("task") == "T9" for a in stored.raw["annotations"])
    assert client.get(f"/v1/workflows/{p.WORKFLOW}/subjects/700").json()["counts"] == {
        "clumpy": 1,
        "not_clumpy": 0,
    }


def test_a_classification_for_an_unconfigured_workflow_is_applied_once_configured(
    client: TestClient, service: Service
) -> None:
    """Votes that arrive before the workflow is configured count once it is."""
    client.post("/v1/classifications", json=[p.classic(71, 800, 1, 0), p.classic(72, 800, 2, 0)])
    settle(service)
    assert client.get(f"/v1/workflows/{p.WORKFLOW}/subjects/800").json()["pending"] is True
    configure(client)
    settle(service)
    subject = client.get(f"/v1/workflows/{p.WORKFLOW}/subjects/800").json()
    assert subject["pending"] is False
    assert subject["counts"]["clumpy"] == 2


def test_a_repeat_by_the_same_volunteer_counts_once(client: TestClient, service: Service) -> None:
    """keep_first keeps the earlier answer by created_at; keep_last the later one."""
    configure(client)
    client.post(
        "/v1/classifications",
        json=[
            p.classic(82, 900, 1, 1, created_at="2025-03-04T11:00:00Z"),
            p.classic(81, 900, 1, 0, created_at="2025-03-04T10:00:00Z"),
        ],
    )
    settle(service)
    subject = client.get(f"/v1/workflows/{p.WORKFLOW}/subjects/900").json()
    assert subject["counts"] == {"clumpy": 1, "not_clumpy": 0}
    assert subject["classifications"] == 2
    configure(client, {**p.clump_config(), "repeats": "keep_last"})
    settle(service)
    subject = client.get(f"/v1/workflows/{p.WORKFLOW}/subjects/900").json()
    assert subject["counts"] == {"clumpy": 0, "not_clumpy": 1}


def test_an_invalid_workflow_config_gets_422_naming_the_field(client: TestClient) -> None:
    """A point tool without a box size is refused, naming the tool."""
    config = p.clump_config()
    config["drawing"]["tools"][0].pop("box_size")
    response = client.put(f"/v1/workflows/{p.WORKFLOW}", json=config)
    assert response.status_code == 422
    assert response.json()["field"] == "drawing.tools.0"


def test_healthz_reports_the_database(client: TestClient) -> None:
    """/healthz answers 200 with the database reachable and jobs in-process."""
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["database"] == "ok"


def test_metrics_count_ingested_and_duplicates(client: TestClient) -> None:
    """/metrics exposes ingested and duplicate counters in Prometheus text format."""
    data = p.classic(91, 1000, 1, 0)
    client.post("/v1/classifications", json=data)
    client.post("/v1/classifications", json=data)
    text = client.get("/metrics").text
    assert 'gzx_ingested_total{route="panoptes"} 1.0' in text
    assert 'gzx_duplicates_total{route="panoptes"} 1.0' in text


def test_a_nan_in_one_events_metadata_is_refused_alone(
    client: TestClient, service: Service
) -> None:
    """NaN anywhere in an event (here its metadata) rejects that event only, naming the field."""
    configure(client)
    bad = p.classic(95, 1100, 3, 0)
    bad["metadata"]["viewport"] = {"width": float("nan")}
    body = p.batch(
        p.event(p.classic(94, 1100, 2, 0)), p.event(bad), p.event(p.classic(96, 1100, 4, 1))
    )
    text = json.dumps(body)  # Python writes NaN, as a careless sender might
    response = client.post(
        "/v1/ingest/kinesis", content=text, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200
    answer = response.json()
    assert (answer["stored"], answer["rejected"]) == (2, 1)
    assert answer["errors"][0]["index"] == 1
    assert answer["errors"][0]["field"].endswith("metadata.viewport.width")
    assert count(service, Classification) == 2


def test_the_subject_pending_longest_is_claimed_first(client: TestClient, service: Service) -> None:
    """A later vote keeps a pending subject's place in the queue; applying clears it."""
    from app import store
    from app.models import WorkflowSubject

    client.post(
        "/v1/classifications", json=p.classic(201, 9001, 1, 0)
    )  # unconfigured: stays pending
    client.post("/v1/classifications", json=p.classic(202, 9000, 2, 0))
    client.post("/v1/classifications", json=p.classic(203, 9001, 3, 0))  # 9001 again, later
    with service.sessions.begin() as session:
        first = session.get(WorkflowSubject, (p.WORKFLOW, 9001))
        second = session.get(WorkflowSubject, (p.WORKFLOW, 9000))
        assert first is not None and second is not None
        assert first.pending_since is not None and second.pending_since is not None
        assert first.pending_since <= second.pending_since <= first.updated_at
        assert store.claim_pending_subjects(session, p.WORKFLOW, 10) == [9001, 9000]
    configure(client)
    settle(service)
    with service.sessions() as session:
        applied = session.get(WorkflowSubject, (p.WORKFLOW, 9001))
        assert applied is not None and not applied.pending and applied.pending_since is None
        assert store.oldest_pending_age(session) == 0.0
