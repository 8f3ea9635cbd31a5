"""How many segments a stage needs: ``aa-curvature``'s fidelity and cost as stages grow longer.

    python benchmarks/segment_length.py [--scales 1 4 16] [--caps none 32 16 8 4] [--only NAME]

Each pipeline of ``benchmarks/fidelity.py`` is recorded with every stage's steps
(and its schedule) × 1, 4 and 16, checkpoints every 50 steps as everywhere else,
and retrained without each stage for the truth. ``aa-curvature`` (default
segments) is then run with ``CurvatureOptions(max_segments=cap)`` for each cap:
``none`` takes one segment per checkpoint interval, so its cost grows with the
stage's length like retraining's; a cap fixes the number of segments per stage,
so its cost stops growing once a stage is that many intervals long, and the
question is what that costs in agreement with retraining.

Seconds: the median of three calls after a first (which pays one-time
set-up), cached embeddings cleared before each, linear mode (the embeddings plus one scoring pass);
model mode reuses the embeddings. Ratios against retraining come from the same
run. One seed per pipeline (``benchmarks/curvature_schemes.py`` has the
five-seed spread of the default). Writes benchmarks/results/segment_length.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import write_results
from pipelines import PIPELINES

import stagecredit as sc
from stagecredit.reports.tables import Table
from stagecredit.validation.metrics import pearson


def _cap(text: str):
    return None if text == "none" else int(text)


def _timed_attribution(run, behaviour, options: sc.CurvatureOptions):
    """``(linear, model, seconds)``: linear mode's median over three calls after a first, model mode from the same
    embeddings."""
    seconds = []
    for _ in range(4):
        run._cache = {key: value for key, value in run._cache.items() if key[0] == "retrained"}
        start = time.perf_counter()
        linear = sc.attribute(run, behaviour, method="aa-curvature", mode="linear", curvature=options, progress=False)
        seconds.append(time.perf_counter() - start)
    model = sc.attribute(run, behaviour, method="aa-curvature", mode="model", curvature=options, progress=False)
    return linear, model, statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[1, 4, 16])
    parser.add_argument("--caps", type=_cap, nargs="+", default=[None, 32, 16, 8, 4])
    parser.add_argument("--only", choices=sorted(PIPELINES), action="append")
    args = parser.parse_args()
    rows, tables = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or list(PIPELINES):
            table_rows = []
            for scale in args.scales:
                pipe, behaviour = PIPELINES[name](scale)
                run = pipe.run(Path(tmp) / f"{name}-{scale:g}", progress=False)
                start = time.perf_counter()
                truth = sc.retrain_effects(run, behaviour, progress=False)
                retrain_s = time.perf_counter() - start
                stages = list(truth.stages)
                aa = sc.attribute(run, behaviour, method="aa", mode="linear", progress=False)
                variants = [("aa", aa, None, None)]
                for cap in args.caps:
                    linear, model, seconds = _timed_attribution(run, behaviour, sc.CurvatureOptions(max_segments=cap))
                    variants.append((f"max_segments={cap}", linear, model, seconds))
                for label, linear, model, seconds in variants:
                    r_linear = [pearson(linear.effects[k], truth.effects[k]) for k in range(len(stages))]
                    r_model = None if model is None else [pearson(model.effects[k], truth.effects[k])
                                                          for k in range(len(stages))]
                    row = {"pipeline": name, "scale": scale, "steps": [s.steps for s in pipe.stages], "variant": label,
                           "stages": stages, "pearson_linear": r_linear, "pearson_model": r_model,
                           "seconds": seconds, "retrain_seconds": retrain_s,
                           "retrain_over": None if seconds is None else retrain_s / seconds}
                    rows.append(row)
                    print(row, flush=True)
                    table_rows.append(
                        [f"{scale:g}", " / ".join(map(str, row["steps"])), label]
                        + [f"{r_linear[k]:.3f}" + ("" if r_model is None else f" / {r_model[k]:.3f}")
                           for k in range(len(stages))]
                        + (["", ""] if seconds is None else [f"{seconds:.3f}", f"{retrain_s / seconds:.1f}"]))
            tables.append(Table(
                title=f"{name}: Pearson r with retraining per stage (linear / model), every stage's steps scaled",
                columns=["steps ×", "steps per stage", "variant"] + stages + ["seconds", "retraining ÷ this"],
                rows=table_rows,
                note="aa-curvature with the default segments and CurvatureOptions(max_segments=…) (None: one segment "
                     "per checkpoint interval of 50 steps); aa (linear) for reference. seconds: linear mode, the "
                     "median of three calls after a first; retraining without each stage in turn timed in the same "
                     "run. One seed.",
            ))
            tables[-1].print()
    write_results("segment_length", args.only, {"rows": rows}, tables,
                  extra_args=[f"--scales {' '.join(f'{s:g}' for s in args.scales)}",
                              f"--caps {' '.join('none' if c is None else str(c) for c in args.caps)}"])


if __name__ == "__main__":
    main()
