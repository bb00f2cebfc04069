"""Load: sustained ingest through the HTTP API with workers running, then a burst and its drain.

    .venv/bin/python benchmarks/load.py [--seconds 300] [--rate 500] [--burst 20000] [--workers 2]
    .venv/bin/python benchmarks/load.py --short      # CI size: 10 s at 100/s, a burst of 2,000

Loopback only, bounded in time (every phase has a deadline), stops everything it started.

Setup: a fresh PostgreSQL database (GZX_LOAD_DATABASE_URL, default gzx_bench_load on the local
server, dropped and created), Redis db 13 (GZX_LOAD_REDIS_URL, flushed), `gzx migrate`,
examples/clump-scout.yaml applied, then `gzx serve` (one uvicorn process) and `--workers`
`gzx worker` processes on the aggregate and effects queues.

(a) Sustained: classifications posted one per request to POST /v1/classifications at `--rate`
for `--seconds`, open-loop (request i is due at t0 + i/rate whatever came before, and its latency
counts from that due time), by a sender in its own process (`--send`), over `--subjects`
subjects and `--volunteers` volunteers. Every second the main process samples /metrics
(gzx_oldest_pending_seconds, gzx_pending_subjects, gzx_queue_depth), the RSS of every process
(API, workers, the PostgreSQL backends of the database, Redis) and the load average. Queue lag
is measured three ways: the metric above; for every classification, the time from its commit
(`classifications.received_at`) to the apply that first included it (`views.applied_at`); and
once a second a probe classification whose lag a client sees (answer received -> its view
applied, polled every 20 ms).

(b) Burst: `--burst` classifications posted as fast as the API takes them (lists of
`--burst-batch` per request, 16 connections), then the time until the queue drains (queue lag
under 2 s, and no pending subject).

At the end: every classification sent is stored exactly once and counted once in its subject's
state, nothing is left pending. Prints a table; writes benchmarks/results/load.json (or --out).
Exits 1 if any request failed or a count is off (targets are reported, not enforced).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
from redis import Redis
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests import payloads as p  # noqa: E402

BIN = Path(sys.executable).parent
WORKFLOW = p.WORKFLOW
SUSTAINED_BASE = 1_000_000_000
BURST_BASE = 2_000_000_000
PROBE_BASE = 3_000_000_000
TARGETS = {"p99_latency_ms": 50.0, "p99_lag_s": 2.0, "drain_s": 120.0}


# ----------------------------------------------------------------------------- the sender


def template() -> str:
    """One classification with placeholders: id, subject, user, answer, box position."""
    one = p.classic(1, 1, 7, 0, boxes=[(100.0, 50.0, 20.0, 20.0)])
    one.pop("href")
    one["id"] = "__ID__"
    one["links"]["subjects"] = ["__SUBJECT__"]
    one["links"]["user"] = "__USER__"
    text = json.dumps(one)
    text = text.replace('"value": 0', '"value": __ANSWER__', 1)
    return text.replace('"x": 100.0', '"x": __X__', 1)


def body_of(tpl: str, cid: int, subjects: int, volunteers: int) -> str:
    """Classification `cid` (deterministic): a spread of subjects and volunteers, answers 0/1."""
    h = (cid * 2654435761) & 0xFFFFFFFF
    return (
        tpl.replace("__ID__", str(cid))
        .replace("__SUBJECT__", str(1 + h % subjects))
        .replace("__USER__", str(1 + (h >> 8) % volunteers))
        .replace("__ANSWER__", str((h >> 3) & 1))
        .replace("__X__", str(80 + (h >> 12) % 60))
    )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def send(spec: dict[str, Any]) -> dict[str, Any]:
    """Open-loop (spec["rate"] > 0: request i due at t0 + i/rate, latency from its due time)
    or as fast as possible (rate 0). Plain asyncio sockets with keep-alive."""
    tpl = template()
    rate, n, batch = float(spec["rate"]), int(spec["requests"]), int(spec["batch"])
    base, subjects, volunteers = int(spec["base"]), int(spec["subjects"]), int(spec["volunteers"])
    due: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    cutoff = [float("inf")]  # no request leaves after this moment (set once t0 is known)
    not_sent: list[float] = []
    latencies: list[float] = []
    service: list[float] = []
    done_at: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(spec["port"]))
        while (job := await due.get()) is not None:
            i, at = job
            if time.perf_counter() > cutoff[0]:
                not_sent.append(at)
                continue
            ids = range(base + i * batch, base + (i + 1) * batch)
            parts = [body_of(tpl, cid, subjects, volunteers) for cid in ids]
            body = (parts[0] if batch == 1 else "[" + ",".join(parts) + "]").encode()
            started = time.perf_counter()
            try:
                writer.write(
                    b"POST /v1/classifications HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body)
                )
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                status = head.split(b" ", 2)[1].decode()
            except (OSError, asyncio.IncompleteReadError) as error:
                status = "error"
                errors.append(repr(error))
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", int(spec["port"]))
            end = time.perf_counter()
            statuses[status] = statuses.get(status, 0) + 1
            latencies.append((end - at) * 1000)
            service.append((end - started) * 1000)
            done_at.append(end)
        writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(int(spec["connections"]))]
    await asyncio.sleep(0.2)
    t0 = time.perf_counter()
    wall0 = time.time()
    if float(spec.get("cutoff_s") or 0) > 0:
        cutoff[0] = t0 + float(spec["cutoff_s"])
    for i in range(n):
        at = t0 + i / rate if rate > 0 else t0
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        due.put_nowait((i, at))
    for _ in workers:
        due.put_nowait(None)
    await asyncio.gather(*workers)
    stopped = time.perf_counter()
    # A request never sent (the server held every connection past the cut-off) waited at least
    # until the cut-off: counted at that lower bound, so a stalled server cannot hide its backlog.
    latencies += [(stopped - at) * 1000 for at in not_sent]
    elapsed = max(done_at) - t0 if done_at else float("nan")
    per_second = [0] * (int(elapsed) + 1 if done_at else 0)
    for end in done_at:
        per_second[min(len(per_second) - 1, int(end - t0))] += batch
    sent = n - len(not_sent)
    return {
        "started_unix": wall0,
        "requests": sent,
        "requests_due": n,
        "not_sent_past_cutoff": len(not_sent),
        "classifications": sent * batch,
        "batch": batch,
        "elapsed_s": elapsed,
        "classifications_per_s": sent * batch / elapsed,
        "statuses": statuses,
        "errors": errors[:10],
        "latency_ms": {
            "p50": percentile(latencies, 0.5),
            "p90": percentile(latencies, 0.9),
            "p99": percentile(latencies, 0.99),
            "p999": percentile(latencies, 0.999),
            "max": max(latencies, default=float("nan")),
        },
        "service_ms": {"p50": percentile(service, 0.5), "p99": percentile(service, 0.99)},
        "completed_per_second": per_second,
    }


def run_sender(spec: dict[str, Any], deadline_s: float) -> dict[str, Any]:
    """The sender in its own process, so that its CPU is not the API's or this process's."""
    done = subprocess.run(
        [sys.executable, __file__, "--send", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=deadline_s,
    )
    if done.returncode != 0:
        raise RuntimeError(f"sender failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)  # type: ignore[no-any-return]


# ------------------------------------------------------------------------- the services


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_connect(url: str, database: str | None = None) -> psycopg.Connection[Any]:
    u = make_url(url)
    return psycopg.connect(
        host=u.host or "127.0.0.1",
        port=u.port or 5432,
        user=u.username or "postgres",
        password=u.password,
        dbname=database or u.database,
        autocommit=True,
    )


def fresh_database(url: str, redis_url: str) -> None:
    name = make_url(url).database
    with pg_connect(url, "postgres") as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    Redis.from_url(redis_url).flushdb()
    env = {**os.environ, "GZX_DATABASE_URL": url, "GZX_REDIS_URL": redis_url}
    for command in (
        ["migrate"],
        ["workflow", "apply", str(ROOT / "examples" / "clump-scout.yaml")],
    ):
        subprocess.run(
            [str(BIN / "gzx"), *command], env=env, check=True, capture_output=True, timeout=120
        )


class Services:
    """`gzx serve` and the workers, started and stopped here (by their own pids only)."""

    def __init__(
        self, url: str, redis_url: str, workers: int, logs: Path, apply_batch: int | None = None
    ) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "GZX_DATABASE_URL": url,
            "GZX_REDIS_URL": redis_url,
            "GZX_LOG_LEVEL": "WARNING",
        }
        if apply_batch:
            env["GZX_APPLY_BATCH_SIZE"] = str(apply_batch)
        for key in ("GZX_TOKENS", "GZX_KINESIS_PASSWORD", "GZX_CAESAR_SECRET"):
            env.pop(key, None)  # an open API on loopback: no credential to send
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._start("api", [str(BIN / "gzx"), "serve", "--port", str(self.port)], env)
        for k in range(workers):
            command = [str(BIN / "gzx"), "worker", "--queue", "aggregate", "--queue", "effects"]
            self._start(f"worker{k + 1}", command, env)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url("/healthz"), timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited: see {self.logs / name}.log")
            if time.monotonic() > deadline:
                raise RuntimeError("gzx serve did not answer /healthz within 60 s")
            time.sleep(0.2)

    def _start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def alive(self) -> dict[str, bool]:
        return {name: process.poll() is None for name, process in self.processes.items()}

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


# ------------------------------------------------------------------------- observation


def proc_memory(pid: int) -> tuple[float, float] | None:
    """(VmRSS, RssAnon) in MiB from /proc/<pid>/status; None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = dict(re.findall(r"^(VmRSS|RssAnon):\s+(\d+) kB", text, re.M))
    return int(found.get("VmRSS", 0)) / 1024, int(found.get("RssAnon", 0)) / 1024


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_metrics(text: str) -> dict[str, float]:
    wanted = ("gzx_oldest_pending_seconds", "gzx_pending_subjects", "gzx_queue_depth")
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            values[name] = float(value)
    return values


