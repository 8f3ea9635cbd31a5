"""Fidelity: per stage × method × mode, agreement of each estimator with retraining.

    python benchmarks/fidelity.py            # all pipelines
    python benchmarks/fidelity.py --only digits-5-stage

Writes benchmarks/results/fidelity.{json,md}.
"""

from __future__ import annotations

from common import validation_benchmark
from pipelines import PIPELINES

import stagecredit as sc

if __name__ == "__main__":
    validation_benchmark("fidelity", __doc__, PIPELINES, sc.validate, "stage", "retraining without the stage")
