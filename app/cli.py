"""The `gzx` command line."""

from __future__ import annotations

import csv
import gc
import ipaddress
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import update

from app import aggregation, parsing, store
from app.db import make_engine, make_sessionmaker, migrate
from app.errors import GzxError, InputError
from app.models import Workflow, WorkflowSubject, utcnow
from app.settings import Settings, get_settings
from app.workflows import load_config

cli = typer.Typer(help="gzx: Bayesian crowd aggregation for citizen science.", no_args_is_help=True)
workflow_cli = typer.Typer(help="Workflow configuration.", no_args_is_help=True)
import_cli = typer.Typer(help="Bulk imports from Panoptes exports.", no_args_is_help=True)
cli.add_typer(workflow_cli, name="workflow")
cli.add_typer(import_cli, name="import")
console = Console(stderr=True)

IMPORT_BATCH = 2000


def main() -> None:
    logging.basicConfig(level=os.environ.get("GZX_LOG_LEVEL", "INFO"))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    try:
        cli()
    except GzxError as error:
        console.print(
            f"[red]error[/red] {error.message}"
            + (f" (field: {error.field})" if error.field else "")
        )
        sys.exit(2)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@cli.command("migrate")
def migrate_database() -> None:
    """Bring the database to the latest schema."""
    settings = get_settings()
    migrate(settings.database_url)
    console.print(f"database at the latest schema: {_safe_url(settings)}")


def _safe_url(settings: Settings) -> str:
    from sqlalchemy.engine import make_url

    return make_url(settings.database_url).render_as_string(hide_password=True)


def tune_garbage_collector() -> None:
    """Settle the heap of a long-running server before it takes requests.

    The objects made at start-up (app, routes, models) live as long as the process: frozen, the
    cyclic collector stops re-scanning them, and a higher first threshold makes it run less
    often while requests allocate thousands of small JSON containers. With the defaults, full
    collections cost the ingest routes about a third of their CPU (benchmarks/ingest.py).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Run the HTTP API (and, with no Redis configured, the jobs in-process)."""
    import uvicorn

    from app.service import build_service

    settings = get_settings()
    if not _is_loopback(host) and not settings.has_credentials:
        console.print(
            "[red]refusing to listen on a non-loopback address with no credentials[/red]:"
            " set GZX_TOKENS (and GZX_KINESIS_PASSWORD / GZX_CAESAR_SECRET)"
        )
        raise typer.Exit(2)
    if settings.is_sqlite:
        migrate(settings.database_url)
    if not settings.has_credentials:
        console.print("[yellow]no credentials configured: the API is open (loopback only)[/yellow]")
    service = build_service(settings)
    tune_garbage_collector()
    mode = "RQ workers via Redis" if settings.redis_url else "in-process jobs"
    console.print(f"gzx serving on http://{host}:{port}/ ({_safe_url(settings)}, {mode})")
    try:
        uvicorn.run(service.app, host=host, port=port, log_level="warning")
    finally:
        service.close()


@cli.command()
def worker(
    queue: Annotated[list[str] | None, typer.Option(help="Queues to serve (repeatable).")] = None,
    burst: Annotated[bool, typer.Option(help="Quit when the queues are empty.")] = False,
) -> None:
    """Run an RQ worker on the aggregate queue (or the given ones)."""
    from redis import Redis
    from rq import Queue, SimpleWorker

    from app.pipeline import AGGREGATE_QUEUE

    settings = get_settings()
    if not settings.redis_url:
        console.print(
            "[red]GZX_REDIS_URL is not set[/red]: without Redis, `gzx serve` runs the jobs itself"
        )
        raise typer.Exit(2)
    redis = Redis.from_url(settings.redis_url)
    queues = [Queue(name, connection=redis) for name in (queue or [AGGREGATE_QUEUE])]
    # SimpleWorker runs jobs in this process: the engine is made once, not per forked job.
    SimpleWorker(queues, connection=redis).work(burst=burst, with_scheduler=False)


@cli.command()
def cron() -> None:
    """Run `rq cron` with gzx's schedules (the sweeper; refits and exports as configured)."""
    settings = get_settings()
    if not settings.redis_url:
        console.print("[red]GZX_REDIS_URL is not set[/red]")
        raise typer.Exit(2)
    config = Path(__file__).resolve().parent.parent / "workers" / "cron.py"
    rq = Path(sys.executable).with_name("rq")
    raise typer.Exit(subprocess.call([str(rq), "cron", str(config), "--url", settings.redis_url]))


