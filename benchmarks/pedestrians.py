"""Pedestrian boxes (Lean Crowdsourcing data): gzx vs panoptes_aggregation's DBSCAN and a vote.

Usage: .venv/bin/python benchmarks/pedestrians.py --data ../shared/data
Writes benchmarks/results/pedestrians.json. Metrics: precision, recall, F1 at IoU >= 0.5 against the
expert boxes of the images that have expert truth.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app import marks

IOU = 0.5


def load(data: Path) -> dict[str, Any]:
    """Views, worker boxes and expert boxes as integer-indexed arrays."""
    folder = data / "pedestrians"
    images: dict[str, int] = {}
    workers: dict[str, int] = {}
    v_img, v_wrk, expert_images = [], [], set()
    with (folder / "views.csv").open() as fh:
        for row in csv.DictReader(fh):
            img = images.setdefault(row["image_id"], len(images))
            if row["source"] == "expert":
                expert_images.add(img)
                continue
            v_img.append(img)
            v_wrk.append(workers.setdefault(row["worker_id"], len(workers)))
    m_img, m_wrk, m_box, g_img, g_box = [], [], [], [], []
    with (folder / "boxes.csv").open() as fh:
        for row in csv.DictReader(fh):
            img = images.setdefault(row["image_id"], len(images))
            box = [float(row[k]) for k in ("x1", "y1", "x2", "y2")]
            if row["source"] == "expert":
                g_img.append(img)
                g_box.append(box)
            else:
                m_img.append(img)
                m_wrk.append(workers.setdefault(row["worker_id"], len(workers)))
                m_box.append(box)
    return {
        "n_images": len(images),
        "n_workers": len(workers),
        "view_subject": np.array(v_img),
        "view_volunteer": np.array(v_wrk),
        "subject": np.array(m_img),
        "volunteer": np.array(m_wrk),
        "boxes": np.array(m_box, dtype=float).reshape(-1, 4),
        "gold_subject": np.array(g_img),
        "gold_boxes": np.array(g_box, dtype=float).reshape(-1, 4),
        "expert_images": np.array(sorted(expert_images)),
    }


def score(
    pred_subject: np.ndarray,
    pred_box: np.ndarray,
    gold_subject: np.ndarray,
    gold_box: np.ndarray,
    images: np.ndarray,
) -> dict[str, float]:
    """Precision, recall, F1 at IoU >= 0.5 (Hungarian per image) over `images`."""
    tp = n_pred = n_gold = 0
    for img in images:
        p = pred_box[pred_subject == img]
        g = gold_box[gold_subject == img]
        n_pred += len(p)
        n_gold += len(g)
        if len(p) and len(g):
            iou = marks.iou_matrix(p, g)
            r, c = linear_sum_assignment(-iou)
            tp += int((iou[r, c] >= IOU).sum())
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tp": tp,
        "n_pred": n_pred,
        "n_gold": n_gold,
    }


def image_index(subject: np.ndarray, n_images: int) -> list[np.ndarray]:
    """Row indices per image."""
    order = np.argsort(subject, kind="stable")
    bounds = np.searchsorted(subject[order], np.arange(n_images + 1))
    return [order[bounds[i] : bounds[i + 1]] for i in range(n_images)]


def vote_baseline(
    d: dict[str, Any], images: np.ndarray, k: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """'Kept if >= k of 7 marked it': greedy IoU >= 0.5 clustering, one mark per worker each."""
    rows = image_index(d["subject"], d["n_images"])
    out_s, out_b = [], []
    for img in images:
        idx = rows[img]
        if idx.size == 0:
            continue
        box, vol = d["boxes"][idx], d["volunteer"][idx]
        iou = marks.iou_matrix(box, box)
        free = np.ones(idx.size, dtype=bool)
        while free.any():
            support = ((iou >= IOU) & free[None, :] & free[:, None]).sum(axis=1)
            support[~free] = -1
            centre = int(np.argmax(support))
            member = [centre]
            for u in np.unique(vol[free]):
                if u == vol[centre]:
                    continue
                cand = np.flatnonzero(free & (vol == u) & (iou[centre] >= IOU))
                if cand.size:
                    member.append(int(cand[np.argmax(iou[centre, cand])]))
            free[member] = False
            if len(member) >= k:
                out_s.append(img)
                out_b.append(box[member].mean(axis=0))
    return np.array(out_s), np.array(out_b).reshape(-1, 4)


def dbscan_extracts(
    d: dict[str, Any], img: int, rows_m: list[np.ndarray], rows_v: list[np.ndarray]
) -> tuple[list[dict[str, Any]], list[int]]:
    """panoptes_aggregation shape extracts (one per view; top-left x, y, width, height)."""
    extracts, users = [], []
    idx = rows_m[img]
    for u in np.unique(d["view_volunteer"][rows_v[img]]):
        mine = idx[d["volunteer"][idx] == u]
        b = d["boxes"][mine]
        if mine.size:
            extracts.append(
                {
                    "frame0": {
                        "T0_tool0_x": b[:, 0].tolist(),
                        "T0_tool0_y": b[:, 1].tolist(),
                        "T0_tool0_width": (b[:, 2] - b[:, 0]).tolist(),
                        "T0_tool0_height": (b[:, 3] - b[:, 1]).tolist(),
                    }
                }
            )
        else:
            extracts.append({})
        users.append(int(u))
    return extracts, users


def dbscan_baseline(
    d: dict[str, Any], images: np.ndarray, **kwargs: Any
) -> tuple[np.ndarray, np.ndarray]:
    """panoptes_aggregation's shape_reducer_dbscan (rectangle) on every image."""
    from panoptes_aggregation.reducers.shape_reducer_dbscan import shape_reducer_dbscan

    rows_m = image_index(d["subject"], d["n_images"])
    rows_v = image_index(d["view_subject"], d["n_images"])
    out_s, out_b = [], []
    for img in images:
        extracts, users = dbscan_extracts(d, img, rows_m, rows_v)
        red = shape_reducer_dbscan(extracts, shape="rectangle", user_id=users, **kwargs)
        frame = red.get("frame0", {})
        for x, y, w, h in zip(
            frame.get("T0_tool0_clusters_x", []),
            frame.get("T0_tool0_clusters_y", []),
            frame.get("T0_tool0_clusters_width", []),
            frame.get("T0_tool0_clusters_height", []),
            strict=True,
        ):
            out_s.append(img)
            out_b.append([x, y, x + w, y + h])
    return np.array(out_s), np.array(out_b).reshape(-1, 4)


