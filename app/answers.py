"""The answer math: volunteer confusion matrices, subject posteriors, EM, retirement.

Pure numpy/scipy. Arrays in, arrays out; no I/O; inputs are never mutated; no Python loop runs
over votes (loops run over the K classes at most). Shapes, named once for the whole module:

    S  subjects      subject ids   0..S-1
    U  volunteers    volunteer ids 0..U-1 (an id >= U is a new volunteer: an average one)
    K  classes       answers       0..K-1
    V  votes         three int arrays of length V: `subject`, `volunteer`, `answer`

Model (Dawid & Skene 1979, with Dirichlet priors as in Kim & Ghahramani 2012 / Branson et al. 2017).
Volunteer u has a confusion matrix Θ_u (K, K), row = true class k, column = answer j,
Θ_u[k, j] = P(answer = j | truth = k). Each row has a Dirichlet prior centred on the population's
mean matrix M (pooled over everybody, re-estimated in every EM sweep: empirical Bayes) with
strength c, alpha = c * M. With soft counts N_u[k, j] (one-hot on gold subjects):

    Θ_u[k, j] = (alpha[k, j] + N_u[k, j]) / Σ_j' (alpha[k, j'] + N_u[k, j'])      posterior mean

so a volunteer with no counts is the average volunteer, and a spammer's rows become equal (a vote
that moves nothing). The subject posterior, computed in log space with the row max subtracted:

    log P(y_s = k | votes) = log π_k + Σ_{votes (s, u, j)} log Θ_u[k, j] + const

For K = 2 this is SWAP's log-odds sum (Marshall et al. 2016): log(PL / (1 - PD)) for a "yes" and
log((1 - PL) / PD) for a "no". EM (`fit`): the E-step gives soft labels q_s (gold clamped);
the M-step counts N_u[k, j] = Σ_s w_s q_s[k] [u answered j on s] with w_s = (n_s - 1) / n_s for a
subject with n_s votes (Clump Scout's form), or, with leave_one_out="exact", with q_s^(-u) ∝
q_s / Θ_u[:, j], the posterior without u's own vote: either way nobody is taught by a vote they cast
alone; π is re-estimated unless fixed. Inside `fit` the votes become one sparse (S, U*K) count
matrix A[s, u*K + j], so an E-step is A @ (log Θ relative to class 0) and an M-step A.T @ (w q):
two CSR products per sweep, K - 1 columns each. The population prior M has its own weak
hyper-prior (HYPER_STRENGTH pseudo-votes a row, HYPER_DIAGONAL on the diagonal).
Retirement (`decide_retirement`) follows SWAP's accept/reject thresholds, per-class thresholds, or
Branson et al. 2017's risk bound 1 - max_k P <= bound, with a floor of views and a cap.

Example:
    >>> import numpy as np
    >>> subject = np.array([0, 0, 0, 1, 1])
    >>> volunteer = np.array([0, 1, 2, 0, 1])
    >>> answer = np.array([1, 1, 0, 0, 0])
    >>> result = fit(subject, volunteer, answer, n_subjects=2, n_volunteers=3, n_classes=2)
    >>> result.posterior.argmax(axis=1).tolist()
    [1, 0]
    >>> bool(np.allclose(result.posterior.sum(axis=1), 1.0))
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import sparse, special

FloatArray = npt.NDArray[np.float64]
LeaveOneOut = Literal["weighted", "exact"]
IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]
ArrayLike = npt.ArrayLike

DEFAULT_PRIOR_STRENGTH = 4.0
"""Pseudo-votes per confusion row in the population-centred Dirichlet prior."""

HYPER_STRENGTH = 2.0
"""Pseudo-votes per row added to the pooled matrix before it becomes the population mean."""

HYPER_DIAGONAL = 0.7
"""The share of those pseudo-votes on the diagonal: the population starts better than chance,
which keeps EM on small data away from the everybody-is-random fixed point (and label switching)."""


@dataclass(frozen=True)
class Skills:
    """What scores a vote: soft counts (U,K,K), Dirichlet prior (K,K) and class prior (K,)."""

    counts: FloatArray
    alpha: FloatArray
    class_prior: FloatArray

    @property
    def n_volunteers(self) -> int:
        """U, the number of volunteers with counts."""
        return int(self.counts.shape[0])

    @property
    def n_classes(self) -> int:
        """K, the number of classes."""
        return int(self.alpha.shape[0])


@dataclass(frozen=True)
class FitResult:
    """What `fit` learned: the skills, the posterior (S,K), sweeps run and whether EM converged."""

    skills: Skills
    posterior: FloatArray
    n_iter: int
    converged: bool


# --- skills -----------------------------------------------------------------------------------


def confusion(skills: Skills) -> FloatArray:
    """The posterior-mean confusion matrices Θ_u = (alpha + N_u) row-normalised, shape (U,K,K)."""
    total = skills.alpha[np.newaxis, :, :] + skills.counts
    result: FloatArray = total / total.sum(axis=2, keepdims=True)
    return result


def average_confusion(skills: Skills) -> FloatArray:
    """Θ of a volunteer with no counts (a new one): alpha row-normalised, (K,K)."""
    result: FloatArray = skills.alpha / skills.alpha.sum(axis=1, keepdims=True)
    return result


def population_alpha(
    counts: FloatArray,
    strength: float = DEFAULT_PRIOR_STRENGTH,
    pool: BoolArray | None = None,
) -> FloatArray:
    """Dirichlet pseudo-counts (K,K): `strength` times the pooled row-normalised `counts`.

    The pooled matrix is Σ_u N_u over the volunteers in `pool` (default: everybody) plus
    HYPER_STRENGTH pseudo-votes per row, HYPER_DIAGONAL of them on the diagonal, so an empty pool
    gives a weakly better-than-chance prior. Machine volunteers are left out of the pool by the
    service: a model that voted on every subject would otherwise make every new human look as
    good as the model.
    """
    if strength <= 0:
        raise ValueError("prior strength must be positive")
    members = np.asarray(counts, dtype=np.float64)
    if pool is not None:
        members = members[np.asarray(pool, dtype=bool)]
    pooled = members.sum(axis=0) + _hyper_counts(counts.shape[-1])
    result: FloatArray = strength * pooled / pooled.sum(axis=1, keepdims=True)
    return result


def _hyper_counts(K: int) -> FloatArray:
    """The hyper-prior pseudo-votes (K,K): HYPER_STRENGTH a row, HYPER_DIAGONAL on the diagonal."""
    off = (1.0 - HYPER_DIAGONAL) / (K - 1)
    result: FloatArray = HYPER_STRENGTH * (
        np.full((K, K), off) + (HYPER_DIAGONAL - off) * np.eye(K)
    )
    return result


def gold_counts(
    volunteer: ArrayLike,
    answer: ArrayLike,
    gold_label: ArrayLike,
    n_volunteers: int,
    n_classes: int,
) -> FloatArray:
    """One-hot counts N_u[k, j] (U,K,K) from votes on gold subjects, `gold_label` per vote (V,)."""
    u = _as_index(volunteer, n_volunteers, "volunteer")
    j = _as_index(answer, n_classes, "answer")
    k = _as_index(gold_label, n_classes, "gold_label")
    K = n_classes
    flat = np.bincount((u * K + k) * K + j, minlength=n_volunteers * K * K)
    return flat.reshape(n_volunteers, K, K).astype(np.float64)


def credible_intervals(skills: Skills, level: float = 0.9) -> tuple[FloatArray, FloatArray]:
    """Equal-tailed intervals (lower, upper), each (U,K,K), for every entry of every Θ_u.

    Row k of Θ_u is Dirichlet(alpha[k] + N_u[k]); entry j is marginally
    Beta(a_kj, Σ_j' a_kj' - a_kj).
    """
    if not 0.0 < level < 1.0:
        raise ValueError("level must lie strictly between 0 and 1")
    a = skills.alpha[np.newaxis, :, :] + skills.counts
    b = a.sum(axis=2, keepdims=True) - a
    tail = (1.0 - level) / 2.0
    lower: FloatArray = special.betaincinv(a, b, tail)
    upper: FloatArray = special.betaincinv(a, b, 1.0 - tail)
    return lower, upper


def information_per_vote(skills: Skills) -> FloatArray:
    """Mutual information (bits) between the truth and one answer of each volunteer, shape (U,).

    I_u = Σ_k π_k Σ_j Θ_u[k,j] log2(Θ_u[k,j] / p_u[j]) with p_u[j] = Σ_k π_k Θ_u[k,j]:
    0 for a random or constant clicker, H(π) for a perfect (or perfectly obtuse) one.
    """
    theta = confusion(skills)
    prior = skills.class_prior
    answer_prob = np.einsum("k,ukj->uj", prior, theta)
    ratio = np.log2(theta) - np.log2(answer_prob)[:, np.newaxis, :]
    result: FloatArray = np.einsum("k,ukj,ukj->u", prior, theta, ratio)
    return np.maximum(result, 0.0)


# --- posteriors -------------------------------------------------------------------------------


def subject_posteriors(
    subject: ArrayLike,
    volunteer: ArrayLike,
    answer: ArrayLike,
    n_subjects: int,
    skills: Skills,
) -> FloatArray:
    """The posterior P(y_s = k | votes) (S,K); a subject with no votes gets the class prior."""
    log_post = subject_log_likelihoods(subject, volunteer, answer, n_subjects, skills)
    log_post += np.log(skills.class_prior)[np.newaxis, :]
    return _softmax_rows(log_post)


def subject_log_likelihoods(
    subject: ArrayLike,
    volunteer: ArrayLike,
    answer: ArrayLike,
    n_subjects: int,
    skills: Skills,
) -> FloatArray:
    """Σ_votes log Θ_u[k, answer] per subject and class (S,K), the class prior left out."""
    s = _as_index(subject, n_subjects, "subject")
    cell = _vote_cells(volunteer, answer, skills)
    log_table = _log_table(_extended_confusion(skills))
    return _sum_by_subject(s, cell, log_table, n_subjects)


def posterior_history(volunteer: ArrayLike, answer: ArrayLike, skills: Skills) -> FloatArray:
    """For one subject's votes in arrival order, the posterior after 0, 1, .., n votes: (n+1, K)."""
    cell = _vote_cells(volunteer, answer, skills)
    log_table = _log_table(_extended_confusion(skills))
    steps = np.empty((cell.size + 1, skills.n_classes))
    steps[0] = np.log(skills.class_prior)
    steps[1:] = log_table[:, cell].T
    return _softmax_rows(np.cumsum(steps, axis=0))