@cli.command()
def sweep() -> None:
    """Apply (embedded) or queue (with Redis) every subject whose classifications are pending."""
    settings = get_settings()
    sessions = make_sessionmaker(make_engine(settings))
    with sessions() as session:
        workflow_ids = store.workflows_with_pending(session)
    _apply(settings, sessions, workflow_ids)
    console.print(f"swept {len(workflow_ids)} workflow(s) with pending subjects")


def _apply(settings: Settings, sessions: Any, workflow_ids: list[int] | set[int]) -> None:
    """Queue the workflows' pending subjects (Redis), or apply them here (embedded)."""
    if settings.redis_url:
        from redis import Redis

        from app.pipeline import RQDispatcher

        RQDispatcher(Redis.from_url(settings.redis_url)).notify(workflow_ids)
        return
    for workflow_id in sorted(workflow_ids):
        aggregation.apply_pending(sessions, workflow_id, settings.apply_batch_size)


@workflow_cli.command("apply")
def workflow_apply(
    path: Annotated[Path, typer.Argument(help="A workflow configuration in YAML.", exists=True)],
    workflow_id: Annotated[
        int | None, typer.Option("--workflow", help="Workflow id (else `id:` in the file).")
    ] = None,
) -> None:
    """Configure a workflow from a YAML file (the same checks as PUT /v1/workflows/{id})."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise InputError("the file must hold a mapping", field="file")
    data = dict(data)
    file_id = data.pop("id", None)
    wid = workflow_id if workflow_id is not None else file_id
    if not isinstance(wid, int):
        raise InputError("give the workflow id with --workflow or an `id:` key", field="id")
    config = load_config(data)
    settings = get_settings()
    if settings.is_sqlite:
        migrate(settings.database_url)
    sessions = make_sessionmaker(make_engine(settings))
    now = utcnow()
    with sessions.begin() as session:
        workflow = session.get(Workflow, wid) or Workflow(id=wid, created_at=now)
        session.add(workflow)
        workflow.config, workflow.config_hash, workflow.name = (
            config.to_json(),
            config.digest(),
            config.name,
        )
        workflow.updated_at = now
        session.flush()
        session.execute(
            update(WorkflowSubject)
            .where(WorkflowSubject.workflow_id == wid)
            .values(**store.pending_values())
        )
    _apply(settings, sessions, [wid])
    console.print(f"workflow {wid} configured (config hash {config.digest()[:12]})")


def _csv_rows(path: Path) -> Iterator[dict[str, str]]:
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as handle:
        yield from csv.DictReader(handle)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f} rows"),
        TimeElapsedColumn(),
        console=console,
    )


@import_cli.command("classifications")
def import_classifications(
    path: Annotated[
        Path, typer.Argument(help="A Panoptes classification export CSV.", exists=True)
    ],
) -> None:
    """Import a classification export: streaming, batched, idempotent (twice changes nothing).

    One thread parses the CSV while another stores the previous batch (each batch its own
    transaction), so the database's work overlaps the parsing. A bad line stops the import
    after the batches before it are stored, as a sequential import would.
    """
    settings = get_settings()
    if settings.is_sqlite:
        migrate(settings.database_url)
    tune_garbage_collector()
    sessions = make_sessionmaker(make_engine(settings))
    limits = parsing.Limits(max_marks=settings.max_marks_per_classification)
    counts = {"stored": 0, "duplicate": 0}
    workflows: set[int] = set()
    batches: queue.Queue[list[parsing.ParsedClassification] | None] = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    def store_batches() -> None:
        while (batch := batches.get()) is not None:
            if failure:
                continue  # drain after a failure, store nothing more
            try:
                with sessions.begin() as session:
                    result = store.record_classifications(session, batch, ip_salt=settings.ip_salt)
            except BaseException as error:
                failure.append(error)
                continue
            for outcome in result.outcomes:
                counts[outcome] += 1
            workflows.update(p.workflow_id for p in batch)

    writer = threading.Thread(target=store_batches, name="gzx-import-writer")
    writer.start()
    started = time.perf_counter()
    try:
        with _progress() as progress:
            task = progress.add_task("importing classifications", total=None)
            batch: list[parsing.ParsedClassification] = []
            for line, row in enumerate(_csv_rows(path), start=2):
                try:
                    batch.append(parsing.parse_export_row(row, limits=limits))
                except InputError as error:
                    raise InputError(f"line {line}: {error.message}", field=error.field) from None
                if len(batch) >= IMPORT_BATCH:
                    batches.put(batch)
                    batch = []
                    progress.update(task, completed=line - 1)
                    if failure:
                        break
            else:
                if batch:
                    batches.put(batch)
            batches.put(None)
            writer.join()
            progress.update(task, completed=counts["stored"] + counts["duplicate"])
    finally:
        if writer.is_alive():  # a parse error: store the batches already handed over, then stop
            batches.put(None)
            writer.join()
    if failure:
        raise failure[0]
    imported_s = time.perf_counter() - started
    stored, duplicates = counts["stored"], counts["duplicate"]
    console.print(
        f"imported {stored:,} classifications ({duplicates:,} already stored)"
        f" in {imported_s:.1f} s ({(stored + duplicates) / max(imported_s, 1e-9):,.0f}/s)"
    )
    started = time.perf_counter()
    _apply(settings, sessions, workflows)
    console.print(f"applied in {time.perf_counter() - started:.1f} s")


@import_cli.command("subjects")
def import_subjects(
    path: Annotated[Path, typer.Argument(help="A Panoptes subject export CSV.", exists=True)],
) -> None:
    """Import a subject export: metadata, image locations, platform retirement."""
    settings = get_settings()
    if settings.is_sqlite:
        migrate(settings.database_url)
    sessions = make_sessionmaker(make_engine(settings))
    count = 0
    batch: list[parsing.ParsedSubject] = []
    with _progress() as progress:
        task = progress.add_task("importing subjects", total=None)
        for line, row in enumerate(_csv_rows(path), start=2):
            try:
                batch.append(parsing.parse_subject_export_row(row))
            except InputError as error:
                raise InputError(f"line {line}: {error.message}", field=error.field) from None
            if len(batch) >= IMPORT_BATCH:
                with sessions.begin() as session:
                    store.upsert_subject_rows(session, batch)
                count += len(batch)
                batch.clear()
                progress.update(task, completed=count)
        if batch:
            with sessions.begin() as session:
                store.upsert_subject_rows(session, batch)
            count += len(batch)
    console.print(f"imported {count:,} subjects")


@cli.command()
def refit(workflow_id: Annotated[int, typer.Argument(help="The workflow to refit.")]) -> None:
    """EM over every stored vote: new volunteer skills, then every subject recomputed."""
    settings = get_settings()
    sessions = make_sessionmaker(make_engine(settings))
    report = aggregation.refit(sessions, workflow_id)
    _apply(settings, sessions, [workflow_id])
    console.print(
        f"snapshot {report.snapshot_id}: {report.n_votes:,} votes, {report.n_subjects:,} subjects, "
        f"{report.n_volunteers:,} volunteers, {report.n_iter} EM sweeps"
        + ("" if report.converged else " (not converged)")
    )


gold_cli = typer.Typer(help="Gold (known truth).", no_args_is_help=True)
cli.add_typer(gold_cli, name="gold")


@gold_cli.command("import")
def gold_import(
    path: Annotated[Path, typer.Argument(help="CSV with columns subject,label.", exists=True)],
    workflow_id: Annotated[int, typer.Option("--workflow", help="The workflow.")],
) -> None:
    """Import gold labels, then refit so the volunteers they touch re-learn."""
    from app.api_engine import configured, parse_gold

    settings = get_settings()
    sessions = make_sessionmaker(make_engine(settings))
    with sessions.begin() as session:
        _, config = configured(session, workflow_id)
        labels, _ = parse_gold("text/csv", path.read_bytes(), config)
        changed = store.upsert_gold(session, workflow_id, labels, source="upload")
    if changed:
        aggregation.refit(sessions, workflow_id)
        _apply(settings, sessions, [workflow_id])
    console.print(f"{len(labels):,} gold labels ({len(changed):,} new or changed)")


@cli.command()
def aggregate(
    answers_csv: Annotated[
        Path, typer.Argument(help="CSV with subject,volunteer,answer.", exists=True)
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the posteriors.")],
    gold: Annotated[Path | None, typer.Option("--gold", help="CSV with subject,label.")] = None,
    gold_only: Annotated[
        bool, typer.Option("--gold-only", help="Learn from gold alone (SWAP).")
    ] = False,
    volunteers_out: Annotated[
        Path | None, typer.Option("--volunteers-out", help="Where to write volunteer skills.")
    ] = None,
) -> None:
    """Offline: the service's answer engine over a CSV of answers."""
    from app.offline_answers import aggregate_csv

    summary = aggregate_csv(
        answers_csv, out, gold_path=gold, gold_only=gold_only, volunteers_out=volunteers_out
    )
    console.print(summary)


