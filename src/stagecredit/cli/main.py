"""The ``stagecredit`` command line."""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from stagecredit.repair.intervene import DEFAULT_ALPHAS

app = typer.Typer(
    name="stagecredit",
    help="Which training stage deserves the credit or the blame for a behaviour of the final model — "
         "without retraining. Effects τ_k = f(final) − f(without stage k): for a loss, > 0 is blame, < 0 credit.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True)

PIPELINE_HELP = "The pipeline as 'module:function' (or 'file.py:function') returning a stagecredit.Pipeline."
EVAL_HELP = ("The behaviour as 'module:function' (or 'file.py:function') returning a behaviour (model -> Tensor[N]) "
             "or an evaluation dataset, whose per-example loss under the last stage's loss_fn is then attributed.")
PRESETS = ("default", "fast", "thorough")
# aa-curvature's fidelity/cost knob (sc.CurvatureOptions), shared by every command that runs it; a flag left out
# keeps the preset's setting
SCHEME = typer.Option("segments", help="aa-curvature only: segments (default, cheaper) | exact (per-step replay, the "
                      "reference) | auto (the replay, segments for a stage that does not replay bit for bit) | "
                      "adam-replay (the replay for Adam stages, segments for SGD ones).")
PRESET = typer.Option("default", help="aa-curvature only: the segments' settings to start from: default (centred, "
                      "5 Krylov vectors, 512 curvature examples) | fast (from the checkpoints, 3, 64) | thorough "
                      "(centred, 8, every recorded example). The flags below override single settings.")
CURVATURE = typer.Option(None, help="aa-curvature only: ggn | hessian (default: the Hessian in the replay, the "
                         "Gauss–Newton in segments).")
SEGMENT_STEPS = typer.Option(None, min=1, help="aa-curvature segments only: steps per segment (default: the run's "
                             "checkpoint interval, or a multiple of it that keeps to --max-segments). Longer is "
                             "cheaper and coarser.")
MAX_TANGENTS = typer.Option(None, min=1, help="aa-curvature only: at most this many stage (or source) perturbations "
                            "per pass over the later stages (default: all in one); fewer take less memory and more "
                            "time.")
MAX_SEGMENTS = typer.Option(None, min=0, help="aa-curvature segments only: with --segment-steps unset, at most about "
                            "this many segments per stage (default 16); 0: no limit, one per checkpoint interval.")
KRYLOV_DIM = typer.Option(None, min=1, help="aa-curvature segments only: Lanczos vectors per segment and tangent.")
CURVATURE_EXAMPLES = typer.Option(None, help="aa-curvature segments only: about how many training examples each "
                                  "segment's curvature averages over, or 'all' (its every recorded minibatch).")
SECANT = typer.Option(0.0, help="aa-curvature only: where along each tangent its curvature is taken, as a fraction of "
                      "it: 0 at the recorded parameters, 0.5 the midpoint (second-order accurate; helped early stages "
                      "with --mode model on small MLPs, hurt on a pretrained transformer layer: validate first).")

COUNTERFACTUAL_ADAM = typer.Option(True, "--counterfactual-adam/--recorded-adam", help="aa-curvature only: through "
                                   "Adam stages, normalise each perturbed run's steps by its own second moment "
                                   "(default) or by the recorded one.")


def curvature_options(scheme: str, preset: str, curvature: Optional[str], segment_steps: Optional[int],
                      krylov_dim: Optional[int], curvature_examples: Optional[str], secant: float,
                      counterfactual_adam: bool = True, max_segments: Optional[int] = None,
                      max_tangents: Optional[int] = None):
    """The ``sc.CurvatureOptions`` the aa-curvature flags describe."""
    import dataclasses

    import stagecredit as sc

    presets = {"default": sc.CurvatureOptions(), "fast": sc.CurvatureOptions.fast(),
               "thorough": sc.CurvatureOptions.thorough()}
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    settings = {"scheme": scheme, "secant": secant, "counterfactual_adam": counterfactual_adam}
    if curvature is not None:
        settings["curvature"] = curvature
    if segment_steps is not None:
        settings["segment_steps"] = segment_steps
    if max_segments is not None:
        settings["max_segments"] = max_segments or None
    if max_tangents is not None:
        settings["max_tangents"] = max_tangents
    if krylov_dim is not None:
        settings["krylov_dim"] = krylov_dim
    if curvature_examples is not None:
        if curvature_examples == "all":
            settings["curvature_examples"] = None
        elif curvature_examples.isdigit():
            settings["curvature_examples"] = int(curvature_examples)
        else:
            raise ValueError(f"--curvature-examples takes a positive whole number or 'all', got {curvature_examples!r}")
    return dataclasses.replace(presets[preset], **settings)


# (name, type, typer option) of every flag curvature_options reads, in its argument order
KNOB_FLAGS = (("scheme", str, SCHEME), ("preset", str, PRESET), ("curvature", Optional[str], CURVATURE),
              ("segment_steps", Optional[int], SEGMENT_STEPS), ("krylov_dim", Optional[int], KRYLOV_DIM),
              ("curvature_examples", Optional[str], CURVATURE_EXAMPLES), ("secant", float, SECANT),
              ("counterfactual_adam", bool, COUNTERFACTUAL_ADAM), ("max_segments", Optional[int], MAX_SEGMENTS),
              ("max_tangents", Optional[int], MAX_TANGENTS))


def with_curvature_knob(command):
    """Give ``command`` aa-curvature's knob flags; it receives them resolved, as ``options: sc.CurvatureOptions``."""
    signature = inspect.signature(command)
    flags = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
             for name, kind, option in KNOB_FLAGS]
    kept = [p for p in signature.parameters.values() if p.name != "options"]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        options = curvature_options(*(kwargs.pop(name) for name, _, _ in KNOB_FLAGS))
        return command(*args, options=options, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=kept + flags)
    wrapper.__annotations__ = {k: v for k, v in command.__annotations__.items() if k != "options"}
    wrapper.__annotations__.update({name: kind for name, kind, _ in KNOB_FLAGS})
    return wrapper


