"""Access and privacy: every route of the app walked with no credential, each wrong scope and the
right one; constant-time comparisons; no secret in logs, error bodies or access logs; IPs kept
only as salted hashes; a volunteer can be forgotten. DESIGN.md, invariant 3 and "Privacy".

Decision: the OpenAPI schema and its two documentation pages (`/openapi.json`, `/docs`,
`/docs/oauth2-redirect`, `/redoc`) are open, like `/healthz`. They describe the API's shape,
which is public in the source; they hold no data and no secret (a test below checks that), and a
browser cannot send a bearer token to fetch the schema for Swagger UI.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from starlette.routing import Route
from uvicorn.logging import AccessFormatter

from app import auth
from app.db import migrate
from app.models import Base, Classification, Volunteer
from app.pipeline import InProcessDispatcher
from app.service import Service, build_service
from app.settings import Settings, get_settings
from app.store import hash_ip
from tests import payloads as p
from tests.servers import free_port

WF = p.WORKFLOW
TOKENS = {"read": "r-token-5f1c", "ingest": "i-token-9a2e", "admin": "a-token-77d0"}
KINESIS_USER, KINESIS_PASSWORD = "forwarder", "kinesis-pass-3b8e"
CAESAR_SECRET = "caesar-secret-c4d9"
SALT = "ip-salt-e6a1"
SECRETS = (*TOKENS.values(), KINESIS_PASSWORD, CAESAR_SECRET, SALT)
WRONG = ("guess-token-0000", "wrong-pass-1111", "wrong-secret-2222")
IPS = ("203.0.113.7", "198.51.100.23", "192.0.2.250")
OPEN = "open"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@dataclass(frozen=True)
class Call:
    """A request that succeeds on a configured workflow given the right credential."""

    path: str
    json: Any = None
    content: bytes | None = None


_ids = iter(range(10_000, 1_000_000))


def _classification() -> dict[str, Any]:
    return p.classic(next(_ids), 11, 4, 0)


# Requests that succeed with the right credential, for the routes whose success is checked in
# full. Every other route of the app is still walked (no, wrong and each credential) with its
# path parameters filled by placeholders: its credential is read from its dependencies.
ACCESS: dict[tuple[str, str], tuple[str, Callable[[], Call]]] = {
    ("GET", "/openapi.json"): (OPEN, lambda: Call("/openapi.json")),
    ("GET", "/docs"): (OPEN, lambda: Call("/docs")),
    ("GET", "/docs/oauth2-redirect"): (OPEN, lambda: Call("/docs/oauth2-redirect")),
    ("GET", "/redoc"): (OPEN, lambda: Call("/redoc")),
    ("GET", "/healthz"): (OPEN, lambda: Call("/healthz")),
    ("GET", "/metrics"): ("read", lambda: Call("/metrics")),
    ("POST", "/v1/ingest/kinesis"): (
        "kinesis",
        lambda: Call("/v1/ingest/kinesis", json=p.batch(p.event(_classification()))),
    ),
    ("POST", "/v1/classifications"): (
        "ingest",
        lambda: Call("/v1/classifications", json=_classification()),
    ),
    ("POST", "/v1/caesar/extract"): (
        "caesar",
        lambda: Call("/v1/caesar/extract", json=p.caesar(_classification())),
    ),
    ("POST", "/v1/caesar/reduce"): (
        "caesar",
        lambda: Call("/v1/caesar/reduce", json=[{"workflow_id": WF, "subject_id": 11, "data": {}}]),
    ),
    ("PUT", "/v1/workflows/{workflow_id}"): (
        "admin",
        lambda: Call(f"/v1/workflows/{WF}", json=p.clump_config()),
    ),
    ("GET", "/v1/workflows/{workflow_id}"): ("read", lambda: Call(f"/v1/workflows/{WF}")),
    ("GET", "/v1/workflows/{workflow_id}/subjects/{subject_id}"): (
        "read",
        lambda: Call(f"/v1/workflows/{WF}/subjects/11"),
    ),
    ("GET", "/v1/workflows/{workflow_id}/stats"): (
        "read",
        lambda: Call(f"/v1/workflows/{WF}/stats"),
    ),
    ("PUT", "/v1/workflows/{workflow_id}/gold"): (
        "admin",
        lambda: Call(
            f"/v1/workflows/{WF}/gold", json={"subjects": [{"subject_id": 11, "label": "clumpy"}]}
        ),
    ),
    ("POST", "/v1/workflows/{workflow_id}/retirement-preview"): (
        "read",
        lambda: Call(f"/v1/workflows/{WF}/retirement-preview", json={"min_views": 2}),
    ),
    ("POST", "/v1/workflows/{workflow_id}/refit"): (
        "admin",
        lambda: Call(f"/v1/workflows/{WF}/refit"),
    ),
    ("GET", "/v1/workflows/{workflow_id}/volunteers/{volunteer}"): (
        "read",
        lambda: Call(f"/v1/workflows/{WF}/volunteers/user:4"),
    ),
}


# Open: /healthz, the OpenAPI schema and its pages, and the dashboard's code and style (the
# package's own files; they hold no data).
OPEN_PATHS = frozenset(
    {
        "/healthz",
        "/openapi.json",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/static/dashboard.js",
        "/static/dashboard.css",
    }
)
# Routes that check their credential inside the handler (no dependency to read it from): the
# dashboard's pages and its login form take a token with the read scope.
CHECKED_IN_HANDLER = {
    ("GET", "/"): "read",
    ("GET", "/workflows/{workflow_id}"): "read",
    ("GET", "/workflows/{workflow_id}/subjects/{subject_id}"): "read",
    ("POST", "/login"): "read",
}


def app_routes(service: Service) -> list[tuple[str, str]]:
    """(method, path template) of every route the app serves (HEAD left out: it follows GET)."""
    found = []
    for route in service.app.routes:
        assert isinstance(route, Route), route  # a Mount would need walking into
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                found.append((method, route.path))
    return found


def _credentials_of(dependant: Any) -> set[str]:
    """The credentials an endpoint's dependencies (and theirs) ask app.auth for."""
    found: set[str] = set()
    call = dependant.call
    owner = getattr(call, "__self__", None)
    if isinstance(owner, auth.Authenticator):
        found.add({"require_kinesis": "kinesis", "require_caesar": "caesar"}[call.__name__])
    elif getattr(call, "__qualname__", "").startswith("Authenticator.require."):
        cells = dict(zip(call.__code__.co_freevars, call.__closure__ or (), strict=True))
        found.add(cells["scope"].cell_contents)
    for sub in dependant.dependencies:
        found |= _credentials_of(sub)
    return found


