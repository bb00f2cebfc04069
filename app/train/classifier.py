"""A rotation-invariant morphology classifier trained on a gzx labels export (issue 8).

Why: galaxy morphology does not depend on how the galaxy lies on the sky. Dieleman, Willett &
Dambre (2015, MNRAS 450, 1441; the Galaxy Challenge winner) built that symmetry into a CNN by
applying one convolutional trunk to rotated and flipped views of each image and combining the
views' features before the dense layers; with it they matched the volunteers' consensus on > 99%
of the images with high agreement. A confident classifier can then vote as a machine volunteer
(`POST /v1/workflows/{id}/predictions`) so people see only the hard images (Galaxy Zoo Express).

The network (`MorphologyNet`):

    views   x -> {rot90^k(x), rot90^k(flip(x)) : k = 0..3}     8 views, exact (no interpolation)
    trunk   4 x [conv 3x3 (-> max pool 2) -> batch norm -> ReLU] -> global average pool -> F
    pool    mean over the 8 views' F-vectors                   (invariant network only)
    head    F -> hidden -> ReLU -> K logits

The 8 views are the orbit of the image under the dihedral group D4: rotating or flipping the input
only permutes them, and a mean over views does not depend on their order, so the pooled features
and therefore the output are exactly invariant (up to float summation order). The views add no
parameters: `invariant=False` is the same network (same state dict) applied to the image alone,
the baseline of the benchmark. Mean rather than max pooling over views: every view gets a gradient
at every step (max sends it through one view, so the trunk learns from an eighth of what it
computes), and averaging eight views also averages out pixel noise; the paper's own later
"cyclic pooling" (Dieleman, De Fauw & Kavukcuoglu 2016) found averaging works best too. (The 2015
network concatenated the views' features, which is not exactly invariant; pooling is.)

Training data: a labels export (`docs/exports.md`): one row per kept subject with `subject_id,
split, status, label, p_<class>...`. Only `retired` subjects with a label are used. Loss: the
cross-entropy of the export's label, each subject weighted by its posterior of that label (its
confidence), normalised by the batch's total weight. Chosen over soft targets (the `p_<class>`
vector) because the export's posterior is a belief about one true class, not a vote fraction to
regress: a subject at 0.6 should count less, not teach the network to say 0.6. (With the default
export bounds every kept subject has P >= 0.99 and the weights are all close to 1.) The `train`
split trains; the `val` split is only reported on.

Images are `<subject id>.<extension>` files (as exports name them), read with pillow, converted to
RGB and resized to `image_size` square. Arrays: pixels (N, S, S, 3) uint8; labels (N,) int class
indices; weights (N,) float; probabilities (N, K) float.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.errors import InputError
from app.train import common

CONFIDENCE_LEVELS = (0.5, 0.7, 0.9, 0.95, 0.99)
HIGH_AGREEMENT = 0.9  # posterior of the label at or above this: the paper's consensus subset
EXPORT_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# --- the network -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """Everything needed to build the network again (stored in model.pt next to the weights)."""

    classes: tuple[str, ...]
    invariant: bool = True
    image_size: int = 64
    channels: tuple[int, ...] = (16, 32, 64, 64)
    hidden: int = 64
    pool: str = "mean"  # how the invariant network combines its views: "mean" or "max"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["classes"] = list(self.classes)
        data["channels"] = list(self.channels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        return cls(
            classes=tuple(str(c) for c in data["classes"]),
            invariant=bool(data["invariant"]),
            image_size=int(data["image_size"]),
            channels=tuple(int(c) for c in data["channels"]),
            hidden=int(data["hidden"]),
            pool=str(data["pool"]),
        )


def dihedral_views(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (8, B, C, H', W'): the 4 rotations of x and of its mirror image.

    Square images keep their shape; rot90 and flip move pixels exactly, so nothing is resampled.
    """
    mirrored = torch.flip(x, dims=(3,))
    views = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    views += [torch.rot90(mirrored, k, dims=(2, 3)) for k in range(4)]
    return torch.stack(views)


