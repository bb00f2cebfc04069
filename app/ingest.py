"""Ingest: parsed classifications are checked against their workflow's configuration, stored
once each, and only after the commit handed to the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app import store
from app.errors import GzxError, InputError
from app.models import Workflow
from app.parsing import ParsedClassification
from app.pipeline import Dispatcher
from app.workflows import WorkflowConfig, load_config


def check_against_config(parsed: ParsedClassification, config: WorkflowConfig) -> None:
    """Reject marks from tools the configured drawing task does not have.

    Annotations of tasks the workflow does not configure are not an error: they are kept and ignored.
    """
    if config.drawing is None:
        return
    configured = {tool.index for tool in config.drawing.tools}
    for position, mark in enumerate(parsed.marks):
        if mark.task == config.drawing.task and mark.tool not in configured:
            raise InputError(
                f"tool {mark.tool} is not configured for task {mark.task} "
                f"(configured tools: {sorted(configured)})",
                field=f"annotations.{mark.task}.marks[{position}].tool",
            )


def workflow_configs(session: Session, workflow_ids: set[int]) -> dict[int, WorkflowConfig]:
    rows = session.execute(
        select(Workflow.id, Workflow.config).where(
            Workflow.id.in_(workflow_ids), Workflow.config.is_not(None)
        )
    )
    return {workflow_id: load_config(config) for workflow_id, config in rows}


@dataclass
class IngestOutcome:
    """Per input item: "stored", "duplicate" or "rejected" (then `errors` has its reason)."""

    outcomes: list[str] = field(default_factory=list)
    errors: dict[int, dict[str, str]] = field(default_factory=dict)

    def count(self, outcome: str) -> int:
        return self.outcomes.count(outcome)


def ingest(
    sessions: sessionmaker[Session],
    dispatcher: Dispatcher,
    items: Sequence[ParsedClassification],
    *,
    ip_salt: str,
    each_stands_alone: bool,
) -> IngestOutcome:
    """Store `items` in one transaction, then notify the pipeline.

    With `each_stands_alone` (stream batches) an item that fails the configuration check is
    rejected alone; otherwise the first failure rejects the whole request.
    """
    outcome = IngestOutcome(outcomes=["rejected"] * len(items))
    with sessions.begin() as session:
        configs = workflow_configs(session, {p.workflow_id for p in items})
        accepted: list[tuple[int, ParsedClassification]] = []
        for position, parsed in enumerate(items):
            config = configs.get(parsed.workflow_id)
            try:
                if config is not None:
                    check_against_config(parsed, config)
            except GzxError as error:
                if not each_stands_alone:
                    raise InputError(error.message, field=f"[{position}].{error.field}") from None
                outcome.errors[position] = error.to_dict()
                continue
            accepted.append((position, parsed))
        result = store.record_classifications(session, [p for _, p in accepted], ip_salt=ip_salt)
    for (position, _), stored in zip(accepted, result.outcomes, strict=True):
        outcome.outcomes[position] = stored
    dispatcher.notify(result.workflow_ids & set(configs))
    return outcome
