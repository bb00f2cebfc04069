"""Synthetic clumps with known truth: gzx vs panoptes_aggregation's DBSCAN and a k-of-n vote.

Usage: .venv/bin/python benchmarks/synthetic_clumps.py [--seed 7] [--images 1500]
Writes benchmarks/results/synthetic_clumps.json.

Generator (seeded): 424x424 images, each a galaxy of radius 90 px at the centre holding 0-6 clumps
(truth boxes 14-30 px), each clump with its own visibility (0.4-1, multiplying every recall: faint
clumps are missed together). 80 volunteers of three kinds (careful: recall 0.75-0.95, 0.15 spurious
marks per image; careless: recall 0.3-0.6, 0.4 spurious; spammers: recall 0.15, 1.5 spurious),
spurious marks inside the galaxy, each volunteer with their own localisation noise. Seven random
volunteers view each image. Two modes: boxes (noisy corners) and clicks (noisy centres, turned into
boxes of the 20x20 tool size; the truth is the tool-size box at the clump centre).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pedestrians import dbscan_baseline, score, vote_baseline

from app import marks

SIZE = 424
TOOL = (20.0, 20.0)


def _in_galaxy(rng: np.random.Generator, n: int) -> np.ndarray:
    """n points uniform in the galaxy disk (radius 90 px at the image centre)."""
    radius = 90.0 * np.sqrt(rng.random(n))
    angle = rng.uniform(0, 2 * np.pi, n)
    return SIZE / 2 + np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


def generate(seed: int, n_images: int, clicks: bool, n_volunteers: int = 80) -> dict[str, Any]:
    """One synthetic data set in the dict layout of benchmarks/pedestrians.py."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=n_volunteers, p=[0.5, 0.35, 0.15])
    recall = np.select(
        [kind == 0, kind == 1],
        [rng.uniform(0.75, 0.95, n_volunteers), rng.uniform(0.3, 0.6, n_volunteers)],
        0.15,
    )
    spurious = np.select([kind == 0, kind == 1], [0.15, 0.4], 1.5)
    noise = rng.uniform(0.03, 0.12, n_volunteers)  # fraction of the clump size
    g_sub, g_box, m_sub, m_vol, m_box, v_sub, v_vol = [], [], [], [], [], [], []
    for s in range(n_images):
        n_obj = int(rng.integers(0, 7))
        size = rng.uniform(14, 30, n_obj)
        centre = _in_galaxy(rng, n_obj)
        visible = rng.uniform(0.4, 1.0, n_obj)
        truth = np.concatenate([centre - size[:, None] / 2, centre + size[:, None] / 2], axis=1)
        if clicks:
            truth = marks.points_to_boxes(centre, TOOL)
        g_sub += [s] * n_obj
        g_box.append(truth)
        viewers = rng.choice(n_volunteers, 7, replace=False)
        for u in viewers:
            v_sub.append(s)
            v_vol.append(int(u))
            seen = rng.random(n_obj) < recall[u] * visible
            if clicks:
                pts = centre[seen] + rng.normal(
                    0, noise[u] * size[seen, None] * 1.5, (int(seen.sum()), 2)
                )
                n_false = rng.poisson(spurious[u])
                pts = np.concatenate([pts, _in_galaxy(rng, n_false)])
                boxes = marks.points_to_boxes(pts, TOOL)
            else:
                jitter = rng.normal(0, 1, (int(seen.sum()), 4)) * (noise[u] * size[seen, None])
                n_false = rng.poisson(spurious[u])
                c = _in_galaxy(rng, n_false)
                w = rng.uniform(14, 30, (n_false, 1))
                boxes = np.concatenate(
                    [truth[seen] + jitter, np.concatenate([c - w / 2, c + w / 2], 1)]
                )
            m_sub += [s] * boxes.shape[0]
            m_vol += [int(u)] * boxes.shape[0]
            m_box.append(boxes.reshape(-1, 4))
    return {
        "n_images": n_images,
        "n_workers": n_volunteers,
        "view_subject": np.array(v_sub),
        "view_volunteer": np.array(v_vol),
        "subject": np.array(m_sub, dtype=np.int64),
        "volunteer": np.array(m_vol, dtype=np.int64),
        "boxes": np.concatenate(m_box),
        "gold_subject": np.array(g_sub, dtype=np.int64),
        "gold_boxes": np.concatenate(g_box).reshape(-1, 4),
        "expert_images": np.arange(n_images),
        "true_p_fn": 1.0 - recall,
        "kind": kind,
    }


