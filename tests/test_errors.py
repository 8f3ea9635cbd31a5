"""Clear errors instead of silent wrong numbers (DESIGN §5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stagecredit as sc
from conftest import ce_loss, make_mlp, three_stage_pipeline, toy_data
from stagecredit.behaviours.evaluate import behaviour_jvp
from stagecredit.estimators.attribute import MODES
from stagecredit.estimators.embedding import METHODS


def _rmsprop_pipeline():
    X, y = toy_data()
    return sc.Pipeline(make_mlp, [
        sc.Stage("sgd", (X, y), ce_loss, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), steps=8, batch_size=16,
                 seed=1),
        sc.Stage("rms", (X, y), ce_loss, lambda p: torch.optim.RMSprop(p, lr=0.01), steps=8, batch_size=16, seed=2),
        sc.Stage("last", (X, y), ce_loss, lambda p: torch.optim.SGD(p, lr=0.1), steps=8, batch_size=16, seed=3),
    ])


@pytest.fixture(scope="module")
def rmsprop_run(tmp_path_factory):
    return _rmsprop_pipeline().run(tmp_path_factory.mktemp("rms") / "run", progress=False)


@pytest.fixture(scope="module")
def loaded_toy_run(toy_run):
    return sc.Run.load(toy_run.path)  # no pipeline


@pytest.mark.parametrize("mode", ["linear", "model"])
def test_rmsprop_stage_is_refused_by_aa_naming_the_optimizer(rmsprop_run, toy_behaviour, mode):
    assert rmsprop_run.stage_records[1].optimizer_class == "torch.optim.rmsprop.RMSprop"
    with pytest.raises(sc.UnsupportedOptimizerError) as info:
        sc.attribute(rmsprop_run, toy_behaviour, method="aa", mode=mode)
    message = str(info.value)
    assert "RMSprop" in message
    assert "'rms'" in message  # which stage
    assert "method='delta' still works" in message
    assert isinstance(info.value, ValueError)


def test_delta_still_works_on_a_run_with_rmsprop(rmsprop_run, toy_behaviour):
    att = sc.attribute(rmsprop_run, toy_behaviour, method="delta", mode="linear")
    assert att.stages == ["sgd", "rms", "last"]
    assert att.effects.shape == (3, len(toy_behaviour))
    model = rmsprop_run.build_model()
    params = dict(model.named_parameters())
    for k in range(1, 4):
        delta = {n: rmsprop_run.parameters(k)[n] - rmsprop_run.parameters(k - 1)[n] for n in params}
        _, expected = behaviour_jvp(model, toy_behaviour, params, delta)
        np.testing.assert_allclose(att.effects[k - 1], expected.double().numpy(), rtol=1e-6, atol=1e-7)
    assert np.abs(att.effects[1]).max() > 1e-4  # the RMSprop stage really changed the model
    # and the embedding of the RMSprop stage is exactly its recorded change
    for name, value in att.embedding("rms").items():
        assert torch.equal(value, rmsprop_run.parameters(2)[name] - rmsprop_run.parameters(1)[name])


def test_retrain_effects_without_a_pipeline_says_how_to_load_one(loaded_toy_run, toy_behaviour):
    with pytest.raises(RuntimeError) as info:
        sc.retrain_effects(loaded_toy_run, toy_behaviour, progress=False)
    assert "pipeline=" in str(info.value)
    assert str(loaded_toy_run.path) in str(info.value)
    # estimators that need no retraining still work on the same loaded run
    att = sc.attribute(loaded_toy_run, toy_behaviour, method="delta", mode="model")
    assert att.effects.shape == (3, len(toy_behaviour)) and np.isfinite(att.effects).all()


@pytest.mark.parametrize("change", ["steps", "seed", "batch_size", "name", "missing stage"])
def test_loading_with_a_pipeline_that_does_not_match_raises(toy_run, change):
    pipe = three_stage_pipeline()
    if change == "missing stage":
        pipe.stages.pop()
    elif change == "name":
        pipe.stages[1].name = "other"
    else:
        setattr(pipe.stages[2], change, getattr(pipe.stages[2], change) + 1)
    with pytest.raises(ValueError) as info:
        sc.Run.load(toy_run.path, pipeline=pipe)
    assert "does not match" in str(info.value)
    # the matching pipeline is accepted and enables retraining
    ok = sc.Run.load(toy_run.path, pipeline=three_stage_pipeline())
    assert ok.pipeline.stages[2].steps == 12


def test_unknown_method_lists_the_valid_choices(toy_run, toy_behaviour):
    with pytest.raises(ValueError) as info:
        sc.attribute(toy_run, toy_behaviour, method="tracin", mode="linear")
    message = str(info.value)
    assert "'tracin'" in message
    assert {"delta", "aa"} <= set(METHODS)
    for method in METHODS:
        assert method in message


def test_unknown_mode_lists_the_valid_choices(toy_run, toy_behaviour):
    with pytest.raises(ValueError) as info:
        sc.attribute(toy_run, toy_behaviour, method="aa", mode="exact")
    message = str(info.value)
    assert "'exact'" in message
    assert set(MODES) == {"linear", "model"}
    for mode in MODES:
        assert f"{mode}" in message


@pytest.mark.parametrize("mode", ["linear", "model"])
def test_behaviour_returning_a_matrix_is_rejected(toy_run, mode):
    X, _ = toy_data(n=10, seed=3)

    def logits(model):
        return model(X)  # [10, 3]: not one value per example

    with pytest.raises(ValueError) as info:
        sc.attribute(toy_run, logits, method="delta", mode=mode)
    assert "1-D" in str(info.value) and "(10, 3)" in str(info.value)


def test_per_example_loss_with_a_scalar_loss_fn_is_rejected(toy_run):
    X, y = toy_data(n=10, seed=3)
    behaviour = sc.PerExampleLoss((X, y), lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    with pytest.raises(ValueError) as info:
        behaviour(toy_run.build_model())
    assert "one loss per example" in str(info.value)
    with pytest.raises(ValueError, match="one loss per example"):
        sc.attribute(toy_run, behaviour, method="aa", mode="linear")
    # the per-example form of the same loss is accepted and gives N values
    fine = sc.PerExampleLoss((X, y), lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"))
    values = fine(toy_run.build_model())
    assert values.shape == (10,)
    with torch.no_grad():
        mean = torch.nn.functional.cross_entropy(toy_run.build_model()(X), y)
    torch.testing.assert_close(values.mean(), mean)


def test_carrying_state_between_different_optimizer_classes_is_refused(tmp_path):
    from conftest import ce_loss, make_mlp, toy_data

    X, y = toy_data()
    pipe = sc.Pipeline(make_mlp, [
        sc.Stage("a", (X, y), ce_loss, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), steps=3, batch_size=8),
        sc.Stage("b", (X, y), ce_loss, lambda p: torch.optim.AdamW(p, lr=1e-3), steps=3, batch_size=8,
                 carry_optimizer_state=True),
    ])
    with pytest.raises(ValueError, match="same optimizer class") as info:
        pipe.run(tmp_path / "run", progress=False)
    assert "SGD" in str(info.value) and "AdamW" in str(info.value)
