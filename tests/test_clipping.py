"""Gradient clipping: recorded per step, and kept by aa-curvature's replay and segments."""

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import stagecredit as sc
import stagecredit.estimators.curvature_propagation as curvature_propagation
from conftest import quadratic_run, recorded_loop, three_stage_pipeline
from stagecredit.estimators.curvature_propagation import CurvatureOptions as C

LATER = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.03, momentum=0.8, nesterov=True, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1),
}


def _clipped_quadratic_run(tmp_path, later, max_grad_norm=1.0, batch_size=16):
    """The quadratic model of the exactness tests, stage b run by ``later``; stages b and c clip their gradients."""
    return quadratic_run(tmp_path, batch_size=batch_size, b_optimizer=later, max_grad_norm=max_grad_norm)


def _ignoring_clipping(run, monkeypatch):
    """The same run, reloaded, with aa-curvature told that no stage clipped (what it did before clipping was kept)."""
    monkeypatch.setattr(curvature_propagation, "clip_coefficients", lambda run, k: None)
    return sc.Run.load(run.path, pipeline=run.pipeline)


def test_clipping_is_recorded_per_step(tmp_path):
    run, _ = _clipped_quadratic_run(tmp_path, LATER["sgd"])
    assert run.stage_records[0].max_grad_norm is None and "grad_norm" not in run.steps(1)[0]
    assert run.stage_records[1].max_grad_norm == 1.0
    norms = [s["grad_norm"] for k in (2, 3) for s in run.steps(k)]
    assert len(norms) == 28 and min(norms) > 1.0  # every step was clipped, so the tests below depend on it
    with pytest.raises(ValueError, match="max_grad_norm"):
        sc.Stage("x", run.pipeline.stages[0].data, run.pipeline.stages[0].loss_fn, LATER["sgd"], steps=1,
                 batch_size=4, max_grad_norm=0)


def test_a_pipeline_that_clips_differently_does_not_match_the_run(tmp_path):
    run, _ = _clipped_quadratic_run(tmp_path, LATER["sgd"])
    unclipped = dataclasses.replace(run.pipeline, stages=[dataclasses.replace(s, max_grad_norm=None)
                                                         for s in run.pipeline.stages])
    with pytest.raises(ValueError, match="max_grad_norm=1.0 and the pipeline's stage has max_grad_norm=None"):
        sc.Run.load(run.path, pipeline=unclipped)


@pytest.mark.parametrize("later", sorted(LATER))
@pytest.mark.parametrize("batch_size", [16, 64])
def test_the_replay_of_clipped_stages_equals_retraining_on_a_quadratic_model(tmp_path, monkeypatch, later,
                                                                            batch_size):
    """Clipping is applied exactly to each tangent's counterfactual gradient, so a quadratic loss is replayed exactly.

    With batches of 16 the recorded run clips every step; with the full batch it clips none, but the run without
    stage a has larger gradients, which are clipped.
    """
    run, behaviour = _clipped_quadratic_run(tmp_path, LATER[later], batch_size=batch_size)
    truth = sc.retrain_effects(run, behaviour, progress=False)
    est = sc.attribute(run, behaviour, "aa-curvature", "model", curvature=C.exact("hessian"), progress=False)
    assert np.abs(truth.effects).max() > 0.5
    np.testing.assert_allclose(est.effects, truth.effects, atol=5e-5, rtol=1e-4)
    # the same replay without clipping is far off, so the equality above is informative
    ignored = sc.attribute(_ignoring_clipping(run, monkeypatch), behaviour, "aa-curvature", "model",
                           curvature=C.exact("hessian"), progress=False)
    assert np.abs(ignored.effects - truth.effects).max() > 0.04


