"""Exports: COCO files a detector can load, labels as CSV and Parquet, the manifest, reproducible
bytes, safe file routes, scopes, scheduled exports with a train job, and the signed webhook."""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from pycocotools.coco import COCO
from sqlalchemy import select

from app import exports
from app.models import Cluster, Export
from app.pipeline import InProcessDispatcher
from app.service import Service, build_service
from app.settings import Settings, get_settings
from tests import payloads as p

WF = p.WORKFLOW
BOX = (100.0, 120.0, 30.0, 20.0)
SMALL = (200.0, 50.0, 10.0, 10.0)
OPEN_RULES = {"no_unresolved_cluster": False}


def config(**exports_settings: Any) -> dict[str, Any]:
    """The Clump-Scout-like workflow; every subject retires by the 6th view at the latest."""
    return {
        **p.clump_config(),
        "retirement": {"min_views": 3, "cap": 6, "mark_risk_bound": 5},
        "exports": exports_settings,
    }


def populate(client: TestClient, service: Service, n_each: int = 4) -> dict[str, list[int]]:
    """Subjects with two agreed boxes, with one box only half the viewers drew (unresolved),
    and agreed empty ones; six volunteers each, everyone answers the question."""
    kinds = {"boxes": [], "unresolved": [], "empty": []}
    events, cid = [], 1
    for i in range(3 * n_each):
        subject = 1000 + 7 * i
        kind = ("boxes", "unresolved", "empty")[i % 3]
        kinds[kind].append(subject)
        for u in range(1, 7):
            drawn = {"boxes": [BOX, SMALL], "unresolved": [BOX] if u <= 3 else [], "empty": []}
            answer = 1 if kind == "empty" else 0
            location = f"https://panoptes-uploads.zooniverse.org/{subject}.jpeg?v=1"
            events.append(p.event(p.classic(cid, subject, u, answer, boxes=drawn[kind]), location))
            cid += 1
    for start in range(0, len(events), 50):
        response = client.post("/v1/ingest/kinesis", json=p.batch(*events[start : start + 50]))
        assert response.status_code == 200, response.text
    assert isinstance(service.dispatcher, InProcessDispatcher)
    assert service.dispatcher.wait_idle(30)
    return kinds


def run_export(
    client: TestClient, rules: dict[str, Any] | None = None, headers: Any = None
) -> dict[str, Any]:
    response = client.post(f"/v1/workflows/{WF}/exports", json=rules or {}, headers=headers)
    assert response.status_code == 202, response.text
    export_id = response.json()["id"]
    for _ in range(300):
        found = client.get(f"/v1/exports/{export_id}", headers=headers).json()
        if found["status"] in ("done", "failed"):
            assert found["status"] == "done", found["error"]
            return dict(found)
        time.sleep(0.05)
    raise AssertionError("the export did not finish")


def fetch(client: TestClient, export: dict[str, Any], name: str, into: Path) -> Path:
    response = client.get(f"/v1/exports/{export['id']}/files/{name}")
    assert response.status_code == 200, response.text
    path = into / name
    path.write_bytes(response.content)
    return path


@pytest.fixture
def client(service: Service) -> TestClient:
    client = TestClient(service.app)
    assert client.put(f"/v1/workflows/{WF}", json=config()).status_code == 200
    return client


