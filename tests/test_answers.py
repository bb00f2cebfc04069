"""The answer math (app.answers): a hand-computed toy table, properties, EM, retirement."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app import answers
from app.answers import (
    RetirementRule,
    Skills,
    confusion,
    credible_intervals,
    decide_retirement,
    fit,
    gold_counts,
    information_per_vote,
    majority_vote,
    posterior_history,
    subject_posteriors,
)

# --- the toy table ----------------------------------------------------------------------------
# Five volunteers with alpha = 1 everywhere and counts chosen so that Θ is round:
#   u0 [[.8 .2] [.2 .8]]   u1 [[.6 .4] [.4 .6]]   u2 [[.5 .5] [.5 .5]] (uninformative)
#   u3 [[.9 .1] [.5 .5]]   u4 [[.2 .8] [.8 .2]] (obtuse)            class prior π = (.6, .4)
# Votes (subject x volunteer, "." = no vote):
#         u0 u1 u2 u3 u4
#   s0     1  1  .  .  .     P ∝ (.6*.2*.4, .4*.8*.6)          = (.048, .192)    -> (1/5, 4/5)
#   s1     .  .  1  0  0     P ∝ (.6*.5*.9*.2, .4*.5*.5*.8)    = (.054, .080)    -> (27/67, 40/67)
#   s2     0  0  0  0  0     P ∝ (.6*.8*.6*.5*.9*.2, .4*.2*.4*.5*.5*.8) = (.02592, .0064)
#                                                                               -> (81/101, 20/101)
#   s3     1  .  .  1  .     P ∝ (.6*.2*.1, .4*.8*.5)          = (.012, .16)     -> (3/43, 40/43)
#   s4     .  .  .  .  .     no votes: the prior                                -> (3/5, 2/5)

TOY_COUNTS = np.array(
    [
        [[7, 1], [1, 7]],
        [[5, 3], [3, 5]],
        [[3, 3], [3, 3]],
        [[8, 0], [4, 4]],
        [[1, 7], [7, 1]],
    ],
    dtype=float,
)
TOY_SKILLS = Skills(TOY_COUNTS, np.ones((2, 2)), np.array([0.6, 0.4]))
TOY_SUBJECT = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3])
TOY_VOLUNTEER = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 3])
TOY_ANSWER = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1])
TOY_EXPECTED = [
    (Fraction(1, 5), Fraction(4, 5)),
    (Fraction(27, 67), Fraction(40, 67)),
    (Fraction(81, 101), Fraction(20, 101)),
    (Fraction(3, 43), Fraction(40, 43)),
    (Fraction(3, 5), Fraction(2, 5)),
]


def test_toy_confusion_matrices_are_the_round_numbers_in_the_comment() -> None:
    """Θ_u = (alpha + N_u) row-normalised gives the matrices written out above."""
    expected = [
        [[0.8, 0.2], [0.2, 0.8]],
        [[0.6, 0.4], [0.4, 0.6]],
        [[0.5, 0.5], [0.5, 0.5]],
        [[0.9, 0.1], [0.5, 0.5]],
        [[0.2, 0.8], [0.8, 0.2]],
    ]
    np.testing.assert_allclose(confusion(TOY_SKILLS), expected, rtol=0, atol=1e-15)


def test_toy_posteriors_match_the_hand_computation_exactly() -> None:
    """Every toy subject's posterior equals the fraction computed by hand, to 1e-12."""
    posterior = subject_posteriors(TOY_SUBJECT, TOY_VOLUNTEER, TOY_ANSWER, 5, TOY_SKILLS)
    expected = np.array([[float(p) for p in row] for row in TOY_EXPECTED])
    np.testing.assert_allclose(posterior, expected, rtol=0, atol=1e-12)


def test_binary_posterior_is_swaps_log_odds_sum() -> None:
    """For K=2 the log-odds are logit(π) + Σ log(PL/(1-PD)) for yes, log((1-PL)/PD) for no."""
    theta = confusion(TOY_SKILLS)
    pd, pl = theta[TOY_VOLUNTEER, 0, 0], theta[TOY_VOLUNTEER, 1, 1]
    weight = np.where(TOY_ANSWER == 1, np.log(pl / (1 - pd)), np.log((1 - pl) / pd))
    log_odds = np.log(0.4 / 0.6) + np.bincount(TOY_SUBJECT, weights=weight, minlength=5)
    posterior = subject_posteriors(TOY_SUBJECT, TOY_VOLUNTEER, TOY_ANSWER, 5, TOY_SKILLS)
    np.testing.assert_allclose(posterior[:, 1], 1 / (1 + np.exp(-log_odds)), atol=1e-12)


