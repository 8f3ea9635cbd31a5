"""Real retraining on small pipelines: the estimators against the ground truth."""

import json

import numpy as np
import pytest

import stagecredit as sc


def test_validate_rows_and_truth(toy_run, toy_behaviour):
    report = sc.validate(toy_run, toy_behaviour, methods=["delta", "aa"], progress=False)
    assert len(report.rows) == 3 * 2 * 2
    keys = {"stage", "method", "mode", "pearson", "spearman", "sign_agreement", "seconds", "retrain_seconds"}
    assert keys <= set(report.rows[0])
    by = {(r["stage"], r["method"], r["mode"]): r for r in report.rows}
    # nothing runs after the last stage: model mode is retraining itself
    assert by[("adapt", "aa", "model")]["pearson"] == pytest.approx(1.0, abs=1e-9)
    assert by[("adapt", "aa", "model")]["relative_error"] < 1e-5
    # linear mode on the last stage is a first-order Taylor step: close but not exact
    assert by[("adapt", "aa", "linear")]["pearson"] > 0.9
    # retraining really ran: skipping an early stage costs time and changes the behaviour
    assert report.truth.seconds[0] > 0 and np.abs(report.truth.effects[0]).max() > 1e-3
    # the truth is a genuine counterfactual: skipping stage 1 differs from the final model
    assert not np.allclose(report.truth.effects[0], 0)


def test_retrain_effects_are_deterministic(toy_run, toy_behaviour, tmp_path):
    first = sc.retrain_effects(toy_run, toy_behaviour, progress=False)
    fresh = sc.Run.load(toy_run.path, pipeline=toy_run.pipeline)  # no cached counterfactuals
    second = sc.retrain_effects(fresh, toy_behaviour, progress=False)
    np.testing.assert_array_equal(first.effects, second.effects)


def test_group_mean_effect_is_mean_of_per_example_effects(toy_run, toy_behaviour):
    groups = np.arange(len(toy_behaviour)) % 3
    grouped = sc.GroupMean(toy_behaviour, groups, ["a", "b", "c"])
    per_example = sc.attribute(toy_run, toy_behaviour, method="aa", mode="linear")
    per_group = sc.attribute(toy_run, grouped, method="aa", mode="linear")
    expected = np.stack([per_example.effects[:, groups == g].mean(1) for g in range(3)], axis=1)
    np.testing.assert_allclose(per_group.effects, expected, rtol=1e-5, atol=1e-7)


def test_validation_report_json(toy_run, toy_behaviour, tmp_path):
    report = sc.validate(toy_run, toy_behaviour, methods=["aa"], modes=["model"], progress=False)
    report.to_json(tmp_path / "v.json")
    data = json.loads((tmp_path / "v.json").read_text())
    assert "blame" in data["sign_convention"] and len(data["rows"]) == 3
    assert data["rows"][2]["pearson"] == pytest.approx(1.0)


def _check_demo_outputs(out, results):
    for name in ("results.json", "summary.md", "report.html", "effects_by_group.png", "estimate_vs_retrain.png",
                 "repair.png", "repair/repaired.safetensors", "repair/interventions.json"):
        assert (out / name).is_file(), name
    assert (out / "effects_by_group.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html and "src='http" not in html
    assert "Repair of stage" in html and "Effect of each data source" in html
    saved = json.loads((out / "results.json").read_text())
    assert saved["headline"] == results["headline"]
    assert saved["stages"] == ["pretrain", "finetune", "adapt"]
    rows = {(r["stage"], r["method"], r["mode"]): r for r in saved["validation"]["rows"]}
    assert rows[("adapt", "aa", "model")]["pearson"] == pytest.approx(1.0, abs=1e-9)
    return saved


def test_demo_small_scale_tells_the_story(tmp_path):
    from stagecredit.demos.report import run_mnist_demo

    out = tmp_path / "demo"
    results = run_mnist_demo(out, scale=0.5, progress=False)
    saved = _check_demo_outputs(out, results)
    disagrees = saved["groups"].index("cue disagrees")
    truth = np.array(saved["group_effects"]["retrain"])
    assert saved["stages"][int(np.argmax(truth[:, disagrees]))] == "adapt"
    assert truth[2, disagrees] > 0  # blame, measured by retraining
    assert "Stage 'adapt' is to blame for the 'cue disagrees' group" in saved["headline"]


@pytest.mark.slow
def test_demo_full_scale(tmp_path):
    from stagecredit.demos.report import run_mnist_demo

    out = tmp_path / "demo"
    results = run_mnist_demo(out, scale=1.0, progress=False)
    saved = _check_demo_outputs(out, results)
    assert "Stage 'adapt' is to blame for the 'cue disagrees' group" in saved["headline"]
    assert saved["seconds"]["total"] < 300
    # the repair acceptance: the injected stage and source are blamed, the worst group rises, average holds
    repair = saved["repair"]
    assert (repair["stage"], repair["source"]) == ("adapt", "patched")
    by = {i["name"]: i["test"] for i in repair["interventions"]}
    before = by["do nothing"]
    for name in ("targeted re-run", "stage edit", repair["recommended"]):
        assert by[name]["worst_group"] > before["worst_group"] + 0.05, name
        assert by[name]["accuracy"] > before["accuracy"] - 0.02, name
    labels = saved["sources"]["labels"]
    truth = np.array(saved["sources"]["group_effects"]["retrain"])
    assert labels[int(np.argmax(truth[:, saved["groups"].index("cue disagrees")]))] == "adapt/patched"