class Sampler(threading.Thread):
    """Once a second: /metrics, every process's memory, the load average."""

    def __init__(self, services: Services, url: str, redis: Redis, interval: float = 1.0) -> None:
        super().__init__(name="load-sampler", daemon=True)
        self.services, self.redis, self.interval = services, redis, interval
        self.database = make_url(url).database
        self.pg = pg_connect(url)
        self.own_backend = self.pg.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        self.client = httpx.Client(timeout=5)
        self.redis_pid = int(redis.info("server")["process_id"])
        self.samples: list[dict[str, Any]] = []
        # pid -> phase -> CPU seconds at the last sample of that phase (backends come and go)
        self.backend_cpu: dict[int, dict[str, float]] = {}
        self.phase = "setup"
        self.t0 = time.time()
        self._halt = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self._halt.is_set():
            try:
                self.samples.append(self.sample())
            except Exception as error:  # a missed sample is recorded, not fatal
                self.samples.append({"t": time.time() - self.t0, "error": repr(error)})
            next_at += self.interval
            self._halt.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.pg.close()
        self.client.close()

    def sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {"t": round(time.time() - self.t0, 3), "phase": self.phase}
        # The queue lag as /metrics computes it, read here too: /metrics answers from the API's
        # thread pool, which a stalled ingest can hold up.
        pending, oldest = self.pg.execute(
            "SELECT count(*), EXTRACT(EPOCH FROM now() - min(updated_at))"
            " FROM workflow_subjects WHERE pending"
        ).fetchone()  # type: ignore[misc]
        row["db_pending_subjects"] = int(pending)
        row["db_oldest_pending_seconds"] = max(0.0, float(oldest or 0.0))
        started = time.perf_counter()
        try:
            response = self.client.get(self.services.url("/metrics"), timeout=2)
            row.update(parse_metrics(response.text))
        except httpx.HTTPError:
            row["metrics_timeout"] = True
        row["metrics_ms"] = round((time.perf_counter() - started) * 1000, 1)
        memory: dict[str, float] = {}
        for name, process in self.services.processes.items():
            found = proc_memory(process.pid)
            if found:
                memory[name] = round(found[0], 1)
        backends = [
            pid
            for (pid,) in self.pg.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> %s",
                (self.database, self.own_backend),
            )
        ]
        rss = anon = 0.0
        for pid in backends:
            found = proc_memory(pid)
            if found:
                rss, anon = rss + found[0], anon + found[1]
            self.backend_cpu.setdefault(pid, {})[self.phase] = cpu_seconds(pid)
        memory["pg_backends"] = round(rss, 1)
        memory["pg_backends_anon"] = round(anon, 1)
        # The pool opens connections as it needs them: the trend is judged per backend.
        memory["pg_backend_anon_each"] = round(anon / len(backends), 2) if backends else 0.0
        row["pg_backends_n"] = len(backends)
        found = proc_memory(self.redis_pid)
        if found:
            memory["redis"] = round(found[0], 1)
        memory["redis_used"] = round(int(self.redis.info("memory")["used_memory"]) / 2**20, 1)
        row["memory_mb"] = memory
        row["load1"] = os.getloadavg()[0]
        return row


