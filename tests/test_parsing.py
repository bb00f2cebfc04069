"""Tests for app.parsing: both front-end generations, every route's payload, every refusal."""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import InputError, PayloadTooLarge
from app.parsing import (
    FeedbackRule,
    GoldSignal,
    Limits,
    ParsedAnswer,
    ParsedClassification,
    gold_from_metadata,
    parse_caesar_extract,
    parse_classification,
    parse_classifications_body,
    parse_export_row,
    parse_kinesis_batch,
    parse_subject_export_row,
)

FIXTURES = Path(__file__).parent / "fixtures"
DELETE = object()
FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def rows(name: str) -> list[dict[str, str]]:
    with (FIXTURES / name).open(newline="") as handle:
        return list(csv.DictReader(handle))


def classic() -> dict[str, Any]:
    """The logged-in classic (PFE) classification of the Kinesis fixture, a fresh copy."""
    data: dict[str, Any] = load("kinesis_batch.json")["payload"][0]["data"]
    return data


def fem() -> dict[str, Any]:
    data: dict[str, Any] = load("fem_v2_classification.json")["data"]
    return data


def changed(obj: Any, path: tuple[str | int, ...], value: Any) -> Any:
    """A deep copy of `obj` with the value at `path` replaced (or removed, for DELETE)."""
    out = copy.deepcopy(obj)
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


def refusal(call: Any, *args: Any, **kwargs: Any) -> InputError:
    with pytest.raises(InputError) as caught:
        call(*args, **kwargs)
    return caught.value


def corners(parsed: ParsedClassification) -> list[tuple[float, float, float, float]]:
    return [(m.x1, m.y1, m.x2, m.y2) for m in parsed.marks]


# --- Kinesis batches -------------------------------------------------------------------------


def test_a_kinesis_batch_gives_each_classification_and_skips_other_events() -> None:
    """Classification events are accepted; a retirement event and a Talk comment are skipped."""
    items = parse_kinesis_batch(load("kinesis_batch.json"))
    assert [i.index for i in items] == [0, 1, 2, 3]
    assert [i.classification is not None for i in items] == [True, True, False, False]
    assert items[2].skipped == "type 'subject_retired' is not 'classification'"
    assert items[3].skipped == "type 'comment' is not 'classification'"
    assert all(i.error is None for i in items)
    assert {i.classification.source for i in items if i.classification} == {"kinesis"}


def test_a_logged_in_stream_classification_has_integer_ids_login_and_utc_time() -> None:
    """String ids become ints, the login comes from linked.users, created_at is aware UTC."""
    parsed = parse_kinesis_batch(load("kinesis_batch.json"))[0].classification
    assert parsed is not None
    assert (parsed.id, parsed.workflow_id, parsed.project_id) == (611000222, 30303, 9001)
    assert (parsed.user_id, parsed.user_login, parsed.anonymous_key) == (
        456789,
        "volunteer_a",
        None,
    )
    assert parsed.user_ip == "203.0.113.7"
    assert parsed.subject_ids == (88001122,)
    assert parsed.created_at == datetime(2025, 3, 4, 10, 0, 4, 900000, tzinfo=UTC)
    assert parsed.workflow_version == "18.42"
    assert parsed.classifier_version == "1"
    assert parsed.gold_standard is False  # the stream says null: not gold
    assert parsed.expert is None
    assert parsed.answers == (ParsedAnswer("T0", 0, None),)


def test_classic_marks_read_x_y_as_the_top_left_corner_and_keep_nested_details() -> None:
    """A PFE rectangle spans x..x+width, y..y+height; a point is a zero-size box; details kept."""
    parsed = parse_kinesis_batch(load("kinesis_batch.json"))[0].classification
    assert parsed is not None
    box, point = parsed.marks
    assert (box.kind, box.tool, box.frame) == ("rectangle", 0, 0)
    assert (box.x1, box.y1, box.x2, box.y2) == (140.0, 96.5, 178.0, 127.0)
    assert box.details == ({"value": 1},)
    assert (point.kind, point.tool) == ("point", 1)
    assert (point.x1, point.y1, point.x2, point.y2) == (301.25, 212.0, 301.25, 212.0)


def test_an_anonymous_stream_volunteer_has_no_user_id_and_keeps_the_ip() -> None:
    """links.user null means anonymous: no user id, no login, the IP as given for hashing."""
    parsed = parse_kinesis_batch(load("kinesis_batch.json"))[1].classification
    assert parsed is not None
    assert (parsed.user_id, parsed.user_login, parsed.anonymous_key) == (None, None, None)
    assert parsed.user_ip == "198.51.100.23"


def test_linked_subjects_give_metadata_and_image_locations() -> None:
    """The event's linked.subjects supplies the subject's metadata and image URLs."""
    parsed = parse_kinesis_batch(load("kinesis_batch.json"))[1].classification
    assert parsed is not None
    (subject,) = parsed.subjects
    assert subject.id == 88001187
    assert subject.metadata["#training_subject"] == "true"
    assert subject.locations[0]["image/png"].startswith("https://panoptes-uploads.zooniverse.org/")
    assert subject.retired is None


