"""The detector trainer on the CPU: a real gzx export of a synthetic sky that simulated volunteers
boxed, a couple of training steps, the model directory of contract 3, `--init`, `gzx predict` to a
file and to a real local HTTP server (contract 1, in chunks, a 503 retried), and the train queue
run by `gzx worker --queue train`."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

pytest.importorskip("torch")

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app import sky
from app.cli import cli
from app.db import migrate
from app.service import build_service
from app.settings import Settings, get_settings
from tests import payloads as p
from tests.exporting import ingest_and_export

WF = p.WORKFLOW
SIZE = 48
N_IMAGES = 16
RULES = {
    "retired_only": False,
    "answer_bounds": [0.5, 0.5],
    "max_expected_missed": 100.0,
    "max_p_off": 1.0,
    "no_unresolved_cluster": False,
    "val_fraction": 0.3,
}


@dataclass(frozen=True)
class Built:
    """A finished export of the synthetic sky, its images and the generator's truth."""

    root: Path
    export_dir: Path
    export_id: str
    images: Path
    truth: list[sky.SkyImage]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """16 synthetic 48 px galaxies; five simulated volunteers each draw every true clump as a
    rectangle (and answer the question); gzx aggregates them and writes an export."""
    root = tmp_path_factory.mktemp("train")
    truth = sky.generate(N_IMAGES, size=SIZE, seed=3, first_id=501)
    images = root / "images"
    sky.write_images(truth, images)
    url = f"sqlite:///{root / 'gzx.db'}"
    migrate(url)
    settings = Settings(
        database_url=url, redis_url=None, export_dir=root / "exports", sweep_interval_s=3600
    )
    service = build_service(settings)
    try:
        client = TestClient(service.app)
        config = {**p.clump_config(), "retirement": {"min_views": 3, "cap": 5}}
        assert client.put(f"/v1/workflows/{WF}", json=config).status_code == 200
        events, cid = [], 1
        for image in truth:
            boxes = [(x1, y1, x2 - x1, y2 - y1) for x1, y1, x2, y2 in image.clumps]
            location = f"https://panoptes-uploads.zooniverse.org/{image.subject_id}.png"
            for user in range(1, 6):
                answer = 0 if boxes else 1
                classification = p.classic(cid, image.subject_id, user, answer, boxes=boxes)
                events.append(p.event(classification, location))
                cid += 1
        export_id = ingest_and_export(client, service, WF, events, RULES)
    finally:
        service.close()
    yield Built(root, root / "exports" / export_id, export_id, images, truth)


@pytest.fixture(scope="module")
def trained(built: Built) -> tuple[Path, dict[str, Any]]:
    """Two training steps on one CPU thread."""
    from app.train import detector

    out = built.root / "model"
    metrics = detector.train(
        built.export_dir, built.images, out, iterations=2, batch_size=4, threads=1, version="t.1"
    )
    return out, metrics


def test_the_export_holds_the_volunteers_boxes(built: Built) -> None:
    """The export the trainer reads is a real one: COCO files with the truth's clumps as boxes."""
    train = json.loads((built.export_dir / "coco_train.json").read_text())
    val = json.loads((built.export_dir / "coco_val.json").read_text())
    assert len(train["images"]) + len(val["images"]) == N_IMAGES
    assert val["images"], "val_fraction 0.3 of 16 subjects should give a validation split"
    boxes = len(train["annotations"]) + len(val["annotations"])
    assert boxes == sum(len(image.clumps) for image in built.truth)


def test_training_writes_the_model_directory_with_sane_metrics(
    built: Built, trained: tuple[Path, dict[str, Any]]
) -> None:
    """model.pt, metrics.json and model.json exist; completeness and purity lie in [0, 1];
    model.json names the export and every subject of it."""
    out, metrics = trained
    assert {p.name for p in out.iterdir()} >= {"model.pt", "metrics.json", "model.json"}
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["steps"] == 2 and metrics["train_images"] + metrics["val_images"] == N_IMAGES
    assert metrics["images_per_second"] > 0 and metrics["device"] == "cpu"
    rows = [metrics, *metrics["at_thresholds"]]
    for row in rows:
        for key in ("completeness", "purity"):
            assert row[key] is None or 0.0 <= row[key] <= 1.0
    assert metrics["completeness"] is not None and metrics["val_boxes"] > 0
    info = json.loads((out / "model.json").read_text())
    assert info["kind"] == "detector" and info["version"] == "t.1"
    assert info["export_id"] == built.export_id and info["workflow_id"] == WF
    assert info["categories"] == ["clump", "odd_clump"]
    assert info["training_subjects"] == [image.subject_id for image in built.truth]
    assert 0 < info["score_threshold"] < 1 and info["image_size"] == SIZE


