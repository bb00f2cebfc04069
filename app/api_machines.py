"""Routes of machine volunteers: post a model's predictions, list the models, read calibration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session, sessionmaker

from app import machines
from app.api_engine import configured
from app.auth import Authenticator
from app.bodies import JsonBody
from app.settings import Settings


class PredictionsAnswer(BaseModel):
    """What a post of predictions did (contract 1)."""

    volunteer: str = Field(description="the model version's volunteer key, ml:<model>@<version>")
    volunteer_id: int
    accepted: int = Field(description="new predictions entered as classifications")
    in_training: int = Field(description="new predictions on training subjects: kept, not voted")
    duplicates: int = Field(description="model version + subject already seen: nothing changed")


class MachineItem(BaseModel):
    volunteer_id: int
    key: str
    model: str
    version: str
    export_id: str | None = Field(description="the gzx export it was trained on")
    training_subjects: int = Field(description="subjects it was trained on (never voted)")
    predictions: int
    in_training: int = Field(description="predictions on training subjects")
    votes: int = Field(description="predictions entered as classifications")
    excluded: bool
    created_at: str


class MachineList(BaseModel):
    workflow_id: int
    machines: list[MachineItem]


class ReliabilityBin(BaseModel):
    low: float
    high: float
    n: int
    mean_probability: float | None
    fraction_correct: float | None


class ReliabilityTable(BaseModel):
    n: int
    fraction_correct: float | None
    expected_calibration_error: float | None
    bins: list[ReliabilityBin]


class ClassCalibration(BaseModel):
    gold: ReliabilityTable
    retired: ReliabilityTable


class BoxBin(BaseModel):
    low: float
    high: float
    n: int
    mean_score: float | None
    purity: float | None = Field(description="fraction of the bin's boxes that match a gold box")
    completeness_at_low: float | None = Field(
        description="fraction of gold boxes found by the boxes scoring >= low"
    )


class BoxCalibration(BaseModel):
    n: int
    purity: float | None
    expected_calibration_error: float | None
    subjects: int = Field(description="subjects with gold boxes and boxes of this machine")
    gold_boxes: int
    bins: list[BoxBin]


class Calibration(BaseModel):
    workflow_id: int
    volunteer_id: int
    key: str
    predictions: int
    training_included: bool
    compared_with: dict[str, str]
    classes: ClassCalibration | None
    boxes: BoxCalibration | None


def add_machine_routes(
    app: FastAPI,
    sessions: sessionmaker[Session],
    auth: Authenticator,
    settings: Settings,
    notify: Callable[[list[int]], None],
) -> None:
    """Register the machine-volunteer routes on `app`."""
    read = [Depends(auth.require("read"))]

    @app.post(
        "/v1/workflows/{workflow_id}/predictions",
        tags=["machines"],
        dependencies=[Depends(auth.require("ingest"))],
    )
    def post_predictions(workflow_id: int, body: JsonBody) -> PredictionsAnswer:
        """A model's predictions (class probabilities and/or scored boxes per subject), entered
        as classifications of the volunteer `ml:<model>@<version>`; subjects of its training
        export are stored but never voted; a repeat of a model version + subject changes nothing.
        Body: docs/machines.md."""
        with sessions.begin() as session:
            _, config = configured(session, workflow_id)
            parsed = machines.parse_predictions(
                body, config, max_boxes=settings.max_marks_per_classification
            )
            outcome = machines.record_predictions(session, settings, workflow_id, config, parsed)
        if outcome.accepted:
            notify([workflow_id])  # after the commit
        return PredictionsAnswer(**outcome.to_json())

    @app.get("/v1/workflows/{workflow_id}/machines", tags=["machines"], dependencies=read)
    def list_machines(workflow_id: int) -> MachineList:
        """Every model version that posted predictions to the workflow: its export, how many
        predictions it posted, how many were on its training subjects, how many became votes."""
        with sessions() as session:
            configured(session, workflow_id)
            items = [MachineItem(**item) for item in machines.list_machines(session, workflow_id)]
        return MachineList(workflow_id=workflow_id, machines=items)

    @app.get(
        "/v1/workflows/{workflow_id}/machines/{volunteer}/calibration",
        tags=["machines"],
        dependencies=read,
    )
    def machine_calibration(
        workflow_id: int,
        volunteer: str,
        bins: Annotated[int, Query(ge=2, le=50)] = 10,
        include_training: bool = False,
    ) -> Calibration:
        """Reliability of a machine's scores: the probability of its predicted class, binned,
        against the fraction correct on gold subjects and on retired subjects; its box scores,
        binned, against purity and completeness on subjects with gold boxes. `volunteer` is
        gzx's volunteer id or the `ml:` key."""
        with sessions() as session:
            _, config = configured(session, workflow_id)
            found, model = machines.find_machine(session, workflow_id, volunteer)
            table: dict[str, Any] = machines.calibration(
                session, workflow_id, config, model, bins=bins, include_training=include_training
            )
        return Calibration(
            workflow_id=workflow_id,
            volunteer_id=found.id,
            key=found.key,
            **table,
        )
