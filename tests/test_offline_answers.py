"""`gzx aggregate` over CSV files (app.offline_answers)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from app import answers
from app.errors import InputError
from app.offline_answers import aggregate_csv

VOTES = [
    # subject, volunteer, answer
    ("a", "ann", "yes"),
    ("a", "bob", "yes"),
    ("a", "cat", "no"),
    ("b", "ann", "no"),
    ("b", "bob", "no"),
    ("b", "cat", "no"),
    ("c", "ann", "yes"),
    ("c", "bob", "yes"),
    ("c", "cat", "yes"),
    ("d", "cat", "no"),
]


def write_csv(path: Path, header: list[str], rows: list[tuple[str, ...]]) -> Path:
    """Write a small CSV file and return its path."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_posteriors_have_one_column_per_class_named_by_label(tmp_path: Path) -> None:
    """Text labels sort as text; each subject gets label, p_<class> columns and n_answers."""
    answers_csv = write_csv(
        tmp_path / "a.csv", ["id", "subject", "volunteer", "answer"],
        [(str(i), *vote) for i, vote in enumerate(VOTES)],
    )  # fmt: skip
    out = tmp_path / "p.csv"
    summary = aggregate_csv(answers_csv, out)
    rows = read_csv(out)
    assert list(rows[0]) == ["subject", "label", "p_no", "p_yes", "n_answers"]
    assert [r["subject"] for r in rows] == ["a", "b", "c", "d"]
    assert [r["n_answers"] for r in rows] == ["3", "3", "3", "1"]
    assert rows[1]["label"] == "no" and rows[2]["label"] == "yes"
    for row in rows:
        assert float(row["p_no"]) + float(row["p_yes"]) == pytest.approx(1.0, abs=1e-5)
    assert summary["classes"] == ["no", "yes"] and summary["n_answers"] == 10


def test_integer_answers_sort_numerically(tmp_path: Path) -> None:
    """Answers 2, 10, 1 give classes 1, 2, 10 in that order."""
    rows = [("s1", "u1", "10"), ("s1", "u2", "2"), ("s2", "u1", "1"), ("s2", "u2", "1")]
    out = tmp_path / "p.csv"
    summary = aggregate_csv(
        write_csv(tmp_path / "a.csv", ["subject", "volunteer", "answer"], rows), out
    )
    assert summary["classes"] == ["1", "2", "10"]
    assert list(read_csv(out)[0])[2:5] == ["p_1", "p_2", "p_10"]


def test_the_csv_front_end_gives_the_engines_posteriors(tmp_path: Path) -> None:
    """aggregate_csv writes what app.answers.fit computes on the same votes."""
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 60)
    rows = []
    for s in range(60):
        for u in rng.choice(8, 5, replace=False):
            correct = rng.random() < 0.8
            rows.append((f"s{s}", f"u{u}", str(truth[s] if correct else 1 - truth[s])))
    out = tmp_path / "p.csv"
    aggregate_csv(write_csv(tmp_path / "a.csv", ["subject", "volunteer", "answer"], rows), out)
    written = np.array([[float(r["p_0"]), float(r["p_1"])] for r in read_csv(out)])
    subject = np.array([int(r[0][1:]) for r in rows])
    volunteer_names = list(dict.fromkeys(r[1] for r in rows))
    volunteer = np.array([volunteer_names.index(r[1]) for r in rows])
    answer = np.array([int(r[2]) for r in rows])
    expected = answers.fit(subject, volunteer, answer, 60, 8, 2).posterior
    np.testing.assert_allclose(written, expected, atol=1e-5)


