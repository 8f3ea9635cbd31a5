"""``stagecredit demo``: train the MNIST pipeline, attribute the test loss per group, validate, report."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import stagecredit as sc
from stagecredit.demos import mnist
from stagecredit.reports.html import write_report
from stagecredit.reports.plots import group_effects_plot, scatter_plot
from stagecredit.reports.tables import Table, validation_table, verdict
from stagecredit.storage.atomic import atomic_write_json

UNIT = "nats"


def group_means(effects: np.ndarray, groups: np.ndarray, count: int) -> np.ndarray:
    """``[K, N]`` per-example effects → ``[K, G]`` effects on each group's mean (exact: the mean is linear)."""
    return np.stack([effects[:, groups == g].mean(axis=1) for g in range(count)], axis=1)


def short_label(label: str) -> str:
    method, mode = label.split("/")
    return f"τ̂ {method.replace('aa-curvature', 'aa-curv')} {'lin' if mode == 'linear' else 'mdl'}"


def headline(stages, groups, truth_groups, estimates: dict[str, np.ndarray]) -> str:
    g = groups.index("cue disagrees")
    blamed = int(np.argmax(truth_groups[:, g]))
    value = truth_groups[blamed, g]
    agree = [label for label, est in estimates.items() if int(np.argmax(est[:, g])) == blamed]
    return (
        f"Stage '{stages[blamed]}' is to blame for the cue-disagrees group: removing it and retraining changes that "
        f"group's mean test loss by {-value:+.3f} {UNIT}, i.e. it made the loss {'worse' if value > 0 else 'better'} "
        f"by {abs(value):.3f} {UNIT}. Estimators that single out the same stage without retraining: "
        f"{', '.join(agree) if agree else 'none'}."
    )


def run_mnist_demo(out_dir: Path, *, scale: float = 1.0, progress: bool = True, console=None) -> dict:
    from rich.console import Console

    console = console or Console()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    data = mnist.make_data()
    pipe = mnist.build_pipeline(data, scale=scale)
    console.print(f"[bold]stagecredit demo[/]: MNIST, stages {[s.name for s in pipe.stages]}, "
                  f"{sum(s.steps for s in pipe.stages)} training steps; output → {out_dir}")
    run = pipe.run(out_dir / "run", progress=progress, overwrite=True)
    train_seconds = time.perf_counter() - started

    loss = sc.PerExampleLoss(data.test, mnist.cross_entropy, name=f"MNIST test loss per example ({UNIT})")
    report = sc.validate(run, loss, methods=["delta", "aa", "aa-curvature"], progress=progress)
    correct = sc.PerExampleCorrect(data.test, name="MNIST test correctness per example")
    acc_truth = sc.retrain_effects(run, correct, progress=progress)
    acc_est = sc.attribute(run, correct, method="aa-curvature", mode="model", progress=progress)

    groups = list(mnist.GROUPS)
    g = data.test_groups.numpy()
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
    story = headline(run.stages, groups, truth_groups, estimates)
    total_seconds = time.perf_counter() - started
    timing = (f"Timing on this machine: training {train_seconds:.1f} s; retraining without each stage "
              f"{sum(report.truth.seconds):.1f} s; estimators " +
              ", ".join(f"{a.method}/{a.mode} {sum(a.seconds):.3f} s" for a in report.attributions) +
              f"; whole demo {total_seconds:.1f} s.")
    sections = [story, effects, bars, accuracy, validation, scatter, timing]
    md, page = write_report(out_dir, "stagecredit — MNIST demo: who is to blame for the shortcut?", sections)

    results = {
        "behaviour": report.behaviour,
        "unit": UNIT,
        "sign_convention": report.sign_convention,
        "stages": run.stages,
        "groups": groups,
        "group_sizes": [int((g == gi).sum()) for gi in range(len(groups))],
        "headline": story,
        "group_effects": {"retrain": truth_groups.tolist(), **{k: v.tolist() for k, v in estimates.items()}},
        "accuracy": {"final": final_acc,
                     "without_stage_retrain": [[final_acc[gi] - float(acc_truth.effects[k, g == gi].mean())
                                                for gi in range(len(groups))] for k in range(run.num_stages)],
                     "without_stage_aa_curvature_model": [[final_acc[gi] - float(acc_est.effects[k, g == gi].mean())
                                                 for gi in range(len(groups))] for k in range(run.num_stages)]},
        "validation": report.to_dict(),
        "seconds": {"train": train_seconds, "retrain": sum(report.truth.seconds), "total": total_seconds},
        "files": {"run": "run", "summary": md.name, "report": page.name, "plots": [bars.name, scatter.name]},
    }
    atomic_write_json(out_dir / "results.json", results)

    console.print()
    console.print(f"[bold yellow]{story}[/]")
    for table in (effects, accuracy, validation):
        table.print(console)
    console.print(timing)
    console.print(f"Wrote {out_dir / 'results.json'}, {md}, {page}, {bars.name}, {scatter.name}")
    return results
