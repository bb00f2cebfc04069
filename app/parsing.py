"""Turn the platform's classification payloads into frozen, validated records.

Pure: no I/O, no database, no web framework. Inputs are already-decoded JSON (dicts and lists)
or CSV rows (``dict[str, str]``); outputs are frozen dataclasses. Inputs are never mutated:
everything kept from them (metadata, raw annotations, mark details) is a deep copy.

Formats handled
---------------
- Kinesis forwarder batch (``parse_kinesis_batch``): ``{"payload": [event, ...]}``, an event
  being ``{"source": "panoptes", "type": "classification", "data": {...}, "linked": {...}}``.
  Ids are strings; ``data.links.user`` is null for anonymous volunteers; ``linked.subjects[]``
  carries subject metadata and image ``locations``, ``linked.users[]`` logins. Each event stands
  alone: other event types are skipped with a reason, a bad event becomes an error item, and its
  neighbours still parse.
- One Panoptes classification (``parse_classification``: a stream event's ``data``), or a list
  of them (``parse_classifications_body``, all-or-nothing).
- Caesar's external-extractor body (``parse_caesar_extract``): integer ids, ``subject_id`` and a
  ``subject`` object, ``annotations`` as a dict keyed by task (subtasks under their own keys such
  as ``"T0.0.0"``); no gold flags, IP, login or image locations, so ``gold_standard`` is None.
- Classification export CSV row (``parse_export_row``): answers are *labels*, marks carry
  ``tool_label``, ``created_at`` reads ``2025-03-04 10:00:04 UTC``, anonymous volunteers have an
  empty ``user_id`` and ``user_name`` ``not-logged-in-<hash>``, ``subject_data`` is JSON keyed
  by subject id with a ``retired`` row, and ``subject_ids`` is ``;``-joined.
- Subject export CSV row (``parse_subject_export_row``): metadata, locations
  (``{"0": url}``), ``retired_at``.
- Subject metadata gold (``gold_from_metadata``): ``#training_subject`` and FEM feedback keys
  ``#feedback_N_answer`` / ``_x`` / ``_y`` / ``_tolerance``.

Annotation values, by front-end generation (``metadata.classifier_version``: absent or "1" is
the classic PFE, "2.0" is FEM):

- question: ``{"task": "T0", "value": 1}``, the answer index; a list of indices for multiple
  choice; FEM adds ``"taskType": "single" | "multiple"``; the CSV export gives labels instead.
- rectangle: PFE ``{"tool", "frame", "x", "y", "width", "height"}`` with x, y the TOP-LEFT
  corner; FEM ``{"toolIndex", "toolType": "rectangle", "x_center", "y_center", "width",
  "height"}``. Both become the same corners.
- point: PFE ``{"tool", "frame", "x", "y"}``; FEM ``{"toolIndex", "toolType": "point", ...}``.
- subtasks: PFE nests them in the mark's ``details``; FEM sends separate top-level annotations
  ``{"task": "T1.0.0", "markIndex": 0, "value": 1}``, attached here to the mark they name
  (mark ``markIndex`` of task ``T1``).

A drawing task's value is a list of marks; PFE combo tasks (a value that is a list of whole
annotations) are flattened one level. Tasks this module cannot interpret (text, survey, slider,
...) are kept only in ``ParsedClassification.annotations``; that is not an error. Rectangles and
points become ``ParsedMark`` corners, ``(x1, y1)`` top-left and ``(x2, y2)`` bottom-right (a
point has x1 == x2, y1 == y2); other tools (circles, lines, polygons) become ``kind="other"``
with their x, y (or 0).

Validation raises ``app.errors.InputError`` whose ``field`` is the dotted path of the offending
value (``annotations[1].value[0].width``), or ``PayloadTooLarge`` for more marks, subjects or
events than ``Limits`` allows. Nesting depth is checked iteratively before anything else reads
the input, so a 10,000-deep list is refused, not a crash.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeGuard

from app.errors import InputError, PayloadTooLarge

# --- output records --------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedAnswer:
    """A question-task answer: an index (stream, Caesar) or a label (CSV export)."""

    task: str
    index: int | None
    label: str | None


@dataclass(frozen=True)
class ParsedMark:
    """One drawn mark as corners: (x1, y1) top-left, (x2, y2) bottom-right; a point has x1 == x2."""

    task: str
    tool: int
    frame: int
    kind: str  # "rectangle" | "point" | "other"
    x1: float
    y1: float
    x2: float
    y2: float
    tool_label: str | None
    details: tuple[Any, ...]


@dataclass(frozen=True)
class ParsedSubject:
    """A subject as a payload describes it; `retired` is None when the payload does not say."""

    id: int
    metadata: dict[str, Any]
    locations: tuple[dict[str, str], ...]
    retired: bool | None


@dataclass(frozen=True)
class ParsedClassification:
    """One volunteer's classification of one or more subjects, from any of the supported routes."""

    id: int
    workflow_id: int
    project_id: int | None
    workflow_version: str | None
    user_id: int | None
    user_login: str | None
    anonymous_key: str | None
    user_ip: str | None
    subject_ids: tuple[int, ...]
    created_at: datetime
    gold_standard: bool | None
    expert: str | None
    classifier_version: str
    answers: tuple[ParsedAnswer, ...]
    marks: tuple[ParsedMark, ...]
    metadata: dict[str, Any]
    subjects: tuple[ParsedSubject, ...]
    annotations: list[Any]
    source: str