def test_a_bad_event_is_an_error_item_and_its_neighbours_still_parse() -> None:
    """One event with a zero-width box is listed with its path; the others are accepted."""
    body = load("kinesis_batch.json")
    body["payload"][0]["data"]["annotations"][1]["value"][0]["width"] = 0
    items = parse_kinesis_batch(body)
    assert items[0].classification is None
    assert items[0].error is not None
    assert items[0].error["error"] == "InputError"
    assert items[0].error["field"] == "payload[0].data.annotations[1].value[0].width"
    assert "> 0" in items[0].error["message"]
    assert items[1].classification is not None


def test_a_bad_linked_section_names_the_linked_path() -> None:
    """A malformed linked subject is an error under payload[i].linked, not under data."""
    body = load("kinesis_batch.json")
    body["payload"][1]["linked"]["subjects"][0]["id"] = 3.5
    item = parse_kinesis_batch(body)[1]
    assert item.error is not None
    assert item.error["field"] == "payload[1].linked.subjects[0].id"


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ("not an event", "payload[0]"),
        ({"source": "panoptes", "data": {}}, "payload[0].type"),
        ({"type": "classification", "data": {}}, "payload[0].source"),
        ({"source": "panoptes", "type": "classification"}, "payload[0].data"),
        ({"source": "panoptes", "type": "classification", "data": []}, "payload[0].data"),
    ],
)
def test_a_malformed_event_is_an_error_item_naming_its_field(event: Any, field: str) -> None:
    """Events that are not objects, or lack type, source or data, are errors with their path."""
    (item,) = parse_kinesis_batch({"payload": [event]})
    assert item.classification is None and item.skipped is None
    assert item.error is not None and item.error["field"] == field


@pytest.mark.parametrize("body", [{}, [], "payload", {"payload": {}}, {"payload": None}])
def test_a_kinesis_body_without_a_payload_list_is_refused(body: Any) -> None:
    """The batch itself must be an object with a list 'payload'."""
    assert refusal(parse_kinesis_batch, body).field == "payload"


def test_an_event_with_too_many_marks_is_a_payload_too_large_item() -> None:
    """More marks than the limit is PayloadTooLarge for that event only."""
    items = parse_kinesis_batch(load("kinesis_batch.json"), limits=Limits(max_marks=1))
    assert items[0].error is not None
    assert items[0].error["error"] == "PayloadTooLarge"
    assert items[0].error["field"] == "payload[0].data.annotations[1].value"


def test_a_kinesis_batch_over_the_event_limit_is_payload_too_large() -> None:
    """A batch with more events than max_batch is refused whole."""
    with pytest.raises(PayloadTooLarge):
        parse_kinesis_batch(load("kinesis_batch.json"), limits=Limits(max_batch=3))


# --- the new front end (FEM, classifier_version 2.0) -----------------------------------------


def test_fem_rectangles_given_by_their_centre_become_corners() -> None:
    """x_center, y_center, width, height become the same corners as the classic box."""
    parsed = parse_classification(fem())
    assert parsed.classifier_version == "2.0"
    assert corners(parsed) == [
        (140.0, 96.5, 178.0, 127.0),
        (301.25, 212.0, 301.25, 212.0),
        (50.0, 35.0, 71.0, 53.0),
    ]
    assert [m.kind for m in parsed.marks] == ["rectangle", "point", "rectangle"]
    assert [(m.tool, m.frame) for m in parsed.marks] == [(0, 0), (1, 0), (0, 1)]


def test_the_classic_and_fem_conventions_give_the_same_corners_for_the_same_box() -> None:
    """One box from the PFE and FEM streams, Caesar and the CSV export has one set of corners."""
    classic_box = parse_classification(classic()).marks[0]
    fem_box = parse_classification(fem()).marks[0]
    caesar_box = parse_caesar_extract(load("caesar_extract.json")).marks[0]
    caesar_fem_box = parse_caesar_extract(load("caesar_extract_fem.json")).marks[0]
    csv_boxes = [parse_export_row(rows("classification_export.csv")[i]).marks[0] for i in (0, 3)]
    boxes = [classic_box, fem_box, caesar_box, caesar_fem_box, *csv_boxes]
    assert {(b.x1, b.y1, b.x2, b.y2) for b in boxes} == {(140.0, 96.5, 178.0, 127.0)}


def test_fem_subtask_annotations_attach_to_the_mark_they_name() -> None:
    """{"task": "T1.0.0", "markIndex": i} annotations land in the details of mark i of T1."""
    parsed = parse_classification(fem())
    assert [[d["value"] for d in m.details] for m in parsed.marks] == [[1], [0], [0]]
    assert parsed.marks[1].details[0]["task"] == "T1.1.0"
    assert all(a.task in ("T0", "T2") for a in parsed.answers)  # subtasks are not answers


def test_fem_questions_give_indices_and_text_tasks_stay_raw() -> None:
    """single -> one answer, multiple -> one per index; a text task is kept only as raw."""
    parsed = parse_classification(fem())
    assert parsed.answers == (
        ParsedAnswer("T0", 0, None),
        ParsedAnswer("T2", 0, None),
        ParsedAnswer("T2", 2, None),
    )
    assert parsed.annotations[-1]["taskType"] == "text"


