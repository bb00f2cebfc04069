"""Exports: immutable, reproducible training sets of reliable labels, with a manifest.

An export reads one consistent view of a workflow (one REPEATABLE READ transaction on PostgreSQL)
and writes, into `settings.export_dir/<export id>/`:

    coco_train.json, coco_val.json  COCO detection sets (drawing task): one image per subject,
                                    file_name "<subject id>.<extension of its location>", bbox
                                    [x, y, w, h] from the top-left corner, one category per tool,
                                    score = P(real); unresolved clusters as ignore regions
                                    (iscrowd 1); confidently empty subjects with no annotation
    labels.csv, labels.parquet      subject, split, status, reason, label, votes, P per class,
                                    boxes and ignore regions kept
    skills.csv                      every volunteer with a view: confusion matrix with 90%
                                    intervals and bits per vote; mark skills with 90% intervals
    manifest.json                   config hash, skill and mark snapshots, rules, counts, subject
                                    ids per split, expected purity and completeness, file hashes

Which subjects and boxes are kept is `app.workflows.ExportRules` (algorithms.md 7.7): purity
matters more than volume for a detector (Popp et al. 2024). Expected label purity is the mean
P(real) of the exported boxes; expected completeness is 1 - E[missed] / (boxes + E[missed]), with
E[missed] summed from the kept subjects' `marks_risk`.

Reproducible: the same stored state and rules give byte-identical files. Everything is sorted
(subjects by id, clusters by their content, volunteers by id), floats are written with a fixed
rounding, and no file holds a time or the export's id (those live in the `exports` row).
Streaming: subjects and clusters are read by two server-side cursors in subject order and merged,
`CHUNK` rows at a time; COCO's images and annotations go to spool files that are then concatenated,
so memory stays flat as the workflow grows (8 bytes per kept subject for the manifest's ids).

Written once, whoever dies: a writer claims an export in one UPDATE and keeps a heartbeat while
it writes; a schedule queues again an export whose writer stopped beating for longer than the
lease, and only a writer that still holds its claim may mark it done and move its files into
place. The export-done webhook is recorded on the row and retried with the effects' backoff.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import shutil
import threading
import uuid
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError
from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app import aggregation, answers, clusters, effects, marks
from app.errors import Conflict, InputError, NotFound
from app.models import (
    Cluster,
    Export,
    Subject,
    View,
    Volunteer,
    Workflow,
    WorkflowSubject,
    as_utc,
    utcnow,
)
from app.settings import Settings
from app.workflows import ExportRules, WorkflowConfig, load_config

log = logging.getLogger("gzx.exports")

FORMAT_VERSION = 1
CHUNK = 2000
MANIFEST = "manifest.json"
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
EXPORT_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MEDIA_TYPES = {
    ".json": "application/json",
    ".csv": "text/csv; charset=utf-8",
    ".parquet": "application/vnd.apache.parquet",
}
MIME_EXTENSIONS = {"image/jpeg": "jpg", "image/jpg": "jpg", "image/png": "png", "image/gif": "gif"}


def _prob(x: float) -> float:
    return round(float(x), 6)


# --- rules and rows ----------------------------------------------------------------------------


def resolve_rules(config: WorkflowConfig, body: Any) -> ExportRules:
    """The workflow's default rules overridden by the request's; InputError names a bad field."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise InputError("export rules must be a JSON object", field="body")
    try:
        return ExportRules.model_validate({**config.exports.rules().model_dump(), **body})
    except ValidationError as error:
        first = error.errors()[0]
        name = ".".join(str(part) for part in first["loc"]) or "body"
        raise InputError(f"{name}: {first['msg']}", field=name) from None


def create_export(session: Session, workflow_id: int, rules: ExportRules) -> str:
    """A queued export row for `workflow_id`; the caller commits, then runs `write_export`."""
    workflow = session.get(Workflow, workflow_id)
    if workflow is None or workflow.config is None:
        raise NotFound(f"workflow {workflow_id} is not configured", field="workflow_id")
    export_id = str(uuid.uuid4())
    session.add(
        Export(
            id=export_id,
            workflow_id=workflow_id,
            status="queued",
            rules=rules.model_dump(mode="json"),
            created_at=utcnow(),
        )
    )
    return export_id


