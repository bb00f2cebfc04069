"""Routes of the answer engine: subjects' posteriors, volunteers' skills, gold, refit, stats."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app import aggregation, answers, clusters, levels, marks, store
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


def parse_gold(
    content_type: str, body: bytes, config: WorkflowConfig
) -> tuple[dict[int, str], dict[int, list[list[float]]]]:
    """Gold from JSON {"subjects": [{"subject_id", "label"?, "boxes"?: [[x1,y1,x2,y2], ...]}]}
    (an empty `boxes` list: known to hold no object) or CSV `subject,label`."""
    rows: list[tuple[str, Any, Any, Any]] = []
    if "csv" in content_type:
        reader = csv.DictReader(io.StringIO(body.decode("utf-8", errors="replace")))
        if not reader.fieldnames or not {"subject", "label"} <= set(reader.fieldnames):
            raise InputError("a gold CSV needs the columns subject,label", field="subject")
        rows = [(f"line {n}", r["subject"], r["label"], None) for n, r in enumerate(reader, 2)]
    else:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as error:
            raise InputError(f"body is not valid JSON: {error}", field="body") from None
        items = data.get("subjects") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise InputError('expected {"subjects": [...]}', field="subjects")
        for n, item in enumerate(items):
            if not isinstance(item, dict):
                raise InputError("each gold entry is an object", field=f"subjects[{n}]")
            rows.append(
                (
                    f"subjects[{n}]",
                    item.get("subject_id"),
                    item.get("label"),
                    item.get("boxes", ...),
                )
            )
    labels: dict[int, str] = {}
    boxes: dict[int, list[list[float]]] = {}
    for where, subject, label, subject_boxes in rows:
        if (
            isinstance(subject, bool)
            or not (isinstance(subject, int) and 0 <= subject < 2**63)
            or (
                isinstance(subject, str)
                and subject.strip().isascii()
                and subject.strip().isdigit()
                and int(subject) < 2**63
            )
        ):
            raise InputError(f"{where}: subject id must be an integer", field=f"{where}.subject_id")
        if label is not None:
            if label not in config.classes:
                raise InputError(
                    f"{where}: label {label!r} is not one of {config.classes}",
                    field=f"{where}.label",
                )
            labels[int(subject)] = str(label)
        if subject_boxes is not ... and subject_boxes is not None:
            boxes[int(subject)] = _gold_boxes(subject_boxes, f"{where}.boxes")
        if label is None and subject_boxes in (..., None):
            raise InputError(f"{where}: give a label or boxes", field=f"{where}.label")
    return labels, boxes


def _gold_boxes(value: Any, where: str) -> list[list[float]]:
    if not isinstance(value, list):
        raise InputError(f"{where} must be a list of [x1, y1, x2, y2]", field=where)
    result = []
    for i, box in enumerate(value):
        ok = (
            isinstance(box, list)
            and len(box) == 4
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in box)
            and all(math.isfinite(x) for x in box)
        )
        if not ok or not (box[2] > box[0] and box[3] > box[1]):
            raise InputError(
                f"{where}[{i}] must be [x1, y1, x2, y2] with x2 > x1, y2 > y1",
                field=f"{where}[{i}]",
            )
        result.append([float(x) for x in box])
    return result


def _answer_skill(
    session: Session, workflow: Workflow, config: WorkflowConfig, volunteer_id: int
) -> dict[str, Any]:
    """Confusion matrix with 90% intervals and information per vote (None without a question)."""
    if config.question is None:
        names = ("confusion", "confusion_lower_90", "confusion_upper_90")
        return {**dict.fromkeys(names), "information_per_vote_bits": None}
    ids = np.array([volunteer_id], dtype=np.int64)
    snapshot = aggregation.current_snapshot(session, workflow)
    skills = aggregation.skills_for(session, workflow.id, config, snapshot, ids)
    lower, upper = answers.credible_intervals(skills, 0.9)
    return {
        "confusion": answers.confusion(skills)[0].tolist(),
        "confusion_lower_90": lower[0].tolist(),
        "confusion_upper_90": upper[0].tolist(),
        "information_per_vote_bits": float(answers.information_per_vote(skills)[0]),
    }


def _mark_skill(
    session: Session, workflow: Workflow, config: WorkflowConfig, volunteer_id: int
) -> dict[str, Any] | None:
    """p_fn, f, p_fp and sigma of one volunteer with 90% intervals (None without a drawing task)."""
    if config.drawing is None:
        return None
    skills, local = clusters.skills_for(session, workflow, np.array([volunteer_id]))
    known = bool(local[0] < skills.n_volunteers)
    result: dict[str, Any] = {"learned": known}
    intervals = marks.skill_intervals(skills) if known else {}
    for name in ("p_fn", "f", "p_fp", "sigma"):
        value = (
            float(getattr(skills, name)[local[0]])
            if known
            else float(getattr(skills, f"pop_{name}"))
        )
        result[name] = value
        if known:
            result[f"{name}_90"] = [float(x) for x in intervals[name][local[0]]]
    return result


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
                "marks_risk": state.marks_risk,
                "clusters": [
                    {
                        "tool": c.tool if c.tool >= 0 else None,
                        "frame": c.frame if c.frame >= 0 else None,
                        "box": [c.x1, c.y1, c.x2, c.y2],
                        "p_real": c.p_real,
                        "p_off": c.p_off,
                        "kept": c.kept,
                        "n_marks": c.n_marks,
                        "n_views": c.n_views,
                        "members": c.members,
                    }
                    for c in store.clusters_of(session, workflow_id, subject_id)
                    if c.n_marks > 0
                ],
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
            labels, boxes = parse_gold(content_type, raw, config)
            changed = store.upsert_gold(session, workflow_id, labels, source="upload")
            store.upsert_gold_boxes(session, workflow_id, boxes, source="upload")
        refit = run_refit(workflow_id) if changed or boxes else None
        return {"stored": len(labels), "boxes": len(boxes), "changed": len(changed), "refit": refit}

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
        """A volunteer's confusion matrix with 90% intervals, votes, gold votes, the
        information per vote (bits) and the levels reached (at most 100, in the order reached).
        `volunteer` is gzx's id or a key such as `user:123`."""
        with sessions() as session:
            workflow, config = configured(session, workflow_id)
            found = (
                session.get(Volunteer, int(volunteer))
                if volunteer.isascii() and volunteer.isdigit() and int(volunteer) < 2**63
                else session.scalar(select(Volunteer).where(Volunteer.key == volunteer))
            )
            if found is None:
                raise NotFound(f"volunteer {volunteer} is not known", field="volunteer")
            answer_skill = _answer_skill(session, workflow, config, found.id)
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
                **answer_skill,
                "votes": int(n_votes or 0),
                "gold_votes": int(n_gold or 0),
                "marks": _mark_skill(session, workflow, config, found.id),
                "levels": levels.levels_of(session, workflow_id, found.id, config),
            }