def test_fem_gold_standard_and_expert_flags_are_read() -> None:
    """An expert's gold-standard classification carries gold_standard True and its role."""
    parsed = parse_classification(fem())
    assert (parsed.gold_standard, parsed.expert) == (True, "expert")


def test_parse_classification_uses_linked_for_login_and_frames() -> None:
    """With linked, the login and every frame's location are attached."""
    raw = load("fem_v2_classification.json")
    parsed = parse_classification(raw["data"], linked=raw["linked"])
    assert parsed.user_login == "clump_expert"
    (subject,) = parsed.subjects
    assert [next(iter(loc)) for loc in subject.locations] == ["image/png", "image/jpeg"]
    assert parse_classification(raw["data"]).subjects == ()


def test_a_fem_rectangle_without_a_centre_is_refused() -> None:
    """A v2 rectangle giving x, y instead of x_center, y_center is ambiguous and refused."""
    box = {"toolIndex": 0, "toolType": "rectangle", "x": 1, "y": 2, "width": 3, "height": 4}
    bad = changed(fem(), ("annotations", 1, "value", 0), box)
    error = refusal(parse_classification, bad)
    assert error.field == "annotations[1].value[0].x_center"


def test_a_mark_index_that_names_no_mark_is_refused() -> None:
    """A subtask annotation pointing past the task's marks names its markIndex."""
    bad = changed(fem(), ("annotations", 4, "markIndex"), 7)
    error = refusal(parse_classification, bad)
    assert error.field == "annotations[4].markIndex"
    assert "7" in error.message


def test_other_tools_are_kept_as_other_marks() -> None:
    """A circle (x, y, r) and an unknown FEM tool type are marks of kind 'other'."""
    obj = classic()
    obj["annotations"][1]["value"] = [
        {"tool": 2, "frame": 0, "x": 10.0, "y": 20.0, "r": 5.0},
        {"toolIndex": 3, "toolType": "polygon", "points": [{"x": 1, "y": 2}]},
    ]
    parsed = parse_classification(obj)
    assert [(m.kind, m.x1, m.y1) for m in parsed.marks] == [("other", 10.0, 20.0), ("other", 0, 0)]


def test_a_combo_task_is_flattened_into_its_inner_answers_and_marks() -> None:
    """A PFE combo task value (a list of annotations) gives its inner question and marks."""
    obj = classic()
    inner = copy.deepcopy(obj["annotations"])
    obj["annotations"] = [{"task": "T5", "value": inner}]
    parsed = parse_classification(obj)
    assert parsed.answers == (ParsedAnswer("T0", 0, None),)
    assert corners(parsed)[0] == (140.0, 96.5, 178.0, 127.0)
    bad = changed(obj, ("annotations", 0, "value", 1, "value", 0, "height"), -1)
    assert refusal(parse_classification, bad).field == "annotations[0].value[1].value[0].height"


# --- Caesar ----------------------------------------------------------------------------------


def test_a_caesar_body_has_integer_ids_its_subject_and_no_gold_flag() -> None:
    """Caesar strips gold flags, IP and login: those are None; the subject comes from 'subject'."""
    parsed = parse_caesar_extract(load("caesar_extract.json"))
    assert (parsed.id, parsed.workflow_id, parsed.project_id, parsed.user_id) == (
        611000222,
        30303,
        9001,
        456789,
    )
    assert parsed.subject_ids == (88001122,)
    assert (parsed.gold_standard, parsed.expert, parsed.user_ip, parsed.user_login) == (None,) * 4
    assert parsed.subjects[0].metadata == {"#training_subject": "false", "ra": "150.1"}
    assert parsed.subjects[0].locations == ()
    assert parsed.source == "caesar"
    assert parsed.answers == (ParsedAnswer("T0", 0, None),)


def test_caesar_task_keyed_annotations_are_normalised_to_a_list() -> None:
    """The dict keyed by task becomes the flat list of its annotation objects, in order."""
    parsed = parse_caesar_extract(load("caesar_extract.json"))
    assert [a["task"] for a in parsed.annotations] == ["T0", "T1"]


def test_caesar_fem_subtasks_under_their_own_keys_attach_to_marks() -> None:
    """Subtasks filed under "T1.0.0" reach the details of the mark their markIndex names."""
    parsed = parse_caesar_extract(load("caesar_extract_fem.json"))
    assert parsed.user_id is None
    assert parsed.marks[0].details == (
        {"task": "T1.0.0", "taskType": "single", "markIndex": 0, "value": 1},
    )


def test_caesar_error_paths_name_the_task_key() -> None:
    """A bad value inside Caesar's dict-keyed annotations names annotations.<task>[i]..."""
    bad = changed(load("caesar_extract.json"), ("annotations", "T1", 0, "value", 0, "x"), "left")
    assert refusal(parse_caesar_extract, bad).field == "annotations.T1[0].value[0].x"


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("subject", "id"), 1, "subject.id"),
        (("subject_id",), DELETE, "subject_id"),
        (("workflow_id",), "wf-1", "workflow_id"),
        (("annotations", "T0"), {"task": "T0", "value": 0}, "annotations.T0"),
        (("annotations",), "T0", "annotations"),
    ],
)
def test_a_malformed_caesar_body_names_the_field(
    path: tuple[str, ...], value: Any, field: str
) -> None:
    """Mismatched subject, missing or malformed ids and annotation groups are named."""
    bad = changed(load("caesar_extract.json"), path, value)
    assert refusal(parse_caesar_extract, bad).field == field


