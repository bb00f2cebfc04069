"""Volunteer levels (Gravity Spy's promotion): a volunteer whose 90% interval of every class's
accuracy passes a level's threshold reaches it once, and the level reaches a signed webhook and
Caesar's user-reductions API once each. A real local HTTP server stands in for both and records
what arrives; the tests run on the real PostgreSQL and on SQLite."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app import effects, levels
from app.errors import InputError
from app.models import Effect, Volunteer, VolunteerLevel
from app.pipeline import InProcessDispatcher
from app.service import Service, build_service
from app.settings import Settings
from app.workflows import Level, load_config
from tests import payloads as p

WF = p.WORKFLOW
YES, NO = 0, 1


class Endpoint:
    """Records every request; answers 500 to the first `failures[part]` requests whose path
    contains `part`."""

    def __init__(self) -> None:
        self.failures: dict[str, int] = {}
        self.requests: list[tuple[str, str, dict[str, str], Any, int]] = []
        self.lock = threading.Lock()

    def to(self, part: str, ok_only: bool = False) -> list[tuple[str, dict[str, str], Any]]:
        """(method, headers, body) of the requests whose path contains `part`."""
        with self.lock:
            return [
                (method, headers, body)
                for method, path, headers, body, status in self.requests
                if part in path and (status < 300 or not ok_only)
            ]


@pytest.fixture
def endpoint() -> Iterator[tuple[Endpoint, str]]:
    record = Endpoint()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw
            status = 200
            with record.lock:
                for part, left in record.failures.items():
                    if part in self.path and left > 0:
                        record.failures[part] = left - 1
                        status = 500
                record.requests.append((self.command, self.path, dict(self.headers), body, status))
            out = b"{}" if status == 200 else b'{"errors": ["down"]}'
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_POST = do_PUT = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield record, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def wired(service: Service, tmp_path: Path) -> Iterator[Service]:
    """The service of `service` (PostgreSQL or SQLite) with a Caesar token."""
    settings = Settings(
        database_url=service.settings.database_url,
        export_dir=tmp_path,
        sweep_interval_s=3600,
        caesar_token="caesar-t0ken",
    )
    service.close()
    wired = build_service(settings)
    yield wired
    wired.close()


APPRENTICE = {"name": "apprentice", "min_accuracy": 0.6, "min_gold_votes": 10}
EXPERT = {"name": "expert", "min_accuracy": 0.8}


def config(url: str, levels: list[dict[str, Any]] | None = None, **effects: Any) -> dict[str, Any]:
    return {
        "classes": ["yes", "no"],
        "question": {
            "task": "T0",
            "answers": [{"index": YES, "class": "yes"}, {"index": NO, "class": "no"}],
        },
        "retirement": {"kind": "risk", "risk_bound": 0.3, "min_views": 2},
        "levels": [APPRENTICE, EXPERT] if levels is None else levels,
        "effects": {
            "webhook_url": f"{url}/hook",
            "webhook_secret": "s3cret",
            "caesar_url": url,
            **effects,
        },
    }


GOLD_YES = list(range(1, 16))  # gold subjects whose truth is "yes"
GOLD_NO = list(range(101, 116))  # and "no"


def setup(client: TestClient, url: str, **kwargs: Any) -> None:
    """Configure the workflow and upload its gold (which runs a refit)."""
    assert client.put(f"/v1/workflows/{WF}", json=config(url, **kwargs)).status_code == 200
    gold = [{"subject_id": s, "label": "yes"} for s in GOLD_YES]
    gold += [{"subject_id": s, "label": "no"} for s in GOLD_NO]
    assert client.put(f"/v1/workflows/{WF}/gold", json={"subjects": gold}).status_code == 200


def answer_gold(
    client: TestClient,
    first_id: int,
    user: int | None,
    per_class: int,
    start: int = 0,
    spam: bool = False,
) -> None:
    """`user` answers `per_class` gold subjects of each class (from position `start`): correctly,
    or always "yes" when `spam`."""
    votes = []
    for n in range(start, start + per_class):
        votes.append(p.classic(first_id + 2 * n, GOLD_YES[n], user, YES))
        votes.append(p.classic(first_id + 2 * n + 1, GOLD_NO[n], user, YES if spam else NO))
    assert client.post("/v1/classifications", json=votes).status_code == 200


def settle(service: Service) -> None:
    assert isinstance(service.dispatcher, InProcessDispatcher)
    assert service.dispatcher.wait_idle(30)


def retry_now(service: Service) -> dict[str, int]:
    """Time passes: every failed effect is due again; the delivery job runs."""
    with service.sessions.begin() as session:
        for effect in session.scalars(select(Effect)):
            effect.next_attempt_at = None
    return effects.deliver_effects(service.sessions, service.settings, WF)


def recorded(service: Service) -> list[tuple[int, str]]:
    with service.sessions() as session:
        rows = session.execute(
            select(VolunteerLevel.volunteer_id, VolunteerLevel.level).order_by(VolunteerLevel.id)
        ).all()
    return [(v, level) for v, level in rows]


def test_a_volunteer_answering_gold_well_is_promoted_once_and_caesar_hears_of_it_once(
    wired: Service, endpoint: tuple[Endpoint, str]
) -> None:
    """Too few gold answers promote nobody; enough correct ones promote at the next apply (no
    refit needed); the webhook and the Caesar user reduction each fail twice, then arrive once,
    and neither re-delivery, a refit nor a re-evaluation sends or records anything again."""
    record, url = endpoint
    client = TestClient(wired.app)
    setup(client, url)
    answer_gold(client, 1, 42, per_class=4)
    settle(wired)
    assert recorded(wired) == []  # 8 gold answers: the intervals are still too wide
    record.failures = {"/hook": 2, "/user_reductions/": 2}
    answer_gold(client, 1, 42, per_class=2, start=4)
    settle(wired)
    with wired.sessions() as session:
        volunteer = session.scalar(select(Volunteer).where(Volunteer.key == "user:42"))
        assert volunteer is not None
        vid = volunteer.id
    assert recorded(wired) == [(vid, "apprentice")]
    for _ in range(2):
        retry_now(wired)
    hooks = record.to("/hook")
    pushes = record.to("/user_reductions/")
    assert len(hooks) == 3 and len(record.to("/hook", ok_only=True)) == 1
    assert len(pushes) == 3 and len(record.to("/user_reductions/", ok_only=True)) == 1
    with wired.sessions() as session:
        stored = session.scalars(select(Effect).order_by(Effect.id)).all()
        assert [(e.kind, e.status, e.attempts) for e in stored] == [
            ("level_webhook", "done", 3),
            ("caesar_user", "done", 3),
        ]
        assert all(e.retirement_id is None and e.volunteer_id == vid for e in stored)

    method, headers, body = hooks[-1]
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    expected = hmac.new(b"s3cret", headers["X-Gzx-Timestamp"].encode() + b"." + raw, hashlib.sha256)
    assert method == "POST" and headers["X-Gzx-Signature"] == "sha256=" + expected.hexdigest()
    assert body["event"] == "volunteer.level" and body["workflow_id"] == WF
    assert (body["volunteer"], body["user_id"], body["level"]) == ("user:42", 42, "apprentice")
    assert body["level_number"] == 1 and body["votes"] == 12
    assert set(body["lower_90"]) == {"yes", "no"}
    assert all(0.6 <= x < 0.8 for x in body["lower_90"].values())

    method, headers, body = pushes[-1]
    assert method == "PUT" and headers["Authorization"] == "Bearer caesar-t0ken"
    reduction = body["reduction"]
    assert reduction["user_id"] == 42 and reduction["subgroup"] == "_default"
    assert reduction["data"]["level"] == "apprentice" and reduction["data"]["level_number"] == 1
    assert record.requests[-1][1] == f"/workflows/{WF}/user_reductions/gzx_levels"

    before = len(record.requests)
    assert client.post(f"/v1/workflows/{WF}/refit").status_code == 200
    settle(wired)
    with wired.sessions.begin() as session:
        assert levels.evaluate(session, WF, load_config(config(url))) == 0
    retry_now(wired)
    assert len(record.requests) == before
    assert recorded(wired) == [(vid, "apprentice")]

    shown = client.get(f"/v1/workflows/{WF}/volunteers/user:42").json()["levels"]
    assert [(x["level"], x["level_number"], x["votes"]) for x in shown] == [("apprentice", 1, 12)]
    page = client.get(f"/v1/workflows/{WF}/levels").json()
    assert [(i["volunteer"], i["user_id"], i["level"]) for i in page["items"]] == [
        ("user:42", 42, "apprentice")
    ]
    assert page["next_cursor"] is None


def test_gold_uploaded_after_the_answers_promotes_at_the_refit_and_the_sweeper_delivers(
    wired: Service, endpoint: tuple[Endpoint, str]
) -> None:
    """Answers first, gold later: the refit that the upload runs records the level, and the
    sweeper's list of workflows with due effects brings its webhook and Caesar push, once."""
    record, url = endpoint
    client = TestClient(wired.app)
    assert client.put(f"/v1/workflows/{WF}", json=config(url)).status_code == 200
    answer_gold(client, 1, 48, per_class=6)
    settle(wired)
    assert recorded(wired) == []  # no gold yet
    gold = [{"subject_id": s, "label": "yes"} for s in GOLD_YES[:6]]
    gold += [{"subject_id": s, "label": "no"} for s in GOLD_NO[:6]]
    assert client.put(f"/v1/workflows/{WF}/gold", json={"subjects": gold}).status_code == 200
    settle(wired)
    assert [level for _, level in recorded(wired)] == ["apprentice"]
    with wired.sessions() as session:
        due = effects.workflows_with_due_effects(session)
    for workflow_id in due:
        effects.deliver_effects(wired.sessions, wired.settings, workflow_id)
    assert len(record.to("/hook")) == 1 and len(record.to("/user_reductions/")) == 1
    with wired.sessions() as session:
        assert effects.workflows_with_due_effects(session) == []