def test_posterior_history_steps_through_each_vote_and_ends_at_the_posterior() -> None:
    """History row 0 is the prior, row i the posterior after i votes, the last the posterior."""
    history = posterior_history(np.array([0, 3]), np.array([1, 1]), TOY_SKILLS)
    np.testing.assert_allclose(history[0], [0.6, 0.4], atol=1e-12)
    np.testing.assert_allclose(history[1], [0.12 / 0.44, 0.32 / 0.44], atol=1e-12)
    np.testing.assert_allclose(history[2], [3 / 43, 40 / 43], atol=1e-12)


def test_a_new_volunteer_counts_as_the_average_volunteer() -> None:
    """A volunteer index >= U scores with alpha alone (here uniform, so the prior stays)."""
    skills = Skills(TOY_COUNTS, np.array([[3.0, 1.0], [1.0, 3.0]]), np.array([0.5, 0.5]))
    posterior = subject_posteriors(np.array([0]), np.array([99]), np.array([1]), 1, skills)
    np.testing.assert_allclose(posterior, [[0.25, 0.75]], atol=1e-12)


def test_gold_counts_are_one_hot_truth_by_answer() -> None:
    """gold_counts puts one count at [volunteer, true class, answer] per gold vote."""
    counts = gold_counts(np.array([0, 0, 1]), np.array([1, 0, 1]), np.array([1, 1, 0]), 2, 2)
    np.testing.assert_array_equal(counts, [[[0, 0], [1, 1]], [[0, 1], [0, 0]]])


def test_credible_intervals_bracket_the_mean_and_narrow_with_votes() -> None:
    """The 90% intervals contain Θ and shrink as a volunteer's counts grow."""
    skills = Skills(
        np.array([[[4.0, 1.0], [1.0, 4.0]], [[400.0, 100.0], [100.0, 400.0]]]),
        np.ones((2, 2)),
        np.array([0.5, 0.5]),
    )
    lower, upper = credible_intervals(skills, level=0.9)
    theta = confusion(skills)
    assert np.all(lower < theta) and np.all(theta < upper)
    assert np.all(upper[1] - lower[1] < upper[0] - lower[0])


def test_information_per_vote_is_zero_for_noise_and_full_for_a_perfect_volunteer() -> None:
    """Uninformative volunteers score 0 bits; near-perfect ones approach H(π) = 1 bit."""
    skills = Skills(
        np.array([[[1e9, 0.0], [0.0, 1e9]], [[5.0, 5.0], [5.0, 5.0]]]),
        np.ones((2, 2)),
        np.array([0.5, 0.5]),
    )
    info = information_per_vote(skills)
    assert info[0] == pytest.approx(1.0, abs=1e-6)
    assert info[1] == pytest.approx(0.0, abs=1e-12)


# --- properties -------------------------------------------------------------------------------

N_VOLUNTEERS = 6


@st.composite
def skills_and_votes(draw: st.DrawFn) -> tuple[Skills, np.ndarray, np.ndarray, np.ndarray, int]:
    """Random skills (U=6, K=2..4) and up to 30 votes on up to 5 subjects."""
    K = draw(st.integers(2, 4))
    counts = draw(hnp.arrays(np.float64, (N_VOLUNTEERS, K, K), elements=st.floats(0, 50)))
    alpha = draw(hnp.arrays(np.float64, (K, K), elements=st.floats(0.1, 10)))
    prior = draw(hnp.arrays(np.float64, (K,), elements=st.floats(0.05, 1)))
    n_votes = draw(st.integers(0, 30))
    n_subjects = draw(st.integers(1, 5))
    votes = st.tuples(st.integers(0, n_subjects - 1), st.integers(0, N_VOLUNTEERS - 1))
    pairs = draw(st.lists(votes, min_size=n_votes, max_size=n_votes))
    answer = draw(st.lists(st.integers(0, K - 1), min_size=n_votes, max_size=n_votes))
    subject = np.array([p[0] for p in pairs], dtype=np.int64)
    volunteer = np.array([p[1] for p in pairs], dtype=np.int64)
    skills = Skills(counts, alpha, prior / prior.sum())
    return skills, subject, volunteer, np.array(answer, dtype=np.int64), n_subjects


