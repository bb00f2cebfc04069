"""`gzx aggregate-marks`: cluster the marks of CSV files offline, with the service's math.

    VIEWS.csv          subject,volunteer               one row per view, with or without marks
    MARKS.csv          subject,volunteer,x1,y1,x2,y2   boxes (corners in any order), or
                       subject,volunteer,x,y           clicks: boxes of `tool_size` around them;
                       optional tool, frame            clusters are kept apart per tool and frame
    GOLD_MARKS.csv     subject,x1,y1,x2,y2 (or x,y)    expert boxes; optional tool, frame (without
                                                       them a box applies to all of its subject's)
    GOLD_SUBJECTS.csv  subject                         every subject whose truth is known
    CLUSTERS.csv       subject,x1,y1,x2,y2,p_real,p_off,n_marks,n_views (+ tool, frame when given)

Skills are learned from gold first, then by EM over all subjects (`app.marks.learn_skills`), and
every (subject, tool, frame) is aggregated with them (`app.marks.aggregate_many`). Runtime needs
only the csv module and numpy. Bad input raises `InputError`; its field names file, line, column.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from app import marks
from app.errors import InputError

BOX_COLUMNS = ("x1", "y1", "x2", "y2")
POINT_COLUMNS = ("x", "y")


def parse_tool_size(text: str) -> tuple[float, float]:
    """'W,H' (or one number for a square) as a positive (width, height)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise InputError(
            f"tool size must be W,H numbers, got {text!r}", field="tool_size"
        ) from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"tool size must be two positive numbers, got {text!r}", field="tool_size")
    return values[0], values[1]