class MorphologyNet(nn.Module):
    """A compact CNN; with `invariant` its trunk sees 8 dihedral views whose features are pooled."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        if arch.pool not in ("mean", "max"):
            raise InputError("pool must be 'mean' or 'max'", field="pool")
        if len(arch.classes) < 2:
            raise InputError("a classifier needs at least two classes", field="classes")
        self.arch = arch
        layers: list[nn.Module] = []
        previous = 3
        for i, width in enumerate(arch.channels):
            layers.append(nn.Conv2d(previous, width, 3, padding=1, bias=False))
            if i < len(arch.channels) - 1:
                layers.append(nn.MaxPool2d(2))  # before BN and ReLU: 4x less work for them
            layers += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            previous = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Linear(previous, arch.hidden),
            nn.ReLU(inplace=True),
            nn.Linear(arch.hidden, len(arch.classes)),
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, F): the trunk's features, pooled over the views when invariant."""
        if not self.arch.invariant:
            return torch.as_tensor(self.trunk(x))
        views = dihedral_views(x)
        n_views, batch = views.shape[:2]
        found: torch.Tensor = self.trunk(views.reshape(n_views * batch, *views.shape[2:]))
        found = found.reshape(n_views, batch, -1)
        pooled: torch.Tensor = (
            found.max(dim=0).values if self.arch.pool == "max" else found.mean(dim=0)
        )
        return pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) floats in [0, 1] -> (B, K) logits."""
        return torch.as_tensor(self.head(self.features(x)))


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def as_batch(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 in [0, 1] on `device`."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
    return tensor.permute(0, 3, 1, 2).float().div_(255.0)


# --- training and prediction on arrays ---------------------------------------------------------


@dataclass
class FitResult:
    """What one training run did: loss per epoch, images per second, where it ran."""

    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    device: str = "cpu"


def fit(
    net: MorphologyNet,
    pixels: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    seed: int = 0,
    device: torch.device | None = None,
    max_steps: int | None = None,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Train `net` in place: AdamW, cosine-decayed learning rate, confidence-weighted CE.

    `max_steps` stops early (CI runs a couple of iterations); shuffling follows `seed`.
    """
    n = len(labels)
    if n == 0:
        raise InputError("no training images", field="train")
    if weights is None:
        weights = np.ones(n)
    device = device or common.choose_device()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net.to(device).train()
    steps_per_epoch = math.ceil(n / batch_size)
    total = (
        steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    )
    optimiser = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(total, 1))
    target = torch.as_tensor(labels, dtype=torch.long)
    weight = torch.as_tensor(weights, dtype=torch.float32)
    result = FitResult(device=str(device))
    began = time.perf_counter()
    seen = step = 0
    for epoch in range(epochs):
        order = rng.permutation(n)
        loss_sum = weight_sum = 0.0
        for start in range(0, n, batch_size):
            if step >= total:
                break
            idx = order[start : start + batch_size]
            x = as_batch(pixels[idx], device)
            y, w = target[idx].to(device), weight[idx].to(device)
            per_image = nn.functional.cross_entropy(net(x), y, reduction="none")
            loss = (per_image * w).sum() / w.sum().clamp_min(1e-12)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            optimiser.step()
            schedule.step()
            batch_weight = float(w.sum())
            loss_sum += loss.item() * batch_weight
            weight_sum += batch_weight
            seen += len(idx)
            step += 1
        if weight_sum:
            result.epoch_losses.append(loss_sum / weight_sum)
            if log is not None:
                log(f"epoch {epoch + 1}/{epochs}: weighted loss {result.epoch_losses[-1]:.4f}")
        if step >= total:
            break
    recalibrate_batchnorm(net, pixels, batch_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result.seconds = time.perf_counter() - began
    result.images_per_second = seen / result.seconds if result.seconds > 0 else 0.0
    return result


@torch.no_grad()
def recalibrate_batchnorm(
    net: MorphologyNet, pixels: np.ndarray, batch_size: int, device: torch.device
) -> None:
    """Recompute every BatchNorm's running statistics as plain averages over the training images
    under the final weights ("precise BN").

    The running averages kept during training (momentum 0.1) still remember the activations of
    early weights after a short run: on the synthetic sky, 48 steps left the network 99% right in
    training mode and at chance in eval mode. One pass without gradients fixes that.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or len(pixels) == 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
    net.train()
    for start in range(0, len(pixels), batch_size):
        net(as_batch(pixels[start : start + batch_size], device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    net.eval()


@torch.no_grad()
def predict_proba(
    net: MorphologyNet,
    pixels: np.ndarray,
    *,
    batch_size: int = 128,
    device: torch.device | None = None,
) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, K) class probabilities (float64, rows sum to 1)."""
    device = device or common.choose_device()
    net.to(device).eval()
    out = [
        torch.softmax(net(as_batch(pixels[i : i + batch_size], device)).double(), dim=1).cpu()
        for i in range(0, len(pixels), batch_size)
    ]
    if not out:
        return np.zeros((0, len(net.arch.classes)))
    return np.asarray(torch.cat(out).numpy())


# --- metrics (pure numpy) ----------------------------------------------------------------------


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def report(
    probabilities: np.ndarray,
    labels: np.ndarray,
    agreement: np.ndarray | None = None,
    *,
    bins: int = 10,
    levels: Sequence[float] = CONFIDENCE_LEVELS,
) -> dict[str, Any]:
    """Accuracy, reliability table, accuracy at each confidence level and on high agreement.

    probabilities (N, K); labels (N,) the reference classes; agreement (N,) the posterior of the
    reference label (the crowd's confidence). Confidence is the top class probability; the
    reliability bins split [1/K, 1] evenly (a top probability is never below 1/K). ECE is the
    count-weighted mean |accuracy - mean confidence| over the bins.
    """
    n, k = probabilities.shape
    confidence = probabilities.max(axis=1) if n else np.zeros(0)
    correct = (probabilities.argmax(axis=1) == labels) if n else np.zeros(0, dtype=bool)
    edges = np.linspace(1.0 / k, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    table = []
    ece = 0.0
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        mean_conf = _mean_or_none(confidence[inside])
        acc = _mean_or_none(correct[inside].astype(float))
        if count and mean_conf is not None and acc is not None:
            ece += count / n * abs(acc - mean_conf)
        table.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": count,
                "mean_confidence": mean_conf,
                "accuracy": acc,
            }
        )
    at_level = []
    for level in levels:
        chosen = confidence >= level
        at_level.append(
            {
                "confidence": level,
                "count": int(chosen.sum()),
                "coverage": float(chosen.mean()) if n else None,
                "accuracy": _mean_or_none(correct[chosen].astype(float)),
            }
        )
    result: dict[str, Any] = {
        "count": n,
        "accuracy": _mean_or_none(correct.astype(float)),
        "mean_confidence": _mean_or_none(confidence),
        "ece": ece if n else None,
        "reliability": table,
        "at_confidence": at_level,
    }
    if agreement is not None:
        high = agreement >= HIGH_AGREEMENT
        result["high_agreement"] = {
            "threshold": HIGH_AGREEMENT,
            "count": int(high.sum()),
            "accuracy": _mean_or_none(correct[high].astype(float)),
        }
    return result


