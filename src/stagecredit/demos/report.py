"""The demos' shared story: train a pipeline, attribute each group's test loss to the stages, validate, report."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import stagecredit as sc
from stagecredit.reports.html import write_report
from stagecredit.reports.plots import group_effects_plot, intervention_plot, scatter_plot
from stagecredit.reports.tables import Table, validation_table, verdict
from stagecredit.storage.atomic import atomic_write_json

UNIT = "nats"


def group_means(effects: np.ndarray, groups: np.ndarray, count: int) -> np.ndarray:
    """``[K, N]`` per-example effects → ``[K, G]`` effects on each group's mean (exact: the mean is linear)."""
    return np.stack([effects[:, groups == g].mean(axis=1) for g in range(count)], axis=1)


def short_label(label: str) -> str:
    method, mode = label.split("/")
    return f"τ̂ {method.replace('aa-curvature', 'aa-curv')} {'lin' if mode == 'linear' else 'mdl'}"


def headline(stages, groups, focus: str, truth_groups, estimates: dict[str, np.ndarray]) -> str:
    g = groups.index(focus)
    blamed = int(np.argmax(truth_groups[:, g]))
    value = truth_groups[blamed, g]
    agree = [label for label, est in estimates.items() if int(np.argmax(est[:, g])) == blamed]
    return (
        f"Stage '{stages[blamed]}' is to blame for the '{focus}' group: removing it and retraining changes that "
        f"group's mean test loss by {-value:+.3f} {UNIT}, i.e. it made the loss {'worse' if value > 0 else 'better'} "
        f"by {abs(value):.3f} {UNIT}. Estimators that single out the same stage without retraining: "
        f"{', '.join(agree) if agree else 'none'}."
    )


def source_section(run, test_data, loss_fn, g: np.ndarray, groups: list[str], focus: str, progress: bool):
    """Per data source: its effect on each group's mean test loss, by retraining and estimated; Pearson per example."""
    loss = sc.PerExampleLoss(test_data, loss_fn, name=f"test loss per example ({UNIT})")
    report = sc.validate_sources(run, loss, methods=["aa", "aa-curvature"], modes=["linear"], progress=progress)
    truth = group_means(report.truth.effects, g, len(groups))
    estimates = {a.method: group_means(a.effects, g, len(groups)) for a in report.attributions}
    rows = []
    for i, label in enumerate(report.truth.stages):
        for gi, group in enumerate(groups):
            rows.append([label, group, float(truth[i, gi]), verdict(float(truth[i, gi]))]
                        + [float(est[i, gi]) for est in estimates.values()])
    table = Table(
        title=f"Effect of each data source on each group's mean test loss ({UNIT})",
        columns=["stage/source", "group", "τ retrain", "verdict"] + [f"τ̂ {m} lin" for m in estimates],
        rows=rows,
        note=report.truth.sign_convention + " " + " ".join(report.truth.notes),
    )
    f = groups.index(focus)
    stage, source = report.truth.stages[int(np.argmax(truth[:, f]))].split("/", 1)
    story = (f"Within stage '{stage}', source '{source}' is to blame for the '{focus}' group: removing it and retraining "
             f"changes that group's mean test loss by {-float(truth[:, f].max()):+.3f} {UNIT}.")
    return report, truth, estimates, table, validation_table(report), story


def repair_section(run, splits, out_dir: Path, progress: bool):
    report = sc.intervene(run, splits, out=out_dir / "repair", progress=progress)
    plot = intervention_plot(out_dir / "repair.png", report)
    base = report.get("do nothing").test
    best = report.get(report.recommended)
    rerun = next((i for i in report.interventions if i.name == "targeted re-run"), None)
    story = (f"Repair: the estimators blame stage '{report.stage}'"
             + (f", source '{report.source}'" if report.source else "")
             + f". Recommended fix (chosen on validation): {report.recommended} — worst-group test accuracy "
             f"{100 * base.worst_group:.1f}% → {100 * best.test.worst_group:.1f}%, average {100 * base.accuracy:.1f}% "
             f"→ {100 * best.test.accuracy:.1f}%.")
    if rerun is not None and rerun.name != best.name:
        story += (f" Targeted re-run: worst group {100 * rerun.test.worst_group:.1f}%, average "
                  f"{100 * rerun.test.accuracy:.1f}%.")
    return report, plot, story


