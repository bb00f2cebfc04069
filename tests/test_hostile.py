"""Hostile input through the HTTP routes: schemathesis over the OpenAPI schema, Hypothesis over the
payload parsers, and the named attacks of issue 7. Every refusal is a 4xx whose JSON body names
the `field`; a refused request writes nothing (rows counted before and after). DESIGN.md,
invariant 2."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from sqlalchemy import func, select

from app.db import migrate
from app.models import Answer, Classification, Mark, Subject, View, Volunteer, WorkflowSubject
from app.pipeline import InProcessDispatcher
from app.service import Service, build_service
from app.settings import Settings
from tests import payloads as p
from tests import strategies

WF = p.WORKFLOW
BODY_LIMIT = 64 * 1024
TABLES = (Classification, View, Answer, Mark, Volunteer, Subject, WorkflowSubject)
HYPOTHESIS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Service]:
    """An open embedded service (SQLite) with the clump workflow and a small body limit."""
    url = f"sqlite:///{tmp_path / 'hostile.db'}"
    migrate(url)
    service = build_service(
        Settings(
            database_url=url,
            export_dir=tmp_path / "exports",
            sweep_interval_s=3600,
            max_body_bytes=BODY_LIMIT,
        )
    )
    client = TestClient(service.app)
    assert client.put(f"/v1/workflows/{WF}", json=p.clump_config()).status_code == 200
    yield service
    service.close()


def client_of(service: Service) -> TestClient:
    return TestClient(service.app, raise_server_exceptions=False)


def rows(service: Service) -> dict[str, int]:
    with service.sessions() as session:
        return {
            t.__tablename__: int(session.scalar(select(func.count()).select_from(t)) or 0)
            for t in TABLES
        }


def post_raw(client: TestClient, url: str, text: str) -> Any:
    return client.post(url, content=text, headers={"Content-Type": "application/json"})


def assert_refused(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    """A 4xx JSON body with an error name, a message and the field it names."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] and body["message"]
    assert body.get("field"), body
    if field is not None:
        assert body["field"] == field, body
    return dict(body)


# --------------------------------------------------------------------------- schemathesis


def test_no_route_answers_5xx_and_every_response_matches_the_schema(hostile: Service) -> None:
    """Schemathesis on every operation of the app's own schema (in-process ASGI): no 5xx, and
    status, content type, headers and body as declared."""
    client = TestClient(hostile.app)
    client.post("/v1/classifications", json=[p.classic(k, 7, k, k % 2) for k in range(1, 6)])
    schema = schemathesis.openapi.from_asgi("/openapi.json", hostile.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(api_routes(hostile))
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        def call(case: Any) -> None:
            # The ingest bodies are read by gzx's own parsers and are not described in the
            # schema, so "a schema-valid request is accepted" cannot hold there; the Hypothesis
            # tests below cover those bodies.
            case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])

        call()


def api_routes(service: Service) -> list[APIRoute]:
    return [
        route
        for route in service.app.routes
        if isinstance(route, APIRoute) and route.include_in_schema
    ]


# --------------------------------------------------------------------------- Hypothesis


@HYPOTHESIS
@given(data=strategies.hostile_classifications())
def test_a_classification_with_any_field_replaced_is_stored_or_refused_naming_the_field(
    hostile: Service, data: dict[str, Any]
) -> None:
    """Panoptes route: 200, or a 413/422 naming the field with nothing written."""
    client = client_of(hostile)
    before = rows(hostile)
    response = post_raw(client, "/v1/classifications", json.dumps(data))
    event(f"HTTP {response.status_code}")
    assert response.status_code in (200, 413, 422), response.text
    if response.status_code != 200:
        assert_refused(response, response.status_code)
        assert rows(hostile) == before