@cli.command("aggregate-marks")
def aggregate_marks(
    views_csv: Annotated[
        Path, typer.Argument(help="CSV with subject,volunteer (one row a view).", exists=True)
    ],
    marks_csv: Annotated[Path, typer.Argument(help="CSV of boxes or clicks.", exists=True)],
    out: Annotated[Path, typer.Option("--out", help="Where to write the clusters.")],
    tool_size: Annotated[
        str | None, typer.Option("--tool-size", help="W,H of a click's box.")
    ] = None,
    gold: Annotated[Path | None, typer.Option("--gold", help="CSV subject,x1,y1,x2,y2.")] = None,
    gold_subjects: Annotated[
        Path | None,
        typer.Option("--gold-subjects", help="CSV subject: every subject with known truth."),
    ] = None,
) -> None:
    """Offline: cluster marks into objects, each with P(real), P(off) and a consensus box."""
    from app.offline_marks import aggregate_marks_csv

    size = None
    if tool_size is not None:
        try:
            width, height = (float(x) for x in tool_size.split(","))
        except ValueError:
            raise InputError("--tool-size is W,H, two numbers", field="tool-size") from None
        size = (width, height)
    summary = aggregate_marks_csv(
        views_csv,
        marks_csv,
        out,
        tool_size=size,
        gold_marks_path=gold,
        gold_subjects_path=gold_subjects,
    )
    console.print(summary)