def test_init_loads_a_saved_model_whole_and_a_backbone_alone(
    built: Built, trained: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """--init with model.pt loads every tensor; a backbone-only dict (with a wrapper prefix) loads
    into the backbone and says how many matched; a file matching nothing is refused."""
    import torch

    from app.errors import InputError
    from app.train import detector

    out, _ = trained
    model = detector.build_model(torch.load(out / "model.pt", weights_only=True)["arch"])
    whole = detector.load_init(model, out / "model.pt")
    assert whole["mode"] == "model" and whole["matched"] == whole["of"]
    state = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    backbone = {
        "encoder." + k.removeprefix("backbone."): v
        for k, v in state.items()
        if k.startswith("backbone.")
    }
    torch.save(backbone, tmp_path / "backbone.pt")
    fresh = detector.build_model(torch.load(out / "model.pt", weights_only=True)["arch"])
    report = detector.load_init(fresh, tmp_path / "backbone.pt")
    assert report["mode"] == "backbone" and report["matched"] == len(backbone)
    name = next(iter(fresh.backbone.state_dict()))
    assert torch.equal(fresh.backbone.state_dict()[name], state["backbone." + name])
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="matches"):
        detector.load_init(fresh, tmp_path / "other.pt")
    again = detector.train(
        built.export_dir,
        built.images,
        tmp_path / "again",
        init=out / "model.pt",
        iterations=1,
        batch_size=4,
        threads=1,
    )
    assert again["init"]["mode"] == "model" and again["init"]["matched"] == again["init"]["of"]