def majority_vote(
    subject: ArrayLike, answer: ArrayLike, n_subjects: int, n_classes: int
) -> FloatArray:
    """Vote fractions per subject (S,K); a subject with no votes gets 1/K everywhere."""
    s = _as_index(subject, n_subjects, "subject")
    j = _as_index(answer, n_classes, "answer")
    votes = np.bincount(s * n_classes + j, minlength=n_subjects * n_classes)
    votes = votes.reshape(n_subjects, n_classes).astype(np.float64)
    total = votes.sum(axis=1, keepdims=True)
    result: FloatArray = np.where(total > 0, votes / np.maximum(total, 1.0), 1.0 / n_classes)
    return result


# --- EM ---------------------------------------------------------------------------------------


def fit(
    subject: ArrayLike,
    volunteer: ArrayLike,
    answer: ArrayLike,
    n_subjects: int,
    n_volunteers: int,
    n_classes: int,
    *,
    gold_subject: ArrayLike | None = None,
    gold_label: ArrayLike | None = None,
    gold_only: bool = False,
    prior_strength: float = DEFAULT_PRIOR_STRENGTH,
    class_prior: ArrayLike | None = None,
    max_iter: int = 100,
    tol: float = 1e-6,
    leave_one_out: LeaveOneOut = "weighted",
    pool: ArrayLike | None = None,
) -> FitResult:
    """Learn every volunteer's confusion matrix and every subject's posterior.

    Gold subjects (`gold_subject`, `gold_label`, (G,)) are clamped to their one-hot label. With
    `gold_only`, skills come from the gold votes alone (SWAP's supervised mode, no EM over the other
    subjects); only the class prior, if not fixed, is re-estimated from the resulting posteriors.
    Otherwise EM starts from the gold-only skills when gold is given, else from the majority vote,
    and stops when no posterior entry moves by more than `tol` (or after `max_iter` sweeps).
    `class_prior` (K,) is kept fixed when given and learned otherwise.

    `pool` (U,) bool marks the volunteers whose skills form the population prior (default all).

    `leave_one_out` says how a volunteer's own vote is kept from teaching them: "exact" teaches
    with q_s^(-u) ∝ q_s / Θ_u[:, j]; "weighted" (the default, Clump Scout's form) teaches with q_s
    weighted by (n_s - 1) / n_s, n_s the subject's vote count, so a volunteer alone on a subject
    learns nothing from it. "exact" is the purer form, but on sparse data (3 votes a subject) its
    less-informed labels make EM drift toward "everybody is random" (product: 87.9% vs 93.8%).
    """
    K = n_classes
    if K < 2:
        raise ValueError("need at least two classes")
    s = _as_index(subject, n_subjects, "subject")
    u = _as_index(volunteer, n_volunteers, "volunteer")
    j = _as_index(answer, K, "answer")
    if not s.size == u.size == j.size:
        raise ValueError("subject, volunteer and answer must have the same length")
    cell = u * K + j
    in_pool = None if pool is None else np.asarray(pool, dtype=bool)
    if in_pool is not None and in_pool.shape != (n_volunteers,):
        raise ValueError("pool must have one entry per volunteer")
    is_gold, gold_q = _gold_table(gold_subject, gold_label, n_subjects, K)
    n_votes = np.bincount(s, minlength=n_subjects)
    counted = (n_votes > 0) | is_gold
    fixed_prior = None if class_prior is None else _as_prior(class_prior, K)

    votes = _vote_matrix(s, cell, n_votes, n_volunteers * K)
    # Weighted mode: a vote teaches with weight (n_s - 1) / n_s (gold: 1), fixed for the whole fit,
    # so each (volunteer, answer) cell's total weight is computed once.
    weight = np.where(is_gold, 1.0, (n_votes - 1.0) / np.maximum(n_votes, 1.0))
    cell_total: FloatArray = votes.T @ weight

    producer: Skills | None = None  # the skills that produced `posterior`, if any
    if gold_only or is_gold.any():
        on_gold = is_gold[s]
        counts = gold_counts(
            u[on_gold], j[on_gold], gold_q[s[on_gold]].argmax(axis=1), n_volunteers, K
        )
        prior = fixed_prior if fixed_prior is not None else _gold_prior(gold_q, is_gold)
        producer = Skills(counts, population_alpha(counts, prior_strength, in_pool), prior)
        if gold_only:
            return _fit_prior_only(
                votes, producer, is_gold, gold_q, counted, fixed_prior, max_iter, tol
            )
        posterior = _e_step(votes, producer, is_gold, gold_q)
    else:
        answer_of_cell = np.eye(K)[np.tile(np.arange(K), n_volunteers)]  # (U*K, K) one-hot
        fractions = votes @ answer_of_cell
        fractions /= np.maximum(n_votes, 1)[:, np.newaxis]
        fractions[n_votes == 0] = 1.0 / K
        posterior = _clamp(fractions, is_gold, gold_q)
        prior = fixed_prior if fixed_prior is not None else _learn_prior(posterior, counted)

    def m_step(posterior: FloatArray, producer: Skills | None) -> FloatArray:
        """Soft counts (U,K,K) taught by `posterior`, the volunteer's own vote kept out."""
        if leave_one_out == "weighted":
            taught = posterior * weight[:, np.newaxis]
            return _weighted_counts(votes, taught, cell_total, n_volunteers)
        if leave_one_out != "exact":
            raise ValueError(f"unknown leave_one_out mode {leave_one_out!r}")
        if producer is None:
            teach = _majority_leave_one_out(s, j, posterior, prior)
        else:
            teach = _leave_one_out(s, cell, posterior, producer)
        return _soft_counts(cell, teach, n_volunteers, K)

    converged = False
    n_iter = 0
    skills = producer
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported after the loop
        if fixed_prior is None:
            prior = _learn_prior(posterior, counted)
        counts = m_step(posterior, skills)
        skills = Skills(counts, population_alpha(counts, prior_strength, in_pool), prior)
        new_posterior = _e_step(votes, skills, is_gold, gold_q)
        change = float(np.max(np.abs(new_posterior - posterior))) if n_subjects else 0.0
        posterior = new_posterior
        if change < tol:
            converged = True
            break
    if skills is None:  # max_iter == 0
        counts = m_step(posterior, None)
        skills = Skills(counts, population_alpha(counts, prior_strength, in_pool), prior)
    return FitResult(skills, posterior, n_iter, converged)