def in_validation(subject_id: int, seed: int, fraction: float) -> bool:
    """A subject's split, fixed by (seed, subject id) alone."""
    digest = hashlib.sha256(f"{seed}:{subject_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


@dataclass(frozen=True)
class Box:
    """One stored cluster, as an export reads it."""

    tool: int
    frame: int
    x1: float
    y1: float
    x2: float
    y2: float
    p_real: float
    p_off: float


@dataclass
class Verdict:
    """Whether a subject is exported, why not, and its boxes and ignore regions."""

    kept: bool
    reason: str | None = None
    boxes: list[Box] = field(default_factory=list)
    ignored: list[Box] = field(default_factory=list)
    e_missed: float = 0.0


def judge_subject(
    rules: ExportRules,
    config: WorkflowConfig,
    status: str,
    posterior: Sequence[float] | None,
    e_missed: float | None,
    boxes: Sequence[Box],
) -> Verdict:
    """Apply the selection rules to one subject (boxes of frame 0 and of the workflow's tools)."""
    if rules.retired_only and status != "retired":
        return Verdict(False, "not_retired")
    if config.question is not None:
        lo, hi = rules.answer_bounds
        if not posterior:
            return Verdict(False, "no_answer")
        if any(lo < p < hi for p in posterior):
            return Verdict(False, "answer_uncertain")
    if config.drawing is None:
        return Verdict(True)
    if e_missed is None:
        return Verdict(False, "marks_not_aggregated")
    if e_missed > rules.max_expected_missed:
        return Verdict(False, "may_miss_objects")
    lo, hi = rules.p_real_bounds
    kept = [b for b in boxes if b.p_real >= hi]
    unsure = [b for b in boxes if lo < b.p_real < hi]
    if any(b.p_off > rules.max_p_off for b in kept):
        return Verdict(False, "box_off")
    if unsure and rules.no_unresolved_cluster:
        return Verdict(False, "unresolved_cluster")
    return Verdict(True, None, kept, unsure, e_missed)


def image_name(subject_id: int, locations: Any) -> tuple[str, str | None]:
    """(file name "<subject id>.<extension>", URL) from a subject's first location."""
    url: str | None = None
    mime: str | None = None
    first = locations[0] if isinstance(locations, list) and locations else None
    if isinstance(first, dict) and first:
        mime, value = sorted(first.items())[0]
        url = value if isinstance(value, str) else None
    elif isinstance(first, str):
        url = first
    extension = None
    if url:
        path = url.split("?", 1)[0].split("#", 1)[0].rsplit("/", 1)[-1]
        if "." in path:
            extension = path.rsplit(".", 1)[1].lower()
    if not extension and mime:
        extension = MIME_EXTENSIONS.get(mime.lower(), mime.rsplit("/", 1)[-1].lower())
    extension = re.sub(r"[^a-z0-9]", "", extension or "") or "jpg"
    return f"{subject_id}.{extension}", url


# --- reading -----------------------------------------------------------------------------------


def _stream(session: Session, query: Any) -> Iterator[Sequence[Any]]:
    """Rows of a core select, `CHUNK` at a time, from a server-side cursor (no ORM loading)."""
    result = session.connection().execution_options(yield_per=CHUNK).execute(query)
    yield from result.partitions()


def _subject_rows(
    session: Session, workflow_id: int, rules: ExportRules, n_classes: int
) -> Iterator[Any]:
    """Subjects in id order; the posterior's classes and E[missed] read in SQL (no JSON here)."""
    query = (
        select(
            WorkflowSubject.subject_id,
            WorkflowSubject.status,
            WorkflowSubject.label,
            WorkflowSubject.reason,
            WorkflowSubject.n_classifications,
            WorkflowSubject.marks_risk["e_missed"].as_float().label("e_missed"),
            Subject.locations,
            Subject.width,
            Subject.height,
            *(WorkflowSubject.posterior[k].as_float().label(f"p{k}") for k in range(n_classes)),
        )
        .select_from(WorkflowSubject)
        .outerjoin(Subject, Subject.id == WorkflowSubject.subject_id)
        .where(WorkflowSubject.workflow_id == workflow_id)
        .order_by(WorkflowSubject.subject_id)
    )
    if rules.retired_only:
        query = query.where(WorkflowSubject.status == "retired")
    for chunk in _stream(session, query):
        yield from chunk


def _cluster_rows(session: Session, workflow_id: int) -> Iterator[Any]:
    query = (
        select(
            Cluster.subject_id,
            Cluster.tool,
            Cluster.frame,
            Cluster.x1,
            Cluster.y1,
            Cluster.x2,
            Cluster.y2,
            Cluster.p_real,
            Cluster.p_off,
        )
        .where(Cluster.workflow_id == workflow_id, Cluster.n_marks > 0, Cluster.tool >= 0)
        .order_by(Cluster.subject_id)
    )
    for chunk in _stream(session, query):
        yield from chunk


def subjects_with_boxes(
    session: Session, workflow_id: int, rules: ExportRules, n_classes: int
) -> Iterator[tuple[Any, list[Box]]]:
    """Subjects in id order, each with its clusters (sorted by content): a merge of two streams."""
    cluster_rows = _cluster_rows(session, workflow_id)
    pending = next(cluster_rows, None)
    for subject in _subject_rows(session, workflow_id, rules, n_classes):
        sid = subject.subject_id
        while pending is not None and pending.subject_id < sid:
            pending = next(cluster_rows, None)
        found: list[Box] = []
        while pending is not None and pending.subject_id == sid:
            _, tool, frame, x1, y1, x2, y2, p_real, p_off = pending
            found.append(Box(tool, frame, x1, y1, x2, y2, p_real, p_off))
            pending = next(cluster_rows, None)
        found.sort(key=lambda b: (b.tool, b.frame, b.x1, b.y1, b.x2, b.y2, b.p_real, b.p_off))
        yield subject, found


# --- writing -----------------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


class _CocoWriter:
    """One COCO file written in one pass: images and annotations spooled, then concatenated."""

    def __init__(self, path: Path, categories: list[dict[str, Any]]) -> None:
        self.path = path
        self.categories = categories
        self.images: IO[str] = path.with_suffix(".images").open("w")
        self.annotations: IO[str] = path.with_suffix(".annotations").open("w")
        self.n_images = 0
        self.n_annotations = 0

    def add(
        self, image: dict[str, Any], regions: Iterable[tuple[Box, int]], category: dict[int, int]
    ) -> None:
        """An image and its regions: (box, iscrowd) pairs; annotation ids count from 1."""
        self.images.write(("," if self.n_images else "") + _dumps(image))
        self.n_images += 1
        parts = []
        for box, crowd in regions:
            self.n_annotations += 1
            parts.append(_region(self.n_annotations, image["id"], box, category[box.tool], crowd))
        if parts:
            lead = "," if self.n_annotations > len(parts) else ""
            self.annotations.write(lead + ",".join(parts))

    def close(self) -> None:
        self.images.close()
        self.annotations.close()
        info = {"description": "gzx export", "version": str(FORMAT_VERSION)}
        with self.path.open("w") as out:
            out.write('{"info":' + _dumps(info) + ',"licenses":[],"categories":')
            out.write(_dumps(self.categories) + ',"images":[')
            for spool, key in ((self.images, "annotations"), (self.annotations, None)):
                with Path(spool.name).open() as handle:
                    shutil.copyfileobj(handle, out)
                Path(spool.name).unlink()
                out.write(f'],"{key}":[' if key else "]}")
            out.write("\n")


def _region(number: int, image_id: int, b: Box, category_id: int, crowd: int) -> str:
    """One COCO annotation as JSON, keys sorted; coordinates to 1e-3, probabilities to 1e-6."""
    w, h = b.x2 - b.x1, b.y2 - b.y1
    return (
        f'{{"area":{w * h:.3f},"bbox":[{b.x1:.3f},{b.y1:.3f},{w:.3f},{h:.3f}],'
        f'"category_id":{category_id},"id":{number},"image_id":{image_id},'
        f'"iscrowd":{crowd},"p_off":{b.p_off:.6f},"score":{b.p_real:.6f}}}'
    )


@dataclass
class _Tally:
    considered: int = 0
    kept: int = 0
    train: int = 0
    val: int = 0
    negatives: int = 0
    boxes: int = 0
    ignore_regions: int = 0
    other_frames_skipped: int = 0
    p_real_sum: float = 0.0
    e_missed: float = 0.0
    excluded: dict[str, int] = field(default_factory=dict)


def _label_columns(config: WorkflowConfig) -> list[str]:
    probs = [f"p_{name}" for name in config.classes]
    return ["subject_id", "split", "status", "reason", "label", "votes", *probs, "boxes", "ignore"]


def _label_schema(config: WorkflowConfig) -> pa.Schema:
    types: dict[str, pa.DataType] = {"subject_id": pa.int64(), "votes": pa.int64()}
    types |= {"boxes": pa.int64(), "ignore": pa.int64()}
    types |= {f"p_{name}": pa.float64() for name in config.classes}
    return pa.schema([(c, types.get(c, pa.string())) for c in _label_columns(config)])


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def _write_labels_chunk(
    rows: list[dict[str, Any]], config: WorkflowConfig, writer: Any, parquet: pq.ParquetWriter
) -> None:
    columns = _label_columns(config)
    writer.writerows([[_csv_value(row[c]) for c in columns] for row in rows])
    schema = _label_schema(config)
    parquet.write_table(
        pa.table(
            {c: pa.array([row[c] for row in rows], type=schema.field(c).type) for c in columns}
        )
    )


def _write_subjects(
    session: Session,
    directory: Path,
    workflow: Workflow,
    config: WorkflowConfig,
    rules: ExportRules,
) -> tuple[_Tally, dict[str, array[int]]]:
    tally = _Tally()
    ids: dict[str, array[int]] = {"train": array("q"), "val": array("q")}
    category: dict[int, int] = {}
    coco: dict[str, _CocoWriter] = {}
    if config.drawing is not None:
        tools = sorted(config.drawing.tools, key=lambda t: t.index)
        names = sorted({t.category for t in tools})
        number = {name: i + 1 for i, name in enumerate(names)}
        category = {t.index: number[t.category] for t in tools}
        categories = [{"id": number[n], "name": n, "supercategory": "object"} for n in names]
        coco = {s: _CocoWriter(directory / f"coco_{s}.json", categories) for s in ("train", "val")}
    schema = _label_schema(config)
    with (directory / "labels.csv").open("w", newline="") as labels_csv:
        writer = csv.writer(labels_csv, lineterminator="\n")
        writer.writerow(_label_columns(config))
        parquet = pq.ParquetWriter(directory / "labels.parquet", schema, compression="zstd")
        chunk: list[dict[str, Any]] = []
        K = len(config.classes)
        for subject, found in subjects_with_boxes(session, workflow.id, rules, K):
            tally.considered += 1
            on_image = [b for b in found if b.frame == 0 and b.tool in category]
            tally.other_frames_skipped += len(found) - len(on_image)
            posterior = tuple(subject[-K:]) if K and subject[-K] is not None else None
            verdict = judge_subject(
                rules, config, subject.status, posterior, subject.e_missed, on_image
            )
            if not verdict.kept:
                reason = verdict.reason or "excluded"
                tally.excluded[reason] = tally.excluded.get(reason, 0) + 1
                continue
            sid = int(subject.subject_id)
            split = "val" if in_validation(sid, rules.seed, rules.val_fraction) else "train"
            ids[split].append(sid)
            tally.kept += 1
            setattr(tally, split, getattr(tally, split) + 1)
            tally.boxes += len(verdict.boxes)
            tally.ignore_regions += len(verdict.ignored)
            tally.p_real_sum += sum(b.p_real for b in verdict.boxes)
            tally.e_missed += verdict.e_missed
            if config.drawing is not None:
                tally.negatives += not verdict.boxes and not verdict.ignored
                file_name, url = image_name(sid, subject.locations)
                image: dict[str, Any] = {"id": sid, "file_name": file_name, "coco_url": url}
                if subject.width and subject.height:
                    image["width"], image["height"] = int(subject.width), int(subject.height)
                regions = [(b, 0) for b in verdict.boxes] + [(b, 1) for b in verdict.ignored]
                coco[split].add(image, regions, category)
            chunk.append(
                {
                    "subject_id": sid,
                    "split": split,
                    "status": subject.status,
                    "reason": subject.reason,
                    "label": subject.label,
                    "votes": int(subject.n_classifications or 0),
                    "boxes": len(verdict.boxes),
                    "ignore": len(verdict.ignored),
                    **{
                        f"p_{name}": None if posterior is None else posterior[k]
                        for k, name in enumerate(config.classes)
                    },
                }
            )
            if len(chunk) >= CHUNK:
                _write_labels_chunk(chunk, config, writer, parquet)
                chunk = []
        if chunk:
            _write_labels_chunk(chunk, config, writer, parquet)
        parquet.close()
    for writer_ in coco.values():
        writer_.close()
    return tally, ids


def _skill_columns(config: WorkflowConfig) -> list[str]:
    columns = ["volunteer_id", "key", "kind", "excluded", "votes"]
    for truth in config.classes if config.question else []:
        for given in config.classes:
            name = f"confusion_{truth}_{given}"
            columns += [name, f"{name}_lo90", f"{name}_hi90"]
    if config.question:
        columns.append("bits_per_vote")
    if config.drawing:
        columns.append("marks_learned")
        for name in ("p_fn", "f", "p_fp", "sigma"):
            columns += [name, f"{name}_lo90", f"{name}_hi90"]
    return columns


def _skill_rows(
    session: Session, workflow: Workflow, config: WorkflowConfig, rows: list[Any]
) -> list[list[Any]]:
    ids = np.array([r.volunteer_id for r in rows], dtype=np.int64)
    out = [[r.volunteer_id, r.key, r.kind, str(bool(r.excluded)).lower(), r.votes] for r in rows]
    if config.question is not None:
        snapshot = aggregation.current_snapshot(session, workflow)
        skills = aggregation.skills_for(session, workflow.id, config, snapshot, ids)
        theta = answers.confusion(skills)
        lower, upper = answers.credible_intervals(skills, 0.9)
        bits = answers.information_per_vote(skills)
        K = len(config.classes)
        for i, line in enumerate(out):
            for k in range(K):
                for j in range(K):
                    line += [_prob(theta[i, k, j]), _prob(lower[i, k, j]), _prob(upper[i, k, j])]
            line.append(_prob(bits[i]))
    if config.drawing is not None:
        mark_skills, local = clusters.skills_for(session, workflow, ids)
        known = local < mark_skills.n_volunteers
        intervals = marks.skill_intervals(mark_skills, 0.9) if known.any() else {}
        for i, line in enumerate(out):
            line.append(str(bool(known[i])).lower())
            for name in ("p_fn", "f", "p_fp", "sigma"):
                if known[i]:
                    value = getattr(mark_skills, name)[local[i]]
                    lo, hi = intervals[name][local[i]]
                    line += [_prob(value), _prob(lo), _prob(hi)]
                else:
                    line += [_prob(getattr(mark_skills, f"pop_{name}")), "", ""]
    return out


def _write_skills(session: Session, path: Path, workflow: Workflow, config: WorkflowConfig) -> int:
    """Every volunteer with a view in the workflow, `CHUNK` at a time, in id order."""
    votes = (
        select(View.volunteer_id, func.count().label("votes"))
        .where(View.workflow_id == workflow.id)
        .group_by(View.volunteer_id)
        .subquery()
    )
    query = (
        select(
            votes.c.volunteer_id, Volunteer.key, Volunteer.kind, Volunteer.excluded, votes.c.votes
        )
        .join(Volunteer, Volunteer.id == votes.c.volunteer_id)
        .order_by(votes.c.volunteer_id)
    )
    n = 0
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(_skill_columns(config))
        for rows in _stream(session, query):
            writer.writerows(_skill_rows(session, workflow, config, list(rows)))
            n += len(rows)
    return n


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_export(
    session: Session, directory: Path, workflow: Workflow, rules: ExportRules
) -> dict[str, Any]:
    """Write every file of an export into `directory`; returns the manifest (also written)."""
    assert workflow.config is not None
    config = load_config(workflow.config)
    directory.mkdir(parents=True, exist_ok=True)
    tally, ids = _write_subjects(session, directory, workflow, config, rules)
    n_volunteers = _write_skills(session, directory / "skills.csv", workflow, config)
    views_through = session.scalar(select(func.max(View.id)).where(View.workflow_id == workflow.id))
    drawing = config.drawing is not None
    purity = tally.p_real_sum / tally.boxes if tally.boxes else None
    found = tally.boxes + tally.e_missed
    completeness = 1.0 - tally.e_missed / found if drawing and found > 0 else None
    files = sorted(p.name for p in directory.iterdir() if p.name != MANIFEST)
    manifest = {
        "format": FORMAT_VERSION,
        "workflow_id": workflow.id,
        "config_hash": config.digest(),
        "skill_snapshot_id": workflow.skill_snapshot_id,
        "mark_snapshot_id": workflow.mark_snapshot_id,
        "views_through": views_through,
        "rules": rules.model_dump(mode="json"),
        "categories": (
            sorted({t.category for t in config.drawing.tools}) if config.drawing else []
        ),
        "counts": {
            "subjects_considered": tally.considered,
            "subjects": tally.kept,
            "train": tally.train,
            "val": tally.val,
            "negatives": tally.negatives,
            "boxes": tally.boxes,
            "ignore_regions": tally.ignore_regions,
            "clusters_on_other_frames": tally.other_frames_skipped,
            "volunteers": n_volunteers,
            "excluded": dict(sorted(tally.excluded.items())),
        },
        "expected_purity": None if purity is None else _prob(purity),
        "expected_missed": _prob(tally.e_missed) if drawing else None,
        "expected_completeness": None if completeness is None else _prob(completeness),
        "files": {name: {"sha256": _sha256(directory / name)} for name in files},
        "subjects": {split: list(values) for split, values in ids.items()},
    }
    with (directory / MANIFEST).open("w") as handle:
        handle.write(_dumps(manifest) + "\n")
    return manifest


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without its subject ids (kept in the Export row and answered by the API)."""
    return {k: v for k, v in manifest.items() if k != "subjects"}


# --- claiming and writing ----------------------------------------------------------------------

HEARTBEAT_S = 10.0
LEASE_S = 90.0
MAX_WRITERS = 3


@dataclass(frozen=True)
class Claim:
    """A writer's hold on an export: its `attempt` is the export's `attempts` when it claimed it,
    and every later write of this writer is made only while the row still says so."""

    workflow_id: int
    rules: ExportRules
    attempt: int


def _lease_expired(now: datetime, lease_s: float | None = None) -> ColumnElement[bool]:
    """Running, and no heartbeat for longer than the lease (a writer of the previous version
    never beat: its export counts from its creation)."""
    stale = now - timedelta(seconds=LEASE_S if lease_s is None else lease_s)
    return and_(
        Export.status == "running", func.coalesce(Export.heartbeat_at, Export.created_at) < stale
    )


def _held(export_id: str, attempt: int) -> ColumnElement[bool]:
    return and_(Export.id == export_id, Export.status == "running", Export.attempts == attempt)


def _claim(sessions: sessionmaker[Session], export_id: str) -> Claim | None:
    """Take the export for this writer: a queued one, or a running one whose writer's lease ran
    out (and that has not used up its writers). One UPDATE decides, so two writers never both
    win: PostgreSQL re-checks the WHERE of a claim that waited on another's row lock, and SQLite
    has one writer at a time. The claim is the raised `attempts`."""
    now = utcnow()
    with sessions.begin() as session:
        export = session.get(Export, export_id)
        if export is None:
            raise NotFound(f"export {export_id} is not known", field="export_id")
        claimable = or_(
            Export.status == "queued", and_(_lease_expired(now), Export.attempts < MAX_WRITERS)
        )
        attempt = session.execute(
            update(Export)
            .where(Export.id == export_id, claimable)
            .values(
                status="running", attempts=Export.attempts + 1, claimed_at=now, heartbeat_at=now
            )
            .returning(Export.attempts),
            execution_options={"synchronize_session": False},
        ).scalar_one_or_none()
        if attempt is None:
            return None
        return Claim(export.workflow_id, ExportRules.model_validate(export.rules or {}), attempt)


class _Heartbeat:
    """Keeps a writer's lease while it works: a thread that moves `heartbeat_at` every
    `HEARTBEAT_S` seconds on its own connection. A sweeper tells a dead writer (killed, out of
    memory, its machine gone) from a slow one by this, never by how long an export may take. The
    thread stops when the claim is gone (a writer that stalled past the lease was replaced) and
    sets `lost`, so its writer knows its work will not be kept."""

    def __init__(self, sessions: sessionmaker[Session], export_id: str, attempt: int) -> None:
        self.sessions = sessions
        self.export_id = export_id
        self.attempt = attempt
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"gzx-export-lease-{export_id[:8]}", daemon=True
        )

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                with self.sessions.begin() as session:
                    kept = session.execute(
                        update(Export)
                        .where(_held(self.export_id, self.attempt))
                        .values(heartbeat_at=utcnow()),
                        execution_options={"synchronize_session": False},
                    )
            except Exception as error:  # the database blinked: try again at the next beat
                log.warning("export %s: heartbeat failed: %s", self.export_id, error)
                continue
            if kept.rowcount != 1:  # type: ignore[attr-defined]  # CursorResult has rowcount
                self.lost.set()
                return


def _remove_partials(final: Path, keep: Path) -> None:
    """Remove what earlier writers of this export left behind (`<id>.partial*`), `keep` aside.
    A writer that is still alive after its claim was taken then fails on its missing directory,
    and could not have kept its files anyway."""
    for stale in final.parent.glob(f"{final.name}.partial*"):
        if stale != keep:
            shutil.rmtree(stale, ignore_errors=True)


def _finish(
    sessions: sessionmaker[Session],
    export_id: str,
    claim: Claim,
    partial: Path,
    final: Path,
    manifest: dict[str, Any],
    webhook: bool,
) -> bool:
    """Mark the export done and move its files into place, as one step: the row is updated (and
    locked) only while this writer still holds it, the directory renamed under that lock, and a
    failed rename rolls the update back. False when the claim was lost."""
    now = utcnow()
    with sessions.begin() as session:
        done = session.execute(
            update(Export)
            .where(_held(export_id, claim.attempt))
            .values(
                status="done",
                manifest=summary(manifest),
                finished_at=now,
                heartbeat_at=now,
                webhook_status="pending" if webhook else None,
                webhook_attempts=0,
                webhook_next_at=now if webhook else None,
                webhook_error=None,
            ),
            execution_options={"synchronize_session": False},
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]  # CursorResult has rowcount
            return False
        if final.exists():  # renamed by a writer that died before its commit
            shutil.rmtree(final)
        partial.rename(final)
    return True


def write_export(sessions: sessionmaker[Session], settings: Settings, export_id: str) -> str:
    """Run a queued export (or one whose writer died): files into settings.export_dir/<id>/,
    status and manifest into its row. Returns "done" or "failed", or "skipped" when this call
    does not hold the export (another writer has it, or took it over after this one stalled past
    its lease), so that only the writer that finished an export announces it.

    Files are written to `<id>.partial-<attempt>/`, each claim its own, and renamed when done;
    a writer first removes the partial directories of the writers before it."""
    claim = _claim(sessions, export_id)
    if claim is None:
        return "skipped"
    final = export_directory(settings, export_id)
    partial = final.with_name(f"{final.name}.partial-{claim.attempt}")
    try:
        with _Heartbeat(sessions, export_id, claim.attempt) as heartbeat:
            _remove_partials(final, keep=partial)
            with sessions() as session:
                if session.get_bind().dialect.name == "postgresql":
                    session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
                workflow = session.get(Workflow, claim.workflow_id)
                if workflow is None or workflow.config is None:
                    raise Conflict(
                        f"workflow {claim.workflow_id} is not configured", field="workflow_id"
                    )
                webhook = load_config(workflow.config).exports.webhook_url is not None
                shutil.rmtree(partial, ignore_errors=True)
                manifest = build_export(session, partial, workflow, claim.rules)
                session.rollback()
            lost = heartbeat.lost.is_set()
        if lost or not _finish(sessions, export_id, claim, partial, final, manifest, webhook):
            log.warning("export %s: attempt %s lost its claim", export_id, claim.attempt)
            shutil.rmtree(partial, ignore_errors=True)
            return "skipped"
    except Exception as error:
        log.exception("export %s failed", export_id)
        shutil.rmtree(partial, ignore_errors=True)
        with sessions.begin() as session:
            failed = session.execute(
                update(Export)
                .where(_held(export_id, claim.attempt))
                .values(status="failed", error=str(error)[:2000], finished_at=utcnow()),
                execution_options={"synchronize_session": False},
            )
        held = failed.rowcount == 1  # type: ignore[attr-defined]  # CursorResult has rowcount
        return "failed" if held else "skipped"
    return "done"


# --- files, schedules, notifications ------------------------------------------------------------


def export_directory(settings: Settings, export_id: str) -> Path:
    if not EXPORT_ID.match(export_id):
        raise InputError("export_id is not an export id", field="export_id")
    return Path(settings.export_dir).resolve() / export_id


def export_file(settings: Settings, export: Export, name: str) -> Path:
    """The path of one file of a finished export; refuses names that leave its directory."""
    if not FILE_NAME.match(name) or ".." in name:
        raise InputError("name must be a plain file name of the export", field="name")
    directory = export_directory(settings, export.id)
    path = (directory / name).resolve()
    if path.parent != directory:
        raise InputError("name must be a plain file name of the export", field="name")
    if export.status != "done":
        raise Conflict(f"export {export.id} is {export.status}", field="export_id")
    listed = set((export.manifest or {}).get("files", {})) | {MANIFEST}
    if name not in listed or not path.is_file():
        raise NotFound(f"export {export.id} has no file {name}", field="name")
    return path


def describe(export: Export) -> dict[str, Any]:
    """What GET /v1/exports/{id} answers."""
    files = sorted([*((export.manifest or {}).get("files") or {}), MANIFEST])
    return {
        "id": export.id,
        "workflow_id": export.workflow_id,
        "status": export.status,
        "error": export.error,
        "rules": export.rules,
        "created_at": export.created_at.isoformat(),
        "finished_at": export.finished_at.isoformat() if export.finished_at else None,
        "manifest": export.manifest,
        "files": files if export.status == "done" else [],
        "attempts": export.attempts,
        "webhook": _webhook_state(export),
    }


def _webhook_state(export: Export) -> dict[str, Any] | None:
    """The export webhook's delivery as GET /v1/exports/{id} shows it (None without one)."""
    if export.webhook_status is None:
        return None
    retry = export.webhook_next_at if export.webhook_status == "failed" else None
    return {
        "status": export.webhook_status,
        "attempts": export.webhook_attempts,
        "next_attempt_at": as_utc(retry).isoformat() if retry is not None else None,
        "last_error": export.webhook_error,
    }


def due_exports(session: Session) -> list[int]:
    """Workflows whose export interval has passed since their last export (none running)."""
    now = utcnow()
    due = []
    for workflow in session.scalars(
        select(Workflow).where(Workflow.config.is_not(None)).order_by(Workflow.id)
    ):
        interval = ((workflow.config or {}).get("exports") or {}).get("schedule_interval_s")
        if not interval:
            continue
        last = session.execute(
            select(Export.created_at, Export.status)
            .where(Export.workflow_id == workflow.id)
            .order_by(Export.created_at.desc())
            .limit(1)
        ).first()
        waited = None if last is None else (now - as_utc(last.created_at)).total_seconds()
        if last is None or (
            last.status not in ("queued", "running") and float(waited or 0) >= float(interval)
        ):
            due.append(workflow.id)
    return due


def webhook_payload(export: Export) -> dict[str, Any]:
    manifest = export.manifest or {}
    return {
        "event": "export.done",
        "export_id": export.id,
        "workflow_id": export.workflow_id,
        "url": f"/v1/exports/{export.id}",
        "counts": manifest.get("counts"),
        "expected_purity": manifest.get("expected_purity"),
        "expected_completeness": manifest.get("expected_completeness"),
    }


SEND_LEASE_S = 60.0


def _webhook_due(now: datetime) -> ColumnElement[bool]:
    return and_(
        Export.webhook_status.in_(("pending", "failed")),
        or_(Export.webhook_next_at.is_(None), Export.webhook_next_at <= now),
    )


def _settled(attempts: int, error: Exception | None, now: datetime) -> dict[str, Any]:
    """A webhook attempt's outcome, counted like an effect's: done, or failed with the effects'
    backoff before the next try, dead after `effects.MAX_ATTEMPTS`."""
    if error is None:
        return {
            "webhook_status": "done",
            "webhook_attempts": attempts,
            "webhook_next_at": None,
            "webhook_error": None,
        }
    return {
        "webhook_status": "dead" if attempts >= effects.MAX_ATTEMPTS else "failed",
        "webhook_attempts": attempts,
        "webhook_next_at": now + effects.backoff(attempts),
        "webhook_error": str(error)[:500],
    }


def deliver_webhook(sessions: sessionmaker[Session], export_id: str) -> str | None:
    """One try of a finished export's webhook, if one is due; returns its new status ("done",
    "failed", "dead", "skipped"), None when nothing was due.

    The try is claimed by moving its next attempt `SEND_LEASE_S` on, in one UPDATE, so the job
    that wrote the export and a sweeper never send it together, and no row lock is held while
    the receiver answers; a sender that dies mid-way leaves the webhook due again a minute later.
    Delivery is at least once: the Idempotency-Key (`gzx-export-<id>`) lets the receiver drop a
    repeat. The body is signed like the effects' webhooks (`effects.signed_post`)."""
    now = utcnow()
    with sessions.begin() as session:
        taken = session.execute(
            update(Export)
            .where(Export.id == export_id, _webhook_due(now))
            .values(webhook_next_at=now + timedelta(seconds=SEND_LEASE_S)),
            execution_options={"synchronize_session": False},
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]  # CursorResult has rowcount
            return None
        export = session.get(Export, export_id)
        assert export is not None
        before = export.webhook_attempts
        workflow = session.get(Workflow, export.workflow_id)
        config = load_config(workflow.config) if workflow and workflow.config else None
        payload = webhook_payload(export)
    url = config.exports.webhook_url if config is not None else None
    if config is None or url is None:
        values: dict[str, Any] = {
            "webhook_status": "skipped",
            "webhook_error": "the workflow has no export webhook any more",
        }
    else:
        error: Exception | None = None
        try:
            effects.signed_post(
                url, config.exports.webhook_secret, payload, f"gzx-export-{export_id}"
            )
        except Exception as caught:  # every failure is recorded and retried
            log.warning("export webhook for %s failed: %s", export_id, caught)
            error = caught
        values = _settled(before + 1, error, utcnow())
    with sessions.begin() as session:
        session.execute(
            update(Export)
            .where(Export.id == export_id, Export.webhook_attempts == before)
            .values(**values),
            execution_options={"synchronize_session": False},
        )
    return str(values["webhook_status"])


def due_webhooks(session: Session, limit: int = 100) -> list[str]:
    """Exports whose webhook waits for its first try or a retry that is due, oldest first."""
    query = (
        select(Export.id)
        .where(_webhook_due(utcnow()))
        .order_by(Export.webhook_next_at, Export.id)
        .limit(limit)
    )
    return list(session.scalars(query))


def deliver_due_webhooks(sessions: sessionmaker[Session]) -> dict[str, int]:
    """The sweeper's retries: every due export webhook, one try each."""
    with sessions() as session:
        due = due_webhooks(session)
    outcome = {"sent": 0, "failed": 0}
    for export_id in due:
        status = deliver_webhook(sessions, export_id)
        if status == "done":
            outcome["sent"] += 1
        elif status in ("failed", "dead"):
            outcome["failed"] += 1
    return outcome


def notify_done(sessions: sessionmaker[Session], export_id: str) -> dict[str, Any] | None:
    """After a finished export: the first try of its webhook (recorded; the sweeper retries a
    failure). Returns the workflow's export settings for the caller (which queues the train job
    when Redis is there), None if the export is not done."""
    with sessions() as session:
        export = session.get(Export, export_id)
        if export is None or export.status != "done":
            return None
        workflow = session.get(Workflow, export.workflow_id)
        config = load_config(workflow.config) if workflow and workflow.config else None
    if config is None:
        return None
    deliver_webhook(sessions, export_id)
    return config.exports.model_dump()


def scheduled_rules(session: Session, workflow_id: int) -> ExportRules:
    """The workflow's default rules (what a scheduled export uses)."""
    workflow = session.get(Workflow, workflow_id)
    assert workflow is not None and workflow.config is not None
    return load_config(workflow.config).exports.rules()


def stale_queued(session: Session, older_than_s: float = 600.0) -> list[str]:
    """Exports still queued long after they were asked for (their job was lost with Redis, or
    the process whose thread would have written it stopped); queueing them again is safe, since
    an export is claimed once."""
    since = utcnow() - timedelta(seconds=older_than_s)
    query = (
        select(Export.id)
        .where(Export.status == "queued", Export.created_at < since)
        .order_by(Export.created_at)
    )
    return list(session.scalars(query))


def abandoned(session: Session, lease_s: float | None = None) -> list[str]:
    """Running exports whose writer has not beaten for longer than the lease (killed, out of
    memory, its machine gone): queueing them again is safe, since only one writer can claim one.
    An export that has had `MAX_WRITERS` writers already is marked failed instead, so an export
    that kills its writer every time (memory, say) is not retried for ever."""
    now = utcnow()
    expired = _lease_expired(now, lease_s)
    session.execute(
        update(Export)
        .where(expired, Export.attempts >= MAX_WRITERS)
        .values(
            status="failed",
            error=f"its writer stopped {MAX_WRITERS} times without finishing "
            "(killed, or out of memory?)",
            finished_at=now,
        ),
        execution_options={"synchronize_session": False},
    )
    return list(session.scalars(select(Export.id).where(expired).order_by(Export.created_at)))


def to_rerun(session: Session) -> list[str]:
    """Every export a schedule should queue again: lost before its writer began, or after."""
    return [*stale_queued(session), *abandoned(session)]