def gzx_clusters(
    d: dict[str, Any], skills: marks.MarkSkills, keep: str = "kept"
) -> marks.ManyClusters:
    """gzx's clusters of every image with the given skills."""
    return marks.aggregate_many(
        d["boxes"],
        d["subject"],
        d["volunteer"],
        d["view_subject"],
        d["view_volunteer"],
        skills,
        n_subjects=d["n_images"],
    )


def learn(d: dict[str, Any], gold_images: np.ndarray | None = None) -> marks.MarkSkills:
    """Skills by EM, from the expert boxes of `gold_images` first when given."""
    kwargs: dict[str, Any] = {}
    if gold_images is not None:
        rows = np.isin(d["gold_subject"], gold_images)
        kwargs = {
            "gold_boxes": d["gold_boxes"][rows],
            "gold_subject": d["gold_subject"][rows],
            "gold_subjects": gold_images,
        }
    return marks.learn_skills(
        d["boxes"],
        d["subject"],
        d["volunteer"],
        d["view_subject"],
        d["view_volunteer"],
        n_volunteers=d["n_workers"],
        **kwargs,
    )


def reliability(
    d: dict[str, Any], result: marks.ManyClusters, images: np.ndarray
) -> list[dict[str, Any]]:
    """Among clusters with P(real) in a bin, the fraction matched to an expert box (IoU >= 0.5)."""
    matched = np.zeros(result.p_real.shape[0], dtype=bool)
    for img in images:
        idx = np.flatnonzero(result.subject == img)
        g = d["gold_boxes"][d["gold_subject"] == img]
        if idx.size and len(g):
            iou = marks.iou_matrix(result.box[idx], g)
            gain = (iou >= IOU) * (1.0 + result.p_real[idx])[:, None]
            r, c = linear_sum_assignment(-gain)
            matched[idx[r[gain[r, c] > 0]]] = True
    on = np.isin(result.subject, images)
    edges = [0.0, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0 + 1e-9]
    table = []
    for lo, hi in itertools.pairwise(edges):
        sel = on & (result.p_real >= lo) & (result.p_real < hi)
        if sel.any():
            table.append(
                {
                    "bin": f"[{lo:g}, {min(hi, 1.0):g})",
                    "n": int(sel.sum()),
                    "mean_p_real": float(result.p_real[sel].mean()),
                    "fraction_real": float(matched[sel].mean()),
                }
            )
    return table


