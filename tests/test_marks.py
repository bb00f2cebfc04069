"""The marks math: association, cluster posteriors, consensus boxes, risk and skill learning."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import erfc, expit

from app import marks
from app.errors import InputError

BASE = np.array([[10.0, 10.0, 40.0, 60.0], [100.0, 20.0, 130.0, 80.0], [35.0, 30.0, 70.0, 90.0]])


@st.composite
def subjects(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, marks.MarkSkills]:
    """One subject: boxes jittered around three objects, 1-6 viewers, skills for them."""
    n_viewers = draw(st.integers(1, 6))
    boxes, volunteer = [], []
    for u in range(n_viewers):
        for _ in range(draw(st.integers(0, 3))):
            base = BASE[draw(st.integers(0, 2))]
            jitter = draw(st.lists(st.floats(-6, 6), min_size=4, max_size=4))
            boxes.append(base + np.array(jitter))
            volunteer.append(u)
    p_fn = draw(st.lists(st.floats(0.01, 0.9), min_size=n_viewers, max_size=n_viewers))
    f = draw(st.lists(st.floats(0.01, 0.9), min_size=n_viewers, max_size=n_viewers))
    sigma = draw(st.lists(st.floats(0.05, 0.6), min_size=n_viewers, max_size=n_viewers))
    skills = replace(
        marks.MarkSkills.population(n_viewers),
        p_fn=np.array(p_fn),
        f=np.array(f),
        sigma=np.array(sigma),
    )
    return (
        np.array(boxes).reshape(-1, 4),
        np.array(volunteer, dtype=np.int64),
        np.arange(n_viewers),
        skills,
    )


@given(subjects())
@settings(max_examples=60, deadline=None)
def test_a_volunteers_two_marks_never_share_a_cluster(subject: tuple) -> None:
    """No cluster holds two marks of one volunteer, and every mark is in a cluster."""
    boxes, volunteer, viewers, skills = subject
    result = marks.aggregate_subject(boxes, volunteer, viewers, skills)
    assert np.all(result.labels >= 0)
    pairs = set(zip(result.labels.tolist(), volunteer.tolist(), strict=True))
    assert len(pairs) == len(volunteer)
    assert result.n_marks.sum() == len(volunteer)


@given(subjects())
@settings(max_examples=60, deadline=None)
def test_a_viewer_who_drew_nothing_lowers_p_real(subject: tuple) -> None:
    """Adding a viewer without marks keeps the clusters and lowers every cluster's logit."""
    boxes, volunteer, viewers, skills = subject
    before = marks.aggregate_subject(boxes, volunteer, viewers, skills)
    after = marks.aggregate_subject(boxes, volunteer, np.append(viewers, 99), skills)
    np.testing.assert_array_equal(before.labels, after.labels)
    assert np.all(after.logit < before.logit)
    assert np.all(after.p_real <= before.p_real)


@given(subjects(), st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None)
def test_permuting_volunteers_changes_nothing(subject: tuple, rnd: object) -> None:
    """Renaming volunteers (skills renamed with them) gives the same clusters and posteriors."""
    boxes, volunteer, viewers, skills = subject
    n = skills.n_volunteers
    perm = np.array(rnd.sample(range(n), n))  # type: ignore[attr-defined]
    inverse = np.argsort(perm)
    renamed = replace(
        skills,
        p_fn=skills.p_fn[inverse],
        f=skills.f[inverse],
        p_fp=skills.p_fp[inverse],
        sigma=skills.sigma[inverse],
    )
    a = marks.aggregate_subject(boxes, volunteer, viewers, skills)
    b = marks.aggregate_subject(boxes, perm[volunteer], perm[viewers][::-1], renamed)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.logit, b.logit, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.box, b.box, rtol=1e-12)


