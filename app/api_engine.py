"""Routes of the answer engine: subjects' posteriors, volunteers' skills, gold, refit, stats."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app import aggregation, answers, store
from app.auth import Authenticator
from app.bodies import JsonBody, RawBody
from app.errors import InputError, NotFound
from app.models import Classification, View, Volunteer, Workflow, WorkflowSubject
from app.workflows import WorkflowConfig, load_config


def configured(session: Session, workflow_id: int) -> tuple[Workflow, WorkflowConfig]:
    workflow = session.get(Workflow, workflow_id)
    if workflow is None or workflow.config is None:
        raise NotFound(f"workflow {workflow_id} is not configured", field="workflow_id")
    return workflow, load_config(workflow.config)


def parse_gold(content_type: str, body: bytes, config: WorkflowConfig) -> dict[int, str]:
    """Gold labels from JSON {"subjects": [{"subject_id", "label"}]} or CSV `subject,label`."""
    rows: list[tuple[str, Any, Any]] = []
    if "csv" in content_type:
        reader = csv.DictReader(io.StringIO(body.decode("utf-8", errors="replace")))
        if not reader.fieldnames or not {"subject", "label"} <= set(reader.fieldnames):
            raise InputError("a gold CSV needs the columns subject,label", field="subject")
        rows = [(f"line {n}", r["subject"], r["label"]) for n, r in enumerate(reader, start=2)]
    else:
        import json

        try:
            data = json.loads(body)
        except ValueError as error:
            raise InputError(f"body is not valid JSON: {error}", field="body") from None
        items = data.get("subjects") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise InputError('expected {"subjects": [...]}', field="subjects")
        for n, item in enumerate(items):
            if not isinstance(item, dict):
                raise InputError("each gold entry is an object", field=f"subjects[{n}]")
            rows.append((f"subjects[{n}]", item.get("subject_id"), item.get("label")))
    labels: dict[int, str] = {}
    for where, subject, label in rows:
        if isinstance(subject, bool) or not (
            isinstance(subject, int) or (isinstance(subject, str) and subject.strip().isdigit())
        ):
            raise InputError(f"{where}: subject id must be an integer", field=f"{where}.subject_id")
        if label not in config.classes:
            raise InputError(
                f"{where}: label {label!r} is not one of {config.classes}", field=f"{where}.label"
            )
        labels[int(subject)] = str(label)
    return labels


def add_engine_routes(
    app: FastAPI,
    sessions: sessionmaker[Session],
    auth: Authenticator,
    run_refit: Callable[[int], dict[str, Any]],
    notify: Callable[[list[int]], None],
) -> None:
    """Register the answer engine's routes on `app`."""

    @app.get(
        "/v1/workflows/{workflow_id}/subjects/{subject_id}",
        tags=["subjects"],
        dependencies=[Depends(auth.require("read"))],
    )
    def get_subject(workflow_id: int, subject_id: int) -> dict[str, Any]:
        """A subject's posterior per class, MAP label, votes, status and reason, and its history
        (the posterior after each counted vote)."""
        with sessions() as session:
            state = session.get(WorkflowSubject, (workflow_id, subject_id))
            if state is None:
                raise NotFound(
                    f"subject {subject_id} has no classifications in workflow {workflow_id}",
                    field="subject_id",
                )
            workflow = session.get(Workflow, workflow_id)
            classes: list[str] = (workflow.config or {}).get("classes", []) if workflow else []
            gold = store.gold_labels(session, workflow_id, [subject_id]).get(subject_id)
            return {
                "workflow_id": workflow_id,
                "subject_id": subject_id,
                "status": state.status,
                "pending": state.pending,
                "classifications": state.n_classifications,
                "views": state.n_views,
                "counts": dict(zip(classes, [int(c) for c in state.counts or []], strict=False)),
                "posterior": (
                    dict(zip(classes, state.posterior, strict=False)) if state.posterior else None
                ),
                "label": state.label,
                "reason": state.reason,
                "retired_at": state.retired_at.isoformat() if state.retired_at else None,
                "gold": gold,
                "history": (
                    aggregation.subject_history(
                        session, workflow, load_config(workflow.config), subject_id
                    )
                    if workflow is not None and workflow.config and "question" in workflow.config
                    else []
                ),
                "updated_at": state.updated_at.isoformat(),
            }

    @app.get(
        "/v1/workflows/{workflow_id}/stats",
        tags=["workflows"],
        dependencies=[Depends(auth.require("read"))],
    )
    def workflow_stats(workflow_id: int) -> dict[str, Any]:
        """Subjects live / retired / contested, classifications stored, and the retired ids."""
        with sessions() as session:
            workflow, _ = configured(session, workflow_id)
            by_status = dict(
                session.execute(
                    select(WorkflowSubject.status, func.count())
                    .where(WorkflowSubject.workflow_id == workflow_id)
                    .group_by(WorkflowSubject.status)
                ).all()
            )
            n = session.scalar(
                select(func.count())
                .select_from(Classification)
                .where(Classification.workflow_id == workflow_id)
            )
            retired = session.scalars(
                select(WorkflowSubject.subject_id).where(
                    WorkflowSubject.workflow_id == workflow_id,
                    WorkflowSubject.status != "live",
                )
            ).all()
            return {
                "workflow_id": workflow_id,
                "subjects": int(sum(by_status.values())),
                "live": int(by_status.get("live", 0)),
                "retired": int(by_status.get("retired", 0)),
                "contested": int(by_status.get("contested", 0)),
                "classifications": int(n or 0),
                "skill_snapshot_id": workflow.skill_snapshot_id,
                "retired_ids": list(retired),
            }

    @app.put(
        "/v1/workflows/{workflow_id}/gold",
        tags=["gold"],
        dependencies=[Depends(auth.require("admin"))],
    )
    def put_gold(workflow_id: int, body: RawBody) -> dict[str, Any]:
        """Upload gold labels (JSON or CSV `subject,label`); the volunteers they touch re-learn."""
        content_type, raw = body
        with sessions.begin() as session:
            _, config = configured(session, workflow_id)
            labels = parse_gold(content_type, raw, config)
            changed = store.upsert_gold(session, workflow_id, labels, source="upload")
        refit = run_refit(workflow_id) if changed else None
        return {"stored": len(labels), "changed": len(changed), "refit": refit}

    @app.post(
        "/v1/workflows/{workflow_id}/retirement-preview",
        tags=["workflows"],
        dependencies=[Depends(auth.require("read"))],
    )
    def retirement_preview(workflow_id: int, body: JsonBody) -> dict[str, Any]:
        """What a candidate retirement rule (the `retirement` block of a workflow configuration)
        would do on the stored votes: subjects retired, classifications saved, accuracy on gold."""
        with sessions() as session:
            workflow, config = configured(session, workflow_id)
            candidate = load_config({**config.to_json(), "retirement": body})
            return aggregation.preview_retirement(
                session, workflow, config, candidate.retirement_rule()
            )

    @app.post(
        "/v1/workflows/{workflow_id}/refit",
        tags=["workflows"],
        dependencies=[Depends(auth.require("admin"))],
    )
    def post_refit(workflow_id: int) -> dict[str, Any]:
        """Re-estimate every volunteer from everything stored, then recompute every subject."""
        with sessions() as session:
            configured(session, workflow_id)
        return run_refit(workflow_id)

    @app.get(
        "/v1/workflows/{workflow_id}/volunteers/{volunteer}",
        tags=["volunteers"],
        dependencies=[Depends(auth.require("read"))],
    )
    def get_volunteer(workflow_id: int, volunteer: str) -> dict[str, Any]:
        """A volunteer's confusion matrix with 90% intervals, votes, gold votes and the
        information per vote (bits). `volunteer` is gzx's id or a key such as `user:123`."""
        with sessions() as session:
            workflow, config = configured(session, workflow_id)
            found = (
                session.get(Volunteer, int(volunteer))
                if volunteer.isdigit()
                else session.scalar(select(Volunteer).where(Volunteer.key == volunteer))
            )
            if found is None:
                raise NotFound(f"volunteer {volunteer} is not known", field="volunteer")
            ids = np.array([found.id], dtype=np.int64)
            skills = aggregation.skills_for(
                session, workflow_id, config, aggregation.current_snapshot(session, workflow), ids
            )
            theta = answers.confusion(skills)[0]
            lower, upper = answers.credible_intervals(skills, 0.9)
            n_votes = session.scalar(
                select(func.count())
                .select_from(View)
                .where(View.workflow_id == workflow_id, View.volunteer_id == found.id)
            )
            gold_subjects = list(store.gold_labels(session, workflow_id))
            n_gold = session.scalar(
                select(func.count())
                .select_from(View)
                .where(
                    View.workflow_id == workflow_id,
                    View.volunteer_id == found.id,
                    View.subject_id.in_(gold_subjects),
                )
            )
            return {
                "workflow_id": workflow_id,
                "volunteer_id": found.id,
                "key": found.key,
                "kind": found.kind,
                "excluded": found.excluded,
                "classes": config.classes,
                "confusion": theta.tolist(),
                "confusion_lower_90": lower[0].tolist(),
                "confusion_upper_90": upper[0].tolist(),
                "votes": int(n_votes or 0),
                "gold_votes": int(n_gold or 0),
                "information_per_vote_bits": float(answers.information_per_vote(skills)[0]),
            }
