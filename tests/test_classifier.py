"""The morphology classifier (issue 8) on the CPU: exact invariance of the view-pooled network
(and its absence without the views), the validation report on a hand-checked toy, training on a
real gzx labels export of the synthetic sky (only retired subjects, weighted by their posterior),
the model directory of contract 3, `--init`, and `gzx predict-classifier` to a file and to a real
local HTTP server (contract 1, in chunks)."""

from __future__ import annotations

import csv
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

pytest.importorskip("torch")

import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app import sky
from app.cli import cli
from app.db import migrate
from app.errors import InputError
from app.service import build_service
from app.settings import Settings
from app.train import classifier
from tests import payloads as p
from tests.exporting import ingest_and_export

WF = 40404
SIZE = 32
N_RETIRED = 18  # five votes each: retired
N_LIVE = 6  # two votes each: below min_views, left live (in the export, skipped by the trainer)
N_NEW = 4  # images nobody classified: not in the export, so the machine's votes count there
CLASSES = ["smooth", "featured"]
CONFIG = {
    "name": "Smooth or featured?",
    "classes": CLASSES,
    "question": {
        "task": "T0",
        "answers": [
            {"index": 0, "label": "Smooth", "class": "smooth"},
            {"index": 1, "label": "Features or disk", "class": "featured"},
        ],
    },
    "retirement": {"min_views": 3, "cap": 5, "risk_bound": 0.05},
}
RULES = {"retired_only": False, "answer_bounds": [0.5, 0.5], "val_fraction": 0.3}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch on one core: the machine is shared (common.set_threads reads this variable)."""
    monkeypatch.setenv("GZX_TORCH_THREADS", "1")
    torch.set_num_threads(1)


@dataclass(frozen=True)
class Built:
    """A finished labels export of the synthetic sky and its images (plus N_NEW unseen ones)."""

    root: Path
    export_dir: Path
    export_id: str
    images: Path
    truth: list[sky.SkyImage]
    new: list[sky.SkyImage]

    @property
    def all_ids(self) -> list[int]:
        return sorted(image.subject_id for image in [*self.truth, *self.new])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """24 synthetic 32 px galaxies answered by five simulated volunteers (one of them wrong a
    third of the time), aggregated by gzx on SQLite and exported through the API."""
    root = tmp_path_factory.mktemp("classifier")
    truth = sky.generate(N_RETIRED + N_LIVE, size=SIZE, seed=5, first_id=701)
    images = root / "images"
    new = sky.generate(N_NEW, size=SIZE, seed=6, first_id=801)
    sky.write_images([*truth, *new], images)
    url = f"sqlite:///{root / 'gzx.db'}"
    migrate(url)
    settings = Settings(
        database_url=url, redis_url=None, export_dir=root / "exports", sweep_interval_s=3600
    )
    rng = np.random.default_rng(5)
    service = build_service(settings)
    try:
        client = TestClient(service.app)
        assert client.put(f"/v1/workflows/{WF}", json=CONFIG).status_code == 200
        events, cid = [], 1
        for k, image in enumerate(truth):
            right = CLASSES.index(image.morphology)
            location = f"https://panoptes-uploads.zooniverse.org/{image.subject_id}.png"
            for user in range(1, 6 if k < N_RETIRED else 3):
                wrong = user == 5 and rng.random() < 1 / 3
                data = p.classic(cid, image.subject_id, user, 1 - right if wrong else right)
                data["links"]["workflow"] = str(WF)
                events.append(p.event(data, location))
                cid += 1
        export_id = ingest_and_export(client, service, WF, events, RULES)
    finally:
        service.close()
    yield Built(root, root / "exports" / export_id, export_id, images, truth, new)


def label_rows(built: Built) -> list[dict[str, str]]:
    with (built.export_dir / "labels.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def trained(built: Built) -> tuple[Path, dict[str, Any]]:
    """`gzx train-classifier` for two epochs (two optimiser steps) on one thread."""
    out = built.root / "model"
    torch.set_num_threads(1)
    args = ["train-classifier", str(built.export_dir), "--images", str(built.images)]
    args += ["--out", str(out), "--epochs", "2", "--image-size", str(SIZE), "--version", "t.1"]
    result = CliRunner(env={"GZX_TORCH_THREADS": "1"}).invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, json.loads((out / "metrics.json").read_text())


# --- the network ---------------------------------------------------------------------------------


def dihedral(x: Any) -> list[Any]:
    """The 7 non-identity rotations and flips of a (B, C, H, W) batch."""
    flipped = torch.flip(x, dims=(2,))
    return [torch.rot90(x, k, dims=(2, 3)) for k in (1, 2, 3)] + [
        torch.rot90(flipped, k, dims=(2, 3)) for k in range(4)
    ]


def trained_a_step(invariant: bool, pool: str = "mean") -> classifier.MorphologyNet:
    """A network whose batch-norm statistics and weights have moved off their initial values."""
    torch.manual_seed(0)
    arch = classifier.Architecture(
        classes=("a", "b", "c"), invariant=invariant, image_size=24, pool=pool
    )
    net = classifier.MorphologyNet(arch)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 24, 24, 3), dtype=np.uint8)
    classifier.fit(net, pixels, np.arange(8) % 3, epochs=1, batch_size=8)
    return net.eval()


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_the_invariant_network_gives_the_same_output_for_every_rotation_and_flip(pool: str) -> None:
    """Rotating or flipping the input only permutes the 8 views, so the pooled output is equal."""
    net = trained_a_step(invariant=True, pool=pool)
    x = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = net(x)
        for turned in dihedral(x):
            assert torch.allclose(net(turned), base, atol=1e-5, rtol=1e-5)
    assert base.abs().max() > 1e-3  # not invariant by being constant


def test_the_plain_network_has_the_same_parameters_but_is_not_invariant() -> None:
    """Without the views the same weights see one orientation, and outputs change with it."""
    plain = trained_a_step(invariant=False)
    invariant = trained_a_step(invariant=True)
    assert classifier.count_parameters(plain) == classifier.count_parameters(invariant)
    assert plain.state_dict().keys() == invariant.state_dict().keys()
    x = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = plain(x)
        changes = [float((plain(turned) - base).abs().max()) for turned in dihedral(x)]
    assert min(changes) > 1e-4


def test_probabilities_sum_to_one_and_the_views_cost_no_resampling() -> None:
    """predict_proba rows are distributions; dihedral_views keeps every pixel value."""
    net = trained_a_step(invariant=True)
    pixels = np.random.default_rng(2).integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    probs = classifier.predict_proba(net, pixels)
    assert probs.shape == (5, 3)
    assert np.allclose(probs.sum(axis=1), 1.0)
    x = torch.rand(2, 3, 24, 24)
    views = classifier.dihedral_views(x)
    assert views.shape == (8, 2, 3, 24, 24)
    for view in views:
        assert torch.equal(view.flatten().sort().values, x.flatten().sort().values)


def test_the_loss_follows_the_confidence_weights() -> None:
    """Each image appears twice with opposite labels; the label with the larger weight wins."""
    torch.manual_seed(0)
    net = classifier.MorphologyNet(
        classifier.Architecture(classes=("a", "b"), invariant=False, image_size=16)
    )
    images = np.random.default_rng(3).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    pixels = np.concatenate([images, images])
    labels = np.array([0] * 6 + [1] * 6)
    weights = np.array(
        [0.9 if k < 3 else 0.2 for k in range(6)] + [0.1 if k < 3 else 0.8 for k in range(6)]
    )
    classifier.fit(net, pixels, labels, weights, epochs=40, batch_size=12, learning_rate=1e-2)
    probs = classifier.predict_proba(net, images)
    assert (probs[:3, 0] > 0.6).all()  # weight 0.9 for "a" against 0.1 for "b"
    assert (probs[3:, 1] > 0.6).all()  # 0.8 for "b" against 0.2 for "a"


# --- the report --------------------------------------------------------------------------------


def test_the_report_on_a_hand_checked_toy() -> None:
    """Accuracy, reliability bins, accuracy per confidence level with coverage, high agreement."""
    probs = np.array([[0.93, 0.07], [0.62, 0.38], [0.18, 0.82], [0.47, 0.53]])
    labels = np.array([0, 1, 1, 1])  # right, wrong, right, right
    agreement = np.array([0.95, 0.5, 0.99, 0.92])
    got = classifier.report(probs, labels, agreement)
    assert got["count"] == 4
    assert got["accuracy"] == pytest.approx(0.75)
    filled = [(round(b["low"], 6), b["count"], b["accuracy"]) for b in got["reliability"]]
    assert [row for row in filled if row[1]] == [
        (0.5, 1, 1.0),  # 0.53
        (0.6, 1, 0.0),  # 0.62
        (0.8, 1, 1.0),  # 0.82
        (0.9, 1, 1.0),  # 0.93
    ]
    assert sum(b["count"] for b in got["reliability"]) == 4
    # ECE: |1 - .53| + |0 - .62| + |1 - .82| + |1 - .93|, each a quarter
    assert got["ece"] == pytest.approx((0.47 + 0.62 + 0.18 + 0.07) / 4)
    levels = {row["confidence"]: row for row in got["at_confidence"]}
    assert levels[0.5]["count"] == 4 and levels[0.5]["accuracy"] == pytest.approx(0.75)
    assert levels[0.7]["coverage"] == pytest.approx(0.5) and levels[0.7]["accuracy"] == 1.0
    assert levels[0.95]["count"] == 0 and levels[0.95]["accuracy"] is None
    assert got["high_agreement"] == {"threshold": 0.9, "count": 3, "accuracy": 1.0}


# --- training on an export ----------------------------------------------------------------------


def test_only_retired_labelled_subjects_train_and_the_weight_is_the_label_posterior(
    built: Built,
) -> None:
    """Live subjects in the export are skipped; each kept one weighs P(its label)."""
    rows = label_rows(built)
    assert {r["status"] for r in rows} == {"retired", "live"}
    labels = classifier.read_labels(built.export_dir)
    assert labels.classes == tuple(CLASSES)
    retired = {int(r["subject_id"]): r for r in rows if r["status"] == "retired"}
    assert labels.skipped["not_retired"] == len(rows) - len(retired) == N_LIVE
    assert sorted(labels.subject_ids.tolist()) == sorted(retired)
    for sid, label, weight in zip(labels.subject_ids, labels.labels, labels.weights, strict=True):
        row = retired[int(sid)]
        assert CLASSES[label] == row["label"]
        assert weight == pytest.approx(float(row[f"p_{row['label']}"]))
    assert labels.weights.min() < 0.999  # the unreliable volunteer leaves some doubt
    from_csv = classifier.read_labels(built.export_dir)
    (built.root / "csv_only").mkdir(exist_ok=True)
    (built.root / "csv_only" / "labels.csv").write_bytes(
        (built.export_dir / "labels.csv").read_bytes()
    )
    parquet_less = classifier.read_labels(built.root / "csv_only")
    assert parquet_less.subject_ids.tolist() == from_csv.subject_ids.tolist()
    assert np.allclose(parquet_less.weights, from_csv.weights)


def test_training_writes_the_model_directory_and_metrics_in_range(
    built: Built, trained: tuple[Path, dict[str, Any]]
) -> None:
    """model.pt, metrics.json and model.json (contract 3) with the export's id and subjects."""
    out, metrics = trained
    info = json.loads((out / "model.json").read_text())
    manifest = json.loads((built.export_dir / "manifest.json").read_text())
    assert info["kind"] == "classifier" and info["classes"] == CLASSES
    assert (info["model"], info["version"]) == ("gzx-morphology", "t.1")
    assert info["export_id"] == built.export_id and info["workflow_id"] == WF
    assert info["image_size"] == SIZE and info["invariant"] is True
    assert info["training_subjects"] == sorted(
        manifest["subjects"]["train"] + manifest["subjects"]["val"]
    )
    assert (out / "model.pt").is_file()
    assert metrics["subjects"]["train"] + metrics["subjects"]["val"] == N_RETIRED
    assert metrics["subjects"]["val"] > 0 and metrics["subjects"]["skipped"]["not_retired"] == 6
    assert len(metrics["epoch_losses"]) == 2 and all(
        np.isfinite(loss) and loss > 0 for loss in metrics["epoch_losses"]
    )
    assert metrics["device"] == "cpu" and metrics["threads"] == 1
    for split in ("train", "val"):
        part = metrics[split]
        assert part["count"] == metrics["subjects"][split]
        assert 0.0 <= part["accuracy"] <= 1.0 and 0.0 <= part["ece"] <= 1.0
        assert 0.5 <= part["mean_confidence"] <= 1.0
        assert sum(b["count"] for b in part["reliability"]) == part["count"]
        coverage = [row["coverage"] for row in part["at_confidence"]]
        assert coverage[0] == 1.0 and coverage == sorted(coverage, reverse=True)
        assert 0 <= part["high_agreement"]["count"] <= part["count"]
    assert metrics["accuracy"] == metrics["val"]["accuracy"]
    assert metrics["high_agreement_accuracy"] == metrics["val"]["high_agreement"]["accuracy"]
    net, _ = classifier.load_model(out)
    assert net.arch.invariant and net.arch.classes == tuple(CLASSES)