@dataclass(frozen=True)
class Limits:
    """Size limits on one payload: over them is PayloadTooLarge (depth: InputError)."""

    max_marks: int = 1000
    max_depth: int = 32
    max_subjects: int = 50
    max_batch: int = 10_000  # events in one Kinesis batch, or classifications in one POST body


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class BatchItem:
    """The outcome for one event of a Kinesis batch: exactly one of the three is set."""

    index: int
    classification: ParsedClassification | None
    skipped: str | None
    error: dict[str, str] | None


@dataclass(frozen=True)
class FeedbackRule:
    """One FEM feedback rule from subject metadata ``#feedback_N_*``: an answer or a point."""

    number: int  # the N in #feedback_N_...
    rule_id: str | None  # #feedback_N_id
    answer_index: int | None  # #feedback_N_answer when it is an index
    answer_label: str | None  # #feedback_N_answer when it is not
    x: float | None  # #feedback_N_x
    y: float | None  # #feedback_N_y
    tolerance: float | None  # #feedback_N_tolerance (pixels)


@dataclass(frozen=True)
class GoldSignal:
    """The truth a subject's metadata carries: training flag and feedback rules."""

    is_training: bool
    rules: tuple[FeedbackRule, ...]


# --- small validators --------------------------------------------------------------------------

_MAX_ID = 2**63 - 1  # ids go into BIGINT columns
_MAX_INDEX = 2**31 - 1  # tools, frames and answer indices go into INTEGER columns
_DIGITS = re.compile(r"[0-9]{1,19}")
_NUMBER = re.compile(r"\s*[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\s*")
_ANONYMOUS_PREFIX = "not-logged-in-"
_QUESTION_TYPES = frozenset({"single", "multiple"})
_UNINTERPRETED_TYPES = frozenset(
    {"text", "survey", "slider", "highlighter", "dataVisAnnotation", "transcription", "shortcut"}
)
_TOOL_KEYS = ("tool", "toolIndex", "toolType")
_OTHER_SHAPE_KEYS = frozenset(
    {"r", "rx", "ry", "angle", "x1", "y1", "x2", "y2", "points", "pathX", "pathY", "radius"}
)
_MIME_BY_EXTENSION = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "svg": "image/svg+xml",
    "tif": "image/tiff",
    "tiff": "image/tiff",
    "mp4": "video/mp4",
    "mp3": "audio/mpeg",
    "txt": "text/plain",
    "json": "application/json",
}
_FEEDBACK_KEY = re.compile(r"#feedback_([0-9]{1,6})_(id|answer|x|y|tolerance)")