@HYPOTHESIS
@given(events=strategies.stream_batches())
def test_a_stream_event_with_any_field_replaced_never_fails_its_batch(
    hostile: Service, events: list[dict[str, Any]]
) -> None:
    """Kinesis route: 200; a bad event is listed with its index and field, the good ones stored."""
    client = client_of(hostile)
    response = post_raw(client, "/v1/ingest/kinesis", json.dumps({"payload": events}))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["received"] == len(events)
    assert body["stored"] + body["duplicates"] + body["skipped"] + body["rejected"] == len(events)
    event(f"{body['rejected']} of {len(events)} events rejected")
    for error in body["errors"]:
        assert 0 <= error["index"] < len(events)
        assert error.get("field") and error["message"]


@HYPOTHESIS
@given(body=strategies.hostile_caesar_bodies())
def test_a_caesar_body_with_any_field_replaced_is_stored_or_refused_naming_the_field(
    hostile: Service, body: dict[str, Any]
) -> None:
    """Caesar route: 200, or a 413/422 naming the field with nothing written."""
    client = client_of(hostile)
    before = rows(hostile)
    response = post_raw(client, "/v1/caesar/extract", json.dumps(body))
    event(f"HTTP {response.status_code}")
    assert response.status_code in (200, 413, 422), response.text
    if response.status_code != 200:
        assert_refused(response, response.status_code)
        assert rows(hostile) == before


# --------------------------------------------------------------------------- named attacks


