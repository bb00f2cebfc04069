"""`gzx aggregate`: the answer engine over CSV files, for researchers with an export and benchmarks.

    ANSWERS.csv      header with subject,volunteer,answer (other columns ignored); an answer is an
                     integer class or a label
    GOLD.csv         subject,label (optional)
    POSTERIORS.csv   subject,label,p_<class>...,n_answers: one p_ column per class, in class order
    VOLUNTEERS.csv   volunteer,n_votes,n_gold,information_bits, then theta_<truth>_<answer>,
                     lower_<truth>_<answer>, upper_<truth>_<answer> (90% intervals) per cell

Classes are the distinct answers: sorted numerically when every answer is an integer, else sorted
as text. A volunteer answering the same subject twice counts once (the first row, as Caesar keeps
the first classification). The math is `app.answers`, the same engine the service uses.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from app import answers
from app.errors import InputError

ANSWER_COLUMNS = ("subject", "volunteer", "answer")
GOLD_COLUMNS = ("subject", "label")


def aggregate_csv(
    answers_path: str | Path,
    out_path: str | Path,
    *,
    gold_path: str | Path | None = None,
    gold_only: bool = False,
    volunteers_out: str | Path | None = None,
) -> dict[str, Any]:
    """Fit the answers in `answers_path`, write the posteriors (and volunteers); return a summary.

    Raises InputError (with `field`) on a missing column, an empty value, an unknown gold label,
    or `gold_only` without gold.
    """
    subject_ids, volunteer_ids, answer_values = _read_columns(answers_path, ANSWER_COLUMNS)
    if not subject_ids:
        raise InputError(f"{answers_path}: no answers", field="answer")
    classes, answer = _classes(answer_values)
    subject_names, subject, volunteer_names, volunteer = _index(subject_ids, volunteer_ids)
    subject, volunteer, answer, n_repeats = _first_answers(subject, volunteer, answer)

    gold_subject: npt.NDArray[np.intp] | None = None
    gold_label: npt.NDArray[np.intp] | None = None
    if gold_path is not None:
        gold_ids, gold_values = _read_columns(gold_path, GOLD_COLUMNS)
        subject_names, gold_subject, gold_label = _gold(
            subject_names, gold_ids, gold_values, classes
        )
    elif gold_only:
        raise InputError("--gold-only needs a gold file", field="gold")

    S, U, K = len(subject_names), len(volunteer_names), len(classes)
    result = answers.fit(
        subject, volunteer, answer, S, U, K,
        gold_subject=gold_subject, gold_label=gold_label, gold_only=gold_only,
    )  # fmt: skip
    n_answers = np.bincount(subject, minlength=S)
    _write_posteriors(out_path, subject_names, classes, result.posterior, n_answers)
    if volunteers_out is not None:
        n_gold = _gold_votes(subject, volunteer, gold_subject, S, U)
        _write_volunteers(
            volunteers_out, volunteer_names, classes, result.skills, volunteer, n_gold
        )
    return {
        "n_answers": int(subject.size),
        "n_repeats_dropped": n_repeats,
        "n_subjects": S,
        "n_volunteers": U,
        "n_classes": K,
        "classes": classes,
        "n_gold": 0 if gold_subject is None else int(gold_subject.size),
        "mode": "gold_only" if gold_only else "em",
        "n_iter": result.n_iter,
        "converged": result.converged,
        "class_prior": [float(p) for p in result.skills.class_prior],
    }


def _read_columns(path: str | Path, columns: tuple[str, ...]) -> tuple[list[str], ...]:
    """The named columns of a CSV file, as lists of stripped strings (header names stripped)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = csv.reader(handle)
            header = [name.strip() for name in next(rows, [])]
            missing = [name for name in columns if name not in header]
            if missing:
                raise InputError(
                    f"{path}: no column {missing[0]!r} in the header", field=missing[0]
                )
            where = [header.index(name) for name in columns]
            values: tuple[list[str], ...] = tuple([] for _ in columns)
            for line, row in enumerate(rows, start=2):
                if not any(cell.strip() for cell in row):
                    continue
                for name, position, column in zip(columns, where, values, strict=True):
                    cell = row[position].strip() if position < len(row) else ""
                    if not cell:
                        raise InputError(f"{path}, line {line}: empty {name}", field=name)
                    column.append(cell)
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror}", field="path") from error
    except (csv.Error, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a readable CSV file ({error})", field="path") from error
    return values


def _classes(values: list[str]) -> tuple[list[str], npt.NDArray[np.intp]]:
    """(class names in class order, the class index of every answer)."""
    text = np.array(values)
    try:
        numbers = text.astype(np.int64)
    except (ValueError, OverflowError):
        names, inverse = np.unique(text, return_inverse=True)
        return [str(name) for name in names], inverse.astype(np.intp)
    distinct, inverse = np.unique(numbers, return_inverse=True)
    return [str(number) for number in distinct], inverse.astype(np.intp)


def _index(
    subject_ids: list[str], volunteer_ids: list[str]
) -> tuple[list[str], npt.NDArray[np.intp], list[str], npt.NDArray[np.intp]]:
    """Dense indices for subjects and volunteers, each in order of first appearance."""
    subject_names, subject = _first_appearance(subject_ids)
    volunteer_names, volunteer = _first_appearance(volunteer_ids)
    return subject_names, subject, volunteer_names, volunteer


def _first_appearance(ids: list[str]) -> tuple[list[str], npt.NDArray[np.intp]]:
    """(distinct ids in order of first appearance, the index of each id)."""
    names, first, inverse = np.unique(np.array(ids), return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return [str(names[i]) for i in order], rank[inverse].astype(np.intp)


def _first_answers(
    subject: npt.NDArray[np.intp], volunteer: npt.NDArray[np.intp], answer: npt.NDArray[np.intp]
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp], int]:
    """Keep each volunteer's first answer per subject; also return how many repeats were dropped."""
    pair = subject.astype(np.int64) * (int(volunteer.max()) + 1) + volunteer
    _, first = np.unique(pair, return_index=True)
    keep = np.sort(first)
    return subject[keep], volunteer[keep], answer[keep], int(subject.size - keep.size)


def _gold(
    subject_names: list[str], gold_ids: list[str], gold_values: list[str], classes: list[str]
) -> tuple[list[str], npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """(subject names, gold subjects appended if unseen, gold subject indices, gold labels)."""
    position = {name: i for i, name in enumerate(subject_names)}
    class_index = {name: i for i, name in enumerate(classes)}
    numeric = all(_is_int(name) for name in classes)
    names = list(subject_names)
    gold_subject: dict[int, int] = {}
    for line, (subject_id, value) in enumerate(zip(gold_ids, gold_values, strict=True), start=2):
        key = str(int(value)) if numeric and _is_int(value) else value
        if key not in class_index:
            raise InputError(
                f"gold line {line}: label {value!r} is not one of the answers {classes}",
                field="label",
            )
        if subject_id not in position:
            position[subject_id] = len(names)
            names.append(subject_id)
        gold_subject[position[subject_id]] = class_index[key]
    subjects = np.fromiter(gold_subject.keys(), dtype=np.intp, count=len(gold_subject))
    labels = np.fromiter(gold_subject.values(), dtype=np.intp, count=len(gold_subject))
    return names, subjects, labels


def _is_int(text: str) -> bool:
    """Whether `text` reads as an integer."""
    try:
        int(text)
    except ValueError:
        return False
    return True


def _gold_votes(
    subject: npt.NDArray[np.intp],
    volunteer: npt.NDArray[np.intp],
    gold_subject: npt.NDArray[np.intp] | None,
    S: int,
    U: int,
) -> npt.NDArray[np.intp]:
    """Per volunteer, the number of their answers on gold subjects (U,)."""
    if gold_subject is None:
        return np.zeros(U, dtype=np.intp)
    is_gold = np.zeros(S, dtype=bool)
    is_gold[gold_subject] = True
    return np.bincount(volunteer[is_gold[subject]], minlength=U).astype(np.intp)


def _write_posteriors(
    path: str | Path,
    subject_names: list[str],
    classes: list[str],
    posterior: npt.NDArray[np.float64],
    n_answers: npt.NDArray[np.intp],
) -> None:
    """POSTERIORS.csv: subject,label,p_<class>...,n_answers."""
    label = np.asarray(classes, dtype=object)[posterior.argmax(axis=1)]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject", "label", *(f"p_{c}" for c in classes), "n_answers"])
        for i, name in enumerate(subject_names):
            probabilities = (f"{p:.6g}" for p in posterior[i])
            writer.writerow([name, label[i], *probabilities, int(n_answers[i])])


def _write_volunteers(
    path: str | Path,
    volunteer_names: list[str],
    classes: list[str],
    skills: answers.Skills,
    volunteer: npt.NDArray[np.intp],
    n_gold: npt.NDArray[np.intp],
) -> None:
    """VOLUNTEERS.csv: one row per volunteer with Θ, its 90% intervals, votes and information."""
    U, K = skills.n_volunteers, skills.n_classes
    theta = answers.confusion(skills).reshape(U, K * K)
    lower, upper = (bound.reshape(U, K * K) for bound in answers.credible_intervals(skills, 0.9))
    information = answers.information_per_vote(skills)
    n_votes = np.bincount(volunteer, minlength=U)
    cells = [f"{truth}_{given}" for truth in classes for given in classes]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "volunteer", "n_votes", "n_gold", "information_bits",
                *(f"theta_{c}" for c in cells),
                *(f"lower_{c}" for c in cells),
                *(f"upper_{c}" for c in cells),
            ]
        )  # fmt: skip
        for u, name in enumerate(volunteer_names):
            numbers = np.concatenate([theta[u], lower[u], upper[u]])
            writer.writerow(
                [
                    name, int(n_votes[u]), int(n_gold[u]), f"{information[u]:.6g}",
                    *(f"{x:.6g}" for x in numbers),
                ]
            )  # fmt: skip
