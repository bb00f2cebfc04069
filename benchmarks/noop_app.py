"""The baseline of benchmarks/ingest.py: a FastAPI endpoint that reads and parses the same JSON
as gzx's ingest routes (same body reader, same payload parser) and stores nothing.

It starts as `gzx serve` does: same uvicorn defaults (uvloop and httptools when installed, as
for gzx) and the same garbage-collector settings, so the two differ only by what gzx does.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.bodies import JsonBody
from app.cli import tune_garbage_collector
from app.parsing import parse_classifications_body, parse_kinesis_batch
from app.settings import Settings

app = FastAPI()
app.state.settings = Settings()


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/classifications")
def noop(body: JsonBody) -> dict[str, Any]:
    items = parse_classifications_body(body)
    return {"stored": 0, "duplicates": 0, "ids": [p.id for p in items]}


@app.post("/v1/ingest/kinesis")
def noop_batch(body: JsonBody) -> dict[str, Any]:
    return {"received": len(parse_kinesis_batch(body))}


tune_garbage_collector()
