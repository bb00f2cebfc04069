"""Accuracy and calibration: gzx vs majority vote vs crowd-kit DawidSkene on the shared datasets.

    .venv/bin/python benchmarks/accuracy.py --data ../shared/data

For bluebirds, product, sentiment and dog (every subject has truth): accuracy, log loss and Brier
score of each method's posterior. Majority vote's posterior is the vote fractions (ties broken at
random, seeded). Probabilities are clipped to [1e-15, 1] for the log loss, the same for everyone.
On sentiment also: volunteers learned from the 20 gold questions only (quali.csv, quali_truth.csv;
disjoint from the test items), SWAP's supervised mode (`gold_only`), and gold + EM over everything.
Writes benchmarks/results/accuracy.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from app import answers

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DATASETS = ("bluebirds", "product", "sentiment", "dog")
EPS = 1e-15

IntArray = npt.NDArray[np.intp]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Dataset:
    """One dataset's votes as indices, with its truth per subject (-1 where unknown)."""

    name: str
    subject: IntArray
    volunteer: IntArray
    answer: IntArray
    truth: IntArray
    subject_names: list[str]
    volunteer_names: list[str]
    n_classes: int

    @property
    def n_subjects(self) -> int:
        """S."""
        return len(self.subject_names)

    @property
    def n_volunteers(self) -> int:
        """U."""
        return len(self.volunteer_names)


def read_rows(path: Path) -> list[list[str]]:
    """A CSV file's rows without its header (whatever the header calls the columns)."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return [row for row in rows[1:] if row]


def load_dataset(folder: Path, name: str) -> Dataset:
    """Read `folder/name/answer.csv` (item, worker, answer) and `truth.csv` (item, truth)."""
    rows = read_rows(folder / name / "answer.csv")
    truth_of = {row[0]: int(row[1]) for row in read_rows(folder / name / "truth.csv")}
    subject_names, subject = np.unique([row[0] for row in rows], return_inverse=True)
    volunteer_names, volunteer = np.unique([row[1] for row in rows], return_inverse=True)
    answer = np.array([int(row[2]) for row in rows], dtype=np.intp)
    truth = np.array([truth_of.get(str(s), -1) for s in subject_names], dtype=np.intp)
    n_classes = int(max(answer.max(), truth.max()) + 1)
    return Dataset(
        name,
        subject.astype(np.intp),
        volunteer.astype(np.intp),
        answer,
        truth,
        [str(s) for s in subject_names],
        [str(v) for v in volunteer_names],
        n_classes,
    )


def scores(posterior: FloatArray, truth: IntArray, seed: int = 0) -> dict[str, float]:
    """Accuracy (ties broken at random), log loss and Brier score over subjects with truth."""
    known = truth >= 0
    post, true = posterior[known], truth[known]
    rng = np.random.default_rng(seed)
    noise = rng.random(post.shape) * 1e-9  # breaks exact ties only
    label = np.where(post == post.max(axis=1, keepdims=True), 1.0 + noise, noise).argmax(axis=1)
    picked = np.clip(post[np.arange(true.size), true], EPS, 1.0)
    onehot = np.eye(post.shape[1])[true]
    return {
        "accuracy": float(np.mean(label == true)),
        "log_loss": float(-np.mean(np.log(picked))),
        "brier": float(np.mean(np.sum((post - onehot) ** 2, axis=1))),
    }


def crowdkit_posterior(data: Dataset) -> tuple[FloatArray, float]:
    """crowd-kit DawidSkene(n_iter=100)'s posterior (S,K) and its fit time in seconds."""
    import pandas as pd
    from crowdkit.aggregation import DawidSkene

    frame = pd.DataFrame({"task": data.subject, "worker": data.volunteer, "label": data.answer})
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proba = DawidSkene(n_iter=100).fit_predict_proba(frame)
    elapsed = time.perf_counter() - start
    posterior = np.full((data.n_subjects, data.n_classes), 1.0 / data.n_classes)
    columns = [int(c) for c in proba.columns]
    posterior[np.ix_(proba.index.to_numpy(dtype=np.intp), columns)] = proba.to_numpy()
    return posterior, elapsed


