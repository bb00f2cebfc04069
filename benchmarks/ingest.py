"""Ingest throughput and latency, gzx vs a no-op FastAPI endpoint parsing the same JSON, same run.

    .venv/bin/python benchmarks/ingest.py [--runs 3] [--seconds 10]

Needs PostgreSQL (GZX_BENCH_DATABASE_URL, default the local server, database gzx_bench, recreated),
Redis (GZX_BENCH_REDIS_URL, default db 14) and `wrk` (apt-get install wrk). Both servers run as
one uvicorn process each on this machine; wrk runs beside them. Results go to
benchmarks/results/ingest.json; docs/benchmarks.md quotes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests import payloads as p  # noqa: E402

PG = os.environ.get(
    "GZX_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/gzx_bench"
)
REDIS = os.environ.get("GZX_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
BIN = Path(sys.executable).parent


def fresh_database() -> None:
    url = make_url(PG)
    with psycopg.connect(
        host=url.host, port=url.port or 5432, user=url.username, dbname="postgres", autocommit=True
    ) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{url.database}"')
    env = {**os.environ, "GZX_DATABASE_URL": PG}
    subprocess.run([BIN / "gzx", "migrate"], env=env, check=True, capture_output=True)
    subprocess.run(
        [BIN / "gzx", "workflow", "apply", ROOT / "examples" / "clump-scout.yaml"],
        env=env,
        check=True,
        capture_output=True,
    )


def start(command: list[str], port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "GZX_DATABASE_URL": PG, "GZX_REDIS_URL": REDIS}
    process = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(100):
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"server on port {port} did not start")


def template(per_body: int) -> str:
    one = p.classic(1, 1, 7, 0, boxes=[(100.0, 50.0, 20.0, 20.0)])
    one.pop("href")
    one["links"]["subjects"] = ["__SUBJECT__"]
    one["id"] = "__ID__"
    if per_body == 1:
        return json.dumps(one)
    return json.dumps(p.batch(*[p.event(one) for _ in range(per_body)]))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), to price each request in CPU:
    on a machine shared with other work, throughput moves with their load, CPU per request less."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def phase(
    server: subprocess.Popen[bytes], port: int, per_body: int, base: int, seconds: int
) -> dict[str, float]:
    """One wrk phase: classifications per second, and the server's CPU microseconds for each."""
    path = "/v1/classifications" if per_body == 1 else "/v1/ingest/kinesis"
    before = cpu_seconds(server.pid)
    started = time.perf_counter()
    rate = per_body * wrk(port, path, per_body, base, seconds)
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(server.pid) - before
    return {"per_s": rate, "cpu_us": 1e6 * cpu / (rate * elapsed)}


def wrk(port: int, path: str, per_body: int, base: int, seconds: int) -> float:
    """Requests per second that wrk sustained (2 threads, 32 connections)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        handle.write(template(per_body))
    env = {
        **os.environ,
        "GZX_BODY": handle.name,
        "GZX_PATH": path,
        "GZX_BASE": str(base),
        "GZX_PER_BODY": str(per_body),
    }
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            "-c32",
            f"-d{seconds}s",
            "-s",
            str(ROOT / "benchmarks" / "wrk_post.lua"),
            f"http://127.0.0.1:{port}",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"{non2xx.group(1)} failed requests:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


def fixed_rate(port: int, rate: float, seconds: float, base: int) -> dict[str, float]:
    """Latency at a fixed request rate, measured by a sender in its own process (see `send`)."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--send",
            str(port),
            str(rate),
            str(seconds),
            str(base),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


