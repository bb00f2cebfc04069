"""A refit of N votes stored in PostgreSQL, end to end (`gzx refit` in its own process: read every
vote with one binary COPY, EM, snapshot, every subject's posterior and retirement written back),
and the online `update_subjects` latency for subjects with 40 votes.

    .venv/bin/python benchmarks/refit_pg.py [--votes 10000000] [--subjects 500000]

The votes are generated inside PostgreSQL (generate_series): volunteers of mixed skill (good,
mediocre, spammers, adversaries) with heavy-tailed activity, about votes/subjects votes a subject.
Needs PostgreSQL (GZX_BENCH_DATABASE_URL, default database gzx_bench_refit on the local server,
recreated). Results go to benchmarks/results/refit_pg.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psycopg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PG = os.environ.get(
    "GZX_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/gzx_bench_refit"
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


def conninfo() -> str:
    url = make_url(PG)
    return f"host={url.host} port={url.port or 5432} user={url.username} dbname={url.database}"


def build(votes: int, subjects: int, volunteers: int) -> float:
    """Create the database and fill it; returns seconds spent loading."""
    from app.db import migrate

    url = make_url(PG)
    with psycopg.connect(
        host=url.host, port=url.port or 5432, user=url.username, dbname="postgres", autocommit=True
    ) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{url.database}"')
    migrate(PG)
    started = time.perf_counter()
    with psycopg.connect(conninfo(), autocommit=True) as conn:
        conn.execute("SELECT setseed(0.42)")
        conn.execute(
            "INSERT INTO workflows (id, config, created_at, updated_at)"
            " VALUES (%s, %s, now(), now())",
            (WF, json.dumps(CONFIG)),
        )
        conn.execute(
            "INSERT INTO volunteers (id, key, kind, excluded, created_at)"
            " SELECT g, 'user:' || g, 'user', false, now() FROM generate_series(1, %s) g",
            (volunteers,),
        )
        # skill: 60% good (0.9), 20% mediocre (0.7), 10% spammers (0.5), 10% adversaries (0.25)
        conn.execute(
            "CREATE UNLOGGED TABLE skill AS SELECT g AS id, CASE WHEN r < 0.6 THEN 0.9"
            " WHEN r < 0.8 THEN 0.7 WHEN r < 0.9 THEN 0.5 ELSE 0.25 END AS accuracy"
            " FROM (SELECT g, random() AS r FROM generate_series(1, %s) g) x",
            (volunteers,),
        )
        conn.execute(
            "CREATE UNLOGGED TABLE gen AS SELECT g AS id,"
            " 1 + floor(random() * %s)::bigint AS subject_id,"
            " 1 + floor(%s * power(random(), 3))::bigint AS volunteer_id,"
            " random() AS draw FROM generate_series(1, %s) g",
            (subjects, volunteers, votes),
        )
        conn.execute(
            "INSERT INTO classifications (id, workflow_id, volunteer_id, workflow_version,"
            " version_major, version_minor, created_at, received_at, source, subject_ids, raw)"
            " SELECT id, %s, volunteer_id, '1.0', 1, 0,"
            " timestamp '2025-01-01' + id * interval '1 ms',"
            " now(), 'bench', '[]', '{}' FROM gen",
            (WF,),
        )
        conn.execute(
            "INSERT INTO views"
            " (classification_id, workflow_id, subject_id, volunteer_id, created_at)"
            " SELECT id, %s, subject_id, volunteer_id,"
            " timestamp '2025-01-01' + id * interval '1 ms'"
            " FROM gen ORDER BY id",
            (WF,),
        )
        conn.execute(
            "INSERT INTO answers (classification_id, workflow_id, subject_id, task, value,"
            " volunteer_id, created_at, version_major, version_minor)"
            " SELECT gen.id, %s, gen.subject_id, 'T0',"
            " CASE WHEN gen.draw < skill.accuracy THEN gen.subject_id %% 2"
            " ELSE 1 - gen.subject_id %% 2 END, gen.volunteer_id,"
            " timestamp '2025-01-01' + gen.id * interval '1 ms', 1, 0"
            " FROM gen JOIN skill ON skill.id = gen.volunteer_id",
            (WF,),
        )
        conn.execute(
            "INSERT INTO workflow_subjects (workflow_id, subject_id, pending, status,"
            " n_classifications, n_views, updated_at)"
            " SELECT %s, subject_id, false, 'live', count(*), count(*), now()"
            " FROM gen GROUP BY subject_id",
            (WF,),
        )
        conn.execute("DROP TABLE gen")
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


def refit_once() -> tuple[float, float]:
    """Seconds and peak MB of `gzx refit` in its own process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GZX_")}
    env["GZX_DATABASE_URL"] = PG
    gzx = Path(sys.executable).with_name("gzx")
    started = time.perf_counter()
    done = subprocess.run(
        [str(gzx), "refit", str(WF)], env=env, check=True, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    for line in done.stderr.splitlines():
        if "refit of workflow" in line:
            print("  " + line.split(":", 2)[-1].strip(), flush=True)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, peak_kb / 1024


def accuracy() -> float:
    with psycopg.connect(conninfo()) as conn:
        rows = conn.execute(
            "SELECT subject_id, label FROM workflow_subjects WHERE workflow_id = %s", (WF,)
        ).fetchall()
    truth = {0: "smooth", 1: "featured"}
    return float(np.mean([label == truth[s % 2] for s, label in rows]))


def update_latency(samples: int) -> dict[str, float]:
    """update_subjects for one subject with 40 votes (no queue wait), in milliseconds."""
    from app.aggregation import update_subjects
    from app.db import make_engine, make_sessionmaker
    from app.models import Workflow
    from app.settings import Settings
    from app.workflows import load_config

    with psycopg.connect(conninfo(), autocommit=True) as conn:
        for table in ("answers", "views"):  # a previous run's latency subjects
            conn.execute(f"DELETE FROM {table} WHERE classification_id >= 9000000000")
        conn.execute("DELETE FROM classifications WHERE id >= 9000000000")
        conn.execute("DELETE FROM workflow_subjects WHERE subject_id >= 800000000")
        conn.execute(
            "INSERT INTO classifications (id, workflow_id, volunteer_id, workflow_version,"
            " version_major, version_minor, created_at, received_at, source, subject_ids, raw)"
            " SELECT 9000000000 + s * 100 + v, %s, v, '1.0', 1, 0, now(), now(), 'bench',"
            " '[]', '{}'"
            " FROM generate_series(1, %s) s, generate_series(1, 40) v",
            (WF, samples),
        )
        conn.execute(
            "INSERT INTO views"
            " (classification_id, workflow_id, subject_id, volunteer_id, created_at)"
            " SELECT 9000000000 + s * 100 + v, %s, 800000000 + s, v, now()"
            " FROM generate_series(1, %s) s, generate_series(1, 40) v",
            (WF, samples),
        )
        conn.execute(
            "INSERT INTO answers (classification_id, workflow_id, subject_id, task, value,"
            " volunteer_id, created_at, version_major, version_minor)"
            " SELECT 9000000000 + s * 100 + v, %s, 800000000 + s, 'T0', (s + v) %% 2,"
            " v, now(), 1, 0"
            " FROM generate_series(1, %s) s, generate_series(1, 40) v",
            (WF, samples),
        )
        conn.execute(
            "INSERT INTO workflow_subjects (workflow_id, subject_id, pending, status,"
            " n_classifications, n_views, updated_at)"
            " SELECT %s, 800000000 + s, true, 'live', 0, 0, now() FROM generate_series(1, %s) s",
            (WF, samples),
        )
        conn.execute("ANALYZE")
    sessions = make_sessionmaker(make_engine(Settings(database_url=PG)))
    times = []
    for s in range(1, samples + 1):
        started = time.perf_counter()
        with sessions.begin() as session:
            workflow = session.get(Workflow, WF)
            assert workflow is not None
            update_subjects(session, workflow, load_config(workflow.config), [800000000 + s])
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {
        "p50_ms": times[len(times) // 2],
        "p99_ms": times[int(0.99 * len(times))],
        "max_ms": times[-1],
        "n": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--votes", type=int, default=10_000_000)
    parser.add_argument("--subjects", type=int, default=500_000)
    parser.add_argument("--volunteers", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument(
        "--reuse", action="store_true", help="keep the database a previous run loaded (migrated)"
    )
    args = parser.parse_args()
    if args.reuse:
        from app.db import migrate

        migrate(PG)
        load_s = float("nan")
    else:
        load_s = build(args.votes, args.subjects, args.volunteers)
    print(f"loaded {args.votes:,} votes in {load_s:.0f} s", flush=True)
    runs = []
    for _ in range(args.runs):
        runs.append(refit_once())
        print(f"refit: {runs[-1][0]:.1f} s", flush=True)
    result = {
        "votes": args.votes,
        "subjects": args.subjects,
        "volunteers": args.volunteers,
        "refit_seconds_runs": [r[0] for r in runs],
        "refit_seconds_median": float(np.median([r[0] for r in runs])),
        "refit_peak_mb": max(r[1] for r in runs),
        "accuracy": accuracy(),
        "update_subject_40_votes": update_latency(args.latency_samples),
        "machine": f"{os.cpu_count()} cores",
    }
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / "refit_pg.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