# --- the classification export CSV -----------------------------------------------------------


def test_an_export_row_gives_answers_as_labels_and_marks_with_tool_labels() -> None:
    """The export replaces indices by labels; marks carry tool_label; the login is user_name."""
    parsed = parse_export_row(rows("classification_export.csv")[0])
    assert parsed.answers == (ParsedAnswer("T0", None, "Yes"),)
    assert [m.tool_label for m in parsed.marks] == ["Clump", "Centre of bulge"]
    assert (parsed.user_id, parsed.user_login, parsed.anonymous_key) == (
        456789,
        "volunteer_a",
        None,
    )
    assert parsed.created_at == datetime(2025, 3, 4, 10, 0, 4, tzinfo=UTC)
    assert (parsed.gold_standard, parsed.expert, parsed.project_id) == (False, None, None)
    assert parsed.source == "csv"


def test_an_anonymous_export_row_has_an_anonymous_key_and_no_user() -> None:
    """Empty user_id and user_name not-logged-in-<hash>: the name is the anonymous key."""
    parsed = parse_export_row(rows("classification_export.csv")[1])
    assert parsed.user_id is None and parsed.user_login is None
    assert parsed.anonymous_key == "not-logged-in-5be1f0c3a9d2e7b4"
    assert parsed.user_ip == "5be1f0c3a9d2e7b4"
    assert parsed.marks == ()


def test_a_multi_subject_export_row_gives_every_subject_and_its_retired_state() -> None:
    """subject_ids is ;-joined; subject_data's 'retired' row says which is already retired."""
    parsed = parse_export_row(rows("classification_export.csv")[2])
    assert parsed.subject_ids == (88001301, 88001302)
    assert [(s.id, s.retired) for s in parsed.subjects] == [(88001301, False), (88001302, True)]
    assert "retired" not in parsed.subjects[1].metadata
    assert [a.label for a in parsed.answers] == ["Yes", "Spiral arms", "Bar"]


def test_a_fem_export_row_with_gold_and_expert_parses_centre_rectangles() -> None:
    """A gold expert FEM row: gold_standard true, expert, centre box, subtask label attached."""
    parsed = parse_export_row(rows("classification_export.csv")[3])
    assert (parsed.gold_standard, parsed.expert, parsed.classifier_version) == (
        True,
        "expert",
        "2.0",
    )
    assert parsed.marks[0].details[0]["value"] == "Faint"


@pytest.mark.parametrize(
    ("column", "value", "field"),
    [
        ("classification_id", "", "classification_id"),
        ("classification_id", "6110x", "classification_id"),
        ("workflow_id", "", "workflow_id"),
        ("created_at", "4 March 2025", "created_at"),
        ("annotations", "[{not json", "annotations"),
        ("annotations", '{"task": "T0"}', "annotations"),
        ("annotations", "", "annotations"),
        ("metadata", "[]", "metadata"),
        ("subject_ids", "", "subject_ids"),
        ("subject_ids", "88001122;abc", "subject_ids[1]"),
        ("subject_data", '{"88001122": 5}', "subject_data.88001122"),
        ("gold_standard", "maybe", "gold_standard"),
        ("user_id", "1.5", "user_id"),
    ],
)
def test_a_malformed_export_row_names_the_column(column: str, value: str, field: str) -> None:
    """Missing, non-numeric, non-JSON or wrongly shaped cells are refused by column."""
    row = dict(rows("classification_export.csv")[0], **{column: value})
    assert refusal(parse_export_row, row).field == field


def test_an_export_row_without_a_required_column_names_it() -> None:
    """A row missing the created_at column entirely is refused naming that column."""
    row = rows("classification_export.csv")[0]
    del row["created_at"]
    assert refusal(parse_export_row, row).field == "created_at"


def test_a_json_cell_nested_ten_thousand_deep_is_an_input_error() -> None:
    """A 10,000-deep JSON cell is refused as InputError, never a RecursionError."""
    row = dict(rows("classification_export.csv")[0], annotations="[" * 10_000 + "]" * 10_000)
    assert refusal(parse_export_row, row).field == "annotations"


# --- the subject export CSV ------------------------------------------------------------------


def test_a_subject_export_row_gives_locations_by_frame_and_retired_state() -> None:
    """{"0": url, "1": url} becomes one {mime: url} per frame; retired_at sets retired."""
    first, second = (parse_subject_export_row(r) for r in rows("subject_export.csv"))
    assert first.id == 88001122
    assert [next(iter(loc)) for loc in first.locations] == ["image/png", "image/jpeg"]
    assert first.metadata["!iauname"] == "J100024.00+021218.0"
    assert (first.retired, second.retired) == (False, True)


def test_a_subject_export_row_accepts_the_api_location_form() -> None:
    """Locations given as [{mime: url}] (the API form) are kept as they are."""
    row = dict(rows("subject_export.csv")[0], locations='[{"image/gif": "https://x.org/a.gif"}]')
    assert parse_subject_export_row(row).locations == ({"image/gif": "https://x.org/a.gif"},)


