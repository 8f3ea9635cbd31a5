"""Where along each tangent to take the curvature on a pretrained transformer layer: the text demo, secant 0 and 0.5.

    python benchmarks/text_secant.py                     # the demo's own aa-curvature settings (about 3 min)
    python benchmarks/text_secant.py --settings default  # CurvatureOptions() (about 40 min on 2 cores)

``benchmarks/curvature_schemes.py`` measures ``CurvatureOptions(secant=…)`` on
small MLPs, where the midpoint helps model mode. This records the text demo
(all-MiniLM-L6-v2's last layer: a pretrained stage, then two AdamW stages; needs
``transformers`` and the offline packages of ``stagecredit demo --text``),
retrains it without each stage, and scores ``aa-curvature`` in linear and model
mode with the curvature at the recorded parameters (secant 0) and at each
tangent's midpoint (secant 0.5). Writes benchmarks/results/text_secant.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from common import write_results

import stagecredit as sc
from stagecredit.reports.tables import Table
from stagecredit.validation.metrics import pearson

SECANTS = (0.0, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", choices=["demo", "default"], default="demo",
                        help="the text demo's own CurvatureOptions (default) or CurvatureOptions()")
    args = parser.parse_args()
    from stagecredit.demos import text

    base = text.CURVATURE if args.settings == "demo" else sc.CurvatureOptions()
    data = text.make_data()
    behaviour = sc.PerExampleLoss(data.test, text.loss_fn, name="test loss per example (nats)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = text.build_pipeline(data).run(Path(tmp) / "run", progress=False)
        start = time.perf_counter()
        truth = sc.retrain_effects(run, behaviour, progress=False)
        retrain_seconds = time.perf_counter() - start
        for secant in SECANTS:
            options = dataclasses.replace(base, secant=secant)
            for mode in ("linear", "model"):
                run._cache = {k: v for k, v in run._cache.items() if k[0] == "retrained"}
                start = time.perf_counter()
                estimate = sc.attribute(run, behaviour, "aa-curvature", mode, curvature=options, progress=False)
                rows.append({"secant": secant, "mode": mode, "seconds": time.perf_counter() - start,
                             "pearson": [pearson(estimate.effects[k], truth.effects[k])
                                         for k in range(run.num_stages)],
                             "options": options.to_dict()})
        stages = run.stages
    table = Table(
        title=f"text demo ({args.settings} aa-curvature settings): Pearson r with retraining per stage",
        columns=["secant", "mode"] + stages + ["seconds"],
        rows=[[f"{r['secant']:g}", r["mode"]] + [f"{p:.3f}" for p in r["pearson"]] + [f"{r['seconds']:.1f}"]
              for r in rows],
        note=f"{len(data.test[2])} test reviews; retraining without each stage took {retrain_seconds:.1f} s in this "
             "run. 'seconds': the stage embeddings plus the scores, cache cleared before each.",
    )
    table.print()
    write_results("text_secant" if args.settings == "demo" else "text_secant-default", None,
                  {"settings": args.settings, "retrain_seconds": retrain_seconds, "rows": rows}, [table],
                  script="text_secant", extra_args=[] if args.settings == "demo" else ["--settings default"])


if __name__ == "__main__":
    main()