def test_init_starts_the_plain_network_from_the_invariant_one(
    built: Built, trained: tuple[Path, dict[str, Any]]
) -> None:
    """The two share every weight's name and shape, so --init copies all of them."""
    model, _ = trained
    out = built.root / "plain"
    args = ["train-classifier", str(built.export_dir), "--images", str(built.images)]
    args += ["--out", str(out), "--epochs", "1", "--image-size", str(SIZE), "--plain"]
    args += ["--init", str(model / "model.pt"), "--name", "plain-cnn", "--version", "t.2"]
    result = CliRunner(env={"GZX_TORCH_THREADS": "1"}).invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = json.loads((out / "metrics.json").read_text())
    net, _ = classifier.load_model(model)
    assert metrics["invariant"] is False
    assert metrics["init"]["tensors"] == len(net.state_dict())
    assert metrics["parameters"] == classifier.count_parameters(net)


def test_bad_inputs_name_their_field(built: Built, trained: tuple[Path, dict[str, Any]]) -> None:
    """No labels file, no or unreadable images, a bad version, a detector directory: InputErrors
    naming the field, not tracebacks."""
    out = built.root / "never"
    with pytest.raises(InputError) as missing:
        classifier.train_classifier(built.images, built.images, out)
    assert missing.value.field == "export_dir"
    (built.root / "empty").mkdir(exist_ok=True)
    with pytest.raises(InputError) as no_images:
        classifier.train_classifier(built.export_dir, built.root / "empty", out)
    assert no_images.value.field == "images"
    with pytest.raises(InputError) as version:
        classifier.train_classifier(built.export_dir, built.images, out, version="a b")
    assert version.value.field == "version"
    model, _ = trained
    detector_dir = built.root / "detector"
    detector_dir.mkdir(exist_ok=True)
    (detector_dir / "model.pt").write_bytes((model / "model.pt").read_bytes())
    (detector_dir / "model.json").write_text(json.dumps({"kind": "detector"}))
    with pytest.raises(InputError) as kind:
        classifier.predict_directory(detector_dir, built.images)
    assert kind.value.field == "model_dir"
    with pytest.raises(InputError) as nothing:
        classifier.predict_directory(model, built.root / "empty")
    assert nothing.value.field == "images"
    broken = built.root / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "9.png").write_bytes(b"not a png")
    with pytest.raises(InputError) as unreadable:
        classifier.predict_directory(model, broken)
    assert unreadable.value.field == "images" and "9.png" in unreadable.value.message
    assert not out.exists()