def _join(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key


def _item(at: str, index: int) -> str:
    return f"{at}[{index}]"


def _kind_of(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list"}.get(
        type(value), "object" if isinstance(value, dict) else type(value).__name__
    )


def _check_depth(root: object, limit: int, at: str) -> None:
    """Raise InputError if containers nest deeper than `limit`; iterative, so any depth is safe."""
    # Each entry: (node, depth, parent entry, key in parent); paths are rebuilt only on error.
    stack: list[tuple[object, int, Any, str | int | None]] = [(root, 1, None, None)]
    while stack:
        entry = stack.pop()
        node, depth, _, _ = entry
        if isinstance(node, dict):
            children: list[tuple[str | int, object]] = [(str(k), v) for k, v in node.items()]
        elif isinstance(node, list):
            children = list(enumerate(node))
        else:
            if isinstance(node, float) and not math.isfinite(node):
                # JSON has no NaN or Infinity (Python's decoder accepts them); nothing stores them.
                raise InputError(
                    f"{node} is not a finite number", field=_path_of(entry, at) or None
                )
            continue
        if depth > limit:
            raise InputError(
                f"nested deeper than {limit} levels", field=_path_of(entry, at) or None
            )
        stack.extend((child, depth + 1, entry, key) for key, child in children)


_ATOMS = frozenset({str, int, float, bool, type(None)})
_FAST_DEPTH_LIMIT = 200  # beyond this, recursion could near Python's stack limit: use the slow path


class _NotPlain(Exception):
    """The fast copy met something other than plain JSON, or nesting past the limit."""


def _plain_copy(node: Any, depth: int, limit: int) -> Any:
    """A copy of decoded JSON (dicts, lists, atoms), refusing containers deeper than `limit`."""
    kind = type(node)
    if kind is dict:
        if depth > limit:
            raise _NotPlain
        out: dict[Any, Any] = {}
        for key, value in node.items():
            value_kind = type(value)
            if value_kind is dict or value_kind is list:
                value = _plain_copy(value, depth + 1, limit)
            elif value_kind not in _ATOMS or (value_kind is float and not math.isfinite(value)):
                raise _NotPlain
            out[key] = value
        return out
    if kind is list:
        if depth > limit:
            raise _NotPlain
        items: list[Any] = []
        for value in node:
            value_kind = type(value)
            if value_kind is dict or value_kind is list:
                value = _plain_copy(value, depth + 1, limit)
            elif value_kind not in _ATOMS or (value_kind is float and not math.isfinite(value)):
                raise _NotPlain
            items.append(value)
        return items
    if kind in _ATOMS and not (kind is float and not math.isfinite(node)):
        return node
    raise _NotPlain


def _checked_copy(root: object, limit: int, at: str) -> Any:
    """A deep copy of `root` after checking its depth (as `_check_depth`, same errors).

    Decoded JSON takes a single recursive pass; anything else (or too deep: the error must name
    the same path) goes through the iterative check and `copy.deepcopy`.
    """
    if limit <= _FAST_DEPTH_LIMIT:
        try:
            return _plain_copy(root, 1, limit)
        except _NotPlain:
            pass
    _check_depth(root, limit, at)
    return copy.deepcopy(root)


def _within_depth(node: object, depth: int, limit: int) -> bool:
    """Whether containers nest no deeper than `limit` (recursive; only for small limits)."""
    if isinstance(node, dict):
        children: Any = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return True
    if depth > limit:
        return False
    return all(
        _within_depth(child, depth + 1, limit)
        for child in children
        if isinstance(child, dict | list)
    )


def _check_depth_fast(root: object, limit: int, at: str) -> None:
    """`_check_depth`, with a quick recursive pass first for the common, shallow case."""
    if limit <= _FAST_DEPTH_LIMIT and _within_depth(root, 1, limit):
        return
    _check_depth(root, limit, at)


def _path_of(entry: tuple[object, int, Any, str | int | None], at: str) -> str:
    keys: list[str | int] = []
    while entry[2] is not None:
        keys.append(entry[3])  # type: ignore[arg-type]  # non-root entries always have a key
        entry = entry[2]
    path = at
    for key in reversed(keys):
        path = _item(path, key) if isinstance(key, int) else _join(path, key)
    return path


def _object(value: object, at: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(f"{what} must be a JSON object, got {_kind_of(value)}", field=at or None)
    return value


def _list(value: object, at: str, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InputError(f"{what} must be a list, got {_kind_of(value)}", field=at or None)
    return value


def _required(obj: dict[str, Any], key: str, at: str) -> Any:
    if key not in obj or obj[key] is None:
        raise InputError(f"missing required field {key!r}", field=_join(at, key))
    return obj[key]


def _id(value: object, at: str) -> int:
    """An id: a non-negative integer below 2**63, given as an int or a string of digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value):
        number = int(value)
    else:
        raise InputError(
            f"must be an integer id or a string of digits, got {_kind_of(value)}", field=at
        )
    if not 0 <= number <= _MAX_ID:
        raise InputError(f"id {number} is out of range", field=at)
    return number


def _optional_id(value: object, at: str) -> int | None:
    return None if value is None or value == "" else _id(value, at)


def _index(value: object, at: str, what: str) -> int:
    """A small non-negative integer: tool, frame, answer index, markIndex."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{what} must be a non-negative integer, got {_kind_of(value)}", field=at)
    if not 0 <= value <= _MAX_INDEX:
        raise InputError(f"{what} must be an integer from 0 to {_MAX_INDEX}, got {value}", field=at)
    return value


def _number(value: object, at: str) -> float:
    """A finite coordinate: an int, a float or a numeric string; NaN, Infinity and bools refused."""
    if isinstance(value, bool):
        raise InputError("must be a number, got boolean", field=at)
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            raise InputError("number is too large", field=at) from None
    elif isinstance(value, str) and len(value) <= 64 and _NUMBER.fullmatch(value):
        number = float(value)
    else:
        raise InputError(f"must be a number, got {_kind_of(value)}", field=at)
    if not math.isfinite(number):
        raise InputError(f"must be a finite number, got {number}", field=at)
    return number


def _text(value: object, at: str, what: str) -> str | None:
    """An optional string; numbers (a workflow version 18.42) are turned into strings."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63:
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(value)
    raise InputError(f"{what} must be a string, got {_kind_of(value)}", field=at)


def _datetime(value: object, at: str) -> datetime:
    """An ISO 8601 date-time or the export's ``2025-03-04 10:00:04 UTC``; naive means UTC."""
    if not isinstance(value, str):
        raise InputError(f"must be a date-time string, got {_kind_of(value)}", field=at)
    text = value.strip()
    if text.endswith(" UTC"):
        text = text[:-4] + "+00:00"
    try:
        if len(text) > 64:
            raise ValueError(text)
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InputError(f"not a date-time: {value[:40]!r}", field=at) from None


def _gold(obj: dict[str, Any], key: str, at: str) -> bool | None:
    """Absent: unknown (None); null: not gold (False); else a boolean."""
    if key not in obj:
        return None
    value = obj[key]
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    raise InputError(f"must be true, false or null, got {_kind_of(value)}", field=_join(at, key))


def _classifier_version(metadata: dict[str, Any], at: str) -> str:
    return _text(metadata.get("classifier_version"), at, "classifier_version") or "1"


def _json_cell(row: dict[str, str], column: str, limits: Limits) -> object:
    """Decode a CSV cell holding JSON; an empty cell is None."""
    text = _cell(row, column)
    if not text:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise InputError("not valid JSON", field=column) from None
    _check_depth_fast(value, limits.max_depth, column)
    return value


def _cell(row: dict[str, str], column: str, *, required: bool = False) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, str) and value.strip() == ""):
        if required:
            raise InputError(f"missing required column {column!r}", field=column)
        return ""
    if not isinstance(value, str):
        raise InputError(f"must be a string, got {_kind_of(value)}", field=column)
    return value.strip()


# --- annotations -------------------------------------------------------------------------------


