"""The clump detector: torchvision's Faster R-CNN trained on a gzx COCO export (`gzx train`), and
its predictions sent back as a machine volunteer (`gzx predict`).

Why these choices:

- No weights are downloaded (`weights=None, weights_backbone=None` everywhere): a project may run
  where nothing can be fetched, and ImageNet features are not what galaxies need (Popp et al. 2024
  found an astronomy-pretrained backbone better). The default backbone is small and from scratch,
  made for small images: six 3x3 convolutions with two poolings (stride 4, receptive field ~30 px),
  one feature map, anchors sized from the training boxes, RoIAlign over that map, and a 256-wide
  box head. `--backbone resnet18|34|50` builds torchvision's ResNet+FPN (still no download) so a
  ResNet state dict, e.g. Zoobot's timm ResNet-50, can be given with `--init`.
- Images keep their size: `min_size`/`max_size` of the model's transform are set from the training
  images, so 64 px cut-outs are not blown up to 800 px (which would cost 150x the compute).
- Ignore regions (`iscrowd` 1: clusters the crowd left unresolved) are not targets; at validation
  a detection on one is neither right nor wrong. Images with no box stay in (they teach "empty").
- Completeness (recall) and purity (precision) are measured on `coco_val.json` at IoU >= 0.5 with
  greedy matching by score (each truth box matched at most once, same category), at the chosen
  score threshold (the one with the best F1 on validation, reported as such) and at a few others.

Shapes: an image is a float tensor (3, H, W) in [0, 1]; a target is {"boxes": (n, 4) x1 y1 x2 y2
pixels, top-left origin; "labels": (n,) int64, 1.. by category name}.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.errors import InputError
from app.train import common

log = logging.getLogger("gzx.train")

EXPORT_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
BACKBONES = ("small", "resnet18", "resnet34", "resnet50")
IOU = 0.5


@dataclass(frozen=True)
class Sample:
    """One COCO image: where its pixels are, its target boxes and its ignore regions."""

    subject_id: int
    path: Path
    boxes: np.ndarray  # (n, 4) float32 x1 y1 x2 y2
    labels: np.ndarray  # (n,) int64, 1..
    ignore: np.ndarray  # (m, 4) float32, iscrowd regions


def read_coco(path: Path, images: Path, index: dict[int, Path]) -> tuple[list[Sample], list[str]]:
    """Samples and category names (label k is names[k - 1]) of one COCO file of an export."""
    if not path.is_file():
        raise InputError(f"{path} does not exist (a detection export has it)", field="export_dir")
    coco = json.loads(path.read_text())
    categories = sorted(coco.get("categories", []), key=lambda c: c["id"])
    names = [c["name"] for c in categories]
    label_of = {c["id"]: k + 1 for k, c in enumerate(categories)}
    by_image: dict[int, list[dict[str, Any]]] = {}
    for annotation in coco.get("annotations", []):
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    samples = []
    for image in coco.get("images", []):
        boxes, labels, ignore = [], [], []
        for a in by_image.get(image["id"], []):
            x, y, w, h = (float(v) for v in a["bbox"])
            if w <= 1e-3 or h <= 1e-3:
                continue
            if a.get("iscrowd"):
                ignore.append((x, y, x + w, y + h))
            else:
                boxes.append((x, y, x + w, y + h))
                labels.append(label_of[a["category_id"]])
        samples.append(
            Sample(
                subject_id=int(image["id"]),
                path=common.find_image(images, index, int(image["id"]), image["file_name"]),
                boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                labels=np.asarray(labels, dtype=np.int64),
                ignore=np.asarray(ignore, dtype=np.float32).reshape(-1, 4),
            )
        )
    return samples, names


# --- the model ------------------------------------------------------------------------------------


def anchor_sizes(samples: Sequence[Sample], levels: int = 3) -> list[float]:
    """Anchor sizes (powers of two) spanning the 5th-95th percentile of the training boxes'
    sides, `levels` of them; (8, 16, 32) with no boxes."""
    sides = [
        np.sqrt((s.boxes[:, 2] - s.boxes[:, 0]) * (s.boxes[:, 3] - s.boxes[:, 1])) for s in samples
    ]
    flat = np.concatenate(sides) if sides else np.zeros(0)
    if flat.size == 0:
        return [8.0, 16.0, 32.0][:levels]
    low = 2 ** math.floor(math.log2(max(2.0, float(np.percentile(flat, 5)))))
    high = 2 ** math.ceil(math.log2(max(low, float(np.percentile(flat, 95)))))
    sizes = [float(low * 2**k) for k in range(levels)]
    if sizes[-1] < high:
        sizes = [float(high / 2 ** (levels - 1 - k)) for k in range(levels)]
    return sizes


def default_arch(
    samples: Sequence[Sample], n_categories: int, sizes: tuple[int, int], backbone: str
) -> dict[str, Any]:
    """Architecture arguments, saved in model.pt so `build_model` makes the same network."""
    if backbone not in BACKBONES:
        raise InputError(f"backbone must be one of {', '.join(BACKBONES)}", field="backbone")
    return {
        "backbone": backbone,
        "channels": [16, 48, 96],
        "num_classes": n_categories + 1,
        "anchor_sizes": anchor_sizes(samples, 3 if backbone == "small" else 5),
        "aspect_ratios": [0.5, 1.0, 2.0],
        "min_size": int(sizes[0]),
        "max_size": int(sizes[1]),
        "image_mean": [0.1, 0.1, 0.1],
        "image_std": [0.15, 0.15, 0.15],
        "representation": 256,
    }


def _small_backbone(channels: Sequence[int]) -> Any:
    from torch import nn

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]

    a, b, c = channels
    layers = [
        *block(3, a),
        *block(a, a),
        nn.MaxPool2d(2),
        *block(a, b),
        *block(b, b),
        nn.MaxPool2d(2),
        *block(b, c),
        *block(c, c),
    ]
    body = nn.Sequential(*layers)
    body.out_channels = c  # type: ignore[assignment]  # FasterRCNN reads this attribute
    return body


def build_model(arch: dict[str, Any]) -> Any:
    """Faster R-CNN from architecture arguments, with no downloaded weights."""
    from torch import nn
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    ratios = tuple(float(r) for r in arch["aspect_ratios"])
    if arch["backbone"] == "small":
        backbone = _small_backbone(arch["channels"])
        names = ["0"]
        anchors = AnchorGenerator((tuple(arch["anchor_sizes"]),), (ratios,))
    else:
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

        backbone = resnet_fpn_backbone(
            backbone_name=arch["backbone"],
            weights=None,
            norm_layer=nn.BatchNorm2d,
            trainable_layers=5,
        )
        names = ["0", "1", "2", "3"]
        anchors = AnchorGenerator(tuple((s,) for s in arch["anchor_sizes"]), (ratios,) * 5)
    out_channels = int(backbone.out_channels)
    pool = MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=1)
    width = int(arch["representation"])
    return FasterRCNN(
        backbone,
        num_classes=None,
        min_size=arch["min_size"],
        max_size=arch["max_size"],
        image_mean=arch["image_mean"],
        image_std=arch["image_std"],
        rpn_anchor_generator=anchors,
        box_roi_pool=pool,
        box_head=TwoMLPHead(out_channels * 7 * 7, width),
        box_predictor=FastRCNNPredictor(width, int(arch["num_classes"])),
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=150,
        rpn_batch_size_per_image=128,
        box_batch_size_per_image=64,
        box_detections_per_img=50,
        box_score_thresh=0.01,
    )


def _unwrap(loaded: Any) -> dict[str, Any]:
    """The tensor dict inside a checkpoint (ours: {"state_dict", "arch"}; others: "model",
    "state_dict" or the dict itself)."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            return dict(loaded[key])
    if not isinstance(loaded, dict):
        raise InputError("--init must be a state dict (a dict of tensors)", field="init")
    return dict(loaded)


