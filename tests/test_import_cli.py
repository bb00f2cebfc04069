"""`gzx import` and `gzx workflow apply` from the command line, over PostgreSQL and SQLite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select

from app.models import Answer, Classification, Mark, Subject, WorkflowSubject
from app.service import Service
from tests import payloads as p

ROOT = Path(__file__).resolve().parent.parent


def gzx(service: Service, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GZX_")}
    env["GZX_DATABASE_URL"] = service.settings.database_url
    command = [str(Path(sys.executable).with_name("gzx")), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def count(service: Service, model: object) -> int:
    with service.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)  # type: ignore[arg-type]


def test_importing_an_export_twice_changes_nothing(service: Service, tmp_path: Path) -> None:
    """A classification export imports once; a second import adds no row and no vote."""
    rows = [
        p.export_row(
            10_000 + i,
            500 + i % 10,
            None if i % 4 == 0 else i % 13,
            "Yes" if i % 3 else "No",
            (10.0, 10.0, 5.0, 5.0) if i % 2 else None,
        )
        for i in range(300)
    ]
    export = tmp_path / "export.csv"
    p.write_export(export, rows)
    gzx(service, "workflow", "apply", str(ROOT / "examples" / "clump-scout.yaml"))
    first = gzx(service, "import", "classifications", str(export))
    assert "imported 300 classifications" in first.stderr
    counts = (count(service, Classification), count(service, Answer), count(service, Mark))
    assert counts == (300, 300, 150)
    second = gzx(service, "import", "classifications", str(export))
    assert "imported 0 classifications (300 already stored)" in second.stderr
    assert (count(service, Classification), count(service, Answer), count(service, Mark)) == counts
    with service.sessions() as session:
        states = session.scalars(select(WorkflowSubject)).all()
        assert len(states) == 10
        assert not any(s.pending for s in states)
        assert sum(sum(s.counts) for s in states) <= 300  # repeats of a volunteer count once


def test_a_subject_export_brings_locations_and_platform_retirement(service: Service) -> None:
    """The subject export's image URLs and retired flags land on the subjects."""
    gzx(service, "import", "subjects", str(ROOT / "tests" / "fixtures" / "subject_export.csv"))
    with service.sessions() as session:
        subjects = {s.id: s for s in session.scalars(select(Subject))}
    assert subjects[88001122].locations
    assert subjects[88001302].platform_retired is True
    assert subjects[88001122].platform_retired is False


def test_a_malformed_export_line_is_named(service: Service, tmp_path: Path) -> None:
    """A row with a broken id stops the import with the line and the field named."""
    rows = [p.export_row(1, 1, 2), {**p.export_row(2, 1, 3), "classification_id": "abc"}]
    export = tmp_path / "bad.csv"
    p.write_export(export, rows)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GZX_")}
    env["GZX_DATABASE_URL"] = service.settings.database_url
    result = subprocess.run(
        [str(Path(sys.executable).with_name("gzx")), "import", "classifications", str(export)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "line 3" in result.stderr
    assert "classification_id" in result.stderr