def _fit_prior_only(
    votes: sparse.csr_matrix,
    skills: Skills,
    is_gold: BoolArray,
    gold_q: FloatArray,
    counted: BoolArray,
    fixed_prior: FloatArray | None,
    max_iter: int,
    tol: float,
) -> FitResult:
    """Gold-only mode: skills stay fixed; the class prior alone is re-estimated unless fixed."""
    n_subjects = is_gold.size
    log_like = _relative_log_likelihoods(votes, skills)
    posterior = _clamp(_softmax_rows(log_like + np.log(skills.class_prior)), is_gold, gold_q)
    if fixed_prior is not None:
        return FitResult(skills, posterior, 0, True)
    prior = skills.class_prior
    for n_iter in range(1, max_iter + 1):
        prior = _learn_prior(posterior, counted)
        new = _clamp(_softmax_rows(log_like + np.log(prior)), is_gold, gold_q)
        change = float(np.max(np.abs(new - posterior))) if n_subjects else 0.0
        posterior = new
        if change < tol:
            return FitResult(Skills(skills.counts, skills.alpha, prior), posterior, n_iter, True)
    return FitResult(Skills(skills.counts, skills.alpha, prior), posterior, max_iter, False)


def _e_step(
    votes: sparse.csr_matrix, skills: Skills, is_gold: BoolArray, gold_q: FloatArray
) -> FloatArray:
    """Soft labels (S,K) under `skills`, gold rows clamped to their one-hot label."""
    log_post = _relative_log_likelihoods(votes, skills)
    prior = skills.class_prior
    if skills.n_classes == 2:  # the softmax of (0, x) is (expit(-x), expit(x))
        logit = log_post[:, 1] + np.log(prior[1] / prior[0])
        posterior = np.empty_like(log_post)
        special.expit(-logit, out=posterior[:, 0])
        special.expit(logit, out=posterior[:, 1])
        return _clamp(posterior, is_gold, gold_q)
    return _clamp(_softmax_rows(log_post + np.log(prior)), is_gold, gold_q)


