"""Effects of retirement reach the platform: Panoptes retirement through panoptes-client, a signed
webhook, Caesar's subject-reductions API and external-reducer route. A real local HTTP server
stands in for Panoptes and Caesar and records what arrives."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.models import Effect
from app.pipeline import InProcessDispatcher
from app.service import Service, build_service
from app.settings import Settings
from tests import payloads as p

WF = p.WORKFLOW


class Platform:
    """Records requests; answers 500 to the first `failures` retirement calls."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.lock = threading.Lock()

    def retirements(self) -> list[Any]:
        return [b for m, path, _, b in self.requests if path.endswith("/retired_subjects")]


def serve(platform: Platform) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length).decode()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw
            with platform.lock:
                platform.requests.append((self.command, self.path, dict(self.headers), body))
                failing = self.path.endswith("/retired_subjects") and platform.failures > 0
                if failing:
                    platform.failures -= 1
            if self.path.startswith("/oauth/token"):
                out = json.dumps({"access_token": "t0ken", "expires_in": 7200}).encode()
                self.send_response(200)
            elif failing:
                out = b'{"errors": ["down"]}'
                self.send_response(500)
            else:
                out = b"{}"
                self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_POST = do_PUT = do_GET = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def platform() -> Iterator[tuple[Platform, str]]:
    record = Platform()
    server, url = serve(record)
    yield record, url
    server.shutdown()
    server.server_close()


def config(url: str, **effects: Any) -> dict[str, Any]:
    return {
        "classes": ["yes", "no"],
        "question": {
            "task": "T0",
            "answers": [{"index": 0, "class": "yes"}, {"index": 1, "class": "no"}],
        },
        "retirement": {"kind": "risk", "risk_bound": 0.3, "min_views": 2},
        "effects": {
            "panoptes": True,
            "webhook_url": f"{url}/hook",
            "webhook_secret": "s3cret",
            "caesar_url": url,
            **effects,
        },
    }


@pytest.fixture
def wired(service: Service, platform: tuple[Platform, str], tmp_path: Path) -> Iterator[Service]:
    """The service of `service` (PG or SQLite), with Panoptes credentials pointing at the fake."""
    _, url = platform
    settings = Settings(
        database_url=service.settings.database_url,
        export_dir=tmp_path,
        sweep_interval_s=3600,
        panoptes_endpoint=url,
        panoptes_client_id="id",
        panoptes_client_secret="secret",
        caesar_token="caesar-t0ken",
    )
    service.close()
    wired = build_service(settings)
    yield wired
    wired.close()


def retire(client: TestClient, subject: int, first_id: int) -> None:
    votes = [p.classic(first_id + k, subject, 100 + k, 0) for k in range(2)]
    assert client.post("/v1/classifications", json=votes).status_code == 200


def settle(service: Service) -> None:
    assert isinstance(service.dispatcher, InProcessDispatcher)
    assert service.dispatcher.wait_idle(30)


def test_a_retirement_reaches_each_endpoint_once(
    wired: Service, platform: tuple[Platform, str]
) -> None:
    """One retirement: one Panoptes call with an allowed reason, one signed webhook, one push."""
    record, url = platform
    client = TestClient(wired.app)
    client.put(f"/v1/workflows/{WF}", json=config(url))
    retire(client, 500, 1)
    settle(wired)
    assert record.retirements() == [{"subject_ids": [500], "retirement_reason": "consensus"}]
    hooks = [(h, b) for m, path, h, b in record.requests if path == "/hook"]
    assert len(hooks) == 1
    headers, body = hooks[0]
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    expected = hmac.new(b"s3cret", headers["X-Gzx-Timestamp"].encode() + b"." + raw, hashlib.sha256)
    assert headers["X-Gzx-Signature"] == "sha256=" + expected.hexdigest()
    assert body["subject_id"] == 500 and body["retire"] is True
    pushes = [(h, b) for m, path, h, b in record.requests if "subject_reductions" in path]
    assert len(pushes) == 1
    assert pushes[0][1]["reduction"]["subject_id"] == 500
    assert pushes[0][0]["Authorization"] == "Bearer caesar-t0ken"
    retire(client, 500, 10)  # more votes on a retired subject fire nothing again
    settle(wired)
    assert len(record.retirements()) == 1