# --- exports and images ------------------------------------------------------------------------


@dataclass
class LabelSet:
    """The usable rows of a labels export, by split."""

    classes: tuple[str, ...]
    subject_ids: np.ndarray  # (N,) int64
    splits: np.ndarray  # (N,) "train" | "val"
    labels: np.ndarray  # (N,) class index
    weights: np.ndarray  # (N,) posterior of the label
    skipped: dict[str, int]


def read_labels(export_dir: Path) -> LabelSet:
    """Rows of labels.parquet (else labels.csv): retired subjects with a label and a posterior."""
    parquet, csv_path = export_dir / "labels.parquet", export_dir / "labels.csv"
    if parquet.is_file():
        import pyarrow.parquet as pq

        rows: list[dict[str, Any]] = pq.read_table(parquet).to_pylist()
        columns = list(pq.read_schema(parquet).names)
    elif csv_path.is_file():
        import csv

        with csv_path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    else:
        raise InputError(f"{export_dir} has no labels.parquet or labels.csv", field="export_dir")
    missing = {"subject_id", "split", "status", "label"} - set(columns)
    if missing:
        raise InputError(f"labels export lacks columns {sorted(missing)}", field="export_dir")
    classes = tuple(c[2:] for c in columns if c.startswith("p_"))
    if len(classes) < 2:
        raise InputError("labels export has fewer than two p_<class> columns", field="export_dir")
    number = {name: k for k, name in enumerate(classes)}
    skipped = {"not_retired": 0, "no_label": 0, "no_posterior": 0}
    ids, splits, labels, weights = [], [], [], []
    for row in rows:
        if row["status"] != "retired":
            skipped["not_retired"] += 1
            continue
        label = row["label"]
        if label in (None, "") or label not in number:
            skipped["no_label"] += 1
            continue
        p = row.get(f"p_{label}")
        if p in (None, "") or not math.isfinite(float(p)):
            skipped["no_posterior"] += 1
            continue
        ids.append(int(row["subject_id"]))
        splits.append(str(row["split"]))
        labels.append(number[label])
        weights.append(float(p))
    return LabelSet(
        classes=classes,
        subject_ids=np.asarray(ids, dtype=np.int64),
        splits=np.asarray(splits, dtype=object),
        labels=np.asarray(labels, dtype=np.int64),
        weights=np.asarray(weights, dtype=np.float64),
        skipped=skipped,
    )


