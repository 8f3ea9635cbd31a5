"""Fidelity: per stage × method × mode, agreement of each estimator with retraining.

Each pipeline also gets the truth's ceilings (``sc.truth_ceilings``): how
reproducible retraining without a stage is under a 1% nudge, and how linear
(removing 1% of the stage, scaled, against removing all of it). Estimators are
also scored against that scaled 1% removal ("r vs ε-removal").

    python benchmarks/fidelity.py            # all pipelines
    python benchmarks/fidelity.py --only digits-5-stage

Writes benchmarks/results/fidelity.{json,md}.
"""

from __future__ import annotations

from common import validation_benchmark
from pipelines import PIPELINES

import stagecredit as sc


def validate_with_ceilings(run, behaviour, **kw):
    return sc.validate(run, behaviour, ceilings=True, **kw)


if __name__ == "__main__":
    validation_benchmark("fidelity", __doc__, PIPELINES, validate_with_ceilings, "stage", "retraining without the stage")
