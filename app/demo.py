"""`gzx demo`: a Galaxy-Zoo-like workflow simulated against the real service, through HTTP.

On the embedded default (the settings' database, jobs in-process, no other service) the demo
migrates the database, starts the service on `host:port`, configures a binary workflow ("smooth
or featured?") with a risk-bound retirement rule and a cap, uploads a few gold subjects, and then
plays a crowd against it:

- volunteers of mixed skill: mostly good, some mediocre, a few spammers (who answer at random,
  whatever the galaxy) and a few adversaries (who mostly answer wrong); some are not logged in;
- heavy-tailed (Zipf) activity: a few volunteers make most classifications;
- each classification is a classic-front-end Panoptes classification object (`{"task": "T0",
  "value": index}`) POSTed to `/v1/classifications`, on a random subject the volunteer has not
  seen that is neither retired nor at the cap (gold subjects are shown too);
- like Panoptes' subject selector, the crowd learns of retirements by polling the workflow's
  stats every few classifications, and a refit is asked for every so often and once at the end.

It stops when every subject is retired or at the cap, then compares the classifications spent
with the fixed-count baseline (`n_subjects * cap`, Panoptes' `classification_count` rule) and
gzx's labels with the simulated truth, next to majority vote over the same votes.

The simulation is seeded (one numpy Generator) and waits for the in-process jobs to settle after
every classification, so what it posts depends only on the seed and the sizes.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import uvicorn
from fastapi import FastAPI
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.db import migrate
from app.errors import Conflict, GzxError, InputError, Unavailable
from app.pipeline import InProcessDispatcher
from app.service import Service, build_service
from app.settings import Settings

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

WORKFLOW_ID = 1
PROJECT_ID = 1
SUBJECT_BASE = 90_000_000  # subject ids n_subjects..: gold; all above any realistic Panoptes id
USER_BASE = 2_000_000
CLASSIFICATION_BASE = 600_000_000
CLASSES = ("smooth", "featured")
CLASS_PRIOR = (0.6, 0.4)
MIXTURE = {"good": 0.62, "mediocre": 0.2, "spammer": 0.1, "adversary": 0.08}
ANONYMOUS_SHARE = 0.15
ZIPF_EXPONENT = 1.0
RISK_BOUND = 0.01
MIN_VIEWS = 3
POLL_EVERY = 10  # classifications between two looks at the retired subjects
REFIT_EVERY = 2000  # classifications between refits (fewer for small demos, see `refit_interval`)
STARTED_AT = datetime(2025, 3, 4, 10, 0, tzinfo=UTC)
SECONDS_BETWEEN = 9  # simulated platform time between two classifications
SETTLE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Crowd:
    """Simulated volunteers: confusion (U, K, K) with rows = truth, columns = answer; kind (U,);
    activity (U,), each volunteer's share of the clicks (sums to 1); anonymous (U,)."""

    confusion: FloatArray
    kind: tuple[str, ...]
    activity: FloatArray
    anonymous: BoolArray

    @property
    def size(self) -> int:
        return int(self.confusion.shape[0])

    def count(self, kind: str) -> int:
        return sum(1 for k in self.kind if k == kind)


def simulate_crowd(rng: np.random.Generator, n_volunteers: int) -> Crowd:
    """Volunteers drawn from the skill mixture, with Zipf activity unrelated to skill."""
    K = len(CLASSES)
    kinds = list(MIXTURE)
    kind = rng.choice(len(kinds), size=n_volunteers, p=np.array(list(MIXTURE.values())))
    names = tuple(kinds[k] for k in kind)
    low = np.array([{"good": 0.8, "mediocre": 0.6, "adversary": 0.1}.get(n, 0.0) for n in names])
    high = np.array([{"good": 0.97, "mediocre": 0.75, "adversary": 0.3}.get(n, 0.0) for n in names])
    correct = rng.uniform(low[:, None], high[:, None], size=(n_volunteers, K))
    confusion = np.empty((n_volunteers, K, K))
    confusion[:] = ((1.0 - correct) / (K - 1))[:, :, None]
    confusion[:, np.arange(K), np.arange(K)] = correct
    spammer = np.array([n == "spammer" for n in names], dtype=bool)
    # A spammer clicks without looking: the same answer distribution whatever the truth.
    leaning = rng.uniform(0.25, 0.75, size=int(spammer.sum()))
    rows = np.stack([1.0 - leaning, leaning], axis=1)
    confusion[spammer] = rows[:, None, :]
    rank = rng.permutation(n_volunteers) + 1.0
    activity = rank**-ZIPF_EXPONENT
    anonymous = rng.random(n_volunteers) < ANONYMOUS_SHARE
    return Crowd(confusion, names, activity / activity.sum(), anonymous)