def read_manifest(export_dir: Path) -> dict[str, Any]:
    path = export_dir / "manifest.json"
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def load_pixels(paths: Iterable[Path], size: int) -> np.ndarray:
    """(N, size, size, 3) uint8: each image as RGB, resized (anti-aliased) to a square."""
    from PIL import Image

    out = []
    for path in paths:
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
                if rgb.size != (size, size):
                    rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
                out.append(np.asarray(rgb, dtype=np.uint8))
        except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
            raise InputError(f"cannot read image {path}: {error}", field="images") from error
    return np.stack(out) if out else np.zeros((0, size, size, 3), dtype=np.uint8)


# --- model directories (contract 3) ------------------------------------------------------------


def load_model(directory: Path) -> tuple[MorphologyNet, dict[str, Any]]:
    """The network (eval mode, on the CPU) and model.json of a classifier model directory."""
    info, saved = common.read_model_dir(directory)
    if info.get("kind") != "classifier":
        raise InputError(f"{directory} holds a {info.get('kind')!r}, not a classifier", "model_dir")
    net = MorphologyNet(Architecture.from_dict(saved["arch"]))
    net.load_state_dict(saved["state_dict"])
    return net.eval(), info


def load_initial_weights(net: MorphologyNet, path: Path) -> int:
    """Copy every tensor of a weights file whose name and shape match; return how many.

    Takes a model.pt of this trainer (the plain and the invariant network share their weights'
    names, so either starts the other) or a bare state dict. Nothing is downloaded.
    """
    if not path.is_file():
        raise InputError(f"{path} is not a file", field="init")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    state = saved.get("state_dict", saved) if isinstance(saved, dict) else {}
    own = net.state_dict()
    matching = {
        k: v
        for k, v in state.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape == own[k].shape
    }
    if not matching:
        raise InputError(f"no weights in {path} fit this network", field="init")
    net.load_state_dict(matching, strict=False)
    return len(matching)


