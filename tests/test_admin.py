"""Researchers' hands on the wheel, through HTTP on PostgreSQL and SQLite: resolving a contested
subject, retiring and un-retiring by hand, excluding a volunteer and bringing them back,
correcting a gold label. Each changes the state it names and leaves an audit entry with who,
when and why; each needs the admin scope."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import migrate
from app.models import Retirement
from app.service import Service, build_service
from app.settings import Settings
from tests import payloads as p
from tests.conftest import _truncate
from tests.test_engine_service import config, post_votes, settle

WF = p.WORKFLOW
READ, ADMIN = "reader-7c1e", "admin-2d9f"


def reason(text: str = "checked by eye") -> dict[str, Any]:
    return {"reason": text}


def contested(client: TestClient, service: Service) -> int:
    """A subject retired on two volunteers' word, then shown by gold to be their mistake."""
    client.put(f"/v1/workflows/{WF}", json=config(kind="risk", risk_bound=0.3, min_views=2))
    post_votes(client, [(3000, 21, 0), (3000, 22, 0)])
    settle(service)
    liars = [(3100 + s, u, 1 - s % 2) for s in range(15) for u in (21, 22)]
    post_votes(client, liars, first_id=100)
    gold = [{"subject_id": 3100 + s, "label": ["featured", "smooth"][s % 2]} for s in range(15)]
    client.put(f"/v1/workflows/{WF}/gold", json={"subjects": gold})
    settle(service)
    assert client.get(f"/v1/workflows/{WF}/subjects/3000").json()["status"] == "contested"
    return 3000


