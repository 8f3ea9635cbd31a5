"""Helpers shared by the benchmark scripts: where results go and how tables are written."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from stagecredit.reports.tables import Table  # noqa: E402
from stagecredit.storage.atomic import atomic_write_json, atomic_write_text  # noqa: E402


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine()}


def write_results(name: str, only: list[str] | None, payload: dict, tables: list[Table], *,
                  script: str | None = None, extra_args: list[str] = ()) -> None:
    """Write ``results/<name>.json`` and ``.md``, naming the command that re-makes them."""
    command = (f"python benchmarks/{script or name}.py" + "".join(f" --only {n}" for n in only or [])
               + "".join(f" {a}" for a in extra_args))
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / f"{name}.json", {"command": command, "machine": machine(), **payload})
    body = [f"# {name}", "", f"Made by `{command}` on {machine()}.", ""] + [t.to_markdown() for t in tables]
    atomic_write_text(RESULTS / f"{name}.md", "\n".join(body))


def validation_benchmark(name: str, doc: str, pipelines: dict, validate, row_label: str, truth_note: str) -> None:
    """Parse ``--only``/``--methods``, validate every pipeline against retraining, print and write the tables.

    ``validate(run, behaviour, methods=...)`` returns a ``ValidationReport`` (``sc.validate`` or
    ``sc.validate_sources``); when the report carries the truth's ceilings they get a table of their own.
    """
    from stagecredit.reports.tables import ceilings_table, epsilon_removal

    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(pipelines), action="append")
    parser.add_argument("--methods", nargs="+", default=["delta", "aa", "aa-curvature"])
    parser.add_argument("--curvature", choices=["ggn", "hessian"],
                        help="aa-curvature's curvature instead of its default; results go to <name>-<curvature>.*")
    args = parser.parse_args()
    import stagecredit as sc

    options = sc.CurvatureOptions(curvature=args.curvature) if args.curvature else None
    all_rows, tables, ceilings = [], [], {}
    for pipeline_name, run, behaviour in recorded_runs(pipelines, args.only):
        report = validate(run, behaviour, methods=args.methods, curvature=options, progress=False)
        rows = [{"pipeline": pipeline_name, **r} for r in report.rows]
        all_rows += rows
        derivative = report.ceilings is not None
        tables.append(Table(
            title=f"{pipeline_name}: {report.behaviour}",
            columns=[row_label, "method", "mode", "Pearson r", "Spearman ρ", "sign agreement", "rel. error",
                     "mean τ̂", "mean τ (retrain)", "estimator s", "retrain s"] + (["r vs ε-removal"] if derivative else []),
            rows=[[r["stage"], r["method"], r["mode"], f"{r['pearson']:.3f}", f"{r['spearman']:.3f}",
                   f"{r['sign_agreement']:.3f}", f"{r['relative_error']:.3f}", r["mean_estimate"],
                   r["mean_retrained"], f"{r['seconds']:.3f}", f"{r['retrain_seconds']:.2f}"]
                  + ([f"{r['pearson_derivative']:.3f}"] if derivative else []) for r in rows],
            note=f"N = {len(report.truth.final_values)} evaluation examples; truth = {truth_note}."
                 + (f" r vs ε-removal: Pearson r with {epsilon_removal(report.ceilings)}." if derivative else ""),
        ))
        tables[-1].print()
        if derivative:
            ceilings[pipeline_name] = report.ceilings.to_dict()
            tables.append(ceilings_table(report.ceilings, f"{pipeline_name}: how well any estimate can agree with "
                                                          "retraining"))
            tables[-1].print()
    write_results(f"{name}-{args.curvature}" if args.curvature else name, args.only,
                  {"rows": all_rows, **({"ceilings": ceilings} if ceilings else {})}, tables,
                  script=name, extra_args=[f"--curvature {args.curvature}"] if args.curvature else [])


def reseeded(pipeline, offset: int):
    """``pipeline`` with its initialisation seed and every stage's seed moved by ``100 × offset`` (same data)."""
    import dataclasses

    return dataclasses.replace(pipeline, seed=pipeline.seed + 100 * offset,
                               stages=[dataclasses.replace(s, seed=s.seed + 100 * offset) for s in pipeline.stages])


def recorded_runs(pipelines: dict, only: list[str] | None):
    """``(name, run, behaviour)`` for every selected pipeline, each recorded into a temporary folder."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name in only or list(pipelines):
            pipe, behaviour = pipelines[name]()
            yield name, pipe.run(Path(tmp) / name, progress=False), behaviour