_Corners = tuple[float, float, float, float]  # x1, y1 (top-left), x2, y2 (bottom-right)


@dataclass(frozen=True)
class _Frame:
    width: float
    height: float


def _is_size(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


def _version(value: object, at: str) -> str | None:
    """A workflow version such as "18.42"; its numbers must fit the database's integers."""
    text = _text(value, at, "workflow_version")
    if text is not None and text.lstrip().startswith("-"):
        raise InputError(f"workflow_version {text!r} is negative", field=at)
    if text is not None:
        for part in text.split(".")[:2]:
            if part.isascii() and part.isdigit() and int(part) > _MAX_INDEX:
                raise InputError(
                    f"workflow_version {text!r} has a number over {_MAX_INDEX}", field=at
                )
    return text


def _frames(metadata: dict[str, Any]) -> list[_Frame | None]:
    """Natural image sizes per frame from metadata.subject_dimensions; unknown entries are None."""
    dims = metadata.get("subject_dimensions")
    if not isinstance(dims, list):
        return []
    frames: list[_Frame | None] = []
    for entry in dims:
        size = None
        if isinstance(entry, dict):
            width, height = entry.get("naturalWidth"), entry.get("naturalHeight")
            if _is_size(width) and _is_size(height):
                if width > _MAX_INDEX or height > _MAX_INDEX:
                    raise InputError(
                        f"an image of {width} x {height} pixels is not believable",
                        field="metadata.subject_dimensions",
                    )
                size = _Frame(float(width), float(height))
        frames.append(size)
    return frames


def _is_mark_list(value: object) -> bool:
    return isinstance(value, list) and any(
        isinstance(m, dict) and any(k in m for k in _TOOL_KEYS) for m in value
    )


def _is_combo(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(a, dict) and "task" in a and not _is_mark_list([a]) for a in value)
    )


def _task_of(annotation: object, at: str) -> tuple[dict[str, Any], str]:
    ann = _object(annotation, at, "an annotation")
    task = ann.get("task")
    if not isinstance(task, str) or not task:
        raise InputError("an annotation needs a non-empty string 'task'", field=_join(at, "task"))
    return ann, task


def _answers(ann: dict[str, Any], task: str, at: str, labels: bool) -> list[ParsedAnswer]:
    """The answers a question annotation gives; [] when the value is not a question's."""
    value, where = ann.get("value"), _join(at, "value")
    task_type = ann.get("taskType")
    if task_type is not None and not isinstance(task_type, str):
        raise InputError(
            f"taskType must be a string, got {_kind_of(task_type)}", field=_join(at, "taskType")
        )
    if task_type in _UNINTERPRETED_TYPES:
        return []
    is_question = task_type in _QUESTION_TYPES
    use_labels = labels or is_question
    items = value if isinstance(value, list) else [value]
    if value is None or items == []:
        return []
    if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        paths = [_item(where, k) for k in range(len(items))] if isinstance(value, list) else [where]
        return [
            ParsedAnswer(task, _index(v, p, "an answer index"), None)
            for v, p in zip(items, paths, strict=True)
        ]
    if use_labels and all(isinstance(v, str) for v in items):
        return [ParsedAnswer(task, None, v) for v in items if v != ""]
    if is_question:
        raise InputError(
            f"a {task_type!r} answer must be an index, a list of indices or a label", field=where
        )
    return []  # text, slider, survey ... values: kept only in the raw annotations


def _mark_kind(raw: dict[str, Any]) -> str:
    tool_type = raw.get("toolType")
    if isinstance(tool_type, str):
        return tool_type if tool_type in ("rectangle", "point") else "other"
    if _OTHER_SHAPE_KEYS.intersection(raw):
        return "other"
    if "width" in raw and "height" in raw:
        return "rectangle"
    if "x" in raw and "y" in raw:
        return "point"
    return "other"


def _loose_number(value: object) -> float:
    try:
        return _number(value, "")
    except InputError:
        return 0.0


def _corners(raw: dict[str, Any], kind: str, at: str, v2: bool) -> _Corners:
    if kind == "point":
        x, y = _number(raw.get("x"), _join(at, "x")), _number(raw.get("y"), _join(at, "y"))
        return x, y, x, y
    if kind == "other":
        x = _loose_number(raw.get("x", raw.get("x_center")))
        y = _loose_number(raw.get("y", raw.get("y_center")))
        return x, y, x, y
    width = _number(raw.get("width"), _join(at, "width"))
    height = _number(raw.get("height"), _join(at, "height"))
    for name, size in (("width", width), ("height", height)):
        if size <= 0:
            raise InputError(f"rectangle {name} must be > 0, got {size}", field=_join(at, name))
    if "x_center" in raw or "y_center" in raw:
        cx = _number(raw.get("x_center"), _join(at, "x_center"))
        cy = _number(raw.get("y_center"), _join(at, "y_center"))
        corners = (cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2)
    elif v2:
        raise InputError(
            "a FEM (classifier_version 2) rectangle needs x_center and y_center",
            field=_join(at, "x_center"),
        )
    else:
        x, y = _number(raw.get("x"), _join(at, "x")), _number(raw.get("y"), _join(at, "y"))
        corners = (x, y, x + width, y + height)
    if not all(math.isfinite(c) for c in corners):  # x + width can overflow
        raise InputError("rectangle corners overflow", field=_join(at, "width"))
    return corners