async def send(port: int, rate: float, seconds: float, base: int, connections: int = 32) -> None:
    """Open-loop sender (as wrk2): request i is due at t0 + i/rate whatever came before, and its
    latency counts from that due time, so a stalled server cannot hide its backlog (no
    coordinated omission). Plain asyncio sockets with keep-alive on `connections` connections:
    at 500/s it needs a few percent of a core. Prints a JSON summary."""
    template_body = template(1)
    due: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    latencies: list[float] = []
    failures: list[str] = []

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while (job := await due.get()) is not None:
            i, at = job
            body = (
                template_body.replace("__ID__", str(base + i))
                .replace("__SUBJECT__", str(i % 5000))
                .encode()
            )
            writer.write(
                b"POST /v1/classifications HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            latencies.append((time.perf_counter() - at) * 1000)
            if not head.startswith(b"HTTP/1.1 200"):
                failures.append(head.split(b"\r\n", 1)[0].decode())
        writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(connections)]
    n = int(rate * seconds)
    t0 = time.perf_counter() + 0.2
    for i in range(n):
        at = t0 + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        due.put_nowait((i, at))
    for _ in workers:
        due.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = time.perf_counter() - t0
    summary = {
        "rate": rate,
        "completed_per_s": n / elapsed,
        "n": len(latencies),
        "failed": len(failures),
        "p50": percentile(latencies, 0.5),
        "p90": percentile(latencies, 0.9),
        "p99": percentile(latencies, 0.99),
        "max": max(latencies),
    }
    print(json.dumps(summary))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def csv_import(rows: int) -> dict[str, float]:
    """`gzx import classifications` into PostgreSQL: the import's own rate (as the command
    reports it) and the whole command's, which also applies the configured workflow's subjects
    in-process (no Redis here)."""
    fresh_database()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "export.csv"
        p.write_export(
            path,
            [
                p.export_row(5_000_000 + i, i % 20_000, i % 3000, "Yes" if i % 3 else "No")
                for i in range(rows)
            ],
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("GZX_")}
        env["GZX_DATABASE_URL"] = PG
        started = time.perf_counter()
        done = subprocess.run(
            [BIN / "gzx", "import", "classifications", str(path)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        whole = rows / (time.perf_counter() - started)
    stated = re.search(r"in ([\d.]+) s \(", done.stderr)
    return {
        "import_per_s": rows / float(stated.group(1)) if stated else float("nan"),
        "command_per_s": whole,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--rate-seconds", type=float, default=20)
    parser.add_argument("--csv-rows", type=int, default=100_000)
    parser.add_argument("--send", nargs=4, metavar=("PORT", "RATE", "SECONDS", "BASE"))
    args = parser.parse_args()
    if args.send:
        port, rate, seconds, base = args.send
        asyncio.run(send(int(port), float(rate), float(seconds), int(base)))
        return
    load_before = os.getloadavg()
    fresh_database()
    gzx = start([str(BIN / "gzx"), "serve", "--port", "8311"], 8311)
    noop = start(
        [
            str(BIN / "uvicorn"),
            "benchmarks.noop_app:app",
            "--port",
            "8312",
            "--log-level",
            "warning",
        ],
        8312,
    )
    results: dict[str, object] = {}
    try:
        servers = {"gzx": (gzx, 8311), "noop": (noop, 8312)}
        singles: dict[str, list[dict[str, float]]] = {"gzx": [], "noop": []}
        batches: dict[str, list[dict[str, float]]] = {"gzx": [], "noop": []}
        for run in range(args.runs):
            base = 10_000_000 * (run + 1)
            for name in ("noop", "gzx"):
                singles[name].append(phase(*servers[name], 1, base, args.seconds))
            for name in ("noop", "gzx"):
                batches[name].append(phase(*servers[name], 100, base + 5_000_000, args.seconds))
        latency = {
            name: fixed_rate(port, args.rate, args.rate_seconds, 900_000_000)
            for name, port in (("gzx", 8311), ("noop", 8312))
        }

        def median(runs: dict[str, list[dict[str, float]]], key: str) -> dict[str, float]:
            return {name: statistics.median(r[key] for r in rs) for name, rs in runs.items()}

        single = median(singles, "per_s")
        results = {
            "single_per_s": single,
            "single_cpu_us_per_classification": median(singles, "cpu_us"),
            "single_ratio": single["gzx"] / single["noop"],
            "single_runs": singles,
            "batch_classifications_per_s": median(batches, "per_s"),
            "batch_cpu_us_per_classification": median(batches, "cpu_us"),
            "batch_runs": batches,
            f"latency_at_{args.rate:g}_per_s_ms": latency,
        }
    finally:
        gzx.terminate()
        noop.terminate()
        gzx.wait(10)
        noop.wait(10)
    results["csv_import_per_s"] = csv_import(args.csv_rows)
    results["machine"] = f"{os.cpu_count()} cores, {os.uname().machine}"
    results["load_average_1m"] = {"before": load_before[0], "after": os.getloadavg()[0]}
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / "ingest.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