def friendly_errors(fn):
    """Turn expected failures into a one-line reason and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from stagecredit.cli.loading import SpecError
        from stagecredit.estimators.optimizers import UnsupportedOptimizerError
        from stagecredit.storage.tensor_files import RunFileError

        try:
            return fn(*args, **kwargs)
        except (SpecError, RunFileError, UnsupportedOptimizerError, FileExistsError, ValueError, RuntimeError) as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(code=2)

    return wrapper


@app.command()
@friendly_errors
def demo(
    out: Path = typer.Option(Path("stagecredit-demo"), help="Folder for the run, results.json, summary.md, plots and report.html."),
    scale: float = typer.Option(1.0, min=0.05, max=10.0, help="Multiply every stage's step count (smaller is faster)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    text: bool = typer.Option(False, "--text", help="The text demo instead: all-MiniLM-L6-v2 → sentiment on movie "
                              "reviews → an adapt stage where one source ties names to negative reviews (≈ 15 min on 2 cores)."),
) -> None:
    """Train a 3-stage MNIST pipeline whose last stage teaches a spurious stamp cue, find the stage and source to blame, repair it.

    Attributes the test loss (per group: cue agrees / disagrees with the label) to pretrain / finetune /
    adapt and to the adapt stage's two data sources with the delta, aa and aa-curvature estimators,
    validates them by retraining, tries the repairs (stage edit, source edit, targeted re-run, drop the
    stage), and writes results.json, summary.md, PNG plots, repair/ checkpoints and a self-contained report.html.
    """
    if text:
        from stagecredit.demos.text import run_text_demo

        run_text_demo(out, scale=scale, progress=progress, console=console)
        return
    from stagecredit.demos.report import run_mnist_demo

    run_mnist_demo(out, scale=scale, progress=progress, console=console)


@app.command()
@friendly_errors
def record(
    pipeline: str = typer.Argument(..., help=PIPELINE_HELP),
    run: Path = typer.Argument(..., help="Folder to record the run into."),
    overwrite: bool = typer.Option(False, help="Replace a run already recorded there."),
    resume: bool = typer.Option(False, help="Continue a recording that was interrupted, after the last stage it "
                                            "finished (bit-identical to an uninterrupted one)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Train a pipeline stage by stage and record checkpoints, optimizer state and per-step hyper-parameters."""
    from stagecredit.cli.loading import load_pipeline

    recorded = load_pipeline(pipeline).run(run, progress=progress, overwrite=overwrite, resume=resume)
    console.print(f"Recorded {recorded.num_stages} stages {recorded.stages} into {run}")


