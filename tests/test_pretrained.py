"""A first stage that arrives pretrained from outside (Δ = θ_pretrained − θ_init)."""

import numpy as np
import torch

import stagecredit as sc
from conftest import ce_loss, make_mlp, toy_data


def _pretrained_weights():
    """Weights 'from a hub': a model trained elsewhere, here by a few SGD steps on other data."""
    torch.manual_seed(123)
    model = make_mlp()
    X, y = toy_data(n=128, seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(40):
        opt.zero_grad()
        ce_loss(model, (X, y)).backward()
        opt.step()
    return model.state_dict()


def _pipeline():
    X, y = toy_data()
    return sc.Pipeline(make_mlp, [
        sc.PretrainedStage("pretrain", _pretrained_weights),
        sc.Stage("finetune", (X, y), ce_loss, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), steps=15,
                 batch_size=16, seed=2),
        sc.Stage("adapt", (X[:48], y[:48]), ce_loss, lambda p: torch.optim.AdamW(p, lr=1e-2), steps=10,
                 batch_size=8, seed=3),
    ])


def test_pretrained_stage_is_delta_from_a_recorded_initialisation(tmp_path, toy_behaviour):
    pipe = _pipeline()
    run = pipe.run(tmp_path / "run", progress=False)
    torch.manual_seed(pipe.seed)
    init = make_mlp().state_dict()
    pretrained = _pretrained_weights()
    assert all(torch.equal(run.checkpoint(0)[n], init[n]) for n in init)
    assert all(torch.equal(run.checkpoint(1)[n], pretrained[n]) for n in pretrained)
    assert run.stage_records[0].external and run.stage_records[0].steps == 0
    # the counterfactual is spelled out wherever effects are reported
    att = sc.attribute(run, toy_behaviour, method="aa", mode="model")
    assert any("fresh initialisation" in note and "'pretrain'" in note for note in att.notes)
    assert "fresh initialisation" in " ".join(att.to_dict()["notes"])
    # skipping it = training the later stages from θ_init: retraining does exactly that
    truth = sc.retrain_effects(run, toy_behaviour, progress=False)
    from stagecredit.validation.retrain import replay

    from_init = replay(run, 2, init, None)
    with torch.no_grad():
        expected = toy_behaviour(run.build_model()) - toy_behaviour(from_init)
    np.testing.assert_allclose(truth.effects[0], expected.double().numpy(), atol=1e-7)
    assert np.abs(truth.effects[0]).max() > 1e-3
    # a full replay loads the pretrained weights and reproduces the record bit for bit
    final = replay(run, 1, run.checkpoint(0), None).state_dict()
    assert all(torch.equal(final[n], run.checkpoint(3)[n]) for n in final)
    for method in ("delta", "aa", "aa-curvature"):
        assert np.isfinite(sc.attribute(run, toy_behaviour, method=method, mode="linear", progress=False).effects).all()


def test_recorder_pretrained_matches_pipeline(tmp_path):
    pipe = _pipeline()
    piped = pipe.run(tmp_path / "pipeline", progress=False)
    model = make_mlp()
    model.load_state_dict(_pretrained_weights())
    rec = sc.Recorder(tmp_path / "loop", model, model_fn=make_mlp, pretrained="pretrain")
    run = rec.finish()
    assert run.stages == ["pretrain"] and run.stage_records[0].external
    for k in (0, 1):
        a, b = piped.checkpoint(k), run.checkpoint(k)
        assert all(torch.equal(a[n], b[n]) for n in a)