_PREFIXES = ("module.", "model.", "encoder.", "backbone.", "body.")


def _plain(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def load_init(model: Any, path: Path) -> dict[str, Any]:
    """Load `path` into `model`: the whole model when its keys match, else the backbone only
    (keys compared without wrapper prefixes such as "module." or "encoder.", shapes must agree),
    strict=False. Returns what matched, so a wrong file is visible rather than silently ignored."""
    torch = common.import_torch()
    if not path.is_file():
        raise InputError(f"{path} does not exist", field="init")
    source = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    target = model.state_dict()
    whole = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    if len(whole) >= 0.9 * len(target):
        result = model.load_state_dict(whole, strict=False)
        return {
            "mode": "model",
            "matched": len(whole),
            "of": len(target),
            "missing": list(result.missing_keys),
        }
    backbone = model.backbone.state_dict()
    by_plain = {_plain(k): k for k in backbone}
    picked = {}
    for key, value in source.items():
        name = by_plain.get(_plain(key))
        if name is not None and backbone[name].shape == value.shape:
            picked[name] = value
    if not picked:
        raise InputError(
            f"no tensor of {path} matches the model or its backbone ({len(source)} keys)",
            field="init",
        )
    model.backbone.load_state_dict(picked, strict=False)
    return {"mode": "backbone", "matched": len(picked), "of": len(backbone), "missing": []}


# --- training ---------------------------------------------------------------------------------


def _target(sample: Sample, flip_x: bool, flip_y: bool, width: int, height: int) -> dict[str, Any]:
    torch = common.import_torch()
    boxes = sample.boxes.copy()
    if flip_x:
        boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
    if flip_y:
        boxes[:, [1, 3]] = height - boxes[:, [3, 1]]
    return {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(sample.labels.copy())}


def _batch(
    samples: Sequence[Sample], rng: np.random.Generator | None, device: Any
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Image tensors and targets; with `rng`, random horizontal and vertical flips (a clump is a
    clump either way up)."""
    images, targets = [], []
    for sample in samples:
        pixels = common.load_image(sample.path)
        height, width = pixels.shape[:2]
        fx, fy = (bool(b) for b in rng.random(2) < 0.5) if rng is not None else (False, False)
        if fx:
            pixels = pixels[:, ::-1]
        if fy:
            pixels = pixels[::-1]
        images.append(common.to_tensor(pixels).to(device))
        target = _target(sample, fx, fy, width, height)
        targets.append({k: v.to(device) for k, v in target.items()})
    return images, targets


def _image_sizes(samples: Sequence[Sample]) -> tuple[int, int]:
    """(min_size, max_size) for the model's transform: the typical shorter side and the longest
    side of the training images, so they are fed at their own size."""
    short, long = [], []
    for sample in samples[:200]:
        with Image.open(sample.path) as image:
            short.append(min(image.size))
            long.append(max(image.size))
    return int(np.median(short)), int(max(long))


def train(
    export_dir: Path,
    images: Path,
    out: Path,
    *,
    init: Path | None = None,
    epochs: int | None = None,
    iterations: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    name: str = "gzx-frcnn",
    version: str | None = None,
    export_id: str | None = None,
    backbone: str = "small",
    learning_rate: float = 1e-3,
    threads: int | None = None,
    device: str | None = None,
    log: Callable[[str], Any] = log.info,
) -> dict[str, Any]:
    """Train on `export_dir`'s coco_train.json, measure on coco_val.json, write `out` (contract
    3). Stops after `iterations` optimiser steps or `epochs` passes (10 when neither is given),
    whichever comes first. Returns the metrics (also in out/metrics.json)."""
    torch = common.import_torch()
    version = version or common.utc_version()
    common.validate_name(name, version)
    if batch_size < 1:
        raise InputError("batch_size must be at least 1", field="batch_size")
    manifest_path = export_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if export_id is None and EXPORT_ID.match(export_dir.resolve().name):
        export_id = export_dir.resolve().name
    n_threads = common.set_threads(threads)
    common.seed_everything(seed)
    where = common.choose_device(device)
    index = common.image_index(images)
    train_set, names = read_coco(export_dir / "coco_train.json", images, index)
    val_set, _ = (
        read_coco(export_dir / "coco_val.json", images, index)
        if (export_dir / "coco_val.json").is_file()
        else ([], names)
    )
    if not train_set:
        raise InputError("coco_train.json has no images", field="export_dir")
    arch = default_arch(train_set, len(names), _image_sizes(train_set), backbone)
    init_report = None
    if init is not None:
        saved = torch.load(init, map_location="cpu", weights_only=True)
        if isinstance(saved, dict) and isinstance(saved.get("arch"), dict):
            arch = {**saved["arch"], "num_classes": len(names) + 1}
    model = build_model(arch)
    if init is not None:
        init_report = load_init(model, init)
        log(
            f"--init {init}: {init_report['matched']} of {init_report['of']} "
            f"{init_report['mode']} tensors loaded"
        )
    model.to(where)
    per_epoch = math.ceil(len(train_set) / batch_size)
    steps = (epochs if epochs is not None else 10) * per_epoch
    if iterations is not None:
        steps = min(steps, iterations) if epochs is not None else iterations
    steps = max(1, steps)
    optimiser = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=learning_rate, weight_decay=1e-4
    )
    warmup = min(100, max(1, steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: (
            (step + 1) / warmup
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        ),
    )
    rng = np.random.default_rng(seed)
    model.train()
    seen, step, train_seconds, losses = 0, 0, 0.0, []
    log(
        f"training {len(train_set)} images ({sum(len(s.boxes) for s in train_set)} boxes) on "
        f"{where} ({n_threads} threads): {steps} steps of {batch_size}"
    )
    while step < steps:
        order = rng.permutation(len(train_set))
        for start in range(0, len(order), batch_size):
            if step >= steps:
                break
            chosen = [train_set[i] for i in order[start : start + batch_size]]
            began = time.perf_counter()
            batch_images, targets = _batch(chosen, rng, where)
            loss_parts = model(batch_images, targets)
            loss = sum(loss_parts.values())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimiser.step()
            scheduler.step()
            if where.type == "cuda":
                torch.cuda.synchronize()
            train_seconds += time.perf_counter() - began
            seen += len(chosen)
            step += 1
            losses.append(float(loss.detach()))
            if step == 1 or step % 50 == 0 or step == steps:
                log(f"step {step}/{steps} loss {np.mean(losses[-50:]):.3f}")
    detections = detect(model, [s.path for s in val_set], batch_size=max(batch_size, 8))
    quality = measure(val_set, detections)
    threshold = quality["chosen_threshold"]
    metrics = {
        **quality,
        "train_images": len(train_set),
        "train_boxes": int(sum(len(s.boxes) for s in train_set)),
        "train_ignore_regions": int(sum(len(s.ignore) for s in train_set)),
        "steps": step,
        "epochs": round(seen / len(train_set), 3),
        "batch_size": batch_size,
        "final_loss": float(np.mean(losses[-20:])),
        "train_seconds": round(train_seconds, 3),
        "images_per_second": round(seen / train_seconds, 3) if train_seconds > 0 else None,
        "device": str(where),
        "device_name": torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu",
        "threads": n_threads,
        "init": None if init is None else {"path": str(init), **(init_report or {})},
    }
    subjects = manifest.get("subjects", {})
    info = {
        "kind": "detector",
        "model": name,
        "version": version,
        "export_id": export_id,
        "workflow_id": manifest.get("workflow_id"),
        "categories": names,
        "image_size": arch["max_size"],
        "score_threshold": threshold,
        "training_subjects": sorted(
            {*subjects.get("train", []), *subjects.get("val", [])}
            or {s.subject_id for s in [*train_set, *val_set]}
        ),
    }
    common.write_model_dir(
        out, state_dict=model.state_dict(), arch=arch, metrics=metrics, info=info
    )
    return metrics


# --- measuring --------------------------------------------------------------------------------


def detect(model: Any, paths: Sequence[Path], batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    """Boxes, scores and labels (numpy) for each image, in order."""
    torch = common.import_torch()
    device = next(model.parameters()).device
    model.eval()
    found: list[dict[str, np.ndarray]] = []
    with torch.inference_mode():
        for part in common.batches(list(paths), batch_size):
            tensors = [common.to_tensor(common.load_image(p)).to(device) for p in part]
            for output in model(tensors):
                found.append({k: v.cpu().numpy() for k, v in output.items()})
    return found


def match(
    truth: np.ndarray,
    truth_labels: np.ndarray,
    ignore: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
) -> np.ndarray:
    """Greedy matching by score at IoU >= 0.5: per detection (in the given order) 1 = true
    positive, 0 = false positive, -1 = ignored (on an ignore region, matching no truth box)."""
    torch = common.import_torch()
    from torchvision.ops import box_iou

    order = np.argsort(-scores, kind="stable")
    outcome = np.zeros(len(scores), dtype=np.int64)
    if len(scores) == 0:
        return outcome
    det = torch.from_numpy(boxes[order].astype(np.float32))
    iou = box_iou(det, torch.from_numpy(truth.astype(np.float32))).numpy() if len(truth) else None
    on_ignore = (
        box_iou(det, torch.from_numpy(ignore.astype(np.float32))).numpy().max(axis=1) >= IOU
        if len(ignore)
        else np.zeros(len(order), dtype=bool)
    )
    taken = np.zeros(len(truth), dtype=bool)
    for rank, d in enumerate(order):
        if iou is not None:
            candidates = np.where((~taken) & (truth_labels == labels[d]), iou[rank], -1.0)
            best = int(np.argmax(candidates))
            if candidates[best] >= IOU:
                taken[best] = True
                outcome[d] = 1
                continue
        outcome[d] = -1 if on_ignore[rank] else 0
    return outcome


def measure(
    samples: Sequence[Sample],
    detections: Sequence[dict[str, np.ndarray]],
    threshold: float | None = None,
) -> dict[str, Any]:
    """Completeness and purity at IoU >= 0.5 over a set, at THRESHOLDS and at `threshold` (by
    default the one with the best F1, ties to the higher); plus AP50 (all-point interpolation)."""
    n_truth = int(sum(len(s.boxes) for s in samples))
    scores, outcomes = [], []
    for sample, found in zip(samples, detections, strict=True):
        outcome = match(
            sample.boxes,
            sample.labels,
            sample.ignore,
            found["boxes"],
            found["labels"],
            found["scores"],
        )
        keep = outcome >= 0
        scores.append(found["scores"][keep])
        outcomes.append(outcome[keep])
    score = np.concatenate(scores) if scores else np.zeros(0)
    hit = np.concatenate(outcomes) if outcomes else np.zeros(0, dtype=np.int64)

    def at(threshold: float) -> dict[str, Any]:
        kept = score >= threshold
        tp, n = int(hit[kept].sum()), int(kept.sum())
        return {
            "threshold": threshold,
            "completeness": tp / n_truth if n_truth else None,
            "purity": tp / n if n else None,
            "true_positives": tp,
            "detections": n,
        }

    grid = [round(0.05 * k, 2) for k in range(1, 20)]

    def f1(row: dict[str, Any]) -> float:
        c, p = row["completeness"], row["purity"]
        return 2 * c * p / (c + p) if c and p else 0.0

    rows = [at(t) for t in grid]
    best = max(rows, key=lambda r: (f1(r), r["threshold"])) if n_truth else at(0.5)
    chosen = best["threshold"] if f1(best) > 0 else 0.5
    if threshold is not None:
        chosen = threshold
    order = np.argsort(-score, kind="stable")
    ap = None
    if n_truth:
        tp = np.cumsum(hit[order])
        precision = tp / np.arange(1, len(order) + 1)
        recall = tp / n_truth
        envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(order) else precision
        steps = np.diff(np.concatenate([[0.0], recall]))
        ap = float((steps * envelope).sum())
    picked = at(chosen)
    return {
        "iou": IOU,
        "val_images": len(samples),
        "val_boxes": n_truth,
        "chosen_threshold": chosen,
        "completeness": picked["completeness"],
        "purity": picked["purity"],
        "ap50": ap,
        "at_thresholds": [at(t) for t in THRESHOLDS],
    }


def describe_metrics(metrics: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    return (
        f"validation ({metrics['val_images']} images, {metrics['val_boxes']} boxes, IoU >= "
        f"{metrics['iou']}): completeness {pct(metrics['completeness'])}, purity "
        f"{pct(metrics['purity'])} at score >= {metrics['chosen_threshold']}; training "
        f"{metrics['images_per_second']} images/s on {metrics['device_name']}"
    )


# --- predicting -----------------------------------------------------------------------------------


def load_model(model_dir: Path, device: Any = None) -> tuple[Any, dict[str, Any]]:
    """The trained network (eval mode) and its model.json."""
    info, saved = common.read_model_dir(model_dir)
    if info.get("kind") != "detector":
        raise InputError(f"{model_dir} holds a {info.get('kind')}, not a detector", "model_dir")
    model = build_model(saved["arch"])
    model.load_state_dict(saved["state_dict"])
    model.to(device or common.choose_device())
    model.eval()
    return model, info


def predict(
    model_dir: Path,
    images: Path,
    *,
    subjects: Sequence[int] | None = None,
    batch_size: int = 16,
    min_score: float = 0.1,
    threads: int | None = None,
) -> dict[str, Any]:
    """Contract 1's body for every image (or the given subjects): boxes with score >=
    min(min_score, the model's threshold), so that calibration sees low scores too while the
    server keeps only those >= score_threshold as marks. Boxes are clipped to the image."""
    common.set_threads(threads)
    model, info = load_model(model_dir)
    index = common.image_index(images)
    if subjects is None:
        chosen = sorted(index)
    else:
        missing = [s for s in subjects if s not in index]
        if missing:
            raise InputError(f"no image for subjects {missing[:10]} in {images}", "subjects")
        chosen = list(subjects)
    floor = min(min_score, float(info.get("score_threshold", 0.5)))
    names = list(info.get("categories", []))
    paths = [index[s] for s in chosen]
    predictions = []
    for subject_id, path, found in zip(
        chosen, paths, detect(model, paths, batch_size), strict=True
    ):
        with Image.open(path) as image:
            width, height = image.size
        boxes = []
        for (x1, y1, x2, y2), score, label in zip(
            found["boxes"], found["scores"], found["labels"], strict=True
        ):
            x1, x2 = max(0.0, float(x1)), min(float(width), float(x2))
            y1, y2 = max(0.0, float(y1)), min(float(height), float(y2))
            if score < floor or x2 <= x1 or y2 <= y1:
                continue
            boxes.append(
                {
                    "x1": round(x1, 3),
                    "y1": round(y1, 3),
                    "x2": round(x2, 3),
                    "y2": round(y2, 3),
                    "score": round(float(score), 6),
                    "category": names[int(label) - 1],
                }
            )
        predictions.append({"subject_id": subject_id, "probabilities": None, "boxes": boxes})
    body: dict[str, Any] = {
        "model": info["model"],
        "version": info["version"],
        "export_id": info.get("export_id"),
        "training_subjects": None if info.get("export_id") else info.get("training_subjects"),
        "score_threshold": float(info.get("score_threshold", 0.5)),
        "predictions": predictions,
    }
    return body