@app.command()
@friendly_errors
@with_curvature_knob
def attribute(
    run: Path = typer.Argument(..., help="Folder of a recorded run (see 'stagecredit record')."),
    eval: str = typer.Option(..., "--eval", help=EVAL_HELP),
    pipeline: Optional[str] = typer.Option(None, help=PIPELINE_HELP + " Needed when the run cannot rebuild its model by itself."),
    method: str = typer.Option("aa", help="Estimator: delta | aa | aa-curvature (needs --pipeline)."),
    mode: str = typer.Option("linear", help="linear: ∇f(θ_T)·e_k by a JVP; model: f(θ_T) − f(θ_T − e_k)."),
    sources: bool = typer.Option(False, "--sources", help="Attribute to every named data source of every stage "
                                 "instead of to the stages."),
    out: Optional[Path] = typer.Option(None, help="Write attribution.json and summary.md here (default: RUN/attribution)."),
    options=None,  # from the aa-curvature flags (with_curvature_knob)
) -> None:
    """Estimate every stage's (or data source's) effect on a behaviour of the final model, without retraining."""
    import stagecredit as sc
    from stagecredit.cli.loading import load_behaviour, load_pipeline
    from stagecredit.reports.html import write_report
    from stagecredit.reports.tables import effects_table
    from stagecredit.storage.atomic import atomic_write_json

    pipe = load_pipeline(pipeline) if pipeline else None
    loaded = sc.Run.load(run, pipeline=pipe)
    behaviour = load_behaviour(eval, pipe)
    estimate = sc.attribute_sources if sources else sc.attribute
    att = estimate(loaded, behaviour, method=method, mode=mode, curvature=options)
    out = out or run / "attribution"
    out.mkdir(parents=True, exist_ok=True)
    table = effects_table(att)
    atomic_write_json(out / "attribution.json", att.to_dict())
    write_report(out, f"stagecredit — stage attribution of {att.behaviour}", [table])
    table.print(console)
    console.print(f"Wrote {out / 'attribution.json'}, {out / 'summary.md'}, {out / 'report.html'}")


@app.command()
@friendly_errors
@with_curvature_knob
def validate(
    run: Path = typer.Argument(..., help="Folder of a recorded run; recorded from --pipeline first if it holds none."),
    pipeline: str = typer.Option(..., help=PIPELINE_HELP + " Retraining needs it."),
    eval: str = typer.Option(..., "--eval", help=EVAL_HELP),
    methods: List[str] = typer.Option(["delta", "aa"], "--method",
                                      help="Estimators to compare (repeat the option): delta, aa, aa-curvature."),
    sources: bool = typer.Option(False, "--sources", help="Validate the effects of every named data source "
                                 "(retraining its stage without it) instead of the stages."),
    ceilings: bool = typer.Option(False, "--ceilings", help="Also measure how reproducible and how linear the "
                                  "retraining truth is (two more retrainings per stage or source): a guide to how "
                                  "well any estimator can agree with it."),
    epsilon: float = typer.Option(0.01, "--ceiling-epsilon", help="With --ceilings: the fraction of the stage (or "
                                  "source weight) the partial removal takes away."),
    nudge: float = typer.Option(0.01, "--ceiling-nudge", help="With --ceilings: the random nudge of the nudged "
                                "retraining, as a fraction of the stage's update norm."),
    out: Optional[Path] = typer.Option(None, help="Write validation.json, summary.md, a plot and report.html here (default: RUN/validation)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    options=None,  # from the aa-curvature flags (with_curvature_knob)
) -> None:
    """Compare estimators with the ground truth: retraining the pipeline without each stage (or data source)."""
    import stagecredit as sc
    from stagecredit.cli.loading import load_behaviour, load_pipeline
    from stagecredit.reports.html import write_report
    from stagecredit.reports.plots import scatter_plot
    from stagecredit.reports.tables import validation_tables

    pipe = load_pipeline(pipeline)
    if not (run / "run.json").exists():
        console.print(f"No recorded run in {run}: recording it from {pipeline} first.")
        loaded = pipe.run(run, progress=progress, resume=True)  # an interrupted recording there is finished
    else:
        loaded = sc.Run.load(run, pipeline=pipe)
    behaviour = load_behaviour(eval, pipe)
    ceilings = {"epsilon": epsilon, "nudge": nudge} if ceilings else False
    if sources:
        report = sc.validate_sources(loaded, behaviour, methods=methods, curvature=options, ceilings=ceilings,
                                     progress=progress)
    else:
        report = sc.validate(loaded, behaviour, methods=methods, curvature=options, ceilings=ceilings,
                             progress=progress)
    out = out or run / "validation"
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / "validation.json")
    tables = validation_tables(report)
    plot = scatter_plot(out / "estimate_vs_retrain.png", report.truth, report.attributions, "behaviour units")
    write_report(out, f"stagecredit — validation against retraining: {report.behaviour}", [*tables, plot])
    for table in tables:
        table.print(console)
    console.print(f"Wrote {out / 'validation.json'}, {out / 'summary.md'}, {plot}, {out / 'report.html'}")


