"""sc.Recorder on a hand-written loop: the same record as sc.Pipeline for the same training."""

import json

import numpy as np
import pytest
import torch

import stagecredit as sc
from conftest import make_mlp, three_stage_pipeline
from stagecredit.recording.batches import collate, dataset_length, minibatch_indices


def _hand_written_loop(pipe, path, *, with_batches=True, reuse_optimizer=False):
    """The pipeline's training, written as a user would, recorded by sc.Recorder."""
    torch.manual_seed(pipe.seed)
    model = pipe.model_fn()
    rec = sc.Recorder(path, model, model_fn=make_mlp, checkpoint_every=pipe.checkpoint_every)
    optimizer = None
    for stage in pipe.stages:
        seed = stage.seed
        batches = minibatch_indices(dataset_length(stage.data), stage.steps, stage.batch_size, seed)
        if not (reuse_optimizer and optimizer is not None):
            # the seed is set before the optimizer is built, exactly as sc.Pipeline does
            torch.manual_seed(seed)
            optimizer = stage.optimizer(model.parameters())
            seed = None
        scheduler = stage.scheduler(optimizer) if stage.scheduler else None
        with rec.stage(stage.name, optimizer, scheduler=scheduler, seed=seed):
            model.train()
            for step in range(stage.steps):
                batch = collate(stage.data, batches[step])
                optimizer.zero_grad(set_to_none=True)
                loss = stage.loss_fn(model, batch)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if with_batches:
                    rec.batch(batches[step], loss=loss)
    return rec.finish()


def test_recorder_and_pipeline_write_identical_records_and_effects(tmp_path, toy_behaviour):
    pipe = three_stage_pipeline()
    pipe.checkpoint_every = 5
    piped = pipe.run(tmp_path / "pipeline", progress=False)
    looped = _hand_written_loop(pipe, tmp_path / "loop")
    for k in range(piped.num_stages + 1):
        a, b = piped.checkpoint(k), looped.checkpoint(k)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    for k in range(1, piped.num_stages + 1):
        assert piped.steps(k) == looped.steps(k)  # hyper-parameters per step, Adam step counts, losses
        assert torch.equal(piped.batch_indices(k), looped.batch_indices(k))
        assert piped.inner_checkpoint_steps(k) == looped.inner_checkpoint_steps(k)
        a, b = piped.optimizer_state(k), looped.optimizer_state(k)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    for method in ("delta", "aa"):
        e1 = sc.attribute(piped, toy_behaviour, method=method, mode="linear").effects
        e2 = sc.attribute(sc.Run.load(tmp_path / "loop"), toy_behaviour, method=method, mode="linear").effects
        np.testing.assert_array_equal(e1, e2)
    # a recorded loop retrains through the pipeline that describes it
    truth = sc.retrain_effects(sc.Run.load(tmp_path / "loop", pipeline=pipe), toy_behaviour, progress=False)
    np.testing.assert_array_equal(truth.effects, sc.retrain_effects(piped, toy_behaviour, progress=False).effects)


def test_reusing_the_optimizer_is_recorded_as_carried_state(tmp_path):
    pipe = three_stage_pipeline()
    pipe.stages = [pipe.stages[0], pipe.stages[2]]  # SGD → SGD, same optimizer object carried over
    run = _hand_written_loop(pipe, tmp_path / "loop", reuse_optimizer=True)
    assert [s.carry_optimizer_state for s in run.stage_records] == [False, True]
    manifest = json.loads((tmp_path / "loop" / "run.json").read_text())
    assert manifest["stages"][1]["carry_optimizer_state"] is True
    # the momentum buffer handed over is the one the first stage ended with
    carried = run.optimizer_state(1)
    assert any(key.endswith("/momentum_buffer") for key in carried)


def test_without_batch_indices_aa_works_and_retraining_says_what_is_missing(tmp_path, toy_behaviour):
    pipe = three_stage_pipeline()
    run = _hand_written_loop(pipe, tmp_path / "loop", with_batches=False)
    assert np.isfinite(sc.attribute(run, toy_behaviour, method="aa").effects).all()
    loaded = sc.Run.load(tmp_path / "loop", pipeline=pipe)
    with pytest.raises(sc.RunFileError, match="without minibatch indices"):
        sc.retrain_effects(loaded, toy_behaviour, progress=False)


def test_recorder_misuse_is_reported(tmp_path):
    model = make_mlp()
    rec = sc.Recorder(tmp_path / "r", model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="took no optimizer step"):
        with rec.stage("empty", opt):
            pass
    with pytest.raises(RuntimeError, match="called 1 times for 2 steps"):
        with rec.stage("short", opt):
            for _ in range(2):
                model(torch.randn(4, 6)).sum().backward()
                opt.step()
            rec.batch([0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="inside"):
        rec.batch([0])
    with pytest.raises(RuntimeError, match="no stage was recorded"):
        rec.finish()


def test_cli_attribute_works_on_a_recorded_loop(tmp_path):
    from typer.testing import CliRunner

    from stagecredit.cli.main import app

    _hand_written_loop(three_stage_pipeline(), tmp_path / "loop")
    result = CliRunner().invoke(app, ["attribute", str(tmp_path / "loop"), "--eval", "conftest:toy_eval",
                                      "--method", "aa", "--out", str(tmp_path / "att")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "att" / "attribution.json").read_text())
    assert data["stages"] == ["pretrain", "finetune", "adapt"] and len(data["effects"][0]) == 64