class Probe(threading.Thread):
    """Once a second: post one classification, then poll until its view is applied. The lag a
    client sees: from the API's answer to the posterior that includes it."""

    def __init__(self, services: Services, url: str, subjects: int, volunteers: int) -> None:
        super().__init__(name="load-probe", daemon=True)
        self.services, self.subjects, self.volunteers = services, subjects, volunteers
        self.pg = pg_connect(url)
        self.client = httpx.Client(timeout=30)
        self.tpl = template()
        self.results: list[dict[str, Any]] = []
        self.sent = 0
        self.failed = 0
        self.phase = "setup"
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(40)
        self.pg.close()
        self.client.close()

    def run(self) -> None:
        while not self._halt.is_set():
            tick = time.monotonic()
            cid = PROBE_BASE + self.sent
            body = body_of(self.tpl, cid, self.subjects, self.volunteers)
            self.sent += 1
            phase = self.phase
            posted = time.perf_counter()
            try:
                response = self.client.post(
                    self.services.url("/v1/classifications"),
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
            except httpx.HTTPError:
                self.failed += 1
                continue
            answered = time.perf_counter()
            if response.status_code != 200:
                self.failed += 1
                continue
            lag = None
            while time.perf_counter() - answered < 120 and not self._halt.is_set():
                row = self.pg.execute(
                    "SELECT applied_at FROM views WHERE classification_id = %s", (cid,)
                ).fetchone()
                if row and row[0] is not None:
                    lag = time.perf_counter() - answered
                    break
                time.sleep(0.02)
            self.results.append(
                {
                    "phase": phase,
                    "ack_ms": (answered - posted) * 1000,
                    "lag_s": lag,
                }
            )
            self._halt.wait(max(0.0, 1.0 - (time.monotonic() - tick)))


# ----------------------------------------------------------------------------- analysis


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) points, in MiB per minute."""
    if len(points) < 3:
        return float("nan")
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0


def memory_trend(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per process over the sustained phase: start, end, max, and the slope over its second half.
    Flat: the second half's fitted growth is under max(5 % of its mean, 4 MiB)."""
    sustained = [s for s in samples if s.get("phase") == "sustained" and "memory_mb" in s]
    if not sustained:
        return {}
    t_start, t_end = sustained[0]["t"], sustained[-1]["t"]
    half = (t_start + t_end) / 2
    out: dict[str, dict[str, Any]] = {}
    for name in sustained[-1]["memory_mb"]:
        series = [(s["t"], s["memory_mb"][name]) for s in sustained if name in s["memory_mb"]]
        second = [(t, v) for t, v in series if t >= half]
        slope = slope_per_min(second)
        mean = statistics.fmean(v for _, v in second) if second else float("nan")
        growth = slope * (t_end - half) / 60
        out[name] = {
            "start_mb": series[0][1],
            "end_mb": series[-1][1],
            "max_mb": max(v for _, v in series),
            "slope_second_half_mb_per_min": round(slope, 3),
            "growth_second_half_mb": round(growth, 2),
            "flat": bool(abs(growth) <= max(0.05 * mean, 4.0)),
        }
    return out


