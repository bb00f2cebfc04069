"""Builders of realistic platform payloads (both front-end generations), written for gzx's tests."""

from __future__ import annotations

from typing import Any

WORKFLOW = 30303
PROJECT = 9001


def clump_config() -> dict[str, Any]:
    """The Clump-Scout-like configuration of examples/clump-scout.yaml, as JSON."""
    return {
        "name": "Find the clumps",
        "classes": ["clumpy", "not_clumpy"],
        "question": {
            "task": "T0",
            "answers": [
                {"index": 0, "label": "Yes", "class": "clumpy"},
                {"index": 1, "label": "No", "class": "not_clumpy"},
            ],
        },
        "drawing": {
            "task": "T1",
            "tools": [
                {
                    "index": 0,
                    "type": "point",
                    "label": "Clump",
                    "category": "clump",
                    "box_size": [20, 20],
                },
                {"index": 1, "type": "rectangle", "label": "Odd clump", "category": "odd_clump"},
            ],
        },
        "retirement": {"min_views": 3, "cap": 20},
    }


def _metadata(classifier_version: str | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "started_at": "2025-03-04T09:59:41Z",
        "finished_at": "2025-03-04T10:00:03Z",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
        "user_language": "en",
        "live_project": True,
        "source": "api",
        "subject_dimensions": [
            {"clientWidth": 600, "clientHeight": 600, "naturalWidth": 424, "naturalHeight": 424}
        ],
        "workflow_version": "18.42",
    }
    if classifier_version:
        metadata["classifier_version"] = classifier_version
    return metadata


def classic(
    classification_id: int,
    subject_id: int,
    user_id: int | None,
    answer: int | None = 0,
    boxes: list[tuple[float, float, float, float]] | None = None,
    created_at: str = "2025-03-04T10:00:04.900Z",
    user_ip: str = "203.0.113.7",
    workflow_id: int = WORKFLOW,
    tool: int = 1,
) -> dict[str, Any]:
    """A classic (PFE) classification: answer index, rectangles with top-left x,y."""
    annotations: list[dict[str, Any]] = []
    if answer is not None:
        annotations.append({"task": "T0", "value": answer})
    if boxes is not None:
        annotations.append(
            {
                "task": "T1",
                "value": [
                    {
                        "tool": tool,
                        "frame": 0,
                        "x": x,
                        "y": y,
                        "width": w,
                        "height": h,
                        "details": [],
                    }
                    for x, y, w, h in boxes
                ],
            }
        )
    return {
        "id": str(classification_id),
        "created_at": created_at,
        "updated_at": created_at,
        "user_ip": user_ip,
        "workflow_version": "18.42",
        "gold_standard": None,
        "expert_classifier": None,
        "annotations": annotations,
        "metadata": _metadata(),
        "href": f"/classifications/{classification_id}",
        "links": {
            "project": str(PROJECT),
            "workflow": str(workflow_id),
            "user": None if user_id is None else str(user_id),
            "subjects": [str(subject_id)],
        },
    }


def fem(
    classification_id: int,
    subject_id: int,
    user_id: int | None,
    answer: int | None = 0,
    boxes_centre: list[tuple[float, float, float, float]] | None = None,
    created_at: str = "2025-03-04T10:00:04.900Z",
) -> dict[str, Any]:
    """A new front-end (FEM, classifier_version 2.0) classification: x_center rectangles."""
    annotations: list[dict[str, Any]] = []
    if answer is not None:
        annotations.append({"task": "T0", "taskType": "single", "value": answer})
    if boxes_centre is not None:
        annotations.append(
            {
                "task": "T1",
                "taskType": "drawing",
                "value": [
                    {
                        "toolIndex": 1,
                        "toolType": "rectangle",
                        "frame": 0,
                        "x_center": cx,
                        "y_center": cy,
                        "width": w,
                        "height": h,
                        "details": [],
                    }
                    for cx, cy, w, h in boxes_centre
                ],
            }
        )
    payload = classic(classification_id, subject_id, user_id, None, None, created_at)
    payload["annotations"] = annotations
    payload["metadata"] = _metadata("2.0")
    return payload


