"""The truth's ceilings: reproducibility and linearity of retraining, measured by two more retrainings."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import stagecredit as sc
from stagecredit.cli.main import app
from stagecredit.validation.ceilings import nudged_removal_start, partial_removal_start
from stagecredit.validation.retrain import removal_start
from conftest import toy_data
from typer.testing import CliRunner


def _affine_run(tmp_path):
    """Linear regression, squared error, SGD: the end of training is an affine function of where a stage starts."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(64, 6, generator=g), torch.randn(64, 2, generator=g)
    mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(1)  # noqa: E731
    stages = [
        sc.Stage("a", (X, Y), mse, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), steps=20, batch_size=16, seed=1),
        sc.Stage("b", (X, Y), mse, lambda p: torch.optim.SGD(p, lr=0.03, momentum=0.8, weight_decay=0.01), steps=16,
                 batch_size=16, seed=2),
        sc.Stage("c", (X, Y), mse, lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.5), steps=12, batch_size=16,
                 seed=3, carry_optimizer_state=True),
    ]
    run = sc.Pipeline(lambda: torch.nn.Linear(6, 2), stages).run(tmp_path / "affine", progress=False)
    prediction = sc.PerExampleLoss((X[:30], Y[:30]), lambda m, b: m(b[0])[:, 0], name="first output")
    return run, prediction


def test_affine_training_is_perfectly_linear_and_reproducible(tmp_path):
    run, prediction = _affine_run(tmp_path)
    truth = sc.retrain_effects(run, prediction, progress=False)
    ceilings = sc.truth_ceilings(run, prediction, epsilon=0.05, truth=truth, progress=False)
    # an affine map from start to end, and a behaviour linear in θ: the scaled partial removal is the full one
    np.testing.assert_allclose(ceilings.derivative.effects, truth.effects, rtol=1e-3, atol=1e-4)
    assert np.all(ceilings.linearity > 0.9999)
    assert np.all(ceilings.reproducibility > 0.99) and np.all(ceilings.ceiling <= 1.0)
    assert ceilings.readings()[:2] == ["first order applies"] * 2
    assert ceilings.readings()[2].startswith("model mode is exact here")
    # and the exact replay, a first-order estimate, matches that derivative
    est = sc.attribute(run, prediction, "aa-curvature", "linear", curvature=sc.CurvatureOptions.exact(), progress=False)
    for k in range(3):
        assert np.corrcoef(est.effects[k], ceilings.derivative.effects[k])[0, 1] > 0.9999


def test_partial_removal_interpolates_towards_the_full_removal_including_carried_state(tmp_path):
    run, _ = _affine_run(tmp_path)
    start, carried, carried_from = removal_start(run, 2)  # stage c carries SGD momentum: from a's end without b
    assert carried is not None and carried_from == "torch.optim.sgd.SGD"
    full, full_state, _ = partial_removal_start(run, 2, 1.0)
    for n in start:
        torch.testing.assert_close(full[n], start[n])
    for key in carried:
        torch.testing.assert_close(full_state[key], carried[key])
    none, none_state, _ = partial_removal_start(run, 2, 0.0)
    recorded = run.optimizer_state(2)
    for key in recorded:
        torch.testing.assert_close(none_state[key], recorded[key])
    for n, t in run.checkpoint(2).items():
        torch.testing.assert_close(none[n], t)


def test_nudge_has_the_requested_size_and_is_reproducible(tmp_path):
    run, _ = _affine_run(tmp_path)
    start, _, _ = removal_start(run, 2)
    nudged, _, _ = nudged_removal_start(run, 2, 0.01)
    again, _, _ = nudged_removal_start(run, 2, 0.01)
    delta = torch.sqrt(sum(((run.checkpoint(2)[n] - run.checkpoint(1)[n]) ** 2).sum() for n in run.parameter_names))
    size = torch.sqrt(sum(((nudged[n] - start[n]) ** 2).sum() for n in run.parameter_names))
    assert float(size) == pytest.approx(0.01 * float(delta), rel=1e-4)
    for n in nudged:
        assert torch.equal(nudged[n], again[n])


def test_validate_with_ceilings_adds_rows_json_and_a_table(tmp_path):
    run, prediction = _affine_run(tmp_path)
    report = sc.validate(run, prediction, methods=["aa"], modes=["linear"], ceilings=True, progress=False)
    assert {"pearson_derivative", "reproducibility", "ceiling", "linearity"} <= set(report.rows[0])
    data = report.to_dict()
    assert [s["stage"] for s in data["ceilings"]["stages"]] == ["a", "b", "c"]
    assert "How well any estimate can agree with retraining" in report.to_markdown()
    with pytest.raises(ValueError, match="'epsilon' and 'nudge'"):
        sc.validate(run, prediction, methods=["aa"], modes=["linear"], ceilings={"eps": 0.1}, progress=False)
    wide = sc.validate(run, prediction, methods=["aa"], modes=["linear"], ceilings={"epsilon": 0.2}, progress=False)
    assert wide.ceilings.epsilon == 0.2
    plain = sc.validate(run, prediction, methods=["aa"], modes=["linear"], progress=False)
    assert plain.ceilings is None and "ceilings" not in plain.to_dict() and "ceiling" not in plain.rows[0]


