"""Credentials: scopes per route, Basic for the stream, a query secret for Caesar, refusal to
listen beyond loopback with none configured."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.service import Service, build_service
from app.settings import Settings
from tests import payloads as p

TOKENS = "reader-token=read;ingester-token=ingest;admin-token=admin"


@pytest.fixture
def secured(sqlite_url: str, tmp_path: Path) -> Iterator[Service]:
    settings = Settings(
        database_url=sqlite_url,
        tokens=TOKENS,
        kinesis_username="forwarder",
        kinesis_password="kinesis-pass",
        caesar_secret="caesar-secret",
        export_dir=tmp_path,
        sweep_interval_s=3600,
    )
    service = build_service(settings)
    yield service
    service.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_each_route_needs_its_scope(secured: Service) -> None:
    """No credential: 401; a wrong scope: 403; the right scope (or admin): success."""
    client = TestClient(secured.app)
    url = f"/v1/workflows/{p.WORKFLOW}"
    assert client.put(url, json=p.clump_config()).status_code == 401
    assert client.put(url, json=p.clump_config(), headers=bearer("reader-token")).status_code == 403
    assert client.put(url, json=p.clump_config(), headers=bearer("admin-token")).status_code == 200
    assert client.get(url).status_code == 401
    assert client.get(url, headers=bearer("ingester-token")).status_code == 403
    assert client.get(url, headers=bearer("reader-token")).status_code == 200
    one = p.classic(1, 10, 1, 0)
    assert client.post("/v1/classifications", json=one).status_code == 401
    assert (
        client.post("/v1/classifications", json=one, headers=bearer("reader-token")).status_code
        == 403
    )
    assert (
        client.post("/v1/classifications", json=one, headers=bearer("ingester-token")).status_code
        == 200
    )
    assert client.get("/metrics").status_code == 401
    assert client.get("/healthz").status_code == 200


def test_an_unknown_token_is_refused_without_echoing_it(secured: Service) -> None:
    """A wrong bearer token gets 401 and the body does not contain the token."""
    client = TestClient(secured.app)
    response = client.get(f"/v1/workflows/{p.WORKFLOW}", headers=bearer("guess-123"))
    assert response.status_code == 401
    assert "guess-123" not in response.text


def test_the_stream_route_takes_basic_credentials(secured: Service) -> None:
    """The forwarder's Basic credentials are accepted; wrong ones are refused."""
    client = TestClient(secured.app)
    body = p.batch(p.event(p.classic(2, 10, 1, 0)))
    assert client.post("/v1/ingest/kinesis", json=body).status_code == 401
    assert (
        client.post("/v1/ingest/kinesis", json=body, headers=basic("forwarder", "nope")).status_code
        == 401
    )
    response = client.post(
        "/v1/ingest/kinesis", json=body, headers=basic("forwarder", "kinesis-pass")
    )
    assert response.status_code == 200
    assert response.json()["stored"] == 1


def test_the_caesar_route_takes_the_secret_in_the_query(secured: Service) -> None:
    """Caesar sends no header: the secret travels in the URL query."""
    client = TestClient(secured.app)
    body = p.caesar(p.classic(3, 10, 1, 0))
    assert client.post("/v1/caesar/extract", json=body).status_code == 401
    assert client.post("/v1/caesar/extract?secret=wrong", json=body).status_code == 401
    response = client.post("/v1/caesar/extract?secret=caesar-secret", json=body)
    assert response.status_code == 200
    assert response.json() == {"gzx": "stored", "classification_id": 3}


def test_serve_refuses_a_public_address_without_credentials(tmp_path: Path) -> None:
    """`gzx serve --host 0.0.0.0` with no credentials exits non-zero and says why."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GZX_")}
    env["GZX_DATABASE_URL"] = f"sqlite:///{tmp_path / 'x.db'}"
    gzx = Path(sys.executable).with_name("gzx")
    result = subprocess.run(
        [str(gzx), "serve", "--host", "0.0.0.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "refusing" in result.stderr