def _check_inside(corners: _Corners, frame: _Frame, raw: dict[str, Any], at: str) -> None:
    """Refuse a mark far outside its image: beyond twice its size, or below minus its size."""
    x1, y1, x2, y2 = corners
    for lo, hi, size, axis in ((x1, x2, frame.width, "x"), (y1, y2, frame.height, "y")):
        if lo < -size or hi > 2 * size:
            key = f"{axis}_center" if f"{axis}_center" in raw else axis
            raise InputError(
                f"mark lies far outside the {frame.width:g}x{frame.height:g} image",
                field=_join(at, key),
            )


def _mark(task: str, value: object, at: str, v2: bool, frames: list[_Frame | None]) -> ParsedMark:
    raw = _object(value, at, "a mark")
    tool_key = "toolIndex" if "toolIndex" in raw else "tool"
    if raw.get(tool_key) is None:
        raise InputError("a mark needs a tool index", field=_join(at, tool_key))
    tool = _index(raw[tool_key], _join(at, tool_key), "tool")
    frame = 0 if raw.get("frame") is None else _index(raw["frame"], _join(at, "frame"), "frame")
    kind = _mark_kind(raw)
    corners = _corners(raw, kind, at, v2)
    size = frames[frame] if frame < len(frames) else None
    if size is not None and kind != "other":
        _check_inside(corners, size, raw, at)
    details = raw.get("details")
    if details is None:
        details = []
    details = _list(details, _join(at, "details"), "details")
    if v2:  # FEM details only name the subtasks; the answers arrive as markIndex annotations
        details = [d for d in details if isinstance(d, dict) and "value" in d]
    label = raw.get("tool_label")
    label = label if isinstance(label, str) else None
    x1, y1, x2, y2 = corners
    return ParsedMark(task, tool, frame, kind, x1, y1, x2, y2, label, tuple(details))


def _read_annotations(
    entries: list[tuple[object, str]],
    *,
    v2: bool,
    labels: bool,
    metadata: dict[str, Any],
    limits: Limits,
) -> tuple[tuple[ParsedAnswer, ...], tuple[ParsedMark, ...]]:
    """Answers and marks of annotations given as (annotation, path) pairs."""
    flat: list[tuple[dict[str, Any], str, str]] = []
    for annotation, at in entries:
        ann, task = _task_of(annotation, at)
        value = ann.get("value")
        if isinstance(value, list) and _is_combo(value):  # PFE combo: a list of annotations
            for k, inner in enumerate(value):
                where = _item(_join(at, "value"), k)
                flat.append((*_task_of(inner, where), where))
        else:
            flat.append((ann, task, at))

    frames = _frames(metadata)
    answers: list[ParsedAnswer] = []
    marks: dict[str, list[ParsedMark]] = {}
    order: list[str] = []
    subtasks: list[tuple[dict[str, Any], str, str]] = []
    count = 0
    for ann, task, at in flat:
        value = ann.get("value")
        if "markIndex" in ann:
            subtasks.append((ann, task, at))
        elif ann.get("taskType") == "drawing" or _is_mark_list(value):
            where = _join(at, "value")
            items = _list(value, where, "a drawing task's value")
            count += len(items)
            if count > limits.max_marks:
                raise PayloadTooLarge(
                    f"more than {limits.max_marks} marks in one classification", field=where
                )
            if task not in marks:
                marks[task] = []
                order.append(task)
            marks[task].extend(
                _mark(task, m, _item(where, j), v2, frames) for j, m in enumerate(items)
            )
        else:
            answers.extend(_answers(ann, task, at, labels))

    attached: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for ann, task, at in subtasks:
        parent = task.split(".", 1)[0]
        where = _join(at, "markIndex")
        index = _index(ann["markIndex"], where, "markIndex")
        have = len(marks.get(parent, []))
        if index >= have:
            raise InputError(
                f"markIndex {index} names no mark of task {parent!r} (it has {have})", field=where
            )
        attached.setdefault((parent, index), []).append(ann)

    out: list[ParsedMark] = []
    for task in order:
        for j, mark in enumerate(marks[task]):
            extra = attached.get((task, j))
            if extra:
                mark = replace(mark, details=(*mark.details, *extra))
            out.append(mark)
    return tuple(answers), tuple(out)


# --- subjects ----------------------------------------------------------------------------------


def _locations(value: object, at: str) -> tuple[dict[str, str], ...]:
    """``[{"image/png": url}, ...]`` (API) or ``{"0": url, ...}`` (subject export)."""
    if value is None:
        return ()
    if isinstance(value, dict):
        keys: list[tuple[int, str]] = []
        for key in value:
            if not isinstance(key, str) or not _DIGITS.fullmatch(key):
                raise InputError("location keys must be frame numbers", field=_join(at, str(key)))
            keys.append((int(key), key))
        out = []
        for _, key in sorted(keys):
            url = value[key]
            if not isinstance(url, str):
                raise InputError(f"must be a URL string, got {_kind_of(url)}", field=_join(at, key))
            extension = url.split("?", 1)[0].rsplit(".", 1)[-1].lower()
            out.append({_MIME_BY_EXTENSION.get(extension, "application/octet-stream"): url})
        return tuple(out)
    items = _list(value, at, "locations")
    for i, location in enumerate(items):
        where = _item(at, i)
        _object(location, where, "a location")
        for mime, url in location.items():
            if not isinstance(url, str):
                raise InputError(
                    f"must be a URL string, got {_kind_of(url)}", field=_join(where, mime)
                )
    return tuple(dict(location) for location in items)


