"""The closed loop on the synthetic sky: human classifications per retired subject with and
without the machine volunteer (issue 6: the detector; issue 8: the classifier).

Each seed runs `app.loop.run_loop` (a fresh SQLite database, the embedded service, the real HTTP
API, the real trainers of the `train` extra on the CPU) and records both arms; the medians over
seeds go to benchmarks/results/loop.json and docs/benchmarks.md.

    .venv/bin/python benchmarks/loop.py --seeds 0 1 2 --machines detector classifier
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from app.loop import MACHINES, LoopSizes, run_loop
from app.settings import Settings

RESULTS = Path(__file__).parent / "results" / "loop.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--machines", nargs="+", default=list(MACHINES), choices=MACHINES)
    parser.add_argument("--n-train", type=int, default=240)
    parser.add_argument("--n-eval", type=int, default=160)
    parser.add_argument("--n-gold", type=int, default=24)
    parser.add_argument("--volunteers", type=int, default=80)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--machine-bounds",
        type=float,
        nargs="+",
        default=[0.2],
        help="the machine arm's marks risk bounds to try (the humans' is app.loop.MARK_RISK_BOUND)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    console = Console()
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for n, bound in enumerate(args.machine_bounds):
            # The bound only concerns the drawing workflow: the classifier runs once a seed.
            machines = [m for m in args.machines if m == "detector" or n == 0]
            if not machines:
                continue
            sizes = LoopSizes(
                n_train=args.n_train,
                n_eval=args.n_eval,
                n_gold=args.n_gold,
                n_volunteers=args.volunteers,
                image_size=args.image_size,
                epochs=args.epochs,
                seed=seed,
                machine_mark_risk_bound=bound,
            )
            with tempfile.TemporaryDirectory(prefix="gzx-loop-") as folder:
                began = time.perf_counter()
                reports = run_loop(
                    Settings(database_url=f"sqlite:///{folder}/loop.db"),
                    Path(folder),
                    machines=machines,
                    sizes=sizes,
                    console=console,
                )
                for report in reports:
                    runs.append({"seed": seed, **report.to_json()})
                console.print(f"seed {seed}, bound {bound}: {time.perf_counter() - began:.0f} s")
    summary = {}
    for machine in args.machines:
        for bound in args.machine_bounds if machine == "detector" else args.machine_bounds[:1]:
            mine = [
                r
                for r in runs
                if r["machine"] == machine
                and (machine != "detector" or r["sizes"]["machine_mark_risk_bound"] == bound)
            ]

            def median(arm: str, key: str, of: list[dict[str, Any]] = mine) -> float:
                return float(statistics.median(r[arm][key] for r in of))

            name = (
                f"{machine}, machine arm at marks risk {bound}"
                if machine == "detector"
                else machine
            )
            summary[name] = {
                "seeds": len(mine),
                "effort_ratio_median": float(statistics.median(r["effort_ratio"] for r in mine)),
                "humans_per_retired_median": median("humans", "per_retired"),
                "machine_per_retired_median": median("with_machine", "per_retired"),
                "humans_accuracy_median": median("humans", "accuracy"),
                "machine_accuracy_median": median("with_machine", "accuracy"),
                "humans_per_subject_median": median("humans", "per_subject"),
                "machine_per_subject_median": median("with_machine", "per_subject"),
            }
    result = {
        "command": "benchmarks/loop.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "out"
        ),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, CPU only",
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    console.print_json(json.dumps(summary, default=float))


if __name__ == "__main__":
    main()