@pytest.mark.parametrize(
    ("column", "value", "field"),
    [
        ("subject_id", "", "subject_id"),
        ("locations", '{"first": "https://x.org/a.png"}', "locations.first"),
        ("locations", '{"0": 5}', "locations.0"),
        ("metadata", "nope", "metadata"),
    ],
)
def test_a_malformed_subject_export_row_names_the_column(
    column: str, value: str, field: str
) -> None:
    """Bad ids, location keys, URLs and metadata are refused naming the column."""
    row = dict(rows("subject_export.csv")[0], **{column: value})
    assert refusal(parse_subject_export_row, row).field == field


# --- gold from subject metadata --------------------------------------------------------------


def test_a_training_subject_with_feedback_gives_its_point_and_answer() -> None:
    """#training_subject plus #feedback_N_x/_y/_tolerance and #feedback_N_answer are read."""
    metadata = load("kinesis_batch.json")["payload"][1]["linked"]["subjects"][0]["metadata"]
    assert gold_from_metadata(metadata) == GoldSignal(
        is_training=True,
        rules=(
            FeedbackRule(1, "clump-a", None, None, 212.0, 190.0, 12.0),
            FeedbackRule(2, "clumpy-answer", 1, None, None, None, None),
        ),
    )


@pytest.mark.parametrize(
    "metadata",
    [
        {},
        {"ra": "150.1"},
        {"#training_subject": "false"},
        {"#feedback_1_answer": ""},
        {"#feedback_1_id": "clump-a", "#feedback_1_successMessage": "Well spotted!"},
    ],
)
def test_metadata_without_truth_gives_none(metadata: dict[str, Any]) -> None:
    """No training flag and no feedback rule means no gold signal."""
    assert gold_from_metadata(metadata) is None


def test_a_training_flag_alone_is_a_gold_signal_and_labels_are_kept() -> None:
    """A training flag alone counts; a non-numeric answer is a label; x alone (a column) is kept."""
    assert gold_from_metadata({"#training_subject": True}) == GoldSignal(True, ())
    signal = gold_from_metadata({"#feedback_3_answer": "Clumpy"})
    assert signal == GoldSignal(False, (FeedbackRule(3, None, None, "Clumpy", None, None, None),))
    column = gold_from_metadata({"#feedback_1_x": "30", "#feedback_1_tolerance": "5"})
    assert column == GoldSignal(False, (FeedbackRule(1, None, None, None, 30.0, None, 5.0),))


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({"#feedback_1_x": "left", "#feedback_1_y": "1"}, "metadata.#feedback_1_x"),
        ({"#feedback_1_y": "1", "#feedback_1_tolerance": [5]}, "metadata.#feedback_1_tolerance"),
        (
            {"#feedback_2_x": "1", "#feedback_2_y": "2", "#feedback_2_tolerance": "NaN"},
            "metadata.#feedback_2_tolerance",
        ),
    ],
)
def test_a_malformed_feedback_value_names_the_key(metadata: dict[str, Any], field: str) -> None:
    """A feedback coordinate or tolerance that is not a finite number names its key."""
    assert refusal(gold_from_metadata, metadata).field == field


# --- validation of one classification --------------------------------------------------------