def test_every_coco_box_is_a_stored_cluster_and_unsure_ones_are_ignore_regions(
    service: Service, client: TestClient, tmp_path: Path
) -> None:
    """pycocotools loads the sets; each box equals a confident cluster, each iscrowd region an
    unresolved one, and agreed empty subjects are images without annotations."""
    kinds = populate(client, service)
    export = run_export(client, {**OPEN_RULES, "val_fraction": 0.5})
    with service.sessions() as session:
        stored = session.execute(
            select(Cluster).where(Cluster.workflow_id == WF, Cluster.n_marks > 0)
        ).scalars()
        by_subject: dict[int, list[Cluster]] = {}
        for c in stored:
            by_subject.setdefault(c.subject_id, []).append(c)
    seen_images: set[int] = set()
    crowd = normal = 0
    for split in ("train", "val"):
        coco = COCO(str(fetch(client, export, f"coco_{split}.json", tmp_path)))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["clump", "odd_clump"]
        for image_id, image in coco.imgs.items():
            seen_images.add(image_id)
            assert image["file_name"] == f"{image_id}.jpeg"
            assert image["coco_url"].endswith(f"/{image_id}.jpeg?v=1")
            assert (image["width"], image["height"]) == (424, 424)
            regions = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))
            if image_id in kinds["empty"]:
                assert regions == []
            for region in regions:
                x, y, w, h = region["bbox"]
                match = [
                    c
                    for c in by_subject[image_id]
                    if abs(c.x1 - x) < 1e-3
                    and abs(c.y1 - y) < 1e-3
                    and abs(c.x2 - c.x1 - w) < 1e-3
                    and abs(c.y2 - c.y1 - h) < 1e-3
                ]
                assert len(match) == 1, region
                assert region["score"] == round(match[0].p_real, 6)
                assert region["category_id"] == 2  # the rectangle tool: odd_clump
                if region["iscrowd"]:
                    crowd += 1
                    assert 0.1 < match[0].p_real < 0.9
                else:
                    normal += 1
                    assert match[0].p_real >= 0.9 and match[0].p_off <= 0.1
    assert seen_images == set(kinds["boxes"] + kinds["unresolved"] + kinds["empty"])
    assert normal == 2 * len(kinds["boxes"]) and crowd == len(kinds["unresolved"])
    counts = export["manifest"]["counts"]
    assert counts["negatives"] == len(kinds["empty"]) and counts["ignore_regions"] == crowd
    assert 0.9 <= export["manifest"]["expected_purity"] <= 1
    assert 0 < export["manifest"]["expected_completeness"] <= 1


def test_by_default_a_subject_with_an_unresolved_cluster_is_left_out(
    service: Service, client: TestClient
) -> None:
    """The default rules keep no subject whose cluster P(real) lies between the bounds."""
    kinds = populate(client, service)
    manifest = run_export(client)["manifest"]
    assert manifest["counts"]["excluded"] == {"unresolved_cluster": len(kinds["unresolved"])}
    assert manifest["counts"]["subjects"] == len(kinds["boxes"]) + len(kinds["empty"])
    assert manifest["counts"]["ignore_regions"] == 0


def test_labels_csv_and_parquet_agree(service: Service, client: TestClient, tmp_path: Path) -> None:
    """Every row and value of labels.csv is in labels.parquet, in the same order."""
    populate(client, service)
    export = run_export(client, OPEN_RULES)
    with fetch(client, export, "labels.csv", tmp_path).open() as handle:
        rows = list(csv.DictReader(handle))
    table = pq.read_table(fetch(client, export, "labels.parquet", tmp_path)).to_pylist()
    assert len(rows) == len(table) == export["manifest"]["counts"]["subjects"]
    for text, typed in zip(rows, table, strict=True):
        assert int(text["subject_id"]) == typed["subject_id"]
        assert float(text["p_clumpy"]) == typed["p_clumpy"]
        assert float(text["p_not_clumpy"]) == typed["p_not_clumpy"]
        assert int(text["votes"]) == typed["votes"] == 6
        for name in ("split", "status", "reason", "label"):
            assert text[name] == typed[name]
        assert typed["label"] in ("clumpy", "not_clumpy")


