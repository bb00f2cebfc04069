"""Routes of exports: start one (a job), read its status and manifest, fetch its files."""

from __future__ import annotations

import json
import threading
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from rq import Queue
from sqlalchemy.orm import Session, sessionmaker

from app import exports
from app.auth import Authenticator
from app.bodies import read_limited
from app.errors import InputError, NotFound
from app.models import Export, Workflow
from app.pipeline import EXPORTS_QUEUE
from app.settings import Settings
from app.workflows import load_config


async def optional_json(request: Request) -> Any:
    """The request body as JSON, or None when it is empty (422 when malformed)."""
    raw = await read_limited(request)
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise InputError("body is not valid JSON", field="body") from None


OptionalJson = Annotated[Any, Depends(optional_json)]


def start_export(
    sessions: sessionmaker[Session], settings: Settings, redis: Any, export_id: str
) -> None:
    """After the commit: an RQ job on "exports" with Redis, else a thread of this process."""
    if redis is not None:
        Queue(EXPORTS_QUEUE, connection=redis).enqueue(
            "workers.jobs.write_export_job", export_id, job_timeout=3600
        )
        return

    def run() -> None:
        if exports.write_export(sessions, settings, export_id) == "done":
            exports.notify_done(sessions, export_id)

    threading.Thread(target=run, name=f"gzx-export-{export_id[:8]}", daemon=True).start()


def add_export_routes(
    app: FastAPI,
    sessions: sessionmaker[Session],
    auth: Authenticator,
    settings: Settings,
    redis: Any = None,
) -> None:
    """Register the export routes on `app`."""

    @app.post(
        "/v1/workflows/{workflow_id}/exports",
        tags=["exports"],
        status_code=202,
        dependencies=[Depends(auth.require("admin"))],
    )
    def post_export(workflow_id: int, body: OptionalJson) -> JSONResponse:
        """Start an export; the body (optional) overrides the workflow's selection rules.
        Answers 202 with the export's id; poll GET /v1/exports/{id}."""
        with sessions.begin() as session:
            workflow = session.get(Workflow, workflow_id)
            if workflow is None or workflow.config is None:
                raise NotFound(f"workflow {workflow_id} is not configured", field="workflow_id")
            rules = exports.resolve_rules(load_config(workflow.config), body)
            export_id = exports.create_export(session, workflow_id, rules)
        start_export(sessions, settings, redis, export_id)
        body = {"id": export_id, "status": "queued", "rules": rules.model_dump(mode="json")}
        return JSONResponse(body, status_code=202)

    @app.get(
        "/v1/exports/{export_id}",
        tags=["exports"],
        dependencies=[Depends(auth.require("read"))],
    )
    def get_export(export_id: str) -> dict[str, Any]:
        """An export's status (queued, running, done, failed with its error), rules, manifest
        (without the subject ids, which are in its manifest.json) and files."""
        with sessions() as session:
            return exports.describe(_find(session, export_id))

    @app.get(
        "/v1/exports/{export_id}/files/{name:path}",
        tags=["exports"],
        dependencies=[Depends(auth.require("read"))],
        response_class=FileResponse,
    )
    def get_export_file(export_id: str, name: str) -> FileResponse:
        """One file of a finished export (manifest.json, coco_*.json, labels.*, skills.csv)."""
        with sessions() as session:
            export = _find(session, export_id)
            path = exports.export_file(settings, export, name)
        media = exports.MEDIA_TYPES.get(path.suffix, "application/octet-stream")
        return FileResponse(path, media_type=media, filename=name)

    def _find(session: Session, export_id: str) -> Export:
        if not exports.EXPORT_ID.match(export_id):
            raise NotFound(f"export {export_id[:40]} is not known", field="export_id")
        export = session.get(Export, export_id)
        if export is None:
            raise NotFound(f"export {export_id} is not known", field="export_id")
        return export