def database_lag(url: str, first: int, last: int) -> dict[str, Any]:
    """Commit -> first apply, for every classification with id in [first, last]."""
    with pg_connect(url) as conn:
        row = conn.execute(
            "SELECT count(*), count(v.applied_at),"
            " percentile_cont(ARRAY[0.5, 0.9, 0.99, 0.999]) WITHIN GROUP (ORDER BY lag),"
            " max(lag)"
            " FROM (SELECT v.applied_at, EXTRACT(EPOCH FROM v.applied_at - c.received_at) AS lag"
            "       FROM classifications c JOIN views v ON v.classification_id = c.id"
            "       WHERE c.id BETWEEN %s AND %s) AS v",
            (first, last),
        ).fetchone()
        windows = conn.execute(
            "SELECT floor(EXTRACT(EPOCH FROM c.received_at - t0.t) / 10)::int AS w,"
            " count(*), percentile_cont(0.99) WITHIN GROUP"
            " (ORDER BY EXTRACT(EPOCH FROM v.applied_at - c.received_at)),"
            " max(EXTRACT(EPOCH FROM v.applied_at - c.received_at))"
            " FROM classifications c JOIN views v ON v.classification_id = c.id,"
            " (SELECT min(received_at) AS t FROM classifications WHERE id BETWEEN %s AND %s) t0"
            " WHERE c.id BETWEEN %s AND %s GROUP BY 1 ORDER BY 1",
            (first, last, first, last),
        ).fetchall()
    assert row is not None
    n, applied, quantiles, worst = row
    quantiles = quantiles or [None] * 4
    return {
        "n": n,
        "applied": applied,
        "p50_s": quantiles[0],
        "p90_s": quantiles[1],
        "p99_s": quantiles[2],
        "p999_s": quantiles[3],
        "max_s": float(worst) if worst is not None else None,
        "per_10s": [
            {"window": w, "n": c, "p99_s": float(q), "max_s": float(m)} for w, c, q, m in windows
        ],
    }