@app.command()
@friendly_errors
@with_curvature_knob
def intervene(
    run: Path = typer.Argument(..., help="Folder of a recorded run."),
    splits: str = typer.Option(..., help="'module:function' (or 'file.py:function') returning a "
                               "stagecredit.RepairSplits: validation and test sets with a group label per example."),
    pipeline: Optional[str] = typer.Option(None, help=PIPELINE_HELP + " Needed for re-runs and aa-curvature."),
    stage: Optional[str] = typer.Option(None, help="Repair this stage (default: the one the estimators blame)."),
    source: Optional[str] = typer.Option(None, help="Repair this data source of the stage (default: the blamed one)."),
    method: str = typer.Option("aa", help="Stage estimator for blame and the stage edit: delta | aa | aa-curvature."),
    source_method: str = typer.Option("aa-curvature", help="Source estimator for blame and the source edit."),
    alphas: List[float] = typer.Option(list(DEFAULT_ALPHAS), "--alpha",
                                       help="Edit strengths α to try on validation (repeat the option)."),
    rerun_weight: float = typer.Option(0.0, min=0.0, help="Targeted re-run: the blamed source's weight (0 removes it)."),
    max_accuracy_drop: float = typer.Option(0.02, min=0.0, max=1.0,
                                            help="Largest validation accuracy loss (fraction) a fix may cost."),
    retrain: bool = typer.Option(True, help="Also run the re-run fixes (targeted re-run, drop stage); needs --pipeline."),
    out: Optional[Path] = typer.Option(None, help="Write checkpoints, interventions.json, summary.md, repair.png and "
                                       "report.html here (default: RUN/repair)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    options=None,  # from the aa-curvature flags (with_curvature_knob)
) -> None:
    """Repair the blamed stage: edit θ_T − α·e_k, edit by the blamed source, re-run without it, or drop the stage.

    Every fix is measured on the test split (worst-group and average accuracy, compute); α and the
    recommended fix are chosen on the validation split. The recommended model is written as
    repaired.safetensors, every candidate beside it.
    """
    import stagecredit as sc
    from stagecredit.cli.loading import load_pipeline, load_splits
    from stagecredit.reports.html import write_report
    from stagecredit.reports.plots import intervention_plot

    pipe = load_pipeline(pipeline) if pipeline else None
    if retrain and pipe is None:
        raise ValueError("re-running stages needs --pipeline (or pass --no-retrain to try the edits only)")
    loaded = sc.Run.load(run, pipeline=pipe)
    out = out or run / "repair"
    report = sc.intervene(loaded, load_splits(splits), stage=stage, source=source, method=method,
                          source_method=source_method, curvature=options, alphas=alphas,
                          rerun_weight=rerun_weight, max_accuracy_drop=max_accuracy_drop, retrain=retrain, out=out,
                          progress=progress)
    table = report.table()
    plot = intervention_plot(out / "repair.png", report)
    write_report(out, f"stagecredit — repair of stage '{report.stage}'", [table, plot])
    table.print(console)
    console.print(f"Recommended: {report.recommended}. Wrote {out / 'repaired.safetensors'}, "
                  f"{out / 'interventions.json'}, {out / 'summary.md'}, {plot}, {out / 'report.html'}")


@app.command()
@friendly_errors
def report(
    folder: Path = typer.Argument(..., help="A folder written by 'demo', 'attribute' or 'validate'."),
) -> None:
    """Print the summary of results already written (summary.md) without recomputing anything."""
    summary = folder / "summary.md"
    if not summary.is_file():
        raise ValueError(f"no summary.md in {folder}; run 'stagecredit demo', 'attribute' or 'validate' first")
    from rich.markdown import Markdown

    console.print(Markdown(summary.read_text()))


def main() -> None:  # pragma: no cover
    app(prog_name="stagecredit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