def test_a_volunteer_forgotten_before_delivery_is_not_announced(
    wired: Service, endpoint: tuple[Endpoint, str]
) -> None:
    """The endpoints are down when the level is reached; the volunteer is then forgotten: the
    retries are skipped (their platform id is erased) and the level stays, anonymised."""
    from app import store

    record, url = endpoint
    client = TestClient(wired.app)
    setup(client, url)
    record.failures = {"/hook": 1, "/user_reductions/": 1}
    answer_gold(client, 1, 49, per_class=6)
    settle(wired)
    with wired.sessions.begin() as session:
        volunteer = session.scalar(select(Volunteer).where(Volunteer.key == "user:49"))
        assert volunteer is not None
        store.forget_volunteer(session, volunteer)
    retry_now(wired)
    assert len(record.requests) == 2 and all(r[4] == 500 for r in record.requests)
    with wired.sessions() as session:
        stored = session.scalars(select(Effect)).all()
        assert {(e.status, e.last_error) for e in stored} == {("skipped", "volunteer forgotten")}
    items = client.get(f"/v1/workflows/{WF}/levels").json()["items"]
    assert [(i["volunteer"].startswith("forgotten:"), i["user_id"]) for i in items] == [
        (True, None)
    ]


def test_spammers_and_anonymous_volunteers_are_never_promoted(
    wired: Service, endpoint: tuple[Endpoint, str]
) -> None:
    """A volunteer who always answers "yes" and an anonymous one who answers every gold subject
    correctly stay unpromoted, after the apply and after a refit; nothing is sent."""
    record, url = endpoint
    client = TestClient(wired.app)
    setup(client, url)
    answer_gold(client, 1, 43, per_class=15, spam=True)
    answer_gold(client, 1000, None, per_class=15)
    settle(wired)
    assert client.post(f"/v1/workflows/{WF}/refit").status_code == 200
    settle(wired)
    with wired.sessions.begin() as session:
        everyone = list(session.scalars(select(Volunteer.id)))
        assert len(everyone) == 2
        assert levels.evaluate(session, WF, load_config(config(url)), everyone) == 0
    effects.deliver_effects(wired.sessions, wired.settings, WF)
    assert recorded(wired) == []
    assert record.requests == []
    spammer = client.get(f"/v1/workflows/{WF}/volunteers/user:43").json()
    assert spammer["levels"] == []
    with wired.sessions.begin() as session:
        machine = Volunteer(key="ml:detector@1", kind="machine")
        excluded = Volunteer(key="user:77", kind="user", platform_user_id=77, excluded=True)
        person = Volunteer(key="user:78", kind="user", platform_user_id=78)
        session.add_all([machine, excluded, person])
        session.flush()
        ids = [machine.id, excluded.id, person.id]
        assert levels.promotable_volunteers(session, ids) == [person.id]


