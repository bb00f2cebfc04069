"""Speed of the marks math: per subject vs panoptes_aggregation's DBSCAN reducer, and a full refit.

Usage: .venv/bin/python benchmarks/speed_marks.py --data ../shared/data [--subjects 1e5]
Writes benchmarks/results/speed_marks.json.

1. Per subject: the same subjects (pedestrian images with 7 viewers, and synthetic galaxies with 7,
   10, 15 and 20 viewers) through `app.marks.aggregate_subject` (learned skills) and through
   `shape_reducer_dbscan` (rectangles; Euclidean eps 30 / min_samples 3, its best pedestrian
   setting, and the IoU metric on a few subjects). Each call is timed `--repeat` times; the median
   per subject, then the median over subjects, is reported, with the ratio.
2. Refit: `learn_skills` (2 association rounds, 30 EM sweeps each) plus the final `aggregate_many`
   over a generated workflow of `--subjects` subjects and about ten marks each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pedestrians import dbscan_extracts, image_index, load

from app import marks


def _median_time(call: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _synthetic_subjects(n: int, viewers: int, seed: int) -> dict[str, Any]:
    """Galaxies of 424x424 with 1-6 clumps, `viewers` volunteers each (recall 0.7, 0.3 spurious)."""
    rng = np.random.default_rng(seed)
    m_sub, m_vol, m_box, v_sub, v_vol = [], [], [], [], []
    for s in range(n):
        centre = 212 + rng.normal(0, 50, (int(rng.integers(1, 7)), 2))
        for u in range(viewers):
            v_sub.append(s)
            v_vol.append(u)
            pts = centre[rng.random(centre.shape[0]) < 0.7] + rng.normal(0, 2, (1, 2))
            pts = np.concatenate([pts, 212 + rng.normal(0, 60, (rng.poisson(0.3), 2))])
            m_box.append(marks.points_to_boxes(pts.reshape(-1, 2), (20.0, 20.0)))
            m_sub += [s] * pts.shape[0]
            m_vol += [u] * pts.shape[0]
    return {
        "n_images": n,
        "n_workers": viewers,
        "subject": np.array(m_sub),
        "volunteer": np.array(m_vol),
        "boxes": np.concatenate(m_box),
        "view_subject": np.array(v_sub),
        "view_volunteer": np.array(v_vol),
    }


def per_subject(
    d: dict[str, Any], images: np.ndarray, repeat: int, iou_subjects: int
) -> dict[str, Any]:
    """Median seconds per subject for gzx and the DBSCAN reducer on the same subjects."""
    from panoptes_aggregation.reducers.shape_reducer_dbscan import shape_reducer_dbscan

    args = (d["boxes"], d["subject"], d["volunteer"], d["view_subject"], d["view_volunteer"])
    skills = marks.learn_skills(*args, n_volunteers=d["n_workers"])
    rows_m = image_index(d["subject"], d["n_images"])
    rows_v = image_index(d["view_subject"], d["n_images"])
    gzx, dbscan, gzx_iou, dbscan_iou = [], [], [], []
    for i, img in enumerate(images):
        idx, views = rows_m[img], d["view_volunteer"][rows_v[img]]
        box, vol = d["boxes"][idx], d["volunteer"][idx]
        extracts, users = dbscan_extracts(d, img, rows_m, rows_v)
        t_gzx = _median_time(partial(marks.aggregate_subject, box, vol, views, skills), repeat)
        gzx.append(t_gzx)
        reducer = partial(shape_reducer_dbscan, extracts, shape="rectangle", user_id=users)
        dbscan.append(_median_time(partial(reducer, eps=30.0, min_samples=3), repeat))
        if i < iou_subjects:
            gzx_iou.append(t_gzx)
            iou_call = partial(reducer, eps=0.5, min_samples=3, metric_type="IoU")
            dbscan_iou.append(_median_time(iou_call, 1))
    n_marks = [rows_m[img].size for img in images]
    out = {
        "subjects": len(images),
        "median_marks": float(np.median(n_marks)),
        "gzx_median_s": float(np.median(gzx)),
        "dbscan_euclidean_median_s": float(np.median(dbscan)),
        "ratio_euclidean": float(np.median(dbscan) / np.median(gzx)),
    }
    if gzx_iou:
        out["dbscan_iou_median_s"] = float(np.median(dbscan_iou))
        out["ratio_iou"] = float(np.median(dbscan_iou) / np.median(gzx_iou))
        out["iou_subjects"] = len(gzx_iou)
    return out


def workflow(n_subjects: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A generated workflow: ~1.3 objects and 8 viewers (of 20,000) per subject, ~10 marks each."""
    rng = np.random.default_rng(seed)
    n_obj = rng.poisson(1.3, n_subjects)
    obj_subject = np.repeat(np.arange(n_subjects), n_obj)
    centre = rng.uniform(40, 384, (obj_subject.size, 2))
    size = rng.uniform(14, 30, obj_subject.size)
    viewers = 8
    view_subject = np.repeat(np.arange(n_subjects), viewers)
    view_volunteer = rng.integers(0, 20_000, view_subject.size)
    recall = rng.uniform(0.6, 0.95, 20_000)
    # every (object, viewer of its subject) pair; kept with the viewer's recall
    first_view = obj_subject * viewers
    pair_obj = np.repeat(np.arange(obj_subject.size), viewers)
    pair_view = first_view[pair_obj] + np.tile(np.arange(viewers), obj_subject.size)
    seen = rng.random(pair_obj.size) < recall[view_volunteer[pair_view]]
    pair_obj, pair_view = pair_obj[seen], pair_view[seen]
    half = size[pair_obj, None] / 2
    c = centre[pair_obj] + rng.normal(0, 2.0, (pair_obj.size, 2))
    real = np.concatenate([c - half, c + half], axis=1)
    n_false = rng.poisson(0.25, view_subject.size)
    false_view = np.repeat(np.arange(view_subject.size), n_false)
    fc = rng.uniform(20, 404, (false_view.size, 2))
    spurious = np.concatenate([fc - 10, fc + 10], axis=1)
    mark_view = np.concatenate([pair_view, false_view])
    return {
        "boxes": np.concatenate([real, spurious]),
        "subject": view_subject[mark_view],
        "volunteer": view_volunteer[mark_view],
        "view_subject": view_subject,
        "view_volunteer": view_volunteer,
    }


