"""The aa-curvature fidelity/cost knob: schemes and settings compared against retraining.

    python benchmarks/curvature_schemes.py

For every pipeline of benchmarks/pipelines.py: Pearson r per stage (linear and
model mode) and seconds for `aa`, the per-step replay (with the Hessian, its
default, and the GGN; ``scheme="auto"`` equals it when every stage replays bit
for bit), the replay for Adam stages only (``scheme="adam-replay"``) and segment
schemes of several lengths, Krylov sizes and curvature samples,
with the retraining time from the same run. One variant runs on the same
pipeline recorded with a checkpoint every 10 steps instead of 50, so its
segments start from fresh parameters. A second table scores the linear
estimates against removing only 1% of each stage (scaled by 100), the
quantity a first-order estimate approximates (``sc.truth_ceilings``). Writes
benchmarks/results/curvature_schemes.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from common import recorded_runs, write_results
from pipelines import PIPELINES

import stagecredit as sc
from stagecredit.estimators.curvature_propagation import CurvatureOptions as C
from stagecredit.reports.tables import Table
from stagecredit.validation.metrics import pearson

DENSE_LABEL = "segments 10 on checkpoints every 10, k5, 8 batches"
VARIANTS = {
    "aa (H = 0)": None,
    "replay, Hessian (exact, auto)": C.exact(),
    "replay, GGN": C.exact("ggn"),
    "segments 50, k5, 8 batches (default)": C(),
    "replay in Adam stages, default segments in SGD ones (adam-replay)": C(scheme="adam-replay"),
    "segments 50, k5, 8 batches, Hessian": C(curvature="hessian"),
    "segments 50, k3, 2 batches (fast)": C.fast(),
    "segments 50, k10, all batches (thorough)": C.thorough(),
    "segments 50, k5, all batches": C(curvature_batches=None),
    "segments 25, k5, 8 batches": C(segment_steps=25),
    "segments 100, k5, 8 batches": C(segment_steps=100),
    DENSE_LABEL: C(),
}
DENSE_EVERY = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(PIPELINES), action="append")
    args = parser.parse_args()
    rows, tables = [], []
    for name, run, behaviour in recorded_runs(PIPELINES, args.only):
        start = time.perf_counter()
        truth = sc.retrain_effects(run, behaviour, progress=False)
        retrain_seconds = time.perf_counter() - start
        derivative = sc.truth_ceilings(run, behaviour, truth=truth, progress=False).derivative
        with tempfile.TemporaryDirectory() as tmp:
            dense_pipeline = dataclasses.replace(run.pipeline, checkpoint_every=DENSE_EVERY)
            dense = dense_pipeline.run(Path(tmp) / name, progress=False)
            final = run.checkpoint(run.num_stages)
            assert all(torch.equal(t, final[n]) for n, t in dense.checkpoint(dense.num_stages).items()), \
                "saving more checkpoints changed training; the retraining truth would not apply"
            table_rows, derivative_rows = [], []
            for label, options in VARIANTS.items():
                on = dense if label == DENSE_LABEL else run
                row, seconds = _score(on, behaviour, options, truth, derivative)
                rows.append({"pipeline": name, "variant": label, "checkpoint_every": on.pipeline.checkpoint_every,
                             "options": None if options is None else options.key(), **row, "seconds": seconds,
                             "retrain_seconds": retrain_seconds})
                table_rows.append([label] + [f"{a:.3f} / {b:.3f}" for a, b in zip(row["pearson_linear"],
                                                                                 row["pearson_model"])]
                                  + [f"{seconds:.2f}", f"{retrain_seconds / seconds:.2f}"])
                derivative_rows.append([label] + [f"{r:.3f}" for r in row["pearson_linear_derivative"]])
        tables.append(Table(
            title=f"{name}: Pearson r with retraining per stage (linear / model)",
            columns=["variant"] + run.stages + ["seconds", "retraining ÷ this"],
            rows=table_rows,
            note=f"Retraining without each stage took {retrain_seconds:.2f} s in this run. 'seconds' = all "
                 "stage embeddings plus the linear-mode scores.",
        ))
        tables.append(Table(
            title=f"{name}: Pearson r with removing 1% of the stage, scaled by 100 (linear mode)",
            columns=["variant"] + run.stages,
            rows=derivative_rows,
            note="What a first-order estimate approximates; see sc.truth_ceilings.",
        ))
        for table in tables[-2:]:
            table.print()
    write_results("curvature_schemes", args.only, {"rows": rows}, tables)


def _score(run, behaviour, options, truth, derivative) -> tuple[dict, float]:
    method = "aa" if options is None else "aa-curvature"
    run._cache = {k: v for k, v in run._cache.items() if k[0] not in ("embeddings", "aa-suffix")}
    start = time.perf_counter()
    linear = sc.attribute(run, behaviour, method, "linear", curvature=options, progress=False)
    seconds = time.perf_counter() - start
    model = sc.attribute(run, behaviour, method, "model", curvature=options, progress=False)
    K = run.num_stages
    return {
        "pearson_linear": [pearson(linear.effects[k], truth.effects[k]) for k in range(K)],
        "pearson_model": [pearson(model.effects[k], truth.effects[k]) for k in range(K)],
        "pearson_linear_derivative": [pearson(linear.effects[k], derivative.effects[k]) for k in range(K)],
    }, seconds


if __name__ == "__main__":
    main()
