"""The clump detector on the synthetic sky: completeness and purity on held-back images, and
training images per second.

Usage: .venv/bin/python benchmarks/detector.py [--train 600] [--val 150] [--test 200]
           [--size 64] [--iterations 400] [--batch-size 8] [--threads 2] [--seed 0]
Writes benchmarks/results/detector.json (or --out).

Truth comes from the generator (app/sky.py), not from a crowd: the export directory is written in
the layout app/exports.py gives (coco_train.json, coco_val.json, manifest.json), with every clump
a box, so this measures the detector alone. The validation split picks the score threshold
(`gzx train` does the same); completeness and purity are then measured on a separate test set of
images the trainer never saw (another seed), at IoU >= 0.5 with greedy matching by score.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app import sky
from app.train import common, detector


def write_export(directory: Path, splits: dict[str, list[sky.SkyImage]]) -> None:
    """COCO files and a manifest as app/exports.py writes them (one category, "clump")."""
    directory.mkdir(parents=True, exist_ok=True)
    categories = [{"id": 1, "name": "clump", "supercategory": "object"}]
    for split, images in splits.items():
        annotations, entries = [], []
        for image in images:
            size = int(image.pixels.shape[0])
            entries.append(
                {"id": image.subject_id, "file_name": f"{image.subject_id}.png"}
                | {"width": size, "height": size}
            )
            for x1, y1, x2, y2 in image.clumps:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image.subject_id,
                        "category_id": 1,
                        "bbox": [x1, y1, round(x2 - x1, 3), round(y2 - y1, 3)],
                        "area": round((x2 - x1) * (y2 - y1), 3),
                        "iscrowd": 0,
                        "score": 1.0,
                        "p_off": 0.0,
                    }
                )
        coco = {"images": entries, "annotations": annotations, "categories": categories}
        (directory / f"coco_{split}.json").write_text(json.dumps(coco))
    manifest = {
        "workflow_id": None,
        "categories": ["clump"],
        "subjects": {s: [i.subject_id for i in images] for s, images in splits.items()},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--val", type=int, default=150)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "detector.json"
    )
    args = parser.parse_args()

    seen = sky.generate(args.train + args.val, size=args.size, seed=args.seed, first_id=1)
    held = sky.generate(args.test, size=args.size, seed=args.seed + 1000, first_id=1_000_000)
    with tempfile.TemporaryDirectory(prefix="gzx-detector-bench-") as scratch:
        root = Path(scratch)
        sky.write_images([*seen, *held], root / "images")
        write_export(root / "export", {"train": seen[: args.train], "val": seen[args.train :]})
        began = time.perf_counter()
        metrics = detector.train(
            root / "export",
            root / "images",
            root / "model",
            iterations=args.iterations,
            batch_size=args.batch_size,
            seed=args.seed,
            threads=args.threads,
            device=args.device,
            name="bench-frcnn",
            version="bench",
            log=print,
        )
        wall = time.perf_counter() - began
        write_export(root / "heldout", {"train": held[:1], "val": held})
        index = common.image_index(root / "images")
        samples, _ = detector.read_coco(root / "heldout" / "coco_val.json", root / "images", index)
        model, info = detector.load_model(root / "model", common.choose_device(args.device))
        started = time.perf_counter()
        found = detector.detect(model, [s.path for s in samples], batch_size=32)
        predict_seconds = time.perf_counter() - started
        threshold = float(info["score_threshold"])
        test = detector.measure(samples, found, threshold=threshold)
    held_featured = sum(1 for i in held if i.morphology == "featured")
    result: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_end": os.getloadavg(),
            "device": metrics["device"],
            "device_name": metrics["device_name"],
            "threads": metrics["threads"],
        },
        "data": {
            "size": args.size,
            "train_images": args.train,
            "val_images": args.val,
            "test_images": args.test,
            "test_featured": held_featured,
            "test_clumps": sum(len(i.clumps) for i in held),
            "seed": args.seed,
        },
        "training": {
            "iterations": metrics["steps"],
            "batch_size": args.batch_size,
            "epochs": metrics["epochs"],
            "final_loss": metrics["final_loss"],
            "images_per_second": metrics["images_per_second"],
            "train_seconds": metrics["train_seconds"],
            "wall_seconds_with_validation": round(wall, 1),
        },
        "validation": {k: v for k, v in metrics.items() if k in _QUALITY},
        # at the threshold validation chose, on images the trainer never saw
        "test": {k: v for k, v in test.items() if k in _QUALITY},
        "predict_images_per_second": round(len(samples) / predict_seconds, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


_QUALITY = (
    "chosen_threshold",
    "completeness",
    "purity",
    "ap50",
    "at_thresholds",
    "val_images",
    "val_boxes",
)


if __name__ == "__main__":
    main()
