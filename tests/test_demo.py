"""`gzx demo`: the simulated crowd against the real service over HTTP, on a SQLite file."""

from __future__ import annotations

import dataclasses
import io
import socket
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from app.demo import (
    WORKFLOW_ID,
    DemoReport,
    Simulation,
    Vote,
    classification_payload,
    run_demo,
    simulate_crowd,
)
from app.errors import Conflict
from app.parsing import parse_classifications_body
from app.settings import Settings


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tiny_demo(
    database: Path, seed: int = 0, n_subjects: int = 60, n_volunteers: int = 30
) -> tuple[DemoReport, str]:
    settings = Settings(
        database_url=f"sqlite:///{database}",
        redis_url=None,
        export_dir=database.parent / "exports",
        sweep_interval_s=3600,
    )
    out = io.StringIO()
    report = run_demo(
        settings,
        port=free_port(),
        n_subjects=n_subjects,
        n_volunteers=n_volunteers,
        n_gold=4,
        cap=12,
        seed=seed,
        keep_serving=False,
        console=Console(file=out, width=120),
    )
    return report, out.getvalue()


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo") / "demo.db"


@pytest.fixture(scope="module")
def demo(database: Path) -> tuple[DemoReport, str]:
    return tiny_demo(database)


def test_the_demo_spends_fewer_classifications_than_a_fixed_count(
    demo: tuple[DemoReport, str],
) -> None:
    """Every subject ends settled, and retiring on the posterior beats retiring at the cap."""
    report, _ = demo
    assert report.subjects == 60
    assert report.live == 0
    assert report.retired + report.retired_at_cap == 60
    assert report.retired > report.retired_at_cap
    assert 0 < report.classifications < report.baseline == 60 * 12
    assert report.saving > 0.2
    assert report.gold_classifications > 0
    assert report.refits >= 2


def test_subjects_retired_by_the_demo_are_mostly_right(demo: tuple[DemoReport, str]) -> None:
    """gzx's labels of retired subjects agree with the simulated truth at least 85% of the time."""
    report, _ = demo
    assert report.accuracy_retired >= 0.85
    assert report.accuracy_all >= 0.85
    assert 0.0 <= report.majority_accuracy_all <= 1.0


def test_the_demo_prints_effort_and_accuracy(demo: tuple[DemoReport, str]) -> None:
    """The printed report names the baseline, the saving and both accuracies."""
    report, printed = demo
    assert f"{report.baseline:,}" in printed
    assert f"{report.saving:.1%}" in printed
    assert "majority vote" in printed
    assert report.url in printed


def test_the_demo_releases_its_port(demo: tuple[DemoReport, str]) -> None:
    """Once the demo returns without keep_serving, nothing listens on its port any more."""
    report, _ = demo
    port = int(report.url.rstrip("/").rsplit(":", 1)[1])
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
    with socket.socket() as client, pytest.raises(ConnectionRefusedError):
        client.connect(("127.0.0.1", port))


def test_the_demo_posts_the_same_run_for_the_same_seed(tmp_path: Path) -> None:
    """Two runs with the same seed on fresh databases measure exactly the same numbers."""
    first, _ = tiny_demo(tmp_path / "first.db", seed=5, n_subjects=12, n_volunteers=10)
    second, _ = tiny_demo(tmp_path / "second.db", seed=5, n_subjects=12, n_volunteers=10)
    assert dataclasses.replace(second, url=first.url, seconds=first.seconds) == first
    assert first.classifications > 0


def test_the_demo_refuses_a_database_that_already_holds_its_workflow(
    demo: tuple[DemoReport, str], database: Path
) -> None:
    """A second run on the same SQLite file stops with a message instead of a wrong report."""
    with pytest.raises(Conflict, match="fresh database"):
        tiny_demo(database, seed=1)


def test_the_simulated_crowd_is_the_same_for_the_same_seed() -> None:
    """Seeded volunteers and votes repeat exactly; another seed gives another crowd."""

    def votes(seed: int) -> list[tuple[int, int, int]]:
        rng = np.random.default_rng(seed)
        crowd = simulate_crowd(rng, 40)
        truth = rng.choice(2, size=30).astype(np.int64)
        sim = Simulation(rng, truth, np.zeros(30, dtype=bool), crowd, cap=5)
        cast = []
        while (vote := sim.next_vote()) is not None:
            cast.append((vote.volunteer, vote.subject, vote.answer))
        return cast

    assert votes(3) == votes(3)
    assert votes(3) != votes(4)
    assert len(votes(3)) == 30 * 5


def test_the_simulated_crowd_mixes_skills_and_activity() -> None:
    """Most volunteers are good, spammers ignore the truth, and activity is heavy-tailed."""
    crowd = simulate_crowd(np.random.default_rng(0), 500)
    assert crowd.count("good") > 250
    assert crowd.count("spammer") > 0 and crowd.count("adversary") > 0
    np.testing.assert_allclose(crowd.confusion.sum(axis=2), 1.0)
    spammers = np.array([k == "spammer" for k in crowd.kind])
    np.testing.assert_allclose(crowd.confusion[spammers, 0], crowd.confusion[spammers, 1])
    adversaries = np.array([k == "adversary" for k in crowd.kind])
    assert (crowd.confusion[adversaries][:, [0, 1], [0, 1]] < 0.5).all()
    top = np.sort(crowd.activity)[::-1]
    assert top[:50].sum() > 0.5  # a tenth of the volunteers make most classifications


def test_a_simulated_classification_is_a_valid_panoptes_classification() -> None:
    """The payload parses as a classic front-end classification with its answer index."""
    payload = classification_payload(7, 90_000_003, None, "10.0.0.8", 1)
    [parsed] = parse_classifications_body(payload)
    assert parsed.subject_ids == (90_000_003,)
    assert parsed.user_id is None and parsed.user_ip == "10.0.0.8"
    assert [(a.task, a.index) for a in parsed.answers] == [("T0", 1)]
    assert parsed.workflow_id == WORKFLOW_ID
    later = parse_classifications_body(classification_payload(8, 90_000_003, 5, "10.0.0.9", 0))
    assert later[0].created_at > parsed.created_at


def test_majority_vote_counts_a_tie_as_half_right() -> None:
    """A subject with one vote each way is half right by majority vote (a fair coin)."""
    rng = np.random.default_rng(0)
    crowd = simulate_crowd(rng, 4)
    sim = Simulation(rng, np.array([0, 1], dtype=np.int64), np.zeros(2, bool), crowd, cap=5)
    sim.votes = [Vote(0, 0, 0), Vote(1, 0, 1), Vote(0, 1, 1), Vote(1, 1, 1), Vote(2, 1, 0)]
    np.testing.assert_allclose(sim.majority_correct(), [0.5, 1.0])


def test_the_report_computes_baseline_and_saving() -> None:
    """The baseline is subjects times the cap; the saving is the share of it not spent."""
    report = DemoReport(
        url="http://127.0.0.1:1/",
        workflow_id=1,
        subjects=10,
        gold=0,
        volunteers=5,
        cap=20,
        classifications=50,
        gold_classifications=0,
        retired=10,
        retired_at_cap=0,
        contested=0,
        live=0,
        accuracy_retired=1.0,
        accuracy_all=1.0,
        majority_accuracy_retired=1.0,
        majority_accuracy_all=1.0,
        refits=1,
        seconds=0.0,
    )
    assert report.baseline == 200
    assert report.saving == pytest.approx(0.75)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.cap = 3  # type: ignore[misc]