def run_dataset(data: Dataset) -> dict[str, Any]:
    """Every method on one dataset."""
    row: dict[str, Any] = {
        "subjects": data.n_subjects,
        "volunteers": data.n_volunteers,
        "votes": int(data.subject.size),
        "classes": data.n_classes,
    }
    mv = answers.majority_vote(data.subject, data.answer, data.n_subjects, data.n_classes)
    row["majority_vote"] = scores(mv, data.truth)
    start = time.perf_counter()
    result = answers.fit(
        data.subject,
        data.volunteer,
        data.answer,
        data.n_subjects,
        data.n_volunteers,
        data.n_classes,
    )
    row["gzx"] = {**scores(result.posterior, data.truth), "seconds": time.perf_counter() - start}
    row["gzx"]["n_iter"] = result.n_iter
    exact = answers.fit(
        data.subject, data.volunteer, data.answer, data.n_subjects, data.n_volunteers,
        data.n_classes, leave_one_out="exact",
    )  # fmt: skip
    row["gzx_exact_loo"] = scores(exact.posterior, data.truth)
    try:
        posterior, seconds = crowdkit_posterior(data)
        row["crowdkit_ds"] = {**scores(posterior, data.truth), "seconds": seconds}
    except ImportError:
        row["crowdkit_ds"] = None
    return row


def sentiment_gold(folder: Path, data: Dataset) -> dict[str, Any]:
    """Sentiment with its 20 gold questions: gold-only (SWAP supervised) and gold + EM."""
    quali = read_rows(folder / "sentiment" / "quali.csv")
    quali_truth = {
        row[0]: int(row[1]) for row in read_rows(folder / "sentiment" / "quali_truth.csv")
    }
    names = {name: i for i, name in enumerate(data.volunteer_names)}
    gold_names = sorted({row[0] for row in quali})
    gold_index = {name: data.n_subjects + i for i, name in enumerate(gold_names)}
    extra_volunteers = sorted({row[1] for row in quali} - set(names))
    for i, name in enumerate(extra_volunteers):
        names[name] = data.n_volunteers + i
    subject = np.concatenate([data.subject, [gold_index[row[0]] for row in quali]]).astype(np.intp)
    volunteer = np.concatenate([data.volunteer, [names[row[1]] for row in quali]]).astype(np.intp)
    answer = np.concatenate([data.answer, [int(row[2]) for row in quali]]).astype(np.intp)
    gold_subject = np.array([gold_index[n] for n in gold_names], dtype=np.intp)
    gold_label = np.array([quali_truth[n] for n in gold_names], dtype=np.intp)
    S = data.n_subjects + len(gold_names)
    U = len(names)
    truth = np.concatenate([data.truth, np.full(len(gold_names), -1)]).astype(np.intp)
    out: dict[str, Any] = {"gold_questions": len(gold_names), "gold_answers": len(quali)}
    for label, gold_only in (("gzx_gold_only", True), ("gzx_gold_plus_em", False)):
        result = answers.fit(
            subject, volunteer, answer, S, U, 2,
            gold_subject=gold_subject, gold_label=gold_label, gold_only=gold_only,
        )  # fmt: skip
        out[label] = scores(result.posterior, truth)
    return out


def main() -> None:
    """Run every dataset, print a table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    header = f"{'dataset':10} {'method':18} {'accuracy':>8} {'log loss':>9} {'Brier':>7}"
    print(header)
    print("-" * len(header))
    for name in DATASETS:
        data = load_dataset(args.data, name)
        row = run_dataset(data)
        if name == "sentiment":
            row.update(sentiment_gold(args.data, data))
        results[name] = row
        for method in (
            "majority_vote", "crowdkit_ds", "gzx", "gzx_exact_loo", "gzx_gold_only",
            "gzx_gold_plus_em",
        ):  # fmt: skip
            if row.get(method):
                m = row[method]
                print(
                    f"{name:10} {method:18} {100 * m['accuracy']:8.2f} "
                    f"{m['log_loss']:9.4f} {m['brier']:7.4f}"
                )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "accuracy.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS / 'accuracy.json'}")


if __name__ == "__main__":
    main()
