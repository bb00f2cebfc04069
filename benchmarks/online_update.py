"""Online `update_subjects` latency for one subject with 40 votes, at a small size.

    .venv/bin/python benchmarks/online_update.py [--subjects 300] [--votes-per-subject 40]

`benchmarks/refit_pg.py` measures the same latency after loading 1e7 votes; this script builds a
small workflow instead (300 subjects x 40 votes by 200 volunteers, a tenth of the subjects gold)
through the store functions the service itself uses, refits once on the first half of the votes
(so there is a skill snapshot, and votes on gold arrive after it: the live gold counts have work
to do), then times `update_subjects` for each subject in its own transaction, as the worker runs
it, and counts the SQL statements each update sends. Needs PostgreSQL (GZX_BENCH_DATABASE_URL,
default database gzx_bench_online on the local server, recreated). Results go to
benchmarks/results/online_update.json, or to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from sqlalchemy import event
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PG = os.environ.get(
    "GZX_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/gzx_bench_online"
)
WF = 1
CONFIG = {
    "classes": ["smooth", "featured"],
    "question": {
        "task": "T0",
        "answers": [{"index": 0, "class": "smooth"}, {"index": 1, "class": "featured"}],
    },
    "retirement": {"kind": "risk", "risk_bound": 0.01, "min_views": 3},
}
FIRST_SUBJECT = 5000


def payload(cid: int, subject: int, user: int, answer: int, at: datetime) -> dict[str, Any]:
    """A minimal Panoptes classification with one answer to T0."""
    stamp = at.isoformat().replace("+00:00", "Z")
    return {
        "id": str(cid),
        "created_at": stamp,
        "updated_at": stamp,
        "workflow_version": "1.0",
        "annotations": [{"task": "T0", "value": answer}],
        "metadata": {},
        "links": {
            "project": "1",
            "workflow": str(WF),
            "user": str(user),
            "subjects": [str(subject)],
        },
    }


def build(n_subjects: int, per_subject: int, n_volunteers: int) -> None:
    """Recreate the database; store the votes in two halves with a refit between them."""
    from app import aggregation, store
    from app.db import make_engine, make_sessionmaker, migrate
    from app.models import Workflow
    from app.parsing import parse_classification
    from app.settings import Settings

    url = make_url(PG)
    with psycopg.connect(
        host=url.host, port=url.port or 5432, user=url.username, dbname="postgres", autocommit=True
    ) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{url.database}"')
    migrate(PG)
    sessions = make_sessionmaker(make_engine(Settings(database_url=PG)))
    rng = np.random.default_rng(7)
    accuracy = rng.choice([0.9, 0.7, 0.5, 0.25], size=n_volunteers, p=[0.6, 0.2, 0.1, 0.1])
    start = datetime(2025, 1, 1, tzinfo=UTC)
    votes = []
    for s in range(n_subjects):
        truth = s % 2
        for u in rng.choice(n_volunteers, size=per_subject, replace=False):
            answer = truth if rng.random() < accuracy[u] else 1 - truth
            votes.append((FIRST_SUBJECT + s, int(u) + 1, int(answer)))
    order = rng.permutation(len(votes))  # arrival order: subjects interleaved
    parsed = [
        parse_classification(payload(i + 1, *votes[j], start + timedelta(seconds=i)))
        for i, j in enumerate(order)
    ]
    with sessions.begin() as session:
        session.add(Workflow(id=WF, config=CONFIG))
    half = len(parsed) // 2
    gold = {FIRST_SUBJECT + s: CONFIG["classes"][s % 2] for s in range(0, n_subjects, 10)}
    for first, part in enumerate((parsed[:half], parsed[half:])):
        for at in range(0, len(part), 500):
            with sessions.begin() as session:
                store.record_classifications(session, part[at : at + 500], ip_salt="bench")
        if first == 0:
            with sessions.begin() as session:
                store.upsert_gold(session, WF, gold, source="upload")  # type: ignore[arg-type]
            aggregation.refit(sessions, WF)
    with psycopg.connect(conninfo(), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def conninfo() -> str:
    url = make_url(PG)
    return f"host={url.host} port={url.port or 5432} user={url.username} dbname={url.database}"


def measure(n_subjects: int, rounds: int) -> dict[str, Any]:
    """Milliseconds per update_subjects of one subject (a transaction each, as the worker runs
    it: the workflow read, the update, the commit), and the statements each one sent."""
    from app.aggregation import update_subjects
    from app.db import make_engine, make_sessionmaker
    from app.models import Workflow
    from app.settings import Settings
    from app.workflows import load_config

    engine = make_engine(Settings(database_url=PG))
    sessions = make_sessionmaker(engine)
    statements: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def count(*args: Any) -> None:
        statements.append(args[2])

    times, per_update = [], []
    for r in range(rounds):  # the first round warms the snapshot cache and the connections
        for s in range(n_subjects):
            before = len(statements)
            started = time.perf_counter()
            with sessions.begin() as session:
                workflow = session.get(Workflow, WF)
                assert workflow is not None and workflow.config is not None
                config = load_config(workflow.config)
                update_subjects(session, workflow, config, [FIRST_SUBJECT + s])
            elapsed = (time.perf_counter() - started) * 1000
            if r > 0:
                times.append(elapsed)
                per_update.append(len(statements) - before)
    times.sort()
    return {
        "p50_ms": times[len(times) // 2],
        "p99_ms": times[int(0.99 * len(times))],
        "max_ms": times[-1],
        "n": len(times),
        "statements_per_update": sorted(set(per_update)),
        "statements_note": "SQL statements per transaction, including the workflow read",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subjects", type=int, default=300)
    parser.add_argument("--votes-per-subject", type=int, default=40)
    parser.add_argument("--volunteers", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after a warm-up")
    parser.add_argument("--label", default="", help="a name for this run in the output")
    parser.add_argument("--reuse", action="store_true", help="keep a database already built")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/online_update.json")
    args = parser.parse_args()
    if not args.reuse:
        build(args.subjects, args.votes_per_subject, args.volunteers)
    result = {
        "label": args.label,
        "subjects": args.subjects,
        "votes_per_subject": args.votes_per_subject,
        "volunteers": args.volunteers,
        "load_average": os.getloadavg(),
        "machine": f"{os.cpu_count()} cores",
        **measure(args.subjects, args.rounds + 1),
    }
    runs = json.loads(args.out.read_text()) if args.out.exists() else []
    runs.append(result)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(runs, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
