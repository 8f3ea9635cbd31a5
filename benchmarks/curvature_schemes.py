"""The aa-curvature fidelity/cost knob: schemes and settings compared against retraining.

    python benchmarks/curvature_schemes.py

For every pipeline of benchmarks/pipelines.py: Pearson r per stage (linear and
model mode) and seconds for `aa`, the per-step replay (with the Hessian, its
default, and the GGN; ``scheme="auto"`` equals it when every stage replays bit
for bit), the replay for Adam stages only (``scheme="adam-replay"``) and segment
schemes of several lengths, Krylov sizes and curvature samples,
with the retraining time from the same run. Two variants run on the same
pipeline recorded with a checkpoint every 10 steps instead of 50, so their
segments start from fresh parameters. A second table scores the linear
estimates against removing only 1% of each stage (scaled by 100), the
quantity a first-order estimate approximates (``sc.truth_ceilings``).

A single recording says little about differences of a few hundredths: the
figures move that much with the seeds of initialisation and batch order. So
every pipeline is also recorded with ``--seeds`` − 1 more seed offsets (every
seed + 100·offset; same data), retrained, and scored again, and a third table
gives the mean ± standard deviation and the minimum over all seeds (linear
and model mode). The ``secant`` variants take each tangent's curvature part of
the way along it (``CurvatureOptions(secant=…)``). One variant scores the
recording with its minibatch indices hidden: segments then average their
curvature over examples drawn from the stage's data, as they do for a loop
recorded without ``rec.batch()``. ``counterfactual_adam=False`` freezes Adam's
recorded second moment along each perturbation instead of taking the
perturbed run's own (the segments' behaviour before it was the default). Writes
benchmarks/results/curvature_schemes.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import recorded_runs, reseeded, write_results
from pipelines import PIPELINES

import stagecredit as sc
from stagecredit.estimators.curvature_propagation import CurvatureOptions as C
from stagecredit.reports.tables import Table
from stagecredit.validation.metrics import pearson

DENSE_LABEL = "default segments (10 steps) on checkpoints every 10"
DENSE_SECANT_LABEL = "segments: Hessian, secant 0.5, on checkpoints every 10"
DENSE_LABELS = (DENSE_LABEL, DENSE_SECANT_LABEL)  # variants scored on the recording with denser checkpoints
# scored on the same recording with its minibatch indices hidden, as a loop recorded without rec.batch() is
UNINDEXED_LABEL = "default segments without minibatch indices (examples drawn from the stage's data)"
VARIANTS = {
    "aa (H = 0)": None,
    "replay, Hessian (exact, auto)": C.exact(),
    "replay, GGN": C.exact("ggn"),
    "segments: centred, GGN, k5, 512 examples (default)": C(),
    "replay in Adam stages, default segments in SGD ones (adam-replay)": C(scheme="adam-replay"),
    "segments: the recorded Adam second moment (counterfactual_adam=False)": C(counterfactual_adam=False),
    "segments: centred, Hessian": C(curvature="hessian"),
    "segments: from the checkpoints": C(centred=False),
    "segments: from the checkpoints, 256 examples (former default on digits)": C(centred=False,
                                                                                 curvature_examples=256),
    "segments: 256 examples": C(curvature_examples=256),
    "segments: 1024 examples": C(curvature_examples=1024),
    "segments: k3": C(krylov_dim=3),
    "fast (from the checkpoints, k3, 64 examples)": C.fast(),
    "thorough (centred, k8, every example)": C.thorough(),
    "segments: 25 steps": C(segment_steps=25),
    "segments: 100 steps": C(segment_steps=100),
    DENSE_LABEL: C(max_segments=None),  # one segment per 10-step interval, however many
    "replay, Hessian, secant 0.5 (curvature at θ + δθ/2)": C(scheme="exact", secant=0.5),
    "replay, Hessian, secant 0.25": C(scheme="exact", secant=0.25),
    "segments: secant 0.5": C(secant=0.5),
    "segments: Hessian, secant 0.5": C(curvature="hessian", secant=0.5),
    DENSE_SECANT_LABEL: C(curvature="hessian", secant=0.5, max_segments=None),
    UNINDEXED_LABEL: C(),
}
DENSE_EVERY = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(PIPELINES), action="append")
    parser.add_argument("--seeds", type=int, default=5, help="seed offsets per pipeline (default 5; 1: only the "
                                                               "pipelines as written)")
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
                on = dense if label in DENSE_LABELS else _without_indices(run) if label == UNINDEXED_LABEL else run
                row, seconds = _score(on, behaviour, options, truth, derivative)
                rows.append({"pipeline": name, "variant": label, "seed_offset": 0,
                             "checkpoint_every": on.pipeline.checkpoint_every,
                             "options": None if options is None else options.key(), **row, "seconds": seconds,
                             "retrain_seconds": retrain_seconds})
                table_rows.append([label] + [f"{a:.3f} / {b:.3f}" for a, b in zip(row["pearson_linear"],
                                                                                 row["pearson_model"])]
                                  + [f"{seconds:.2f}", f"{retrain_seconds / seconds:.2f}"])
                derivative_rows.append([label] + [f"{r:.3f}" for r in row["pearson_linear_derivative"]])
        tables.append(Table(
            title=f"{name}: Pearson r with retraining per stage, seeds as written (linear / model)",
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
        by_seed = {mode: {r["variant"]: [r[f"pearson_{mode}"]] for r in rows if r["pipeline"] == name}
                   for mode in ("linear", "model")}
        for offset in range(1, args.seeds):
            for label, scores in _seed_scores(name, offset).items():
                for mode in by_seed:
                    by_seed[mode][label].append(scores[mode])
                rows.append({"pipeline": name, "variant": label, "seed_offset": offset,
                             "pearson_linear": scores["linear"], "pearson_model": scores["model"]})
        if args.seeds > 1:
            for mode in by_seed:
                tables.append(_seeds_table(name, run.stages, by_seed[mode], mode))
                tables[-1].print()
    write_results("curvature_schemes", args.only, {"rows": rows}, tables,
                  extra_args=[] if args.seeds == 5 else [f"--seeds {args.seeds}"])


def _seed_scores(name: str, offset: int) -> dict[str, dict[str, list[float]]]:
    """Pearson r per mode and stage of every variant, on the pipeline recorded with seed offset ``offset``."""
    pipe, behaviour = PIPELINES[name]()
    pipe = reseeded(pipe, offset)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"default": pipe.run(Path(tmp) / name, progress=False)}
        truth = sc.retrain_effects(runs["default"], behaviour, progress=False)  # the dense recording trains the same
        out = {}
        for label, options in VARIANTS.items():
            if label in DENSE_LABELS and "dense" not in runs:
                runs["dense"] = dataclasses.replace(pipe, checkpoint_every=DENSE_EVERY).run(Path(tmp) / f"{name}-dense",
                                                                                           progress=False)
            run = runs["dense" if label in DENSE_LABELS else "default"]
            run = _without_indices(run) if label == UNINDEXED_LABEL else run
            run._cache = {k: v for k, v in run._cache.items() if k[0] not in ("embeddings", "aa-suffix")}
            out[label] = {}
            for mode in ("linear", "model"):
                estimate = sc.attribute(run, behaviour, "aa" if options is None else "aa-curvature", mode,
                                        curvature=options, progress=False)
                out[label][mode] = [pearson(estimate.effects[k], truth.effects[k]) for k in range(run.num_stages)]
    return out


def _without_indices(run):
    """The recording loaded again, its minibatch indices hidden (what a loop recorded without rec.batch() has)."""
    hidden = sc.Run.load(run.path, pipeline=run.pipeline)
    hidden.has_batch_indices = lambda k: False
    return hidden


def _seeds_table(name: str, stages: list[str], by_seed: dict[str, list[list[float]]], mode: str) -> Table:
    count = len(next(iter(by_seed.values())))
    body = []
    for label, runs in by_seed.items():
        scores = np.array(runs)
        body.append([label] + [f"{m:.3f} ± {sd:.3f} (min {lo:.3f})" for m, sd, lo in
                               zip(scores.mean(0), scores.std(0, ddof=1), scores.min(0))])
    return Table(
        title=f"{name}: Pearson r with retraining per stage over {count} seeds ({mode}; mean ± sd, min)",
        columns=["variant"] + stages,
        rows=body,
        note=f"Seed offsets 0–{count - 1}: every seed of the pipeline (initialisation, batch order) + 100 × offset, "
             "same data; each recording retrained for its own truth.",
    )


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