def _relative_log_likelihoods(votes: sparse.csr_matrix, skills: Skills) -> FloatArray:
    """Σ_votes log Θ_u[k, j] - log Θ_u[0, j] per subject (S,K), as one sparse product.

    Every vote adds the same log Θ_u[0, j] to all classes, which normalisation removes, so
    K - 1 columns suffice; `votes` is the (S, U*K) vote-count matrix.
    """
    K = skills.n_classes
    total = skills.alpha[np.newaxis, :, :] + skills.counts  # (U,K,K)
    row_sum = total[:, :, 0].copy()  # Σ_j total[u, k, j], column by column (K is small)
    for j in range(1, K):
        row_sum += total[:, :, j]
    log_theta = np.log(total) - np.log(row_sum)[:, :, np.newaxis]
    # relative[u*K + j, k-1] = log Θ_u[k, j] - log Θ_u[0, j]
    relative = (log_theta[:, 1:, :] - log_theta[:, :1, :]).transpose(0, 2, 1).reshape(-1, K - 1)
    result = np.zeros((votes.shape[0], K))
    if K == 2:
        result[:, 1] = votes @ relative[:, 0]  # the one-vector product is scipy's fast path
    else:
        result[:, 1:] = votes @ relative
    return result


def _vote_matrix(s: IntArray, cell: IntArray, n_votes: IntArray, n_cells: int) -> sparse.csr_matrix:
    """The vote counts A[s, u*K + j] as a CSR matrix (S, U*K), built in O(V).

    Votes already sorted by subject (a refit reads them ORDER BY subject) become CSR arrays
    directly; otherwise scipy's COO-to-CSR counting sort does it.
    """
    n_subjects = n_votes.size
    small = max(s.size, n_cells, n_subjects) < np.iinfo(np.int32).max
    index = np.int32 if small else np.int64
    data = np.ones(s.size)
    if s.size < 2 or bool(np.all(s[1:] >= s[:-1])):
        indptr = np.zeros(n_subjects + 1, dtype=index)
        np.cumsum(n_votes, out=indptr[1:])
        matrix = (data, cell.astype(index), indptr)
        return sparse.csr_matrix(matrix, shape=(n_subjects, n_cells))
    return sparse.csr_matrix((data, (s, cell)), shape=(n_subjects, n_cells))