def _subject(obj: object, at: str) -> ParsedSubject:
    subject = _object(obj, at, "a subject")
    metadata = subject.get("metadata")
    return ParsedSubject(
        id=_id(_required(subject, "id", at), _join(at, "id")),
        metadata={} if metadata is None else _object(metadata, _join(at, "metadata"), "metadata"),
        locations=_locations(subject.get("locations"), _join(at, "locations")),
        retired=None,
    )


def _subject_ids(value: object, at: str, limits: Limits) -> tuple[int, ...]:
    items = _list(value, at, "subjects")
    if not items:
        raise InputError("a classification needs at least one subject", field=at)
    if len(items) > limits.max_subjects:
        raise PayloadTooLarge(f"more than {limits.max_subjects} subjects", field=at)
    ids = [_id(v, _item(at, i)) for i, v in enumerate(items)]
    return tuple(dict.fromkeys(ids))  # a repeated subject counts once


# --- the Panoptes object (stream, API) ---------------------------------------------------------


def _panoptes(
    obj: object, linked: object, *, source: str, limits: Limits, at: str, linked_at: str
) -> ParsedClassification:
    obj = _checked_copy(obj, limits.max_depth, at)
    linked = _checked_copy(linked, limits.max_depth, linked_at)
    data = _object(obj, at, "a classification")
    links_at = _join(at, "links")
    links = _object(_required(data, "links", at), links_at, "links")
    metadata_value = data.get("metadata")
    metadata_at = _join(at, "metadata")
    metadata = {} if metadata_value is None else _object(metadata_value, metadata_at, "metadata")
    version = _classifier_version(metadata, _join(metadata_at, "classifier_version"))
    annotations_at = _join(at, "annotations")
    annotations = _list(_required(data, "annotations", at), annotations_at, "annotations")
    answers, marks = _read_annotations(
        [(a, _item(annotations_at, i)) for i, a in enumerate(annotations)],
        v2=version.startswith("2"),
        labels=False,
        metadata=metadata,
        limits=limits,
    )
    subject_ids = _subject_ids(
        _required(links, "subjects", links_at), _join(links_at, "subjects"), limits
    )
    user_id = _optional_id(links.get("user"), _join(links_at, "user"))
    workflow_version = data.get("workflow_version", metadata.get("workflow_version"))
    subjects, login = _linked(linked, linked_at, subject_ids, user_id)
    return ParsedClassification(
        id=_id(_required(data, "id", at), _join(at, "id")),
        workflow_id=_id(_required(links, "workflow", links_at), _join(links_at, "workflow")),
        project_id=_optional_id(links.get("project"), _join(links_at, "project")),
        workflow_version=_version(workflow_version, _join(at, "workflow_version")),
        user_id=user_id,
        user_login=login,
        anonymous_key=None,
        user_ip=_text(data.get("user_ip"), _join(at, "user_ip"), "user_ip"),
        subject_ids=subject_ids,
        created_at=_datetime(_required(data, "created_at", at), _join(at, "created_at")),
        gold_standard=_gold(data, "gold_standard", at),
        expert=_text(data.get("expert_classifier"), _join(at, "expert_classifier"), "expert"),
        classifier_version=version,
        answers=answers,
        marks=marks,
        metadata=metadata,
        subjects=subjects,
        annotations=annotations,
        source=source,
    )


def _linked(
    linked: object, at: str, subject_ids: tuple[int, ...], user_id: int | None
) -> tuple[tuple[ParsedSubject, ...], str | None]:
    """The classification's subjects (in its order) and the volunteer's login from `linked`."""
    if linked is None:
        return (), None
    sideloads = _object(linked, at, "linked")
    by_id: dict[int, ParsedSubject] = {}
    subjects_at = _join(at, "subjects")
    for i, entry in enumerate(_list(sideloads.get("subjects") or [], subjects_at, "subjects")):
        subject = _subject(entry, _item(subjects_at, i))
        by_id[subject.id] = subject
    login = None
    users_at = _join(at, "users")
    for i, entry in enumerate(_list(sideloads.get("users") or [], users_at, "users")):
        user = _object(entry, _item(users_at, i), "a user")
        uid = _id(_required(user, "id", _item(users_at, i)), _join(_item(users_at, i), "id"))
        if uid == user_id:
            login = _text(user.get("login"), _join(_item(users_at, i), "login"), "login")
    return tuple(by_id[s] for s in subject_ids if s in by_id), login


def parse_classification(
    obj: object,
    *,
    linked: dict[str, Any] | None = None,
    source: str = "panoptes",
    limits: Limits = DEFAULT_LIMITS,
) -> ParsedClassification:
    """Parse one Panoptes classification object (a stream event's ``data``) and its ``linked``."""
    return _panoptes(obj, linked, source=source, limits=limits, at="", linked_at="linked")