MARK = ("annotations", 1, "value", 0)


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("id",), {"id": 1}, "id"),
        (("id",), [611000222], "id"),
        (("id",), 611000222.0, "id"),
        (("id",), True, "id"),
        (("id",), -4, "id"),
        (("id",), "61100x", "id"),
        (("id",), " 611000222", "id"),
        (("id",), 2**63, "id"),
        (("id",), "9" * 30, "id"),
        (("id",), DELETE, "id"),
        (("links",), DELETE, "links"),
        (("links",), [], "links"),
        (("links", "workflow"), DELETE, "links.workflow"),
        (("links", "workflow"), None, "links.workflow"),
        (("links", "workflow"), 30303.5, "links.workflow"),
        (("links", "project"), {}, "links.project"),
        (("links", "user"), [456789], "links.user"),
        (("links", "subjects"), DELETE, "links.subjects"),
        (("links", "subjects"), [], "links.subjects"),
        (("links", "subjects"), "88001122", "links.subjects"),
        (("links", "subjects"), ["88001122", 1.5], "links.subjects[1]"),
        (("annotations",), DELETE, "annotations"),
        (("annotations",), {"T0": []}, "annotations"),
        (("annotations", 0), "T0", "annotations[0]"),
        (("annotations", 0, "task"), DELETE, "annotations[0].task"),
        (("annotations", 0, "task"), 0, "annotations[0].task"),
        (("annotations", 0, "value"), -1, "annotations[0].value"),
        (("created_at",), DELETE, "created_at"),
        (("created_at",), "yesterday", "created_at"),
        (("created_at",), 1741082404, "created_at"),
        (("created_at",), "0001-01-01T00:00:00+01:00", "created_at"),
        (("metadata",), "classic", "metadata"),
        (("metadata", "classifier_version"), ["2.0"], "metadata.classifier_version"),
        (("gold_standard",), "true", "gold_standard"),
        (("expert_classifier",), 1.5j, "expert_classifier"),
        (("user_ip",), ["203.0.113.7"], "user_ip"),
        ((*MARK, "x"), "left", "annotations[1].value[0].x"),
        ((*MARK, "x"), True, "annotations[1].value[0].x"),
        ((*MARK, "x"), None, "annotations[1].value[0].x"),
        ((*MARK, "x"), DELETE, "annotations[1].value[0].x"),
        ((*MARK, "y"), math.nan, "annotations[1].value[0].y"),
        ((*MARK, "y"), math.inf, "annotations[1].value[0].y"),
        ((*MARK, "y"), -math.inf, "annotations[1].value[0].y"),
        ((*MARK, "y"), "NaN", "annotations[1].value[0].y"),
        ((*MARK, "y"), "Infinity", "annotations[1].value[0].y"),
        ((*MARK, "y"), 10**400, "annotations[1].value[0].y"),
        ((*MARK, "y"), [96.5], "annotations[1].value[0].y"),
        ((*MARK, "width"), 0, "annotations[1].value[0].width"),
        ((*MARK, "height"), -30.5, "annotations[1].value[0].height"),
        ((*MARK, "width"), 1e308, "annotations[1].value[0].x"),  # far outside the 424 px image
        ((*MARK, "tool"), DELETE, "annotations[1].value[0].tool"),
        ((*MARK, "tool"), -1, "annotations[1].value[0].tool"),
        ((*MARK, "tool"), "rect", "annotations[1].value[0].tool"),
        ((*MARK, "frame"), "zero", "annotations[1].value[0].frame"),
        ((*MARK, "details"), "none", "annotations[1].value[0].details"),
        (MARK, 7, "annotations[1].value[0]"),
        ((*MARK, "x"), 1000.0, "annotations[1].value[0].x"),
        ((*MARK, "y"), -500.0, "annotations[1].value[0].y"),
    ],
)
def test_a_malformed_classification_is_refused_naming_the_field(
    path: tuple[str | int, ...], value: Any, field: str
) -> None:
    """Bad ids, links, dates, coordinates, sizes, tools and frames are refused by dotted path."""
    bad = changed(classic(), path, value)
    error = refusal(parse_classification, bad)
    assert error.field == field
    assert error.message


def test_nan_and_infinity_literals_from_json_text_are_refused() -> None:
    """Python's json accepts NaN/Infinity literals; the parser still refuses them as coordinates."""
    for literal in ("NaN", "Infinity", "-Infinity"):
        text = json.dumps(classic()).replace('"x": 140.0', f'"x": {literal}')
        error = refusal(parse_classification, json.loads(text))
        assert error.field == "annotations[1].value[0].x"
        assert "finite" in error.message


def test_numeric_strings_are_accepted_as_coordinates_and_ids() -> None:
    """ "140.5" for a coordinate and "611000222" for an id are read as numbers."""
    obj = changed(classic(), (*MARK, "x"), "140.5")
    parsed = parse_classification(obj)
    assert parsed.marks[0].x1 == 140.5 and parsed.id == 611000222


def test_marks_far_outside_are_accepted_when_the_image_size_is_unknown() -> None:
    """Without subject_dimensions for the frame, no outside check can be made."""
    obj = changed(classic(), (*MARK, "x"), 1000.0)
    del obj["metadata"]["subject_dimensions"]
    assert parse_classification(obj).marks[0].x1 == 1000.0
    obj = changed(classic(), (*MARK, "frame"), 3)
    assert parse_classification(obj).marks[0].frame == 3


def test_a_rectangle_whose_corner_overflows_is_refused() -> None:
    """x = width = 1e308 are finite, but x + width is not: refused, naming the width."""
    obj = changed(classic(), (*MARK, "x"), 1e308)
    obj["annotations"][1]["value"][0]["width"] = 1e308
    del obj["metadata"]["subject_dimensions"]
    assert refusal(parse_classification, obj).field == "annotations[1].value[0].width"


def test_a_missing_frame_means_frame_zero() -> None:
    """A mark without 'frame' is on the first frame."""
    assert parse_classification(changed(classic(), (*MARK, "frame"), DELETE)).marks[0].frame == 0


def test_gold_standard_is_unknown_only_when_absent() -> None:
    """Absent -> None, null -> False, true -> True."""
    assert (
        parse_classification(changed(classic(), ("gold_standard",), DELETE)).gold_standard is None
    )
    assert parse_classification(classic()).gold_standard is False
    assert parse_classification(changed(classic(), ("gold_standard",), True)).gold_standard is True


def test_too_many_marks_is_payload_too_large_naming_the_drawing_value() -> None:
    """More than max_marks marks in one classification is PayloadTooLarge (a 413)."""
    with pytest.raises(PayloadTooLarge) as caught:
        parse_classification(classic(), limits=Limits(max_marks=1))
    assert caught.value.field == "annotations[1].value"
    assert parse_classification(classic(), limits=Limits(max_marks=2)).marks


def test_too_many_subjects_is_payload_too_large() -> None:
    """More subjects than max_subjects is PayloadTooLarge naming links.subjects."""
    obj = changed(classic(), ("links", "subjects"), [str(i) for i in range(1, 5)])
    with pytest.raises(PayloadTooLarge) as caught:
        parse_classification(obj, limits=Limits(max_subjects=3))
    assert caught.value.field == "links.subjects"


