"""`gzx demo --loop`: the whole loop on a synthetic sky, offline, through the real service.

Simulated volunteers classify seeded galaxy images (`app.sky`); gzx aggregates and retires them;
the retired subjects are exported; a model is trained on the export (the `train` extra); its
predictions come back through `POST /v1/workflows/{id}/predictions` as a machine volunteer; and
new subjects are classified twice by the same simulated crowd, once with the machine's votes and
once without, to count the human classifications each retired subject costs.

Two machines, two workflows:

- `detector` (issue 6): a Clump-Scout-like drawing workflow ("click every clump", a point tool
  whose clicks become boxes); torchvision's Faster R-CNN trained on the COCO export; its boxes
  are the machine's marks. Accuracy = completeness and purity of the kept clusters against the
  clumps the generator drew.
- `classifier` (issue 8): a Galaxy-Zoo-like question ("smooth or featured?"); the rotation-
  invariant CNN trained on the labels export; its class probabilities are the machine's answer.
  Accuracy = the retired label against the generator's morphology.

Phases, per machine:

1. bootstrap: `n_train` subjects in workflow A, classified by humans until retired or at the cap;
   a refit; an export of the retired subjects; training on it.
2. evaluation: `n_eval` new subjects (plus `n_gold` gold subjects the researcher labelled),
   classified in workflow B by humans alone and in workflow C after the machine's predictions
   arrive (a refit then learns the machine's skill on the gold subjects like anyone's). Both arms
   see the same crowd with the same random stream. The model never votes on its training
   subjects (they are not in B or C, and the predictions name them).

The crowd is simulated round by round: in each round every subject still shown gets one more
classification from a volunteer (by Zipf activity) who has not seen it; retirements are polled
after each round, as Panoptes' subject selector would learn of them. Everything is seeded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.table import Table

from app import sky
from app.db import migrate
from app.demo import _auth_headers, _check, _serving, _settle, demo_config, simulate_crowd
from app.errors import InputError
from app.service import Service, build_service
from app.settings import Settings

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

MACHINES = ("detector", "classifier")
CLASSES = sky.MORPHOLOGIES
SUBJECT_BASE = 70_000_000
USER_BASE = 3_000_000
CLASSIFICATION_BASE = 800_000_000
STARTED_AT = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
MARK_RISK_BOUND = 0.2
WORKFLOWS = {"detector": (11, 12, 13), "classifier": (21, 22, 23)}  # bootstrap, humans, machine


@dataclass(frozen=True)
class LoopSizes:
    """How big one run is; the defaults take a few minutes on a laptop CPU."""

    n_train: int = 240
    n_eval: int = 160
    n_gold: int = 24
    n_volunteers: int = 80
    image_size: int = 64
    cap: int = 10
    epochs: int = 8
    seed: int = 0
    # The machine arm's marks risk bound (None: the same as the humans'); a tighter one trades
    # some of the saving for accuracy, to compare the two arms at equal accuracy.
    machine_mark_risk_bound: float | None = None


@dataclass
class ArmResult:
    """One evaluation arm: what the humans spent and how right gzx ended up."""

    arm: str
    subjects: int
    human_classifications: int
    retired: int
    at_cap: int
    live: int
    accuracy: float  # classifier: label accuracy; detector: F1 of kept clusters vs the clumps
    completeness: float | None = None
    purity: float | None = None
    machine_votes: int = 0

    @property
    def per_retired(self) -> float:
        """Human classifications per subject retired by the rule (the effort measure)."""
        return self.human_classifications / self.retired if self.retired else float("nan")

    @property
    def per_subject(self) -> float:
        return self.human_classifications / self.subjects if self.subjects else float("nan")


@dataclass
class LoopReport:
    machine: str
    sizes: LoopSizes
    bootstrap_human_classifications: int
    export_counts: dict[str, Any]
    model_metrics: dict[str, Any]
    humans: ArmResult
    with_machine: ArmResult
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def effort_ratio(self) -> float:
        """Human classifications per retired subject without the machine / with it."""
        return self.humans.per_retired / self.with_machine.per_retired

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for arm in ("humans", "with_machine"):
            result: ArmResult = getattr(self, arm)
            data[arm]["per_retired"] = result.per_retired
            data[arm]["per_subject"] = result.per_subject
        data["effort_ratio"] = self.effort_ratio
        return data


# --- the simulated crowd -----------------------------------------------------------------------


@dataclass(frozen=True)
class MarkSkill:
    """How each simulated volunteer clicks clumps: P(miss a clump), false clicks per image
    (Poisson mean), click scatter (pixels)."""

    p_miss: FloatArray
    false_rate: FloatArray
    sigma: FloatArray


def simulate_markers(rng: np.random.Generator, kinds: Sequence[str]) -> MarkSkill:
    """Click skill by the answer crowd's kinds: good volunteers find most clumps; spammers click
    at random; adversaries click where nothing is."""
    n = len(kinds)
    p_miss = rng.uniform(0.05, 0.35, n)
    false_rate = rng.uniform(0.02, 0.25, n)
    sigma = rng.uniform(0.6, 1.6, n)
    for u, kind in enumerate(kinds):
        if kind == "mediocre":
            p_miss[u], false_rate[u] = rng.uniform(0.3, 0.6), rng.uniform(0.2, 0.6)
        elif kind in ("spammer", "adversary"):
            p_miss[u], false_rate[u] = rng.uniform(0.7, 1.0), rng.uniform(0.5, 2.0)
    return MarkSkill(p_miss, false_rate, sigma)


class Platform:
    """The platform's side for one workflow: who may see which subject, and the counts.

    A subject is shown while it is not known to be retired and has fewer than `cap` human
    classifications; a volunteer sees a subject at most once.
    """

    def __init__(self, n_subjects: int, n_volunteers: int, cap: int) -> None:
        self.cap = cap
        self.counts = np.zeros(n_subjects, dtype=np.int64)
        self.retired = np.zeros(n_subjects, dtype=bool)
        self.seen = np.zeros((n_volunteers, n_subjects), dtype=bool)

    def showable(self) -> BoolArray:
        shown: BoolArray = ~self.retired & (self.counts < self.cap)
        return shown

    def round(self, rng: np.random.Generator, activity: FloatArray) -> list[tuple[int, int]]:
        """(volunteer, subject) pairs: one more classification for every subject still shown."""
        pairs = []
        for s in np.flatnonzero(self.showable()):
            weights = np.where(self.seen[:, s], 0.0, activity)
            if weights.sum() <= 0:
                continue
            u = int(rng.choice(weights.size, p=weights / weights.sum()))
            self.seen[u, s] = True
            self.counts[s] += 1
            pairs.append((u, int(s)))
        return pairs


# --- workflows and payloads --------------------------------------------------------------------


def point_size(images: Sequence[sky.SkyImage]) -> float:
    """The box a click stands for: the median clump box side, at least 3 pixels."""
    sides = [max(b[2] - b[0], b[3] - b[1]) for image in images for b in image.clumps]
    return float(max(3.0, np.median(sides))) if sides else 5.0


def workflow_config(
    machine: str, cap: int, box: float, mark_risk_bound: float = MARK_RISK_BOUND
) -> dict[str, Any]:
    """Clump Scout-like (detector) or Galaxy-Zoo-like (classifier) workflow configuration."""
    retirement: dict[str, Any] = {"min_views": 2, "cap": cap}
    if machine == "detector":
        return {
            "name": "Synthetic sky: click the clumps",
            "drawing": {
                "task": "T1",
                "tools": [
                    {
                        "index": 0,
                        "type": "point",
                        "label": "Clump",
                        "category": "clump",
                        "box_size": [box, box],
                    }
                ],
            },
            "retirement": {**retirement, "mark_risk_bound": mark_risk_bound},
            "exports": {"max_expected_missed": 0.3},
        }
    return {
        "name": "Synthetic sky: smooth or featured?",
        "classes": list(CLASSES),
        "question": demo_config(cap)["question"],  # Galaxy Zoo's first question, as the demo's
        "retirement": {**retirement, "kind": "risk", "risk_bound": 0.02},
        # Export what the rule retired: the answer bounds match the risk bound.
        "exports": {"answer_bounds": [0.02, 0.98]},
    }


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def classification(
    number: int,
    workflow_id: int,
    subject_id: int,
    user_id: int | None,
    annotation: dict[str, Any],
    size: int,
) -> dict[str, Any]:
    """One classic-front-end classification object."""
    created = STARTED_AT + timedelta(seconds=7 * number)
    return {
        "id": str(CLASSIFICATION_BASE + number),
        "created_at": _stamp(created),
        "workflow_version": "1.1",
        "annotations": [annotation],
        "metadata": {
            "started_at": _stamp(created - timedelta(seconds=6)),
            "finished_at": _stamp(created),
            "subject_dimensions": [
                {
                    "clientWidth": size,
                    "clientHeight": size,
                    "naturalWidth": size,
                    "naturalHeight": size,
                }
            ],
        },
        "links": {
            "project": "1",
            "workflow": str(workflow_id),
            "user": None if user_id is None else str(user_id),
            "subjects": [str(subject_id)],
        },
    }


def subject_sideload(image: sky.SkyImage, images_dir: Path) -> dict[str, Any]:
    path = images_dir / f"{image.subject_id}.png"
    return {
        "id": str(image.subject_id),
        "locations": [{"image/png": path.as_uri()}],
        "metadata": {"synthetic": True},
    }


class Crowd:
    """The simulated volunteers: answer confusion, click skill, activity, logins."""

    def __init__(self, rng: np.random.Generator, n: int) -> None:
        answers = simulate_crowd(rng, n)
        self.confusion = answers.confusion
        self.activity = answers.activity
        self.anonymous = answers.anonymous
        self.kinds = answers.kind
        self.marks = simulate_markers(rng, answers.kind)

    @property
    def size(self) -> int:
        return int(self.activity.size)

    def annotation(
        self, rng: np.random.Generator, machine: str, u: int, image: sky.SkyImage
    ) -> dict[str, Any]:
        if machine == "classifier":
            truth = CLASSES.index(image.morphology)
            answer = int(rng.choice(len(CLASSES), p=self.confusion[u, truth]))
            return {"task": "T0", "value": answer}
        skill = self.marks
        size = image.pixels.shape[0]
        clicks = []
        for x1, y1, x2, y2 in image.clumps:
            if rng.random() < skill.p_miss[u]:
                continue
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            clicks.append((cx + rng.normal(0, skill.sigma[u]), cy + rng.normal(0, skill.sigma[u])))
        for _ in range(int(rng.poisson(skill.false_rate[u]))):
            # False clicks land on the galaxy (where a volunteer looks), not on the empty sky.
            r = rng.uniform(0, size * 0.3)
            t = rng.uniform(0, 2 * np.pi)
            clicks.append((size / 2 + r * np.cos(t), size / 2 + r * np.sin(t)))
        value = [
            {
                "x": float(np.clip(x, 0, size - 1)),
                "y": float(np.clip(y, 0, size - 1)),
                "tool": 0,
                "frame": 0,
                "details": [],
            }
            for x, y in clicks
        ]
        return {"task": "T1", "value": value}


# --- one run -----------------------------------------------------------------------------------


@dataclass
class Trainer:
    """How the loop trains and predicts (the `train` extra): functions over directories."""

    train: Callable[[str, Path, Path, Path, LoopSizes], dict[str, Any]]
    predict: Callable[[str, Path, Path, Sequence[int], str, dict[str, str]], int]


class Loop:
    """One machine's loop against a running gzx (the client's base URL)."""

    def __init__(
        self,
        machine: str,
        client: httpx.Client,
        service: Service,
        url: str,
        workdir: Path,
        sizes: LoopSizes,
        trainer: Trainer,
        console: Console,
    ) -> None:
        if machine not in MACHINES:
            raise InputError(f"machine must be one of {', '.join(MACHINES)}", field="machine")
        self.machine = machine
        self.client = client
        self.service = service
        self.url = url
        self.sizes = sizes
        self.trainer = trainer
        self.console = console
        self.images_dir = workdir / "images"
        self.workdir = workdir
        offset = 0 if machine == "detector" else 1_000_000
        self.number = offset * 10  # classification ids: each machine's loop has its own range
        n_all = sizes.n_train + sizes.n_eval + sizes.n_gold
        self.images = sky.generate(
            n_all, size=sizes.image_size, seed=sizes.seed, first_id=SUBJECT_BASE + offset
        )
        sky.write_images(self.images, self.images_dir)
        self.train_images = self.images[: sizes.n_train]
        self.eval_images = self.images[sizes.n_train : sizes.n_train + sizes.n_eval]
        self.gold_images = self.images[sizes.n_train + sizes.n_eval :]
        self.box = point_size(self.images)

    # -- HTTP helpers

    def _configure(self, workflow_id: int, mark_risk_bound: float = MARK_RISK_BOUND) -> None:
        config = workflow_config(self.machine, self.sizes.cap, self.box, mark_risk_bound)
        _check(self.client.put(f"/v1/workflows/{workflow_id}", json=config))

    def _gold(self, workflow_id: int) -> None:
        entries = []
        for image in self.gold_images:
            if self.machine == "classifier":
                entries.append({"subject_id": image.subject_id, "label": image.morphology})
            else:
                # An expert's clicks, turned into boxes the way the point tool turns anyone's.
                half = self.box / 2
                boxes = [
                    [
                        (x1 + x2) / 2 - half,
                        (y1 + y2) / 2 - half,
                        (x1 + x2) / 2 + half,
                        (y1 + y2) / 2 + half,
                    ]
                    for x1, y1, x2, y2 in image.clumps
                ]
                entries.append({"subject_id": image.subject_id, "boxes": boxes})
        _check(self.client.put(f"/v1/workflows/{workflow_id}/gold", json={"subjects": entries}))

    def _refit(self, workflow_id: int) -> None:
        _check(self.client.post(f"/v1/workflows/{workflow_id}/refit"))
        _settle(self.service)

    def _retired(self, workflow_id: int) -> set[int]:
        stats = _check(self.client.get(f"/v1/workflows/{workflow_id}/stats"))
        return {int(s) for s in stats.get("retired_ids", [])}

    # -- the crowd

    def classify(
        self, workflow_id: int, images: Sequence[sky.SkyImage], crowd: Crowd, seed: int
    ) -> int:
        """Humans classify `images` in rounds until each is retired or at the cap."""
        rng = np.random.default_rng(seed)
        platform = Platform(len(images), crowd.size, self.sizes.cap)
        position = {image.subject_id: i for i, image in enumerate(images)}
        spent = 0
        rounds = 0
        while True:
            pairs = platform.round(rng, crowd.activity)
            if not pairs:
                break
            batch = []
            for u, s in pairs:
                image = images[s]
                self.number += 1
                user = None if crowd.anonymous[u] else USER_BASE + u
                annotation = crowd.annotation(rng, self.machine, u, image)
                batch.append(
                    classification(
                        self.number,
                        workflow_id,
                        image.subject_id,
                        user,
                        annotation,
                        self.sizes.image_size,
                    )
                )
            linked = {"subjects": [subject_sideload(images[s], self.images_dir) for _, s in pairs]}
            body = {"classifications": batch, "linked": linked}
            _check(self.client.post("/v1/classifications", json=body))
            _settle(self.service)
            spent += len(pairs)
            rounds += 1
            if rounds % 3 == 0:
                self._refit(workflow_id)
            for subject_id in self._retired(workflow_id):
                if subject_id in position:
                    platform.retired[position[subject_id]] = True
        self._refit(workflow_id)
        return spent

    # -- phases

    def bootstrap(self, crowd: Crowd) -> tuple[int, Path, dict[str, Any]]:
        workflow_id = WORKFLOWS[self.machine][0]
        self._configure(workflow_id)
        self._gold(workflow_id)
        spent = self.classify(workflow_id, self.train_images, crowd, self.sizes.seed + 1)
        export = _check(self.client.post(f"/v1/workflows/{workflow_id}/exports", json={}))
        export_id = export["id"]
        deadline = time.monotonic() + 300
        while True:
            state = _check(self.client.get(f"/v1/exports/{export_id}"))
            if state["status"] == "done":
                break
            if state["status"] == "failed" or time.monotonic() > deadline:
                raise InputError(f"export {export_id} did not finish: {state}", field="export")
            time.sleep(0.2)
        export_dir = self.workdir / f"export-{self.machine}"
        export_dir.mkdir(parents=True, exist_ok=True)
        for name in state.get("files", []):
            response = self.client.get(f"/v1/exports/{export_id}/files/{name}")
            response.raise_for_status()
            (export_dir / name).write_bytes(response.content)
        return spent, export_dir, state

    def evaluate(self, crowd: Crowd, model_dir: Path | None) -> ArmResult:
        index = 2 if model_dir is not None else 1
        workflow_id = WORKFLOWS[self.machine][index]
        bound = self.sizes.machine_mark_risk_bound
        self._configure(workflow_id, bound if bound is not None and model_dir else MARK_RISK_BOUND)
        self._gold(workflow_id)
        machine_votes = 0
        if model_dir is not None:
            ids = [image.subject_id for image in [*self.eval_images, *self.gold_images]]
            machine_votes = self.trainer.predict(
                self.machine,
                model_dir,
                self.images_dir,
                ids,
                f"{self.url.rstrip('/')}/v1/workflows/{workflow_id}/predictions",
                dict(self.client.headers),
            )
            _settle(self.service)
            self._refit(workflow_id)
        spent = self.classify(workflow_id, self.eval_images, crowd, self.sizes.seed + 2)
        return self.score(
            workflow_id, "with machine" if model_dir else "humans", spent, machine_votes
        )

    def score(self, workflow_id: int, arm: str, spent: int, machine_votes: int) -> ArmResult:
        retired = at_cap = live = 0
        right = 0
        found = truth_total = kept_total = true_kept = 0
        for image in self.eval_images:
            response = self.client.get(f"/v1/workflows/{workflow_id}/subjects/{image.subject_id}")
            if response.status_code == 404:
                live += 1
                continue
            state = _check(response)
            status, reason = state.get("status"), state.get("reason")
            if status in ("retired", "contested"):
                if reason == "classification_count":
                    at_cap += 1
                else:
                    retired += 1
            else:
                live += 1
            if self.machine == "classifier":
                right += int(state.get("label") == image.morphology)
                continue
            boxes = [c for c in state.get("clusters", []) if c.get("kept")]
            hit, matched = _match(boxes, image.clumps, self.box)
            found += matched
            truth_total += len(image.clumps)
            kept_total += len(boxes)
            true_kept += hit
        n = len(self.eval_images)
        if self.machine == "classifier":
            return ArmResult(
                arm, n, spent, retired, at_cap, live, right / n, machine_votes=machine_votes
            )
        completeness = found / truth_total if truth_total else 1.0
        purity = true_kept / kept_total if kept_total else 1.0
        f1 = 2 * completeness * purity / (completeness + purity) if completeness + purity else 0.0
        return ArmResult(
            arm, n, spent, retired, at_cap, live, f1, completeness, purity, machine_votes
        )

    def run(self) -> LoopReport:
        seconds: dict[str, float] = {}
        crowd = Crowd(np.random.default_rng(self.sizes.seed), self.sizes.n_volunteers)
        began = time.perf_counter()
        self.console.print(
            f"[bold]{self.machine}[/bold]: {self.sizes.n_train} bootstrap + "
            f"{self.sizes.n_eval} evaluation + {self.sizes.n_gold} gold galaxies "
            f"({self.sizes.image_size} px), {crowd.size} simulated volunteers"
        )
        spent, export_dir, export = self.bootstrap(crowd)
        seconds["bootstrap"] = time.perf_counter() - began
        self.console.print(
            f"  bootstrap: {spent:,} human classifications; export {export['id']} "
            f"({export.get('manifest', {}).get('counts', {})})"
        )
        began = time.perf_counter()
        model_dir = self.workdir / f"model-{self.machine}"
        metrics = self.trainer.train(
            self.machine, export_dir, self.images_dir, model_dir, self.sizes
        )
        seconds["train"] = time.perf_counter() - began
        self.console.print(f"  trained in {seconds['train']:.0f} s: {_short(metrics)}")
        began = time.perf_counter()
        humans = self.evaluate(crowd, None)
        seconds["humans"] = time.perf_counter() - began
        began = time.perf_counter()
        with_machine = self.evaluate(crowd, model_dir)
        seconds["with_machine"] = time.perf_counter() - began
        return LoopReport(
            self.machine,
            self.sizes,
            spent,
            dict(export.get("manifest", {}).get("counts", {})),
            metrics,
            humans,
            with_machine,
            seconds,
        )


def _short(metrics: dict[str, Any]) -> str:
    keys = ("completeness", "purity", "accuracy", "high_agreement_accuracy")
    shown = {k: metrics[k] for k in keys if isinstance(metrics.get(k), int | float)}
    return ", ".join(f"{k} {v:.3f}" for k, v in shown.items()) or "no validation metrics"


def _match(
    clusters: Sequence[dict[str, Any]],
    clumps: Sequence[tuple[float, float, float, float]],
    box: float,
) -> tuple[int, int]:
    """(kept clusters that are a clump, clumps found): a cluster is a clump when its centre is
    within a click box's side of the clump's centre; each clump is matched once."""
    free = [((x1 + x2) / 2, (y1 + y2) / 2) for x1, y1, x2, y2 in clumps]
    hits = 0
    for cluster in clusters:
        x1, y1, x2, y2 = cluster["box"]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        best = None
        for j, (x, y) in enumerate(free):
            d = float(np.hypot(cx - x, cy - y))
            if d <= box and (best is None or d < best[0]):
                best = (d, j)
        if best is not None:
            hits += 1
            free.pop(best[1])
    return hits, len(clumps) - len(free)


def print_loop_report(console: Console, report: LoopReport) -> None:
    table = Table(
        title=f"{report.machine}: human effort with and without the machine volunteer",
        title_justify="left",
    )
    table.add_column("arm")
    table.add_column("human classifications", justify="right")
    table.add_column("retired (rule)", justify="right")
    table.add_column("at cap", justify="right")
    table.add_column("per retired subject", justify="right")
    table.add_column(
        "accuracy" if report.machine == "classifier" else "F1 (compl./purity)", justify="right"
    )
    for arm in (report.humans, report.with_machine):
        quality = f"{arm.accuracy:.1%}"
        if arm.completeness is not None and arm.purity is not None:
            quality += f" ({arm.completeness:.1%}/{arm.purity:.1%})"
        table.add_row(
            arm.arm,
            f"{arm.human_classifications:,}",
            str(arm.retired),
            str(arm.at_cap),
            f"{arm.per_retired:.2f}",
            quality,
        )
    console.print(table)
    console.print(
        f"human classifications per retired subject: {report.effort_ratio:.2f}x fewer with the "
        f"machine ({report.with_machine.machine_votes} machine votes)"
    )


def run_loop(
    settings: Settings,
    workdir: Path,
    *,
    machines: Sequence[str] = MACHINES,
    sizes: LoopSizes = LoopSizes(),
    host: str = "127.0.0.1",
    port: int = 0,
    trainer: Trainer | None = None,
    console: Console | None = None,
) -> list[LoopReport]:
    """Start gzx on the embedded default and run each machine's loop; print and return them."""
    console = console or Console()
    trainer = trainer or torch_trainer()
    settings = settings.model_copy(update={"redis_url": None})
    headers = _auth_headers(settings, host)
    workdir.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    service = build_service(settings)
    reports = []
    try:
        with (
            _serving(service.app, host, port) as server,
            httpx.Client(base_url=server.url, headers=headers, timeout=120) as client,
        ):
            console.print(f"gzx is up at {server.url} (in-process jobs); closing the loop")
            for machine in machines:
                loop = Loop(
                    machine, client, service, server.url, workdir / machine, sizes, trainer, console
                )
                report = loop.run()
                print_loop_report(console, report)
                reports.append(report)
    finally:
        service.close()
    (workdir / "loop-report.json").write_text(
        json.dumps([r.to_json() for r in reports], indent=2, default=float)
    )
    return reports


