"""Effort: votes spent with online retirement vs all votes, at the accuracy of all votes.

    .venv/bin/python benchmarks/effort_answers.py --data ../shared/data

Each dataset's votes are replayed in a random order (one global arrival stream; several seeds,
medians reported). A vote that arrives for a retired subject is not used (the platform would have
shown that volunteer another subject). After each vote the subject's posterior is recomputed and
the retirement rule applied (risk bound 1 - max_k P <= bound, at least `min_views` votes).

Skills, two ways:
- "online" (honest): skills come only from the votes used so far. The stream is cut into
  `--refits` equal slices; within a slice skills are frozen, after it EM refits on every used vote
  (the service's periodic refit job) and every live subject is re-decided. The first slice starts
  from the average volunteer. On sentiment a third mode, "online+gold", also knows the 20 gold
  questions' answers from the start (SWAP's training subjects).
- "oracle": skills from a full fit on ALL votes, frozen. Optimistic: it uses votes the replay
  never collects. Shown for reference only.

The accuracy reported is that of the final labels: one last EM over the used votes. "all votes" is
a full fit over every vote. Writes benchmarks/results/effort_answers.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from accuracy import DATASETS, ROOT, Dataset, load_dataset, read_rows

from app import answers

RESULTS = ROOT / "benchmarks" / "results"
IntArray = npt.NDArray[np.intp]
FloatArray = npt.NDArray[np.float64]
BOUNDS = (0.01, 3e-3, 1e-3, 3e-4, 2e-4, 1e-4, 3e-5, 1e-5, 1e-6)


@dataclass(frozen=True)
class Gold:
    """Extra gold subjects with their votes (appended after the dataset's subjects)."""

    subject: IntArray
    volunteer: IntArray
    answer: IntArray
    gold_subject: IntArray
    gold_label: IntArray
    n_subjects: int
    n_volunteers: int


def replay(
    data: Dataset,
    order: IntArray,
    rule: answers.RetirementRule,
    *,
    refits: int,
    oracle: answers.Skills | None = None,
    gold: Gold | None = None,
) -> dict[str, float]:
    """Replay the votes in `order` with retirement; return votes used and final accuracy."""
    K = data.n_classes
    S = data.n_subjects if gold is None else gold.n_subjects
    U = data.n_volunteers if gold is None else gold.n_volunteers
    subject, volunteer, answer = data.subject[order], data.volunteer[order], data.answer[order]
    used = np.zeros(subject.size, dtype=bool)
    retired = np.zeros(S, dtype=bool)
    is_gold = np.zeros(S, dtype=bool)
    if gold is not None:
        is_gold[gold.gold_subject] = True

    def used_votes() -> tuple[IntArray, IntArray, IntArray]:
        s, u, a = subject[used], volunteer[used], answer[used]
        if gold is None:
            return s, u, a
        return (
            np.concatenate([s, gold.subject]),
            np.concatenate([u, gold.volunteer]),
            np.concatenate([a, gold.answer]),
        )

    def refit() -> answers.FitResult:
        s, u, a = used_votes()
        if gold is None:
            return answers.fit(s, u, a, S, U, K)
        return answers.fit(
            s, u, a, S, U, K, gold_subject=gold.gold_subject, gold_label=gold.gold_label
        )

    if oracle is not None:
        skills = oracle
    else:
        empty = np.zeros((U, K, K))
        skills = answers.Skills(empty, answers.population_alpha(empty), np.full(K, 1.0 / K))
        if gold is not None:
            skills = refit().skills
    bounds = np.linspace(0, subject.size, (1 if oracle is not None else refits) + 1).astype(int)
    for start, stop in itertools.pairwise(bounds):
        s, u, a = used_votes()
        log_post = answers.subject_log_likelihoods(s, u, a, S, skills)
        log_post += np.log(skills.class_prior)
        n_views = np.bincount(subject[used], minlength=S)
        retired |= decide(log_post, n_views, is_gold, rule) != ""
        chunk = np.arange(start, stop)
        chunk = chunk[~retired[subject[chunk]]]
        taken, newly_retired = replay_chunk(chunk, subject, volunteer, answer, log_post, n_views,
                                            is_gold, skills, rule)  # fmt: skip
        used[taken] = True
        retired[newly_retired] = True
        if oracle is None:
            skills = refit().skills
    final = refit().posterior[: data.n_subjects]
    truth = data.truth
    known = truth >= 0
    return {
        "votes_used": int(used.sum()),
        "votes_all": int(subject.size),
        "accuracy": float(np.mean(final.argmax(axis=1)[known] == truth[known])),
        "retired": int(retired[: data.n_subjects].sum()),
    }


def decide(
    log_post: FloatArray,
    n_views: IntArray,
    is_gold: npt.NDArray[np.bool_],
    rule: answers.RetirementRule,
) -> npt.NDArray[np.str_]:
    """The retirement reasons for subjects in state `log_post` (unnormalised)."""
    post = np.exp(log_post - log_post.max(axis=1, keepdims=True))
    post /= post.sum(axis=1, keepdims=True)
    return answers.decide_retirement(post, n_views, is_gold, rule)


def replay_chunk(
    chunk: IntArray,
    subject: IntArray,
    volunteer: IntArray,
    answer: IntArray,
    log_post: FloatArray,
    n_views: IntArray,
    is_gold: npt.NDArray[np.bool_],
    skills: answers.Skills,
    rule: answers.RetirementRule,
) -> tuple[IntArray, IntArray]:
    """Votes of one slice, skills frozen: (positions used, subjects that retire), vectorised.

    Votes are grouped by subject keeping arrival order; a cumulative sum per group gives the
    posterior after each vote; a subject's votes after its first retiring vote are not used.
    """
    if chunk.size == 0:
        return chunk, chunk
    group_order = np.argsort(subject[chunk], kind="stable")
    votes = chunk[group_order]
    s = subject[votes]
    step = answers.subject_log_likelihoods(
        np.arange(votes.size), volunteer[votes], answer[votes], votes.size, skills
    )
    position = np.arange(votes.size)
    starts = np.r_[True, s[1:] != s[:-1]]
    first = np.maximum.accumulate(np.where(starts, position, 0))
    running = np.cumsum(step, axis=0)
    before = running[first] - step[first]
    state = log_post[s] + running - before
    views = n_views[s] + position - first + 1
    reasons = decide(state, views, is_gold[s], rule)
    hit = np.where(reasons != "", position, votes.size)
    group = np.cumsum(starts) - 1
    first_hit = np.minimum.reduceat(hit, np.flatnonzero(starts))
    keep = position <= first_hit[group]
    retiring = s[(position == first_hit[group]) & (hit < votes.size)]
    return votes[keep], retiring


def sentiment_gold(folder: Path, data: Dataset) -> Gold:
    """Sentiment's 20 gold questions and their 1,700 answers, appended as extra subjects."""
    quali = read_rows(folder / "sentiment" / "quali.csv")
    truth = {row[0]: int(row[1]) for row in read_rows(folder / "sentiment" / "quali_truth.csv")}
    names = {name: i for i, name in enumerate(data.volunteer_names)}
    for name in sorted({row[1] for row in quali} - set(names)):
        names[name] = len(names)
    gold_names = sorted({row[0] for row in quali})
    index = {name: data.n_subjects + i for i, name in enumerate(gold_names)}
    return Gold(
        np.array([index[row[0]] for row in quali], dtype=np.intp),
        np.array([names[row[1]] for row in quali], dtype=np.intp),
        np.array([int(row[2]) for row in quali], dtype=np.intp),
        np.array([index[n] for n in gold_names], dtype=np.intp),
        np.array([truth[n] for n in gold_names], dtype=np.intp),
        data.n_subjects + len(gold_names),
        len(names),
    )


def median_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    """Medians over seeds of every number in the runs."""
    return {key: float(np.median([run[key] for run in runs])) for key in runs[0]}


def best_savings(rows: dict[str, Any], mode: str, all_accuracy: float) -> dict[str, Any]:
    """The largest saving whose median accuracy is >= all votes', and within 0.5 points."""
    best: dict[str, Any] = {}
    for label, slack in (("equal_accuracy", 1e-9), ("within_half_point", 0.005)):
        ok = [
            (summary["saved"], bound)
            for bound in BOUNDS
            if (summary := rows[f"{mode}/{bound}"])["accuracy"] >= all_accuracy - slack
        ]
        best[label] = None if not ok else {"saved": max(ok)[0], "bound": max(ok)[1]}
    return best


def main() -> None:
    """Sweep risk bounds on every dataset, print a table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--refits", type=int, default=20)
    parser.add_argument("--min-views", type=int, default=3)
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    args = parser.parse_args()
    results: dict[str, Any] = {
        "seeds": args.seeds,
        "refits": args.refits,
        "min_views": args.min_views,
    }
    print(
        f"{'dataset':10} {'skills':12} {'bound':>6} {'votes used':>11} {'saved':>6} "
        f"{'accuracy':>8} {'all votes':>9}"
    )
    for name in args.datasets:
        data = load_dataset(args.data, name)
        full = answers.fit(data.subject, data.volunteer, data.answer, data.n_subjects,
                           data.n_volunteers, data.n_classes)  # fmt: skip
        known = data.truth >= 0
        all_accuracy = float(np.mean(full.posterior.argmax(axis=1)[known] == data.truth[known]))
        modes: dict[str, dict[str, Any]] = {"online": {}, "oracle": {"oracle": full.skills}}
        if name == "sentiment":
            modes["online+gold"] = {"gold": sentiment_gold(args.data, data)}
        rows: dict[str, Any] = {"all_votes_accuracy": all_accuracy, "votes": int(data.subject.size)}
        for mode, extra in modes.items():
            for bound in BOUNDS:
                rule = answers.RetirementRule(
                    kind="risk", risk_bound=bound, min_views=args.min_views
                )
                runs = [
                    replay(
                        data,
                        np.random.default_rng(seed).permutation(data.subject.size),
                        rule,
                        refits=args.refits,
                        **extra,
                    )
                    for seed in range(args.seeds)
                ]
                summary = median_runs(runs)
                summary["saved"] = 1.0 - summary["votes_used"] / summary["votes_all"]
                rows[f"{mode}/{bound}"] = summary
                print(
                    f"{name:10} {mode:12} {bound:6} {summary['votes_used']:11.0f} "
                    f"{100 * summary['saved']:5.1f}% {100 * summary['accuracy']:8.2f} "
                    f"{100 * all_accuracy:9.2f}"
                )
        for mode in modes:
            rows[f"{mode}/best"] = best_savings(rows, mode, all_accuracy)
            print(f"{name:10} {mode:12} best: {rows[f'{mode}/best']}")
        results[name] = rows
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "effort_answers.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS / 'effort_answers.json'}")


if __name__ == "__main__":
    main()
