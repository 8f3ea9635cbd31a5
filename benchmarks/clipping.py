"""Gradient clipping: aa-curvature on pipelines that clip every step's gradient norm, against retraining.

    python benchmarks/clipping.py             # 3 seeds per pipeline
    python benchmarks/clipping.py --seeds 1

Each pipeline of benchmarks/pipelines.py is recorded with every stage clipping
its gradient to a total norm that binds on many of its steps (``Stage(max_grad_norm=…)``;
Hugging Face's Trainer clips to 1.0 by default), retrained without each stage,
and scored (Pearson r per stage, linear and model mode) for ``aa``, the
replay (clipping applied exactly to each tangent's counterfactual gradient),
the default segments (the curvature scaled by each segment's clip factor), and
both of those as they were before clipping was modelled: told that no stage
clipped (an ablation: the estimator's clip factors are patched to 1). Writes
benchmarks/results/clipping.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
from common import reseeded, write_results
from pipelines import PIPELINES

import stagecredit as sc
import stagecredit.estimators.curvature_propagation as curvature_propagation
from stagecredit.estimators.curvature_propagation import CurvatureOptions as C
from stagecredit.reports.tables import Table
from stagecredit.validation.metrics import pearson

# per pipeline, a light clip (near its median gradient norm) and a heavy one (about a quarter of it, as when a
# transformer whose gradient norms are a few units is fine-tuned with max_grad_norm=1); the tables give the share
# of steps clipped
MAX_GRAD_NORMS = {"mnist-demo": (0.4, 0.1), "digits-adam-l2-sgd": (0.4, 0.1), "digits-5-stage": (0.35, 0.1)}
VARIANTS = {
    "aa (H = 0)": (None, False),
    "replay, Hessian (exact)": (C.exact(), False),
    "replay, clipping ignored": (C.exact(), True),
    "default segments": (C(), False),
    "default segments, clipping ignored": (C(), True),
}


@contextlib.contextmanager
def ignoring_clipping(ignore: bool):
    """The ablation: aa-curvature told that no stage clipped (its behaviour before clipping was modelled)."""
    original = curvature_propagation.clip_coefficients
    if ignore:
        curvature_propagation.clip_coefficients = lambda run, k: None
    try:
        yield
    finally:
        curvature_propagation.clip_coefficients = original


def clipped(pipeline, max_grad_norm: float):
    return dataclasses.replace(pipeline, stages=[dataclasses.replace(s, max_grad_norm=max_grad_norm)
                                                 for s in pipeline.stages])


def score(name: str, max_grad_norm: float, offset: int, tmp: Path) -> tuple[dict, list[str], list[float], float]:
    pipe, behaviour = PIPELINES[name]()
    pipe = clipped(reseeded(pipe, offset), max_grad_norm)
    run = pipe.run(tmp / f"{name}-{max_grad_norm}-{offset}", progress=False)
    share = [float(np.mean([s["grad_norm"] > max_grad_norm for s in run.steps(k)]))
             for k in range(1, run.num_stages + 1)]
    start = time.perf_counter()
    truth = sc.retrain_effects(run, behaviour, progress=False)
    retrain_seconds = time.perf_counter() - start
    out = {}
    for label, (options, ignore) in VARIANTS.items():
        fresh = sc.Run.load(run.path, pipeline=pipe)  # no embeddings cached by another variant
        with ignoring_clipping(ignore):
            start = time.perf_counter()
            scores = {mode: sc.attribute(fresh, behaviour, "aa" if options is None else "aa-curvature", mode,
                                         curvature=options, progress=False) for mode in ("linear", "model")}
            seconds = time.perf_counter() - start
        out[label] = {"seconds": seconds, **{mode: [pearson(e.effects[k], truth.effects[k])
                                                    for k in range(run.num_stages)] for mode, e in scores.items()}}
    return out, run.stages, share, retrain_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(PIPELINES), action="append")
    parser.add_argument("--seeds", type=int, default=3, help="seed offsets per pipeline (default 3)")
    args = parser.parse_args()
    rows, tables = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, max_grad_norm in ((n, m) for n in args.only or list(PIPELINES) for m in MAX_GRAD_NORMS[n]):
            per_seed, shares = [], []
            for offset in range(args.seeds):
                scores, stages, share, retrain_seconds = score(name, max_grad_norm, offset, Path(tmp))
                per_seed.append(scores)
                shares.append(share)
                rows += [{"pipeline": name, "seed_offset": offset, "max_grad_norm": max_grad_norm,
                          "clipped_share": share, "variant": label, "pearson_linear": s["linear"],
                          "pearson_model": s["model"], "seconds": s["seconds"], "retrain_seconds": retrain_seconds}
                         for label, s in scores.items()]
            body = []
            for label in VARIANTS:
                cells = []
                for k in range(len(stages)):
                    linear, model = (np.array([s[label][mode][k] for s in per_seed]) for mode in ("linear", "model"))
                    cells.append(f"{linear.mean():.3f} / {model.mean():.3f}")
                body.append([label] + cells + [f"{np.mean([s[label]['seconds'] for s in per_seed]):.2f}"])
            tables.append(Table(
                title=f"{name}, every stage clipped to norm {max_grad_norm}: Pearson r with retraining "
                      f"(linear / model, mean over {args.seeds} seeds)",
                columns=["variant"] + stages + ["seconds"],
                rows=body,
                note="Steps clipped per stage: " + ", ".join(f"{s:.0%}" for s in np.mean(shares, 0))
                     + ". 'clipping ignored': "
                     "the estimator told that no stage clipped (its behaviour before clipping was modelled). "
                     "'seconds': linear and model mode together, mean over the seeds.",
            ))
            tables[-1].print()
    write_results("clipping", args.only, {"rows": rows}, tables,
                  extra_args=[] if args.seeds == 3 else [f"--seeds {args.seeds}"])


if __name__ == "__main__":
    main()
