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
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import logging
import re
import shutil
import time
import uuid
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app import aggregation, answers, clusters, marks
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


def _claim(sessions: sessionmaker[Session], export_id: str) -> tuple[int, ExportRules] | None:
    with sessions.begin() as session:
        export = session.get(Export, export_id)
        if export is None:
            raise NotFound(f"export {export_id} is not known", field="export_id")
        claimed = session.execute(
            update(Export)
            .where(Export.id == export_id, Export.status == "queued")
            .values(status="running")
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]  # CursorResult has rowcount
            return None
        return export.workflow_id, ExportRules.model_validate(export.rules or {})


def write_export(sessions: sessionmaker[Session], settings: Settings, export_id: str) -> str:
    """Run a queued export: files into settings.export_dir/<id>/, status and manifest into its
    row. Returns "done" or "failed", or "skipped" for an export that is not queued (another job
    claimed it first), so that only the job that wrote an export announces it."""
    claimed = _claim(sessions, export_id)
    if claimed is None:
        return "skipped"
    workflow_id, rules = claimed
    final = export_directory(settings, export_id)
    partial = final.with_name(final.name + ".partial")
    try:
        with sessions() as session:
            if session.get_bind().dialect.name == "postgresql":
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            workflow = session.get(Workflow, workflow_id)
            if workflow is None or workflow.config is None:
                raise Conflict(f"workflow {workflow_id} is not configured", field="workflow_id")
            shutil.rmtree(partial, ignore_errors=True)
            manifest = build_export(session, partial, workflow, rules)
            session.rollback()
        partial.rename(final)
    except Exception as error:
        log.exception("export %s failed", export_id)
        shutil.rmtree(partial, ignore_errors=True)
        with sessions.begin() as session:
            session.execute(
                update(Export)
                .where(Export.id == export_id)
                .values(status="failed", error=str(error)[:2000], finished_at=utcnow())
            )
        return "failed"
    with sessions.begin() as session:
        session.execute(
            update(Export)
            .where(Export.id == export_id)
            .values(status="done", manifest=summary(manifest), finished_at=utcnow())
        )
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


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """`X-Gzx-Signature`: "sha256=" + HMAC-SHA256(secret, timestamp + "." + body)."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def send_webhook(url: str, secret: str | None, payload: dict[str, Any]) -> int:
    """POST the payload, signed when a secret is configured; returns the HTTP status."""
    body = _dumps(payload).encode()
    stamp = str(int(time.time()))
    headers = {"content-type": "application/json", "X-Gzx-Timestamp": stamp}
    headers["Idempotency-Key"] = f"gzx-export-{payload.get('export_id')}"
    if secret:
        headers["X-Gzx-Signature"] = signature(secret, stamp, body)
    response = httpx.post(url, content=body, headers=headers, timeout=10)
    return response.status_code


def notify_done(sessions: sessionmaker[Session], export_id: str) -> dict[str, Any] | None:
    """After a finished export: the workflow's webhook (if any). Returns the workflow's export
    settings for the caller (which queues the train job when Redis is there), None if not done."""
    with sessions() as session:
        export = session.get(Export, export_id)
        if export is None or export.status != "done":
            return None
        workflow = session.get(Workflow, export.workflow_id)
        config = load_config(workflow.config) if workflow and workflow.config else None
        payload = webhook_payload(export)
    if config is None:
        return None
    settings = config.exports
    if settings.webhook_url:
        try:
            status = send_webhook(settings.webhook_url, settings.webhook_secret, payload)
            if status >= 300:
                log.warning("export webhook for %s answered %s", export_id, status)
        except httpx.HTTPError as error:
            log.warning("export webhook for %s failed: %s", export_id, error)
    return settings.model_dump()


def scheduled_rules(session: Session, workflow_id: int) -> ExportRules:
    """The workflow's default rules (what a scheduled export uses)."""
    workflow = session.get(Workflow, workflow_id)
    assert workflow is not None and workflow.config is not None
    return load_config(workflow.config).exports.rules()


def stale_queued(session: Session, older_than_s: float = 600.0) -> list[str]:
    """Exports still queued long after they were asked for (their job was lost with Redis);
    queueing them again is safe, since an export is claimed once."""
    since = utcnow() - timedelta(seconds=older_than_s)
    query = (
        select(Export.id)
        .where(Export.status == "queued", Export.created_at < since)
        .order_by(Export.created_at)
    )
    return list(session.scalars(query))