def test_a_failing_panoptes_is_retried_until_it_answers(
    wired: Service, platform: tuple[Platform, str]
) -> None:
    """Panoptes fails twice; the effect is retried with backoff and lands exactly once."""
    from app import effects

    record, url = platform
    record.failures = 2
    client = TestClient(wired.app)
    client.put(f"/v1/workflows/{WF}", json=config(url, webhook_url=None, caesar_url=None))
    retire(client, 501, 1)
    settle(wired)
    for _ in range(2):
        with wired.sessions.begin() as session:  # time passes: make the retry due now
            for effect in session.scalars(select(Effect)):
                effect.next_attempt_at = None
        effects.deliver_effects(wired.sessions, wired.settings, WF)
    assert len(record.retirements()) == 3
    with wired.sessions() as session:
        stored = session.scalars(select(Effect)).all()
    assert [(e.kind, e.status, e.attempts) for e in stored] == [("panoptes", "done", 3)]
    effects.deliver_effects(wired.sessions, wired.settings, WF)
    assert len(record.retirements()) == 3


def test_dry_run_and_platform_retired_subjects_send_nothing(
    wired: Service, platform: tuple[Platform, str]
) -> None:
    """A dry run records skipped effects; nothing reaches the platform."""
    record, url = platform
    client = TestClient(wired.app)
    client.put(f"/v1/workflows/{WF}", json=config(url, dry_run=True))
    retire(client, 502, 1)
    settle(wired)
    assert record.retirements() == []
    assert not [r for r in record.requests if r[1] == "/hook"]
    with wired.sessions() as session:
        assert {e.status for e in session.scalars(select(Effect))} == {"skipped"}


def test_panoptes_calls_carry_at_most_100_subjects(
    wired: Service, platform: tuple[Platform, str]
) -> None:
    """250 retirements go to Panoptes in three calls of at most 100 ids."""
    record, url = platform
    client = TestClient(wired.app)
    client.put(f"/v1/workflows/{WF}", json=config(url, webhook_url=None, caesar_url=None))
    votes = [
        p.classic(10_000 + 2 * s + k, 600 + s, 100 + k, 0) for s in range(250) for k in range(2)
    ]
    for start in range(0, len(votes), 100):
        client.post("/v1/classifications", json=votes[start : start + 100])
    settle(wired)
    sizes = sorted(len(b["subject_ids"]) for b in record.retirements())
    assert sum(sizes) == 250 and max(sizes) <= 100
    assert len({s for b in record.retirements() for s in b["subject_ids"]}) == 250


def test_the_caesar_reducer_route_answers_with_a_retire_flag(wired: Service) -> None:
    """Caesar's reducer call gets the posterior, the label and retire=true once settled."""
    client = TestClient(wired.app)
    client.put(f"/v1/workflows/{WF}", json={**config("http://127.0.0.1:9"), "effects": {}})
    extracts = [
        {
            "id": 1,
            "classification_id": 1,
            "workflow_id": WF,
            "subject_id": 700,
            "user_id": None,
            "data": {"0": 1},
        }
    ]
    assert client.post("/v1/caesar/reduce", json=extracts).status_code == 204
    retire(client, 700, 1)
    settle(wired)
    answer = client.post("/v1/caesar/reduce", json={"extracts": extracts, "store": {}})
    assert answer.status_code == 200
    assert answer.json()["retire"] is True and answer.json()["label"] == "yes"
    bad = client.post("/v1/caesar/reduce", json=[{"subject_id": "x", "workflow_id": WF}])
    assert bad.status_code == 422 and bad.json()["field"] == "extracts[0].subject_id"