@given(subjects())
@settings(max_examples=60, deadline=None)
def test_probabilities_lie_between_zero_and_one(subject: tuple) -> None:
    """P(real), P(off) are probabilities and the risk parts are non-negative."""
    boxes, volunteer, viewers, skills = subject
    result = marks.aggregate_subject(boxes, volunteer, viewers, skills)
    for p in (result.p_real, result.p_off):
        assert np.all((p >= 0) & (p <= 1))
    assert min(result.e_false_kept, result.e_missed, result.e_badly_placed) >= 0
    assert math.isclose(result.risk, result.e_false_kept + result.e_missed + result.e_badly_placed)


@given(subjects())
@settings(max_examples=30, deadline=None)
def test_inputs_are_not_mutated(subject: tuple) -> None:
    """Aggregation and learning leave their input arrays as they were."""
    boxes, volunteer, viewers, skills = subject
    copies = [boxes.copy(), volunteer.copy(), viewers.copy()]
    marks.aggregate_subject(boxes, volunteer, viewers, skills)
    marks.learn_skills(
        boxes,
        np.zeros_like(volunteer),
        volunteer,
        np.zeros_like(viewers),
        viewers,
        gold_boxes=BASE,
        gold_subject=np.zeros(3, dtype=np.int64),
        rounds=1,
        em_iterations=2,
    )
    for before, after in zip(copies, [boxes, volunteer, viewers], strict=True):
        np.testing.assert_array_equal(before, after)


def _toy_skills() -> marks.MarkSkills:
    return replace(
        marks.MarkSkills.population(3),
        p_fn=np.array([0.1, 0.2, 0.3]),
        f=np.array([0.05, 0.1, 0.2]),
        sigma=np.array([0.1, 0.2, 0.4]),
        obj_prior=0.4,
    )


def test_two_agreeing_volunteers_and_one_non_marker_give_the_hand_computed_logit() -> None:
    """logit = logit(0.4) + log(0.9/0.05) + log(0.8/0.1) + log(0.3/0.8), computed by hand."""
    boxes = np.array([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0]])
    result = marks.aggregate_subject(boxes, np.array([0, 1]), np.array([0, 1, 2]), _toy_skills())
    expected = (
        math.log(0.4 / 0.6) + math.log(0.9 / 0.05) + math.log(0.8 / 0.1) + math.log(0.3 / 0.8)
    )
    assert result.labels.tolist() == [0, 0]
    assert result.logit[0] == pytest.approx(expected, abs=1e-12)
    assert result.p_real[0] == pytest.approx(expit(expected))
    assert result.n_views == 3


def test_consensus_box_is_the_inverse_variance_weighted_mean() -> None:
    """Weights 1/sigma^2 = 100 and 25 put the consensus 4/5 of the way to the sharper volunteer."""
    boxes = np.array([[0.0, 0.0, 10.0, 10.0], [1.0, 2.0, 11.0, 12.0]])
    result = marks.aggregate_subject(boxes, np.array([0, 1]), np.array([0, 1]), _toy_skills())
    np.testing.assert_allclose(result.box[0], [0.2, 0.4, 10.2, 10.4])
    assert result.p_off[0] == pytest.approx(erfc(0.5 * math.sqrt(50.0 + 12.5)))


def test_points_become_boxes_of_the_tool_size_centred_on_the_click() -> None:
    """A click at (10, 20) with size 4 x 6 becomes the box (8, 17, 12, 23)."""
    np.testing.assert_allclose(
        marks.points_to_boxes(np.array([[10.0, 20.0]]), (4.0, 6.0)), [[8.0, 17.0, 12.0, 23.0]]
    )
    with pytest.raises(InputError):
        marks.points_to_boxes(np.array([[1.0, 2.0]]), (0.0, 1.0))


