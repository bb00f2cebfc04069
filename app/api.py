"""The HTTP edge: thin `def` routes over the ingest, store and aggregation modules.

Routes own their transaction (or hand it to `app.ingest`), map gzx errors to status codes with
`app.errors.HTTP_STATUS`, and never answer 500 for bad input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import BaseModel
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException
from starlette.routing import Match

from app import ingest, parsing, store
from app.api_engine import add_engine_routes
from app.api_exports import add_export_routes
from app.api_machines import add_machine_routes
from app.api_query import add_query_routes
from app.auth import Authenticator
from app.bodies import JsonBody
from app.errors import GzxError, InputError, NotFound, http_status
from app.logs import install_redaction
from app.models import Classification, Workflow, WorkflowSubject, utcnow
from app.pipeline import AGGREGATE_QUEUE, Dispatcher, recent_job_times
from app.settings import Settings
from app.workflows import load_config

log = logging.getLogger("gzx.api")


class ErrorBody(BaseModel):
    """What every 4xx and 503 answer carries (`app.errors.GzxError.to_dict`)."""

    error: str
    message: str
    field: str | None = None


# Declared on every route, so the OpenAPI schema describes the error bodies gzx really sends
# (FastAPI would otherwise declare its own 422 shape, which gzx never answers with).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (401, "No credential, or a wrong one"),
        (403, "The credential lacks the route's scope"),
        (404, "No such workflow, subject or volunteer"),
        (413, "The body, batch or number of marks is over a configured limit"),
        (422, "Malformed input; `field` names the offending value"),
        (503, "The database is unavailable; retry after Retry-After seconds"),
    )
}


@dataclass
class Metrics:
    registry: CollectorRegistry
    ingested: Counter
    duplicates: Counter
    rejected: Counter
    skipped: Counter
    queue_depth: Gauge
    pending: Gauge
    oldest_pending: Gauge
    job_seconds: Gauge


INT64_MAX = 2**63 - 1


def ids_in_range(request: Request) -> None:
    """Refuse a path id the database cannot hold (422 naming it), not a 500 from the driver."""
    for name, value in request.path_params.items():
        digits = value.lstrip("+-") if isinstance(value, str) else ""
        if digits.isascii() and digits.isdigit() and (len(digits) > 19 or int(digits) > INT64_MAX):
            raise InputError(f"{name} {value[:30]} is out of range", field=name)


def make_metrics() -> Metrics:
    registry = CollectorRegistry()
    return Metrics(
        registry,
        Counter("gzx_ingested", "Classifications stored", ["route"], registry=registry),
        Counter("gzx_duplicates", "Repeat deliveries (stored once)", ["route"], registry=registry),
        Counter(
            "gzx_rejected", "Classifications rejected as malformed", ["route"], registry=registry
        ),
        Counter("gzx_skipped", "Stream events that are not classifications", registry=registry),
        Gauge("gzx_queue_depth", "Jobs waiting on the aggregate queue", registry=registry),
        Gauge("gzx_pending_subjects", "Subjects waiting to be applied", registry=registry),
        Gauge(
            "gzx_oldest_pending_seconds",
            "Age of the oldest pending subject: the queue lag",
            registry=registry,
        ),
        Gauge(
            "gzx_apply_job_seconds",
            "Duration of the last 1,000 apply jobs",
            ["quantile"],
            registry=registry,
        ),
    )


def create_app(
    settings: Settings,
    sessions: sessionmaker[Session],
    dispatcher: Dispatcher,
    committer: ingest.GroupCommitter,
    run_refit: Callable[[int], dict[str, Any]],
    redis: Any = None,
) -> FastAPI:
    """The gzx HTTP API over the given database sessions and job dispatcher."""
    app = FastAPI(
        title="gzx",
        version="0.1.0",
        description="Bayesian crowd aggregation for Zooniverse-style citizen science.",
        responses=ERROR_RESPONSES,
        dependencies=[Depends(ids_in_range)],
    )
    install_redaction()
    auth = Authenticator(settings)
    metrics = make_metrics()
    app.state.metrics = metrics
    app.state.settings = settings
    limits = parsing.Limits(max_marks=settings.max_marks_per_classification)

    @app.exception_handler(GzxError)
    def _gzx_error(_request: Request, error: GzxError) -> JSONResponse:
        return JSONResponse(error.to_dict(), status_code=http_status(error))

    @app.exception_handler(RequestValidationError)
    def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
        return JSONResponse(
            InputError(f"{field}: {first['msg']}", field=field or "body").to_dict(), status_code=422
        )

    @app.exception_handler(HTTPException)
    def _http_error(request: Request, error: HTTPException) -> JSONResponse:
        """Routing errors (404 no such path, 405) in gzx's error shape. A 405's Allow lists
        the methods of every route on the path (Starlette names only the first route's)."""
        headers = dict(error.headers or {})
        if error.status_code == 405:
            allowed: set[str] = set()
            for route in app.router.routes:
                if route.matches(request.scope)[0] != Match.NONE:
                    allowed |= getattr(route, "methods", None) or set()
            headers["Allow"] = ", ".join(sorted(allowed))
        name = {404: "NotFound", 405: "MethodNotAllowed"}.get(error.status_code, "HTTPError")
        body = {"error": name, "message": str(error.detail)}
        return JSONResponse(body, status_code=error.status_code, headers=headers)

    @app.exception_handler(OperationalError)
    def _database_down(_request: Request, _error: OperationalError) -> JSONResponse:
        log.warning("database unavailable")
        body = {"error": "Unavailable", "message": "the database is unavailable; retry later"}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(DBAPIError)
    def _database_error(_request: Request, error: DBAPIError) -> JSONResponse:
        if error.connection_invalidated:
            body = {"error": "Unavailable", "message": "the database connection was lost; retry"}
            return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
        raise error

    @app.get("/healthz", tags=["service"])
    def healthz() -> JSONResponse:
        """Database and Redis reachability (no credential needed)."""
        checks: dict[str, str] = {}
        try:
            with sessions() as session:
                session.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception:
            checks["database"] = "unreachable"
        if redis is None:
            checks["redis"] = "not configured (jobs run in-process)"
        else:
            try:
                redis.ping()
                checks["redis"] = "ok"
            except Exception:
                checks["redis"] = "unreachable"
        healthy = all(v != "unreachable" for v in checks.values())
        return JSONResponse(
            {"status": "ok" if healthy else "degraded", **checks},
            status_code=200 if healthy else 503,
        )

    @app.get(
        "/metrics",
        tags=["service"],
        dependencies=[Depends(auth.require("read"))],
        response_class=PlainTextResponse,
    )
    def prometheus_metrics() -> Response:
        """Prometheus metrics: ingested, duplicates, rejected, queue depth, pending subjects, queue
        lag (age of the oldest pending subject) and apply-job durations."""
        with sessions() as session:
            metrics.pending.set(store.count_pending(session))
            metrics.oldest_pending.set(store.oldest_pending_age(session))
        times = sorted(recent_job_times(redis))
        for q in (0.5, 0.99):
            metrics.job_seconds.labels(str(q)).set(times[int(q * (len(times) - 1))] if times else 0)
        if redis is not None:
            try:
                metrics.queue_depth.set(redis.llen(f"rq:queue:{AGGREGATE_QUEUE}"))
            except Exception:
                log.warning("redis unreachable while reading queue depth")
        return PlainTextResponse(generate_latest(metrics.registry).decode())

    def record(
        items: list[parsing.ParsedClassification], route: str, alone: bool
    ) -> ingest.IngestOutcome:
        outcome = committer.submit(items, each_stands_alone=alone)
        metrics.ingested.labels(route).inc(outcome.count("stored"))
        metrics.duplicates.labels(route).inc(outcome.count("duplicate"))
        metrics.rejected.labels(route).inc(outcome.count("rejected"))
        return outcome

    @app.post("/v1/ingest/kinesis", tags=["ingest"], dependencies=[Depends(auth.require_kinesis)])
    def ingest_kinesis(body: JsonBody) -> dict[str, Any]:
        """A stream forwarder batch `{"payload": [...events]}`; each event stands alone."""
        items = parsing.parse_kinesis_batch(body, limits=limits)
        good = [item for item in items if item.classification is not None]
        outcome = record(
            [item.classification for item in good if item.classification], "kinesis", True
        )
        errors = [{"index": item.index, **item.error} for item in items if item.error is not None]
        errors += [{"index": good[pos].index, **err} for pos, err in outcome.errors.items()]
        skipped = sum(1 for item in items if item.skipped is not None)
        metrics.skipped.inc(skipped)
        metrics.rejected.labels("kinesis").inc(sum(1 for item in items if item.error is not None))
        return {
            "received": len(items),
            "stored": outcome.count("stored"),
            "duplicates": outcome.count("duplicate"),
            "skipped": skipped,
            "rejected": len(errors),
            "errors": sorted(errors, key=lambda e: int(e["index"])),
        }

    @app.post(
        "/v1/classifications", tags=["ingest"], dependencies=[Depends(auth.require("ingest"))]
    )
    def ingest_classifications(body: JsonBody) -> dict[str, Any]:
        """One Panoptes classification object, or a list of them (all or nothing)."""
        items = parsing.parse_classifications_body(body, limits=limits)
        outcome = record(items, "panoptes", False)
        return {
            "stored": outcome.count("stored"),
            "duplicates": outcome.count("duplicate"),
            "ids": [p.id for p in items],
        }

    @app.post("/v1/caesar/extract", tags=["caesar"], dependencies=[Depends(auth.require_caesar)])
    def caesar_extract(body: JsonBody) -> dict[str, Any]:
        """Caesar's external-extractor call; the answer becomes the extract's data in Caesar."""
        parsed = parsing.parse_caesar_extract(body, limits=limits)
        outcome = record([parsed], "caesar", False)
        return {"gzx": outcome.outcomes[0], "classification_id": parsed.id}

    @app.post("/v1/caesar/reduce", tags=["caesar"], dependencies=[Depends(auth.require_caesar)])
    def caesar_reduce(body: JsonBody) -> Response:
        """Caesar's external-reducer call (default mode: a list of extracts; running mode:
        {"extracts", "store"}): the subject's posterior, label and a `retire` flag that Caesar's
        own `retire_subject` rule can test; 204 when gzx holds nothing on the subject yet."""
        extracts = body.get("extracts") if isinstance(body, dict) else body
        if not isinstance(extracts, list) or not extracts or not isinstance(extracts[0], dict):
            raise InputError("expected a non-empty list of extracts", field="extracts")
        first = extracts[0]
        ids = {}
        for name in ("workflow_id", "subject_id"):
            value = first.get(name)
            text = (
                str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
            )
            if not (text.isascii() and text.isdigit() and int(text) < 2**63):
                raise InputError(f"{name} must be an id (an integer)", field=f"extracts[0].{name}")
            ids[name] = int(text)
        with sessions() as session:
            state = session.get(WorkflowSubject, (ids["workflow_id"], ids["subject_id"]))
            if state is None or (state.posterior is None and state.marks_risk is None):
                return Response(status_code=204)
            workflow = session.get(Workflow, ids["workflow_id"])
            classes = (workflow.config or {}).get("classes", []) if workflow else []
            data = {
                "posterior": dict(zip(classes, state.posterior or [], strict=False)),
                "label": state.label,
                "retire": state.status == "retired",
                "reason": state.reason,
                "votes": state.n_views,
                "status": state.status,
            }
        return JSONResponse(data)

    @app.put(
        "/v1/workflows/{workflow_id}",
        tags=["workflows"],
        dependencies=[Depends(auth.require("admin"))],
    )
    def put_workflow(workflow_id: int, body: JsonBody) -> dict[str, Any]:
        """Configure a workflow (self-service); stored classifications are then applied."""
        config = load_config(body)
        now = utcnow()
        with sessions.begin() as session:
            workflow = session.get(Workflow, workflow_id)
            if workflow is None:
                workflow = Workflow(id=workflow_id, created_at=now)
                session.add(workflow)
            workflow.config = config.to_json()
            workflow.config_hash = config.digest()
            workflow.name = config.name
            workflow.updated_at = now
            session.flush()
            session.execute(
                update(WorkflowSubject)
                .where(WorkflowSubject.workflow_id == workflow_id)
                .values(**store.pending_values())
            )
        dispatcher.notify([workflow_id])
        return {"id": workflow_id, "config": config.to_json(), "config_hash": config.digest()}

    @app.get(
        "/v1/workflows/{workflow_id}",
        tags=["workflows"],
        dependencies=[Depends(auth.require("read"))],
    )
    def get_workflow(workflow_id: int) -> dict[str, Any]:
        """A workflow's configuration and how many classifications it holds."""
        with sessions() as session:
            workflow = session.get(Workflow, workflow_id)
            if workflow is None:
                raise NotFound(f"workflow {workflow_id} is not known", field="workflow_id")
            n = session.scalar(
                select(func.count())
                .select_from(Classification)
                .where(Classification.workflow_id == workflow_id)
            )
            return {
                "id": workflow_id,
                "configured": workflow.config is not None,
                "config": workflow.config,
                "config_hash": workflow.config_hash,
                "classifications": int(n or 0),
            }

    add_engine_routes(app, sessions, auth, run_refit, dispatcher.notify)
    add_export_routes(app, sessions, auth, settings, redis)
    add_query_routes(app, sessions, auth, run_refit, dispatcher.notify)
    add_machine_routes(app, sessions, auth, settings, dispatcher.notify)
    return app