def _weighted_counts(
    votes: sparse.csr_matrix, taught: FloatArray, cell_total: FloatArray, n_volunteers: int
) -> FloatArray:
    """N_u[k, j] = Σ taught[s, k] over u's votes j (U,K,K), as one sparse product.

    `taught` (S,K) is the weighted posterior and `cell_total` (U*K,) the sum of its rows per
    cell, so row 0 is the total minus the other K - 1 rows.
    """
    K = taught.shape[1]
    counts = np.empty((n_volunteers, K, K))
    if K == 2:
        other = votes.T @ np.ascontiguousarray(taught[:, 1])
        counts[:, 1, :] = other.reshape(n_volunteers, K)
        counts[:, 0, :] = np.maximum(cell_total - other, 0.0).reshape(n_volunteers, K)
        return counts
    others = votes.T @ np.ascontiguousarray(taught[:, 1:])
    counts[:, 1:, :] = others.reshape(n_volunteers, K, K - 1).transpose(0, 2, 1)
    counts[:, 0, :] = np.maximum(cell_total - others.sum(axis=1), 0.0).reshape(n_volunteers, K)
    return counts


def _leave_one_out(
    s: IntArray, cell: IntArray, posterior: FloatArray, skills: Skills
) -> FloatArray:
    """Per vote, the subject's posterior without that vote: q_s / Θ_u[:, j] renormalised, (K,V).

    Computed in probability space: the most probable class of q_s has q >= 1/K and Θ <= 1, so the
    normaliser never underflows; a one-hot (gold) q stays one-hot.
    """
    theta_table = _prob_table(confusion(skills))
    q_t = np.ascontiguousarray(posterior.T)
    teach = np.empty((skills.n_classes, s.size))
    for k in range(skills.n_classes):
        np.divide(q_t[k][s], theta_table[k][cell], out=teach[k])
    teach /= teach.sum(axis=0)
    return teach