def test_gold_subjects_are_clamped_and_counted_per_volunteer(tmp_path: Path) -> None:
    """Gold rows come out one-hot; VOLUNTEERS.csv counts each volunteer's gold votes."""
    answers_csv = write_csv(tmp_path / "a.csv", ["subject", "volunteer", "answer"], VOTES)
    gold = write_csv(tmp_path / "g.csv", ["subject", "label"], [("a", "no"), ("e", "yes")])
    out, volunteers = tmp_path / "p.csv", tmp_path / "v.csv"
    summary = aggregate_csv(answers_csv, out, gold_path=gold, volunteers_out=volunteers)
    rows = {r["subject"]: r for r in read_csv(out)}
    assert (rows["a"]["p_no"], rows["a"]["label"]) == ("1", "no")
    assert (rows["e"]["p_yes"], rows["e"]["n_answers"]) == ("1", "0")
    assert summary["n_gold"] == 2
    people = {r["volunteer"]: r for r in read_csv(volunteers)}
    assert people["cat"]["n_gold"] == "1" and people["cat"]["n_votes"] == "4"
    assert {"theta_no_yes", "lower_no_yes", "upper_yes_no", "information_bits"} <= set(
        people["ann"]
    )
    assert float(people["cat"]["theta_no_no"]) > float(people["ann"]["theta_no_no"])


def test_gold_only_learns_volunteers_from_gold_alone(tmp_path: Path) -> None:
    """--gold-only counts only gold answers into each confusion matrix."""
    answers_csv = write_csv(tmp_path / "a.csv", ["subject", "volunteer", "answer"], VOTES)
    gold = write_csv(tmp_path / "g.csv", ["subject", "label"], [("a", "no")])
    summary = aggregate_csv(answers_csv, tmp_path / "p.csv", gold_path=gold, gold_only=True)
    assert summary["mode"] == "gold_only"


def test_repeat_answers_keep_the_first(tmp_path: Path) -> None:
    """A volunteer's second answer to the same subject is dropped and counted."""
    rows = [*VOTES, ("b", "ann", "yes")]
    out = tmp_path / "p.csv"
    summary = aggregate_csv(
        write_csv(tmp_path / "a.csv", ["subject", "volunteer", "answer"], rows), out
    )
    assert summary["n_repeats_dropped"] == 1
    assert read_csv(out)[1]["n_answers"] == "3"


def test_a_missing_column_is_an_input_error_naming_it(tmp_path: Path) -> None:
    """No `volunteer` column: InputError with field="volunteer"."""
    bad = write_csv(tmp_path / "a.csv", ["subject", "user", "answer"], [("a", "ann", "yes")])
    with pytest.raises(InputError) as caught:
        aggregate_csv(bad, tmp_path / "p.csv")
    assert caught.value.field == "volunteer"


def test_an_unknown_gold_label_is_an_input_error(tmp_path: Path) -> None:
    """A gold label that no volunteer ever answered: InputError with field="label"."""
    answers_csv = write_csv(tmp_path / "a.csv", ["subject", "volunteer", "answer"], VOTES)
    gold = write_csv(tmp_path / "g.csv", ["subject", "label"], [("a", "maybe")])
    with pytest.raises(InputError) as caught:
        aggregate_csv(answers_csv, tmp_path / "p.csv", gold_path=gold)
    assert caught.value.field == "label"


def test_an_empty_answer_is_an_input_error_with_its_line(tmp_path: Path) -> None:
    """An empty answer cell is reported with its line number and field."""
    bad = write_csv(tmp_path / "a.csv", ["subject", "volunteer", "answer"], [("a", "ann", "")])
    with pytest.raises(InputError, match="line 2") as caught:
        aggregate_csv(bad, tmp_path / "p.csv")
    assert caught.value.field == "answer"


def test_gold_only_without_gold_is_an_input_error(tmp_path: Path) -> None:
    """--gold-only with no gold file is refused."""
    answers_csv = write_csv(tmp_path / "a.csv", ["subject", "volunteer", "answer"], VOTES)
    with pytest.raises(InputError):
        aggregate_csv(answers_csv, tmp_path / "p.csv", gold_only=True)


def test_a_missing_file_is_an_input_error(tmp_path: Path) -> None:
    """A path that does not exist: InputError with field="path"."""
    with pytest.raises(InputError) as caught:
        aggregate_csv(tmp_path / "nope.csv", tmp_path / "p.csv")
    assert caught.value.field == "path"
