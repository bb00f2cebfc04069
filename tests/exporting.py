"""Ingest stream events into a service and take a real export of the result (trainer tests)."""

from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient

from app.service import Service
from tests import payloads as p


def ingest_and_export(
    client: TestClient,
    service: Service,
    workflow_id: int,
    events: list[dict[str, Any]],
    rules: dict[str, Any],
) -> str:
    """Post `events` through the stream route, wait for the in-process jobs, export; the id."""
    for start in range(0, len(events), 40):
        response = client.post("/v1/ingest/kinesis", json=p.batch(*events[start : start + 40]))
        assert response.status_code == 200, response.text
    assert service.dispatcher.wait_idle(60)  # type: ignore[attr-defined]
    started = client.post(f"/v1/workflows/{workflow_id}/exports", json=rules)
    assert started.status_code == 202, started.text
    export_id: str = started.json()["id"]
    for _ in range(600):
        status = client.get(f"/v1/exports/{export_id}").json()
        if status["status"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert status["status"] == "done", status
    return export_id