def _majority_leave_one_out(
    s: IntArray, j: IntArray, fractions: FloatArray, prior: FloatArray
) -> FloatArray:
    """First exact-mode weights: the other votes' fractions plus one pseudo-vote of `prior`."""
    K = fractions.shape[1]
    n_votes = np.bincount(s, minlength=fractions.shape[0]).astype(np.float64)
    teach = np.empty((K, s.size))
    n_s = n_votes[s]
    for k in range(K):
        others = fractions[s, k] * n_s - (j == k)
        teach[k] = (others + prior[k]) / n_s
    return teach


def _soft_counts(cell: IntArray, teach: FloatArray, n_volunteers: int, K: int) -> FloatArray:
    """N_u[k, j] = Σ_votes teach[k] over the votes where u answered j, shape (U,K,K)."""
    counts = np.empty((n_volunteers, K, K))
    for k in range(K):
        counts[:, k, :] = np.bincount(cell, weights=teach[k], minlength=n_volunteers * K).reshape(
            n_volunteers, K
        )
    return counts


def _learn_prior(posterior: FloatArray, counted: BoolArray) -> FloatArray:
    """π_k = (1 + Σ_s q_s[k]) / (K + n), over the subjects with votes or gold."""
    total = (posterior.sum(axis=0) if counted.all() else posterior[counted].sum(axis=0)) + 1.0
    result: FloatArray = total / total.sum()
    return result


