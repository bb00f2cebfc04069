"""The job of the RQ queue "train" (`gzx worker --queue train`): a finished export becomes a trained
detector and, when gzx's API is configured, a machine volunteer.

`workers.jobs.write_export_job` queues `train_on_export(export_id)` (the workflow's
`exports.train_job`, this function by default) once an export is done. It needs the `train` extra.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from app import exports
from app.settings import Settings, get_settings

log = logging.getLogger("gzx.train")


def images_for(settings: Settings, workflow_id: int) -> Path:
    """The workflow's images: GZX_IMAGES_DIR/<workflow id>/ when it exists (one server, several
    workflows), else GZX_IMAGES_DIR itself."""
    own = Path(settings.images_dir) / str(workflow_id)
    return own if own.is_dir() else Path(settings.images_dir)


def train_on_export(export_id: str) -> dict[str, Any]:
    """Train a detector on one export into GZX_MODEL_DIR/<export id>/; then, with GZX_API_URL and
    GZX_API_TOKEN set, predict every image of the workflow and post the predictions (the server
    keeps the export's own subjects out of the machine's votes). Exports without a drawing task
    (no coco_train.json) are skipped."""
    from app.train import common, detector

    settings = get_settings()
    source = exports.export_directory(settings, export_id)
    manifest = json.loads((source / exports.MANIFEST).read_text())
    workflow_id = int(manifest["workflow_id"])
    if not (source / "coco_train.json").is_file():
        log.info("export %s has no detection set: nothing to train", export_id)
        return {"export_id": export_id, "skipped": "no coco_train.json"}
    images = images_for(settings, workflow_id)
    out = Path(settings.model_dir) / export_id
    metrics = detector.train(
        source,
        images,
        out,
        epochs=settings.train_epochs,
        iterations=settings.train_iterations,
        name=f"gzx-detector-w{workflow_id}",
        export_id=export_id,
    )
    log.info("export %s: %s", export_id, detector.describe_metrics(metrics))
    report: dict[str, Any] = {
        "export_id": export_id,
        "model_dir": str(out),
        "completeness": metrics["completeness"],
        "purity": metrics["purity"],
    }
    if settings.api_url and settings.api_token:
        body = detector.predict(out, images)
        url = f"{settings.api_url.rstrip('/')}/v1/workflows/{workflow_id}/predictions"
        answers = common.post_predictions(url, settings.api_token, body)
        log.info("export %s: %s", export_id, common.describe_answers(answers))
        report["posted"] = len(body["predictions"])
    return report