def run(d: dict[str, Any], gold_fraction: float = 0.1) -> dict[str, Any]:
    """All methods on one data set; gold-trained gzx is scored on the non-gold images only."""
    images = d["expert_images"]
    args = (d["boxes"], d["subject"], d["volunteer"], d["view_subject"], d["view_volunteer"])
    n_gold = int(images.size * gold_fraction)
    gold, rest = images[:n_gold], images[n_gold:]
    out: dict[str, Any] = {}

    def gzx(name: str, skills: marks.MarkSkills, seconds: float) -> None:
        r = marks.aggregate_many(*args, skills, n_subjects=d["n_images"])
        k = r.kept
        out[name] = {
            "all": score(r.subject[k], r.box[k], d["gold_subject"], d["gold_boxes"], images),
            "non_gold": score(r.subject[k], r.box[k], d["gold_subject"], d["gold_boxes"], rest),
            "learn_seconds": seconds,
            "p_fn_vs_truth_corr": float(np.corrcoef(skills.p_fn, d["true_p_fn"])[0, 1])
            if skills.p_fn.std() > 0
            else None,
        }

    gzx("gzx_prior_only", marks.MarkSkills.population(d["n_workers"]), 0.0)
    t0 = time.perf_counter()
    em = marks.learn_skills(*args, n_volunteers=d["n_workers"])
    gzx("gzx_no_gold_em", em, time.perf_counter() - t0)
    rows = np.isin(d["gold_subject"], gold)
    t0 = time.perf_counter()
    with_gold = marks.learn_skills(
        *args,
        n_volunteers=d["n_workers"],
        gold_boxes=d["gold_boxes"][rows],
        gold_subject=d["gold_subject"][rows],
        gold_subjects=gold,
    )
    gzx(f"gzx_gold_{gold_fraction:g}_em", with_gold, time.perf_counter() - t0)
    best_vote: dict[str, Any] = {"f1": -1.0}
    for k in (2, 3, 4, 5):
        s, b = vote_baseline(d, images, k)
        m = score(s, b, d["gold_subject"], d["gold_boxes"], images)
        if m["f1"] > best_vote["f1"]:
            best_vote = {"k": k, **m}
    out["vote_best_k_of_7"] = {"all": best_vote}
    best_db: dict[str, Any] = {"f1": -1.0}
    for eps in (3.0, 5.0, 8.0, 12.0):
        for min_samples in (2, 3, 4, 5):
            s, b = dbscan_baseline(d, images, eps=eps, min_samples=min_samples)
            m = score(s, b, d["gold_subject"], d["gold_boxes"], images)
            if m["f1"] > best_db["f1"]:
                best_db = {"eps": eps, "min_samples": min_samples, **m}
    out["panoptes_dbscan_best"] = {"all": best_db}
    return out


def main() -> None:
    import warnings

    warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=None, help="unused: the data are generated")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--images", type=int, default=1500)
    args = parser.parse_args()
    result: dict[str, Any] = {"seed": args.seed, "images": args.images}
    for mode in ("boxes", "clicks"):
        d = generate(args.seed, args.images, clicks=mode == "clicks")
        result[mode] = {
            "n_marks": int(d["boxes"].shape[0]),
            "n_objects": int(d["gold_boxes"].shape[0]),
            "methods": run(d),
        }
        for name, m in result[mode]["methods"].items():
            a = m["all"]
            extra = f"  non-gold F1 {m['non_gold']['f1']:.3f}" if "non_gold" in m else ""
            print(
                f"{mode:6s} {name:22s} P {a['precision']:.3f} R {a['recall']:.3f} "
                f"F1 {a['f1']:.3f}{extra}"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "synthetic_clumps.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