def _gold_prior(gold_q: FloatArray, is_gold: BoolArray) -> FloatArray:
    """A starting class prior from the gold labels (add-one), uniform when there is no gold."""
    total = gold_q[is_gold].sum(axis=0) + 1.0
    result: FloatArray = total / total.sum()
    return result


# --- retirement -------------------------------------------------------------------------------

RetirementKind = Literal["threshold", "swap", "risk"]


@dataclass(frozen=True)
class RetirementRule:
    """A researcher's retirement rule.

    kind "threshold": retire when P[k] >= thresholds[k] for some class k (classes not named never
    retire by threshold); "swap": SWAP's pair on P[positive_class], retire as consensus when
    P >= accept and as nothing_here when P <= reject; "risk": retire when 1 - max_k P <= risk_bound
    (Branson et al. 2017). A decision on a class in `empty_classes` reads "nothing_here".
    No subject retires below `min_views`; at `cap` views it retires as "classification_count";
    gold subjects never retire.
    """

    kind: RetirementKind = "risk"
    thresholds: Mapping[int, float] = field(default_factory=dict)
    accept: float = 0.95
    reject: float = 1e-7
    positive_class: int = 1
    risk_bound: float = 0.005
    empty_classes: tuple[int, ...] = ()
    min_views: int = 3
    cap: int | None = None

    def threshold_array(self, n_classes: int) -> FloatArray:
        """Per-class thresholds (K,), +inf for classes the rule does not name."""
        result = np.full(n_classes, np.inf)
        for k, t in self.thresholds.items():
            if not 0 <= k < n_classes:
                raise ValueError(f"threshold for class {k}, but there are {n_classes} classes")
            result[k] = t
        return result


NOT_RETIRED = ""
CONSENSUS = "consensus"
NOTHING_HERE = "nothing_here"
CLASSIFICATION_COUNT = "classification_count"


def decide_retirement(
    posterior: ArrayLike, n_views: ArrayLike, is_gold: ArrayLike, rule: RetirementRule
) -> npt.NDArray[np.str_]:
    """The retirement reason per subject (S,): "" (keep going), or a Panoptes reason.

    Reasons: "consensus", "nothing_here" or "classification_count".

    A posterior decision wins over the cap when both apply.
    """
    post = np.asarray(posterior, dtype=np.float64)
    views = np.asarray(n_views)
    gold = np.asarray(is_gold, dtype=bool)
    S, K = post.shape
    settled: BoolArray
    empty: BoolArray
    is_empty_class = np.zeros(K, dtype=bool)
    is_empty_class[list(rule.empty_classes)] = True
    if rule.kind == "swap":
        p = post[:, rule.positive_class]
        empty = p <= rule.reject
        settled = (p >= rule.accept) | empty
    elif rule.kind == "threshold":
        passed = post >= rule.threshold_array(K)[np.newaxis, :]
        settled = np.any(passed, axis=1)
        empty = np.asarray((passed & is_empty_class[np.newaxis, :]).any(axis=1), dtype=bool)
    elif rule.kind == "risk":
        settled = 1.0 - post.max(axis=1) <= rule.risk_bound
        empty = settled & is_empty_class[post.argmax(axis=1)]
    else:
        raise ValueError(f"unknown retirement kind {rule.kind!r}")
    capped = np.zeros(S, dtype=bool) if rule.cap is None else views >= rule.cap
    reasons = np.full(S, NOT_RETIRED, dtype="<U20")
    reasons[capped] = CLASSIFICATION_COUNT
    reasons[settled] = CONSENSUS
    reasons[settled & empty] = NOTHING_HERE
    reasons[gold | (views < rule.min_views)] = NOT_RETIRED
    return reasons


# --- helpers ----------------------------------------------------------------------------------