def credential_of(service: Service, method: str, path: str) -> str | None:
    """ "open", a scope, "kinesis" or "caesar"; None when the route declares none we know."""
    if path in OPEN_PATHS:
        return OPEN
    if (method, path) in CHECKED_IN_HANDLER:
        return CHECKED_IN_HANDLER[(method, path)]
    for route in service.app.routes:
        if isinstance(route, APIRoute) and route.path == path and method in route.methods:
            found = _credentials_of(route.dependant)
            return found.pop() if len(found) == 1 else None
    return None


def placeholder(path: str) -> str:
    """The path template with every parameter filled by a harmless value."""
    return re.sub(r"\{[^}]+\}", "1", path)


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Service]:
    """An embedded service with every kind of credential configured, a workflow, some votes."""
    url = f"sqlite:///{tmp_path / 'access.db'}"
    migrate(url)
    settings = Settings(
        database_url=url,
        tokens=";".join(f"{token}={scope}" for scope, token in TOKENS.items()),
        kinesis_username=KINESIS_USER,
        kinesis_password=KINESIS_PASSWORD,
        caesar_secret=CAESAR_SECRET,
        ip_salt=SALT,
        export_dir=tmp_path / "exports",
        sweep_interval_s=3600,
    )
    service = build_service(settings)
    client = TestClient(service.app)
    admin = bearer(TOKENS["admin"])
    assert client.put(f"/v1/workflows/{WF}", json=p.clump_config(), headers=admin).is_success
    votes = [p.classic(k, 11, k % 5, k % 2, user_ip=IPS[k % 3]) for k in range(1, 9)]
    assert client.post("/v1/classifications", json=votes, headers=admin).is_success
    yield service
    service.close()


def send(client: TestClient, method: str, call: Call, **kwargs: Any) -> httpx.Response:
    return client.request(method, call.path, json=call.json, content=call.content, **kwargs)


# --------------------------------------------------------------------------- the walk