def test_reaching_a_later_level_records_the_earlier_ones_and_caesar_gets_the_highest(
    wired: Service, endpoint: tuple[Endpoint, str]
) -> None:
    """Levels are ordered: passing "expert" records "apprentice" too (even though apprentice's
    own gold minimum is not met), and every Caesar push carries the highest level reached."""
    record, url = endpoint
    client = TestClient(wired.app)
    setup(client, url, levels=[{**APPRENTICE, "min_gold_votes": 500}, EXPERT])
    answer_gold(client, 1, 44, per_class=14)
    settle(wired)
    assert [level for _, level in recorded(wired)] == ["apprentice", "expert"]
    hooks = [body["level"] for _, _, body in record.to("/hook")]
    assert sorted(hooks) == ["apprentice", "expert"]
    pushes = [body["reduction"]["data"] for _, _, body in record.to("/user_reductions/")]
    assert len(pushes) == 2
    assert all((d["level"], d["level_number"]) == ("expert", 2) for d in pushes)
    assert pushes[-1]["levels"] == ["apprentice", "expert"]


def test_a_level_may_rest_on_the_learned_confusion_matrix(
    wired: Service, endpoint: tuple[Endpoint, str]
) -> None:
    """With skill_from "confusion" the interval is the engine's (votes counted by EM plus gold),
    and the level's gold minimum still holds a volunteer back until it is met."""
    _, url = endpoint
    client = TestClient(wired.app)
    level = {"name": "trusted", "min_accuracy": 0.6, "skill_from": "confusion"}
    setup(client, url, levels=[{**level, "min_gold_votes": 20}], dry_run=True)
    answer_gold(client, 1, 45, per_class=9)
    settle(wired)
    assert recorded(wired) == []  # 18 gold votes < 20
    answer_gold(client, 1, 45, per_class=1, start=9)
    settle(wired)
    assert [level for _, level in recorded(wired)] == ["trusted"]
    shown = client.get(f"/v1/workflows/{WF}/volunteers/user:45").json()
    diagonal = [shown["confusion_lower_90"][k][k] for k in range(2)]
    lower = shown["levels"][0]["lower_90"]
    assert [lower["yes"], lower["no"]] == pytest.approx(diagonal, abs=1e-6)


