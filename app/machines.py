"""Machine volunteers: a model's predictions enter as classifications of `ml:<model>@<version>`.

Galaxy Zoo Express and Lean Crowdsourcing let a classifier act as one more worker: its votes are
weighed by a confusion matrix learned like anyone's, so a good model lets one agreeing human
settle a subject and a bad one is ignored. Here a prediction (class probabilities and/or scored
boxes for one subject) becomes one classification of the model version's volunteer:

- its answer is its most probable class, given as the first answer index of the question task
  that maps to that class; its marks are its boxes with score >= `score_threshold`, each drawn
  with the first drawing tool whose `category` names the box's category (a point tool gets the
  box's centre, as a click);
- it goes through `app.store.record_classifications` like a platform classification, so its
  subject becomes pending and is re-aggregated; the refit then learns the machine's confusion
  matrix and mark skill on gold, as it does for humans;
- the classification id is a deterministic negative number (a hash of workflow, volunteer key and
  subject), so it never collides with a platform id and a repeat is a duplicate;
- subjects of the export the model was trained on (its manifest's train and val splits, plus any
  `training_subjects` given) are stored as predictions but never voted: a model is right on its
  training set for the wrong reason, and counting those votes would teach gzx a skill it lacks.

Every prediction is kept whole (all probabilities, all boxes with their scores, below the
threshold too) in the `predictions` table, unique per model version and subject: a second post of
the same subject changes nothing. `calibration` compares them with gold and with retired labels.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app import exports, ingest, store
from app.errors import Conflict, InputError, NotFound, PayloadTooLarge
from app.models import Export, MachineModel, Prediction, Volunteer, WorkflowSubject, utcnow
from app.parsing import ParsedAnswer, ParsedClassification, ParsedMark
from app.settings import Settings
from app.workflows import Tool, WorkflowConfig

FloatArray = npt.NDArray[np.float64]

MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")
MODEL_VERSION = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
MAX_PREDICTIONS = 10_000
DEFAULT_SCORE_THRESHOLD = 0.5
PROBABILITY_TOLERANCE = 0.01
"""How far a prediction's probabilities may sum from 1: rounded softmax outputs (4 decimals over
a handful of classes) stay well inside it, a vector that is not a distribution does not."""
MATCH_IOU = 0.5
"""A predicted box is a true detection when it overlaps an unmatched gold box by IoU >= this
(the PASCAL VOC criterion, and the one gzx's mark skills are learned with)."""
MACHINE_SOURCE = "machine"
_TOP_KEYS = frozenset(
    {"model", "version", "export_id", "training_subjects", "score_threshold", "predictions"}
)
_PREDICTION_KEYS = frozenset({"subject_id", "probabilities", "boxes"})
_BOX_KEYS = ("x1", "y1", "x2", "y2", "score", "category")
_MAX_ID = 2**63 - 1


# --- the body --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """A predicted box: corners (x1, y1) top-left to (x2, y2), score, category of a tool."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    category: str

    def to_json(self) -> dict[str, Any]:
        return {
            "x1": self.x1,
            "y1": self.y1,
            "x2": self.x2,
            "y2": self.y2,
            "score": self.score,
            "category": self.category,
        }


@dataclass(frozen=True)
class PredictionIn:
    """One subject's prediction: probabilities by class name and/or boxes (None: not given)."""

    subject_id: int
    probabilities: dict[str, float] | None
    boxes: tuple[Box, ...] | None


@dataclass(frozen=True)
class PredictionsBody:
    """A validated POST /v1/workflows/{id}/predictions body (contract 1)."""

    model: str
    version: str
    export_id: str | None
    training_subjects: tuple[int, ...]
    score_threshold: float
    predictions: tuple[PredictionIn, ...]

    @property
    def key(self) -> str:
        return machine_key(self.model, self.version)


def machine_key(model: str, version: str) -> str:
    """The volunteer key of one model version: a new version is a new volunteer."""
    return f"ml:{model}@{version}"


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _object(value: object, at: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(f"{what} must be a JSON object, got {_kind(value)}", field=at)
    return value


def _no_unknown_keys(
    obj: dict[str, Any], allowed: frozenset[str] | tuple[str, ...], at: str
) -> None:
    """Refuse keys the contract does not know: a misspelt `score_treshold` would otherwise be
    silently replaced by its default."""
    for name in obj:
        if name not in allowed:
            shown = str(name)[:60]
            raise InputError(
                f"unknown field {shown!r} (known: {', '.join(sorted(allowed))})",
                field=f"{at}.{shown}" if at else shown,
            )


def _number(value: object, at: str) -> float:
    """A finite number (an integer or a float; never a boolean, NaN or an infinity)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"must be a number, got {_kind(value)}", field=at)
    try:
        number = float(value)
    except OverflowError:
        raise InputError("number is too large", field=at) from None
    if not math.isfinite(number):
        raise InputError(f"must be a finite number, got {number}", field=at)
    return number


def _subject_id(value: object, at: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"must be an integer subject id, got {_kind(value)}", field=at)
    if not 0 <= value <= _MAX_ID:
        raise InputError("subject id must lie in 0..2**63-1", field=at)
    return value


def _name(value: object, pattern: re.Pattern[str], at: str, what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InputError(f"{what} must match {pattern.pattern}", field=at)
    return value


def parse_predictions(body: object, config: WorkflowConfig, *, max_boxes: int) -> PredictionsBody:
    """Validate a predictions body against the workflow's configuration.

    Every refusal is an InputError whose `field` is the dotted path of the offending value
    (`predictions.3.boxes.0.score`), or PayloadTooLarge for too many predictions or boxes.
    """
    data = _object(body, "body", "the body")
    _no_unknown_keys(data, _TOP_KEYS, "")
    model = _name(data.get("model"), MODEL_NAME, "model", "model")
    version = _name(data.get("version"), MODEL_VERSION, "version", "version")
    export_id = data.get("export_id")
    if export_id is not None and not (
        isinstance(export_id, str) and exports.EXPORT_ID.fullmatch(export_id)
    ):
        raise InputError("export_id must be a gzx export id (a UUID) or null", field="export_id")
    training: list[int] = []
    given_training = data.get("training_subjects")
    if given_training is not None:
        if not isinstance(given_training, list):
            raise InputError(
                f"training_subjects must be a list of subject ids, got {_kind(given_training)}",
                field="training_subjects",
            )
        training = [
            _subject_id(value, f"training_subjects.{i}") for i, value in enumerate(given_training)
        ]
    threshold = DEFAULT_SCORE_THRESHOLD
    if data.get("score_threshold") is not None:
        threshold = _number(data["score_threshold"], "score_threshold")
        if not 0.0 <= threshold <= 1.0:
            raise InputError("score_threshold must lie in [0, 1]", field="score_threshold")
    items = data.get("predictions")
    if not isinstance(items, list):
        raise InputError(f"predictions must be a list, got {_kind(items)}", field="predictions")
    if len(items) > MAX_PREDICTIONS:
        raise PayloadTooLarge(
            f"at most {MAX_PREDICTIONS} predictions per request (got {len(items)})",
            field="predictions",
        )
    seen: dict[int, int] = {}
    predictions = []
    for i, item in enumerate(items):
        prediction = _prediction(item, f"predictions.{i}", config, max_boxes)
        if prediction.subject_id in seen:
            raise InputError(
                f"subject {prediction.subject_id} is predicted twice (also at "
                f"predictions.{seen[prediction.subject_id]})",
                field=f"predictions.{i}.subject_id",
            )
        seen[prediction.subject_id] = i
        predictions.append(prediction)
    return PredictionsBody(
        model,
        version,
        export_id,
        tuple(sorted(set(training))),
        threshold,
        tuple(predictions),
    )


def _prediction(item: object, at: str, config: WorkflowConfig, max_boxes: int) -> PredictionIn:
    obj = _object(item, at, "a prediction")
    _no_unknown_keys(obj, _PREDICTION_KEYS, at)
    if "subject_id" not in obj:
        raise InputError("a prediction needs a subject_id", field=f"{at}.subject_id")
    subject_id = _subject_id(obj["subject_id"], f"{at}.subject_id")
    raw_probabilities, raw_boxes = obj.get("probabilities"), obj.get("boxes")
    if raw_probabilities is None and raw_boxes is None:
        raise InputError(
            "a prediction needs probabilities or boxes (or both)", field=f"{at}.probabilities"
        )
    probabilities = (
        None
        if raw_probabilities is None
        else _probabilities(raw_probabilities, f"{at}.probabilities", config)
    )
    boxes = None if raw_boxes is None else _boxes(raw_boxes, f"{at}.boxes", config, max_boxes)
    return PredictionIn(subject_id, probabilities, boxes)


def _probabilities(value: object, at: str, config: WorkflowConfig) -> dict[str, float]:
    if config.question is None:
        raise InputError("the workflow has no question task to give probabilities for", field=at)
    obj = _object(value, at, "probabilities")
    if not obj:
        raise InputError("probabilities must name at least one class", field=at)
    result: dict[str, float] = {}
    for name, given in obj.items():
        where = f"{at}.{str(name)[:60]}"
        if name not in config.classes:
            raise InputError(
                f"{str(name)[:60]!r} is not a class of the workflow ({', '.join(config.classes)})",
                field=where,
            )
        p = _number(given, where)
        if not 0.0 <= p <= 1.0:
            raise InputError(f"a probability must lie in [0, 1], got {p}", field=where)
        result[name] = p
    total = math.fsum(result.values())
    if abs(total - 1.0) > PROBABILITY_TOLERANCE:
        raise InputError(
            f"probabilities must sum to 1 (within {PROBABILITY_TOLERANCE}), got {total:.6g}",
            field=at,
        )
    return {name: result.get(name, 0.0) for name in config.classes}


def _boxes(value: object, at: str, config: WorkflowConfig, max_boxes: int) -> tuple[Box, ...]:
    if config.drawing is None:
        raise InputError("the workflow has no drawing task to give boxes for", field=at)
    if not isinstance(value, list):
        raise InputError(f"boxes must be a list, got {_kind(value)}", field=at)
    if len(value) > max_boxes:
        raise PayloadTooLarge(f"at most {max_boxes} boxes per prediction", field=at)
    categories = {tool.category for tool in config.drawing.tools}
    boxes = []
    for j, item in enumerate(value):
        where = f"{at}.{j}"
        obj = _object(item, where, "a box")
        _no_unknown_keys(obj, _BOX_KEYS, where)
        numbers = {}
        for name in ("x1", "y1", "x2", "y2", "score"):
            if name not in obj:
                raise InputError(f"a box needs {name}", field=f"{where}.{name}")
            numbers[name] = _number(obj[name], f"{where}.{name}")
        if numbers["x2"] <= numbers["x1"]:
            raise InputError("x2 must be greater than x1", field=f"{where}.x2")
        if numbers["y2"] <= numbers["y1"]:
            raise InputError("y2 must be greater than y1", field=f"{where}.y2")
        if not 0.0 <= numbers["score"] <= 1.0:
            raise InputError("score must lie in [0, 1]", field=f"{where}.score")
        category = obj.get("category")
        if not isinstance(category, str) or category not in categories:
            shown = str(category)[:60] if isinstance(category, str) else _kind(category)
            raise InputError(
                f"category {shown!r} is not a tool category of the workflow "
                f"({', '.join(sorted(categories))})",
                field=f"{where}.category",
            )
        boxes.append(Box(category=category, **numbers))
    return tuple(boxes)


# --- entering predictions ----------------------------------------------------------------------


@dataclass(frozen=True)
class PredictionOutcome:
    """What a post did: new predictions entered as votes, new ones in training, repeats."""

    key: str
    volunteer_id: int
    accepted: int
    in_training: int
    duplicates: int

    def to_json(self) -> dict[str, Any]:
        return {
            "volunteer": self.key,
            "volunteer_id": self.volunteer_id,
            "accepted": self.accepted,
            "in_training": self.in_training,
            "duplicates": self.duplicates,
        }


def classification_id(workflow_id: int, key: str, subject_id: int) -> int:
    """The id of a machine's classification: minus a 62-bit hash of (workflow, volunteer key,
    subject) minus one. Platform ids are positive, so they never collide, and the same model
    version on the same subject always gets the same id (a repeat is a duplicate)."""
    digest = hashlib.sha256(f"gzx-machine:{workflow_id}:{key}:{subject_id}".encode()).digest()
    return -(int.from_bytes(digest[:8], "big") >> 2) - 1


def export_training_subjects(
    session: Session, settings: Settings, workflow_id: int, export_id: str
) -> set[int]:
    """Every subject of an export's manifest (train and val): what the model has seen."""
    export = session.get(Export, export_id)
    if export is None:
        raise InputError(f"export {export_id} is not known", field="export_id")
    if export.workflow_id != workflow_id:
        raise InputError(
            f"export {export_id} belongs to workflow {export.workflow_id}, not {workflow_id}",
            field="export_id",
        )
    if export.status != "done":
        raise InputError(f"export {export_id} is {export.status}, not done", field="export_id")
    path = exports.export_directory(settings, export_id) / exports.MANIFEST
    try:
        with path.open() as handle:
            manifest = json.load(handle)
        splits = manifest["subjects"]
        return {int(s) for split in ("train", "val") for s in splits.get(split, [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise InputError(
            f"the manifest of export {export_id} cannot be read from the export directory",
            field="export_id",
        ) from None


def _insert(session: Session, model: Any) -> Any:
    """An INSERT that knows ON CONFLICT on the session's dialect."""
    if store.is_postgres(session):
        return postgresql.insert(model)
    return sqlite.insert(model)


def _machine_volunteer(session: Session, key: str) -> int:
    statement = _insert(session, Volunteer).on_conflict_do_nothing(index_elements=["key"])
    session.execute(
        statement,
        [{"key": key, "kind": "machine", "excluded": False, "created_at": utcnow()}],
    )
    volunteer_id = session.scalar(select(Volunteer.id).where(Volunteer.key == key))
    assert volunteer_id is not None
    return int(volunteer_id)


def _machine_model(
    session: Session,
    settings: Settings,
    workflow_id: int,
    volunteer_id: int,
    body: PredictionsBody,
) -> set[int]:
    """The model version's row (created on its first post); returns its training subjects.

    The export is fixed by the first post: another export_id for the same version is a
    conflict (a retrained model is a new version). Later posts may name more training subjects,
    unless this model already voted on one of them (a vote cannot be taken back).
    """
    for _ in range(2):  # a concurrent first post may create the row between our two statements
        row = session.scalar(
            select(MachineModel).where(
                MachineModel.workflow_id == workflow_id,
                MachineModel.volunteer_id == volunteer_id,
            )
        )
        if row is not None:
            return _extend_training(session, row, body)
        training = set(body.training_subjects)
        if body.export_id is not None:
            training |= export_training_subjects(session, settings, workflow_id, body.export_id)
        statement = _insert(session, MachineModel).on_conflict_do_nothing(
            index_elements=["workflow_id", "volunteer_id"]
        )
        created = session.scalars(
            statement.returning(MachineModel.id),
            [
                {
                    "workflow_id": workflow_id,
                    "volunteer_id": volunteer_id,
                    "model": body.model,
                    "version": body.version,
                    "export_id": body.export_id,
                    "training_subjects": sorted(training),
                    "created_at": utcnow(),
                }
            ],
        ).all()
        if created:
            return training
    raise Conflict("the model version is being registered concurrently; retry", field="model")


def _extend_training(session: Session, row: MachineModel, body: PredictionsBody) -> set[int]:
    if row.export_id != body.export_id:
        raise Conflict(
            f"{body.key} was posted with export {row.export_id}; a model trained on another "
            "export is a new version",
            field="export_id",
        )
    known = {int(s) for s in row.training_subjects}
    added = set(body.training_subjects) - known
    if not added:
        return known
    voted = session.scalars(
        select(Prediction.subject_id).where(
            Prediction.workflow_id == row.workflow_id,
            Prediction.volunteer_id == row.volunteer_id,
            Prediction.classification_id.is_not(None),
            Prediction.subject_id.in_(sorted(added)),
        )
    ).first()
    if voted is not None:
        raise Conflict(
            f"subject {voted} was already entered as a vote of {body.key}; it cannot become a "
            "training subject afterwards",
            field="training_subjects",
        )
    row.training_subjects = sorted(known | added)
    session.flush()
    return known | added


def machine_classification(
    workflow_id: int,
    key: str,
    config: WorkflowConfig,
    prediction: PredictionIn,
    threshold: float,
    created_at: datetime,
) -> ParsedClassification:
    """The classification a prediction enters as: its most probable class as the answer, its
    boxes at or above `threshold` as marks (a point tool's mark is the box centre)."""
    answers: list[ParsedAnswer] = []
    annotations: list[dict[str, Any]] = []
    if prediction.probabilities is not None and config.question is not None:
        best = max(config.classes, key=lambda name: (prediction.probabilities or {})[name])
        index = min((a.index for a in config.question.answers if a.class_ == best), default=None)
        if index is not None:
            answers.append(ParsedAnswer(config.question.task, index, None))
            annotations.append({"task": config.question.task, "value": index})
    marks: list[ParsedMark] = []
    if prediction.boxes is not None and config.drawing is not None:
        task = config.drawing.task
        tool_of: dict[str, Tool] = {}
        for tool in config.drawing.tools:
            tool_of.setdefault(tool.category, tool)
        drawn = []
        for box in prediction.boxes:
            if box.score < threshold:
                continue
            tool = tool_of[box.category]
            if tool.type == "point":
                x, y = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
                mark = ParsedMark(task, tool.index, 0, "point", x, y, x, y, tool.label, ())
                drawn.append({"tool": tool.index, "frame": 0, "x": x, "y": y})
            else:
                mark = ParsedMark(
                    task, tool.index, 0, "rectangle", box.x1, box.y1, box.x2, box.y2, tool.label, ()
                )
                drawn.append(
                    {
                        "tool": tool.index,
                        "frame": 0,
                        "x": box.x1,
                        "y": box.y1,
                        "width": box.x2 - box.x1,
                        "height": box.y2 - box.y1,
                    }
                )
            marks.append(mark)
        annotations.append({"task": task, "value": drawn})
    return ParsedClassification(
        id=classification_id(workflow_id, key, prediction.subject_id),
        workflow_id=workflow_id,
        project_id=None,
        # The oldest version that counts: the model classifies under the current configuration.
        workflow_version=config.min_workflow_version,
        user_id=None,
        user_login=None,
        anonymous_key=key,
        user_ip=None,
        subject_ids=(prediction.subject_id,),
        created_at=created_at,
        gold_standard=None,
        expert=None,
        classifier_version=MACHINE_SOURCE,
        answers=tuple(answers),
        marks=tuple(marks),
        metadata={"machine": key, "score_threshold": threshold},
        subjects=(),
        annotations=annotations,
        source=MACHINE_SOURCE,
    )


def record_predictions(
    session: Session,
    settings: Settings,
    workflow_id: int,
    config: WorkflowConfig,
    body: PredictionsBody,
) -> PredictionOutcome:
    """Store a validated body in the caller's transaction; the caller notifies the pipeline
    after the commit when `accepted` > 0."""
    key = body.key
    volunteer_id = _machine_volunteer(session, key)
    training = _machine_model(session, settings, workflow_id, volunteer_id, body)
    now = utcnow()
    ordered = sorted(body.predictions, key=lambda p: p.subject_id)
    rows = [
        {
            "workflow_id": workflow_id,
            "subject_id": p.subject_id,
            "volunteer_id": volunteer_id,
            "classification_id": (
                None
                if p.subject_id in training
                else classification_id(workflow_id, key, p.subject_id)
            ),
            "probabilities": p.probabilities,
            "boxes": None if p.boxes is None else [b.to_json() for b in p.boxes],
            "in_training": p.subject_id in training,
            "created_at": now,
        }
        for p in ordered
    ]
    inserted: set[int] = set()
    if rows:
        statement = _insert(session, Prediction).on_conflict_do_nothing(
            index_elements=["workflow_id", "volunteer_id", "subject_id"]
        )
        inserted = set(session.scalars(statement.returning(Prediction.subject_id), rows).all())
    fresh = [p for p in ordered if p.subject_id in inserted]
    votes = [
        machine_classification(workflow_id, key, config, p, body.score_threshold, now)
        for p in fresh
        if p.subject_id not in training
    ]
    for parsed in votes:
        ingest.check_against_config(parsed, config)
    result = store.record_classifications(session, votes, ip_salt=settings.ip_salt)
    return PredictionOutcome(
        key=key,
        volunteer_id=volunteer_id,
        accepted=result.outcomes.count("stored"),
        in_training=sum(1 for p in fresh if p.subject_id in training),
        duplicates=len(ordered) - len(fresh),
    )


# --- reading them back -------------------------------------------------------------------------


def list_machines(session: Session, workflow_id: int) -> list[dict[str, Any]]:
    """Every model version of the workflow, with its export and how its predictions were used."""
    counts = (
        select(
            Prediction.volunteer_id,
            func.count().label("predictions"),
            func.count(Prediction.classification_id).label("votes"),
        )
        .where(Prediction.workflow_id == workflow_id)
        .group_by(Prediction.volunteer_id)
        .subquery()
    )
    in_training = (
        select(Prediction.volunteer_id, func.count().label("n"))
        .where(Prediction.workflow_id == workflow_id, Prediction.in_training.is_(True))
        .group_by(Prediction.volunteer_id)
        .subquery()
    )
    query = (
        select(
            MachineModel,
            Volunteer.key,
            Volunteer.excluded,
            func.coalesce(counts.c.predictions, 0),
            func.coalesce(counts.c.votes, 0),
            func.coalesce(in_training.c.n, 0),
        )
        .join(Volunteer, Volunteer.id == MachineModel.volunteer_id)
        .outerjoin(counts, counts.c.volunteer_id == MachineModel.volunteer_id)
        .outerjoin(in_training, in_training.c.volunteer_id == MachineModel.volunteer_id)
        .where(MachineModel.workflow_id == workflow_id)
        .order_by(MachineModel.id)
    )
    return [
        {
            "volunteer_id": row.volunteer_id,
            "key": key,
            "model": row.model,
            "version": row.version,
            "export_id": row.export_id,
            "training_subjects": len(row.training_subjects or []),
            "predictions": int(n_predictions),
            "in_training": int(n_training),
            "votes": int(n_votes),
            "excluded": bool(excluded),
            "created_at": row.created_at.isoformat(),
        }
        for row, key, excluded, n_predictions, n_votes, n_training in session.execute(query)
    ]


def find_machine(session: Session, workflow_id: int, given: str) -> tuple[Volunteer, MachineModel]:
    """A machine volunteer of the workflow by gzx's volunteer id or its `ml:` key."""
    if "\x00" in given or len(given) > 200:
        raise NotFound("no machine volunteer has that key", field="volunteer")
    volunteer = (
        session.get(Volunteer, int(given))
        if given.isascii() and given.isdigit() and len(given) < 19
        else session.scalar(select(Volunteer).where(Volunteer.key == given))
    )
    model = (
        None
        if volunteer is None
        else session.scalar(
            select(MachineModel).where(
                MachineModel.workflow_id == workflow_id,
                MachineModel.volunteer_id == volunteer.id,
            )
        )
    )
    if volunteer is None or model is None:
        raise NotFound(
            f"{given[:60]} is not a machine volunteer of workflow {workflow_id}", field="volunteer"
        )
    return volunteer, model


def reliability(
    confidence: FloatArray, correct: npt.NDArray[np.bool_], bins: int
) -> dict[str, Any]:
    """A reliability table: equal-width bins of predicted probability on [0, 1], each with its
    count, mean predicted probability and fraction correct; plus the expected calibration error
    Σ_b n_b / N |correct_b - confidence_b| (0 for a perfectly calibrated model)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    n = np.bincount(which, minlength=bins)
    confidence_sum = np.bincount(which, weights=confidence, minlength=bins)
    correct_sum = np.bincount(which, weights=correct.astype(np.float64), minlength=bins)
    rows = []
    for b in range(bins):
        rows.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "n": int(n[b]),
                "mean_probability": float(confidence_sum[b] / n[b]) if n[b] else None,
                "fraction_correct": float(correct_sum[b] / n[b]) if n[b] else None,
            }
        )
    total = int(n.sum())
    ece = (
        float(np.abs(correct_sum - confidence_sum).sum() / total) if total else None
    )  # Σ n_b |acc_b - conf_b| / N, written with sums
    return {
        "n": total,
        "fraction_correct": float(correct.mean()) if total else None,
        "expected_calibration_error": ece,
        "bins": rows,
    }


def match_boxes(
    predicted: FloatArray, scores: FloatArray, gold: FloatArray
) -> npt.NDArray[np.bool_]:
    """Which predicted boxes (P,4) are true detections of gold boxes (G,4): greedy in order of
    decreasing score, each taking the unmatched gold box it overlaps most, if IoU >= MATCH_IOU.

    Greedy by score means the matches of the boxes scoring >= t do not depend on the boxes below
    t, so completeness at any threshold is read off one matching."""
    matched = np.zeros(len(predicted), dtype=bool)
    if not len(predicted) or not len(gold):
        return matched
    x1 = np.maximum(predicted[:, None, 0], gold[None, :, 0])
    y1 = np.maximum(predicted[:, None, 1], gold[None, :, 1])
    x2 = np.minimum(predicted[:, None, 2], gold[None, :, 2])
    y2 = np.minimum(predicted[:, None, 3], gold[None, :, 3])
    overlap = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_p = (predicted[:, 2] - predicted[:, 0]) * (predicted[:, 3] - predicted[:, 1])
    area_g = (gold[:, 2] - gold[:, 0]) * (gold[:, 3] - gold[:, 1])
    iou = overlap / (area_p[:, None] + area_g[None, :] - overlap)
    free = np.ones(len(gold), dtype=bool)
    for i in np.argsort(-scores, kind="stable"):
        candidates = np.where(free, iou[i], -1.0)
        best = int(candidates.argmax())
        if candidates[best] >= MATCH_IOU:
            matched[i] = True
            free[best] = False
    return matched


def _box_table(
    predictions: Sequence[Prediction], gold: dict[int, list[Any]], bins: int
) -> dict[str, Any]:
    """Purity per score bin of the boxes on subjects with gold boxes, and completeness of the
    gold boxes when only boxes scoring at or above each bin's lower edge are kept."""
    scores: list[FloatArray] = []
    hits: list[npt.NDArray[np.bool_]] = []
    n_gold = n_subjects = 0
    for prediction in predictions:
        truth = gold.get(prediction.subject_id)
        if truth is None or prediction.boxes is None:
            continue
        boxes = np.array(
            [[b["x1"], b["y1"], b["x2"], b["y2"]] for b in prediction.boxes], dtype=np.float64
        ).reshape(-1, 4)
        score = np.array([b["score"] for b in prediction.boxes], dtype=np.float64)
        truth_boxes = np.array([list(t)[:4] for t in truth], dtype=np.float64).reshape(-1, 4)
        scores.append(score)
        hits.append(match_boxes(boxes, score, truth_boxes))
        n_gold += len(truth_boxes)
        n_subjects += 1
    score_all = np.concatenate(scores) if scores else np.zeros(0)
    hit_all = np.concatenate(hits) if hits else np.zeros(0, dtype=bool)
    table = reliability(score_all, hit_all, bins)
    for row in table["bins"]:
        row["purity"] = row.pop("fraction_correct")
        row["mean_score"] = row.pop("mean_probability")
        found = int(hit_all[score_all >= row["low"]].sum())
        row["completeness_at_low"] = found / n_gold if n_gold else None
    table["purity"] = table.pop("fraction_correct")
    table["subjects"] = n_subjects
    table["gold_boxes"] = n_gold
    return table


def calibration(
    session: Session,
    workflow_id: int,
    config: WorkflowConfig,
    model: MachineModel,
    *,
    bins: int,
    include_training: bool,
) -> dict[str, Any]:
    """How far a machine's scores can be taken at their word.

    Classes: the predicted class is the most probable one; its probability is binned and set
    against (a) gold labels and (b) the labels of retired subjects (gzx's own answers, which the
    machine's vote may have helped decide where it voted). Boxes: every box on a subject with gold
    boxes is a hit when it matches a gold box (IoU >= 0.5, greedy by score, categories not
    compared since gold boxes carry none). Predictions on training subjects are left out unless
    asked for: a model is confident and right there for the wrong reason.
    """
    query = select(Prediction).where(
        Prediction.workflow_id == workflow_id, Prediction.volunteer_id == model.volunteer_id
    )
    if not include_training:
        query = query.where(Prediction.in_training.is_(False))
    predictions = list(session.scalars(query.order_by(Prediction.subject_id)))
    gold = store.gold_labels(session, workflow_id)
    retired = dict(
        session.execute(
            select(WorkflowSubject.subject_id, WorkflowSubject.retired_label).where(
                WorkflowSubject.workflow_id == workflow_id,
                WorkflowSubject.status == "retired",
                WorkflowSubject.retired_label.is_not(None),
            )
        ).all()
    )
    with_probabilities = [p for p in predictions if p.probabilities]
    confidence = np.zeros(len(with_probabilities))
    predicted: list[str] = []
    for i, p in enumerate(with_probabilities):
        probabilities = p.probabilities or {}
        best = max(config.classes, key=lambda name: float(probabilities.get(name, 0.0)))
        predicted.append(best)
        confidence[i] = float(probabilities.get(best, 0.0))
    classes: dict[str, Any] | None = None
    if config.question is not None:
        classes = {}
        for name, labels in (("gold", gold), ("retired", retired)):
            chosen = [i for i, p in enumerate(with_probabilities) if p.subject_id in labels]
            correct = np.array(
                [predicted[i] == labels[with_probabilities[i].subject_id] for i in chosen],
                dtype=bool,
            )
            classes[name] = reliability(confidence[chosen], correct, bins)
    boxes = (
        _box_table(predictions, store.gold_boxes(session, workflow_id), bins)
        if config.drawing is not None
        else None
    )
    return {
        "predictions": len(predictions),
        "training_included": include_training,
        "compared_with": {
            "gold": "gold labels (uploaded, expert or feedback): independent of the machine",
            "retired": "labels of retired subjects: gzx's answers, to which the machine's own "
            "vote contributed where it voted",
            "boxes": f"gold boxes; a box is a hit at IoU >= {MATCH_IOU} (greedy by score, "
            "categories not compared)",
        },
        "classes": classes,
        "boxes": boxes,
    }