def test_nesting_one_level_past_the_limit_is_refused_and_at_the_limit_accepted() -> None:
    """Depth counts containers; max_depth passes and max_depth + 1 fails, naming the path."""
    obj = classic()  # deepest already: annotations[1].value[0].details[0], 7 containers
    obj["metadata"]["deep"] = [[[[[[]]]]]]  # the classification, metadata, then 6 lists: 8
    assert parse_classification(obj, limits=Limits(max_depth=8))
    error = refusal(parse_classification, obj, limits=Limits(max_depth=7))
    assert error.field == "metadata.deep[0][0][0][0][0]"
    assert "deeper than 7" in error.message


def test_a_ten_thousand_deep_list_is_an_input_error_not_a_crash() -> None:
    """Depth is checked iteratively, so a 10,000-deep list cannot overflow the stack."""
    deep: list[Any] = []
    for _ in range(10_000):
        deep = [deep]
    obj = changed(classic(), ("annotations", 0, "value"), deep)
    assert refusal(parse_classification, obj).field == "annotations[0].value" + "[0]" * 29
    assert refusal(parse_classifications_body, deep).field == "[0]" + "[0]" * 32
    assert refusal(parse_caesar_extract, {"annotations": {"T0": deep}}).field is not None
    event = {"source": "panoptes", "type": "classification", "data": {"annotations": deep}}
    (item,) = parse_kinesis_batch({"payload": [event]})
    assert item.error is not None
    assert item.error["field"].startswith("payload[0].data.annotations[0][0]")


def test_values_of_unknown_tasks_are_kept_only_raw() -> None:
    """Text, slider and survey values (strings, dicts, lists of choices) are not errors."""
    obj = classic()
    obj["annotations"] += [
        {"task": "T7", "value": "a faint arc to the north"},
        {"task": "T8", "value": {"slider": 0.4}},
        {"task": "T9", "value": [{"choice": "LION", "answers": {"HOWMANY": "1"}, "filters": {}}]},
        {"task": "T10", "value": None},
        {"task": "T11", "value": 0.5},
    ]
    parsed = parse_classification(obj)
    assert parsed.answers == (ParsedAnswer("T0", 0, None),)
    assert len(parsed.annotations) == 7


def test_a_multiple_choice_list_gives_one_answer_per_index() -> None:
    """A classic multiple-choice value [0, 2] gives two answers; a bad element is named."""
    obj = changed(classic(), ("annotations", 0, "value"), [0, 2])
    assert [a.index for a in parse_classification(obj).answers] == [0, 2]
    obj = changed(classic(), ("annotations", 0, "value"), [0, -2])
    assert refusal(parse_classification, obj).field == "annotations[0].value[1]"


# --- POST /v1/classifications bodies ---------------------------------------------------------


def test_a_classifications_body_may_be_one_object_or_a_list() -> None:
    """A lone object gives one classification, a list gives each, in order."""
    assert [p.id for p in parse_classifications_body(classic())] == [611000222]
    both = parse_classifications_body([classic(), fem()])
    assert [p.id for p in both] == [611000222, 611004810]
    assert {p.source for p in both} == {"panoptes"}


def test_one_bad_item_refuses_the_whole_list_naming_its_index() -> None:
    """The list is all-or-nothing; the error field starts with [i]."""
    bad = changed(fem(), ("links", "workflow"), None)
    assert refusal(parse_classifications_body, [classic(), bad]).field == "[1].links.workflow"


def test_the_panoptes_api_envelope_is_accepted_with_its_linked() -> None:
    """{"classifications": [...], "linked": {...}} attaches linked subjects to each."""
    raw = load("fem_v2_classification.json")
    (parsed,) = parse_classifications_body(
        {"classifications": [raw["data"]], "linked": raw["linked"]}
    )
    assert parsed.subjects[0].id == 88001122
    bad = {"classifications": [{"id": "1"}]}
    assert refusal(parse_classifications_body, bad).field == "classifications[0].links"


# --- purity ----------------------------------------------------------------------------------


def test_parsing_never_mutates_its_input_and_outputs_do_not_alias_it() -> None:
    """Inputs compare equal after parsing, and changing an output leaves the input alone."""
    inputs = [load("kinesis_batch.json"), fem(), load("caesar_extract.json")]
    before = copy.deepcopy(inputs)
    parse_kinesis_batch(inputs[0])
    parsed = parse_classification(inputs[1])
    parse_caesar_extract(inputs[2])
    assert inputs == before
    parsed.metadata["classifier_version"] = "9"
    parsed.annotations[0]["value"] = 5
    assert inputs == before


# --- properties ------------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def all_paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside `obj` (containers included)."""
    out = []
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    for key, value in items:
        out.append((*prefix, key))
        out.extend(all_paths(value, (*prefix, key)))
    return out


SAMPLES = {
    "kinesis": load("kinesis_batch.json"),
    "fem": load("fem_v2_classification.json")["data"],
    "caesar": load("caesar_extract.json"),
    "caesar_fem": load("caesar_extract_fem.json"),
}
PARSERS: dict[str, Callable[[Any], object]] = {
    "kinesis": parse_kinesis_batch,
    "fem": parse_classifications_body,
    "caesar": parse_caesar_extract,
    "caesar_fem": parse_caesar_extract,
}