@pytest.mark.parametrize("later", sorted(LATER))
def test_segments_scale_the_curvature_by_the_clip_factor(tmp_path, monkeypatch, later):
    """Segments linearise the clip around the recorded run (c·C): closer to retraining than without it.

    Through AdamW the counterfactual second moment also bounds the perturbed steps, and with it the clip's own
    share is small (max error 0.90 with the clip factors, 0.95 without), so the clip is tested with the recorded one.
    """
    run, behaviour = _clipped_quadratic_run(tmp_path, LATER[later])
    truth = sc.retrain_effects(run, behaviour, progress=False)
    options = C.segments(curvature="hessian", segment_steps=4, curvature_examples=1, krylov_dim=14,
                         counterfactual_adam=False)
    est = sc.attribute(run, behaviour, "aa-curvature", "model", curvature=options, progress=False)
    ignored = sc.attribute(_ignoring_clipping(run, monkeypatch), behaviour, "aa-curvature", "model",
                           curvature=options, progress=False)
    error, ignored_error = (np.abs(e.effects - truth.effects).max() for e in (est, ignored))
    assert error < 0.8 * ignored_error


def test_segments_with_a_clip_that_never_binds_are_the_unclipped_segments(tmp_path):
    loose, behaviour = _clipped_quadratic_run(tmp_path / "loose", LATER["sgd"], max_grad_norm=1e6)
    plain, _ = _clipped_quadratic_run(tmp_path / "plain", LATER["sgd"], max_grad_norm=None)
    for options in (C(), C.exact()):
        a, b = (sc.attribute(r, behaviour, "aa-curvature", "model", curvature=options, progress=False).effects
                for r in (loose, plain))
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("pass_norm", [True, False], ids=["norm passed", "norm measured"])
def test_recorder_records_the_same_clipping_as_the_pipeline(tmp_path, pass_norm):
    pipe = three_stage_pipeline()
    pipe.stages = [dataclasses.replace(s, max_grad_norm=0.5) for s in pipe.stages]
    piped = pipe.run(tmp_path / "pipeline", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the loop clips as declared: no warning
        looped = recorded_loop(pipe, tmp_path / "loop", max_grad_norm=0.5, pass_norm=pass_norm)
    clipped = 0
    for k in range(1, piped.num_stages + 1):
        assert looped.stage_records[k - 1].max_grad_norm == 0.5
        for a, b in zip(piped.steps(k), looped.steps(k)):
            assert a["groups"] == b["groups"]
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)
            clipped += a["grad_norm"] > 0.5
        assert all(torch.equal(t, looped.checkpoint(k)[n]) for n, t in piped.checkpoint(k).items())
    assert 0 < clipped < sum(piped.stage_records[k].steps for k in range(piped.num_stages))


def test_recorder_warns_when_the_loop_does_not_clip_as_declared(tmp_path):
    pipe = three_stage_pipeline()
    pipe.stages = [dataclasses.replace(s, max_grad_norm=0.5) for s in pipe.stages]
    with pytest.warns(UserWarning, match="does not clip as declared") as caught:
        recorded_loop(pipe, tmp_path / "loop", max_grad_norm=0.5, clip=False)
    # it names the loop's own line (the end of its `with rec.stage(...)` block), not stagecredit's internals
    assert {Path(w.filename).name for w in caught if "does not clip" in str(w.message)} == {"conftest.py"}
    model = pipe.model_fn()
    rec = sc.Recorder(tmp_path / "r", model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="open the stage with"):
        with rec.stage("s", optimizer):
            rec.batch([0, 1], grad_norm=1.0)


def test_a_clipped_stage_that_trains_some_parameters_replays_exactly(tmp_path):
    """Stage b steps the weight alone; the bias still has a gradient, which the clip counts, as torch does."""
    run, behaviour = _clipped_quadratic_run(tmp_path, lambda p: torch.optim.SGD(list(p)[:1], lr=0.03, momentum=0.8))
    truth = sc.retrain_effects(run, behaviour, progress=False)
    est = sc.attribute(run, behaviour, "aa-curvature", "model", curvature=C.exact("hessian"), progress=False)
    assert np.abs(truth.effects).max() > 0.5
    np.testing.assert_allclose(est.effects, truth.effects, atol=5e-5, rtol=1e-4)


