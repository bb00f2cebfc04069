"""Dashboard benchmark: every dashboard page and every data route it calls, with 1e5 subjects
stored, must answer in <= 300 ms (median of several requests over HTTP).

The database (PostgreSQL, a fresh database of its own) is filled in SQL with generate_series:
a binary question workflow with a box tool and a cap of 20, 100,000 subjects with 8 votes each
(800,000 classifications, views and answers) from 5,000 volunteers over four weeks, a skill
snapshot, retirement events spread over those weeks, 200 gold subjects, and marks and clusters on
the first 200 subjects. The service then runs as `gzx serve` would (uvicorn on a loopback port,
in-process jobs) and each route is asked `--repeat` times after one warm-up request.

    .venv/bin/python benchmarks/dashboard.py [--database-url URL] [--subjects N] [--repeat K]

It writes benchmarks/results/dashboard.json and prints a table; exit status 1 if a median is
over the limit. `first ms` is the first request of each route (cold caches: the volunteer table
is computed then and kept until a view, the skills, the configuration or the gold change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import uvicorn
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app import store
from app.api_query import encode_cursor
from app.db import make_engine, make_sessionmaker, migrate
from app.service import build_service
from app.settings import Settings

WF = 4242
VOLUNTEERS = 5000
VOTES = 8
LIMIT_MS = 300.0
RESULTS = Path(__file__).resolve().parent / "results" / "dashboard.json"

CONFIG = {
    "name": "Benchmark: clumpy or not?",
    "classes": ["clumpy", "not_clumpy"],
    "question": {
        "task": "T0",
        "answers": [
            {"index": 0, "label": "Yes", "class": "clumpy"},
            {"index": 1, "label": "No", "class": "not_clumpy"},
        ],
    },
    "drawing": {
        "task": "T1",
        "tools": [{"index": 1, "type": "rectangle", "label": "Clump", "category": "clump"}],
    },
    "retirement": {"min_views": 3, "cap": 20, "kind": "risk", "risk_bound": 0.01},
}


def fresh_database(url: str) -> None:
    parsed = make_url(url)
    with psycopg.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 5432,
        user=parsed.username or "postgres",
        dbname="postgres",
        autocommit=True,
    ) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{parsed.database}"')
    migrate(url)


FILL = [
    """INSERT INTO workflows (id, name, config, config_hash, created_at, updated_at)
       VALUES (:wf, :name, CAST(:config AS jsonb), 'bench', now(), now())""",
    """INSERT INTO volunteers (key, kind, platform_user_id, excluded, created_at)
       SELECT 'user:' || g, 'user', g, false, now() FROM generate_series(1, :volunteers) g""",
    """INSERT INTO subjects (id, metadata, locations, width, height, platform_retired, updated_at)
       SELECT s, '{}'::jsonb,
              jsonb_build_array(jsonb_build_object('image/png',
                'http://127.0.0.1:9/subjects/' || s || '.png')),
              424, 424, false, now()
       FROM generate_series(1, :subjects) s""",
    # vote k of subject s: volunteer 1 + (s * 7919 + k * 4729) % U (distinct for k = 1..8)
    """CREATE TEMP TABLE votes AS
       SELECT s, k, s * 10 + k AS cid,
              1 + ((s::bigint * 7919 + k * 4729) % :volunteers) AS volunteer,
              timestamptz '2025-03-01 00:00+00' + ((s - 1) * 8 + k) * interval '3 seconds'
                AS created,
              CASE WHEN random() < 0.85 THEN s % 2 ELSE 1 - s % 2 END AS answer
       FROM generate_series(1, :subjects) s, generate_series(1, :votes) k""",
    """INSERT INTO classifications (id, workflow_id, volunteer_id, workflow_version,
         version_major, version_minor, created_at, received_at, source, subject_ids, raw)
       SELECT cid, :wf, volunteer, '1.1', 1, 1, created, created, 'stream',
              jsonb_build_array(s), '{}'::jsonb FROM votes ORDER BY cid""",
    """INSERT INTO views (classification_id, workflow_id, subject_id, volunteer_id, created_at,
         applied_at)
       SELECT cid, :wf, s, volunteer, created, created FROM votes ORDER BY cid""",
    """INSERT INTO answers (classification_id, workflow_id, subject_id, task, value)
       SELECT cid, :wf, s, 'T0', answer FROM votes ORDER BY cid""",
    """CREATE TEMP TABLE states AS
       SELECT s, p, CASE WHEN s % 100 < 70 THEN 'retired' WHEN s % 100 < 73 THEN 'contested'
                         ELSE 'live' END AS status,
              timestamptz '2025-03-01 00:00+00' + s * :votes * interval '3 seconds' AS last_vote
       FROM (SELECT s, CASE WHEN s % 2 = 0 THEN 0.995 - random() * 0.3
                            ELSE 0.005 + random() * 0.3 END AS p
             FROM generate_series(1, :subjects) s) g""",
    """INSERT INTO workflow_subjects (workflow_id, subject_id, pending, status,
         n_classifications, n_views, counts, posterior, label, reason, retired_label,
         retired_at, updated_at)
       SELECT :wf, s, false, status, :votes, :votes, '[4, 4]'::jsonb,
              jsonb_build_array(p, 1 - p), CASE WHEN p >= 0.5 THEN 'clumpy' ELSE 'not_clumpy' END,
              CASE WHEN status = 'live' THEN NULL ELSE 'consensus' END,
              CASE WHEN status = 'live' THEN NULL
                   WHEN status = 'contested' THEN
                     CASE WHEN p >= 0.5 THEN 'not_clumpy' ELSE 'clumpy' END
                   WHEN p >= 0.5 THEN 'clumpy' ELSE 'not_clumpy' END,
              CASE WHEN status = 'live' THEN NULL ELSE last_vote END, last_vote
       FROM states ORDER BY s""",
    """INSERT INTO retirements (workflow_id, subject_id, reason, posterior, n_votes, source,
         created_at)
       SELECT :wf, s, 'consensus', jsonb_build_array(p, 1 - p), :votes, 'online', last_vote
       FROM states WHERE status <> 'live' ORDER BY s""",
    """INSERT INTO gold (workflow_id, subject_id, label, source, updated_at)
       SELECT :wf, s, CASE WHEN s % 2 = 0 THEN 'clumpy' ELSE 'not_clumpy' END, 'upload', now()
       FROM generate_series(1, :subjects, 500) s""",
    """INSERT INTO marks (classification_id, workflow_id, subject_id, task, tool, frame, kind,
         x1, y1, x2, y2)
       SELECT s * 10 + k, :wf, s, 'T1', 1, 0, 'rectangle',
              40 + c * 110 + k, 60 + c * 90 - k, 80 + c * 110 + k, 100 + c * 90 - k
       FROM generate_series(1, 200) s, generate_series(1, :votes) k, generate_series(0, 2) c
       WHERE (s + k + c) % 3 <> 0""",
    """INSERT INTO clusters (workflow_id, subject_id, tool, frame, x1, y1, x2, y2, p_real,
         p_off, n_marks, n_views, kept, members)
       SELECT :wf, m.subject_id, 1, 0, min(x1), min(y1), max(x2), max(y2),
              0.2 + 0.25 * ((m.x1::int / 110) % 4), 0.05, count(*), :votes, true,
              jsonb_agg(m.id ORDER BY m.id)
       FROM marks m GROUP BY m.subject_id, (m.x1::int / 110)""",
    "ANALYZE",
]


def fill(url: str, n_subjects: int) -> float:
    """Everything above, in SQL; returns the seconds it took."""
    started = time.perf_counter()
    engine = make_engine(Settings(database_url=url))
    params = {
        "wf": WF,
        "name": CONFIG["name"],
        "config": json.dumps(CONFIG),
        "volunteers": VOLUNTEERS,
        "subjects": n_subjects,
        "votes": VOTES,
    }
    with engine.begin() as connection:
        for statement in FILL:
            if statement == "ANALYZE":
                continue
            names = {k: v for k, v in params.items() if f":{k}" in statement}
            connection.execute(text(statement), names)
    sessions = make_sessionmaker(engine)
    rng = np.random.default_rng(0)
    with sessions.begin() as session:
        correct = rng.beta(8, 2, size=(VOLUNTEERS, 2)) * 40
        counts = np.zeros((VOLUNTEERS, 2, 2))
        counts[:, 0, 0], counts[:, 1, 1] = correct[:, 0], correct[:, 1]
        counts[:, 0, 1], counts[:, 1, 0] = 40 - correct[:, 0], 40 - correct[:, 1]
        store.save_snapshot(
            session,
            WF,
            np.arange(1, VOLUNTEERS + 1, dtype=np.int64),
            counts,
            np.array([[3.0, 1.0], [1.0, 3.0]]),
            np.array([0.5, 0.5]),
            n_votes=n_subjects * VOTES,
            last_view_id=n_subjects * VOTES,
            n_iter=10,
            converged=True,
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    return time.perf_counter() - started


def routes(n_subjects: int) -> list[tuple[str, str]]:
    """(what, path) of every dashboard page and every data route the pages call."""
    subject = 2  # has marks and clusters
    w = f"/v1/workflows/{WF}"
    return [
        ("page /", "/"),
        ("page workflow", f"/workflows/{WF}"),
        ("page subject", f"/workflows/{WF}/subjects/{subject}"),
        ("dashboard.js", "/static/dashboard.js"),
        ("workflows", "/v1/workflows"),
        ("summary", f"{w}/summary"),
        ("trajectories (40 per status)", f"{w}/trajectories?per_status=40"),
        ("volunteers by votes (1000)", f"{w}/volunteers?sort=votes&limit=1000"),
        ("volunteers by information (15)", f"{w}/volunteers?sort=information&limit=15"),
        ("audit (20)", f"{w}/audit?limit=20"),
        ("subjects (25)", f"{w}/subjects?limit=25"),
        ("subjects, last page", f"{w}/subjects?limit=25&cursor={_cursor(n_subjects - 10)}"),
        ("subjects retired+label", f"{w}/subjects?limit=25&status=retired&label=not_clumpy"),
        ("subjects gold", f"{w}/subjects?limit=25&gold=true"),
        (
            "subjects P in [0.4, 0.6] (scan)",
            f"{w}/subjects?limit=25&posterior_class=clumpy&posterior_min=0.4&posterior_max=0.6",
        ),
        ("subject history", f"{w}/subjects/{subject}/history"),
        ("subject clusters + marks", f"{w}/subjects/{subject}/clusters"),
    ]


def _cursor(after: int) -> str:
    return encode_cursor({"after": after})


def measure(url: str, n_subjects: int, repeat: int) -> list[dict[str, Any]]:
    service = build_service(
        Settings(database_url=url, redis_url=None, sweep_interval_s=3600, apply_batch_size=500)
    )
    config = uvicorn.Config(
        service.app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        access_log=False,
        log_config=None,
        lifespan="off",
        ws="none",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    rows = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for what, path in routes(n_subjects):
                started = time.perf_counter()
                response = client.get(path, headers={"Accept": "text/html,application/json"})
                first = (time.perf_counter() - started) * 1000
                assert response.status_code == 200, (path, response.status_code, response.text)
                times = []
                for _ in range(repeat):
                    started = time.perf_counter()
                    response = client.get(path)
                    times.append((time.perf_counter() - started) * 1000)
                    assert response.status_code == 200
                rows.append(
                    {
                        "route": what,
                        "path": path,
                        "first_ms": round(first, 1),
                        "median_ms": round(statistics.median(times), 1),
                        "max_ms": round(max(times), 1),
                        "bytes": len(response.content),
                    }
                )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        service.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "GZX_BENCH_DATABASE_URL",
            "postgresql+psycopg://postgres@127.0.0.1:5432/gzx_bench_dashboard",
        ),
    )
    parser.add_argument("--subjects", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="reuse a filled database")
    args = parser.parse_args()
    url = Settings(database_url=args.database_url).database_url
    fill_s = None
    if not args.keep:
        fresh_database(url)
        fill_s = fill(url, args.subjects)
        print(f"filled {args.subjects:,} subjects in {fill_s:.1f} s")
    rows = measure(url, args.subjects, args.repeat)
    width = max(len(r["route"]) for r in rows)
    print(f"{'route':<{width}}  first ms  median ms  max ms   bytes")
    for r in rows:
        flag = "" if r["median_ms"] <= LIMIT_MS else "  OVER"
        line = (
            f"{r['first_ms']:>8.1f}  {r['median_ms']:>9.1f}  {r['max_ms']:>6.1f}  {r['bytes']:>7}"
        )
        print(f"{r['route']:<{width}}  {line}{flag}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "subjects": args.subjects,
                "classifications": args.subjects * VOTES,
                "volunteers": VOLUNTEERS,
                "repeat": args.repeat,
                "limit_ms": LIMIT_MS,
                "fill_s": fill_s,
                "machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.platform()}",
                "routes": rows,
            },
            indent=2,
        )
        + "\n"
    )
    return 0 if all(r["median_ms"] <= LIMIT_MS for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
