"""Cases where an estimator must equal retraining (or an identity) to float precision."""

import numpy as np
import pytest
import torch

import stagecredit as sc
from conftest import SGD_ADAMW_SCHEDULES, ce_loss, make_mlp, toy_data, zero_loss


def _pipeline_with_linear_later_stages(first_opt, later_opts, carry=False):
    X, y = toy_data()
    stages = [sc.Stage("s1", (X, y), ce_loss, first_opt, steps=20, batch_size=16, seed=1)]
    for i, (opt, sched) in enumerate(later_opts, start=2):
        stages.append(sc.Stage(f"s{i}", (X, y), zero_loss, opt, steps=17, batch_size=16, seed=i, scheduler=sched,
                               carry_optimizer_state=carry))
    return sc.Pipeline(make_mlp, stages)


@pytest.mark.parametrize("name", sorted(SGD_ADAMW_SCHEDULES))
def test_aa_model_mode_equals_retraining_when_later_stages_are_linear(tmp_path, toy_behaviour, name):
    first, later = SGD_ADAMW_SCHEDULES[name]
    run = _pipeline_with_linear_later_stages(first, later).run(tmp_path / "run", progress=False)
    est = sc.attribute(run, toy_behaviour, method="aa", mode="model")
    truth = sc.retrain_effects(run, toy_behaviour, progress=False)
    assert np.abs(truth.effects).max() > 1e-3  # the stages do matter, so equality is informative
    np.testing.assert_allclose(est.effects, truth.effects, atol=2e-5, rtol=1e-4)
    for k in range(run.num_stages):
        for name_, e in est.embedding(k).items():
            torch.testing.assert_close(e, truth.embedding(k)[name_], atol=2e-6, rtol=1e-4)


def test_aa_model_mode_exact_with_optimizer_state_carried_across_stages(tmp_path, toy_behaviour):
    sgd = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.02)  # noqa: E731
    run = _pipeline_with_linear_later_stages(sgd, [(sgd, None), (sgd, None)], carry=True).run(tmp_path / "r", progress=False)
    est = sc.attribute(run, toy_behaviour, method="aa", mode="model")
    truth = sc.retrain_effects(run, toy_behaviour, progress=False)
    np.testing.assert_allclose(est.effects, truth.effects, atol=2e-5, rtol=1e-4)
    # delta ignores the carried momentum and must be visibly off, so the test can tell them apart
    delta = sc.attribute(run, toy_behaviour, method="delta", mode="model")
    assert np.abs(delta.effects - truth.effects).max() > 1e-3


@pytest.mark.filterwarnings("ignore::stagecredit.GGNFallbackWarning")  # later losses are linear: no GGN
def test_aa_leaves_a_frozen_layer_alone_even_with_its_momentum_carried_in(tmp_path, toy_behaviour):
    """Stage 3 carries stage 2's momentum but freezes the first layer: torch skips it, buffer and all."""
    from conftest import _with_frozen_first_layer

    sgd = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.02)  # noqa: E731
    frozen = lambda p: _with_frozen_first_layer(p, True, sgd)  # noqa: E731
    trained = lambda p: _with_frozen_first_layer(p, False, sgd)  # noqa: E731
    run = _pipeline_with_linear_later_stages(trained, [(trained, None), (frozen, None)], carry=True).run(
        tmp_path / "r", progress=False)
    truth = sc.retrain_effects(run, toy_behaviour, progress=False)
    assert np.abs(truth.effects).max() > 1e-3
    for method in ("aa", "aa-curvature"):
        est = sc.attribute(run, toy_behaviour, method=method, mode="model", progress=False)
        np.testing.assert_allclose(est.effects, truth.effects, atol=2e-5, rtol=1e-4)


def test_delta_linear_telescopes_to_total_change(toy_run, toy_behaviour):
    att = sc.attribute(toy_run, toy_behaviour, method="delta", mode="linear")
    model = toy_run.build_model()
    total = {n: toy_run.parameters(toy_run.num_stages)[n] - toy_run.parameters(0)[n] for n in toy_run.parameter_names}
    from stagecredit.behaviours.evaluate import behaviour_jvp

    _, expected = behaviour_jvp(model, toy_behaviour, dict(model.named_parameters()), total)
    np.testing.assert_allclose(att.effects.sum(axis=0), expected.double().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["delta", "aa"])
def test_last_stage_model_mode_equals_retraining(toy_run, toy_behaviour, method):
    est = sc.attribute(toy_run, toy_behaviour, method=method, mode="model")
    truth = sc.retrain_effects(toy_run, toy_behaviour, progress=False)
    assert np.abs(truth.effects[-1]).max() > 1e-3
    np.testing.assert_allclose(est.effects[-1], truth.effects[-1], atol=1e-6)


def test_linear_mode_matches_finite_difference(toy_run, toy_behaviour):
    """The JVP is ∇f·e_k: compare with a central difference along e_k."""
    att = sc.attribute(toy_run, toy_behaviour, method="aa", mode="linear")
    from stagecredit.behaviours.evaluate import behaviour_at

    model = toy_run.build_model()
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    model.double()
    behaviour = sc.PerExampleLoss(tuple(t.double() if t.is_floating_point() else t for t in toy_behaviour.data))
    for k in range(toy_run.num_stages):
        e = {n: v.double() for n, v in att.embedding(k).items()}
        h = 1e-4
        plus = behaviour_at(model, behaviour, {n: params[n] + h * e[n] for n in params})
        minus = behaviour_at(model, behaviour, {n: params[n] - h * e[n] for n in params})
        np.testing.assert_allclose(att.effects[k], ((plus - minus) / (2 * h)).numpy(), rtol=1e-3, atol=1e-5)
