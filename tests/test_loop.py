"""The closed loop (`app.loop`, `gzx demo --loop`) on a tiny synthetic sky.

The first tests replace the trained model by an oracle that reads the generator's truth (with a
few deliberate mistakes), so they check the loop's plumbing and the machine volunteer's effect
in seconds; the last one trains the real models of the `train` extra for a few steps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from rich.console import Console

from app import sky
from app.loop import CLASSES, LoopSizes, Trainer, run_loop
from app.settings import Settings

TINY = LoopSizes(n_train=24, n_eval=30, n_gold=8, n_volunteers=30, image_size=48, cap=8, epochs=1)


def oracle_trainer(error_rate: float) -> Trainer:
    """A 'model' that knows the generator's truth, wrong on a fraction of subjects."""

    def train(
        machine: str, export_dir: Path, images: Path, out: Path, sizes: LoopSizes
    ) -> dict[str, Any]:
        manifest = json.loads((export_dir / "manifest.json").read_text())
        out.mkdir(parents=True, exist_ok=True)
        (out / "training.json").write_text(json.dumps(manifest["subjects"]))
        return {"oracle": True}

    def predict(
        machine: str,
        model_dir: Path,
        images: Path,
        subject_ids: Sequence[int],
        url: str,
        headers: dict[str, str],
    ) -> int:
        training = json.loads((model_dir / "training.json").read_text())
        rng = np.random.default_rng(7)
        # The loop generates the sky from its seed: regenerate the same images to know the truth.
        every = sky.generate(
            TINY.n_train + TINY.n_eval + TINY.n_gold,
            size=TINY.image_size,
            seed=TINY.seed,
            first_id=_first_id(machine),
        )
        truth = {image.subject_id: image for image in every}
        predictions = []
        for subject_id in subject_ids:
            image = truth[subject_id]
            wrong = rng.random() < error_rate
            if machine == "classifier":
                k = CLASSES.index(image.morphology) ^ int(wrong)
                probabilities = {name: (0.9 if i == k else 0.1) for i, name in enumerate(CLASSES)}
                predictions.append({"subject_id": subject_id, "probabilities": probabilities})
            else:
                boxes = (
                    []
                    if wrong
                    else [
                        {
                            "x1": b[0],
                            "y1": b[1],
                            "x2": b[2],
                            "y2": b[3],
                            "score": 0.9,
                            "category": "clump",
                        }
                        for b in image.clumps
                    ]
                )
                predictions.append({"subject_id": subject_id, "boxes": boxes})
        body = {
            "model": f"oracle-{machine}",
            "version": "1",
            "training_subjects": training["train"] + training["val"],
            "predictions": predictions,
        }
        response = httpx.post(url, json=body, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        accepted: int = response.json()["accepted"]
        return accepted

    return Trainer(train, predict)


def _first_id(machine: str) -> int:
    from app.loop import SUBJECT_BASE

    return SUBJECT_BASE + (0 if machine == "detector" else 1_000_000)


@pytest.mark.slow
@pytest.mark.parametrize("machine", ["classifier", "detector"])
def test_a_good_machine_volunteer_saves_human_classifications(tmp_path: Path, machine: str) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'loop.db'}")
    [report] = run_loop(
        settings,
        tmp_path / "work",
        machines=[machine],
        sizes=TINY,
        trainer=oracle_trainer(error_rate=0.1),
        console=Console(quiet=True),
    )
    assert report.bootstrap_human_classifications > 0
    assert report.export_counts["subjects"] > 0
    assert report.with_machine.machine_votes == TINY.n_eval + TINY.n_gold
    assert report.humans.machine_votes == 0
    # Fewer human classifications per retired subject, without losing accuracy.
    assert report.with_machine.per_retired < report.humans.per_retired
    assert report.with_machine.accuracy >= report.humans.accuracy - 0.1
    saved = json.loads((tmp_path / "work" / "loop-report.json").read_text())
    assert saved[0]["machine"] == machine
    assert saved[0]["effort_ratio"] == pytest.approx(report.effort_ratio)


@pytest.mark.slow
def test_gzx_demo_loop_completes_with_the_real_trainers(tmp_path: Path, monkeypatch: Any) -> None:
    """`gzx demo --loop` end to end at a tiny size: the real Faster R-CNN and CNN, trained for an
    epoch on the CPU, post their predictions through the real route (`gzx predict`'s client)."""
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from typer.testing import CliRunner

    from app.cli import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GZX_TOKENS", raising=False)
    result = CliRunner().invoke(
        cli,
        [
            "demo",
            "--loop",
            "--port",
            "0",
            "--subjects",
            "40",
            "--volunteers",
            "20",
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--workdir",
            str(tmp_path / "loop"),
        ],
    )
    assert result.exit_code == 0, result.output
    reports = json.loads((tmp_path / "loop" / "loop-report.json").read_text())
    assert [r["machine"] for r in reports] == ["detector", "classifier"]
    for report in reports:
        # Every evaluation subject and gold subject got the machine's prediction as a vote.
        assert report["with_machine"]["machine_votes"] == 16 + 24
        assert report["humans"]["human_classifications"] > 0
        assert report["model_metrics"]
    assert (tmp_path / "loop" / "detector" / "model-detector" / "model.pt").is_file()
    assert (tmp_path / "loop" / "classifier" / "model-classifier" / "model.json").is_file()
    assert "fewer with the machine" in result.output