@dataclass(frozen=True)
class Vote:
    """One simulated classification: volunteer and subject (indices) and the answer (class)."""

    volunteer: int
    subject: int
    answer: int


class Simulation:
    """The platform's side: which subjects can be shown to whom, and the votes cast so far.

    Subjects 0..n-1 are to be labelled; gold subjects come after them. A subject is shown while
    it is not known to be retired and has fewer than `cap` classifications; a volunteer sees a
    subject at most once. No I/O: `run_demo` feeds it the retirements it polls from gzx.
    """

    def __init__(
        self, rng: np.random.Generator, truth: IntArray, is_gold: BoolArray, crowd: Crowd, cap: int
    ) -> None:
        self.rng = rng
        self.truth = truth
        self.is_gold = is_gold
        self.crowd = crowd
        self.cap = cap
        self.counts = np.zeros(truth.size, dtype=np.int64)
        self.retired = np.zeros(truth.size, dtype=bool)
        self.seen = np.zeros((crowd.size, truth.size), dtype=bool)
        self.exhausted = np.zeros(crowd.size, dtype=bool)
        self.votes: list[Vote] = []

    def showable(self) -> BoolArray:
        shown: BoolArray = ~self.retired & (self.counts < self.cap)
        return shown

    def is_done(self) -> bool:
        """Every subject to be labelled is retired or at the cap (or nobody can see it)."""
        return not bool(np.any(self.showable() & ~self.is_gold)) or bool(self.exhausted.all())

    def settled(self) -> int:
        """Subjects to be labelled that are known to be retired or at the cap."""
        return int(np.sum(~self.showable() & ~self.is_gold))

    def mark_retired(self, subjects: IntArray) -> None:
        self.retired[subjects] = True

    def next_vote(self) -> Vote | None:
        """A volunteer (by activity) classifies a random subject they may see, if anyone can."""
        showable = self.showable()
        while not self.exhausted.all():
            weights = np.where(self.exhausted, 0.0, self.crowd.activity)
            u = int(self.rng.choice(weights.size, p=weights / weights.sum()))
            candidates = np.flatnonzero(showable & ~self.seen[u])
            if candidates.size == 0:
                self.exhausted[u] = True  # subjects only ever leave the showable set
                continue
            s = int(self.rng.choice(candidates))
            answer = int(self.rng.choice(len(CLASSES), p=self.crowd.confusion[u, self.truth[s]]))
            self.seen[u, s] = True
            self.counts[s] += 1
            vote = Vote(u, s, answer)
            self.votes.append(vote)
            return vote
        return None

    def majority_correct(self) -> FloatArray:
        """Per subject, 1 if the majority answer is the truth, 0 if not, 1/2 on a tie (a coin)."""
        K = len(CLASSES)
        tally = np.zeros((self.truth.size, K))
        for vote in self.votes:
            tally[vote.subject, vote.answer] += 1
        best = tally.max(axis=1, keepdims=True)
        winners = tally == best
        right = winners[np.arange(self.truth.size), self.truth]
        result: FloatArray = np.where(right, 1.0 / winners.sum(axis=1), 0.0)
        return result


@dataclass(frozen=True)
class DemoReport:
    """What one demo run measured (accuracies are fractions, NaN where nothing counts)."""

    url: str
    workflow_id: int
    subjects: int
    gold: int
    volunteers: int
    cap: int
    classifications: int  # spent on the subjects to be labelled (gold excluded)
    gold_classifications: int
    retired: int  # retired by consensus (the rule), contested included
    retired_at_cap: int
    contested: int  # retired, then a refit would have decided otherwise (kept for review)
    live: int
    accuracy_retired: float
    accuracy_all: float
    majority_accuracy_retired: float
    majority_accuracy_all: float
    refits: int
    seconds: float

    @property
    def baseline(self) -> int:
        """What retiring at a fixed classification count (`cap`) would spend."""
        return self.subjects * self.cap

    @property
    def saving(self) -> float:
        """The fraction of the baseline's classifications not spent."""
        return 1.0 - self.classifications / self.baseline


