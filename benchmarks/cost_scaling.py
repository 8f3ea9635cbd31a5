"""How the cost ratios scale with training length: the MNIST demo with every stage's steps × 1, 4, 16 and 64.

    python benchmarks/cost_scaling.py [--scales 1 4 16 64]
    python benchmarks/cost_scaling.py --pipeline mnist-wide --scales 1 4

``--pipeline mnist-wide`` (the 1.9M-parameter MLP of ``benchmarks/cost.py``)
writes to ``results/cost_scaling-mnist-wide.*``; there the segments' memory is
far above what loading the run takes, so its extra-memory column is
informative (on the demo, loading the data peaks higher and it reads +0).

Retraining without a stage works through every step of the later stages.
``aa-curvature``'s segments do too while a stage holds at most
``CurvatureOptions.max_segments`` (16) checkpoint intervals, one segment per
interval, so its ratio should stay flat up to there; beyond, the number of
segments per stage stays 16 and its ratio should grow with training length
(at the demo's × 16 and × 64 its later stages hold 64 and 256). ``aa``
touches only the stage boundaries and the recorded schedule, plus one scoring
pass over the evaluation set, so its ratio should grow with training length.
Memory should not grow with it: ``aa-curvature`` reads each recorded checkpoint
when its segment needs it and keeps none of them.
Each phase is timed as in ``benchmarks/cost.py``: the median of up to three warm
calls in a fresh child process (fewer once they have taken 10 s), cached embeddings and
checkpoints cleared. Writes
benchmarks/results/cost_scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import write_results
from cost import measure
from pipelines import COST_PIPELINES

from stagecredit.reports.tables import Table

PHASES = ["forward", "aa/linear", "aa/model", "aa-curvature/linear", "retrain"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--pipeline", choices=["mnist-demo", "mnist-wide"], default="mnist-demo")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in args.scales:
            pipe, _ = COST_PIPELINES[args.pipeline](scale)
            run_dir = str(Path(tmp) / f"scale-{scale:g}")
            start = time.perf_counter()
            pipe.run(run_dir, progress=False)
            record_s = time.perf_counter() - start
            measured = {phase: measure(args.pipeline, run_dir, phase, scale=scale) for phase in PHASES}
            seconds = {phase: m[0] for phase, m in measured.items()}
            extra_mib = {phase: m[2] - measured["forward"][2] for phase, m in measured.items()}
            steps = [stage.steps for stage in pipe.stages]
            row = {"scale": scale, "steps": steps, "record_seconds": record_s, "seconds": seconds,
                   "extra_mib": extra_mib, "retrain_over": {p: seconds["retrain"] / s for p, s in seconds.items()}}
            rows.append(row)
            print(row, flush=True)
    ratio = lambda r, p: f"{r['seconds'][p]:.4f} s ({r['retrain_over'][p]:.1f}×)"  # noqa: E731
    table = Table(
        title=f"{args.pipeline} with every stage's steps scaled: seconds (retraining ÷ this)",
        columns=["steps ×", "steps per stage", "recording s", "retraining s", "aa linear", "aa model",
                 "aa-curvature (segments) linear", "its extra MiB", "forward pass s"],
        rows=[[f"{r['scale']:g}", " / ".join(map(str, r["steps"])), f"{r['record_seconds']:.1f}",
               f"{r['seconds']['retrain']:.3f}", ratio(r, "aa/linear"), ratio(r, "aa/model"),
               ratio(r, "aa-curvature/linear"), f"{r['extra_mib']['aa-curvature/linear']:+.0f}",
               f"{r['seconds']['forward']:.4f}"] for r in rows],
        note="retraining = retraining without each stage in turn (ground truth); all ratios from this one run. "
             "The evaluation set (the demo's test set) stays the same size at every scale. extra MiB = the "
             "child's peak resident memory minus that of a child that only loads the run and does one forward pass "
             "(+0 where loading peaks higher).",
    )
    table.print()
    wide = args.pipeline != "mnist-demo"
    write_results("cost_scaling" + (f"-{args.pipeline}" if wide else ""), None, {"rows": rows}, [table],
                  script="cost_scaling", extra_args=([f"--pipeline {args.pipeline}"] if wide else [])
                  + [f"--scales {' '.join(f'{s:g}' for s in args.scales)}"])


if __name__ == "__main__":
    main()