def _rows(
    path: Path | str, name: str, required: tuple[str, ...]
) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file whose header has the `required` columns."""
    try:
        handle = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115  (closed below)
    except OSError as error:
        raise InputError(f"cannot read {name}: {error.strerror}", field=name) from None
    with handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise InputError(f"{name} lacks column(s) {', '.join(missing)}", field=name)
        reader.fieldnames = header
        for row in reader:
            yield reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}


def _text(row: dict[str, str], column: str, name: str, line: int) -> str:
    value = row.get(column, "")
    if not value:
        raise InputError(f"{name} line {line}: empty {column}", field=f"{name}[{line}].{column}")
    return value


def _number(row: dict[str, str], column: str, name: str, line: int) -> float:
    text = _text(row, column, name, line)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InputError(
            f"{name} line {line}: {column} is not a number: {text!r}",
            field=f"{name}[{line}].{column}",
        )
    return value


def _header(path: Path | str, name: str) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            first = next(csv.reader(handle), [])
    except OSError as error:
        raise InputError(f"cannot read {name}: {error.strerror}", field=name) from None
    return [h.strip() for h in first]


def _read_boxes(
    path: Path | str, name: str, with_volunteer: bool, tool_size: tuple[float, float] | None
) -> tuple[list[tuple[str, str, str, str]], marks.FloatArray, bool]:
    """Keys (subject, volunteer, tool, frame) and boxes (n, 4) of a marks file; is it clicks?"""
    header = _header(path, name)
    is_points = not all(c in header for c in BOX_COLUMNS)
    coords = POINT_COLUMNS if is_points else BOX_COLUMNS
    if is_points and not all(c in header for c in POINT_COLUMNS):
        raise InputError(f"{name} needs x1,y1,x2,y2 or x,y columns", field=name)
    if is_points and tool_size is None:
        raise InputError(f"{name} holds clicks (x, y): give the tool size W,H", field="tool_size")
    required = ("subject", "volunteer", *coords) if with_volunteer else ("subject", *coords)
    keys: list[tuple[str, str, str, str]] = []
    values: list[list[float]] = []
    for line, row in _rows(path, name, required):
        volunteer = _text(row, "volunteer", name, line) if with_volunteer else ""
        keys.append(
            (
                _text(row, "subject", name, line),
                volunteer,
                row.get("tool", ""),
                row.get("frame", ""),
            )
        )
        values.append([_number(row, c, name, line) for c in coords])
    array = np.array(values, dtype=np.float64).reshape(-1, len(coords))
    if is_points:
        assert tool_size is not None
        return keys, marks.points_to_boxes(array, tool_size).reshape(-1, 4), True
    return keys, array, False


def aggregate_marks_csv(
    views_path: Path | str,
    marks_path: Path | str,
    out_path: Path | str,
    *,
    tool_size: tuple[float, float] | None = None,
    gold_marks_path: Path | str | None = None,
    gold_subjects_path: Path | str | None = None,
    iou_threshold: float = 0.5,
    keep_threshold: float = 0.5,
) -> dict[str, Any]:
    """Learn skills, cluster every subject's marks and write CLUSTERS.csv; return a summary."""
    views = {
        (_text(row, "subject", "views", line), _text(row, "volunteer", "views", line))
        for line, row in _rows(views_path, "views", ("subject", "volunteer"))
    }
    mark_keys, boxes, is_points = _read_boxes(marks_path, "marks", True, tool_size)
    mark_header = _header(marks_path, "marks")
    has_tool, has_frame = "tool" in mark_header, "frame" in mark_header

    gold_keys: list[tuple[str, str, str, str]] = []
    gold_boxes: marks.FloatArray = np.zeros((0, 4))
    gold_header: list[str] = []
    if gold_marks_path is not None:
        gold_keys, gold_boxes, _ = _read_boxes(gold_marks_path, "gold_marks", False, tool_size)
        gold_header = _header(gold_marks_path, "gold_marks")
    known: set[str] = {key[0] for key in gold_keys}
    if gold_subjects_path is not None:
        known |= {
            _text(row, "subject", "gold_subjects", line)
            for line, row in _rows(gold_subjects_path, "gold_subjects", ("subject",))
        }

    subjects = sorted({s for s, _ in views} | {k[0] for k in mark_keys})
    volunteers = sorted({u for _, u in views} | {k[1] for k in mark_keys})
    vol_index = {u: i for i, u in enumerate(volunteers)}
    marked = {(k[0], k[2], k[3]) for k in mark_keys}
    unmarked = {(s, "", "") for s in subjects} - {(g[0], "", "") for g in marked}
    groups = sorted(marked | unmarked)
    by_subject: dict[str, list[int]] = {}
    for g, (subject, _, _) in enumerate(groups):
        by_subject.setdefault(subject, []).append(g)
    group_index = {key: g for g, key in enumerate(groups)}

    mark_group = np.array([group_index[(k[0], k[2], k[3])] for k in mark_keys], dtype=np.int64)
    mark_vol = np.array([vol_index[k[1]] for k in mark_keys], dtype=np.int64)
    view_pairs = sorted((g, vol_index[u]) for s, u in views for g in by_subject.get(s, []))
    view_group = np.array([g for g, _ in view_pairs], dtype=np.int64)
    view_vol = np.array([u for _, u in view_pairs], dtype=np.int64)

    gold_group: list[int] = []
    gold_rows: list[int] = []
    gold_match_tool = "tool" in gold_header
    gold_match_frame = "frame" in gold_header
    for i, (subject, _, tool, frame) in enumerate(gold_keys):
        for g in by_subject.get(subject, []):
            _, g_tool, g_frame = groups[g]
            if (not gold_match_tool or tool == g_tool) and (
                not gold_match_frame or frame == g_frame
            ):
                gold_group.append(g)
                gold_rows.append(i)
    gold_groups = np.array(
        [g for s in sorted(known) for g in by_subject.get(s, [])], dtype=np.int64
    )

    n_groups = len(groups)
    skills = marks.learn_skills(
        boxes,
        mark_group,
        mark_vol,
        view_group,
        view_vol,
        n_volunteers=len(volunteers),
        gold_boxes=gold_boxes[np.array(gold_rows, dtype=np.int64)],
        gold_subject=np.array(gold_group, dtype=np.int64),
        gold_subjects=gold_groups,
        iou_threshold=iou_threshold,
    )
    result = marks.aggregate_many(
        boxes,
        mark_group,
        mark_vol,
        view_group,
        view_vol,
        skills,
        n_subjects=n_groups,
        iou_threshold=iou_threshold,
        keep_threshold=keep_threshold,
    )
    _write_clusters(out_path, groups, result, has_tool, has_frame)
    return {
        "n_subjects": len(subjects),
        "n_views": len(views),
        "n_marks": int(boxes.shape[0]),
        "marks_are_clicks": is_points,
        "n_volunteers": len(volunteers),
        "n_groups": n_groups,
        "n_clusters": int(result.p_real.shape[0]),
        "n_kept": int(result.kept.sum()),
        "n_gold_subjects": len(known),
        "mean_risk": float(result.risk.mean()) if n_groups else 0.0,
        "population": {
            "p_fn": skills.pop_p_fn,
            "f": skills.pop_f,
            "p_fp": skills.pop_p_fp,
            "sigma": skills.pop_sigma,
            "obj_prior": skills.obj_prior,
            "object_rate": skills.object_rate,
        },
        "out": str(out_path),
    }


def _write_clusters(
    out_path: Path | str,
    groups: list[tuple[str, str, str]],
    result: marks.ManyClusters,
    has_tool: bool,
    has_frame: bool,
) -> None:
    columns = ["subject", *BOX_COLUMNS, "p_real", "p_off", "n_marks", "n_views"]
    columns += ["tool"] if has_tool else []
    columns += ["frame"] if has_frame else []
    with open(out_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for c in range(result.p_real.shape[0]):
            subject, tool, frame = groups[int(result.subject[c])]
            row = [subject, *(format(float(v), ".10g") for v in result.box[c])]
            row += [format(float(result.p_real[c]), ".6g"), format(float(result.p_off[c]), ".6g")]
            row += [str(int(result.n_marks[c])), str(int(result.n_views[c]))]
            row += [tool] if has_tool else []
            row += [frame] if has_frame else []
            writer.writerow(row)
