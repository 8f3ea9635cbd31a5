"""The aa-curvature fidelity/cost knob: schemes and settings compared against retraining.

    python benchmarks/curvature_schemes.py

For every pipeline of benchmarks/pipelines.py: Pearson r per stage (linear and
model mode) and seconds for `aa`, the exact per-step replay (GGN and Hessian)
and segment schemes of several lengths, Krylov sizes and curvature samples,
with the retraining time from the same run. Writes
benchmarks/results/curvature_schemes.{json,md}.
"""

from __future__ import annotations

import argparse
import time

from common import recorded_runs, write_results
from pipelines import PIPELINES

import stagecredit as sc
from stagecredit.estimators.curvature_propagation import CurvatureOptions as C
from stagecredit.reports.tables import Table
from stagecredit.validation.metrics import pearson

VARIANTS = {
    "aa (H = 0)": None,
    "exact, GGN": C.exact("ggn"),
    "exact, Hessian": C.exact("hessian"),
    "segments 50, k5, 8 batches (default)": C(),
    "segments 50, k5, 8 batches, Hessian": C(curvature="hessian"),
    "segments 50, k3, 2 batches (fast)": C.fast(),
    "segments 50, k10, all batches (thorough)": C.thorough(),
    "segments 25, k5, 8 batches": C(segment_steps=25),
    "segments 100, k5, 8 batches": C(segment_steps=100),
    "auto (segments for SGD, replay for Adam), k5, 8 batches": C(scheme="auto"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(PIPELINES), action="append")
    args = parser.parse_args()
    rows, tables = [], []
    for name, run, behaviour in recorded_runs(PIPELINES, args.only):
        start = time.perf_counter()
        truth = sc.retrain_effects(run, behaviour, progress=False)
        retrain_seconds = time.perf_counter() - start
        table_rows = []
        for label, options in VARIANTS.items():
            method = "aa" if options is None else "aa-curvature"
            run._cache = {k: v for k, v in run._cache.items() if k[0] not in ("embeddings", "aa-suffix")}
            start = time.perf_counter()
            linear = sc.attribute(run, behaviour, method, "linear", curvature=options, progress=False)
            seconds = time.perf_counter() - start
            model = sc.attribute(run, behaviour, method, "model", curvature=options, progress=False)
            r_lin = [pearson(linear.effects[k], truth.effects[k]) for k in range(run.num_stages)]
            r_mod = [pearson(model.effects[k], truth.effects[k]) for k in range(run.num_stages)]
            rows.append({"pipeline": name, "variant": label, "options": None if options is None else options.key(),
                         "pearson_linear": r_lin, "pearson_model": r_mod, "seconds": seconds,
                         "retrain_seconds": retrain_seconds})
            table_rows.append([label] + [f"{a:.3f} / {b:.3f}" for a, b in zip(r_lin, r_mod)]
                              + [f"{seconds:.2f}", f"{retrain_seconds / seconds:.2f}"])
        table = Table(
            title=f"{name}: Pearson r with retraining per stage (linear / model)",
            columns=["variant"] + run.stages + ["seconds", "retraining ÷ this"],
            rows=table_rows,
            note=f"Retraining without each stage took {retrain_seconds:.2f} s in this run. 'seconds' = all "
                 "stage embeddings plus the linear-mode scores.",
        )
        table.print()
        tables.append(table)
    write_results("curvature_schemes", args.only, {"rows": rows}, tables)


if __name__ == "__main__":
    main()