def test_every_route_of_the_app_is_open_or_declares_one_credential(secured: Service) -> None:
    """Each route enumerated from the app is one of the open ones or needs exactly one known
    credential (a scope, the stream's Basic, Caesar's secret)."""
    unknown = [r for r in app_routes(secured) if credential_of(secured, *r) is None]
    assert unknown == []
    assert {r for r in app_routes(secured) if credential_of(secured, *r) == OPEN} == {
        ("GET", path) for path in OPEN_PATHS
    }
    assert set(ACCESS) <= set(app_routes(secured))


def test_every_route_but_the_open_ones_refuses_a_request_with_no_credential(
    secured: Service,
) -> None:
    """Walking app.routes with no credential: 401 everywhere but the open routes, which answer."""
    client = TestClient(secured.app, raise_server_exceptions=False)
    for method, path in app_routes(secured):
        response = client.request(method, placeholder(path))
        if credential_of(secured, method, path) == OPEN:
            assert response.status_code == 200, (method, path)
        else:
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["field"] in ("authorization", "secret")


def test_every_route_but_the_open_ones_refuses_wrong_credentials(secured: Service) -> None:
    """Unknown bearer tokens, wrong Basic credentials, a malformed header, a wrong Caesar secret
    and a forged dashboard cookie: 401 on every closed route."""
    client = TestClient(secured.app, raise_server_exceptions=False)
    for method, path in app_routes(secured):
        if credential_of(secured, method, path) == OPEN:
            continue
        url = placeholder(path)
        for headers in (
            bearer(WRONG[0]),
            basic(KINESIS_USER, WRONG[1]),
            {"Authorization": "x"},
            {"Cookie": f"gzx_read={WRONG[0]}"},
        ):
            response = client.request(method, url, headers=headers)
            assert response.status_code == 401, (method, path, headers)
        response = client.request(method, url + f"?secret={WRONG[2]}")
        assert response.status_code == 401, (method, path)


def test_every_route_refuses_the_wrong_scope_and_lets_the_right_one_through(
    secured: Service,
) -> None:
    """Each bearer scope, the stream's Basic and Caesar's secret on every route: 403 for a scope
    the route does not take (admin takes all), 401 for a credential of another kind, and past
    the check (neither 401 nor 403) for the right one."""
    client = TestClient(secured.app, raise_server_exceptions=False)
    wrong: list[tuple[str, str, str, int]] = []
    for method, path in app_routes(secured):
        rule = credential_of(secured, method, path)
        if rule == OPEN:
            continue
        url = placeholder(path)
        for scope, token in TOKENS.items():
            got = client.request(method, url, headers=bearer(token)).status_code
            if rule == "caesar":
                want_ok, refused = False, 401  # Caesar's routes take only their secret
            else:
                want_ok = scope in (rule, "admin") or (rule == "kinesis" and scope == "ingest")
                refused = 403
            if (got in (401, 403)) == want_ok or (not want_ok and got != refused):
                wrong.append((method, path, scope, got))
        got = client.request(method, url, headers=basic(KINESIS_USER, KINESIS_PASSWORD)).status_code
        if (got in (401, 403)) == (rule == "kinesis"):
            wrong.append((method, path, "basic", got))
        got = client.request(method, f"{url}?secret={CAESAR_SECRET}").status_code
        if (got in (401, 403)) == (rule == "caesar"):
            wrong.append((method, path, "secret", got))
    assert wrong == []


@pytest.mark.parametrize("route", sorted(ACCESS), ids=lambda r: f"{r[0]} {r[1]}")
def test_the_right_credential_gets_a_real_answer_from_each_checked_route(
    secured: Service, route: tuple[str, str]
) -> None:
    """With a real request: each bearer scope gets 403 where the route needs another (admin holds
    all) and a 2xx where it is right; Basic opens only the stream, the secret only Caesar's."""
    method, _ = route
    rule, make = ACCESS[route]
    client = TestClient(secured.app, raise_server_exceptions=False)
    for scope, token in TOKENS.items():
        response = send(client, method, make(), headers=bearer(token))
        if rule == OPEN:
            assert response.status_code == 200
        elif rule == "caesar":
            assert response.status_code == 401, scope  # Caesar's route takes only its secret
        elif scope == rule or scope == "admin" or (rule == "kinesis" and scope == "ingest"):
            assert response.is_success, (scope, response.text)
        else:
            assert response.status_code == 403, (scope, response.text)
            assert response.json()["field"] == "authorization"
    basic_response = send(client, method, make(), headers=basic(KINESIS_USER, KINESIS_PASSWORD))
    with_secret = make()
    secret_response = send(
        client, method, Call(f"{with_secret.path}?secret={CAESAR_SECRET}", with_secret.json)
    )
    if rule == OPEN:
        assert basic_response.status_code == secret_response.status_code == 200
    else:
        assert basic_response.is_success == (rule == "kinesis"), basic_response.text
        assert secret_response.is_success == (rule == "caesar"), secret_response.text