def test_a_body_over_the_size_limit_is_413_before_parsing(hostile: Service) -> None:
    """A body past max_body_bytes gets 413 naming `body`, declared length or streamed."""
    client = client_of(hostile)
    big = json.dumps([p.classic(1, 1, 1, 0)] * 200)
    assert len(big) > BODY_LIMIT
    assert_refused(post_raw(client, "/v1/classifications", big), 413, "body")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts the bytes read
        for _ in range(100):
            yield b" " * 1024

    response = client.post(
        "/v1/ingest/kinesis", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_refused(response, 413, "body")
    assert rows(hostile)["classifications"] == 0


def test_deeply_nested_json_is_refused_naming_where(hostile: Service) -> None:
    """Lists nested 100 deep in an annotation: 422 naming the annotation; 10,000 deep, or a whole
    body of 60,000 brackets: 422 naming the body (the decoder's own limit), never a crash."""
    client = client_of(hostile)
    text = json.dumps(p.classic(1, 1, 1, 0))
    for depth, where in ((100, "annotations"), (10_000, "body")):
        nested = text.replace('"annotations": [', '"annotations": [' + "[" * depth, 1)
        nested = nested.replace('], "metadata":', "]" * (depth + 1) + ', "metadata":', 1)
        body = assert_refused(post_raw(client, "/v1/classifications", nested), 422)
        assert body["field"].startswith(where), body
        assert "deep" in body["message"]
    assert_refused(post_raw(client, "/v1/classifications", "[" * 60_000), 422, "body")
    assert rows(hostile)["classifications"] == 0


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_nan_and_infinite_coordinates_are_refused(hostile: Service, token: str) -> None:
    """A rectangle's x as NaN or ±infinity: 422 naming that coordinate."""
    client = client_of(hostile)
    text = json.dumps(p.classic(1, 1, 1, 0, boxes=[(10, 10, 5, 5)])).replace(
        '"x": 10', f'"x": {token}'
    )
    assert_refused(post_raw(client, "/v1/classifications", text), 422, "annotations[1].value[0].x")
    assert rows(hostile)["classifications"] == 0


@pytest.mark.parametrize(("width", "height", "field"), [(0, 5, "width"), (5, -3, "height")])
def test_zero_or_negative_box_sizes_are_refused(
    hostile: Service, width: float, height: float, field: str
) -> None:
    """A rectangle of zero or negative size: 422 naming width or height."""
    client = client_of(hostile)
    data = p.classic(1, 1, 1, 0, boxes=[(10, 10, width, height)])
    response = client.post("/v1/classifications", json=data)
    assert_refused(response, 422, f"annotations[1].value[0].{field}")
    assert rows(hostile)["classifications"] == 0


def test_a_mark_far_outside_its_known_image_is_refused(hostile: Service) -> None:
    """subject_dimensions says 424x424: a box at x = 5000 is 422 naming x; inside is fine."""
    client = client_of(hostile)
    outside = p.classic(1, 1, 1, 0, boxes=[(5000, 10, 5, 5)])
    assert_refused(
        client.post("/v1/classifications", json=outside), 422, "annotations[1].value[0].x"
    )
    assert rows(hostile)["classifications"] == 0
    inside = p.classic(2, 1, 1, 0, boxes=[(400, 10, 20, 5)])
    assert client.post("/v1/classifications", json=inside).status_code == 200


def test_ten_thousand_marks_in_one_classification_are_413(hostile: Service) -> None:
    """More marks than max_marks_per_classification: 413 naming the drawing task's value."""
    client = TestClient(
        build_service(hostile.settings.model_copy(update={"max_body_bytes": 10 * 1024 * 1024})).app,
        raise_server_exceptions=False,
    )
    data = p.classic(1, 1, 1, 0, boxes=[(float(k % 400), 10.0, 5.0, 5.0) for k in range(10_000)])
    before = rows(hostile)
    assert_refused(client.post("/v1/classifications", json=data), 413, "annotations[1].value")
    assert rows(hostile) == before


def test_a_tool_the_configured_task_lacks_is_refused(hostile: Service) -> None:
    """Tool 7 on the configured drawing task T1 (tools 0 and 1): 422 naming the tool."""
    client = client_of(hostile)
    data = p.classic(1, 1, 1, 0, boxes=[(10, 10, 5, 5)], tool=7)
    body = assert_refused(client.post("/v1/classifications", json=data), 422)
    assert body["field"].endswith("tool") and "T1" in body["field"]
    assert rows(hostile)["classifications"] == 0


def test_one_bad_item_refuses_a_whole_panoptes_list(hostile: Service) -> None:
    """Panoptes route is all or nothing: three good and one bad item store nothing."""
    client = client_of(hostile)
    good = [p.classic(k, 1, k, 0) for k in range(1, 4)]
    bad = p.classic(4, 1, 4, 0, boxes=[(10, 10, 5, 5)], tool=9)
    body = assert_refused(client.post("/v1/classifications", json=[*good, bad]), 422)
    assert body["field"].startswith("[3].")
    assert rows(hostile)["classifications"] == 0


def test_a_bad_stream_event_is_listed_and_its_neighbours_are_stored(hostile: Service) -> None:
    """Kinesis: a bad event between two good ones is reported by index; the good ones land."""
    client = client_of(hostile)
    bad = p.classic(2, 1, 2, 0, boxes=[(10, 10, -5, 5)])
    events = [p.event(p.classic(1, 1, 1, 0)), p.event(bad), p.event(p.classic(3, 1, 3, 1))]
    body = client.post("/v1/ingest/kinesis", json=p.batch(*events)).json()
    assert (body["stored"], body["rejected"]) == (2, 1)
    assert body["errors"][0]["index"] == 1
    assert body["errors"][0]["field"].endswith("width")
    assert rows(hostile)["classifications"] == 2


@pytest.mark.parametrize(
    ("route", "make", "field"),
    [
        ("/v1/classifications", lambda d: {**d, "id": "abc"}, "id"),
        ("/v1/classifications", lambda d: {**d, "id": 1.5}, "id"),
        (
            "/v1/classifications",
            lambda d: {**d, "links": {**d["links"], "subjects": [True]}},
            "links.subjects[0]",
        ),
        (
            "/v1/classifications",
            lambda d: {**d, "links": {**d["links"], "workflow": {"id": 1}}},
            "links.workflow",
        ),
        ("/v1/caesar/extract", lambda d: {**p.caesar(d), "subject_id": "1.5"}, "subject_id"),
        ("/v1/caesar/extract", lambda d: {**p.caesar(d), "user_id": [3]}, "user_id"),
    ],
)
def test_ids_of_the_wrong_type_are_refused_naming_the_id(
    hostile: Service, route: str, make: Any, field: str
) -> None:
    """A string, float, boolean or object where an id belongs: 422 naming that id."""
    client = client_of(hostile)
    response = client.post(route, json=make(p.classic(1, 1, 1, 0)))
    assert_refused(response, 422, field)
    assert rows(hostile)["classifications"] == 0


@pytest.mark.parametrize(
    "path",
    [
        "/v1/workflows/99999999999999999999999/stats",
        f"/v1/workflows/{WF}/subjects/-99999999999999999999",
        "/v1/workflows/abc/stats",
    ],
)
def test_path_ids_out_of_range_or_of_the_wrong_type_are_422(hostile: Service, path: str) -> None:
    """A path id the database cannot hold, or not a number: 422 naming it, not a driver 500."""
    body = assert_refused(client_of(hostile).get(path), 422)
    assert body["field"] in ("workflow_id", "subject_id")


def _set(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = p.classic(1, 1, 1, 0, boxes=[(10, 10, 5, 5)])
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


@pytest.mark.parametrize(
    "path",
    [
        ("annotations", 0, "value"),
        ("annotations", 1, "value", 0, "frame"),
        ("annotations", 1, "task"),  # tool index checked only on the configured task T1
    ],
    ids=["answer", "frame", "tool"],
)
def test_indices_beyond_32_bits_are_refused_not_a_500(pg_service: Service, path: Any) -> None:
    """An answer index, a frame or a tool of 2**40 on PostgreSQL: 422 naming it, not a 500."""
    client = client_of(pg_service)
    client.put(f"/v1/workflows/{WF}", json=p.clump_config())
    data = _set(path, 2**40)
    if path[-1] == "task":
        data = _set(path, "T5")
        data["annotations"][1]["value"][0]["tool"] = 2**40
    response = client.post("/v1/classifications", json=data)
    assert_refused(response, 422)
    assert rows(pg_service)["classifications"] == 0


def test_a_workflow_version_beyond_the_column_is_refused_not_a_500(service: Service) -> None:
    """workflow_version '99999999999999999999.1': 422 naming workflow_version, not a 500."""
    client = client_of(service)
    data = _set(("workflow_version",), "99999999999999999999.1")
    assert_refused(client.post("/v1/classifications", json=data), 422, "workflow_version")


def test_an_image_size_too_large_for_a_float_is_refused_not_a_500(service: Service) -> None:
    """metadata.subject_dimensions[0].naturalWidth = 10**400: a 422, not a 500."""
    client = client_of(service)
    data = _set(("metadata", "subject_dimensions", 0, "naturalWidth"), 10**400)
    assert_refused(client.post("/v1/classifications", json=data), 422)


@pytest.mark.parametrize("value", ["9" * 30, 2**70, "١٢"])
def test_caesar_reduce_refuses_ids_it_cannot_hold(hostile: Service, value: Any) -> None:
    """Caesar's reducer call with a workflow id beyond int64 or in non-ASCII digits: 422."""
    body = [{"workflow_id": value, "subject_id": 1, "data": {}}]
    response = client_of(hostile).post("/v1/caesar/reduce", json=body)
    assert_refused(response, 422, "extracts[0].workflow_id")


@pytest.mark.parametrize("version", ["-9223372036854775809", -(2**63) - 1, "-3000000000.1"])
def test_a_negative_workflow_version_beyond_the_column_is_refused_not_a_500(
    service: Service, version: Any
) -> None:
    """A Caesar body's workflow_version far below zero: 422 naming workflow_version, no 500."""
    client = client_of(service)
    body = {**p.caesar(p.classic(1, 1, 1, 0)), "workflow_version": version}
    assert_refused(client.post("/v1/caesar/extract", json=body), 422, "workflow_version")
    assert rows(service)["classifications"] == 0


@pytest.mark.parametrize("route", ["/v1/classifications", "/v1/caesar/extract"])
def test_an_integer_workflow_version_too_large_for_a_float_is_refused_not_a_500(
    hostile: Service, route: str
) -> None:
    """workflow_version given as the integer 10**400: 422 naming workflow_version, no 500."""
    data = p.classic(1, 1, 1, 0)
    body = p.caesar(data) if "caesar" in route else data
    body["workflow_version"] = 10**400
    assert_refused(client_of(hostile).post(route, json=body), 422, "workflow_version")
    assert rows(hostile)["classifications"] == 0


@pytest.mark.parametrize("name", ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%00"])
def test_path_traversal_in_a_path_parameter_finds_nothing(hostile: Service, name: str) -> None:
    """A volunteer named like a path (`../../etc/passwd`): a 404 or 422 in gzx's shape."""
    response = client_of(hostile).get(f"/v1/workflows/{WF}/volunteers/{name}")
    assert response.status_code in (404, 422)
    assert response.json()["error"]


@pytest.mark.parametrize(
    "name",
    [
        "../secret.txt",
        "..%2Fsecret.txt",
        "%2e%2e/%2e%2e/secret.txt",
        "manifest.json/../../secret.txt",
        "..%5Csecret.txt",
        "%2Fetc%2Fpasswd",
        "/etc/passwd",
        "secret.txt",
    ],
)
def test_path_traversal_in_an_export_file_name_reads_nothing_outside_it(
    hostile: Service, tmp_path: Path, name: str
) -> None:
    """A finished export's files: manifest.json is served; names that climb out of the export's
    directory (plain, percent-encoded, backslashed, absolute) get a 4xx and no file's bytes."""
    client = client_of(hostile)
    exports_dir = hostile.settings.export_dir
    exports_dir.mkdir(parents=True, exist_ok=True)
    for where in (tmp_path / "secret.txt", exports_dir / "secret.txt"):
        where.write_text("TOP-SECRET-CONTENT")
    client.post("/v1/classifications", json=[p.classic(k, 7, k, 0) for k in range(1, 5)])
    export_id = client.post(f"/v1/workflows/{WF}/exports", json={}).json()["id"]
    deadline = time.monotonic() + 30
    while client.get(f"/v1/exports/{export_id}").json()["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.get(f"/v1/exports/{export_id}/files/manifest.json").status_code == 200
    response = client.get(f"/v1/exports/{export_id}/files/{name}")
    assert 400 <= response.status_code < 500, (name, response.status_code)
    assert "TOP-SECRET" not in response.text
    assert "root:" not in response.text


def test_annotations_of_an_unconfigured_task_are_kept_and_ignored(hostile: Service) -> None:
    """A survey task T9 the workflow does not configure: stored in raw, no effect on the vote."""
    client = client_of(hostile)
    data = p.classic(1, 1, 1, 0)
    data["annotations"].append({"task": "T9", "value": [{"choice": "ZEBRA", "answers": {}}]})
    data["annotations"].append({"task": "T8", "value": "free text"})
    assert client.post("/v1/classifications", json=data).status_code == 200
    assert isinstance(hostile.dispatcher, InProcessDispatcher)
    assert hostile.dispatcher.wait_idle(30)
    with hostile.sessions() as session:
        stored = session.get(Classification, 1)
        assert stored is not None
        assert {a["task"] for a in stored.raw["annotations"]} == {"T0", "T9", "T8"}
        assert session.scalar(select(func.count()).select_from(Answer)) == 1
    subject = client.get(f"/v1/workflows/{WF}/subjects/1").json()
    assert subject["counts"] == {"clumpy": 1, "not_clumpy": 0}