def test_iou_matrix_of_known_boxes() -> None:
    """Half-overlapping unit squares have IoU 1/3; disjoint 0; identical (even empty) 1."""
    a = np.array([[0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    b = np.array([[1.0, 0.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [10.0, 10.0, 11.0, 11.0]])
    np.testing.assert_allclose(
        marks.iou_matrix(a, b), [[1.0 / 3.0, 0.0, 0.0], [0.0, 1.0, 0.0]], atol=1e-12
    )


def _synthetic(seed: int, p_fn: np.ndarray, n_subjects: int = 150) -> dict[str, np.ndarray]:
    """Subjects with 0-3 well separated objects, every volunteer viewing every subject."""
    rng = np.random.default_rng(seed)
    boxes, subject, volunteer, g_boxes, g_subject = [], [], [], [], []
    for s in range(n_subjects):
        for k in range(int(rng.integers(0, 4))):
            truth = np.array([100.0 * k, 0.0, 100.0 * k + 40.0, 60.0])
            g_boxes.append(truth)
            g_subject.append(s)
            for u in range(p_fn.size):
                if rng.random() > p_fn[u]:
                    boxes.append(truth + rng.normal(0, 2.0, 4))
                    subject.append(s)
                    volunteer.append(u)
        for u in range(p_fn.size):
            if rng.random() < 0.1:
                boxes.append(np.array([500.0, 500.0, 530.0, 540.0]) + rng.uniform(0, 300, 4))
                subject.append(s)
                volunteer.append(u)
    n_u = p_fn.size
    return {
        "boxes": np.array(boxes),
        "subject": np.array(subject),
        "volunteer": np.array(volunteer),
        "view_subject": np.repeat(np.arange(n_subjects), n_u),
        "view_volunteer": np.tile(np.arange(n_u), n_subjects),
        "gold_boxes": np.array(g_boxes),
        "gold_subject": np.array(g_subject),
    }


def test_gold_learning_recovers_a_careless_volunteers_high_miss_rate() -> None:
    """On gold, a volunteer missing 70% of objects gets p_fn near 0.7, careful ones near 0.1."""
    p_fn = np.array([0.1, 0.1, 0.1, 0.1, 0.7])
    d = _synthetic(1, p_fn)
    skills = marks.learn_skills(
        d["boxes"],
        d["subject"],
        d["volunteer"],
        d["view_subject"],
        d["view_volunteer"],
        gold_boxes=d["gold_boxes"],
        gold_subject=d["gold_subject"],
        gold_subjects=np.arange(150),
        use_em=False,
    )
    assert skills.p_fn[4] == pytest.approx(0.7, abs=0.1)
    assert np.all(np.abs(skills.p_fn[:4] - 0.1) < 0.06)
    assert np.all(skills.sigma < 0.2)


def test_em_without_gold_finds_the_careless_volunteer() -> None:
    """EM alone gives the careless volunteer the highest p_fn and keeps most real objects."""
    p_fn = np.array([0.1, 0.1, 0.1, 0.1, 0.7])
    d = _synthetic(2, p_fn)
    args = (d["boxes"], d["subject"], d["volunteer"], d["view_subject"], d["view_volunteer"])
    skills = marks.learn_skills(*args)
    assert int(np.argmax(skills.p_fn)) == 4
    result = marks.aggregate_many(*args, skills)
    # EM alone under-keeps objects only 3 of the 5 marked (f drifts to ~0.5): 93% kept
    assert 0.9 * len(d["gold_boxes"]) <= int(result.kept.sum()) <= len(d["gold_boxes"])


def test_a_new_volunteer_counts_as_population_average() -> None:
    """A volunteer id beyond the skill arrays gets the population p_fn and f."""
    skills = replace(marks.MarkSkills.population(1), pop_p_fn=0.3, pop_f=0.2)
    boxes = np.array([[0.0, 0.0, 10.0, 10.0]])
    result = marks.aggregate_subject(boxes, np.array([7]), np.array([7]), skills)
    expected = math.log(0.7 / 0.2)
    assert result.logit[0] == pytest.approx(expected)


def test_subject_risk_counts_objects_nobody_marked() -> None:
    """With no marks, E[missed] = object rate x product of the viewers' p_fn."""
    skills = replace(_toy_skills(), object_rate=2.0)
    risk = marks.subject_risk([], [], [0, 1, 2], skills)
    assert risk[2] == pytest.approx(2.0 * 0.1 * 0.2 * 0.3)
    result = marks.aggregate_subject(
        np.zeros((0, 4)), np.zeros(0, dtype=np.int64), [0, 1, 2], skills
    )
    assert result.risk == pytest.approx(risk[0])


def test_cluster_posteriors_agree_with_aggregate_subject() -> None:
    """Scoring the labels aggregate_subject chose reproduces its posteriors and boxes."""
    boxes = np.array([[0.0, 0, 10, 10], [1.0, 0, 11, 10], [50.0, 50, 60, 60], [0.0, 1, 10, 11]])
    volunteer = np.array([0, 1, 1, 2])
    result = marks.aggregate_subject(boxes, volunteer, [0, 1, 2], _toy_skills())
    post = marks.cluster_posteriors(boxes, volunteer, [0, 1, 2], result.labels, _toy_skills())
    np.testing.assert_allclose(post["logit"], result.logit)
    np.testing.assert_allclose(post["box"], result.box)
    assert [m.tolist() for m in result.members] == [[0, 1, 3], [2]]


def test_associate_can_leave_a_lone_mark_as_a_false_positive() -> None:
    """With min_logit 0 a mark nobody else drew gets label -1."""
    boxes = np.array([[0.0, 0, 10, 10], [1.0, 0, 11, 10], [50.0, 50, 60, 60]])
    labels = marks.associate(boxes, np.array([0, 1, 1]), [0, 1, 2], _toy_skills(), min_logit=0.0)
    assert labels.tolist() == [0, 0, -1]


def test_aggregate_many_equals_aggregate_subject_subject_by_subject() -> None:
    """The batch path and the per-subject path give the same clusters."""
    d = _synthetic(3, np.array([0.2, 0.2, 0.3]), n_subjects=20)
    skills = marks.MarkSkills.population(3)
    many = marks.aggregate_many(
        d["boxes"], d["subject"], d["volunteer"], d["view_subject"], d["view_volunteer"], skills
    )
    for s in range(20):
        rows = d["subject"] == s
        one = marks.aggregate_subject(d["boxes"][rows], d["volunteer"][rows], [0, 1, 2], skills)
        np.testing.assert_allclose(one.p_real, many.p_real[many.subject == s])
        np.testing.assert_allclose(one.box, many.box[many.subject == s])


def test_bad_shapes_raise_input_error_naming_the_field() -> None:
    """Boxes with three columns are refused with field 'boxes'."""
    with pytest.raises(InputError) as info:
        marks.aggregate_subject(np.zeros((2, 3)), np.array([0, 1]), [0, 1], _toy_skills())
    assert info.value.field == "boxes"


def test_skill_intervals_contain_the_estimates() -> None:
    """Each credible interval brackets its posterior mean."""
    skills = _toy_skills()
    for name, interval in marks.skill_intervals(skills).items():
        value = getattr(skills, name)
        assert np.all((interval[:, 0] <= value) & (value <= interval[:, 1]))


def test_the_population_skill_pools_only_the_volunteers_in_the_pool() -> None:
    """A careful machine left out of the pool does not lend new volunteers its miss rate."""
    p_fn = np.array([0.02, 0.6, 0.6, 0.6, 0.6])
    d = _synthetic(4, p_fn)
    args = (d["boxes"], d["subject"], d["volunteer"], d["view_subject"], d["view_volunteer"])
    gold = {
        "gold_boxes": d["gold_boxes"],
        "gold_subject": d["gold_subject"],
        "gold_subjects": np.arange(150),
        "use_em": False,
    }
    everyone = marks.learn_skills(*args, **gold)
    humans = marks.learn_skills(*args, **gold, pool=np.array([False, True, True, True, True]))
    assert humans.pop_p_fn > everyone.pop_p_fn
    assert humans.pop_p_fn == pytest.approx(0.6, abs=0.1)
    with pytest.raises(InputError):
        marks.learn_skills(*args, **gold, pool=np.array([True, False]))