@FAST
@given(body=JSON)
def test_arbitrary_json_raises_nothing_but_input_error(body: Any) -> None:
    """Every JSON entry point either parses arbitrary JSON or raises InputError."""
    for parse in (parse_kinesis_batch, parse_classifications_body, parse_caesar_extract):
        with contextlib.suppress(InputError):
            parse(body)
    event = {"source": "panoptes", "type": "classification", "data": body}
    for wrapped in ({"payload": [body]}, {"payload": [event]}):
        for item in parse_kinesis_batch(wrapped):
            assert item.error is None or item.error["error"] in ("InputError", "PayloadTooLarge")


@FAST
@given(data=st.data(), name=st.sampled_from(sorted(SAMPLES)), value=JSON)
def test_a_fixture_with_any_value_replaced_parses_or_raises_input_error(
    data: st.DataObject, name: str, value: Any
) -> None:
    """Replacing or removing any value deep inside a real payload never escapes InputError."""
    sample = SAMPLES[name]
    path = data.draw(st.sampled_from(all_paths(sample)))
    mutated = changed(sample, path, data.draw(st.sampled_from([value, DELETE])))
    before = copy.deepcopy(mutated)
    with contextlib.suppress(InputError):
        PARSERS[name](mutated)
    assert mutated == before


@FAST
@given(
    row=st.dictionaries(
        st.sampled_from(list(rows("classification_export.csv")[0])), st.text(max_size=30)
    ),
    base=st.sampled_from(rows("classification_export.csv") + rows("subject_export.csv")),
)
def test_any_csv_row_parses_or_raises_input_error(
    row: dict[str, str], base: dict[str, str]
) -> None:
    """CSV rows with arbitrary cells (over real rows or alone) only ever raise InputError."""
    for candidate in (row, {**base, **row}):
        for parse in (parse_export_row, parse_subject_export_row):
            with contextlib.suppress(InputError):
                parse(candidate)


@FAST
@given(
    metadata=st.dictionaries(
        st.sampled_from(
            [
                "#training_subject",
                "#feedback_1_answer",
                "#feedback_1_x",
                "#feedback_1_y",
                "#feedback_1_tolerance",
                "#feedback_1_id",
                "ra",
            ]
        ),
        JSON,
    )
)
def test_gold_from_any_metadata_returns_or_raises_input_error(metadata: dict[str, Any]) -> None:
    """gold_from_metadata never raises anything but InputError."""
    with contextlib.suppress(InputError):
        gold_from_metadata(metadata)


ids = st.integers(min_value=0, max_value=2**63 - 1)
coordinate = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
size = st.floats(min_value=0.5, max_value=1e4, allow_nan=False, allow_infinity=False)
boxes = st.lists(st.tuples(coordinate, coordinate, size, size), min_size=1, max_size=6)


def generated(
    cid: int, workflow: int, subjects: list[int], box_list: list[tuple[float, ...]], v2: bool
) -> dict[str, Any]:
    """A minimal valid classification: one question, one drawing task of rectangles."""
    if v2:
        marks: list[dict[str, Any]] = [
            {
                "toolIndex": 0,
                "toolType": "rectangle",
                "x_center": x + w / 2,
                "y_center": y + h / 2,
                "width": w,
                "height": h,
            }
            for x, y, w, h in box_list
        ]
    else:
        marks = [{"tool": 0, "x": x, "y": y, "width": w, "height": h} for x, y, w, h in box_list]
    return {
        "id": str(cid),
        "created_at": "2025-03-04T10:00:04Z",
        "annotations": [{"task": "T0", "value": 1}, {"task": "T1", "value": marks}],
        "metadata": {"classifier_version": "2.0"} if v2 else {},
        "links": {"workflow": workflow, "subjects": [str(s) for s in subjects], "user": None},
    }


@FAST
@given(
    cid=ids,
    workflow=ids,
    subjects=st.lists(ids, min_size=1, max_size=5, unique=True),
    box_list=boxes,
    v2=st.booleans(),
)
def test_a_generated_classification_round_trips_ids_and_corners(
    cid: int, workflow: int, subjects: list[int], box_list: list[tuple[float, ...]], v2: bool
) -> None:
    """Ids come back as given; both conventions give the box's corners; the input is untouched."""
    obj = generated(cid, workflow, subjects, box_list, v2)
    before = copy.deepcopy(obj)
    parsed = parse_classification(obj)
    assert obj == before
    assert (parsed.id, parsed.workflow_id, parsed.subject_ids) == (cid, workflow, tuple(subjects))
    for mark, (x, y, w, h) in zip(parsed.marks, box_list, strict=True):
        assert mark.kind == "rectangle"
        assert mark.x1 == pytest.approx(x, abs=1e-6) and mark.y1 == pytest.approx(y, abs=1e-6)
        assert mark.x2 == pytest.approx(x + w, abs=1e-6)
        assert mark.y2 == pytest.approx(y + h, abs=1e-6)
        assert mark.x1 < mark.x2 and mark.y1 < mark.y2