def event(
    data: dict[str, Any], location: str | None = "https://example.org/a.png"
) -> dict[str, Any]:
    """A Kinesis stream event wrapping one classification, with linked subjects."""
    subjects = [
        {
            "id": s,
            "metadata": {"#training_subject": "false", "ra": "150.1"},
            "locations": [{"image/png": location}] if location else [],
        }
        for s in data["links"]["subjects"]
    ]
    return {
        "source": "panoptes",
        "type": "classification",
        "version": "1.0.0",
        "timestamp": data["created_at"],
        "data": data,
        "linked": {
            "projects": [{"id": str(PROJECT)}],
            "workflows": [{"id": data["links"]["workflow"]}],
            "subjects": subjects,
            "users": []
            if data["links"]["user"] is None
            else [{"id": data["links"]["user"], "login": "volunteer_a"}],
        },
    }


def batch(*events: dict[str, Any]) -> dict[str, Any]:
    return {"payload": list(events)}


def caesar(data: dict[str, Any]) -> dict[str, Any]:
    """What Caesar POSTs to an external extractor for the same classification."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for annotation in data["annotations"]:
        by_task.setdefault(annotation["task"], []).append(annotation)
    subject_id = int(data["links"]["subjects"][0])
    return {
        "id": int(data["id"]),
        "project_id": PROJECT,
        "workflow_id": int(data["links"]["workflow"]),
        "workflow_version": data["workflow_version"],
        "subject_id": subject_id,
        "user_id": None if data["links"]["user"] is None else int(data["links"]["user"]),
        "annotations": by_task,
        "metadata": data["metadata"],
        "subject": {
            "id": subject_id,
            "metadata": {"#training_subject": "false"},
            "created_at": data["created_at"],
            "updated_at": data["created_at"],
        },
        "created_at": data["created_at"],
        "updated_at": data["updated_at"],
    }


EXPORT_COLUMNS = [
    *("classification_id", "user_name", "user_id", "user_ip", "workflow_id", "workflow_name"),
    *("workflow_version", "created_at", "gold_standard", "expert", "metadata", "annotations"),
    *("subject_data", "subject_ids"),
]


def export_row(
    classification_id: int,
    subject_id: int,
    user_id: int | None,
    label: str = "Yes",
    box: tuple[float, float, float, float] | None = None,
) -> dict[str, str]:
    """One row of a Panoptes classification export: answers as labels, anonymous not logged in."""
    import json

    annotations: list[dict[str, Any]] = [
        {"task": "T0", "task_label": "Is it clumpy?", "value": label}
    ]
    if box is not None:
        x, y, w, h = box
        annotations.append(
            {
                "task": "T1",
                "task_label": "Mark clumps",
                "value": [
                    {
                        "tool": 1,
                        "tool_label": "Odd clump",
                        "frame": 0,
                        "x": x,
                        "y": y,
                        "width": w,
                        "height": h,
                        "details": [],
                    }
                ],
            }
        )
    anonymous = user_id is None
    return {
        "classification_id": str(classification_id),
        "user_name": f"not-logged-in-{classification_id % 5:08x}"
        if anonymous
        else f"user{user_id}",
        "user_id": "" if anonymous else str(user_id),
        "user_ip": f"{classification_id % 5:08x}",
        "workflow_id": str(WORKFLOW),
        "workflow_name": "Find the clumps",
        "workflow_version": "18.42",
        "created_at": "2025-03-04 10:00:04 UTC",
        "gold_standard": "",
        "expert": "",
        "metadata": json.dumps(_metadata()),
        "annotations": json.dumps(annotations),
        "subject_data": json.dumps({str(subject_id): {"retired": None, "ra": "150.1"}}),
        "subject_ids": str(subject_id),
    }


def write_export(path: Any, rows: list[dict[str, str]]) -> None:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=EXPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