def test_predict_writes_boxes_inside_every_image(
    built: Built, trained: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """`gzx predict --out` has one prediction per image, boxes inside it with scores in [0, 1]
    and a category of the workflow; --subjects limits it to the listed ones."""
    out, _ = trained
    target = tmp_path / "predictions.json"
    result = CliRunner().invoke(
        cli, ["predict", str(out), "--images", str(built.images), "--out", str(target)]
    )
    assert result.exit_code == 0, result.output
    body = json.loads(target.read_text())
    assert [row["subject_id"] for row in body["predictions"]] == [
        image.subject_id for image in built.truth
    ]
    assert body["export_id"] == built.export_id and body["training_subjects"] is None
    for row in body["predictions"]:
        for box in row["boxes"]:
            assert 0 <= box["x1"] < box["x2"] <= SIZE and 0 <= box["y1"] < box["y2"] <= SIZE
            assert 0 <= box["score"] <= 1 and box["category"] in ("clump", "odd_clump")
    listed = tmp_path / "ids.txt"
    listed.write_text("503\n# a comment\n505\n")
    result = CliRunner().invoke(
        cli,
        [
            *("predict", str(out), "--images", str(built.images)),
            *("--subjects", str(listed), "--out", str(target)),
        ],
    )
    assert result.exit_code == 0, result.output
    assert [r["subject_id"] for r in json.loads(target.read_text())["predictions"]] == [503, 505]


class _Predictions(BaseHTTPRequestHandler):
    """A stand-in for POST /v1/workflows/{id}/predictions that checks contract 1 and answers like
    the route; the first request of a run gets a 503."""

    received: ClassVar[list[tuple[str, dict[str, str], dict[str, Any]]]] = []
    fail_first: ClassVar[bool] = True

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if _Predictions.fail_first:
            _Predictions.fail_first = False
            self._answer(503, {"error": "Unavailable"})
            return
        _Predictions.received.append((self.path, dict(self.headers.items()), body))
        ok = (
            re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", body["model"])
            and re.fullmatch(r"[A-Za-z0-9_.+-]{1,64}", body["version"])
            and len(body["predictions"]) <= 10_000
            and all(
                b["x2"] > b["x1"] and b["y2"] > b["y1"] and 0 <= b["score"] <= 1
                for row in body["predictions"]
                for b in row["boxes"] or []
            )
        )
        if not ok:
            self._answer(422, {"error": "InputError", "field": "predictions"})
            return
        training = set(body.get("training_subjects") or [])
        in_training = sum(1 for r in body["predictions"] if r["subject_id"] in training)
        self._answer(
            200,
            {
                "volunteer": f"ml:{body['model']}@{body['version']}",
                "volunteer_id": 7,
                "accepted": len(body["predictions"]) - in_training,
                "in_training": in_training,
                "duplicates": 0,
            },
        )

    def _answer(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args: Any) -> None:
        return


@pytest.fixture
def api() -> Iterator[str]:
    """The stand-in server's base URL, on a free port."""
    _Predictions.received.clear()
    _Predictions.fail_first = True
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Predictions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_predict_posts_contract_one_chunks_and_retries_a_503(
    built: Built, trained: tuple[Path, dict[str, Any]], api: str
) -> None:
    """`gzx predict --post` sends every image once, in chunks of --chunk, each with the model,
    version, export and threshold and the bearer token; a 503 is sent again."""
    out, _ = trained
    url = f"{api}/v1/workflows/{WF}/predictions"
    result = CliRunner().invoke(
        cli,
        ["predict", str(out), "--images", str(built.images), "--post", url, "--chunk", "5"],
        env={"GZX_TOKEN": "tok"},
    )
    assert result.exit_code == 0, result.output
    assert "16 accepted" in result.output.replace("\n", " ")
    info = json.loads((out / "model.json").read_text())
    sizes = [len(body["predictions"]) for _, _, body in _Predictions.received]
    assert sizes == [5, 5, 5, 1]
    sent = []
    for path, headers, body in _Predictions.received:
        assert path == f"/v1/workflows/{WF}/predictions"
        assert headers["Authorization"] == "Bearer tok"
        assert (body["model"], body["version"], body["export_id"]) == (
            info["model"],
            info["version"],
            built.export_id,
        )
        assert body["score_threshold"] == info["score_threshold"]
        sent += [row["subject_id"] for row in body["predictions"]]
    assert sent == [image.subject_id for image in built.truth]


@pytest.mark.redis
def test_gzx_worker_runs_the_train_queue_and_posts_predictions(
    built: Built, redis: Any, redis_url: str, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job on "train" (the workflows' default train_job) run by `gzx worker --queue train
    --burst` trains into GZX_MODEL_DIR/<export id>/ and posts the workflow's images to
    GZX_API_URL with the export's id."""
    from rq import Queue

    from app.workflows import Exports
    from workers.context import reset_context

    models = built.root / "models"
    for name, value in {
        "GZX_REDIS_URL": redis_url,
        "GZX_EXPORT_DIR": str(built.root / "exports"),
        "GZX_IMAGES_DIR": str(built.images),
        "GZX_MODEL_DIR": str(models),
        "GZX_API_URL": api,
        "GZX_API_TOKEN": "worker-token",
        "GZX_TRAIN_ITERATIONS": "1",
        "GZX_TORCH_THREADS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    reset_context()
    try:
        job = Queue("train", connection=redis).enqueue(
            Exports().train_job, built.export_id, job_timeout=600
        )
        result = CliRunner().invoke(cli, ["worker", "--queue", "train", "--burst"])
        assert result.exit_code == 0, result.output
        job.refresh()
        assert job.get_status() == "finished", job.latest_result()
        report = job.return_value()
    finally:
        get_settings.cache_clear()
        reset_context()
    assert report["export_id"] == built.export_id and report["posted"] == N_IMAGES
    assert (models / built.export_id / "model.pt").is_file()
    bodies = [body for _, _, body in _Predictions.received]
    assert {body["export_id"] for body in bodies} == {built.export_id}
    assert sum(len(body["predictions"]) for body in bodies) == N_IMAGES
    assert _Predictions.received[0][1]["Authorization"] == "Bearer worker-token"


def test_the_base_package_does_not_import_torch() -> None:
    """The CLI, the trainers' modules and the train job load without importing torch, so the
    base install (no `train` extra) works."""
    import subprocess
    import sys

    code = (
        "import sys, app.cli, app.sky, app.train.common, app.train.detector, workers.train;"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "False"