def test_a_trainable_parameter_no_optimizer_holds_counts_in_the_clip(tmp_path):
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(64, 6, generator=g), torch.randn(64, 2, generator=g)
    mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(1)  # noqa: E731
    weight_only = lambda p: torch.optim.SGD(list(p)[:1], lr=0.03, momentum=0.8)  # noqa: E731
    stages = [sc.Stage(name, (X, Y), mse, weight_only, steps=10, batch_size=16, seed=seed, max_grad_norm=1.0)
              for name, seed in (("a", 1), ("b", 2))]
    run = sc.Pipeline(lambda: torch.nn.Linear(6, 2), stages).run(tmp_path / "r", progress=False)
    assert run.parameter_names == ["weight"]
    behaviour = sc.PerExampleLoss((X[:20], Y[:20]), mse)
    truth = sc.retrain_effects(run, behaviour, progress=False)
    est = sc.attribute(run, behaviour, "aa-curvature", "model", curvature=C.exact("hessian"), progress=False)
    # the bias never moves, so its gradient enters the clip unchanged only to first order: close, not exact
    np.testing.assert_allclose(est.effects, truth.effects, atol=0.05 * np.abs(truth.effects).max())


def _small_regression():
    torch.manual_seed(0)
    X, Y = torch.randn(64, 6), 5 * torch.randn(64, 2)
    return X, Y, torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def test_recorder_divides_the_measured_norm_by_the_loss_scale(tmp_path):
    X, Y, model = _small_regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    rec = sc.Recorder(tmp_path / "r", model, checkpoint_every=0)
    true = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with rec.stage("s", optimizer, max_grad_norm=0.5, grad_scaler=scaler):
            for step in range(5):
                optimizer.zero_grad()
                loss = ((model(X[:16]) - Y[:16]) ** 2).sum(1).mean()
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                true.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
                scaler.step(optimizer)
                scaler.update()
    run = rec.finish()
    assert min(true) > 0.5  # every step clipped
    assert [s["grad_norm"] for s in run.steps(1)] == pytest.approx(true, rel=1e-5)


def test_recorder_warns_and_records_no_norm_when_it_sees_none(tmp_path):
    """Gradients that never reach .grad through backward (e.g. sharded) leave no norm: a warning, not a lost stage."""
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = sc.Recorder(tmp_path / "r", model, checkpoint_every=0)
    with pytest.warns(UserWarning, match="no gradient norm before clipping was seen at 2 of its 2 steps"):
        with rec.stage("s", optimizer, max_grad_norm=1.0):
            for _ in range(2):
                for p in model.parameters():
                    p.grad = torch.ones_like(p)  # set, not accumulated by backward
                optimizer.step()
    run = rec.finish()
    assert run.stage_records[0].max_grad_norm == 1.0 and "grad_norm" not in run.steps(1)[0]


def test_recorder_measures_the_parameters_the_loop_clips(tmp_path):
    """A loop (or Lightning) that clips the optimizer's parameters only: clipped_parameters says so."""
    X, Y, model = _small_regression()
    head = list(model[2].parameters())
    optimizer = torch.optim.SGD(head, lr=0.01)  # the body stays trainable but is not stepped
    rec = sc.Recorder(tmp_path / "r", model, checkpoint_every=0)
    true = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with rec.stage("s", optimizer, max_grad_norm=0.5, clipped_parameters=head):
            for step in range(4):
                model.zero_grad()
                ((model(X[:16]) - Y[:16]) ** 2).sum(1).mean().backward()
                true.append(float(torch.nn.utils.clip_grad_norm_(head, 0.5)))
                optimizer.step()
    assert min(true) > 0.5
    assert [s["grad_norm"] for s in rec.finish().steps(1)] == pytest.approx(true, rel=1e-5)