def effort_replay(
    d: dict[str, Any],
    skills: marks.MarkSkills,
    images: np.ndarray,
    thresholds: list[float],
    seed: int = 0,
    min_views: int = 2,
) -> list[dict[str, Any]]:
    """Views in random order per image; retire at the first k >= min_views with risk <= tau."""
    rng = np.random.default_rng(seed)
    n_v = d["view_subject"].shape[0]
    keys = rng.random(n_v)
    order = np.lexsort((keys, d["view_subject"]))
    rank = np.empty(n_v, dtype=np.int64)
    starts = np.searchsorted(d["view_subject"][order], d["view_subject"][order])
    rank[order] = np.arange(n_v) - starts
    view_rank = {
        (int(s), int(u)): int(r)
        for s, u, r in zip(d["view_subject"], d["view_volunteer"], rank, strict=True)
    }
    mark_rank = np.array(
        [view_rank[(int(s), int(u))] for s, u in zip(d["subject"], d["volunteer"], strict=True)]
    )
    per_k = []
    for k in range(1, 8):
        m, v = mark_rank < k, rank < k
        per_k.append(
            marks.aggregate_many(
                d["boxes"][m],
                d["subject"][m],
                d["volunteer"][m],
                d["view_subject"][v],
                d["view_volunteer"][v],
                skills,
                n_subjects=d["n_images"],
            )
        )
    risks = np.stack([r.risk for r in per_k])  # (7, S)
    rows = []
    for tau in thresholds:
        ok = (risks <= tau) & (np.arange(1, 8)[:, None] >= min_views)
        ok[-1] = True
        k_used = np.argmax(ok, axis=0) + 1  # (S,)
        pred_s, pred_b = [], []
        for k in range(1, 8):
            r = per_k[k - 1]
            sel = r.kept & (k_used[r.subject] == k)
            pred_s.append(r.subject[sel])
            pred_b.append(r.box[sel])
        metrics = score(
            np.concatenate(pred_s),
            np.concatenate(pred_b),
            d["gold_subject"],
            d["gold_boxes"],
            images,
        )
        rows.append({"tau": tau, "mean_views": float(k_used[images].mean()), **metrics})
    return rows


def _dbscan_job(args: tuple[dict[str, Any], np.ndarray, dict[str, Any]]) -> dict[str, Any]:
    d, images, kwargs = args
    t0 = time.perf_counter()
    s, b = dbscan_baseline(d, images, **kwargs)
    return {
        **kwargs,
        "seconds": time.perf_counter() - t0,
        **score(s, b, d["gold_subject"], d["gold_boxes"], images),
    }


