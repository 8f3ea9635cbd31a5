"""Fidelity: per stage × method × mode, agreement of each estimator with retraining.

    python benchmarks/fidelity.py            # all pipelines
    python benchmarks/fidelity.py --only digits-5-stage

Writes benchmarks/results/fidelity.{json,md}.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import write_results
from pipelines import PIPELINES

import stagecredit as sc
from stagecredit.reports.tables import Table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(PIPELINES), action="append")
    parser.add_argument("--methods", nargs="+", default=["delta", "aa", "aa-curvature"])
    args = parser.parse_args()
    names = args.only or list(PIPELINES)
    all_rows, tables = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            pipe, behaviour = PIPELINES[name]()
            run = pipe.run(Path(tmp) / name, progress=False)
            report = sc.validate(run, behaviour, methods=args.methods, progress=False)
            rows = [{"pipeline": name, **r} for r in report.rows]
            all_rows += rows
            tables.append(Table(
                title=f"{name}: {report.behaviour}",
                columns=["stage", "method", "mode", "Pearson r", "Spearman ρ", "sign agreement", "rel. error"],
                rows=[[r["stage"], r["method"], r["mode"], f"{r['pearson']:.3f}", f"{r['spearman']:.3f}",
                       f"{r['sign_agreement']:.3f}", f"{r['relative_error']:.3f}"] for r in rows],
                note=f"N = {len(report.truth.final_values)} evaluation examples; truth = retraining without the stage.",
            ))
            tables[-1].print()
    write_results("fidelity", args.only, {"rows": all_rows}, tables)


if __name__ == "__main__":
    main()