def train_classifier(
    export_dir: Path,
    images: Path,
    out: Path,
    *,
    epochs: int = 10,
    invariant: bool = True,
    seed: int = 0,
    name: str = "gzx-morphology",
    version: str | None = None,
    init: Path | None = None,
    export_id: str | None = None,
    image_size: int = 64,
    batch_size: int = 32,
    max_steps: int | None = None,
    threads: int | None = None,
    device: str | None = None,
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Train on a labels export, report on its validation split, write `out`; return metrics.

    `export_id` defaults to the export directory's name when that is an export id (as gzx names
    them); the manifest's subjects (train and val) are the model's training subjects either way.
    """
    version = version or common.utc_version()
    common.validate_name(name, version)
    if epochs < 1 or batch_size < 1 or image_size < 8:
        raise InputError("epochs and batch_size must be >= 1, image_size >= 8", "epochs")
    if export_id is None and EXPORT_ID.match(export_dir.resolve().name):
        export_id = export_dir.resolve().name
    labels = read_labels(export_dir)
    manifest = read_manifest(export_dir)
    files = common.image_index(images)
    has_image = np.asarray([int(s) in files for s in labels.subject_ids], dtype=bool)
    labels.skipped["no_image"] = int((~has_image).sum())
    train = has_image & (labels.splits == "train")
    val = has_image & (labels.splits == "val")
    if not train.any():
        raise InputError(
            f"no retired, labelled training subject of {export_dir} has an image in {images}",
            field="images",
        )
    n_threads = common.set_threads(threads)
    common.seed_everything(seed)
    arch = Architecture(classes=labels.classes, invariant=invariant, image_size=image_size)
    net = MorphologyNet(arch)
    initialised = load_initial_weights(net, init) if init is not None else 0
    pixels = load_pixels([files[int(s)] for s in labels.subject_ids[has_image]], image_size)
    row = np.cumsum(has_image) - 1  # row of each subject's image in `pixels`
    where = common.choose_device(device)
    fitted = fit(
        net,
        pixels[row[train]],
        labels.labels[train],
        labels.weights[train],
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        device=where,
        max_steps=max_steps,
        log=log,
    )
    metrics: dict[str, Any] = {
        "classes": list(labels.classes),
        "invariant": invariant,
        "pool": arch.pool,
        "parameters": count_parameters(net),
        "device": fitted.device,
        "device_name": torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu",
        "threads": n_threads,
        "epochs": epochs,
        "epoch_losses": fitted.epoch_losses,
        "train_seconds": round(fitted.seconds, 3),
        "train_images_per_second": round(fitted.images_per_second, 3),
        "init": None if init is None else {"path": str(init), "tensors": initialised},
        "subjects": {"train": int(train.sum()), "val": int(val.sum()), "skipped": labels.skipped},
        "loss": "cross-entropy of the label, weighted by its posterior",
    }
    for split, mask in (("train", train), ("val", val)):
        probs = predict_proba(net, pixels[row[mask]], device=where)
        metrics[split] = report(probs, labels.labels[mask], labels.weights[mask])
    # The headline numbers at the top level, as the detector reports completeness and purity.
    metrics["accuracy"] = metrics["val"]["accuracy"]
    metrics["high_agreement_accuracy"] = metrics["val"]["high_agreement"]["accuracy"]
    subjects = manifest.get("subjects", {})
    info = {
        "kind": "classifier",
        "model": name,
        "version": version,
        "export_id": export_id,
        "workflow_id": manifest.get("workflow_id"),
        "classes": list(labels.classes),
        "image_size": image_size,
        "score_threshold": None,
        "invariant": invariant,
        "training_subjects": sorted(
            {*subjects.get("train", []), *subjects.get("val", [])}
            or {int(s) for s in labels.subject_ids}
        ),
    }
    common.write_model_dir(
        out, state_dict=net.state_dict(), arch=arch.to_dict(), metrics=metrics, info=info
    )
    return metrics


def describe_metrics(metrics: dict[str, Any]) -> str:
    """A few lines for the console: accuracy, calibration and the confident subsets on val."""
    val = metrics.get("val") or {}
    if not val.get("count"):
        return f"trained on {metrics['subjects']['train']} subjects; no validation subjects"
    lines = [
        f"{'invariant' if metrics['invariant'] else 'plain'} CNN, {metrics['parameters']:,} "
        f"parameters, {metrics['device']}: val accuracy {val['accuracy']:.3f} on "
        f"{val['count']} subjects, ECE {val['ece']:.3f}"
    ]
    for level in val["at_confidence"]:
        if level["count"]:
            lines.append(
                f"  confidence >= {level['confidence']}: accuracy {level['accuracy']:.3f}, "
                f"coverage {level['coverage']:.3f}"
            )
    high = val.get("high_agreement") or {}
    if high.get("count"):
        lines.append(
            f"  high agreement (P(label) >= {high['threshold']}): accuracy "
            f"{high['accuracy']:.3f} on {high['count']}"
        )
    return "\n".join(lines)


# --- predictions as a machine volunteer (contract 1) -------------------------------------------


def predict_directory(
    model_dir: Path,
    images: Path,
    *,
    subject_ids: Sequence[int] | None = None,
    device: str | None = None,
    batch_size: int = 128,
    threads: int | None = None,
) -> dict[str, Any]:
    """The contract-1 body for every image in `images` (or those of `subject_ids`).

    Probabilities are per class name of model.json; `training_subjects` lists those predicted
    subjects the model was trained on (the route keeps them but never counts them as votes).
    """
    net, info = load_model(model_dir)
    files = common.image_index(images)
    if subject_ids is not None:
        absent = [s for s in subject_ids if s not in files]
        if absent:
            raise InputError(f"no image for subjects {absent[:10]} in {images}", field="images")
        files = {s: files[s] for s in subject_ids}
    ids = sorted(files)
    if not ids:
        raise InputError(f"no images named <subject id>.<extension> in {images}", "images")
    common.set_threads(threads)
    classes = list(net.arch.classes)
    probs = predict_proba(
        net,
        load_pixels([files[s] for s in ids], net.arch.image_size),
        batch_size=batch_size,
        device=common.choose_device(device),
    )
    training = set(info.get("training_subjects") or [])
    return {
        "model": info["model"],
        "version": info["version"],
        "export_id": info.get("export_id"),
        "training_subjects": sorted(training.intersection(ids)) or None,
        "predictions": [
            {
                "subject_id": s,
                "probabilities": {c: float(p) for c, p in zip(classes, row, strict=True)},
                "boxes": None,
            }
            for s, row in zip(ids, probs, strict=True)
        ],
    }