def test_dry_run_records_levels_and_sends_nothing(
    wired: Service, endpoint: tuple[Endpoint, str]
) -> None:
    """In a dry run the level is recorded and its effects are recorded as skipped; no request."""
    record, url = endpoint
    client = TestClient(wired.app)
    setup(client, url, dry_run=True)
    answer_gold(client, 1, 46, per_class=6)
    settle(wired)
    retry_now(wired)
    assert [level for _, level in recorded(wired)] == ["apprentice"]
    with wired.sessions() as session:
        stored = session.scalars(select(Effect)).all()
        assert sorted(e.kind for e in stored) == ["caesar_user", "level_webhook"]
        assert {(e.status, e.last_error) for e in stored} == {("skipped", "dry run")}
    assert record.requests == []


def test_level_configuration_errors_name_the_field(
    service: Service, endpoint: tuple[Endpoint, str]
) -> None:
    """Invalid levels are refused by load_config and by PUT with the offending field named."""
    _, url = endpoint
    cases = [
        ([{"name": "a", "min_accuracy": 1.5}], "levels.0.min_accuracy"),
        ([{"name": "a"}], "levels.0.min_accuracy"),
        ([APPRENTICE, {**EXPERT, "name": "apprentice"}], "levels.1.name"),
        ([{**EXPERT, "class_min_accuracy": {"maybe": 0.9}}], "levels.0.class_min_accuracy.maybe"),
        ([{**EXPERT, "class_min_accuracy": {"yes": 0}}], "levels.0.class_min_accuracy.yes"),
        ([{**EXPERT, "skill_from": "vibes"}], "levels.0.skill_from"),
        ([{**EXPERT, "min_gold_votes": -1}], "levels.0.min_gold_votes"),
        ([{**EXPERT, "name": ""}], "levels.0.name"),
    ]
    client = TestClient(service.app)
    for given, field in cases:
        with pytest.raises(InputError) as caught:
            load_config(config(url, levels=given))
        assert caught.value.field == field, given
        answer = client.put(f"/v1/workflows/{WF}", json=config(url, levels=given))
        assert answer.status_code == 422 and answer.json()["field"] == field
    drawing_only = {"drawing": p.clump_config()["drawing"], "levels": [EXPERT]}
    with pytest.raises(InputError) as caught:
        load_config(drawing_only)
    assert caught.value.field == "levels"