def demo_config(cap: int) -> dict[str, Any]:
    """The demo workflow: Galaxy Zoo's first question, retired on a risk bound or at the cap."""
    return {
        "name": "Galaxy Zoo demo: smooth or featured?",
        "classes": list(CLASSES),
        "question": {
            "task": "T0",
            "answers": [
                {"index": 0, "label": "Smooth", "class": "smooth"},
                {"index": 1, "label": "Features or disk", "class": "featured"},
            ],
        },
        "retirement": {
            "min_views": MIN_VIEWS,
            "cap": cap,
            "kind": "risk",
            "risk_bound": RISK_BOUND,
        },
    }


def classification_payload(
    number: int, subject_id: int, user_id: int | None, user_ip: str, answer: int
) -> dict[str, Any]:
    """The `number`-th classification as the classic Panoptes front end sends it."""
    classification_id = CLASSIFICATION_BASE + number
    finished = STARTED_AT + timedelta(seconds=SECONDS_BETWEEN * number)
    started = finished - timedelta(seconds=6)
    created = finished + timedelta(milliseconds=850)

    def stamp(moment: datetime) -> str:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"

    return {
        "id": str(classification_id),
        "created_at": stamp(created),
        "updated_at": stamp(created),
        "user_ip": user_ip,
        "workflow_version": "3.1",
        "gold_standard": None,
        "expert_classifier": None,
        "annotations": [{"task": "T0", "value": answer}],
        "metadata": {
            "started_at": stamp(started),
            "finished_at": stamp(finished),
            "user_agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
            "user_language": "en",
            "live_project": True,
            "source": "api",
            "utc_offset": "0",
            "subject_dimensions": [
                {"clientWidth": 424, "clientHeight": 424, "naturalWidth": 424, "naturalHeight": 424}
            ],
            "subject_selection_state": {
                "retired": False,
                "selected_at": stamp(started - timedelta(seconds=1)),
                "already_seen": False,
                "selection_state": "normal",
                "finished_workflow": False,
                "user_has_finished_workflow": False,
            },
            "workflow_version": "3.1",
        },
        "href": f"/classifications/{classification_id}",
        "links": {
            "project": str(PROJECT_ID),
            "workflow": str(WORKFLOW_ID),
            "user": None if user_id is None else str(user_id),
            "subjects": [str(subject_id)],
        },
    }