def main() -> None:
    import warnings
    from concurrent.futures import ProcessPoolExecutor

    warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--iou-dbscan",
        action="store_true",
        help="also sweep the IoU-metric DBSCAN (about 7 minutes per setting)",
    )
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    d = load(args.data)
    experts = d["expert_images"]
    rng = np.random.default_rng(2017)
    shuffled = rng.permutation(experts)
    train, test = np.sort(shuffled[: experts.size // 2]), np.sort(shuffled[experts.size // 2 :])
    out: dict[str, Any] = {
        "n_images": d["n_images"],
        "n_expert_images": int(experts.size),
        "n_worker_boxes": int(d["boxes"].shape[0]),
        "n_workers": d["n_workers"],
        "iou": IOU,
        "train_images": int(train.size),
        "test_images": int(test.size),
    }
    methods: dict[str, Any] = {}

    def gzx_entry(name: str, skills: marks.MarkSkills, seconds: float) -> marks.ManyClusters:
        r = gzx_clusters(d, skills)
        k = r.kept
        methods[name] = {
            "all_expert_images": score(
                r.subject[k], r.box[k], d["gold_subject"], d["gold_boxes"], experts
            ),
            "test_half": score(r.subject[k], r.box[k], d["gold_subject"], d["gold_boxes"], test),
            "learn_seconds": seconds,
            "population": {
                "p_fn": skills.pop_p_fn,
                "f": skills.pop_f,
                "p_fp": skills.pop_p_fp,
                "sigma": skills.pop_sigma,
                "obj_prior": skills.obj_prior,
                "object_rate": skills.object_rate,
            },
        }
        return r

    gzx_entry("gzx_prior_only", marks.MarkSkills.population(d["n_workers"]), 0.0)
    t0 = time.perf_counter()
    em_skills = learn(d)
    em_result = gzx_entry("gzx_no_gold_em", em_skills, time.perf_counter() - t0)
    t0 = time.perf_counter()
    gold_skills = learn(d, train)
    gold_result = gzx_entry("gzx_gold_half_em", gold_skills, time.perf_counter() - t0)
    for k in (2, 3, 4):
        s, b = vote_baseline(d, experts, k)
        methods[f"vote_{k}_of_7"] = {
            "all_expert_images": score(s, b, d["gold_subject"], d["gold_boxes"], experts),
            "test_half": score(s, b, d["gold_subject"], d["gold_boxes"], test),
        }
    sweep = [
        {"eps": float(e), "min_samples": m}
        for e in (10, 15, 20, 25, 30, 35, 40, 50, 60)
        for m in (2, 3, 4)
    ]
    if args.iou_dbscan:
        sweep += [{"eps": e, "min_samples": 3, "metric_type": "IoU"} for e in (0.3, 0.5, 0.7)]
    with ProcessPoolExecutor(args.jobs) as pool:
        db = list(pool.map(_dbscan_job, [(d, experts, kw) for kw in sweep]))
    best = max(db, key=lambda r: r["f1"])
    s, b = dbscan_baseline(
        d, test, **{k: best[k] for k in ("eps", "min_samples", "metric_type") if k in best}
    )
    methods["panoptes_dbscan_best"] = {
        "all_expert_images": best,
        "test_half": score(s, b, d["gold_subject"], d["gold_boxes"], test),
    }
    out["dbscan_sweep"] = db
    out["methods"] = methods
    out["reliability_no_gold"] = reliability(d, em_result, experts)
    out["reliability_gold_half_on_test"] = reliability(d, gold_result, test)
    taus = [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]
    out["effort_no_gold"] = [effort_replay(d, em_skills, experts, taus, seed) for seed in range(3)]
    baselines = [
        m["all_expert_images"]["f1"] for n, m in methods.items() if not n.startswith("gzx")
    ]
    out["target"] = {
        "gzx_no_gold_f1": methods["gzx_no_gold_em"]["all_expert_images"]["f1"],
        "best_baseline_f1": max(baselines),
        "met": methods["gzx_no_gold_em"]["all_expert_images"]["f1"] >= max(baselines) + 0.03,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pedestrians.json").write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("target",)}, indent=2))
    for name, m in methods.items():
        a, t = m["all_expert_images"], m["test_half"]
        print(
            f"{name:24s} all: P {a['precision']:.3f} R {a['recall']:.3f} F1 {a['f1']:.3f}   "
            f"test half: P {t['precision']:.3f} R {t['recall']:.3f} F1 {t['f1']:.3f}"
        )
    for row in out["reliability_no_gold"]:
        print("reliability", row)
    for rows in out["effort_no_gold"]:
        for row in rows:
            print(f"effort tau {row['tau']:<5} views {row['mean_views']:.2f} F1 {row['f1']:.3f}")


if __name__ == "__main__":
    main()
