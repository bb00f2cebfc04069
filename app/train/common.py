"""What every trainer needs: the torch device, threads and seeds, images found by subject id, model
directories (contract 3), and predictions posted to gzx in chunks (contract 1).

torch is imported inside the functions that need it, so this module (and `gzx --help`) loads
without the `train` extra; `import_torch` turns a missing extra into a message saying how to
install it.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from app.errors import InputError, Unavailable

IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "gif", "bmp", "tif", "tiff", "webp"})
MODEL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
MODEL_VERSION = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")
CHUNK = 1000  # predictions a request (the route takes at most 10,000)


def import_torch() -> ModuleType:
    """torch, or an error that says to install the extra (rather than a bare ImportError)."""
    try:
        import torch
    except ImportError as error:  # pragma: no cover - CI always has the extra
        raise Unavailable(
            "torch is not installed: pip install 'gzx[train]'", field="extra"
        ) from error
    return torch


def choose_device(prefer: str | None = None) -> Any:
    """CUDA when present (or `prefer`, e.g. "cpu"), else the CPU."""
    torch = import_torch()
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(threads: int | None = None) -> int:
    """Intra-op threads for CPU work: `threads`, else GZX_TORCH_THREADS, else the cores this
    process may use (at most 8: more rarely helps these small convolutions and starves other
    processes on a shared machine). Returns the number set."""
    torch = import_torch()
    if threads is None:
        env = os.environ.get("GZX_TORCH_THREADS")
        threads = int(env) if env else min(8, len(os.sched_getaffinity(0)))
    threads = max(1, threads)
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    """One seed for Python, numpy and torch (CPU and CUDA): initial weights and shuffles repeat."""
    torch = import_torch()
    random.seed(seed)
    np.random.seed(seed % 2**32)  # libraries that use the global state
    torch.manual_seed(seed)


def validate_name(name: str, version: str) -> None:
    """The model name and version as contract 1 accepts them."""
    if not MODEL_NAME.match(name):
        raise InputError("name must match ^[A-Za-z0-9_.-]{1,100}$", field="name")
    if not MODEL_VERSION.match(version):
        raise InputError("version must match ^[A-Za-z0-9_.+-]{1,64}$", field="version")


def utc_version() -> str:
    """A default model version: the UTC time, e.g. 20261125.143005 (a new one is a new
    volunteer)."""
    return datetime.now(UTC).strftime("%Y%m%d.%H%M%S")


# --- images -------------------------------------------------------------------------------------


def image_index(directory: Path) -> dict[int, Path]:
    """Subject id -> image file, for files named `<subject id>.<image extension>`."""
    if not directory.is_dir():
        raise InputError(f"{directory} is not a directory", field="images")
    found: dict[int, Path] = {}
    for path in sorted(directory.iterdir()):
        stem, _, extension = path.name.rpartition(".")
        if stem.isdigit() and extension.lower() in IMAGE_EXTENSIONS and path.is_file():
            found.setdefault(int(stem), path)
    return found


def find_image(directory: Path, index: dict[int, Path], subject_id: int, file_name: str) -> Path:
    """The export's file name when it is there, else any image of that subject (a folder of PNGs
    serves an export whose locations were JPEGs)."""
    exact = directory / file_name
    if exact.is_file():
        return exact
    if subject_id in index:
        return index[subject_id]
    raise InputError(f"no image for subject {subject_id} ({file_name}) in {directory}", "images")


def load_image(path: Path) -> np.ndarray:
    """(height, width, 3) uint8 RGB."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def to_tensor(pixels: np.ndarray) -> Any:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [0, 1]."""
    torch = import_torch()
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).float().div_(255.0)


def read_subject_ids(path: Path) -> list[int]:
    """Subject ids from a file, one a line (blank lines and # comments skipped)."""
    ids = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not text.isdigit():
            raise InputError(f"line {number} of {path} is not a subject id", field="subjects")
        ids.append(int(text))
    return ids


def batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- model directories (contract 3) ---------------------------------------------------------------


def dumps(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=True) + "\n"


def write_model_dir(
    out: Path,
    *,
    state_dict: dict[str, Any],
    arch: dict[str, Any],
    metrics: dict[str, Any],
    info: dict[str, Any],
) -> None:
    """MODEL_DIR/model.pt ({"state_dict", "arch"}), metrics.json and model.json."""
    torch = import_torch()
    out.mkdir(parents=True, exist_ok=True)
    cpu_state = {k: v.detach().cpu() for k, v in state_dict.items()}
    torch.save({"state_dict": cpu_state, "arch": arch}, out / "model.pt")
    (out / "metrics.json").write_text(dumps(metrics))
    (out / "model.json").write_text(dumps(info))


def read_model_dir(model_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model.json, model.pt's {"state_dict", "arch"}) of a model directory."""
    torch = import_torch()
    info_path, weights = model_dir / "model.json", model_dir / "model.pt"
    if not info_path.is_file() or not weights.is_file():
        raise InputError(f"{model_dir} has no model.json and model.pt", field="model_dir")
    info = json.loads(info_path.read_text())
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    return info, saved


# --- posting predictions (contract 1) -------------------------------------------------------------


def post_predictions(
    url: str,
    token: str | None,
    body: dict[str, Any],
    *,
    chunk: int = CHUNK,
    attempts: int = 4,
    timeout_s: float = 120.0,
) -> list[dict[str, Any]]:
    """POST `body` to the predictions URL, its `predictions` split into chunks of `chunk`.

    Every chunk repeats the model, version, export and threshold. A chunk that meets a network
    error or a 5xx is sent again after a backoff (1, 2, 4 s): the route counts a repeated subject
    of the same model version as a duplicate and changes nothing, so a retry is safe. A 4xx stops
    with the server's message. Returns the server's answer to each chunk.
    """
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    predictions = list(body.get("predictions") or [])
    head = {k: v for k, v in body.items() if k != "predictions"}
    answers = []
    with httpx.Client(timeout=timeout_s) as client:
        for part in batches(predictions, max(1, chunk)) if predictions else [[]]:
            payload = {**head, "predictions": list(part)}
            for attempt in range(attempts):
                try:
                    response = client.post(url, json=payload, headers=headers)
                except httpx.TransportError as error:
                    if attempt == attempts - 1:
                        raise Unavailable(f"could not reach {url}: {error}", "post") from error
                    time.sleep(2.0**attempt)
                    continue
                if response.status_code >= 500 and attempt < attempts - 1:
                    time.sleep(2.0**attempt)
                    continue
                if response.status_code >= 400:
                    raise InputError(
                        f"{url} answered {response.status_code}: {response.text[:500]}", "post"
                    )
                answers.append(response.json())
                break
    return answers


def describe_answers(answers: Sequence[dict[str, Any]]) -> str:
    """One line summing the server's answers: who the machine is and what was entered."""
    volunteer = next((a.get("volunteer") for a in answers if a.get("volunteer")), "?")
    totals = {
        key: sum(int(a.get(key, 0)) for a in answers)
        for key in ("accepted", "in_training", "duplicates")
    }
    return (
        f"{volunteer}: {totals['accepted']} accepted, {totals['in_training']} in training, "
        f"{totals['duplicates']} duplicates ({len(answers)} requests)"
    )