def check_counts(url: str, sent: int) -> dict[str, Any]:
    """Every classification sent stored once, counted once, nothing left pending."""
    with pg_connect(url) as conn:

        def one(sql: str) -> int:
            value = conn.execute(sql).fetchone()
            return int(value[0] or 0) if value else 0

        found = {
            "sent": sent,
            "classifications": one("SELECT count(*) FROM classifications"),
            "views": one("SELECT count(*) FROM views"),
            "distinct_view_classifications": one(
                "SELECT count(DISTINCT classification_id) FROM views"
            ),
            "sum_subject_n_classifications": one(
                "SELECT sum(n_classifications) FROM workflow_subjects"
                f" WHERE workflow_id = {WORKFLOW}"
            ),
            "views_not_applied": one("SELECT count(*) FROM views WHERE applied_at IS NULL"),
            "pending_subjects": one("SELECT count(*) FROM workflow_subjects WHERE pending"),
            "subjects": one("SELECT count(*) FROM workflow_subjects"),
            "retired": one("SELECT count(*) FROM workflow_subjects WHERE status = 'retired'"),
        }
    found["exactly_once"] = (
        found["classifications"]
        == found["views"]
        == found["distinct_view_classifications"]
        == found["sum_subject_n_classifications"]
        == sent
    )
    return found


def lag_summary(samples: list[dict[str, Any]], phase: str) -> dict[str, float]:
    """The age of the oldest pending subject (the gauge gzx_oldest_pending_seconds), sampled
    once a second from the database, and how /metrics itself fared."""
    mine = [s for s in samples if s.get("phase") == phase and "db_pending_subjects" in s]
    lags = [s["db_oldest_pending_seconds"] for s in mine]
    pend = [s["db_pending_subjects"] for s in mine]
    served = [s["gzx_oldest_pending_seconds"] for s in mine if "gzx_oldest_pending_seconds" in s]
    return {
        "samples": len(lags),
        "p50_s": percentile(lags, 0.5),
        "p99_s": percentile(lags, 0.99),
        "max_s": max(lags, default=float("nan")),
        "pending_max": max(pend, default=float("nan")),
        "metrics_served": len(served),
        "metrics_timeouts": sum(1 for s in mine if s.get("metrics_timeout")),
        "metrics_p99_ms": percentile([s["metrics_ms"] for s in mine], 0.99),
        "metrics_max_s": max(served, default=float("nan")),
    }


def wait_drained(sampler: Sampler, started: float, deadline_s: float) -> dict[str, Any]:
    """Seconds from `started` until the oldest pending subject is under 2 s old, and until none
    is pending (read from the sampler's /metrics samples and the database)."""
    under_2s = drained = None
    t_started = started - sampler.t0
    while time.time() - started < deadline_s:
        recent = [s for s in sampler.samples if s["t"] >= t_started and "db_pending_subjects" in s]
        for s in recent:
            if under_2s is None and s["db_oldest_pending_seconds"] < 2.0:
                under_2s = s["t"] - t_started
            if drained is None and s["db_pending_subjects"] == 0:
                drained = s["t"] - t_started
        if drained is not None and under_2s is not None:
            break
        time.sleep(0.5)
    return {"lag_under_2s_after_s": under_2s, "no_pending_after_s": drained}


# ---------------------------------------------------------------------------------- main