def test_levels_page_follows_its_cursor(wired: Service, endpoint: tuple[Endpoint, str]) -> None:
    """Three promoted volunteers listed a page of two at a time: each once, in the order reached;
    a filter by level and a bad cursor (422 naming `cursor`)."""
    _, url = endpoint
    client = TestClient(wired.app)
    setup(client, url, dry_run=True)
    for n, user in enumerate((51, 52, 53)):
        answer_gold(client, 1 + 1000 * n, user, per_class=6)
        settle(wired)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/workflows/{WF}/levels", params=params).json()
        seen += [item["volunteer"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ["user:51", "user:52", "user:53"]
    only = client.get(f"/v1/workflows/{WF}/levels", params={"level": "expert"}).json()
    assert only["items"] == []
    bad = client.get(f"/v1/workflows/{WF}/levels", params={"cursor": "nope"})
    assert bad.status_code == 422 and bad.json()["field"] == "cursor"


def test_two_concurrent_evaluators_record_a_level_once(
    pg_service: Service, endpoint: tuple[Endpoint, str]
) -> None:
    """Two transactions evaluate the same volunteer at once on PostgreSQL: the second waits on the
    first's row and then inserts nothing, so the level exists once."""
    _, url = endpoint
    client = TestClient(pg_service.app)
    setup(client, url, dry_run=True, levels=[])  # the votes are applied, nobody promoted
    answer_gold(client, 1, 47, per_class=6)
    settle(pg_service)
    with pg_service.sessions() as session:
        vid = session.scalar(select(Volunteer.id).where(Volunteer.key == "user:47"))
    assert vid is not None
    cfg = load_config(config(url, dry_run=True, levels=[APPRENTICE]))
    results: list[int] = []
    first = pg_service.sessions()
    first.begin()
    results.append(levels.evaluate(first, WF, cfg, [vid]))

    def second() -> None:
        with pg_service.sessions.begin() as session:
            results.append(levels.evaluate(session, WF, cfg, [vid]))

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.5)  # the second evaluator is now waiting on the first's uncommitted row
    first.commit()
    first.close()
    thread.join(10)
    assert results == [1, 0]
    with pg_service.sessions() as session:
        assert session.scalar(select(func.count()).select_from(VolunteerLevel)) == 1


def test_highest_level_needs_every_class_and_implies_the_earlier_levels() -> None:
    """The pure decision on a hand-checkable table: one class below a threshold holds a volunteer
    back; a per-class override raises the bar for that class only; gold minimums count."""
    classes = ["yes", "no"]
    ladder = [
        Level(name="one", min_accuracy=0.6),
        Level(name="two", min_accuracy=0.8, class_min_accuracy={"no": 0.9}, min_gold_per_class=3),
    ]
    lower = np.array([[0.7, 0.7], [0.85, 0.85], [0.85, 0.95], [0.95, 0.5], [0.85, 0.95]])
    gold = np.array([[5, 5], [5, 5], [5, 5], [5, 5], [5, 2]], dtype=np.float64)
    best = levels.highest_level(ladder, classes, {"gold": lower}, gold)
    assert best.tolist() == [0, 0, 1, -1, 0]
    flat = levels.diagonal_lower(levels.gold_skills(np.zeros((1, 2, 2))))
    assert flat.max() < 0.1  # no gold answers: nobody is promoted on the prior's merit