def parse_classifications_body(
    body: object, limits: Limits = DEFAULT_LIMITS
) -> list[ParsedClassification]:
    """Parse a POST body: one classification, a list of them, or ``{"classifications": [...]}``.

    All or nothing: the first bad item raises, its field prefixed with ``[i].``.
    """
    if isinstance(body, dict) and isinstance(body.get("classifications"), list):
        items, at, linked = body["classifications"], "classifications", body.get("linked")
    elif isinstance(body, list):
        items, at, linked = body, "", None
    else:
        return [parse_classification(body, limits=limits)]
    if len(items) > limits.max_batch:
        raise PayloadTooLarge(f"more than {limits.max_batch} classifications", field=at or None)
    return [
        _panoptes(
            item, linked, source="panoptes", limits=limits, at=_item(at, i), linked_at="linked"
        )
        for i, item in enumerate(items)
    ]


def parse_kinesis_batch(body: object, *, limits: Limits = DEFAULT_LIMITS) -> list[BatchItem]:
    """Parse a Kinesis forwarder batch; each event stands alone (accepted, skipped or an error)."""
    if not isinstance(body, dict) or not isinstance(body.get("payload"), list):
        raise InputError("the body must be an object with a list 'payload'", field="payload")
    events: list[Any] = body["payload"]
    if len(events) > limits.max_batch:
        raise PayloadTooLarge(f"more than {limits.max_batch} events in one batch", field="payload")
    out = []
    for i, event in enumerate(events):
        try:
            out.append(_kinesis_event(i, event, limits))
        except InputError as error:
            out.append(BatchItem(index=i, classification=None, skipped=None, error=error.to_dict()))
    return out


def _kinesis_event(i: int, event: object, limits: Limits) -> BatchItem:
    at = _item("payload", i)
    record = _object(event, at, "an event")
    for key, wanted in (("type", "classification"), ("source", "panoptes")):
        value = record.get(key)
        if not isinstance(value, str):
            raise InputError(f"an event needs a string {key!r}", field=_join(at, key))
        if value != wanted:
            reason = f"{key} {value[:40]!r} is not {wanted!r}"
            return BatchItem(index=i, classification=None, skipped=reason, error=None)
    parsed = _panoptes(
        _required(record, "data", at),
        record.get("linked"),
        source="kinesis",
        limits=limits,
        at=_join(at, "data"),
        linked_at=_join(at, "linked"),
    )
    return BatchItem(index=i, classification=parsed, skipped=None, error=None)


# --- Caesar ------------------------------------------------------------------------------------


def parse_caesar_extract(body: object, limits: Limits = DEFAULT_LIMITS) -> ParsedClassification:
    """Parse the body Caesar POSTs to an external extractor (annotations keyed by task)."""
    data = _object(_checked_copy(body, limits.max_depth, ""), "", "the extractor body")
    metadata_value = data.get("metadata")
    metadata = {} if metadata_value is None else _object(metadata_value, "metadata", "metadata")
    version = _classifier_version(metadata, "metadata.classifier_version")
    grouped = _required(data, "annotations", "")
    entries: list[tuple[object, str]] = []
    if isinstance(grouped, dict):
        for key, group in grouped.items():
            where = _join("annotations", key)
            entries.extend((a, _item(where, j)) for j, a in enumerate(_list(group, where, key)))
    else:
        items = _list(grouped, "annotations", "annotations")
        entries = [(a, _item("annotations", i)) for i, a in enumerate(items)]
    answers, marks = _read_annotations(
        entries, v2=version.startswith("2"), labels=False, metadata=metadata, limits=limits
    )
    subject_id = _id(_required(data, "subject_id", ""), "subject_id")
    subjects: tuple[ParsedSubject, ...] = ()
    if data.get("subject") is not None:
        subject = _subject(data["subject"], "subject")
        if subject.id != subject_id:
            raise InputError(
                f"subject.id {subject.id} is not subject_id {subject_id}", "subject.id"
            )
        subjects = (subject,)
    workflow_version = data.get("workflow_version", metadata.get("workflow_version"))
    return ParsedClassification(
        id=_id(_required(data, "id", ""), "id"),
        workflow_id=_id(_required(data, "workflow_id", ""), "workflow_id"),
        project_id=_optional_id(data.get("project_id"), "project_id"),
        workflow_version=_version(workflow_version, "workflow_version"),
        user_id=_optional_id(data.get("user_id"), "user_id"),
        user_login=None,
        anonymous_key=None,
        user_ip=None,
        subject_ids=(subject_id,),
        created_at=_datetime(_required(data, "created_at", ""), "created_at"),
        gold_standard=None,
        expert=None,
        classifier_version=version,
        answers=answers,
        marks=marks,
        metadata=metadata,
        subjects=subjects,
        annotations=[a for a, _ in entries],
        source="caesar",
    )


# --- CSV exports -------------------------------------------------------------------------------


def _retired_row(value: object, at: str) -> bool:
    """subject_data's ``retired``: null (not retired) or a status row with ``retired_at``."""
    if value is None:
        return False
    row = _object(value, at, "retired")
    return bool(row.get("retired_at"))