def cpu_of(services: Services) -> dict[str, float]:
    return {name: cpu_seconds(process.pid) for name, process in services.processes.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    url, redis_url = args.database_url, args.redis_url
    setup_started = time.perf_counter()
    fresh_database(url, redis_url)
    redis = Redis.from_url(redis_url)
    logs = Path(args.logs)
    services = Services(url, redis_url, args.workers, logs, args.apply_batch)
    setup_s = time.perf_counter() - setup_started
    sampler = Sampler(services, url, redis)
    probe = Probe(services, url, args.subjects, args.volunteers)
    results: dict[str, Any] = {
        "machine": {
            "cores": os.cpu_count(),
            "load_average_before": os.getloadavg(),
            "python": sys.version.split()[0],
        },
        "config": {
            k: getattr(args, k)
            for k in (
                "seconds",
                "rate",
                "burst",
                "burst_batch",
                "workers",
                "subjects",
                "volunteers",
                "apply_batch",
                "short",
            )
        },
        "setup_s": setup_s,
    }
    try:
        sampler.start()
        probe.start()
        time.sleep(2)
        # (a) sustained
        sampler.phase = probe.phase = "sustained"
        cpu_before, t_before = cpu_of(services), time.time()
        n = int(args.rate * args.seconds)
        sustained = run_sender(
            {
                "port": services.port,
                "rate": args.rate,
                "requests": n,
                "batch": 1,
                "base": SUSTAINED_BASE,
                "subjects": args.subjects,
                "volunteers": args.volunteers,
                "connections": 64,
                "cutoff_s": args.seconds + max(5.0, 0.2 * args.seconds),
            },
            deadline_s=args.seconds * 3 + 120,
        )
        cpu_after, t_after = cpu_of(services), time.time()
        sampler.phase = probe.phase = "after_sustained"
        settle = wait_drained(sampler, time.time(), 120)
        # (b) burst
        sampler.phase = probe.phase = "burst"
        burst_started = time.time()
        burst = run_sender(
            {
                "port": services.port,
                "rate": 0,
                "requests": args.burst // args.burst_batch,
                "batch": args.burst_batch,
                "base": BURST_BASE,
                "subjects": args.subjects,
                "volunteers": args.volunteers,
                "connections": 16,
            },
            deadline_s=600,
        )
        burst_sent = time.time()
        sampler.phase = probe.phase = "drain"
        drain = wait_drained(sampler, burst_sent, args.drain_deadline)
        drain["from_burst_start_s"] = (
            None
            if drain["no_pending_after_s"] is None
            else drain["no_pending_after_s"] + (burst_sent - burst_started)
        )
        sampler.phase = probe.phase = "end"
        time.sleep(1.5)
    finally:
        probe.stop()
        sampler.stop()
        alive = services.alive()
        services.stop()
    probes_sent = probe.sent
    results["processes_alive_at_end"] = alive
    elapsed = t_after - t_before
    results["sustained"] = {
        **{k: v for k, v in sustained.items() if k != "completed_per_second"},
        "completed_per_second": sustained["completed_per_second"],
        "cpu_share_of_a_core": {
            **{name: (cpu_after[name] - cpu_before[name]) / elapsed for name in cpu_before},
            "pg_backends": backend_cpu(sampler.backend_cpu, "setup", "sustained") / elapsed,
        },
        "metrics_lag": lag_summary(sampler.samples, "sustained"),
        "commit_to_applied_lag": database_lag(url, SUSTAINED_BASE, SUSTAINED_BASE + n - 1),
        "probe": probe_summary(probe.results, "sustained"),
        "memory": memory_trend(sampler.samples),
        "drain_after_s": settle,
    }
    results["burst"] = {
        **{k: v for k, v in burst.items() if k != "completed_per_second"},
        "metrics_lag": lag_summary(sampler.samples, "burst")
        | {"drain": lag_summary(sampler.samples, "drain")},
        "drain": drain,
        "commit_to_applied_lag": {
            k: v
            for k, v in database_lag(url, BURST_BASE, BURST_BASE + args.burst - 1).items()
            if k != "per_10s"
        },
        "probe": probe_summary(probe.results, "burst")
        | {"drain": probe_summary(probe.results, "drain")},
    }
    sent = sustained["classifications"] + burst["classifications"]
    ok_probes = probes_sent - probe.failed
    results["counts"] = check_counts(url, sent + ok_probes)
    results["counts"]["probes"] = probes_sent
    results["counts"]["probes_failed"] = probe.failed
    results["timeline"] = [s for s in sampler.samples]
    results["machine"]["load_average_after"] = os.getloadavg()
    load1 = [s["load1"] for s in sampler.samples if "load1" in s]
    results["machine"]["load1_during"] = {
        "min": min(load1, default=float("nan")),
        "median": statistics.median(load1) if load1 else float("nan"),
        "max": max(load1, default=float("nan")),
    }
    results["verdict"] = verdict(results, args)
    return results


def backend_cpu(seen: dict[int, dict[str, float]], before: str, phase: str) -> float:
    """CPU seconds the database's backends spent in `phase` (those sampled in it)."""
    total = 0.0
    for phases in seen.values():
        if phase in phases:
            start = phases.get(before, 0.0)
            total += phases[phase] - (start if start == start else 0.0)
    return total


def probe_summary(results: list[dict[str, Any]], phase: str) -> dict[str, Any]:
    mine = [r for r in results if r["phase"] == phase]
    lags = [r["lag_s"] for r in mine if r["lag_s"] is not None]
    return {
        "n": len(mine),
        "not_applied_in_120s": sum(1 for r in mine if r["lag_s"] is None),
        "lag_p50_s": percentile(lags, 0.5),
        "lag_p99_s": percentile(lags, 0.99),
        "lag_max_s": max(lags, default=float("nan")),
    }


def verdict(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    s, b, c = results["sustained"], results["burst"], results["counts"]
    failed = sum(v for phase in (s, b) for k, v in phase["statuses"].items() if k != "200")
    five_xx = sum(v for phase in (s, b) for k, v in phase["statuses"].items() if k.startswith("5"))
    lag = s["commit_to_applied_lag"]["p99_s"]
    drain = b["drain"]["no_pending_after_s"]
    burst_in_a_minute = b["elapsed_s"] <= 60
    return {
        "throughput_per_s": s["classifications_per_s"],
        "rate_held": s["classifications_per_s"] >= 0.95 * args.rate,
        "p99_latency_ms": s["latency_ms"]["p99"],
        "p99_latency_ok": s["latency_ms"]["p99"] <= TARGETS["p99_latency_ms"],
        "p99_lag_s": lag,
        "p99_lag_ok": lag is not None and lag <= TARGETS["p99_lag_s"],
        # pg_backends (RSS) counts shared buffers each backend touched, and both backend totals
        # grow with the pool: the check takes the private memory of one backend instead.
        "memory_flat": all(
            m["flat"]
            for k, m in s["memory"].items()
            if k not in ("pg_backends", "pg_backends_anon")
        ),
        "burst_drain_s": drain,
        "burst_taken_within_60s": burst_in_a_minute,
        "burst_drained_ok": drain is not None and drain <= TARGETS["drain_s"],
        "failed_requests": failed,
        "http_5xx": five_xx,
        "exactly_once": c["exactly_once"],
        "nothing_pending": c["pending_subjects"] == 0 and c["views_not_applied"] == 0,
    }


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(r: dict[str, Any]) -> str:
    s, b, c, v = r["sustained"], r["burst"], r["counts"], r["verdict"]
    lines = [
        f"machine: {r['machine']['cores']} cores, load average 1 min during the run "
        f"{fmt(r['machine']['load1_during']['min'])}-{fmt(r['machine']['load1_during']['max'])} "
        f"(median {fmt(r['machine']['load1_during']['median'])})",
        "",
        f"SUSTAINED  {r['config']['rate']:g}/s for {r['config']['seconds']} s "
        f"({r['config']['workers']} worker(s))",
        f"  throughput             {fmt(s['classifications_per_s'])}/s "
        f"({s['classifications']:,} in {fmt(s['elapsed_s'])} s)",
        f"  statuses               {s['statuses']}, not sent (past the cut-off) "
        f"{s['not_sent_past_cutoff']:,}",
        f"  latency ms             p50 {fmt(s['latency_ms']['p50'])}  p90 "
        f"{fmt(s['latency_ms']['p90'])}  p99 {fmt(s['latency_ms']['p99'])}  "
        f"max {fmt(s['latency_ms']['max'])}",
        f"  lag commit->applied s  p50 {fmt(s['commit_to_applied_lag']['p50_s'], 2)}  p99 "
        f"{fmt(s['commit_to_applied_lag']['p99_s'], 2)}  max "
        f"{fmt(s['commit_to_applied_lag']['max_s'], 2)}",
        f"  lag /metrics oldest s  p50 {fmt(s['metrics_lag']['p50_s'], 2)}  p99 "
        f"{fmt(s['metrics_lag']['p99_s'], 2)}  max {fmt(s['metrics_lag']['max_s'], 2)}  "
        f"(pending max {fmt(s['metrics_lag']['pending_max'], 0)}; /metrics p99 "
        f"{fmt(s['metrics_lag']['metrics_p99_ms'], 0)} ms, {s['metrics_lag']['metrics_timeouts']} "
        "over 2 s)",
        f"  lag probe s            p50 {fmt(s['probe']['lag_p50_s'], 2)}  p99 "
        f"{fmt(s['probe']['lag_p99_s'], 2)}  max {fmt(s['probe']['lag_max_s'], 2)}  "
        f"(n {s['probe']['n']})",
        "  CPU (cores)            "
        + "  ".join(f"{k} {v:.2f}" for k, v in s["cpu_share_of_a_core"].items()),
        "  memory MiB             start -> end (max), growth over 2nd half, flat?",
    ]
    for name, m in s["memory"].items():
        lines.append(
            f"    {name:<20} {m['start_mb']:>7.1f} -> {m['end_mb']:>7.1f} ({m['max_mb']:.1f})"
            f"  {m['growth_second_half_mb']:+.1f}  {'flat' if m['flat'] else 'GROWING'}"
        )
    lines += [
        "",
        f"BURST  {b['classifications']:,} as fast as taken (lists of {b['batch']})",
        f"  sent in                {fmt(b['elapsed_s'])} s "
        f"({fmt(b['classifications_per_s'])}/s), statuses {b['statuses']}",
        f"  request ms             p50 {fmt(b['service_ms']['p50'])}  p99 "
        f"{fmt(b['service_ms']['p99'])}",
        f"  pending subjects max   {fmt(b['metrics_lag']['pending_max'], 0)} "
        f"(while sending), {fmt(b['metrics_lag']['drain']['pending_max'], 0)} (after)",
        f"  drained after sending  lag < 2 s after {fmt(b['drain']['lag_under_2s_after_s'])} s, "
        f"none pending after {fmt(b['drain']['no_pending_after_s'])} s "
        f"({fmt(b['drain']['from_burst_start_s'])} s from the burst's start)",
        f"  lag commit->applied s  p50 {fmt(b['commit_to_applied_lag']['p50_s'], 2)}  p99 "
        f"{fmt(b['commit_to_applied_lag']['p99_s'], 2)}  max "
        f"{fmt(b['commit_to_applied_lag']['max_s'], 2)}",
        "",
        f"COUNTS  sent {c['sent']:,}, stored {c['classifications']:,}, views {c['views']:,}, "
        f"counted in subjects {c['sum_subject_n_classifications']:,}, "
        f"pending {c['pending_subjects']}, unapplied views {c['views_not_applied']}: "
        + ("exactly once" if c["exactly_once"] else "MISMATCH"),
        "",
        "TARGETS  "
        + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in v.items() if isinstance(v, bool)),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--burst", type=int, default=20_000)
    parser.add_argument("--burst-batch", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--subjects", type=int, default=5000)
    parser.add_argument("--volunteers", type=int, default=3000)
    parser.add_argument("--drain-deadline", type=float, default=300)
    parser.add_argument(
        "--apply-batch",
        type=int,
        default=None,
        help="GZX_APPLY_BATCH_SIZE for the workers (subjects per apply transaction; default: "
        "the service's own default)",
    )
    parser.add_argument("--short", action="store_true", help="CI size: 10 s at 100/s, burst 2,000")
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "GZX_LOAD_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/gzx_bench_load"
        ),
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("GZX_LOAD_REDIS_URL", "redis://127.0.0.1:6379/13")
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load.json"))
    parser.add_argument("--logs", default=str(ROOT / "artifacts" / "load"))
    parser.add_argument("--send", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send:
        print(json.dumps(asyncio.run(send(json.loads(args.send)))))
        return
    if args.short:
        args.seconds, args.rate, args.burst = 10, 100, 2000
        args.subjects, args.volunteers, args.drain_deadline = 500, 300, 60
    results = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(table(results))
    print(f"\nresults: {out}")
    v = results["verdict"]
    if v["failed_requests"] or not v["exactly_once"] or not v["nothing_pending"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