def refit_interval(n_subjects: int, cap: int) -> int:
    """Classifications between refits: REFIT_EVERY, or a tenth of the baseline when smaller."""
    return min(REFIT_EVERY, max(100, n_subjects * cap // 10))


def _volunteer_ip(u: int) -> str:
    return str(ipaddress.IPv4Address("10.0.0.0") + 1 + u)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _auth_headers(settings: Settings, host: str) -> dict[str, str]:
    """No header on an open service (loopback only); else a configured admin token."""
    if not settings.has_credentials:
        if not _is_loopback(host):
            raise InputError(
                "with no credentials configured the demo listens on loopback only", field="host"
            )
        return {}
    for token, scopes in settings.token_scopes().items():
        if "admin" in scopes:
            return {"Authorization": f"Bearer {token}"}
    raise InputError(
        "credentials are configured: the demo needs a GZX_TOKENS token with the admin scope",
        field="tokens",
    )


class _Server:
    """uvicorn serving an app in a background thread, on a socket bound here (errors surface)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as error:
            self.socket.close()
            raise InputError(f"cannot listen on {host}:{port}: {error}", field="port") from None
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        self.url = f"http://{shown}:{self.socket.getsockname()[1]}/"
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, log_config=None, ws="none", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="gzx-demo-http"
        )

    def start(self, timeout_s: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise Unavailable(f"the HTTP server did not start on {self.url}")
            time.sleep(0.02)
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while client.get("/healthz").status_code != 200:
                if time.monotonic() > deadline:
                    raise Unavailable(f"{self.url}healthz does not answer 200")
                time.sleep(0.1)

    def wait_for_interrupt(self) -> None:
        """Serve until Ctrl-C or SIGTERM (or until the server stops by itself)."""
        stop = threading.Event()
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda _sig, _frame: stop.set())
        try:
            while self.thread.is_alive() and not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=15)
        self.socket.close()


@contextmanager
def _serving(app: FastAPI, host: str, port: int) -> Iterator[_Server]:
    server = _Server(app, host, port)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _settle(service: Service) -> None:
    """Wait until the in-process jobs have applied everything posted so far."""
    dispatcher = service.dispatcher
    assert isinstance(dispatcher, InProcessDispatcher), "the demo runs jobs in-process"
    if not dispatcher.wait_idle(SETTLE_TIMEOUT_S):
        raise Unavailable(f"the service's jobs did not settle within {SETTLE_TIMEOUT_S:.0f} s")


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise GzxError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code}: {response.text[:500]}"
        )
    return response.json()


def run_demo(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    n_subjects: int = 400,
    n_volunteers: int = 120,
    n_gold: int = 20,
    cap: int = 20,
    seed: int = 0,
    keep_serving: bool = True,
    console: Console | None = None,
) -> DemoReport:
    """Start gzx, play a simulated crowd against it over HTTP, print and return what it saved."""
    console = console or Console()
    if n_subjects < 1 or n_volunteers < 1 or n_gold < 0:
        raise InputError("the demo needs subjects and volunteers", field="n_subjects")
    if cap < MIN_VIEWS:
        raise InputError(f"the cap must be at least {MIN_VIEWS} (min_views)", field="cap")
    settings = settings.model_copy(update={"redis_url": None})  # the embedded default
    headers = _auth_headers(settings, host)
    migrate(settings.database_url)
    service = build_service(settings)
    try:
        with (
            _serving(service.app, host, port) as server,
            httpx.Client(base_url=server.url, headers=headers, timeout=60) as client,
        ):
            console.print(f"gzx is up at {server.url} (in-process jobs); simulating a crowd")
            report = _play(
                client, service, server.url, n_subjects, n_volunteers, n_gold, cap, seed, console
            )
            print_report(console, report)
            if keep_serving:
                console.print(
                    f"\ngzx keeps serving on [bold]{server.url}[/bold] "
                    f"(API docs at {server.url}docs, the demo workflow is {WORKFLOW_ID}); "
                    "press Ctrl-C to stop"
                )
                server.wait_for_interrupt()
    finally:
        service.close()
    return report


def _play(
    client: httpx.Client,
    service: Service,
    url: str,
    n_subjects: int,
    n_volunteers: int,
    n_gold: int,
    cap: int,
    seed: int,
    console: Console,
) -> DemoReport:
    began = time.perf_counter()
    rng = np.random.default_rng(seed)
    crowd = simulate_crowd(rng, n_volunteers)
    truth = np.concatenate(
        [
            rng.choice(len(CLASSES), size=n_subjects, p=np.array(CLASS_PRIOR)),
            np.arange(n_gold) % len(CLASSES),  # the researcher picks gold of every class
        ]
    ).astype(np.int64)
    is_gold = np.arange(truth.size) >= n_subjects
    sim = Simulation(rng, truth, is_gold, crowd, cap)
    wf = f"/v1/workflows/{WORKFLOW_ID}"

    existing = client.get(wf)
    if existing.status_code == 200 and _check(existing).get("classifications", 0) > 0:
        raise Conflict(
            f"workflow {WORKFLOW_ID} of this database already holds classifications: run the "
            "demo on a fresh database (GZX_DATABASE_URL=sqlite:///gzx-demo.db, a new file)",
            field="database_url",
        )
    _check(client.put(wf, json=demo_config(cap)))
    gold = [
        {"subject_id": SUBJECT_BASE + int(s), "label": CLASSES[truth[s]]}
        for s in np.flatnonzero(is_gold)
    ]
    if gold:
        _check(client.put(f"{wf}/gold", json={"subjects": gold}))
    console.print(
        f"workflow {WORKFLOW_ID}: {n_subjects} galaxies + {n_gold} gold, {crowd.size} volunteers "
        f"({crowd.count('good')} good, {crowd.count('mediocre')} mediocre, "
        f"{crowd.count('spammer')} spammers, {crowd.count('adversary')} adversaries; "
        f"{int(crowd.anonymous.sum())} not logged in); retire at risk ≤ {RISK_BOUND} "
        f"or {cap} classifications"
    )

    def learn_retirements() -> None:
        stats = _check(client.get(f"{wf}/stats"))
        ids = np.array(stats.get("retired_ids", []), dtype=np.int64) - SUBJECT_BASE
        sim.mark_retired(ids[(ids >= 0) & (ids < truth.size)])

    every = refit_interval(n_subjects, cap)
    refits = 0

    def refit() -> None:
        nonlocal refits
        _check(client.post(f"{wf}/refit"))
        _settle(service)
        refits += 1
        learn_retirements()

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("subjects settled · {task.fields[spent]:,} classifications"),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        task = progress.add_task("classifying", total=n_subjects, spent=0)
        while not sim.is_done():
            vote = sim.next_vote()
            if vote is None:
                break
            number = len(sim.votes)
            anonymous = bool(crowd.anonymous[vote.volunteer])
            payload = classification_payload(
                number,
                SUBJECT_BASE + vote.subject,
                None if anonymous else USER_BASE + vote.volunteer,
                _volunteer_ip(vote.volunteer),
                vote.answer,
            )
            _check(client.post("/v1/classifications", json=payload))
            _settle(service)
            if number % POLL_EVERY == 0:
                learn_retirements()
            if number % every == 0:
                refit()
            progress.update(task, completed=sim.settled(), spent=number)
        refit()
        progress.update(task, completed=sim.settled(), spent=len(sim.votes))

    return _measure(client, wf, sim, url, n_gold, cap, refits, time.perf_counter() - began)


def _measure(
    client: httpx.Client,
    wf: str,
    sim: Simulation,
    url: str,
    n_gold: int,
    cap: int,
    refits: int,
    seconds: float,
) -> DemoReport:
    """Read gzx's final labels back through the API and score them against the truth."""
    subjects = np.flatnonzero(~sim.is_gold)
    correct = np.zeros(subjects.size, dtype=bool)
    retired = np.zeros(subjects.size, dtype=bool)
    at_cap = np.zeros(subjects.size, dtype=bool)
    contested = np.zeros(subjects.size, dtype=bool)
    for i, s in enumerate(subjects):
        response = client.get(f"{wf}/subjects/{SUBJECT_BASE + int(s)}")
        if response.status_code == 404:
            continue  # never classified: no label, counted wrong
        state = _check(response)
        label = state.get("label")
        posterior = state.get("posterior") or {}
        if label is None and posterior:
            label = max(posterior, key=lambda name: posterior[name])
        correct[i] = label == CLASSES[sim.truth[s]]
        contested[i] = state.get("status") == "contested"
        if state.get("status") in ("retired", "contested"):
            at_cap[i] = state.get("reason") == "classification_count"
            retired[i] = not at_cap[i]
    majority = sim.majority_correct()[subjects]
    spent = sum(1 for v in sim.votes if not sim.is_gold[v.subject])

    def mean(values: npt.NDArray[Any]) -> float:
        return float(np.mean(values)) if values.size else float("nan")

    return DemoReport(
        url=url,
        workflow_id=WORKFLOW_ID,
        subjects=int(subjects.size),
        gold=n_gold,
        volunteers=sim.crowd.size,
        cap=cap,
        classifications=spent,
        gold_classifications=len(sim.votes) - spent,
        retired=int(retired.sum()),
        retired_at_cap=int(at_cap.sum()),
        contested=int(contested.sum()),
        live=int((~retired & ~at_cap).sum()),
        accuracy_retired=mean(correct[retired]),
        accuracy_all=mean(correct),
        majority_accuracy_retired=mean(majority[retired]),
        majority_accuracy_all=mean(majority),
        refits=refits,
        seconds=seconds,
    )


def print_report(console: Console, report: DemoReport) -> None:
    """The effort and accuracy tables."""
    effort = Table(title="Effort", title_justify="left")
    effort.add_column("")
    effort.add_column("classifications", justify="right")
    effort.add_row(f"fixed count ({report.cap} per subject)", f"{report.baseline:,}")
    effort.add_row("gzx", f"{report.classifications:,}")
    effort.add_row("saved", f"[bold green]{report.saving:.1%}[/bold green]")
    effort.add_row(
        f"on {report.gold} gold subjects (not counted)", f"{report.gold_classifications:,}"
    )
    console.print(effort)
    console.print(
        f"{report.retired} subjects retired by consensus ({report.contested} contested after a "
        f"refit), {report.retired_at_cap} at the cap, {report.live} live; "
        f"{report.refits} refits; {report.seconds:.1f} s"
    )
    accuracy = Table(title="Accuracy against the simulated truth", title_justify="left")
    accuracy.add_column("subjects")
    accuracy.add_column("gzx", justify="right")
    accuracy.add_column("majority vote (same votes)", justify="right")
    accuracy.add_row(
        f"retired by consensus ({report.retired})",
        f"{report.accuracy_retired:.1%}",
        f"{report.majority_accuracy_retired:.1%}",
    )
    accuracy.add_row(
        f"all ({report.subjects})",
        f"{report.accuracy_all:.1%}",
        f"{report.majority_accuracy_all:.1%}",
    )
    console.print(accuracy)
