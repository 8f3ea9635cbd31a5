"""Source fidelity: per data source × method × mode, agreement with retraining the stage without that source.

    python benchmarks/sources.py                 # all sourced pipelines
    python benchmarks/sources.py --only digits-sourced

Each pipeline also gets the truth's ceilings per source (``sc.truth_ceilings``
with ``sources=True``): reproducibility under a 1% nudge of the stage's start
and linearity (the source at weight 0.99, scaled, against removing it).

Writes benchmarks/results/sources.{json,md}.
"""

from __future__ import annotations

from common import validation_benchmark
from pipelines import SOURCED_PIPELINES

import stagecredit as sc


def validate_with_ceilings(run, behaviour, **kw):
    return sc.validate_sources(run, behaviour, ceilings=True, **kw)


if __name__ == "__main__":
    validation_benchmark("sources", __doc__, SOURCED_PIPELINES, validate_with_ceilings, "stage/source",
                         "retraining the source's stage (and the later ones) with that source's weight set to 0")
