"""Workflow configuration: what a researcher sets for one workflow (self-service).

A configuration names the question task and maps its answers to classes (by index AND by label,
since stream payloads carry indices and CSV exports carry labels), the drawing task and its tools,
the oldest workflow version whose classifications count, the repeat policy, and the settings that
later stages read (priors, retirement rule, effects, export schedule). Invalid configurations are
rejected with an `InputError` naming the field.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from app.answers import DEFAULT_PRIOR_STRENGTH, RetirementRule
from app.errors import InputError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AnswerMapping(_Strict):
    """One answer of the question task: its index and label on the platform, and its class."""

    index: int = Field(ge=0)
    label: str | None = None
    class_: str = Field(alias="class")


class QuestionTask(_Strict):
    task: str = Field(min_length=1, max_length=64)
    answers: list[AnswerMapping] = Field(min_length=1)


class Tool(_Strict):
    """A drawing tool: a rectangle, or a point that becomes a box of `box_size` around the click."""

    index: int = Field(ge=0)
    type: Literal["rectangle", "point"]
    label: str | None = None
    category: str = Field(min_length=1, max_length=100)
    box_size: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _points_need_a_size(self) -> Tool:
        if self.type == "point" and self.box_size is None:
            raise ValueError("a point tool needs box_size: [width, height]")
        if self.box_size is not None and not all(0 < s < 1e6 for s in self.box_size):
            raise ValueError("box_size must be two positive numbers")
        return self


class DrawingTask(_Strict):
    task: str = Field(min_length=1, max_length=64)
    tools: list[Tool] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_indices(self) -> DrawingTask:
        indices = [tool.index for tool in self.tools]
        if len(set(indices)) != len(indices):
            raise ValueError("tool indices must be unique")
        return self


class Priors(_Strict):
    """Priors of the answer engine (filled in by the answer-engine settings)."""

    class_prior: dict[str, float] | None = None
    confusion_strength: float = Field(default=DEFAULT_PRIOR_STRENGTH, gt=0)


class Retirement(_Strict):
    """When a subject is settled; classes are named by their names in `classes`.

    Drawing tasks settle when the subject's risk (E[false kept] + E[missed] + E[badly placed])
    is at most `mark_risk_bound` and no cluster's P(real) lies inside `cluster_bounds`. With a
    question and a drawing task, `combine` says whether all tasks or any must be settled.
    kind "risk": retire when 1 - max_k P <= risk_bound (Branson et al. 2017); "threshold": when
    P[class] >= thresholds[class] for a named class; "swap": SWAP's accept/reject pair on
    P[positive_class] (Marshall et al. 2016); "none": only the cap retires. Nothing retires below
    `min_views`; at `cap` views a subject retires as classification_count; gold never retires.
    A decision on a class in `empty_classes` is reported as nothing_here.
    """

    kind: Literal["risk", "threshold", "swap", "none"] = "risk"
    risk_bound: float = Field(default=0.01, gt=0, lt=1)
    thresholds: dict[str, float] = Field(default_factory=dict)
    accept: float = Field(default=0.95, gt=0, le=1)
    reject: float = Field(default=1e-7, ge=0, lt=1)
    positive_class: str | None = None
    empty_classes: list[str] = Field(default_factory=list)
    min_views: int = Field(default=3, ge=1)
    cap: int | None = Field(default=None, ge=1)
    mark_risk_bound: float = Field(default=0.5, gt=0)
    cluster_bounds: tuple[float, float] = (0.1, 0.9)
    combine: Literal["all", "any"] = "all"


class Effects(_Strict):
    """What a retirement causes outside gzx; `dry_run` records effects without sending them."""

    dry_run: bool = False
    panoptes: bool = False
    webhook_url: str | None = Field(default=None, pattern=r"^https?://")
    webhook_secret: str | None = None
    caesar_url: str | None = Field(default=None, pattern=r"^https?://")
    caesar_reducer_key: str = Field(default="gzx", pattern=r"^[A-Za-z0-9_.-]+$")
    # The key of the user reducer (topic reduce_by_user) that volunteer levels are pushed to.
    caesar_user_reducer_key: str = Field(default="gzx_levels", pattern=r"^[A-Za-z0-9_.-]+$")


Accuracy = Annotated[float, Field(gt=0, lt=1)]


class Level(_Strict):
    """A volunteer level, as Gravity Spy promotes volunteers to harder workflows.

    A volunteer reaches the level when, for EVERY class k, the lower end of the 90% credible
    interval of P(answer = k | truth = k) is at least `min_accuracy` (or the class's entry in
    `class_min_accuracy`), with at least `min_gold_votes` answers on gold subjects in all and
    `min_gold_per_class` on gold subjects of each class. `skill_from` says what the interval rests
    on: "gold", the volunteer's own answers on gold subjects under a flat Dirichlet prior (Gravity
    Spy's way, so nobody is promoted on the population's merit), or "confusion", the confusion
    matrix gzx learned from all votes (population prior, EM, live gold counts).
    """

    name: str = Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f]+$")
    min_accuracy: Accuracy
    class_min_accuracy: dict[str, Accuracy] = Field(default_factory=dict)
    min_gold_votes: int = Field(default=0, ge=0, le=1_000_000)
    min_gold_per_class: int = Field(default=0, ge=0, le=1_000_000)
    skill_from: Literal["gold", "confusion"] = "gold"

    def threshold(self, name: str) -> float:
        """The accuracy this level asks of class `name`."""
        return self.class_min_accuracy.get(name, self.min_accuracy)


class ExportRules(_Strict):
    """Which subjects and boxes an export keeps (docs/exports.md; algorithms.md 7.7).

    A subject is kept when it is retired (`retired_only`), no class posterior lies strictly inside
    `answer_bounds`, its E[missed objects] is at most `max_expected_missed`, every cluster with
    P(real) >= p_real_bounds[1] (a box) has P(off) <= `max_p_off`, and, with
    `no_unresolved_cluster`, no cluster's P(real) lies strictly inside `p_real_bounds` (otherwise
    such clusters become ignore regions). Subjects go to validation by a hash of (seed, subject).
    """

    retired_only: bool = True
    answer_bounds: tuple[float, float] = (0.01, 0.99)
    p_real_bounds: tuple[float, float] = (0.1, 0.9)
    max_p_off: float = Field(default=0.1, ge=0, le=1)
    no_unresolved_cluster: bool = True
    max_expected_missed: float = Field(default=0.3, ge=0)
    val_fraction: float = Field(default=0.2, ge=0, le=1)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)

    @field_validator("answer_bounds", "p_real_bounds")
    @classmethod
    def _ordered_bounds(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= bounds[0] <= bounds[1] <= 1:
            raise ValueError("bounds must be [low, high] with 0 <= low <= high <= 1")
        return bounds


class Exports(ExportRules):
    """A workflow's export defaults: the rules above, a schedule, and who hears of a new export
    (an RQ job `train_job` on the queue "train", and a webhook signed like the effects' one)."""

    schedule_interval_s: float | None = Field(default=None, gt=0)
    webhook_url: str | None = Field(default=None, pattern=r"^https?://")
    webhook_secret: str | None = None
    train_job: str = Field(default="workers.train.train_on_export", pattern=r"^[A-Za-z_][\w.]*$")

    def rules(self) -> ExportRules:
        return ExportRules.model_validate(self.model_dump(include=set(ExportRules.model_fields)))


class WorkflowConfig(_Strict):
    """Everything a researcher configures for one workflow."""

    name: str | None = Field(default=None, max_length=200)
    classes: list[str] = Field(default_factory=list)
    question: QuestionTask | None = None
    drawing: DrawingTask | None = None
    min_workflow_version: str | None = Field(default=None, pattern=r"^\d+(\.\d+)?$")
    repeats: Literal["keep_first", "keep_last"] = "keep_first"
    priors: Priors = Field(default_factory=Priors)
    retirement: Retirement = Field(default_factory=Retirement)
    effects: Effects = Field(default_factory=Effects)
    exports: Exports = Field(default_factory=Exports)
    refit_interval_s: float | None = Field(default=None, gt=0)
    # Ordered from the first level to the last: reaching a level implies every earlier one.
    levels: list[Level] = Field(default_factory=list, max_length=50)

    def class_of_index(self) -> dict[int, int]:
        """Answer index on the platform -> class number (0..K-1)."""
        assert self.question is not None
        return {a.index: self.classes.index(a.class_) for a in self.question.answers}

    def class_of_label(self) -> dict[str, int]:
        """Answer label (as CSV exports carry it) -> class number."""
        assert self.question is not None
        return {
            a.label: self.classes.index(a.class_)
            for a in self.question.answers
            if a.label is not None
        }

    def tool(self, index: int) -> Tool | None:
        if self.drawing is None:
            return None
        return next((t for t in self.drawing.tools if t.index == index), None)

    def min_version(self) -> tuple[int, int] | None:
        return parse_version(self.min_workflow_version)

    def retirement_rule(self) -> RetirementRule:
        """The rule in the answer engine's terms (classes by number)."""
        rule = self.retirement
        number = {name: k for k, name in enumerate(self.classes)}
        positive = number.get(rule.positive_class or "", 1 if len(self.classes) == 2 else 0)
        return RetirementRule(
            kind="threshold" if rule.kind == "none" else rule.kind,
            thresholds={number[c]: t for c, t in rule.thresholds.items() if c in number},
            accept=rule.accept,
            reject=rule.reject,
            positive_class=positive,
            risk_bound=rule.risk_bound,
            empty_classes=tuple(number[c] for c in rule.empty_classes if c in number),
            min_views=rule.min_views,
            cap=rule.cap,
        )

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def digest(self) -> str:
        """A stable hash of the configuration (exports record it)."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def parse_version(version: str | None) -> tuple[int, int] | None:
    """`"18.42"` -> (18, 42); None or unparseable -> None."""
    if not version:
        return None
    major, _, minor = str(version).partition(".")
    minor = minor.partition(".")[0] or "0"
    if not (major.isascii() and major.isdigit() and minor.isascii() and minor.isdigit()):
        return None  # not a version number we can compare (negative, or text)
    if int(major) >= 2**31 or int(minor) >= 2**31:
        return None
    return int(major), int(minor)


def load_config(data: Any) -> WorkflowConfig:
    """Validate a configuration; an invalid one raises InputError naming the field."""
    if not isinstance(data, dict):
        raise InputError("a workflow configuration must be a JSON object", field="body")
    try:
        config = WorkflowConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise InputError(f"{field}: {first['msg']}", field=field) from None
    _check_cross_fields(config)
    return config


def _check_cross_fields(config: WorkflowConfig) -> None:
    """Checks that span several fields, each naming the field at fault."""
    if config.question is None and config.drawing is None:
        raise InputError("configure at least a question task or a drawing task", field="question")
    if config.question is None:
        if config.levels:
            raise InputError("volunteer levels need a question task", field="levels")
        return
    if len(config.classes) < 2:
        raise InputError("a question task needs at least two classes", field="classes")
    if len(set(config.classes)) != len(config.classes):
        raise InputError("classes must be unique", field="classes")
    rule = config.retirement
    for name in [*rule.thresholds, *rule.empty_classes, rule.positive_class]:
        if name is not None and name not in config.classes:
            raise InputError(f"unknown class {name!r}", field="retirement")
    if rule.kind == "swap" and len(config.classes) != 2:
        raise InputError("the swap rule needs exactly two classes", field="retirement.kind")
    seen: set[int] = set()
    for i, answer in enumerate(config.question.answers):
        if answer.class_ not in config.classes:
            raise InputError(
                f"answer {answer.index} maps to unknown class {answer.class_!r}",
                field=f"question.answers.{i}.class",
            )
        if answer.index in seen:
            raise InputError(
                f"answer index {answer.index} is mapped twice", field=f"question.answers.{i}.index"
            )
        seen.add(answer.index)
    _check_levels(config)


def _check_levels(config: WorkflowConfig) -> None:
    """Level names are unique and per-class overrides name known classes."""
    names: set[str] = set()
    for i, level in enumerate(config.levels):
        if level.name in names:
            raise InputError(f"level {level.name!r} is named twice", field=f"levels.{i}.name")
        names.add(level.name)
        for name in level.class_min_accuracy:
            if name not in config.classes:
                raise InputError(
                    f"unknown class {name!r}", field=f"levels.{i}.class_min_accuracy.{name}"
                )
