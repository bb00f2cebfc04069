"""Speed and memory: the full EM refit vs crowd-kit DawidSkene on the same synthetic votes.

    .venv/bin/python benchmarks/speed_answers.py            # 1e6 votes both, 1e7 votes gzx
    .venv/bin/python benchmarks/speed_answers.py --crowdkit-1e7   # also try crowd-kit on 1e7

Votes come from benchmarks/synthetic_answers.py (seeded: spammers, adversaries, Zipf activity,
3-40 votes a subject). Each run is a fresh process that loads the votes from .npy files and fits
once, so its peak RSS (VmHWM in /proc/self/status: the high-water mark of this process's own
memory; getrusage's ru_maxrss would inherit the parent's from the fork) is the votes plus the fit
plus the interpreter and libraries. Medians of `--runs` runs; accuracy against the generator's
truth. crowd-kit gets a pandas DataFrame (task, worker, label) built outside the timed region.
Writes benchmarks/results/speed_answers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def peak_rss_kb() -> int:
    """This process's peak resident set size in KiB (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(method: str, folder: Path) -> None:
    """One timed fit in this process; prints a JSON line."""
    sys.path.insert(0, str(ROOT))
    from app import answers

    subject = np.load(folder / "subject.npy")
    volunteer = np.load(folder / "volunteer.npy")
    answer = np.load(folder / "answer.npy")
    truth = np.load(folder / "truth.npy")
    meta = json.loads((folder / "meta.json").read_text())
    S, U, K = meta["n_subjects"], meta["n_volunteers"], meta["n_classes"]
    loaded = peak_rss_kb()
    if method == "gzx":
        start = time.perf_counter()
        result = answers.fit(subject, volunteer, answer, S, U, K)
        seconds = time.perf_counter() - start
        label = result.posterior.argmax(axis=1)
        extra = {"n_iter": result.n_iter, "converged": result.converged}
    else:
        import pandas as pd
        from crowdkit.aggregation import DawidSkene

        frame = pd.DataFrame({"task": subject, "worker": volunteer, "label": answer})
        del subject, volunteer, answer
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            predicted = DawidSkene(n_iter=100).fit_predict(frame)
        seconds = time.perf_counter() - start
        label = np.zeros(S, dtype=np.int64)
        label[predicted.index.to_numpy()] = predicted.to_numpy()
        extra = {}
    peak = peak_rss_kb()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "accuracy": float(np.mean(label == truth)),
                "peak_rss_mb": peak / 1024,
                "rss_after_loading_mb": loaded / 1024,
                **extra,
            }
        )
    )


def measure(method: str, folder: Path, runs: int, timeout: float) -> dict[str, Any]:
    """Median of `runs` fresh-process fits (stops early on a timeout or a crash)."""
    results = []
    for _ in range(runs):
        command = [sys.executable, __file__, "--worker", method, "--folder", str(folder)]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return {"failed": f"did not finish in {timeout:.0f} s"}
        if done.returncode != 0:
            return {"failed": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    keys = [k for k in results[0] if isinstance(results[0][k], int | float) and k != "converged"]
    summary: dict[str, Any] = {k: float(np.median([r[k] for r in results])) for k in keys}
    summary["runs"] = len(results)
    summary["all_seconds"] = [r["seconds"] for r in results]
    return summary


def write_votes(n_votes: int, n_classes: int, seed: int, folder: Path) -> dict[str, int]:
    """Generate a synthetic set and save it as .npy files; return its shape."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from synthetic_answers import generate

    data = generate(n_votes, n_classes, seed=seed)
    for name in ("subject", "volunteer", "answer", "truth"):
        np.save(folder / f"{name}.npy", getattr(data, name))
    meta = {
        "n_votes": int(data.subject.size),
        "n_subjects": data.n_subjects,
        "n_volunteers": data.n_volunteers,
        "n_classes": data.n_classes,
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    counts = np.bincount(data.subject * data.n_classes + data.answer,
                         minlength=data.n_subjects * data.n_classes)  # fmt: skip
    majority = counts.reshape(data.n_subjects, data.n_classes).argmax(axis=1)
    meta["majority_vote_accuracy"] = float(np.mean(majority == data.truth))  # type: ignore[assignment]
    return meta


def main() -> None:
    """Run the comparison, print a table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["gzx", "crowdkit"])
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crowdkit-1e7", action="store_true", help="also try crowd-kit on 1e7")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--data", type=Path, help="unused; accepted like the other benchmarks")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.folder)
        return
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "load_average_at_start": os.getloadavg(),
        "runs": args.runs,
        "classes": args.classes,
    }
    print(f"{'votes':>10} {'method':9} {'seconds':>8} {'peak MB':>8} {'accuracy':>8}")
    for n_votes in (1_000_000, 10_000_000):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            meta = write_votes(n_votes, args.classes, args.seed, folder)
            row: dict[str, Any] = {"data": meta}
            methods = ["gzx"]
            if n_votes <= 1_000_000 or args.crowdkit_1e7:
                methods.append("crowdkit")
            for method in methods:
                runs = args.runs if (method == "gzx" or n_votes <= 1_000_000) else 1
                row[method] = measure(method, folder, runs, args.timeout)
                m = row[method]
                if "failed" in m:
                    print(f"{meta['n_votes']:10} {method:9} {m['failed']}")
                    continue
                print(
                    f"{meta['n_votes']:10} {method:9} {m['seconds']:8.2f} "
                    f"{m['peak_rss_mb']:8.0f} {100 * m['accuracy']:8.2f}"
                )
            if "crowdkit" in row and "seconds" in row["crowdkit"]:
                row["speedup"] = row["crowdkit"]["seconds"] / row["gzx"]["seconds"]
                print(f"{'':10} speed-up {row['speedup']:.1f}x")
            row["load_average_after"] = os.getloadavg()
            results[str(n_votes)] = row
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed_answers.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS / 'speed_answers.json'}")


if __name__ == "__main__":
    main()
