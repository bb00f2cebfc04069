"""Marks in the service: stored marks and views -> `app.marks` -> clusters and subject risk.

Marks are grouped per subject, tool and frame (a subject with no marks gets one group, so that
its viewers' evidence of absence still counts); each group is aggregated on its own. Points become
boxes of their tool's configured size. Skills come from the workflow's mark snapshot, which a
refit learns from gold boxes and by EM; volunteers it does not know count as the population.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from app import marks, store
from app.models import Workflow
from app.workflows import WorkflowConfig

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
Group = tuple[int, int, int]  # (subject, tool, frame); tool = frame = -1: a subject with no marks


@dataclass(frozen=True)
class MarkInput:
    """Marks and views laid out as `app.marks` wants them."""

    groups: list[Group]
    mark_id: IntArray
    box: FloatArray
    mark_group: IntArray
    mark_volunteer: IntArray  # volunteer row ids
    view_group: IntArray
    view_volunteer: IntArray


def mark_input(
    config: WorkflowConfig,
    rows: Sequence[store.MarkRow],
    views: Iterable[tuple[int, int]],
    kept_classifications: set[int] | None,
) -> MarkInput:
    """Group marks of kept classifications per (subject, tool, frame); views are (subject,
    volunteer) pairs, each a viewer of every group of its subject."""
    assert config.drawing is not None
    tools = {tool.index: tool for tool in config.drawing.tools}
    used = [
        r
        for r in rows
        if r.tool in tools
        and (kept_classifications is None or r.classification_id in kept_classifications)
    ]
    box = np.zeros((len(used), 4))
    for i, row in enumerate(used):
        tool = tools[row.tool]
        if tool.type == "point" or row.kind == "point":
            w, h = tool.box_size or (1.0, 1.0)
            x, y = row.box[0], row.box[1]
            box[i] = (x - w / 2, y - h / 2, x + w / 2, y + h / 2)
        else:
            box[i] = row.box
    view_pairs = sorted(set(views))
    subjects = sorted({s for s, _ in view_pairs} | {r.subject_id for r in used})
    marked = {(r.subject_id, r.tool, r.frame) for r in used}
    with_marks = {g[0] for g in marked}
    groups = sorted(marked | {(s, -1, -1) for s in subjects if s not in with_marks})
    index = {g: i for i, g in enumerate(groups)}
    by_subject: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_subject.setdefault(g[0], []).append(i)
    view_group: list[int] = []
    view_volunteer: list[int] = []
    for s, u in view_pairs:
        for group in by_subject.get(s, []):
            view_group.append(group)
            view_volunteer.append(u)
    return MarkInput(
        groups,
        np.array([r.id for r in used], dtype=np.int64),
        box,
        np.array([index[(r.subject_id, r.tool, r.frame)] for r in used], dtype=np.int64),
        np.array([r.volunteer_id for r in used], dtype=np.int64),
        np.array(view_group, dtype=np.int64),
        np.array(view_volunteer, dtype=np.int64),
    )


def skills_for(
    session: Any, workflow: Workflow, volunteer_ids: IntArray
) -> tuple[marks.MarkSkills, IntArray]:
    """Mark skills of the known volunteers among `volunteer_ids` and, for every id, its index in
    them (an index >= U: not known, the population values)."""
    unique, inverse = np.unique(volunteer_ids, return_inverse=True)
    if workflow.mark_snapshot_id is None:
        return marks.MarkSkills.population(0), inverse + 0
    ids, arrays, population = store.load_mark_snapshot(session, workflow.mark_snapshot_id)
    found: npt.NDArray[np.bool_] = np.zeros(unique.size, dtype=bool)
    position: IntArray = np.zeros(unique.size, dtype=np.int64)
    if ids.size:
        position = np.clip(np.searchsorted(ids, unique), 0, ids.size - 1)
        found = ids[position] == unique
    known = np.flatnonzero(found)
    local = np.empty(unique.size, dtype=np.int64)
    local[known] = np.arange(known.size)
    local[~found] = known.size + np.arange((~found).sum())
    picked = arrays[:, position[known]]
    named = dict(zip(store.MARK_ARRAYS, picked, strict=True))
    skills = marks.MarkSkills(
        p_fn=named["p_fn"],
        f=named["f"],
        p_fp=named["p_fp"],
        sigma=named["sigma"],
        pop_p_fn=population["p_fn"],
        pop_f=population["f"],
        pop_p_fp=population["p_fp"],
        pop_sigma=population["sigma"],
        obj_prior=population["obj_prior"],
        object_rate=population["object_rate"],
        p_fn_n=named["p_fn_n"],
        f_n=named["f_n"],
        p_fp_n=named["p_fp_n"],
        sigma_n=named["sigma_n"],
    )
    return skills, local[inverse]


@dataclass(frozen=True)
class DrawingResult:
    """Per subject of the batch: settled, no object kept, and the risk terms."""

    settled: npt.NDArray[np.bool_]
    empty: npt.NDArray[np.bool_]
    risk: list[dict[str, float]]


def update_clusters(
    session: Any,
    workflow: Workflow,
    config: WorkflowConfig,
    subject_ids: Sequence[int],
    views: Sequence[tuple[int, int]],
    kept_classifications: set[int],
) -> DrawingResult:
    """Recompute and store the clusters of these subjects; say which are settled."""
    assert config.drawing is not None
    rows = store.subject_marks(session, workflow.id, subject_ids, config.drawing.task)
    data = mark_input(config, rows, views, kept_classifications)
    everyone = np.concatenate([data.mark_volunteer, data.view_volunteer])
    skills, local = skills_for(session, workflow, everyone)
    n_marks = data.mark_volunteer.size
    result = marks.aggregate_many(
        data.box,
        data.mark_group,
        local[:n_marks],
        data.view_group,
        local[n_marks:],
        skills,
        n_subjects=len(data.groups),
    )
    lo, hi = config.retirement.cluster_bounds
    position = {s: i for i, s in enumerate(subject_ids)}
    S = len(subject_ids)
    risk = np.zeros((S, 4))
    unsure = np.zeros(S, dtype=bool)
    kept = np.zeros(S, dtype=np.int64)
    for g, (subject, _, _) in enumerate(data.groups):
        i = position[subject]
        risk[i] += (
            result.risk[g],
            result.e_false_kept[g],
            result.e_missed[g],
            result.e_badly_placed[g],
        )
    members = result.labels
    cluster_rows = []
    for c in range(result.p_real.size):
        subject, tool, frame = data.groups[int(result.subject[c])]
        i = position[subject]
        p = float(result.p_real[c])
        unsure[i] |= lo < p < hi
        kept[i] += int(result.kept[c])
        cluster_rows.append(
            {
                "workflow_id": workflow.id,
                "subject_id": subject,
                "tool": tool,
                "frame": frame,
                "x1": float(result.box[c, 0]),
                "y1": float(result.box[c, 1]),
                "x2": float(result.box[c, 2]),
                "y2": float(result.box[c, 3]),
                "p_real": p,
                "p_off": float(result.p_off[c]),
                "n_marks": int(result.n_marks[c]),
                "n_views": int(result.n_views[c]),
                "kept": bool(result.kept[c]),
                "members": data.mark_id[members == c].tolist(),
            }
        )
    store.replace_clusters(session, workflow.id, subject_ids, cluster_rows)
    settled = (risk[:, 0] <= config.retirement.mark_risk_bound) & ~unsure
    names = ("risk", "e_false_kept", "e_missed", "e_badly_placed")
    return DrawingResult(
        settled, kept == 0, [dict(zip(names, map(float, r), strict=True)) for r in risk]
    )
