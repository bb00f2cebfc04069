"""`gzx aggregate-marks`: CSV in, clusters out, with the service's math."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from app import marks
from app.errors import InputError
from app.offline_marks import aggregate_marks_csv, parse_tool_size


def _write(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _views(tmp_path: Path) -> Path:
    rows = [[s, u] for s in ("s1", "s2") for u in ("ann", "bob", "cat", "dan")]
    return _write(tmp_path / "views.csv", ["subject", "volunteer"], rows)


def test_box_csv_round_trip_finds_the_object_three_of_four_marked(tmp_path: Path) -> None:
    """Three agreeing boxes on s1 make one kept cluster; a lone box on s2 is not kept."""
    rows = [
        ["s1", "ann", 10, 10, 40, 60],
        ["s1", "bob", 11, 9, 41, 61],
        ["s1", "cat", 40, 60, 10, 10],
        ["s2", "dan", 200, 200, 230, 260],
    ]
    marks_csv = _write(
        tmp_path / "marks.csv", ["subject", "volunteer", "x1", "y1", "x2", "y2"], rows
    )
    out = tmp_path / "clusters.csv"
    summary = aggregate_marks_csv(_views(tmp_path), marks_csv, out)
    got = _read(out)
    assert list(got[0]) == [
        "subject", "x1", "y1", "x2", "y2", "p_real", "p_off", "n_marks", "n_views"
    ]  # fmt: skip
    s1 = [r for r in got if r["subject"] == "s1"]
    s2 = [r for r in got if r["subject"] == "s2"]
    assert len(s1) == 1 and s1[0]["n_marks"] == "3" and s1[0]["n_views"] == "4"
    assert float(s1[0]["p_real"]) > 0.5 > float(s2[0]["p_real"])
    assert 10.0 < float(s1[0]["x1"]) < 11.0
    assert summary["n_subjects"] == 2 and summary["n_marks"] == 4 and summary["n_kept"] == 1


def test_click_csv_with_frames_keeps_frames_apart(tmp_path: Path) -> None:
    """Clicks at one place on frames 0 and 1 form two clusters, each with the tool-size box."""
    rows = [
        ["s1", u, 50 + i, 50, "T0", frame]
        for frame in ("0", "1")
        for i, u in enumerate(("ann", "bob", "cat"))
    ]
    marks_csv = _write(
        tmp_path / "marks.csv", ["subject", "volunteer", "x", "y", "tool", "frame"], rows
    )
    out = tmp_path / "clusters.csv"
    aggregate_marks_csv(_views(tmp_path), marks_csv, out, tool_size=(10.0, 20.0))
    got = _read(out)
    assert sorted(r["frame"] for r in got) == ["0", "1"]
    for row in got:
        assert row["tool"] == "T0" and row["n_marks"] == "3"
        box = [float(row[k]) for k in ("x1", "y1", "x2", "y2")]
        np.testing.assert_allclose(box, [46.0, 40.0, 56.0, 60.0], atol=1e-6)


def test_the_offline_result_equals_aggregate_many_with_the_same_skills(tmp_path: Path) -> None:
    """The CSV front end reports what app.marks computes on the same arrays."""
    rows = [["s1", "ann", 0, 0, 10, 10], ["s1", "bob", 1, 0, 11, 10], ["s1", "cat", 50, 50, 60, 60]]
    marks_csv = _write(
        tmp_path / "marks.csv", ["subject", "volunteer", "x1", "y1", "x2", "y2"], rows
    )
    views = _write(tmp_path / "views.csv", ["subject", "volunteer"], [["s1", "ann"], ["s1", "bob"]])
    out = tmp_path / "clusters.csv"
    aggregate_marks_csv(views, marks_csv, out)
    boxes = np.array([r[2:] for r in rows], dtype=float)
    args = (boxes, np.zeros(3, dtype=np.int64), np.arange(3), np.zeros(2, dtype=np.int64))
    skills = marks.learn_skills(*args, np.arange(2), n_volunteers=3)
    expected = marks.aggregate_many(*args, np.arange(2), skills)
    got = _read(out)
    np.testing.assert_allclose([float(r["p_real"]) for r in got], expected.p_real, rtol=1e-5)


def test_gold_files_teach_a_careless_volunteer(tmp_path: Path) -> None:
    """Gold subjects where 'dan' never marks the known object are accepted and counted."""
    rows = [[f"g{i}", u, 10, 10, 40, 60] for i in range(5) for u in ("ann", "bob", "cat")]
    marks_csv = _write(
        tmp_path / "marks.csv", ["subject", "volunteer", "x1", "y1", "x2", "y2"], rows
    )
    views = _write(
        tmp_path / "views.csv",
        ["subject", "volunteer"],
        [[f"g{i}", u] for i in range(6) for u in ("ann", "bob", "cat", "dan")],
    )
    gold = _write(
        tmp_path / "gold.csv",
        ["subject", "x1", "y1", "x2", "y2"],
        [[f"g{i}", 10, 10, 40, 60] for i in range(5)],
    )
    gold_subjects = _write(tmp_path / "gs.csv", ["subject"], [[f"g{i}"] for i in range(6)])
    summary = aggregate_marks_csv(
        views,
        marks_csv,
        tmp_path / "out.csv",
        gold_marks_path=gold,
        gold_subjects_path=gold_subjects,
    )
    assert summary["n_gold_subjects"] == 6
    assert summary["n_kept"] == 5


def test_clicks_without_a_tool_size_are_refused(tmp_path: Path) -> None:
    """x,y marks need --tool-size; the error names the field."""
    marks_csv = _write(
        tmp_path / "marks.csv", ["subject", "volunteer", "x", "y"], [["s1", "a", 1, 2]]
    )
    with pytest.raises(InputError) as info:
        aggregate_marks_csv(_views(tmp_path), marks_csv, tmp_path / "out.csv")
    assert info.value.field == "tool_size"


def test_a_bad_number_names_file_line_and_column(tmp_path: Path) -> None:
    """A non-numeric coordinate raises InputError with field marks[3].y1."""
    rows = [["s1", "a", 1, 2, 3, 4], ["s1", "b", 1, "oops", 3, 4]]
    marks_csv = _write(
        tmp_path / "marks.csv", ["subject", "volunteer", "x1", "y1", "x2", "y2"], rows
    )
    with pytest.raises(InputError) as info:
        aggregate_marks_csv(_views(tmp_path), marks_csv, tmp_path / "out.csv")
    assert info.value.field == "marks[3].y1"


def test_missing_columns_and_files_are_input_errors(tmp_path: Path) -> None:
    """A views file without 'volunteer', or one that does not exist, is refused as bad input."""
    views = _write(tmp_path / "views.csv", ["subject"], [["s1"]])
    marks_csv = _write(tmp_path / "marks.csv", ["subject", "volunteer", "x1", "y1", "x2", "y2"], [])
    with pytest.raises(InputError):
        aggregate_marks_csv(views, marks_csv, tmp_path / "out.csv")
    with pytest.raises(InputError):
        aggregate_marks_csv(tmp_path / "nope.csv", marks_csv, tmp_path / "out.csv")


def test_tool_size_parses_w_comma_h() -> None:
    """'12,8' is (12, 8), '5' a square, '0,3' an error."""
    assert parse_tool_size("12,8") == (12.0, 8.0)
    assert parse_tool_size("5") == (5.0, 5.0)
    with pytest.raises(InputError):
        parse_tool_size("0,3")
