"""Export benchmark: 1e5 retired subjects with 3e5 clusters, written as one export.

Rows are generated directly in PostgreSQL with generate_series (a workflow with a question and a
drawing task, subjects with image locations and sizes, retired workflow-subjects with posteriors
and marks risk, three clusters per subject, five views per subject from 5,000 volunteers), then
`app.exports.write_export` runs in a child process, which reports its own wall time and peak
resident memory (ru_maxrss) before and after. Targets (issue 5): <= 30 s and <= 500 MB.

    .venv/bin/python benchmarks/export.py [--subjects 100000] [--boxes-per-subject 3] [--twice]

The database is GZX_BENCH_DATABASE_URL (default gzx_bench_export on the local server); its
schema is rebuilt. `--twice` writes a second export and checks that every file is identical.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/gzx_bench_export"
WORKFLOW = 1


def _connect(url: str, dbname: str | None = None) -> psycopg.Connection:
    parsed = make_url(url)
    return psycopg.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 5432,
        user=parsed.username or "postgres",
        password=parsed.password,
        dbname=dbname or parsed.database,
        autocommit=True,
    )


def fresh_database(url: str) -> None:
    from app.db import migrate

    name = make_url(url).database
    with _connect(url, "postgres") as admin:
        if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            admin.execute(f'CREATE DATABASE "{name}"')
    with _connect(url) as conn:
        conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
        conn.execute("CREATE SCHEMA public")
    migrate(url)


def generate(url: str, n_subjects: int, per_subject: int) -> float:
    """Fill the database; returns the seconds it took."""
    config = {
        "name": "bench",
        "classes": ["clumpy", "not_clumpy"],
        "question": {
            "task": "T0",
            "answers": [{"index": 0, "class": "clumpy"}, {"index": 1, "class": "not_clumpy"}],
        },
        "drawing": {
            "task": "T1",
            "tools": [
                {"index": 0, "type": "point", "category": "clump", "box_size": [20, 20]},
                {"index": 1, "type": "rectangle", "category": "odd_clump"},
            ],
        },
    }
    from app.workflows import load_config

    digest = load_config(config).digest()
    started = time.perf_counter()
    with _connect(url) as conn:
        conn.execute("SELECT setseed(0.42)")
        conn.execute(
            "INSERT INTO workflows (id, name, config, config_hash, created_at, updated_at)"
            " VALUES (%s, 'bench', %s, %s, now(), now())",
            (WORKFLOW, json.dumps(config), digest),
        )
        conn.execute(
            """INSERT INTO subjects (id, metadata, locations, width, height, platform_retired,
                                     updated_at)
            SELECT s, '{}'::jsonb,
                   jsonb_build_array(jsonb_build_object('image/jpeg',
                       'https://panoptes-uploads.zooniverse.org/subject/' || s || '.jpeg')),
                   424, 424, false, now()
            FROM generate_series(1, %s) AS s""",
            (n_subjects,),
        )
        conn.execute(
            """INSERT INTO workflow_subjects (workflow_id, subject_id, pending, status,
                   n_classifications, n_views, counts, posterior, label, reason, marks_risk,
                   retired_at, updated_at)
            SELECT %s, s, false, 'retired', 5, 5, '[5, 0]'::jsonb,
                   jsonb_build_array(p, 1 - p), CASE WHEN p > 0.5 THEN 'clumpy' ELSE 'not_clumpy'
                   END, 'consensus',
                   jsonb_build_object('risk', 0.05, 'e_false_kept', 0.02,
                                      'e_missed', random() * 0.2, 'e_badly_placed', 0.01),
                   now(), now()
            FROM (SELECT s, CASE WHEN random() < 0.97 THEN 0.995 + random() * 0.005
                                 ELSE random() END AS p
                  FROM generate_series(1, %s) AS s) AS g""",
            (WORKFLOW, n_subjects),
        )
        conn.execute(
            """INSERT INTO clusters (workflow_id, subject_id, tool, frame, x1, y1, x2, y2,
                                     p_real, p_off, n_marks, n_views, kept, members)
            SELECT %s, 1 + (i - 1) %% %s, (i %% 2), 0, x, y, x + 10 + random() * 30,
                   y + 10 + random() * 30, pr, random() * 0.05, 4, 5, pr >= 0.5,
                   jsonb_build_array(i, i + 1)
            FROM (SELECT i, random() * 380 AS x, random() * 380 AS y,
                         CASE WHEN random() < 0.98 THEN 0.9 + random() * 0.1
                              ELSE random() * 0.05 END AS pr
                  FROM generate_series(1, %s) AS i) AS g""",
            (WORKFLOW, n_subjects, n_subjects * per_subject),
        )
        conn.execute(
            """INSERT INTO volunteers (id, key, kind, platform_user_id, excluded, created_at)
            SELECT v, 'user:' || v, 'user', v, false, now() FROM generate_series(1, 5000) AS v"""
        )
        conn.execute(
            """INSERT INTO classifications (id, workflow_id, volunteer_id, workflow_version,
                   version_major, version_minor, created_at, received_at, source, subject_ids, raw)
            SELECT c, %s, 1 + (c::bigint * 7919) %% 5000, '1.1', 1, 1, now(), now(), 'bench',
                   jsonb_build_array(1 + (c - 1) / 5), '{}'::jsonb
            FROM generate_series(1, %s) AS c""",
            (WORKFLOW, n_subjects * 5),
        )
        conn.execute(
            """INSERT INTO views (classification_id, workflow_id, subject_id, volunteer_id,
                                  created_at, applied_at)
            SELECT c, %s, 1 + (c - 1) / 5, 1 + (c::bigint * 7919) %% 5000, now(), now()
            FROM generate_series(1, %s) AS c""",
            (WORKFLOW, n_subjects * 5),
        )
        conn.execute("ANALYZE")
    return time.perf_counter() - started


def run_export(url: str, export_dir: str) -> None:
    """In the child: one export, then its timings and memory as one JSON line."""
    from app import exports
    from app.db import make_engine, make_sessionmaker
    from app.models import Workflow
    from app.settings import Settings
    from app.workflows import load_config

    settings = Settings(database_url=url, export_dir=Path(export_dir))
    engine = make_engine(settings)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        workflow = session.get(Workflow, WORKFLOW)
        assert workflow is not None and workflow.config is not None
        rules = load_config(workflow.config).exports.rules()
        export_id = exports.create_export(session, WORKFLOW, rules)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    status = exports.write_export(sessions, settings, export_id)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    engine.dispose()
    manifest = json.loads((Path(export_dir) / export_id / "manifest.json").read_text())
    print(
        json.dumps(
            {
                "export_id": export_id,
                "status": status,
                "seconds": round(seconds, 2),
                "cpu_seconds": round(cpu, 2),
                "rss_before_mb": round(rss_before, 1),
                "rss_peak_mb": round(rss_peak, 1),
                "counts": manifest["counts"],
                "files": {
                    p.name: p.stat().st_size
                    for p in sorted((Path(export_dir) / export_id).iterdir())
                },
                "sha256": {k: v["sha256"] for k, v in manifest["files"].items()},
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=int, default=100_000)
    parser.add_argument("--boxes-per-subject", type=int, default=3)
    parser.add_argument("--twice", action="store_true", help="check a second export is identical")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_export(*args.child)
        return
    url = os.environ.get("GZX_BENCH_DATABASE_URL", DEFAULT_URL)
    fresh_database(url)
    generated = generate(url, args.subjects, args.boxes_per_subject)
    print(
        f"generated {args.subjects} subjects, {args.subjects * args.boxes_per_subject} clusters,"
        f" {args.subjects * 5} views in {generated:.1f} s"
    )
    results = []
    with tempfile.TemporaryDirectory() as export_dir:
        for _ in range(2 if args.twice else 1):
            child = subprocess.run(
                [sys.executable, __file__, "--child", url, export_dir],
                check=True,
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            result = json.loads(child.stdout.strip().splitlines()[-1])
            results.append(result)
            print(
                f"export {result['status']}: {result['seconds']} s"
                f" ({result['cpu_seconds']} s CPU in the exporting process), peak RSS"
                f" {result['rss_peak_mb']} MB (before the export: {result['rss_before_mb']} MB)"
            )
            print(f"  counts {json.dumps(result['counts'])}")
            print(f"  files {json.dumps(result['files'])}")
    if args.twice:
        same = results[0]["sha256"] == results[1]["sha256"]
        print(f"second export byte-identical: {same}")


if __name__ == "__main__":
    main()