def torch_trainer() -> Trainer:
    """The trainers of the `train` extra; a clear error when it is not installed."""
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError:
        raise InputError(
            "the loop trains a model: install the train extra (pip install 'gzx[train]')",
            field="machine",
        ) from None
    from app.train import classifier, common, detector

    def train(
        machine: str, export_dir: Path, images: Path, out: Path, sizes: LoopSizes
    ) -> dict[str, Any]:
        if machine == "detector":
            return detector.train(
                export_dir,
                images,
                out,
                epochs=sizes.epochs,
                seed=sizes.seed,
                name="loop-frcnn",
                version="1",
                log=lambda _line: None,
            )
        return classifier.train_classifier(
            export_dir,
            images,
            out,
            epochs=sizes.epochs,
            seed=sizes.seed,
            name="loop-cnn",
            version="1",
            image_size=sizes.image_size,
        )

    def predict(
        machine: str,
        model_dir: Path,
        images: Path,
        subject_ids: Sequence[int],
        url: str,
        headers: dict[str, str],
    ) -> int:
        if machine == "detector":
            body = detector.predict(model_dir, images, subjects=subject_ids)
        else:
            body = classifier.predict_directory(model_dir, images, subject_ids=subject_ids)
        # The model was trained on another workflow's export: name its subjects instead of the
        # export (they are never voted on; here none of them is among `subject_ids` anyway).
        manifest = json.loads(
            (model_dir.parent / f"export-{machine}" / "manifest.json").read_text()
        )
        body["export_id"] = None
        body["training_subjects"] = [*manifest["subjects"]["train"], *manifest["subjects"]["val"]]
        token = headers.get("authorization", "").removeprefix("Bearer ") or None
        answers = common.post_predictions(url, token, body)
        return sum(int(a.get("accepted", 0)) for a in answers)

    return Trainer(train, predict)