# --- predictions ----------------------------------------------------------------------------------


def test_predict_classifier_writes_a_distribution_for_every_image(
    built: Built, trained: tuple[Path, dict[str, Any]]
) -> None:
    """--out: one prediction per image file, probabilities over the classes summing to 1."""
    model, _ = trained
    out = built.root / "predictions.json"
    args = ["predict-classifier", str(model), "--images", str(built.images), "--out", str(out)]
    result = CliRunner(env={"GZX_TORCH_THREADS": "1"}).invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    body = json.loads(out.read_text())
    info = json.loads((model / "model.json").read_text())
    ids = [pred["subject_id"] for pred in body["predictions"]]
    assert ids == built.all_ids
    for pred in body["predictions"]:
        assert set(pred["probabilities"]) == set(CLASSES) and pred["boxes"] is None
        assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert all(0.0 <= v <= 1.0 for v in pred["probabilities"].values())
    assert body["export_id"] == built.export_id
    assert body["training_subjects"] == info["training_subjects"]  # all predicted, the new not


class Recorder(BaseHTTPRequestHandler):
    """Stands in for gzx's predictions route: checks contract 1 and answers like it."""

    bodies: ClassVar[list[dict[str, Any]]] = []
    headers_seen: ClassVar[list[str | None]] = []
    seen: ClassVar[set[int]] = set()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Recorder.bodies.append(body)
        Recorder.headers_seen.append(self.headers.get("Authorization"))
        ids = [pred["subject_id"] for pred in body["predictions"]]
        training = set(body.get("training_subjects") or [])
        new = [s for s in ids if s not in Recorder.seen]
        Recorder.seen.update(ids)
        answer = {
            "volunteer": f"ml:{body['model']}@{body['version']}",
            "volunteer_id": 7,
            "accepted": len([s for s in new if s not in training]),
            "in_training": len([s for s in new if s in training]),
            "duplicates": len(ids) - len(new),
        }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def test_post_sends_contract_one_chunks_to_a_real_http_server(
    built: Built, trained: tuple[Path, dict[str, Any]]
) -> None:
    """--post: chunks of at most --chunk predictions, each a valid contract-1 body, with the
    bearer token; every image once; the training subjects named so they are never counted."""
    model, _ = trained
    Recorder.bodies, Recorder.headers_seen, Recorder.seen = [], [], set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1/workflows/{WF}/predictions"
        args = ["predict-classifier", str(model), "--images", str(built.images)]
        args += ["--post", url, "--token", "s3cret", "--chunk", "10"]
        result = CliRunner(env={"GZX_TORCH_THREADS": "1"}).invoke(cli, args)
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 0, result.output + repr(result.exception)
    info = json.loads((model / "model.json").read_text())
    assert [len(b["predictions"]) for b in Recorder.bodies] == [10, 10, 8]
    assert Recorder.headers_seen == ["Bearer s3cret"] * 3
    posted = []
    for body in Recorder.bodies:
        assert re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", body["model"])
        assert re.fullmatch(r"[A-Za-z0-9_.+-]{1,64}", body["version"])
        assert (body["model"], body["version"]) == (info["model"], info["version"])
        assert body["export_id"] == built.export_id
        for pred in body["predictions"]:
            assert set(pred["probabilities"]) == set(CLASSES)
            assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
            posted.append(pred["subject_id"])
    assert sorted(posted) == built.all_ids
    in_training = set(info["training_subjects"])
    assert in_training == {image.subject_id for image in built.truth}
    assert f"{N_NEW} accepted" in result.output
    assert f"{len(in_training)} in training" in result.output


def test_eval_mode_predicts_what_training_learned() -> None:
    """After a short run, BatchNorm's running statistics are recomputed under the final weights:
    without that, the network was right in training mode and at chance in eval mode."""
    rng = np.random.default_rng(0)
    n, size = 64, 16
    labels = np.arange(n) % 2
    pixels = rng.integers(0, 60, size=(n, size, size, 3)).astype(np.uint8)
    pixels[labels == 1, 4:12, 4:12, :] += 150  # class 1: a bright square in the middle
    net = classifier.MorphologyNet(
        classifier.Architecture(classes=("a", "b"), invariant=True, image_size=size)
    )
    classifier.fit(net, pixels, labels, np.ones(n), epochs=3, batch_size=16, seed=0)
    probs = classifier.predict_proba(net, pixels, device=torch.device("cpu"))
    assert (probs.argmax(axis=1) == labels).mean() >= 0.95