@given(skills_and_votes())
def test_a_posterior_sums_to_one(
    case: tuple[Skills, np.ndarray, np.ndarray, np.ndarray, int],
) -> None:
    """Every row of the posterior is a probability distribution."""
    skills, subject, volunteer, answer, n_subjects = case
    posterior = subject_posteriors(subject, volunteer, answer, n_subjects, skills)
    np.testing.assert_allclose(posterior.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(posterior >= 0)


@given(skills_and_votes(), st.data())
def test_vote_order_does_not_matter(
    case: tuple[Skills, np.ndarray, np.ndarray, np.ndarray, int], data: st.DataObject
) -> None:
    """Shuffling the votes leaves every posterior unchanged."""
    skills, subject, volunteer, answer, n_subjects = case
    order = np.array(data.draw(st.permutations(range(subject.size))), dtype=np.intp)
    before = subject_posteriors(subject, volunteer, answer, n_subjects, skills)
    after = subject_posteriors(subject[order], volunteer[order], answer[order], n_subjects, skills)
    np.testing.assert_allclose(after, before, atol=1e-12)


@given(skills_and_votes(), st.integers(0, 3), st.floats(0.5, 20))
def test_an_uninformative_volunteer_leaves_the_posterior_unchanged(
    case: tuple[Skills, np.ndarray, np.ndarray, np.ndarray, int], answer_given: int, level: float
) -> None:
    """A vote from a volunteer whose Θ rows are all equal changes nothing."""
    skills, subject, volunteer, answer, n_subjects = case
    K = skills.n_classes
    counts = skills.counts.copy()
    counts[0] = level  # volunteer 0: equal rows, and alpha rows equal below
    flat = Skills(counts, np.ones((K, K)), skills.class_prior)
    others = volunteer != 0
    s, v, a = subject[others], volunteer[others], answer[others]
    before = subject_posteriors(s, v, a, n_subjects, flat)
    with_noise = subject_posteriors(
        np.append(s, 0), np.append(v, 0), np.append(a, answer_given % K), n_subjects, flat
    )
    np.testing.assert_allclose(with_noise, before, atol=1e-12)


@given(skills_and_votes(), st.integers(0, 3))
def test_a_near_perfect_volunteer_pulls_toward_their_answer(
    case: tuple[Skills, np.ndarray, np.ndarray, np.ndarray, int], answer_given: int
) -> None:
    """One more vote j from a 99%-accurate volunteer raises P[j] (unless it was already ~1)."""
    skills, subject, volunteer, answer, n_subjects = case
    K = skills.n_classes
    j = answer_given % K
    expert = np.full((K, K), 1.0) + np.eye(K) * 99 * K
    counts = np.concatenate([skills.counts, expert[np.newaxis]], axis=0)
    sharp = Skills(counts, skills.alpha, skills.class_prior)
    before = subject_posteriors(subject, volunteer, answer, n_subjects, sharp)
    after = subject_posteriors(
        np.append(subject, 0),
        np.append(volunteer, N_VOLUNTEERS),
        np.append(answer, j),
        n_subjects,
        sharp,
    )
    assert after[0, j] >= before[0, j] - 1e-12
    if before[0, j] < 0.999:
        assert after[0, j] > before[0, j]


@given(skills_and_votes())
@settings(max_examples=30)
def test_inputs_are_never_mutated(
    case: tuple[Skills, np.ndarray, np.ndarray, np.ndarray, int],
) -> None:
    """Read-only inputs go through every public function untouched."""
    skills, subject, volunteer, answer, n_subjects = case
    for array in (subject, volunteer, answer, skills.counts, skills.alpha, skills.class_prior):
        array.setflags(write=False)
    copies = [a.copy() for a in (subject, volunteer, answer, skills.counts, skills.alpha)]
    posterior = subject_posteriors(subject, volunteer, answer, n_subjects, skills)
    posterior_history(volunteer, answer, skills)
    credible_intervals(skills)
    information_per_vote(skills)
    result = fit(subject, volunteer, answer, n_subjects, N_VOLUNTEERS, skills.n_classes, max_iter=5)
    fit(
        subject,
        volunteer,
        answer,
        n_subjects,
        N_VOLUNTEERS,
        skills.n_classes,
        max_iter=5,
        leave_one_out="exact",
    )
    views = np.bincount(subject, minlength=n_subjects)
    views.setflags(write=False)
    gold = np.zeros(n_subjects, dtype=bool)
    gold.setflags(write=False)
    decide_retirement(posterior, views, gold, RetirementRule(min_views=0))
    for before, after in zip(
        copies, (subject, volunteer, answer, skills.counts, skills.alpha), strict=True
    ):
        np.testing.assert_array_equal(before, after)
    np.testing.assert_allclose(result.posterior.sum(axis=1), 1.0, atol=1e-9)


# --- EM ---------------------------------------------------------------------------------------


def simulate(
    seed: int, n_subjects: int = 400, n_volunteers: int = 40, K: int = 3, per_subject: int = 5
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Votes from a mixture of good volunteers, spammers and adversaries; returns truth too."""
    rng = np.random.default_rng(seed)
    prior = np.array([0.5, 0.3, 0.2, 0.1])[:K]
    truth = rng.choice(K, size=n_subjects, p=prior / prior.sum())
    skill = rng.uniform(0.6, 0.95, n_volunteers)
    theta = np.repeat(((1 - skill) / (K - 1))[:, None, None], K, axis=1).repeat(K, axis=2)
    theta[:, np.arange(K), np.arange(K)] = skill[:, None]
    theta[: n_volunteers // 5] = rng.dirichlet(np.ones(K), size=n_volunteers // 5)[:, None, :]
    adversaries = slice(n_volunteers // 5, n_volunteers // 5 + n_volunteers // 10)
    theta[adversaries] = np.roll(np.eye(K) * 0.8 + 0.2 / K, 1, axis=1)
    theta /= theta.sum(axis=2, keepdims=True)
    subject = np.repeat(np.arange(n_subjects), per_subject)
    volunteer = np.concatenate(
        [rng.choice(n_volunteers, size=per_subject, replace=False) for _ in range(n_subjects)]
    )
    cumulative = np.cumsum(theta[volunteer, truth[subject]], axis=1)
    answer = (rng.random(subject.size)[:, None] > cumulative[:, :-1]).sum(axis=1)
    return subject, volunteer, answer, truth, theta


@pytest.mark.parametrize("mode", ["weighted", "exact"])
def test_fit_recovers_the_truth_better_than_majority_vote(mode: answers.LeaveOneOut) -> None:
    """On simulated votes with spammers and adversaries, EM beats majority vote."""
    wins = 0
    for seed in range(3):
        subject, volunteer, answer, truth, _ = simulate(seed)
        result = fit(subject, volunteer, answer, 400, 40, 3, leave_one_out=mode)
        assert result.converged
        em = np.mean(result.posterior.argmax(axis=1) == truth)
        mv = np.mean(majority_vote(subject, answer, 400, 3).argmax(axis=1) == truth)
        wins += em > mv
    assert wins == 3


def test_fit_posterior_is_subject_posteriors_under_the_fitted_skills() -> None:
    """FitResult.posterior is exactly what the fitted skills give (the service recomputes it)."""
    subject, volunteer, answer, _, _ = simulate(4)
    result = fit(subject, volunteer, answer, 400, 40, 3)
    again = subject_posteriors(subject, volunteer, answer, 400, result.skills)
    np.testing.assert_allclose(result.posterior, again, atol=1e-12)


def test_gold_subjects_are_clamped_and_teach_their_volunteers() -> None:
    """Gold posteriors are one-hot whatever the votes, and gold reveals an adversary."""
    subject = np.repeat(np.arange(6), 3)
    volunteer = np.tile([0, 1, 2], 6)
    answer = np.array([1, 1, 0] * 6)  # volunteers 0 and 1 always say 1, volunteer 2 says 0
    gold_subject = np.arange(4)
    gold_label = np.zeros(4, dtype=int)  # ...but on gold the truth is 0: 0 and 1 are wrong
    result = fit(
        subject, volunteer, answer, 6, 3, 2, gold_subject=gold_subject, gold_label=gold_label
    )
    np.testing.assert_array_equal(result.posterior[:4], [[1, 0]] * 4)
    theta = confusion(result.skills)
    assert theta[2, 0, 0] > theta[0, 0, 0]
    assert result.posterior[4, 0] > 0.5  # the volunteer who matches gold wins the others


def test_gold_only_learns_from_gold_alone_like_swap_supervised_mode() -> None:
    """With gold_only, counts are the gold counts and the other subjects teach nothing."""
    subject, volunteer, answer, truth, _ = simulate(1, n_subjects=300, n_volunteers=20, K=2)
    gold = np.arange(60)
    result = fit(
        subject,
        volunteer,
        answer,
        300,
        20,
        2,
        gold_subject=gold,
        gold_label=truth[gold],
        gold_only=True,
    )
    on_gold = subject < 60
    expected = gold_counts(volunteer[on_gold], answer[on_gold], truth[subject[on_gold]], 20, 2)
    np.testing.assert_array_equal(result.skills.counts, expected)
    accuracy = np.mean(result.posterior[60:].argmax(axis=1) == truth[60:])
    assert accuracy > np.mean(
        majority_vote(subject, answer, 300, 2)[60:].argmax(axis=1) == truth[60:]
    )


def test_a_fixed_class_prior_is_kept() -> None:
    """class_prior given to fit comes back unchanged."""
    subject, volunteer, answer, _, _ = simulate(2, K=2)
    result = fit(subject, volunteer, answer, 400, 40, 2, class_prior=[0.9, 0.1])
    np.testing.assert_allclose(result.skills.class_prior, [0.9, 0.1])


def test_a_volunteer_alone_on_a_subject_is_not_taught_by_their_vote() -> None:
    """Weighted mode: a lone vote adds nothing to anyone's counts."""
    subject, volunteer, answer, _, _ = simulate(3, K=2)
    base = fit(subject, volunteer, answer, 401, 40, 2, class_prior=[0.5, 0.5])
    lone = fit(
        np.append(subject, 400),
        np.append(volunteer, 7),
        np.append(answer, 1),
        401,
        40,
        2,
        class_prior=[0.5, 0.5],
    )
    np.testing.assert_allclose(lone.skills.counts, base.skills.counts, atol=1e-12)


def test_exact_leave_one_out_teaches_a_lone_voter_only_the_prior() -> None:
    """Exact mode: the label that teaches a lone voter is q_s / Θ_u[:, j] = the class prior."""
    skills = Skills(TOY_COUNTS, np.ones((2, 2)), np.array([0.6, 0.4]))
    s, v, a = np.array([0]), np.array([3]), np.array([1])
    posterior = subject_posteriors(s, v, a, 1, skills)
    teach = answers._leave_one_out(s, v * 2 + a, posterior, skills)
    np.testing.assert_allclose(teach[:, 0], [0.6, 0.4], atol=1e-12)


def test_fit_agrees_with_crowd_kit_dawid_skene() -> None:
    """Posterior labels agree with crowd-kit's DawidSkene on at least 95% of subjects."""
    crowdkit = pytest.importorskip("crowdkit.aggregation")
    pandas = pytest.importorskip("pandas")
    subject, volunteer, answer, _, _ = simulate(5, n_subjects=300, K=3)
    frame = pandas.DataFrame({"task": subject, "worker": volunteer, "label": answer})
    theirs = crowdkit.DawidSkene(n_iter=100).fit_predict(frame).sort_index().to_numpy()
    ours = fit(subject, volunteer, answer, 300, 40, 3).posterior.argmax(axis=1)
    assert np.mean(ours == theirs) >= 0.95


# --- retirement -------------------------------------------------------------------------------

POSTERIOR = np.array([[0.999, 0.001], [0.5, 0.5], [0.02, 0.98], [1e-9, 1 - 1e-9], [0.999, 0.001]])


def test_risk_rule_retires_settled_subjects_and_names_empty_classes() -> None:
    """Risk bound: settled on class 0 (named empty) reads nothing_here, on class 1 consensus."""
    rule = RetirementRule(kind="risk", risk_bound=0.005, empty_classes=(0,), min_views=0)
    reasons = decide_retirement(POSTERIOR, np.full(5, 5), np.zeros(5, bool), rule)
    assert reasons.tolist() == ["nothing_here", "", "", "consensus", "nothing_here"]


def test_nothing_retires_below_the_floor_of_views() -> None:
    """A confident posterior from too few views does not retire."""
    rule = RetirementRule(kind="risk", min_views=3)
    reasons = decide_retirement(POSTERIOR, np.array([2, 2, 2, 3, 1]), np.zeros(5, bool), rule)
    assert reasons.tolist() == ["", "", "", "consensus", ""]


def test_the_cap_retires_as_classification_count() -> None:
    """At cap views an unsettled subject retires as classification_count; settled: consensus."""
    rule = RetirementRule(kind="risk", cap=10)
    reasons = decide_retirement(POSTERIOR, np.array([10, 10, 9, 12, 2]), np.zeros(5, bool), rule)
    assert reasons.tolist() == ["consensus", "classification_count", "", "consensus", ""]


def test_gold_never_retires() -> None:
    """Gold subjects keep going whatever their posterior or view count."""
    rule = RetirementRule(kind="risk", cap=3)
    reasons = decide_retirement(POSTERIOR, np.full(5, 50), np.ones(5, bool), rule)
    assert reasons.tolist() == [""] * 5


def test_swap_thresholds_accept_and_reject_on_the_positive_class() -> None:
    """SWAP: P >= accept is consensus, P <= reject is nothing_here, in between keeps going."""
    rule = RetirementRule(kind="swap", accept=0.95, reject=0.004, min_views=0)
    reasons = decide_retirement(POSTERIOR, np.full(5, 5), np.zeros(5, bool), rule)
    assert reasons.tolist() == ["nothing_here", "", "consensus", "consensus", "nothing_here"]


def test_per_class_thresholds_retire_only_named_classes() -> None:
    """Threshold kind: P[k] >= t_k retires; a class without a threshold never does."""
    rule = RetirementRule(kind="threshold", thresholds={1: 0.97}, min_views=0)
    reasons = decide_retirement(POSTERIOR, np.full(5, 5), np.zeros(5, bool), rule)
    assert reasons.tolist() == ["", "", "consensus", "consensus", ""]


def test_fit_does_not_depend_on_vote_order() -> None:
    """Shuffled votes (the unsorted sparse-matrix path) fit to the same posterior as sorted ones."""
    subject, volunteer, answer, _, _ = simulate(6)
    order = np.random.default_rng(0).permutation(subject.size)
    ordered = fit(subject, volunteer, answer, 400, 40, 3)
    shuffled = fit(subject[order], volunteer[order], answer[order], 400, 40, 3)
    np.testing.assert_allclose(shuffled.posterior, ordered.posterior, atol=1e-9)
    np.testing.assert_allclose(shuffled.skills.counts, ordered.skills.counts, atol=1e-9)


def test_the_module_docstring_example_runs() -> None:
    """The runnable example in app.answers' docstring gives the output it shows."""
    import doctest

    failures, _ = doctest.testmod(answers)
    assert failures == 0


def test_the_population_prior_pools_only_the_volunteers_in_the_pool() -> None:
    # Volunteer 0 (a machine) has 300 votes, all right; volunteers 1-2 are right half the time.
    counts = np.array(
        [[[150.0, 0.0], [0.0, 150.0]], [[25.0, 25.0], [25.0, 25.0]], [[25.0, 25.0], [25.0, 25.0]]]
    )
    pool = np.array([False, True, True])
    everyone = answers.population_alpha(counts, 4.0)
    humans = answers.population_alpha(counts, 4.0, pool)
    # Pooled with the machine, a new volunteer looks far better than the humans are.
    assert np.diag(everyone).mean() / 4.0 > 0.7
    assert np.diag(humans).mean() / 4.0 == pytest.approx(0.5, abs=0.05)
    # fit() passes the pool through: its alpha is the pool's.
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, 300)
    subject = np.concatenate([np.arange(300), np.arange(300), np.arange(300)])
    volunteer = np.repeat([0, 1, 2], 300)
    answer = np.concatenate([truth, rng.integers(0, 2, 600)])
    result = answers.fit(subject, volunteer, answer, 300, 3, 2, pool=pool)
    expected = answers.population_alpha(result.skills.counts, 4.0, pool)
    np.testing.assert_allclose(result.skills.alpha, expected)
    with pytest.raises(ValueError, match="pool"):
        answers.fit(subject, volunteer, answer, 300, 3, 2, pool=np.array([True]))
