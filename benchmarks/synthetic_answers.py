"""A seeded generator of Zooniverse-like answer data with known truth.

Volunteers are a skill mixture: good ones (diagonal 0.7-0.95), mediocre ones (0.55-0.7),
spammers (every row the same random distribution, or always the same answer) and adversaries
(who mostly give a wrong class). Activity is Zipf-distributed (a few volunteers cast most votes),
every subject gets 3-40 votes (uniform), and a volunteer votes at most once per subject (repeat
draws are dropped). No volunteer casts more than 0.2% of the votes (a cap on the Zipf head).

    .venv/bin/python benchmarks/synthetic_answers.py --votes 1000000 --classes 2 --seed 0
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

MIXTURE = {"good": 0.5, "mediocre": 0.2, "spammer": 0.2, "adversary": 0.1}


@dataclass(frozen=True)
class Synthetic:
    """Votes (V,) with their truth: subject, volunteer, answer, truth (S,), confusion (U,K,K)."""

    subject: IntArray
    volunteer: IntArray
    answer: IntArray
    truth: IntArray
    confusion: FloatArray
    kind: npt.NDArray[np.str_]

    @property
    def n_subjects(self) -> int:
        """S."""
        return int(self.truth.size)

    @property
    def n_volunteers(self) -> int:
        """U."""
        return int(self.confusion.shape[0])

    @property
    def n_classes(self) -> int:
        """K."""
        return int(self.confusion.shape[1])


def volunteer_confusions(
    rng: np.random.Generator, n_volunteers: int, n_classes: int
) -> tuple[FloatArray, npt.NDArray[np.str_]]:
    """Confusion matrices (U,K,K) drawn from the skill mixture, and each volunteer's kind."""
    K = n_classes
    kinds = np.array(list(MIXTURE))
    kind = rng.choice(kinds, size=n_volunteers, p=np.array(list(MIXTURE.values())))
    diag = np.where(
        kind == "good",
        rng.uniform(0.7, 0.95, n_volunteers),
        np.where(kind == "mediocre", rng.uniform(0.55, 0.7, n_volunteers), 0.1),
    )
    off = (1.0 - diag) / (K - 1)
    theta = off[:, None, None] * np.ones((1, K, K))
    eye = np.eye(K, dtype=bool)
    theta[:, eye] = diag[:, None]
    # Per-class skill varies a little (real volunteers are better on some classes).
    theta = theta * rng.uniform(0.8, 1.2, size=theta.shape)
    spam = kind == "spammer"
    row = rng.dirichlet(np.full(K, 0.5), size=int(spam.sum()))
    theta[spam] = row[:, None, :]
    adversary = kind == "adversary"
    wrong = (np.arange(K) + 1) % K  # an adversary mostly answers the next class
    adv = np.full((K, K), 0.15 / max(K - 1, 1))
    adv[np.arange(K), wrong] = 0.85
    theta[adversary] = adv
    theta /= theta.sum(axis=2, keepdims=True)
    return theta, kind


def generate(
    n_votes: int,
    n_classes: int = 2,
    *,
    seed: int = 0,
    zipf_exponent: float = 1.1,
    min_votes: int = 3,
    max_votes: int = 40,
    class_prior: FloatArray | None = None,
) -> Synthetic:
    """About `n_votes` votes (a few less after dropping repeat votes), seeded."""
    rng = np.random.default_rng(seed)
    K = n_classes
    mean_votes = (min_votes + max_votes) / 2
    n_subjects = max(1, round(n_votes / mean_votes))
    n_volunteers = max(10, n_votes // 100)
    prior = np.full(K, 1.0 / K) if class_prior is None else np.asarray(class_prior, float)
    truth = rng.choice(K, size=n_subjects, p=prior / prior.sum())
    theta, kind = volunteer_confusions(rng, n_volunteers, K)

    per_subject = rng.integers(min_votes, max_votes + 1, size=n_subjects)
    subject = np.repeat(np.arange(n_subjects), per_subject)
    activity = 1.0 / np.arange(1, n_volunteers + 1) ** zipf_exponent
    activity = np.minimum(activity / activity.sum(), 0.002)  # nobody casts more than 0.2%
    cumulative = np.cumsum(activity / activity.sum())
    volunteer = np.searchsorted(cumulative, rng.random(subject.size), side="right")
    volunteer = np.minimum(volunteer, n_volunteers - 1)
    volunteer = rng.permutation(n_volunteers)[volunteer]  # activity rank is not skill
    _, first = np.unique(subject * n_volunteers + volunteer, return_index=True)
    keep = np.sort(first)
    subject, volunteer = subject[keep], volunteer[keep]

    rows = np.cumsum(theta, axis=2)[volunteer, truth[subject]]
    answer = (rng.random(subject.size)[:, None] > rows[:, :-1]).sum(axis=1)
    return Synthetic(
        subject.astype(np.int64),
        volunteer.astype(np.int64),
        answer.astype(np.int64),
        truth.astype(np.int64),
        theta,
        kind,
    )


def main() -> None:
    """Generate a set and print its shape and majority-vote accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--votes", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    data = generate(args.votes, args.classes, seed=args.seed)
    elapsed = time.perf_counter() - start
    counts = np.bincount(data.subject * data.n_classes + data.answer)
    counts = np.pad(counts, (0, data.n_subjects * data.n_classes - counts.size))
    majority = counts.reshape(data.n_subjects, data.n_classes).argmax(axis=1)
    print(
        f"{data.subject.size} votes, {data.n_subjects} subjects, {data.n_volunteers} volunteers, "
        f"K={data.n_classes}, generated in {elapsed:.1f} s; "
        f"majority vote accuracy {np.mean(majority == data.truth):.4f}"
    )


if __name__ == "__main__":
    main()