def refit(n_subjects: int) -> dict[str, Any]:
    """Seconds for learn_skills + aggregate_many over a generated workflow."""
    w = workflow(n_subjects)
    args = (w["boxes"], w["subject"], w["volunteer"], w["view_subject"], w["view_volunteer"])
    t0 = time.perf_counter()
    skills = marks.learn_skills(*args, n_volunteers=20_000)
    t1 = time.perf_counter()
    result = marks.aggregate_many(*args, skills, n_subjects=n_subjects)
    t2 = time.perf_counter()
    return {
        "subjects": n_subjects,
        "marks": int(w["boxes"].shape[0]),
        "views": int(w["view_subject"].size),
        "clusters": int(result.p_real.size),
        "learn_skills_s": t1 - t0,
        "aggregate_many_s": t2 - t1,
        "refit_total_s": t2 - t0,
    }


def main() -> None:
    warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--subjects", type=float, default=1e5)
    parser.add_argument("--per-subject", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--iou-subjects", type=int, default=10)
    args = parser.parse_args()
    result: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    ped = load(args.data)
    rng = np.random.default_rng(0)
    images = rng.choice(ped["expert_images"], args.per_subject, replace=False)
    result["pedestrians_7_viewers"] = per_subject(ped, images, args.repeat, args.iou_subjects)
    print("pedestrians", result["pedestrians_7_viewers"])
    for viewers in (7, 10, 15, 20):
        d = _synthetic_subjects(args.per_subject, viewers, seed=viewers)
        key = f"synthetic_{viewers}_viewers"
        result[key] = per_subject(d, np.arange(args.per_subject), args.repeat, args.iou_subjects)
        print(key, result[key])
    result["refit"] = refit(round(args.subjects))
    print("refit", result["refit"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed_marks.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
