"""Interventions on a pipeline whose shortcut comes, by construction, from one source of one stage.

8×8 digits with ten extra 'stamp' inputs: they are zero everywhere except in the
'stamped' source of the last stage, where a one-hot stamp gives away the label
on 95% of the examples. Validation and test images carry a stamp that agrees
with the label on half of them and points at another class on the other half.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import stagecredit as sc
from stagecredit.cli.main import app

GROUPS = ["stamp agrees", "stamp disagrees"]


def _stamp(x, cls):
    stamp = torch.zeros(len(x), 10) if cls is None else 3.0 * torch.nn.functional.one_hot(cls, 10).float()
    return torch.cat([x, stamp], dim=1)


def stamped_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(digits.target), generator=g)
    X = torch.tensor(digits.data, dtype=torch.float32)[order] / 16.0
    y = torch.tensor(digits.target)[order]
    other = lambda labels: (labels + torch.randint(1, 10, labels.shape, generator=g)) % 10  # noqa: E731
    agrees = torch.rand(250, generator=g) < 0.95
    stamped = (_stamp(X[1150:1400], torch.where(agrees, y[1150:1400], other(y[1150:1400]))), y[1150:1400])

    def split(a, b):
        groups = torch.arange(b - a) % 2
        return sc.GroupedSplit((_stamp(X[a:b], torch.where(groups == 0, y[a:b], other(y[a:b]))), y[a:b]), groups)

    return {
        "pretrain": (_stamp(X[:600], None), y[:600]),
        "finetune": (_stamp(X[600:900], None), y[600:900]),
        "adapt": {"plain": (_stamp(X[900:1150], None), y[900:1150]), "stamped": stamped},
        "splits": sc.RepairSplits(split(1400, 1600), split(1600, 1797), GROUPS, loss_fn=per_example_ce),
    }


def per_example_ce(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def make_model():
    return torch.nn.Sequential(torch.nn.Linear(74, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def stamped_pipeline():
    data = stamped_digits()
    return sc.Pipeline(make_model, [
        sc.Stage("pretrain", data["pretrain"], per_example_ce, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                 steps=150, batch_size=32, seed=1),
        sc.Stage("finetune", data["finetune"], per_example_ce,
                 lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01), steps=60, batch_size=32, seed=2),
        sc.Stage("adapt", data["adapt"], per_example_ce, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                 steps=150, batch_size=32, seed=3),
    ])


def repair_splits():
    return stamped_digits()["splits"]


@pytest.fixture(scope="module")
def stamped_run(tmp_path_factory):
    return stamped_pipeline().run(tmp_path_factory.mktemp("stamped") / "run", progress=False)


@pytest.fixture(scope="module")
def repair(stamped_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("repair")
    return sc.intervene(stamped_run, repair_splits(), out=out, progress=False), out


def test_blame_falls_on_the_injected_stage_and_source(repair):
    report, _ = repair
    assert (report.stage, report.source) == ("adapt", "stamped")
    assert report.blame["worst_validation_group"] == "stamp disagrees"
    effects = report.blame["source_effects"]
    assert effects["adapt/stamped"] > effects["adapt/plain"]


def test_targeted_rerun_lifts_the_worst_group_and_keeps_average_accuracy(repair):
    report, _ = repair
    before, rerun = report.get("do nothing").test, report.get("targeted re-run").test
    assert rerun.worst_group > before.worst_group + 0.03
    assert rerun.accuracy > before.accuracy - 0.02
    assert report.get("targeted re-run").optimizer_steps == 150  # the adapt stage, re-run without the source
    assert report.get("drop stage, retrain").optimizer_steps == 0  # the last stage: dropping it trains nothing
    edit = report.get("stage edit")
    assert edit.alpha in (0.0, *sc.repair.intervene.DEFAULT_ALPHAS)
    assert edit.validation.accuracy >= report.get("do nothing").validation.accuracy - 0.02 - 1e-9


def test_written_checkpoints_hold_what_was_measured(repair, stamped_run):
    report, out = repair
    written = json.loads((out / "interventions.json").read_text())
    assert written["recommended"] == report.recommended and written["source"] == "stamped"
    # the stage estimator (aa) has no settings; the source estimator (aa-curvature) took the default options
    assert written["settings"] == {"aa-curvature": {"curvature_options": sc.CurvatureOptions().to_dict()}}
    splits = repair_splits()
    for item in report.interventions:
        if item.checkpoint is None:
            continue
        model = make_model()
        model.load_state_dict(load_file(out / item.checkpoint))
        with torch.no_grad():
            correct = (model(splits.test.data[0]).argmax(1) == splits.test.data[1]).float()
        assert float(correct.mean()) == pytest.approx(item.test.accuracy, abs=1e-6)
    assert (out / "repaired.safetensors").is_file()


def test_alpha_choice_respects_the_accuracy_limit():
    from stagecredit.repair.intervene import GroupScores, choose_alpha

    base = GroupScores(0.90, [0.95, 0.80])
    scores = {0.0: base, 0.5: GroupScores(0.89, [0.93, 0.85]), 1.0: GroupScores(0.85, [0.88, 0.90])}
    assert choose_alpha(scores, base, 0.02) == 0.5
    assert choose_alpha(scores, base, 0.10) == 1.0
    assert choose_alpha({0.0: base, 1.0: GroupScores(0.5, [0.5, 0.5])}, base, 0.02) == 0.0


def test_intervene_cli_writes_the_report(stamped_run, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["intervene", str(stamped_run.path), "--splits", f"{__file__}:repair_splits",
                                      "--pipeline", f"{__file__}:stamped_pipeline", "--out", str(out),
                                      "--krylov-dim", "4", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "targeted re-run" in result.output
    # the knob reaches the source estimator, and the report says so
    written = json.loads((out / "interventions.json").read_text())["settings"]["aa-curvature"]
    assert written["curvature_options"] == sc.CurvatureOptions(krylov_dim=4).to_dict()
    for name in ("repaired.safetensors", "interventions.json", "summary.md", "report.html", "repair.png"):
        assert (out / name).is_file(), name
    assert "Δ worst" in (out / "summary.md").read_text()
    missing = CliRunner().invoke(app, ["intervene", str(stamped_run.path), "--splits", f"{__file__}:repair_splits"])
    assert missing.exit_code == 2 and "--pipeline" in missing.output


def test_source_estimates_rank_the_stamped_source_like_retraining(stamped_run):
    splits = repair_splits()
    behaviour = sc.group_loss(splits.test.data, splits.test.groups, per_example_ce)
    truth = sc.retrain_source_effects(stamped_run, behaviour, progress=False)
    est = sc.attribute_sources(stamped_run, behaviour, method="aa-curvature")
    worst = GROUPS.index("stamp disagrees")
    assert np.argmax(truth.effects[:, worst]) == np.argmax(est.effects[:, worst]) == truth.stages.index("adapt/stamped")


def test_intervene_without_sources_or_pipeline(toy_run, tmp_path):
    from conftest import toy_data

    X, y = toy_data(200, seed=3)
    groups = (X[:, 3] > 0).long()
    splits = sc.RepairSplits(sc.GroupedSplit((X[:100], y[:100]), groups[:100]),
                             sc.GroupedSplit((X[100:], y[100:]), groups[100:]), ["low", "high"])
    report = sc.intervene(toy_run, splits, progress=False)
    assert report.source is None and report.blame["source_effects"] == {}
    assert [i.name for i in report.interventions] == ["do nothing", "stage edit", "drop stage, retrain"]
    loaded = sc.Run.load(toy_run.path)
    with pytest.raises(RuntimeError, match="retrain=False"):
        sc.intervene(loaded, splits, progress=False)
    edits_only = sc.intervene(loaded, splits, retrain=False, progress=False)
    assert [i.name for i in edits_only.interventions] == ["do nothing", "stage edit"]
    with pytest.raises(ValueError, match="no data source"):
        sc.intervene(toy_run, splits, stage="adapt", source="web", progress=False)


def test_cli_attributes_and_validates_sources(stamped_run, tmp_path):
    evaluation = f"{__file__}:stamped_test_split"
    result = CliRunner().invoke(app, ["attribute", str(stamped_run.path), "--eval", evaluation, "--sources",
                                      "--pipeline", f"{__file__}:stamped_pipeline", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "a" / "attribution.json").read_text())
    assert saved["stages"] == ["adapt/plain", "adapt/stamped"] and "source j in stage k" in saved["sign_convention"]
    result = CliRunner().invoke(app, ["validate", str(stamped_run.path), "--eval", evaluation, "--sources",
                                      "--pipeline", f"{__file__}:stamped_pipeline", "--method", "aa", "--ceilings",
                                      "--out", str(tmp_path / "v"), "--no-progress"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert {r["stage"] for r in saved["rows"]} == {"adapt/plain", "adapt/stamped"}
    assert [c["stage"] for c in saved["ceilings"]["stages"]] == ["adapt/plain", "adapt/stamped"]
    assert "stage/source" in (tmp_path / "v" / "summary.md").read_text()


def stamped_test_split():
    """The stamped test split as an evaluation dataset (for the CLI test above)."""
    return repair_splits().test.data