def parse_export_row(row: dict[str, str], limits: Limits = DEFAULT_LIMITS) -> ParsedClassification:
    """Parse one row of the Panoptes classification export CSV (answers as labels)."""
    if not isinstance(row, dict):
        raise InputError(f"a CSV row must be a mapping, got {_kind_of(row)}")
    user_id = _optional_id(_cell(row, "user_id"), "user_id")
    user_name = _cell(row, "user_name") or None
    anonymous = (
        user_id is None and user_name is not None and user_name.startswith(_ANONYMOUS_PREFIX)
    )
    metadata_value = _json_cell(row, "metadata", limits)
    metadata = {} if metadata_value is None else _object(metadata_value, "metadata", "metadata")
    version = _classifier_version(metadata, "metadata.classifier_version")
    annotations_value = _json_cell(row, "annotations", limits)
    if annotations_value is None:
        raise InputError("missing required column 'annotations'", field="annotations")
    annotations = _list(annotations_value, "annotations", "annotations")
    answers, marks = _read_annotations(
        [(a, _item("annotations", i)) for i, a in enumerate(annotations)],
        v2=version.startswith("2"),
        labels=True,
        metadata=metadata,
        limits=limits,
    )
    ids_text = _cell(row, "subject_ids", required=True)
    subject_ids = _subject_ids(ids_text.split(";"), "subject_ids", limits)
    subject_data_value = _json_cell(row, "subject_data", limits)
    subject_data = _object(subject_data_value or {}, "subject_data", "subject_data")
    subjects = []
    for sid in subject_ids:
        if str(sid) not in subject_data:
            continue
        at = _join("subject_data", str(sid))
        entry = _object(subject_data[str(sid)], at, "a subject's data")
        retired = (
            _retired_row(entry["retired"], _join(at, "retired")) if "retired" in entry else None
        )
        meta = {k: v for k, v in entry.items() if k != "retired"}
        subjects.append(ParsedSubject(id=sid, metadata=meta, locations=(), retired=retired))
    gold = _cell(row, "gold_standard").lower()
    if gold not in ("", "true", "false"):
        raise InputError("must be true, false or empty", field="gold_standard")
    return ParsedClassification(
        id=_id(_cell(row, "classification_id", required=True), "classification_id"),
        workflow_id=_id(_cell(row, "workflow_id", required=True), "workflow_id"),
        project_id=None,
        workflow_version=_version(_cell(row, "workflow_version") or None, "workflow_version"),
        user_id=user_id,
        user_login=None if anonymous or user_id is None else user_name,
        anonymous_key=user_name if anonymous else None,
        user_ip=_cell(row, "user_ip") or None,
        subject_ids=subject_ids,
        created_at=_datetime(_cell(row, "created_at", required=True), "created_at"),
        gold_standard=None if "gold_standard" not in row else gold == "true",
        expert=_cell(row, "expert") or None,
        classifier_version=version,
        answers=answers,
        marks=marks,
        metadata=metadata,
        subjects=tuple(subjects),
        annotations=annotations,
        source="csv",
    )


def parse_subject_export_row(row: dict[str, str], limits: Limits = DEFAULT_LIMITS) -> ParsedSubject:
    """Parse one row of the Panoptes subject export CSV (metadata, image locations, retired_at)."""
    if not isinstance(row, dict):
        raise InputError(f"a CSV row must be a mapping, got {_kind_of(row)}")
    metadata = _json_cell(row, "metadata", limits)
    return ParsedSubject(
        id=_id(_cell(row, "subject_id", required=True), "subject_id"),
        metadata={} if metadata is None else _object(metadata, "metadata", "metadata"),
        locations=_locations(_json_cell(row, "locations", limits), "locations"),
        retired=None if "retired_at" not in row else bool(_cell(row, "retired_at")),
    )


# --- gold --------------------------------------------------------------------------------------


def gold_from_metadata(metadata: dict[str, Any]) -> GoldSignal | None:
    """The truth a subject's metadata carries (``#training_subject``, ``#feedback_N_*``), or None.

    A malformed feedback value (``#feedback_1_x: "left"``) is an InputError naming the key. A rule
    may give x without y (FEM's column strategy); each of its fields is None when absent.
    """
    if not isinstance(metadata, dict):
        raise InputError(f"metadata must be a JSON object, got {_kind_of(metadata)}", "metadata")
    flag = metadata.get("#training_subject")
    is_training = flag is True or (isinstance(flag, str) and flag.strip().lower() == "true")
    fields: dict[int, dict[str, object]] = {}
    for key, value in metadata.items():
        match = _FEEDBACK_KEY.fullmatch(key) if isinstance(key, str) else None
        if match and value is not None and value != "":
            fields.setdefault(int(match[1]), {})[match[2]] = value
    rules = []
    for number in sorted(fields):
        got = fields[number]
        at = {name: _join("metadata", f"#feedback_{number}_{name}") for name in got}
        answer = got.get("answer")
        index: int | None = None
        label: str | None = None
        if isinstance(answer, int) and not isinstance(answer, bool):
            index = _index(answer, at["answer"], "a feedback answer")
        elif isinstance(answer, str) and _DIGITS.fullmatch(answer.strip()):
            index = int(answer.strip())
        elif answer is not None:
            label = _text(answer, at["answer"], "a feedback answer")
        point = {
            name: _number(got[name], at[name]) if name in got else None
            for name in ("x", "y", "tolerance")
        }
        if index is None and label is None and all(v is None for v in point.values()):
            continue  # an id or a message alone is no truth
        rule_id = got.get("id")
        rules.append(
            FeedbackRule(
                number=number,
                rule_id=None if rule_id is None else str(rule_id),
                answer_index=index,
                answer_label=label,
                x=point["x"],
                y=point["y"],
                tolerance=point["tolerance"],
            )
        )
    if not is_training and not rules:
        return None
    return GoldSignal(is_training=is_training, rules=tuple(rules))