def test_readings_say_which_limit_binds():
    from stagecredit.validation.ceilings import TruthCeilings

    ceilings = TruthCeilings(["a", "b", "c", "d"], np.array([0.99, 0.99, 0.64, 0.64]),
                             np.array([0.95, 0.4, 0.95, 0.3]), None, 0.01, 0.01)
    first, nonlinear, noisy, both = ceilings.readings()
    assert first == "first order applies" and "beyond first order" in nonlinear and "sensitive" not in nonlinear
    assert "sensitive to its start" in noisy and "0.80" in noisy and "beyond" not in noisy
    assert "sensitive to its start" in both and "beyond first order" in both


def test_bad_ceiling_settings_are_refused(toy_run, toy_behaviour):
    with pytest.raises(ValueError, match="epsilon"):
        sc.truth_ceilings(toy_run, toy_behaviour, epsilon=0.0)
    for nudge in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="nudge"):
            sc.truth_ceilings(toy_run, toy_behaviour, nudge=nudge)
    truth = sc.retrain_effects(toy_run, toy_behaviour, progress=False)
    with pytest.raises(ValueError, match="truth has rows"):
        sc.truth_ceilings(toy_run, toy_behaviour, truth=dataclasses.replace(truth, stages=["a", "b", "c"]))


def test_every_nudged_retraining_really_starts_elsewhere(tmp_path):
    """A nudge that was never applied would give reproducibility 1 and pass every other check."""
    from test_sources import linear_score_loss, sourced_pipeline

    from stagecredit.validation.retrain import skipped_stage_model, without_source_model

    run, prediction = _affine_run(tmp_path)
    sc.truth_ceilings(run, prediction, progress=False)
    for k in (1, 2, 3):
        nudged, removed = run._cache[("ceiling", "nudged", k, None, 0.01)][0], skipped_stage_model(run, k)
        assert any(not torch.equal(nudged[n], removed[n]) for n in run.parameter_names)
    sourced = sourced_pipeline().run(tmp_path / "sourced", progress=False)
    sc.truth_ceilings(sourced, sc.PerExampleLoss(toy_data(30, seed=5), linear_score_loss), sources=True,
                      progress=False)
    for k, source in [(1, "web"), (2, "odd")]:
        nudged = sourced._cache[("ceiling", "nudged", k, source, 0.01)][0]
        removed = without_source_model(sourced, k, source)
        assert any(not torch.equal(nudged[n], removed[n]) for n in sourced.parameter_names)


def test_cli_validate_ceilings(tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    args = ["validate", str(run), "--pipeline", "conftest:three_stage_pipeline", "--eval", "conftest:toy_eval",
            "--method", "aa", "--no-progress"]
    result = runner.invoke(app, args + ["--ceilings", "--ceiling-epsilon", "0.05"])
    assert result.exit_code == 0, result.output
    assert "reproducibility" in result.output
    data = json.loads((run / "validation" / "validation.json").read_text())
    assert len(data["ceilings"]["stages"]) == 3 and "pearson_derivative" in data["rows"][0]
    assert data["ceilings"]["epsilon"] == 0.05 and data["ceilings"]["nudge"] == 0.01
    result = runner.invoke(app, args + ["--ceilings", "--ceiling-nudge", "0"])
    assert result.exit_code == 2 and "nudge" in result.output
    assert "How well any estimate" in (run / "validation" / "summary.md").read_text()


def test_source_ceilings_when_training_is_linear(tmp_path):
    """H = 0 training and a behaviour linear in θ: removing 5% of a source, scaled, is removing all of it."""
    from test_sources import linear_score_loss, sourced_pipeline

    run = sourced_pipeline().run(tmp_path / "run", progress=False)
    logit = sc.PerExampleLoss(toy_data(30, seed=5), linear_score_loss, name="−logit of the label")
    report = sc.validate_sources(run, logit, methods=["aa"], modes=["linear"], ceilings=True, progress=False)
    ceilings = report.ceilings
    assert ceilings.stages == ["first/web", "first/curated", "second/plain", "second/odd"]
    assert np.abs(report.truth.effects).max() > 1e-3
    np.testing.assert_allclose(ceilings.derivative.effects, report.truth.effects, rtol=1e-3, atol=2e-4)
    assert np.all(ceilings.linearity > 0.9999) and np.all(ceilings.reproducibility > 0.99)
    # aa is exact here, so it matches the scaled partial removal too
    assert all(r["pearson_derivative"] > 0.9999 for r in report.rows)