def audit(client: TestClient, **headers: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/workflows/{WF}/audit", headers=headers)
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def retirements(service: Service, subject: int) -> list[tuple[str, str]]:
    with service.sessions() as session:
        rows = session.scalars(
            select(Retirement).where(Retirement.subject_id == subject).order_by(Retirement.id)
        ).all()
    return [(r.reason, r.source) for r in rows]


def test_confirming_a_contested_subject_retires_it_with_its_current_answer(
    service: Service,
) -> None:
    """confirm: retired again, with the answer it has now and a new (manual) retirement event;
    the audit says who, why and what it was before."""
    client = TestClient(service.app)
    subject = contested(client, service)
    response = client.post(
        f"/v1/workflows/{WF}/subjects/{subject}/resolve",
        json={"decision": "confirm", "reason": "the gold shows they were wrong"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["changed"] is True
    assert body["subject"]["status"] == "retired"
    assert body["subject"]["retired_label"] == body["subject"]["label"] == "smooth"
    assert retirements(service, subject)[-1] == ("consensus", "manual")
    entry = audit(client)[0]
    assert entry["action"] == "resolve_confirm" and entry["target"] == f"subject:{subject}"
    assert entry["who"] == "open" and entry["reason"] == "the gold shows they were wrong"
    assert entry["details"]["before"]["status"] == "contested"
    assert entry["details"]["before"]["retired_label"] == "featured"
    again = client.post(
        f"/v1/workflows/{WF}/subjects/{subject}/resolve",
        json={"decision": "confirm", "reason": "twice"},
    )
    assert again.status_code == 409 and again.json()["field"] == "status"


def test_reopening_a_contested_subject_makes_it_live(service: Service) -> None:
    """reopen: live again, retirement fields cleared, its past retirement events kept."""
    client = TestClient(service.app)
    subject = contested(client, service)
    before = retirements(service, subject)
    response = client.post(
        f"/v1/workflows/{WF}/subjects/{subject}/resolve",
        json={"decision": "reopen", "reason": "needs more eyes"},
    )
    assert response.status_code == 200, response.text
    state = client.get(f"/v1/workflows/{WF}/subjects/{subject}").json()
    assert (state["status"], state["reason"], state["retired_at"]) == ("live", None, None)
    assert retirements(service, subject) == before
    assert audit(client)[0]["action"] == "resolve_reopen"
    bad = client.post(
        f"/v1/workflows/{WF}/subjects/{subject}/resolve", json={"decision": "maybe", "reason": "x"}
    )
    assert bad.status_code == 422 and bad.json()["field"] == "decision"


def test_retiring_and_unretiring_by_hand_are_events_with_their_reasons(service: Service) -> None:
    """A live subject retired by hand gets a manual `other` retirement (its effects follow);
    un-retired it is live again; repeating either changes nothing; a reason is required."""
    client = TestClient(service.app)
    client.put(f"/v1/workflows/{WF}", json=config(kind="none"))
    post_votes(client, [(41, 1, 0), (41, 2, 1)])
    settle(service)
    url = f"/v1/workflows/{WF}/subjects/41"
    missing = client.post(f"{url}/retire", json={})
    assert missing.status_code == 422 and missing.json()["field"] == "reason"
    blank = client.post(f"{url}/retire", json={"reason": "   "})
    assert blank.status_code == 422 and blank.json()["field"] == "reason"
    retired = client.post(f"{url}/retire", json=reason("an artefact, not a galaxy")).json()
    assert retired["changed"] is True and retired["subject"]["status"] == "retired"
    assert retired["subject"]["reason"] == "other"
    assert retirements(service, 41) == [("other", "manual")]
    assert client.post(f"{url}/retire", json=reason("again")).json()["changed"] is False
    assert retirements(service, 41) == [("other", "manual")]
    live = client.post(f"{url}/unretire", json=reason("it is a galaxy after all")).json()
    assert live["changed"] is True and live["subject"]["status"] == "live"
    assert client.post(f"{url}/unretire", json=reason("again")).json()["changed"] is False
    entries = audit(client)
    assert [e["action"] for e in entries] == ["unretire", "unretire", "retire", "retire"]
    assert entries[3]["reason"] == "an artefact, not a galaxy"
    assert entries[0]["at"] >= entries[3]["at"]
    assert client.post(f"/v1/workflows/{WF}/subjects/999/retire", json=reason()).status_code == 404


def test_excluding_a_volunteer_recomputes_their_subjects_without_them(service: Service) -> None:
    """Excluded, their votes stop counting on every subject they classified; brought back, they
    count again."""
    client = TestClient(service.app)
    client.put(f"/v1/workflows/{WF}", json=config(kind="none"))
    post_votes(client, [(51, 1, 0), (51, 2, 0), (51, 9, 1), (52, 9, 1), (52, 3, 0)])
    settle(service)
    assert client.get(f"/v1/workflows/{WF}/subjects/52").json()["views"] == 2
    response = client.post(
        f"/v1/workflows/{WF}/volunteers/user:9/exclude", json=reason("a bot: 3 clicks a second")
    )
    assert response.status_code == 200, response.text
    assert response.json()["subjects_pending"] == 2
    settle(service)
    for subject, views in ((51, 2), (52, 1)):
        assert client.get(f"/v1/workflows/{WF}/subjects/{subject}").json()["views"] == views
    volunteers = client.get(f"/v1/workflows/{WF}/volunteers").json()["items"]
    assert {v["key"]: v["excluded"] for v in volunteers}["user:9"] is True
    back = client.post(f"/v1/workflows/{WF}/volunteers/user:9/include", json=reason("not a bot"))
    assert back.status_code == 200 and back.json()["changed"] is True
    settle(service)
    assert client.get(f"/v1/workflows/{WF}/subjects/52").json()["views"] == 2
    actions = [(e["action"], e["target"]) for e in audit(client)]
    volunteer = volunteers[0]["volunteer_id"] if volunteers[0]["key"] == "user:9" else None
    assert actions[0][0] == "include_volunteer" and actions[1][0] == "exclude_volunteer"
    assert volunteer is None or actions[0][1] == f"volunteer:{volunteer}"
    unknown = client.post(f"/v1/workflows/{WF}/volunteers/user:12345/exclude", json=reason())
    assert unknown.status_code == 404 and unknown.json()["field"] == "volunteer"


def test_correcting_a_gold_label_refits_and_is_audited(service: Service) -> None:
    """The subject becomes gold with the new label (its posterior clamped to it), a refit runs,
    and the audit keeps the label before and after."""
    client = TestClient(service.app)
    client.put(f"/v1/workflows/{WF}", json=config(kind="none"))
    post_votes(client, [(61, u, 0) for u in (1, 2, 3)])
    settle(service)
    url = f"/v1/workflows/{WF}/subjects/61/gold"
    first = client.put(url, json={"label": "featured", "reason": "expert says featured"}).json()
    assert first["changed"] is True and first["refit"] is not None
    corrected = client.put(url, json={"label": "smooth", "reason": "expert was wrong"})
    assert corrected.status_code == 200, corrected.text
    settle(service)
    state = client.get(f"/v1/workflows/{WF}/subjects/61").json()
    assert state["gold"] == "smooth" and state["posterior"]["smooth"] == 1.0
    entry = audit(client)[0]
    assert entry["action"] == "correct_gold"
    assert entry["details"]["before"] == "featured" and entry["details"]["after"] == "smooth"
    bad = client.put(url, json={"label": "spiral", "reason": "x"})
    assert bad.status_code == 422 and bad.json()["field"] == "label"


@pytest.fixture(params=["postgres", "sqlite"])
def secured(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    """A service with a read token and an admin token, a workflow and a few votes."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'secured.db'}"
        migrate(url)
    settings = Settings(
        database_url=url,
        tokens=f"{READ}=read;{ADMIN}=admin",
        export_dir=tmp_path / "exports",
        sweep_interval_s=3600,
    )
    service = build_service(settings)
    if request.param == "postgres":
        _truncate(service)
    client = TestClient(service.app, headers={"Authorization": f"Bearer {ADMIN}"})
    client.put(f"/v1/workflows/{WF}", json=config(kind="none"))
    post_votes(client, [(71, 1, 0), (71, 2, 0)])
    settle(service)
    yield service
    service.close()


ADMIN_CALLS = [
    ("post", "/subjects/71/retire", reason()),
    ("post", "/subjects/71/unretire", reason()),
    ("post", "/subjects/71/resolve", {"decision": "confirm", "reason": "x"}),
    ("post", "/volunteers/user:1/exclude", reason()),
    ("post", "/volunteers/user:1/include", reason()),
    ("put", "/subjects/71/gold", {"label": "smooth", "reason": "x"}),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_CALLS)
def test_every_admin_action_needs_the_admin_scope(
    secured: Service, method: str, path: str, body: dict[str, Any]
) -> None:
    """No token: 401; the read token: 403 and nothing recorded; the admin token: served, with
    the token named by a digest (never the token itself) in the audit."""
    client = TestClient(secured.app)
    url = f"/v1/workflows/{WF}{path}"
    assert client.request(method, url, json=body).status_code == 401
    refused = client.request(method, url, json=body, headers={"Authorization": f"Bearer {READ}"})
    assert refused.status_code == 403 and refused.json()["field"] == "authorization"
    reader = {"Authorization": f"Bearer {READ}"}
    assert audit(client, **reader) == []
    served = client.request(method, url, json=body, headers={"Authorization": f"Bearer {ADMIN}"})
    assert served.status_code in (200, 409), served.text  # resolve: 71 is not contested
    if served.status_code == 200:
        entry = audit(client, **reader)[0]
        assert entry["who"] == "token:" + hashlib.sha256(ADMIN.encode()).hexdigest()[:12]
        assert ADMIN not in served.text and ADMIN not in str(entry)