def test_the_docs_pages_are_open_and_hold_no_secret(secured: Service) -> None:
    """/openapi.json, /docs and /redoc answer without a credential and name no secret."""
    client = TestClient(secured.app)
    for path in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"):
        response = client.get(path)
        assert response.status_code == 200
        assert not any(secret in response.text for secret in SECRETS), path


# --------------------------------------------------------------------------- constant time


@pytest.fixture
def compare_digest_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    """Every call of hmac.compare_digest made by app.auth, recorded (and still answered)."""
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    return calls


def test_bearer_tokens_are_compared_in_constant_time_against_every_token(
    secured: Service, compare_digest_calls: list[tuple[bytes, bytes]]
) -> None:
    """A bearer token, right or wrong, is compared by hmac.compare_digest with every configured
    token (no early exit: the time does not tell which token, or how much of one, matched)."""
    client = TestClient(secured.app)
    for token in (TOKENS["read"], WRONG[0]):
        compare_digest_calls.clear()
        client.get(f"/v1/workflows/{WF}", headers=bearer(token))
        assert sorted(b for _, b in compare_digest_calls) == sorted(
            t.encode() for t in TOKENS.values()
        )
        assert {a for a, _ in compare_digest_calls} == {token.encode()}


def test_basic_credentials_and_the_caesar_secret_are_compared_in_constant_time(
    secured: Service, compare_digest_calls: list[tuple[bytes, bytes]]
) -> None:
    """The stream's user and password (both, even when the user is wrong) and Caesar's secret go
    through hmac.compare_digest."""
    client = TestClient(secured.app, raise_server_exceptions=False)
    body = p.batch(p.event(_classification()))
    client.post("/v1/ingest/kinesis", json=body, headers=basic("nobody", KINESIS_PASSWORD))
    assert (b"nobody", KINESIS_USER.encode()) in compare_digest_calls
    assert (KINESIS_PASSWORD.encode(), KINESIS_PASSWORD.encode()) in compare_digest_calls
    compare_digest_calls.clear()
    client.post(f"/v1/caesar/extract?secret={WRONG[2]}", json=p.caesar(_classification()))
    assert compare_digest_calls == [(WRONG[2].encode(), CAESAR_SECRET.encode())]


# --------------------------------------------------------------------------- secrets