def _as_index(values: ArrayLike, upper: int | None, name: str) -> IntArray:
    """`values` as a 1-d intp array (copied if its dtype differs), checked to lie in 0..upper-1."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers")
    arr = arr.astype(np.intp, copy=False)
    if arr.size and (arr.min() < 0 or (upper is not None and arr.max() >= upper)):
        raise ValueError(f"{name} out of range 0..{upper}")
    return arr


def _as_prior(values: ArrayLike, K: int) -> FloatArray:
    """A class prior (K,), positive and normalised."""
    prior = np.array(values, dtype=np.float64)
    if prior.shape != (K,) or np.any(prior <= 0):
        raise ValueError(f"class_prior must hold {K} positive numbers")
    result: FloatArray = prior / prior.sum()
    return result


def _vote_cells(volunteer: ArrayLike, answer: ArrayLike, skills: Skills) -> IntArray:
    """Per vote the flat cell u*K + j, new volunteers (u >= U) mapped to the average row U."""
    K = skills.n_classes
    u = _as_index(volunteer, None, "volunteer")
    j = _as_index(answer, K, "answer")
    if u.size != j.size:
        raise ValueError("volunteer and answer must have the same length")
    u = np.minimum(u, skills.n_volunteers)
    return u * K + j


def _extended_confusion(skills: Skills) -> FloatArray:
    """Θ for volunteers 0..U-1 plus, at row U, the average volunteer: (U+1, K, K)."""
    return np.concatenate([confusion(skills), average_confusion(skills)[np.newaxis]], axis=0)


def _prob_table(theta: FloatArray) -> FloatArray:
    """Θ rearranged so that table[k, u*K + j] = Θ_u[k, j]: (K, U*K), contiguous per class."""
    n, K, _ = theta.shape
    return np.ascontiguousarray(theta.transpose(1, 0, 2).reshape(K, n * K))


def _log_table(theta: FloatArray) -> FloatArray:
    """log Θ laid out as `_prob_table`."""
    return np.log(_prob_table(theta))


def _sum_by_subject(
    s: IntArray, cell: IntArray, log_table: FloatArray, n_subjects: int
) -> FloatArray:
    """Σ over each subject's votes of log_table[k, cell], shape (S,K)."""
    K = log_table.shape[0]
    result = np.empty((n_subjects, K))
    for k in range(K):
        result[:, k] = np.bincount(s, weights=log_table[k][cell], minlength=n_subjects)
    return result


def _softmax_rows(log_post: FloatArray) -> FloatArray:
    """Row-wise softmax with the row max subtracted first (column-wise loops: K is small)."""
    row_max = log_post[:, 0].copy()
    for k in range(1, log_post.shape[1]):
        np.maximum(row_max, log_post[:, k], out=row_max)
    prob = np.exp(log_post - row_max[:, np.newaxis])
    total = prob[:, 0].copy()
    for k in range(1, prob.shape[1]):
        total += prob[:, k]
    prob /= total[:, np.newaxis]
    return prob


def _gold_table(
    gold_subject: ArrayLike | None, gold_label: ArrayLike | None, n_subjects: int, K: int
) -> tuple[BoolArray, FloatArray]:
    """(is_gold (S,), one-hot gold labels (S,K), zero rows off gold)."""
    is_gold = np.zeros(n_subjects, dtype=bool)
    gold_q = np.zeros((n_subjects, K))
    if gold_subject is None and gold_label is None:
        return is_gold, gold_q
    if gold_subject is None or gold_label is None:
        raise ValueError("gold_subject and gold_label go together")
    gs = _as_index(gold_subject, n_subjects, "gold_subject")
    gl = _as_index(gold_label, K, "gold_label")
    if gs.size != gl.size:
        raise ValueError("gold_subject and gold_label must have the same length")
    is_gold[gs] = True
    gold_q[gs, gl] = 1.0
    return is_gold, gold_q


def _clamp(posterior: FloatArray, is_gold: BoolArray, gold_q: FloatArray) -> FloatArray:
    """`posterior` with gold rows replaced by their one-hot labels."""
    if not is_gold.any():
        return posterior
    result: FloatArray = np.where(is_gold[:, np.newaxis], gold_q, posterior)
    return result