@cli.command()
def demo(
    host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8000,
    database: Annotated[
        Path, typer.Option(help="SQLite file of the demo (made afresh each run).")
    ] = Path("gzx-demo.db"),
    subjects: Annotated[int, typer.Option(help="Simulated subjects.")] = 400,
    volunteers: Annotated[int, typer.Option(help="Simulated volunteers.")] = 120,
    cap: Annotated[
        int, typer.Option(help="The fixed-count baseline's classifications a subject.")
    ] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the simulated crowd.")] = 0,
    keep_serving: Annotated[bool, typer.Option(help="Keep serving after the simulation.")] = True,
    loop: Annotated[
        bool,
        typer.Option(
            "--loop",
            help="Close the loop on a synthetic sky instead: humans, export, train (the train "
            "extra), machine volunteer; print the human effort with and without the machine.",
        ),
    ] = False,
    machine: Annotated[
        list[str] | None,
        typer.Option(help="With --loop: detector and/or classifier (default both)."),
    ] = None,
    workdir: Annotated[
        Path, typer.Option(help="With --loop: images, exports and models go here.")
    ] = Path("gzx-loop"),
    epochs: Annotated[int, typer.Option(help="With --loop: training epochs.")] = 8,
    image_size: Annotated[int, typer.Option(help="With --loop: image side in pixels.")] = 64,
) -> None:
    """Start gzx on the embedded default, play a simulated Galaxy-Zoo-like crowd against it over
    HTTP, print the classifications saved and the accuracy, then keep serving. With --loop, run
    the whole loop offline on a synthetic sky (see app/loop.py) and stop."""
    from app.demo import run_demo

    logging.getLogger("gzx.aggregation").setLevel(logging.WARNING)  # refit steps: noise here
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    settings = get_settings().model_copy(
        update={"database_url": f"sqlite:///{database}", "redis_url": None}
    )
    if loop:
        from app.loop import MACHINES, LoopSizes, run_loop

        logging.getLogger("gzx.train").setLevel(logging.WARNING)
        sizes = LoopSizes(
            n_train=max(subjects * 3 // 5, 8),
            n_eval=max(subjects * 2 // 5, 8),
            n_volunteers=volunteers,
            cap=min(cap, 10),
            epochs=epochs,
            image_size=image_size,
            seed=seed,
        )
        run_loop(
            settings,
            workdir,
            machines=machine or list(MACHINES),
            sizes=sizes,
            host=host,
            port=port,
            console=console,
        )
        return
    run_demo(
        settings,
        host=host,
        port=port,
        n_subjects=subjects,
        n_volunteers=volunteers,
        cap=cap,
        seed=seed,
        keep_serving=keep_serving,
        console=console,
    )


volunteer_cli = typer.Typer(help="Volunteers.", no_args_is_help=True)
cli.add_typer(volunteer_cli, name="volunteer")


@volunteer_cli.command("forget")
def volunteer_forget(
    volunteer: Annotated[str, typer.Argument(help="Platform user id, or a key such as user:123.")],
) -> None:
    """Erase a volunteer's personal fields (user id, login, IP hash); keep their votes."""
    from app.errors import NotFound

    settings = get_settings()
    sessions = make_sessionmaker(make_engine(settings))
    with sessions.begin() as session:
        found = store.find_volunteer(session, volunteer)
        if found is None:
            raise NotFound(f"no volunteer {volunteer}", field="volunteer")
        store.forget_volunteer(session, found)
        key = found.key
    console.print(f"volunteer {volunteer} forgotten; their votes stay as {key}")


def _write_export_now(
    sessions: Any, settings: Settings, workflow_id: int, rules: Path | None
) -> tuple[str, str]:
    import json

    from app import exports

    body = json.loads(rules.read_text()) if rules is not None else {}
    with sessions.begin() as session:
        workflow = session.get(Workflow, workflow_id)
        if workflow is None or workflow.config is None:
            raise InputError(f"workflow {workflow_id} is not configured", field="workflow_id")
        chosen = exports.resolve_rules(load_config(workflow.config), body)
        export_id = exports.create_export(session, workflow_id, chosen)
    status = exports.write_export(sessions, settings, export_id)
    if status == "done":
        exports.notify_done(sessions, export_id)
    return export_id, status


@cli.command("export")
def export(
    workflow_id: Annotated[int, typer.Argument(help="The workflow to export.")],
    out: Annotated[Path, typer.Option(help="Directory to copy the export's files into.")],
    rules: Annotated[
        Path | None, typer.Option(help="JSON file of selection rules (override the defaults).")
    ] = None,
) -> None:
    """Write an export now (recorded like one made through the API) and copy its files to OUT."""
    import json
    import shutil

    from app import exports

    settings = get_settings()
    engine = make_engine(settings)
    try:
        export_id, status = _write_export_now(
            make_sessionmaker(engine), settings, workflow_id, rules
        )
    finally:
        engine.dispose()
    if status != "done":
        console.print(f"[red]export {export_id} failed[/red]; see GET /v1/exports/{export_id}")
        raise typer.Exit(1)
    out.mkdir(parents=True, exist_ok=True)
    source = exports.export_directory(settings, export_id)
    for path in sorted(source.iterdir()):
        shutil.copyfile(path, out / path.name)
    manifest = json.loads((source / exports.MANIFEST).read_text())
    counts = manifest["counts"]
    console.print(
        f"export {export_id}: {counts['subjects']} subjects ({counts['train']} train, "
        f"{counts['val']} val, {counts['negatives']} negatives), {counts['boxes']} boxes, "
        f"expected purity {manifest['expected_purity']}, completeness "
        f"{manifest['expected_completeness']} -> {out}"
    )


# --- the detector trainer (the `train` extra: torch and torchvision, imported inside) ----------


@cli.command("train")
def train_detector(
    export_dir: Annotated[Path, typer.Argument(help="A gzx export (coco_train.json, ...).")],
    images: Annotated[Path, typer.Option(help="Folder of images named as the export names them.")],
    out: Annotated[Path, typer.Option(help="Model directory to write.")],
    init: Annotated[
        Path | None, typer.Option(help="State dict to start from (whole model or backbone).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the training set.")] = None,
    iterations: Annotated[int | None, typer.Option(help="Optimiser steps (caps epochs).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images a step.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of initial weights and shuffling.")] = 0,
    name: Annotated[str, typer.Option(help="Model name (the machine volunteer's).")] = "gzx-frcnn",
    version: Annotated[
        str | None, typer.Option(help="Model version (default: a UTC stamp).")
    ] = None,
    export_id: Annotated[
        str | None, typer.Option(help="The export's id, when EXPORT_DIR is not named by it.")
    ] = None,
    backbone: Annotated[
        str, typer.Option(help="small (default, from scratch) or resnet18/34/50 (for --init).")
    ] = "small",
) -> None:
    """Train a Faster R-CNN detector on a COCO export; report completeness and purity on its
    validation split; write OUT/model.pt, metrics.json and model.json."""
    from app.train import detector

    metrics = detector.train(
        export_dir,
        images,
        out,
        init=init,
        epochs=epochs,
        iterations=iterations,
        batch_size=batch_size,
        seed=seed,
        name=name,
        version=version,
        export_id=export_id,
        backbone=backbone,
        log=console.print,
    )
    console.print(detector.describe_metrics(metrics))


# Options shared by `gzx predict` and `gzx predict-classifier`.
PostOption = Annotated[
    str | None, typer.Option(help="Full URL of POST /v1/workflows/{id}/predictions.")
]
TokenOption = Annotated[
    str | None, typer.Option(envvar="GZX_TOKEN", help="Bearer token (ingest scope).")
]
OutOption = Annotated[Path | None, typer.Option(help="Write the predictions JSON here.")]
ChunkOption = Annotated[int, typer.Option(help="Predictions a request (at most 10,000).")]


@cli.command("predict")
def predict_detector(
    model_dir: Annotated[Path, typer.Argument(help="A model directory written by `gzx train`.")],
    images: Annotated[Path, typer.Option(help="Folder of images named <subject id>.<ext>.")],
    subjects: Annotated[
        Path | None, typer.Option(help="File of subject ids (one a line); default: every image.")
    ] = None,
    post: PostOption = None,
    token: TokenOption = None,
    out: OutOption = None,
    batch_size: Annotated[int, typer.Option(help="Images a forward pass.")] = 16,
    chunk: ChunkOption = 1000,
) -> None:
    """Run a trained detector on images; post its boxes as a machine volunteer, or write them."""
    from app.train import common, detector

    if post is None and out is None:
        raise InputError("give --post URL or --out FILE", field="post")
    ids = common.read_subject_ids(subjects) if subjects is not None else None
    body = detector.predict(model_dir, images, subjects=ids, batch_size=batch_size)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(common.dumps(body))
        console.print(f"{len(body['predictions'])} predictions -> {out}")
    if post is not None:
        if not 1 <= chunk <= 10_000:
            raise InputError("chunk must be between 1 and 10000", field="chunk")
        answers = common.post_predictions(post, token, body, chunk=chunk)
        console.print(common.describe_answers(answers))


# --- the morphology classifier (issue 8; the `train` extra, imported inside) -------------------


@cli.command("train-classifier")
def train_classifier(
    export_dir: Annotated[Path, typer.Argument(help="A gzx export (labels.parquet or .csv).")],
    images: Annotated[Path, typer.Option(help="Folder of images named <subject id>.<ext>.")],
    out: Annotated[Path, typer.Option(help="Model directory to write.")],
    epochs: Annotated[int, typer.Option(help="Passes over the training split.")] = 10,
    invariant: Annotated[
        bool, typer.Option("--invariant/--plain", help="8 rotated/flipped views, or one.")
    ] = True,
    seed: Annotated[int, typer.Option(help="Seed of initial weights and shuffling.")] = 0,
    name: Annotated[str, typer.Option(help="Model name (the machine volunteer's).")] = (
        "gzx-morphology"
    ),
    version: Annotated[str | None, typer.Option(help="Model version (default: UTC stamp).")] = None,
    init: Annotated[Path | None, typer.Option(help="Weights to start from (model.pt).")] = None,
    export_id: Annotated[
        str | None, typer.Option(help="The export's id, when EXPORT_DIR is not named by it.")
    ] = None,
    image_size: Annotated[int, typer.Option(help="Images are resized to this square.")] = 64,
) -> None:
    """Train the rotation-invariant morphology CNN on a labels export (retired subjects, weighted
    by their posterior); report on its validation split; write OUT/model.pt, metrics.json and
    model.json."""
    from app.train import classifier

    metrics = classifier.train_classifier(
        export_dir,
        images,
        out,
        epochs=epochs,
        invariant=invariant,
        seed=seed,
        name=name,
        version=version,
        init=init,
        export_id=export_id,
        image_size=image_size,
        log=console.print,
    )
    console.print(classifier.describe_metrics(metrics))


@cli.command("predict-classifier")
def predict_classifier(
    model_dir: Annotated[Path, typer.Argument(help="Written by `gzx train-classifier`.")],
    images: Annotated[Path, typer.Option(help="Folder of images named <subject id>.<ext>.")],
    post: PostOption = None,
    token: TokenOption = None,
    out: OutOption = None,
    chunk: ChunkOption = 1000,
) -> None:
    """Class probabilities for every image: posted as a machine volunteer, or written to OUT."""
    from app.train import classifier, common

    if post is None and out is None:
        raise InputError("give --post URL or --out FILE", field="post")
    body = classifier.predict_directory(model_dir, images)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(common.dumps(body))
        console.print(f"{len(body['predictions'])} predictions -> {out}")
    if post is not None:
        if not 1 <= chunk <= 10_000:
            raise InputError("chunk must be between 1 and 10000", field="chunk")
        answers = common.post_predictions(post, token, body, chunk=chunk)
        console.print(common.describe_answers(answers))