def test_no_secret_appears_in_logs_or_error_bodies(
    secured: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """Right and wrong credentials on every route: no token, password, secret or salt (nor the
    wrong guesses) in any response body or log record, at DEBUG."""
    caplog.set_level(logging.DEBUG)
    client = TestClient(secured.app, raise_server_exceptions=False)
    bodies = []
    for (method, _), (_, make) in ACCESS.items():
        for headers in (
            *(bearer(t) for t in (*TOKENS.values(), WRONG[0])),
            basic(KINESIS_USER, KINESIS_PASSWORD),
            basic(KINESIS_USER, WRONG[1]),
        ):
            bodies.append(send(client, method, make(), headers=headers).text)
        call = make()
        for secret in (CAESAR_SECRET, WRONG[2]):
            bodies.append(
                send(client, method, Call(f"{call.path}?secret={secret}", call.json)).text
            )
    assert isinstance(secured.dispatcher, InProcessDispatcher)
    assert secured.dispatcher.wait_idle(30)
    # The test's own HTTP client logs the URLs it requests: only the server side is checked.
    server_side = [r for r in caplog.records if not r.name.startswith("httpx")]
    logged = "".join(f"{r.getMessage()} {r.__dict__}" for r in server_side)
    for secret in (*SECRETS, *WRONG):
        assert secret not in logged, secret
        assert not any(secret in body for body in bodies), secret
    assert not any(secret in repr(secured.settings) for secret in SECRETS)


def test_the_caesar_secret_is_redacted_from_uvicorns_access_log(secured: Service) -> None:
    """A real uvicorn serving the app logs `POST /v1/caesar/extract?secret=[redacted]`, in
    uvicorn's own access format, never the secret."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s'))
    access = logging.getLogger("uvicorn.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(secured.app, host="127.0.0.1", port=port, log_config=None, access_log=True)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}/v1/caesar/extract?secret={CAESAR_SECRET}&x=1"
        response = httpx.post(url, json=p.caesar(_classification()))
        assert response.status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
        access.removeHandler(handler)
        access.setLevel(level)
    logged = stream.getvalue()
    assert "POST /v1/caesar/extract?secret=[redacted]&x=1 HTTP/1.1" in logged
    assert CAESAR_SECRET not in logged


# --------------------------------------------------------------------------- privacy


def all_rows_as_text(service: Service) -> str:
    with service.sessions() as session:
        return "\n".join(
            repr(row)
            for table in Base.metadata.sorted_tables
            for row in session.execute(table.select()).all()
        )


def test_ips_are_stored_only_as_salted_hashes(secured: Service) -> None:
    """No raw IP in any row of any table (volunteers, classifications.raw, ...); an anonymous
    volunteer's ip_hash is salted (not sha256 of the IP alone, and another salt gives another)."""
    client = TestClient(secured.app)
    admin = bearer(TOKENS["admin"])
    anonymous = [p.classic(500 + k, 12, None, 0, user_ip=IPS[k]) for k in range(3)]
    client.post("/v1/classifications", json=anonymous, headers=admin)
    client.post(
        "/v1/ingest/kinesis",
        json=p.batch(p.event(p.classic(600, 12, None, 1, user_ip="192.0.2.99"))),
        headers=admin,
    )
    assert isinstance(secured.dispatcher, InProcessDispatcher)
    assert secured.dispatcher.wait_idle(30)
    dump = all_rows_as_text(secured)
    for ip in (*IPS, "192.0.2.99"):
        assert ip not in dump, ip
    with secured.sessions() as session:
        hashes = set(
            session.scalars(select(Volunteer.ip_hash).where(Volunteer.kind == "anonymous"))
        )
        raw = [c.raw for c in session.scalars(select(Classification))]
    assert {hash_ip(ip, SALT) for ip in (*IPS, "192.0.2.99")} <= hashes
    for ip in IPS:
        assert hashlib.sha256(ip.encode()).hexdigest()[:32] not in hashes
        assert hash_ip(ip, "another-salt") != hash_ip(ip, SALT)
    assert all("user_ip" not in r and "ip" not in r for r in raw)


def test_a_forgotten_volunteer_keeps_their_votes_as_anonymous(
    secured: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gzx volunteer forget ID` erases login, user id and IP hash, sets forgotten_at, and the
    volunteer's votes still count (same views, same posterior) as an anonymous volunteer's."""
    from typer.testing import CliRunner

    from app.cli import cli

    client = TestClient(secured.app)
    admin = bearer(TOKENS["admin"])
    event = p.event(p.classic(700, 13, 4242, 0))
    assert client.post("/v1/ingest/kinesis", json=p.batch(event), headers=admin).is_success
    assert isinstance(secured.dispatcher, InProcessDispatcher)
    assert secured.dispatcher.wait_idle(30)
    before = client.get(f"/v1/workflows/{WF}/subjects/13", headers=admin).json()
    with secured.sessions() as session:
        volunteer = session.scalar(select(Volunteer).where(Volunteer.key == "user:4242"))
        assert volunteer is not None and volunteer.login == "volunteer_a"
        volunteer_id = volunteer.id
    monkeypatch.setenv("GZX_DATABASE_URL", secured.settings.database_url)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["volunteer", "forget", "4242"])  # the platform's id
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    with secured.sessions() as session:
        forgotten = session.get(Volunteer, volunteer_id)
        assert forgotten is not None
        assert (forgotten.login, forgotten.platform_user_id, forgotten.ip_hash) == (
            None,
            None,
            None,
        )
        assert forgotten.forgotten_at is not None
        assert forgotten.kind == "anonymous"
        assert "4242" not in forgotten.key
        kept = session.scalar(
            select(func.count())
            .select_from(Classification)
            .where(Classification.volunteer_id == volunteer_id)
        )
        assert kept == 1
    secured.dispatcher.notify([WF])
    assert secured.dispatcher.wait_idle(30)
    after = client.get(f"/v1/workflows/{WF}/subjects/13", headers=admin).json()
    assert (after["views"], after["posterior"]) == (before["views"], before["posterior"])
    assert "volunteer_a" not in all_rows_as_text(secured)
