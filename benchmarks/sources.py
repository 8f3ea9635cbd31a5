"""Source fidelity: per data source × method × mode, agreement with retraining the stage without that source.

    python benchmarks/sources.py                 # all sourced pipelines
    python benchmarks/sources.py --only digits-sourced

Writes benchmarks/results/sources.{json,md}.
"""

from __future__ import annotations

from common import validation_benchmark
from pipelines import SOURCED_PIPELINES

import stagecredit as sc

if __name__ == "__main__":
    validation_benchmark("sources", __doc__, SOURCED_PIPELINES, sc.validate_sources, "stage/source",
                         "retraining the source's stage (and the later ones) with that source's weight set to 0")