def run_group_demo(out_dir: Path, *, title: str, pipe, test_data, loss_fn, groups: np.ndarray,
                   group_names: list[str], focus: str, progress: bool = True, console=None,
                   started: float | None = None, curvature=None, splits=None) -> dict:
    """Record ``pipe``, attribute the test loss of every group to its stages, validate by retraining, report.

    When a stage has named data sources, also attributes to each source; with
    ``splits`` (a ``RepairSplits``), also repairs the blamed stage/source and
    reports before/after accuracy.
    """
    from rich.console import Console

    console = console or Console()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = started if started is not None else time.perf_counter()
    console.print(f"[bold]stagecredit demo[/]: {title}, stages {[s.name for s in pipe.stages]}, "
                  f"{sum(s.steps for s in pipe.stages)} training steps; output → {out_dir}")
    run = pipe.run(out_dir / "run", progress=progress, overwrite=True)
    train_seconds = time.perf_counter() - started

    loss = sc.PerExampleLoss(test_data, loss_fn, name=f"test loss per example ({UNIT})")
    report = sc.validate(run, loss, methods=["delta", "aa", "aa-curvature"], curvature=curvature, progress=progress)
    correct = sc.PerExampleCorrect(test_data, name="test correctness per example")
    acc_truth = sc.retrain_effects(run, correct, progress=progress)
    acc_est = sc.attribute(run, correct, method="aa-curvature", mode="model", curvature=curvature, progress=progress)

    g = np.asarray(groups)
    groups = list(group_names)
    truth_groups = group_means(report.truth.effects, g, len(groups))
    estimates = {f"{a.method}/{a.mode}": group_means(a.effects, g, len(groups)) for a in report.attributions}

    effect_rows = []
    for k, stage in enumerate(run.stages):
        for gi, group in enumerate(groups):
            effect_rows.append([stage, group, float(truth_groups[k, gi]), verdict(float(truth_groups[k, gi]))]
                               + [float(est[k, gi]) for est in estimates.values()])
    effects = Table(
        title=f"Stage effects on each group's mean test loss ({UNIT})",
        columns=["stage", "group", "τ retrain", "verdict"] + [short_label(label) for label in estimates],
        rows=effect_rows,
        note=report.sign_convention + " τ̂ columns: estimates without retraining (lin = linear mode, mdl = model mode, "
             "aa-curv = aa-curvature).",
    )

    final_acc = [float(acc_truth.final_values[g == gi].mean()) for gi in range(len(groups))]
    acc_rows = [["none (final model)"] + [100 * a for a in final_acc] + ["", ""]]
    for k, stage in enumerate(run.stages):
        without = [final_acc[gi] - float(acc_truth.effects[k, g == gi].mean()) for gi in range(len(groups))]
        est = [final_acc[gi] - float(acc_est.effects[k, g == gi].mean()) for gi in range(len(groups))]
        acc_rows.append([f"'{stage}' skipped"] + [100 * w for w in without] + [100 * e for e in est])
    accuracy = Table(
        title="Test accuracy (%) by group: final model, and with each stage skipped",
        columns=["model"] + [f"{grp} (retrain)" for grp in groups] + [f"{grp} (aa-curvature est.)" for grp in groups],
        rows=[[row[0]] + [f"{v:.1f}" if isinstance(v, float) else v for v in row[1:]] for row in acc_rows],
        note="Retrain columns: the model actually retrained without the stage. Estimate columns: θ_T − e_k from the "
             "aa-curvature stage embedding (model mode), no retraining.",
    )
    validation = validation_table(report)

    bars = group_effects_plot(out_dir / "effects_by_group.png", run.stages, groups,
                              {"retrain (truth)": truth_groups, **estimates}, UNIT)
    scatter = scatter_plot(out_dir / "estimate_vs_retrain.png", report.truth,
                           [a for a in report.attributions if a.method in ("aa", "aa-curvature")], UNIT)
    story = headline(run.stages, groups, focus, truth_groups, estimates)
    extra_sections, extra_tables, stories, extra_results, plots = [], [], [story], {}, [bars, scatter]
    if any(run.sources(k) for k in range(1, run.num_stages + 1)):
        src_report, src_truth, src_est, src_table, src_validation, src_story = source_section(
            run, test_data, loss_fn, g, groups, focus, progress)
        stories.append(src_story)
        extra_sections += [src_story, src_table, src_validation]
        extra_tables += [src_table, src_validation]
        extra_results["sources"] = {"group_effects": {"retrain": src_truth.tolist(),
                                                      **{k: v.tolist() for k, v in src_est.items()}},
                                    "labels": src_report.truth.stages, "validation": src_report.to_dict()}
    if splits is not None:
        repair, repair_plot, repair_story = repair_section(run, splits, out_dir, progress)
        stories.append(repair_story)
        repair_table = repair.table()
        extra_sections += [repair_story, repair_table, repair_plot]
        extra_tables.append(repair_table)
        plots.append(repair_plot)
        extra_results["repair"] = {**repair.to_dict(), "folder": "repair"}
    total_seconds = time.perf_counter() - started
    timing = (f"Timing on this machine: training {train_seconds:.1f} s; retraining without each stage "
              f"{sum(report.truth.seconds):.1f} s; estimators " +
              ", ".join(f"{a.method}/{a.mode} {sum(a.seconds):.3f} s" for a in report.attributions) +
              f"; whole demo {total_seconds:.1f} s.")
    sections = [story, *report.truth.notes, effects, bars, accuracy, validation, scatter, *extra_sections, timing]
    md, page = write_report(out_dir, f"stagecredit — {title}: who is to blame for the shortcut?", sections)

    results = {
        "title": title,
        "behaviour": report.behaviour,
        "notes": report.truth.notes,
        "unit": UNIT,
        "sign_convention": report.sign_convention,
        "stages": run.stages,
        "groups": groups,
        "group_sizes": [int((g == gi).sum()) for gi in range(len(groups))],
        "headline": story,
        "headlines": stories,
        "group_effects": {"retrain": truth_groups.tolist(), **{k: v.tolist() for k, v in estimates.items()}},
        "accuracy": {"final": final_acc,
                     "without_stage_retrain": [[final_acc[gi] - float(acc_truth.effects[k, g == gi].mean())
                                                for gi in range(len(groups))] for k in range(run.num_stages)],
                     "without_stage_aa_curvature_model": [[final_acc[gi] - float(acc_est.effects[k, g == gi].mean())
                                                 for gi in range(len(groups))] for k in range(run.num_stages)]},
        "validation": report.to_dict(),
        "seconds": {"train": train_seconds, "retrain": sum(report.truth.seconds), "total": total_seconds},
        "files": {"run": "run", "summary": md.name, "report": page.name, "plots": [p.name for p in plots]},
        **extra_results,
    }
    atomic_write_json(out_dir / "results.json", results)

    console.print()
    for line in stories:
        console.print(f"[bold yellow]{line}[/]")
    for note in report.truth.notes:
        console.print(note)
    for table in (effects, accuracy, validation, *extra_tables):
        table.print(console)
    console.print(timing)
    console.print(f"Wrote {out_dir / 'results.json'}, {md}, {page}, " + ", ".join(p.name for p in plots))
    return results


def run_mnist_demo(out_dir: Path, *, scale: float = 1.0, progress: bool = True, console=None) -> dict:
    """MNIST: pretrain → finetune → an adapt stage with a source whose images carry a label-revealing stamp."""
    from stagecredit.demos import mnist

    started = time.perf_counter()
    data = mnist.make_data()
    return run_group_demo(out_dir, title="MNIST", pipe=mnist.build_pipeline(data, scale=scale), test_data=data.test,
                          loss_fn=mnist.cross_entropy, groups=data.test_groups.numpy(), group_names=list(mnist.GROUPS),
                          focus="cue disagrees", progress=progress, console=console, started=started,
                          splits=mnist.repair_splits(data))
