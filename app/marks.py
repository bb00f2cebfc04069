"""Marks: clusters of boxes and clicks, each with a posterior that it is a real object.

Pure numpy/scipy: arrays in, arrays out, no I/O, inputs never mutated.

Shapes (named once, used everywhere below)
    N   marks (boxes, rows `x1, y1, x2, y2`; a click becomes a box of the tool's size first, see
        `points_to_boxes`); `subject (N,)`, `volunteer (N,)` integer ids.
    V   views: `(view_subject (V,), view_volunteer (V,))`, one row per (subject, volunteer) who saw
        the subject, with or without marks. A marker missing from the views is added as a viewer.
    S   subjects (or one subject's tool/frame groups: the caller gives each its own id), ids 0..S-1.
    C   clusters (latent objects), each made of at most one mark per volunteer.
    U   volunteers with learned skills; an id >= U is new and gets the population values.

Model (Branson, Van Horn & Perona 2017, "Lean Crowdsourcing", CVPR; Dickinson et al. 2022,
arXiv:2210.03684, Clump Scout's BoxAggregator; corrected non-marker term of shared/DESIGN.md)
    Volunteer u misses a real object with probability p_fn[u], marks a given spurious candidate
    with probability f[u], and draws a real object's box at distance d = 1 - IoU from it with
    d ~ half-normal(sigma[u]). Priors: Beta on p_fn, f (and on Branson's diagnostic p_fp = P(a drawn
    mark is spurious)), scaled-inverse-chi^2 on sigma^2, centred on the pooled population (empirical
    Bayes).

    Association (facility location, solved greedily): a candidate object is centred on an unassigned
    mark j; every other volunteer u joins it with their closest unassigned mark i when the gain
        g_u(d_ji) = log((1-p_fn)/f) - log(p_fn/(1-f)) + log(2/(sqrt(2 pi) sigma)) - d^2/(2 sigma^2)
    is positive (the joined log-odds minus the miss already charged when opening, with the
    half-normal localisation density against a uniform clutter density on d in [0, 1]) and
    d <= max_distance; otherwise the mark stays free (a false positive, or the seed of another
    candidate). The candidate with the largest total gain is opened first; ties go to the lowest
    mark index. Every mark ends up in a cluster; a cluster of one is normally judged false.

    Cluster posterior, M_c the volunteers with a mark in c, N_c = viewers \\ M_c:
        logit P(real_c) = logit pi_obj + sum_{u in M_c} log((1 - p_fn,u) / f_u)
                                       + sum_{u in N_c} log(p_fn,u / (1 - f_u))
    f_u is clipped to <= 0.99 (1 - p_fn,u), so a viewer who drew nothing there always lowers P(real)
    and a marker always raises it (a careless volunteer only a little).

    Consensus box: inverse-variance weighted mean of member boxes, weights 1 / sigma_u^2;
        P(off) = erfc(t * sqrt(sum_{u in M_c} 1 / (2 sigma_u^2))),  t = 1 - iou_threshold.

    Subject risk (unit losses; a cluster is kept when P(real) >= keep_threshold):
        E[false kept]    = sum_{kept} (1 - P(real))
        E[missed]        = sum_{rejected} P(real) + object_rate * prod_{u in viewers} p_fn,u
        E[badly placed]  = sum_{kept} P(real) * P(off)
        risk             = their sum.

    Learning (`learn_skills`): gold subjects first (per volunteer, Hungarian matching of marks to
    the expert boxes at IoU >= 0.5: misses -> p_fn, unmatched marks -> p_fp, matched 1-IoU -> sigma;
    candidate clusters matched to gold are real, the others false -> f), then EM over the other
    subjects' candidate clusters (Dawid-Skene on the candidate x viewer table) with soft truth
    q_c = P(real_c). Leave-one-out: the evidence that teaches u uses q_c^(-u) = sigmoid(L_c - own
    term). p_fn counts only candidates someone else marked (an object that is a candidate only
    because u marked it says nothing about u's misses); f counts every candidate, the places where
    anyone marked, so u's lone spurious marks are f's evidence (with soft truth f counted only on
    candidates others marked drifts up from real objects' leftover doubt when false candidates
    are rare). u's distance is taken to the consensus box without u. pi_obj is learned from gold
    candidates only: from soft truth it runs away to "every lone mark is a real object that
    everyone else missed".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import linear_sum_assignment
from scipy.special import erfc, expit
from scipy.stats import beta as beta_dist
from scipy.stats import chi2

from app.errors import InputError

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

_LOG_HALF_NORMAL = math.log(2.0 / math.sqrt(2.0 * math.pi))
_P_MIN, _P_MAX = 1e-3, 0.99
_SIGMA_MIN, _SIGMA_MAX = 0.02, 0.75
_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
_CHUNK_CELLS = 2_000_000


@dataclass(frozen=True)
class MarkPriors:
    """Prior means and strengths (pseudo-counts) of the mark skills.

    Defaults from the literature: p_fn 0.15 (Branson 0.1, Clump Scout 0.1, strength 10), p_fp 0.08
    (0.05-0.1, strength 10), sigma 0.3 in 1-IoU units (Clump Scout's variance prior 0.5 is looser).
    """

    p_fn: float = 0.15
    p_fn_strength: float = 10.0
    f: float = 0.1
    f_strength: float = 10.0
    p_fp: float = 0.08
    p_fp_strength: float = 10.0
    sigma: float = 0.3
    sigma_strength: float = 10.0
    obj_prior: float = 0.5
    obj_prior_strength: float = 4.0
    hyper_strength: float = 0.0
    object_rate: float = 1.0


def _frozen(values: ArrayLike, dtype: type = np.float64) -> NDArray[Any]:
    array: NDArray[Any] = np.array(values, dtype=dtype)
    array.setflags(write=False)
    return array


@dataclass(frozen=True)
class MarkSkills:
    """Per-volunteer mark skills (arrays (U,)), population values for new volunteers, priors.

    `*_n` are effective counts (evidence plus prior strength) for credible intervals.
    """

    p_fn: FloatArray
    f: FloatArray
    p_fp: FloatArray
    sigma: FloatArray
    pop_p_fn: float
    pop_f: float
    pop_p_fp: float
    pop_sigma: float
    obj_prior: float
    object_rate: float
    priors: MarkPriors = field(default_factory=MarkPriors)
    p_fn_n: FloatArray | None = None
    f_n: FloatArray | None = None
    p_fp_n: FloatArray | None = None
    sigma_n: FloatArray | None = None

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, np.ndarray) or (
                item.name in ("p_fn", "f", "p_fp", "sigma") and value is not None
            ):
                object.__setattr__(self, item.name, _frozen(value))
        n = self.p_fn.shape
        if self.p_fn.ndim != 1 or any(
            getattr(self, name).shape != n for name in ("f", "p_fp", "sigma")
        ):
            raise InputError("p_fn, f, p_fp and sigma must be arrays of one length", field="skills")

    @property
    def n_volunteers(self) -> int:
        """U, the number of volunteers with their own skills."""
        return int(self.p_fn.shape[0])

    @classmethod
    def population(cls, n_volunteers: int = 0, priors: MarkPriors | None = None) -> MarkSkills:
        """Everyone at the prior means: the skills before any learning."""
        pr = priors or MarkPriors()
        full = np.full(n_volunteers, 1.0)
        return cls(
            p_fn=full * pr.p_fn,
            f=full * pr.f,
            p_fp=full * pr.p_fp,
            sigma=full * pr.sigma,
            pop_p_fn=pr.p_fn,
            pop_f=pr.f,
            pop_p_fp=pr.p_fp,
            pop_sigma=pr.sigma,
            obj_prior=pr.obj_prior,
            object_rate=pr.object_rate,
            priors=pr,
            p_fn_n=full * pr.p_fn_strength,
            f_n=full * pr.f_strength,
            p_fp_n=full * pr.p_fp_strength,
            sigma_n=full * pr.sigma_strength,
        )


@dataclass(frozen=True)
class SubjectClusters:
    """One subject's clusters (C of them) and its risk.

    `labels (N,)` gives each input mark's cluster index (-1 only when `associate` was told to drop
    clusters below `min_logit`); `members[c]` are the indices of cluster c's marks.
    """

    box: FloatArray
    logit: FloatArray
    p_real: FloatArray
    p_off: FloatArray
    n_marks: IntArray
    kept: BoolArray
    labels: IntArray
    n_views: int
    risk: float
    e_false_kept: float
    e_missed: float
    e_badly_placed: float

    @property
    def members(self) -> list[IntArray]:
        """Mark indices of each cluster."""
        order = np.argsort(self.labels, kind="stable")
        bounds = np.searchsorted(self.labels[order], np.arange(self.box.shape[0] + 1))
        return [order[bounds[c] : bounds[c + 1]] for c in range(self.box.shape[0])]


@dataclass(frozen=True)
class ManyClusters:
    """Clusters of many subjects at once: per cluster (C,), per mark (N,), per subject (S,)."""

    subject: IntArray
    box: FloatArray
    logit: FloatArray
    p_real: FloatArray
    p_off: FloatArray
    n_marks: IntArray
    n_views: IntArray
    kept: BoolArray
    labels: IntArray
    subject_n_views: IntArray
    risk: FloatArray
    e_false_kept: FloatArray
    e_missed: FloatArray
    e_badly_placed: FloatArray


# ---------------------------------------------------------------- geometry


def _as_boxes(boxes: ArrayLike, name: str) -> FloatArray:
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4))
    if array.ndim != 2 or array.shape[1] != 4:
        raise InputError(f"{name} must have shape (n, 4): x1, y1, x2, y2", field=name)
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} must be finite numbers", field=name)
    lo = np.minimum(array[:, :2], array[:, 2:])
    hi = np.maximum(array[:, :2], array[:, 2:])
    return np.concatenate([lo, hi], axis=1)


def points_to_boxes(xy: ArrayLike, size: tuple[float, float]) -> FloatArray:
    """Boxes (n, 4) of width, height `size` centred on the clicks `xy (n, 2)`."""
    points = np.asarray(xy, dtype=np.float64)
    if points.size == 0:
        return np.zeros((0, 4))
    if points.ndim != 2 or points.shape[1] != 2:
        raise InputError("points must have shape (n, 2): x, y", field="xy")
    width, height = float(size[0]), float(size[1])
    if not (width > 0 and height > 0):
        raise InputError("tool size must be positive", field="size")
    half = np.array([width / 2.0, height / 2.0])
    return np.concatenate([points - half, points + half], axis=1)


def _iou_broadcast(a: FloatArray, b: FloatArray) -> FloatArray:
    """IoU of boxes `a (..., 4)` and `b (..., 4)` broadcast against each other."""
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0.0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0.0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    same = np.all(a == b, axis=-1)
    out = np.divide(inter, union, out=np.zeros(np.shape(inter)), where=union > 0)
    return np.where(same, 1.0, out)


def iou_matrix(a: ArrayLike, b: ArrayLike) -> FloatArray:
    """Intersection over union (n, m) of boxes `a (n, 4)` and `b (m, 4)` (x1, y1, x2, y2)."""
    boxes_a = _as_boxes(a, "a")
    boxes_b = _as_boxes(b, "b")
    return _iou_broadcast(boxes_a[:, None, :], boxes_b[None, :, :])


# ---------------------------------------------------------------- skills per mark


@dataclass(frozen=True)
class _Terms:
    p_fn: FloatArray
    f: FloatArray
    sigma: FloatArray
    w_mark: FloatArray
    w_non: FloatArray


def _terms(skills: MarkSkills, volunteer: IntArray) -> _Terms:
    """Clipped skills and log-likelihood ratios for each entry of `volunteer`."""
    u = skills.n_volunteers
    idx = np.where((volunteer >= 0) & (volunteer < u), volunteer, u)
    p_fn = np.clip(np.append(skills.p_fn, skills.pop_p_fn)[idx], _P_MIN, _P_MAX)
    f = np.clip(np.append(skills.f, skills.pop_f)[idx], _P_MIN, _P_MAX)
    f = np.minimum(f, 0.99 * (1.0 - p_fn))
    sigma = np.clip(np.append(skills.sigma, skills.pop_sigma)[idx], _SIGMA_MIN, _SIGMA_MAX)
    w_mark = np.log1p(-p_fn) - np.log(f)
    w_non = np.log(p_fn) - np.log1p(-f)
    return _Terms(p_fn, f, sigma, w_mark, w_non)


def _sum_by(index: IntArray, weights: ArrayLike, n: int) -> FloatArray:
    """Sums of `weights` per value of `index` (length n)."""
    return np.asarray(np.bincount(index, weights=weights, minlength=n), dtype=np.float64)


def _logit(p: float) -> float:
    q = min(max(p, 1e-9), 1 - 1e-9)
    return math.log(q / (1.0 - q))


def _ids(values: ArrayLike, name: str, n: int | None = None) -> IntArray:
    array = np.asarray(values)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{name} must be a 1-d array of integer ids", field=name)
    if n is not None and array.shape[0] != n:
        raise InputError(f"{name} must have one entry per mark", field=name)
    if array.min() < 0:
        raise InputError(f"{name} ids must be >= 0", field=name)
    return array.astype(np.int64)


# ---------------------------------------------------------------- association


def _segment_starts(seg_start: BoolArray, n: int) -> tuple[IntArray, IntArray]:
    """Flat start indices of the member segments of every (subject, centre) row of an (S, n, n)."""
    s = seg_start.shape[0]
    flat = np.flatnonzero(np.broadcast_to(seg_start[:, None, :], (s, n, n)))
    return flat, flat // n


def _associate_chunk(
    boxes: FloatArray, table: IntArray, vol: IntArray, gain_of: _GainFn, max_distance: float
) -> IntArray:
    """Greedy facility location for the subjects of one padded chunk; local labels (S, n)."""
    s, n = table.shape
    valid = table >= 0
    mid = np.where(valid, table, 0)
    b = boxes[mid]
    dist = 1.0 - _iou_broadcast(b[:, :, None, :], b[:, None, :, :])
    gain = gain_of(mid, dist)
    ok = valid[:, :, None] & valid[:, None, :] & (dist <= max_distance)
    gain = np.where(ok, gain, -np.inf)
    vloc = np.where(valid, vol[mid], -1)
    seg_start: BoolArray = np.ones((s, n), dtype=bool)
    seg_start[:, 1:] = vloc[:, 1:] != vloc[:, :-1]
    labels = np.full((s, n), -1, dtype=np.int64)
    unassigned: BoolArray = valid.copy()
    count = np.zeros(s, dtype=np.int64)
    rows: IntArray = np.arange(s)
    order_key = np.where(valid, mid, np.iinfo(np.int64).max)
    starts, start_row = _segment_starts(seg_start, n)
    while True:
        alive = np.flatnonzero(unassigned.any(axis=1))
        if alive.size == 0:
            break
        if alive.size < rows.size // 2:
            rows, gain, unassigned, seg_start, order_key = (
                rows[alive],
                gain[alive],
                unassigned[alive],
                seg_start[alive],
                order_key[alive],
            )
            starts, start_row = _segment_starts(seg_start, n)
        m = rows.size
        live = np.where(unassigned[:, None, :], gain, -np.inf)
        segmax = np.maximum.reduceat(live.reshape(-1), starts)
        value = _sum_by(start_row, np.maximum(segmax, 0.0), m * n)
        value = np.round(value.reshape(m, n), 9)
        value = np.where(unassigned, value, -np.inf)
        best = value.max(axis=1, keepdims=True)
        centre = np.argmin(np.where(value == best, order_key, np.iinfo(np.int64).max), axis=1)
        row = live[np.arange(m), centre]
        row_starts = np.flatnonzero(seg_start)
        seg_id = np.cumsum(seg_start.reshape(-1)) - 1
        row_max = np.maximum.reduceat(row.reshape(-1), row_starts)[seg_id]
        is_max = (row.reshape(-1) == row_max) & (row_max > 0)
        running = np.cumsum(is_max)
        before = (running - is_max)[row_starts][seg_id]
        members = (is_max & (running - before == 1)).reshape(m, n)
        members[np.arange(m), centre] |= ~members.any(axis=1) & unassigned.any(axis=1)
        members &= unassigned
        target = labels[rows]
        target[members] = np.broadcast_to(count[rows][:, None], (m, n))[members]
        labels[rows] = target
        count[rows] += members.any(axis=1)
        unassigned = unassigned & ~members
    return labels


class _GainFn:
    """Connection gain g_u(d) of marks `mid` at distances `dist` (S, n_centre, n_member)."""

    def __init__(self, delta: FloatArray, sigma: FloatArray) -> None:
        self.delta = delta
        self.log_norm = _LOG_HALF_NORMAL - np.log(sigma)
        self.inv_two_var = 0.5 / sigma**2

    def __call__(self, mid: IntArray, dist: FloatArray) -> FloatArray:
        delta = (self.delta + self.log_norm)[mid][:, None, :]
        return delta - dist**2 * self.inv_two_var[mid][:, None, :]


def _associate_many(
    boxes: FloatArray,
    group: IntArray,
    volunteer: IntArray,
    terms: _Terms,
    max_distance: float,
) -> tuple[IntArray, IntArray]:
    """Local cluster label of every mark and the number of clusters of every group present."""
    n_marks = boxes.shape[0]
    labels = np.zeros(n_marks, dtype=np.int64)
    if n_marks == 0:
        return labels, np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.arange(n_marks), volunteer, group))
    g_sorted = group[order]
    sizes = np.bincount(group)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.arange(n_marks) - starts[g_sorted]
    n_clusters = np.zeros(sizes.shape[0], dtype=np.int64)
    gain_of = _GainFn(terms.w_mark - terms.w_non, terms.sigma)
    bucket_of = np.searchsorted(np.array(_BUCKETS), sizes)
    n_clusters[sizes == 1] = 1
    for b_index in np.unique(bucket_of[sizes > 1]):
        in_bucket = np.flatnonzero((bucket_of == b_index) & (sizes > 1))
        n = _BUCKETS[b_index] if b_index < len(_BUCKETS) else int(sizes[in_bucket].max())
        slot = np.full(sizes.shape[0], -1, dtype=np.int64)
        slot[in_bucket] = np.arange(in_bucket.size)
        table = np.full((in_bucket.size, n), -1, dtype=np.int64)
        pick = slot[g_sorted] >= 0
        table[slot[g_sorted[pick]], rank[pick]] = order[pick]
        per_chunk = max(1, _CHUNK_CELLS // (n * n))
        for lo in range(0, in_bucket.size, per_chunk):
            sub = table[lo : lo + per_chunk]
            local = _associate_chunk(boxes, sub, volunteer, gain_of, max_distance)
            ok = sub >= 0
            labels[sub[ok]] = local[ok]
            n_clusters[in_bucket[lo : lo + per_chunk]] = local.max(axis=1) + 1
    return labels, n_clusters


def associate(
    boxes: ArrayLike,
    volunteer: ArrayLike,
    viewers: ArrayLike,
    skills: MarkSkills,
    *,
    max_distance: float = 0.8,
    min_logit: float = -math.inf,
) -> IntArray:
    """Cluster index (n,) of each of one subject's marks; -1 marks a mark left as a false positive.

    Greedy facility location (see the module docstring); at most one mark per volunteer per cluster;
    deterministic and invariant to renaming volunteers. Clusters whose posterior logit is below
    `min_logit` are dissolved into false positives (label -1); by default every mark is clustered.
    """
    result = aggregate_subject(boxes, volunteer, viewers, skills, max_distance=max_distance)
    labels = result.labels.copy()
    if math.isfinite(min_logit):
        drop = result.logit < min_logit
        remap = np.cumsum(~drop) - 1
        labels = np.where(drop[labels], -1, remap[labels]) if labels.size else labels
    return labels


# ---------------------------------------------------------------- posteriors


def _unique_views(
    view_subject: IntArray, view_volunteer: IntArray, subject: IntArray, volunteer: IntArray
) -> tuple[IntArray, IntArray]:
    """Distinct (subject, volunteer) viewer pairs, markers included."""
    s_all = np.concatenate([view_subject, subject])
    u_all = np.concatenate([view_volunteer, volunteer])
    if s_all.size == 0:
        return s_all, u_all
    pairs = np.unique(np.stack([s_all, u_all], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def aggregate_many(
    boxes: ArrayLike,
    subject: ArrayLike,
    volunteer: ArrayLike,
    view_subject: ArrayLike,
    view_volunteer: ArrayLike,
    skills: MarkSkills,
    *,
    n_subjects: int | None = None,
    iou_threshold: float = 0.5,
    keep_threshold: float = 0.5,
    max_distance: float = 0.8,
) -> ManyClusters:
    """Associate, score and risk-assess the marks of many subjects at once (the refit's batch path).

    Subjects are processed together, grouped by their number of marks into padded (S, n, n) blocks.
    Subject ids index the per-subject outputs (length `n_subjects`, default max id + 1).
    """
    box = _as_boxes(boxes, "boxes")
    n = box.shape[0]
    subj = _ids(subject, "subject", n)
    vol = _ids(volunteer, "volunteer", n)
    v_subj = _ids(view_subject, "view_subject")
    v_vol = _ids(view_volunteer, "view_volunteer", v_subj.shape[0])
    top = max(int(subj.max(initial=-1)), int(v_subj.max(initial=-1))) + 1
    n_subj = top if n_subjects is None else int(n_subjects)
    if n_subj < top:
        raise InputError("a subject id is >= n_subjects", field="subject")
    mark_terms = _terms(skills, vol)
    local, n_clusters_present = _associate_many(box, subj, vol, mark_terms, max_distance)
    n_clusters = np.zeros(n_subj, dtype=np.int64)
    n_clusters[: n_clusters_present.shape[0]] = n_clusters_present
    offset = np.concatenate([[0], np.cumsum(n_clusters)])
    labels = offset[subj] + local if n else np.zeros(0, dtype=np.int64)
    n_c = int(offset[-1])
    c_subject = np.repeat(np.arange(n_subj), n_clusters)

    us, uu = _unique_views(v_subj, v_vol, subj, vol)
    view_terms = _terms(skills, uu)
    logit_pi = _logit(skills.obj_prior)
    base = logit_pi + _sum_by(us, view_terms.w_non, n_subj)
    subject_n_views = np.bincount(us, minlength=n_subj).astype(np.int64)
    log_all_miss = _sum_by(us, np.log(view_terms.p_fn), n_subj)

    delta = mark_terms.w_mark - mark_terms.w_non
    logit = base[c_subject] + _sum_by(labels, delta, n_c)
    p_real = expit(logit)
    weight = 1.0 / mark_terms.sigma**2
    total_w = _sum_by(labels, weight, n_c)
    consensus = (
        np.stack(
            [_sum_by(labels, weight * box[:, k], n_c) for k in range(4)],
            axis=1,
        )
        / np.where(total_w > 0, total_w, 1.0)[:, None]
    )
    t = 1.0 - iou_threshold
    p_off = erfc(t * np.sqrt(0.5 * total_w))
    n_marks = np.bincount(labels, minlength=n_c).astype(np.int64)
    kept = p_real >= keep_threshold

    e_false = _sum_by(c_subject, np.where(kept, 1.0 - p_real, 0.0), n_subj)
    e_missed = _sum_by(c_subject, np.where(kept, 0.0, p_real), n_subj)
    e_missed = e_missed + skills.object_rate * np.exp(log_all_miss)
    e_bad = _sum_by(c_subject, np.where(kept, p_real * p_off, 0.0), n_subj)
    return ManyClusters(
        subject=c_subject,
        box=consensus,
        logit=logit,
        p_real=p_real,
        p_off=p_off,
        n_marks=n_marks,
        n_views=subject_n_views[c_subject],
        kept=kept,
        labels=labels,
        subject_n_views=subject_n_views,
        risk=e_false + e_missed + e_bad,
        e_false_kept=e_false,
        e_missed=e_missed,
        e_badly_placed=e_bad,
    )


def aggregate_subject(
    boxes: ArrayLike,
    volunteer: ArrayLike,
    viewers: ArrayLike,
    skills: MarkSkills,
    *,
    iou_threshold: float = 0.5,
    keep_threshold: float = 0.5,
    max_distance: float = 0.8,
) -> SubjectClusters:
    """Clusters, posteriors and risk of one subject (one tool and frame): the service's call.

    `boxes (n, 4)`, `volunteer (n,)` the marks; `viewers (m,)` everyone who saw the subject.
    """
    box = _as_boxes(boxes, "boxes")
    vol = _ids(volunteer, "volunteer", box.shape[0])
    view = _ids(viewers, "viewers")
    many = aggregate_many(
        box,
        np.zeros(box.shape[0], dtype=np.int64),
        vol,
        np.zeros(view.shape[0], dtype=np.int64),
        view,
        skills,
        n_subjects=1,
        iou_threshold=iou_threshold,
        keep_threshold=keep_threshold,
        max_distance=max_distance,
    )
    return SubjectClusters(
        box=many.box,
        logit=many.logit,
        p_real=many.p_real,
        p_off=many.p_off,
        n_marks=many.n_marks,
        kept=many.kept,
        labels=many.labels,
        n_views=int(many.subject_n_views[0]),
        risk=float(many.risk[0]),
        e_false_kept=float(many.e_false_kept[0]),
        e_missed=float(many.e_missed[0]),
        e_badly_placed=float(many.e_badly_placed[0]),
    )


def cluster_posteriors(
    boxes: ArrayLike,
    volunteer: ArrayLike,
    viewers: ArrayLike,
    labels: ArrayLike,
    skills: MarkSkills,
    *,
    iou_threshold: float = 0.5,
) -> dict[str, FloatArray | IntArray]:
    """Posterior of given clusters of one subject: logit, p_real, box, p_off, n_marks, n_views.

    `labels (n,)` assign marks to clusters 0..C-1 (-1: not in any cluster).
    """
    box = _as_boxes(boxes, "boxes")
    vol = _ids(volunteer, "volunteer", box.shape[0])
    view = np.union1d(_ids(viewers, "viewers"), vol)
    lab = np.asarray(labels, dtype=np.int64)
    if lab.shape != vol.shape:
        raise InputError("labels must have one entry per mark", field="labels")
    n_c = int(lab.max(initial=-1)) + 1
    in_c = lab >= 0
    if n_c and np.unique(np.stack([lab[in_c], vol[in_c]]), axis=1).shape[1] != int(in_c.sum()):
        raise InputError("a volunteer has two marks in one cluster", field="labels")
    mt = _terms(skills, vol[in_c])
    vt = _terms(skills, view)
    lc = lab[in_c]
    logit = _logit(skills.obj_prior) + vt.w_non.sum() + _sum_by(lc, mt.w_mark - mt.w_non, n_c)
    weight = 1.0 / mt.sigma**2
    total_w = _sum_by(lc, weight, n_c)
    consensus = (
        np.stack(
            [_sum_by(lc, weight * box[in_c, k], n_c) for k in range(4)],
            axis=1,
        )
        / np.where(total_w > 0, total_w, 1.0)[:, None]
    )
    return {
        "logit": logit,
        "p_real": expit(logit),
        "box": consensus,
        "p_off": erfc((1.0 - iou_threshold) * np.sqrt(0.5 * total_w)),
        "n_marks": np.bincount(lc, minlength=n_c).astype(np.int64),
        "n_views": np.full(n_c, view.shape[0], dtype=np.int64),
    }


def subject_risk(
    p_real: ArrayLike,
    p_off: ArrayLike,
    viewers: ArrayLike,
    skills: MarkSkills,
    *,
    keep_threshold: float = 0.5,
) -> tuple[float, float, float, float]:
    """(risk, E[false kept], E[missed], E[badly placed]) of one subject's clusters."""
    p = np.asarray(p_real, dtype=np.float64)
    off = np.asarray(p_off, dtype=np.float64)
    kept = p >= keep_threshold
    vt = _terms(skills, np.unique(_ids(viewers, "viewers")))
    e_false = float(np.sum(np.where(kept, 1.0 - p, 0.0)))
    e_missed = float(
        np.sum(np.where(kept, 0.0, p)) + skills.object_rate * np.exp(np.log(vt.p_fn).sum())
    )
    e_bad = float(np.sum(np.where(kept, p * off, 0.0)))
    return e_false + e_missed + e_bad, e_false, e_missed, e_bad


# ---------------------------------------------------------------- learning


@dataclass
class _Counts:
    """Evidence counts per volunteer (U,): numerators and denominators."""

    n: int
    fn_num: FloatArray = field(init=False)
    fn_den: FloatArray = field(init=False)
    f_num: FloatArray = field(init=False)
    f_den: FloatArray = field(init=False)
    fp_num: FloatArray = field(init=False)
    fp_den: FloatArray = field(init=False)
    sig_num: FloatArray = field(init=False)
    sig_den: FloatArray = field(init=False)

    def __post_init__(self) -> None:
        for name in ("fn", "f", "fp", "sig"):
            setattr(self, f"{name}_num", np.zeros(self.n))
            setattr(self, f"{name}_den", np.zeros(self.n))

    def plus(self, other: _Counts) -> _Counts:
        out = _Counts(self.n)
        for item in ("fn", "f", "fp", "sig"):
            for part in ("num", "den"):
                name = f"{item}_{part}"
                setattr(out, name, getattr(self, name) + getattr(other, name))
        return out


def _shrink(
    num: FloatArray,
    den: FloatArray,
    mean0: float,
    strength: float,
    hyper: float,
    pool: BoolArray | None = None,
) -> tuple[FloatArray, float]:
    """Posterior means with an empirical-Bayes prior centred on the pooled rate.

    The pooled rate (over the volunteers in `pool`, default all) is shrunk to the literature mean
    with `hyper` pseudo-counts per volunteer.
    """
    n, top, bottom = (
        (num.size, num.sum(), den.sum())
        if pool is None
        else (int(pool.sum()), num[pool].sum(), den[pool].sum())
    )
    pooled = (mean0 * (strength + hyper * n) + top) / (strength + hyper * n + bottom)
    return (pooled * strength + num) / (strength + den), float(pooled)


def _skills_from(
    counts: _Counts,
    priors: MarkPriors,
    obj_prior: float,
    object_rate: float,
    pool: BoolArray | None = None,
) -> MarkSkills:
    hyper = priors.hyper_strength
    p_fn, pop_fn = _shrink(
        counts.fn_num, counts.fn_den, priors.p_fn, priors.p_fn_strength, hyper, pool
    )
    f, pop_f = _shrink(counts.f_num, counts.f_den, priors.f, priors.f_strength, hyper, pool)
    p_fp, pop_fp = _shrink(
        counts.fp_num, counts.fp_den, priors.p_fp, priors.p_fp_strength, hyper, pool
    )
    var, pop_var = _shrink(
        counts.sig_num, counts.sig_den, priors.sigma**2, priors.sigma_strength, hyper, pool
    )
    p_fn = np.clip(p_fn, _P_MIN, _P_MAX)
    f = np.minimum(np.clip(f, _P_MIN, _P_MAX), 0.99 * (1.0 - p_fn))
    return MarkSkills(
        p_fn=p_fn,
        f=f,
        p_fp=np.clip(p_fp, _P_MIN, _P_MAX),
        sigma=np.clip(np.sqrt(var), _SIGMA_MIN, _SIGMA_MAX),
        pop_p_fn=pop_fn,
        pop_f=min(pop_f, 0.99 * (1.0 - pop_fn)),
        pop_p_fp=pop_fp,
        pop_sigma=math.sqrt(pop_var),
        obj_prior=obj_prior,
        object_rate=object_rate,
        priors=priors,
        p_fn_n=counts.fn_den + priors.p_fn_strength,
        f_n=counts.f_den + priors.f_strength,
        p_fp_n=counts.fp_den + priors.p_fp_strength,
        sigma_n=counts.sig_den + priors.sigma_strength,
    )


def _gold_volunteer_counts(
    box: FloatArray,
    subj: IntArray,
    vol: IntArray,
    us: IntArray,
    uu: IntArray,
    gold_box: FloatArray,
    gold_subj: IntArray,
    is_gold: BoolArray,
    n_vol: int,
    iou_threshold: float,
) -> _Counts:
    """Per-volunteer Hungarian matching of marks to the expert boxes, subject by subject."""
    counts = _Counts(n_vol)
    n_gold = np.bincount(gold_subj, minlength=is_gold.shape[0])
    view_gold = is_gold[us] & (uu < n_vol)
    np.add.at(counts.fn_den, uu[view_gold], n_gold[us[view_gold]])
    np.add.at(counts.fn_num, uu[view_gold], n_gold[us[view_gold]])
    mark_gold = is_gold[subj] & (vol < n_vol)
    np.add.at(counts.fp_den, vol[mark_gold], 1.0)
    np.add.at(counts.fp_num, vol[mark_gold], 1.0)
    g_order = np.argsort(gold_subj, kind="stable")
    g_bounds = np.searchsorted(gold_subj[g_order], np.arange(is_gold.shape[0] + 1))
    m_idx = np.flatnonzero(mark_gold)
    m_idx = m_idx[np.lexsort((vol[m_idx], subj[m_idx]))]
    if m_idx.size == 0:
        return counts
    key = subj[m_idx] * (n_vol + 1) + vol[m_idx]
    cuts = np.flatnonzero(np.diff(key)) + 1
    for block in np.split(m_idx, cuts):
        s, u = int(subj[block[0]]), int(vol[block[0]])
        truth = gold_box[g_order[g_bounds[s] : g_bounds[s + 1]]]
        if truth.shape[0] == 0:
            continue
        iou = _iou_broadcast(box[block][:, None, :], truth[None, :, :])
        rows, cols = linear_sum_assignment(-iou)
        good = iou[rows, cols] >= iou_threshold
        matched = int(good.sum())
        counts.fn_num[u] -= matched
        counts.fp_num[u] -= matched
        counts.sig_num[u] += float(np.sum((1.0 - iou[rows, cols][good]) ** 2))
        counts.sig_den[u] += matched
    return counts


def _match_clusters_to_gold(
    c_box: FloatArray,
    c_subject: IntArray,
    gold_box: FloatArray,
    gold_subj: IntArray,
    is_gold: BoolArray,
    iou_threshold: float,
) -> BoolArray:
    """Which clusters of gold subjects match an expert box (Hungarian at IoU >= threshold)."""
    real = np.zeros(c_box.shape[0], dtype=bool)
    g_order = np.argsort(gold_subj, kind="stable")
    g_bounds = np.searchsorted(gold_subj[g_order], np.arange(is_gold.shape[0] + 1))
    c_bounds = np.searchsorted(c_subject, np.arange(is_gold.shape[0] + 1))
    for s in np.flatnonzero(is_gold):
        lo, hi = c_bounds[s], c_bounds[s + 1]
        truth = gold_box[g_order[g_bounds[s] : g_bounds[s + 1]]]
        if hi == lo or truth.shape[0] == 0:
            continue
        iou = _iou_broadcast(c_box[lo:hi][:, None, :], truth[None, :, :])
        rows, cols = linear_sum_assignment(-iou)
        real[lo + rows[iou[rows, cols] >= iou_threshold]] = True
    return real


def learn_skills(
    boxes: ArrayLike,
    subject: ArrayLike,
    volunteer: ArrayLike,
    view_subject: ArrayLike,
    view_volunteer: ArrayLike,
    *,
    n_volunteers: int | None = None,
    gold_boxes: ArrayLike | None = None,
    gold_subject: ArrayLike | None = None,
    gold_subjects: ArrayLike | None = None,
    priors: MarkPriors | None = None,
    use_em: bool = True,
    rounds: int = 2,
    em_iterations: int = 1,
    iou_threshold: float = 0.5,
    max_distance: float = 0.8,
    learn_obj_prior: bool = True,
    pool: ArrayLike | None = None,
) -> MarkSkills:
    """Learn mark skills from gold subjects (expert boxes) and by EM over the other subjects.

    `pool` (n_volunteers,) bool marks the volunteers whose skills form the population values that
    new volunteers get and every volunteer is shrunk towards (default all; the service leaves
    machine volunteers out).

    `gold_boxes (G, 4)`, `gold_subject (G,)`: the expert boxes; `gold_subjects` lists all subjects
    whose truth is known (one without expert boxes is known to be empty). Each round associates all
    subjects with the current skills, then runs `em_iterations` sweeps of soft-count EM on the
    candidate clusters (module docstring). Returns skills for volunteers 0..n_volunteers-1.

    The defaults (two rounds of one sweep) stop early on purpose: run to convergence without gold,
    EM can slide into "every viewer is uninformative, every lone mark is real" (p_fn + f -> 1;
    synthetic clicks F1 0.86 -> 0.70, docs/marks-bench.md).
    """
    pr = priors or MarkPriors()
    box = _as_boxes(boxes, "boxes")
    subj = _ids(subject, "subject", box.shape[0])
    vol = _ids(volunteer, "volunteer", box.shape[0])
    v_subj = _ids(view_subject, "view_subject")
    v_vol = _ids(view_volunteer, "view_volunteer", v_subj.shape[0])
    g_box = _as_boxes(np.zeros((0, 4)) if gold_boxes is None else gold_boxes, "gold_boxes")
    g_subj = _ids(
        np.zeros(0, dtype=np.int64) if gold_subject is None else gold_subject, "gold_subject"
    )
    g_list = _ids(
        np.zeros(0, dtype=np.int64) if gold_subjects is None else gold_subjects, "gold_subjects"
    )
    if g_subj.shape[0] != g_box.shape[0]:
        raise InputError("gold_subject must have one entry per gold box", field="gold_subject")
    n_vol = (
        int(max(vol.max(initial=-1), v_vol.max(initial=-1))) + 1
        if n_volunteers is None
        else int(n_volunteers)
    )
    n_subj = (
        int(
            max(
                subj.max(initial=-1),
                v_subj.max(initial=-1),
                g_subj.max(initial=-1),
                g_list.max(initial=-1),
            )
        )
        + 1
    )
    in_pool = None if pool is None else np.asarray(pool, dtype=bool)
    if in_pool is not None and in_pool.shape != (n_vol,):
        raise InputError("pool must have one entry per volunteer", field="pool")
    is_gold = np.zeros(n_subj, dtype=bool)
    is_gold[g_list] = True
    is_gold[g_subj] = True
    us, uu = _unique_views(v_subj, v_vol, subj, vol)
    gold_counts = _gold_volunteer_counts(
        box, subj, vol, us, uu, g_box, g_subj, is_gold, n_vol, iou_threshold
    )
    n_seen = np.bincount(us, minlength=n_subj) > 0
    gold_objects = float(np.bincount(g_subj, minlength=n_subj)[is_gold & n_seen].sum())
    obj_prior = pr.obj_prior
    object_rate = pr.object_rate
    n_gold_seen = float((is_gold & n_seen).sum())
    if n_gold_seen:
        object_rate = (pr.object_rate + gold_objects) / (1.0 + n_gold_seen)
    skills = _skills_from(gold_counts, pr, obj_prior, object_rate, in_pool)
    for _ in range(max(rounds, 1)):
        many = aggregate_many(
            box,
            subj,
            vol,
            v_subj,
            v_vol,
            skills,
            n_subjects=n_subj,
            iou_threshold=iou_threshold,
            max_distance=max_distance,
        )
        em = _EmTable.build(box, vol, many, us, uu, is_gold, n_vol, skills)
        em.truth = _match_clusters_to_gold(
            many.box, many.subject, g_box, g_subj, is_gold, iou_threshold
        )
        for _ in range(max(em_iterations, 1)):
            counts, q = em.counts(skills, obj_prior, use_em)
            total = gold_counts.plus(counts)
            if learn_obj_prior and em.gold_cluster.any():
                real = float(em.truth[em.gold_cluster].sum())
                obj_prior = (pr.obj_prior * pr.obj_prior_strength + real) / (
                    pr.obj_prior_strength + float(em.gold_cluster.sum())
                )
            if use_em:
                n_other = float((n_seen & ~is_gold).sum())
                object_rate = (pr.object_rate + gold_objects + float(q[~em.gold_cluster].sum())) / (
                    1.0 + n_gold_seen + n_other
                )
            skills = _skills_from(total, pr, float(obj_prior), float(object_rate), in_pool)
    return skills


@dataclass
class _EmTable:
    """The candidate-cluster x viewer table that EM sweeps over (fixed within one association)."""

    pair_c: IntArray
    pair_u: IntArray
    is_marker: BoolArray
    others: BoolArray
    pair_gold: BoolArray
    gold_cluster: BoolArray
    mark_pair: IntArray
    mark_d2: FloatArray
    mark_ok: BoolArray
    mark_vol: IntArray
    n_c: int
    n_vol: int
    truth: BoolArray

    @classmethod
    def build(
        cls,
        box: FloatArray,
        vol: IntArray,
        many: ManyClusters,
        us: IntArray,
        uu: IntArray,
        is_gold: BoolArray,
        n_vol: int,
        skills: MarkSkills,
    ) -> _EmTable:
        n_c = many.subject.shape[0]
        order = np.lexsort((uu, us))
        us_s, uu_s = us[order], uu[order]
        v_bounds = np.searchsorted(us_s, np.arange(is_gold.shape[0] + 1))
        per_c = (v_bounds[1:] - v_bounds[:-1])[many.subject]
        pair_c = np.repeat(np.arange(n_c), per_c)
        first = np.repeat(v_bounds[:-1][many.subject], per_c)
        within = np.arange(pair_c.size) - np.repeat(np.cumsum(per_c) - per_c, per_c)
        pair_u = uu_s[first + within]
        big = int(max(uu.max(initial=0), vol.max(initial=0))) + 1
        pair_key = pair_c * big + pair_u
        mark_key = many.labels * big + vol
        mark_pair = np.searchsorted(pair_key, mark_key)
        is_marker = np.zeros(pair_c.size, dtype=bool)
        is_marker[mark_pair] = True
        n_markers = np.bincount(many.labels, minlength=n_c)
        others = (n_markers[pair_c] - is_marker) >= 1
        # distance of each mark to its cluster's consensus without it (leave-one-out)
        w = 1.0 / _terms(skills, vol).sigma ** 2
        total_w = _sum_by(many.labels, w, n_c)
        sums = np.stack([_sum_by(many.labels, w * box[:, k], n_c) for k in range(4)], 1)
        rest_w = total_w[many.labels] - w
        mark_ok = (n_markers[many.labels] >= 2) & (rest_w > 0)
        loo = (sums[many.labels] - w[:, None] * box) / np.where(mark_ok, rest_w, 1.0)[:, None]
        d2 = (1.0 - _iou_broadcast(box, loo)) ** 2
        gold_cluster = is_gold[many.subject]
        return cls(
            pair_c=pair_c,
            pair_u=pair_u,
            is_marker=is_marker,
            others=others,
            pair_gold=gold_cluster[pair_c],
            gold_cluster=gold_cluster,
            mark_pair=mark_pair,
            mark_d2=d2,
            mark_ok=mark_ok & (vol < n_vol),
            mark_vol=vol,
            n_c=n_c,
            n_vol=n_vol,
            truth=np.zeros(n_c, dtype=bool),
        )

    def counts(
        self, skills: MarkSkills, obj_prior: float, use_em: bool
    ) -> tuple[_Counts, FloatArray]:
        """Soft counts from the current skills; also the clusters' P(real) (gold clamped)."""
        t = _terms(skills, self.pair_u)
        own = np.where(self.is_marker, t.w_mark, t.w_non)
        logit = _logit(obj_prior) + _sum_by(self.pair_c, own, self.n_c)
        q = np.where(self.gold_cluster, self.truth.astype(np.float64), expit(logit))
        q_loo = np.where(self.pair_gold, q[self.pair_c], expit(logit[self.pair_c] - own))
        known = self.pair_u < self.n_vol
        c = _Counts(self.n_vol)
        f_ok = known & (self.pair_gold | use_em)
        em_ok = known & self.others & ~self.pair_gold & use_em
        u_f = self.pair_u[f_ok]
        c.f_num = _sum_by(u_f, (1 - q_loo[f_ok]) * self.is_marker[f_ok], self.n_vol)
        c.f_den = _sum_by(u_f, 1 - q_loo[f_ok], self.n_vol)
        u_e = self.pair_u[em_ok]
        c.fn_num = _sum_by(u_e, q_loo[em_ok] * ~self.is_marker[em_ok], self.n_vol)
        c.fn_den = _sum_by(u_e, q_loo[em_ok], self.n_vol)
        m_em = ~self.pair_gold[self.mark_pair] & (self.mark_vol < self.n_vol) & use_em
        mq = q_loo[self.mark_pair]
        c.fp_num = _sum_by(self.mark_vol[m_em], 1 - mq[m_em], self.n_vol)
        c.fp_den = np.bincount(self.mark_vol[m_em], minlength=self.n_vol).astype(np.float64)
        s_ok = m_em & self.mark_ok
        c.sig_num = _sum_by(self.mark_vol[s_ok], mq[s_ok] * self.mark_d2[s_ok], self.n_vol)
        c.sig_den = _sum_by(self.mark_vol[s_ok], mq[s_ok], self.n_vol)
        return c, q


def skill_intervals(skills: MarkSkills, level: float = 0.9) -> dict[str, FloatArray]:
    """Equal-tailed credible intervals (U, 2): p_fn, f, p_fp (Beta), sigma (scaled-inv-chi^2)."""
    lo, hi = (1.0 - level) / 2.0, (1.0 + level) / 2.0
    out: dict[str, FloatArray] = {}
    for name in ("p_fn", "f", "p_fp"):
        mean = getattr(skills, name)
        n = getattr(skills, f"{name}_n")
        n = np.full(mean.shape, 10.0) if n is None else n
        a, b = mean * n, (1.0 - mean) * n
        out[name] = np.stack([beta_dist.ppf(lo, a, b), beta_dist.ppf(hi, a, b)], axis=1)
    nu = np.full(skills.sigma.shape, 10.0) if skills.sigma_n is None else skills.sigma_n
    var = skills.sigma**2
    out["sigma"] = np.stack(
        [np.sqrt(nu * var / chi2.ppf(hi, nu)), np.sqrt(nu * var / chi2.ppf(lo, nu))], axis=1
    )
    return out