def test_the_manifest_lists_exactly_the_subjects_in_the_files(
    service: Service, client: TestClient, tmp_path: Path
) -> None:
    """manifest.json's subject ids per split are the COCO images and the labels' rows."""
    populate(client, service)
    export = run_export(client, {**OPEN_RULES, "val_fraction": 0.5})
    manifest = json.loads(fetch(client, export, "manifest.json", tmp_path).read_text())
    with fetch(client, export, "labels.csv", tmp_path).open() as handle:
        labelled = {(int(r["subject_id"]), r["split"]) for r in csv.DictReader(handle)}
    listed = {(s, split) for split, ids in manifest["subjects"].items() for s in ids}
    assert listed == labelled and manifest["subjects"]["train"] and manifest["subjects"]["val"]
    for split in ("train", "val"):
        coco = json.loads(fetch(client, export, f"coco_{split}.json", tmp_path).read_text())
        assert [i["id"] for i in coco["images"]] == manifest["subjects"][split]
    for name, entry in manifest["files"].items():
        data = fetch(client, export, name, tmp_path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert manifest["config_hash"] == client.get(f"/v1/workflows/{WF}").json()["config_hash"]
    assert "skill_snapshot_id" in manifest and "mark_snapshot_id" in manifest
    assert manifest["rules"]["no_unresolved_cluster"] is False


def test_the_same_export_twice_gives_byte_identical_files(
    service: Service, client: TestClient, tmp_path: Path
) -> None:
    """Two exports of the same state and rules have the same bytes in every file."""
    populate(client, service)
    first, second = run_export(client, OPEN_RULES), run_export(client, OPEN_RULES)
    assert first["id"] != second["id"]
    assert first["files"] == second["files"] and len(first["files"]) == 6
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name in first["files"]:
        a = fetch(client, first, name, tmp_path / "a").read_bytes()
        b = fetch(client, second, name, tmp_path / "b").read_bytes()
        assert a == b, name


def test_the_split_depends_only_on_the_seed_and_the_subject() -> None:
    """The same seed gives the same split; about val_fraction of subjects go to validation."""
    first = [exports.in_validation(s, 7, 0.2) for s in range(5000)]
    assert first == [exports.in_validation(s, 7, 0.2) for s in range(5000)]
    assert first != [exports.in_validation(s, 8, 0.2) for s in range(5000)]
    assert 0.17 < sum(first) / 5000 < 0.23


def test_file_names_that_leave_the_export_are_refused_naming_the_field(
    service: Service, client: TestClient
) -> None:
    """Encoded ../, .. and absolute paths answer 422 naming "name"; bad export ids are 4xx."""
    populate(client, service, n_each=1)
    export = run_export(client)
    secret = Path(service.settings.export_dir) / "secret.txt"
    secret.write_text("not yours")
    names = ("..%2Fsecret.txt", "%2E%2E%2Fsecret.txt", "%2E%2E", "%2Fetc%2Fpasswd", ".hidden")
    for name in names:
        response = client.get(f"/v1/exports/{export['id']}/files/{name}")
        assert 400 <= response.status_code < 500, name
        assert response.json()["field"] == "name", name
        assert "not yours" not in response.text
    bad = client.get("/v1/exports/..%2F..%2Fx/files/manifest.json")
    assert 400 <= bad.status_code < 500
    missing = client.get(f"/v1/exports/{export['id']}/files/nothing.csv")
    assert missing.status_code == 404 and missing.json()["field"] == "name"


def test_bad_rules_are_refused_naming_the_field(service: Service, client: TestClient) -> None:
    """Inverted bounds, unknown rules and a non-object body answer 422 naming the field."""
    for body, field in (
        ({"p_real_bounds": [0.9, 0.1]}, "p_real_bounds"),
        ({"max_p_off": 2}, "max_p_off"),
        ({"retire_everything": True}, "retire_everything"),
        ([1, 2], "body"),
    ):
        response = client.post(f"/v1/workflows/{WF}/exports", json=body)
        assert response.status_code == 422, body
        assert response.json()["field"] == field
    assert client.post("/v1/workflows/424242/exports", json={}).status_code == 404


def test_exports_need_admin_to_start_and_read_to_fetch(sqlite_url: str, tmp_path: Path) -> None:
    """Starting needs admin; status and files need read; no token is 401, a wrong scope 403."""
    settings = Settings(
        database_url=sqlite_url,
        tokens="r=read;i=ingest;a=admin",
        export_dir=tmp_path / "exports",
        sweep_interval_s=3600,
    )
    service = build_service(settings)
    try:
        client = TestClient(service.app)

        def auth(token: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {token}"}

        client.put(f"/v1/workflows/{WF}", json=config(), headers=auth("a"))
        start = f"/v1/workflows/{WF}/exports"
        assert client.post(start, json={}).status_code == 401
        assert client.post(start, json={}, headers=auth("r")).status_code == 403
        assert client.post(start, json={}, headers=auth("i")).status_code == 403
        export = run_export(client, headers=auth("a"))
        for path in (f"/v1/exports/{export['id']}", f"/v1/exports/{export['id']}/files/labels.csv"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers=auth("i")).status_code == 403
            assert client.get(path, headers=auth("r")).status_code == 200
    finally:
        service.close()


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append((dict(self.headers.items()), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        return


@pytest.fixture
def webhook_server() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    """A real HTTP server on 127.0.0.1 that records what it is sent."""
    _Hook.received = []
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", _Hook.received
    server.shutdown()
    server.server_close()


def test_a_finished_export_calls_the_webhook_signed(
    service: Service, webhook_server: tuple[str, list[tuple[dict[str, str], bytes]]]
) -> None:
    """The webhook gets the export id, with an HMAC-SHA256 of timestamp + "." + body."""
    url, received = webhook_server
    client = TestClient(service.app)
    client.put(f"/v1/workflows/{WF}", json=config(webhook_url=url, webhook_secret="s3cret"))
    populate(client, service, n_each=1)
    export = run_export(client)
    for _ in range(100):
        if received:
            break
        time.sleep(0.05)
    assert len(received) == 1
    headers, body = received[0]
    stamp = headers["X-Gzx-Timestamp"]
    expected = hmac.new(b"s3cret", stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Gzx-Signature"], "sha256=" + expected)
    assert abs(int(stamp) - time.time()) < 60
    payload = json.loads(body)
    assert payload["export_id"] == export["id"] and payload["event"] == "export.done"
    assert payload["counts"] == export["manifest"]["counts"]


def test_run_schedules_exports_a_due_workflow_and_queues_a_train_job(
    pg_service: Service, redis: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an interval set, run_schedules queues an export on "exports"; a worker writes it and
    queues the trainer's job, carrying the export id, on "train"; a second run waits."""
    from rq import Queue, SimpleWorker

    from workers import jobs
    from workers.context import reset_context

    client = TestClient(pg_service.app)
    client.put(f"/v1/workflows/{WF}", json=config(schedule_interval_s=3600))
    populate(client, pg_service, n_each=1)
    monkeypatch.setenv("GZX_DATABASE_URL", pg_service.settings.database_url)
    monkeypatch.setenv("GZX_REDIS_URL", redis_url)
    monkeypatch.setenv("GZX_EXPORT_DIR", str(pg_service.settings.export_dir))
    get_settings.cache_clear()
    reset_context()
    try:
        jobs.run_schedules()
        assert Queue("exports", connection=redis).count == 1
        SimpleWorker([Queue("exports", connection=redis)], connection=redis).work(burst=True)
        with pg_service.sessions() as session:
            done = session.scalars(select(Export).where(Export.workflow_id == WF)).all()
        assert [e.status for e in done] == ["done"]
        train = Queue("train", connection=redis).jobs
        assert len(train) == 1 and train[0].args == (done[0].id,)
        assert train[0].func_name == "workers.train.train_on_export"
        jobs.run_schedules()
        assert Queue("exports", connection=redis).count == 0
    finally:
        get_settings.cache_clear()
        reset_context()


def test_gzx_export_writes_the_files_to_out(
    service: Service, client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gzx export WORKFLOW --out DIR` writes the same files the API serves, and a row."""
    from typer.testing import CliRunner

    from app.cli import cli

    populate(client, service, n_each=1)
    monkeypatch.setenv("GZX_DATABASE_URL", service.settings.database_url)
    monkeypatch.setenv("GZX_EXPORT_DIR", str(service.settings.export_dir))
    get_settings.cache_clear()
    try:
        out = tmp_path / "out"
        result = CliRunner().invoke(cli, ["export", str(WF), "--out", str(out)])
        assert result.exit_code == 0, result.output
    finally:
        get_settings.cache_clear()
    api = run_export(client)
    assert sorted(p.name for p in out.iterdir()) == api["files"]
    for name in api["files"]:
        served = client.get(f"/v1/exports/{api['id']}/files/{name}").content
        assert (out / name).read_bytes() == served, name


def test_a_question_only_workflow_exports_labels_and_no_coco(
    service: Service, tmp_path: Path
) -> None:
    """Without a drawing task an export holds labels, skills and the manifest, and no COCO."""
    client = TestClient(service.app)
    question_only = {k: v for k, v in config().items() if k != "drawing"}
    assert client.put(f"/v1/workflows/{WF}", json=question_only).status_code == 200
    body = [p.classic(10 + u, 77, u, 0) for u in range(1, 7)]
    assert client.post("/v1/classifications", json=body).status_code == 200
    assert isinstance(service.dispatcher, InProcessDispatcher)
    assert service.dispatcher.wait_idle(30)
    export = run_export(client, {"answer_bounds": [0.5, 0.5]})
    assert export["files"] == ["labels.csv", "labels.parquet", "manifest.json", "skills.csv"]
    manifest = export["manifest"]
    assert manifest["counts"]["subjects"] == 1 and manifest["expected_completeness"] is None
    with fetch(client, export, "skills.csv", tmp_path).open() as handle:
        skills = list(csv.DictReader(handle))
    assert [r["key"] for r in skills] == [f"user:{u}" for u in range(1, 7)]
    for row in skills:
        assert float(row["confusion_clumpy_clumpy_lo90"]) <= float(row["confusion_clumpy_clumpy"])
        assert float(row["confusion_clumpy_clumpy"]) <= float(row["confusion_clumpy_clumpy_hi90"])
        assert "p_fn" not in row


def test_an_export_whose_job_redis_lost_is_queued_again(
    pg_service: Service, redis: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queued export older than ten minutes is queued again by run_schedules; it runs once."""
    from datetime import timedelta

    from rq import Queue, SimpleWorker
    from sqlalchemy import update

    from workers import jobs
    from workers.context import reset_context

    client = TestClient(pg_service.app)
    client.put(f"/v1/workflows/{WF}", json=config())
    with pg_service.sessions.begin() as session:
        rules = exports.scheduled_rules(session, WF)
        export_id = exports.create_export(session, WF, rules)
        session.flush()
        session.execute(
            update(Export)
            .where(Export.id == export_id)
            .values(created_at=Export.created_at - timedelta(hours=1))
        )
    monkeypatch.setenv("GZX_DATABASE_URL", pg_service.settings.database_url)
    monkeypatch.setenv("GZX_REDIS_URL", redis_url)
    monkeypatch.setenv("GZX_EXPORT_DIR", str(pg_service.settings.export_dir))
    get_settings.cache_clear()
    reset_context()
    try:
        jobs.run_schedules()
        jobs.run_schedules()  # queued twice: the second job finds it claimed
        assert Queue("exports", connection=redis).count == 2
        SimpleWorker([Queue("exports", connection=redis)], connection=redis).work(burst=True)
        assert client.get(f"/v1/exports/{export_id}").json()["status"] == "done"
        assert len(Queue("train", connection=redis).jobs) == 1
    finally:
        get_settings.cache_clear()
        reset_context()
