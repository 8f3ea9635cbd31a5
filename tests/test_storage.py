"""A recorded run on disk: round trips, determinism, file formats and damaged files."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import stagecredit as sc
from conftest import ce_loss, three_stage_pipeline, toy_data
from stagecredit.recording.batches import minibatch_indices
from stagecredit.validation.retrain import replay

STAGES = ["pretrain", "finetune", "adapt"]
CHECKPOINTS = ["checkpoints/00_init.safetensors"] + [
    f"checkpoints/{k:02d}_{name}.safetensors" for k, name in enumerate(STAGES, start=1)
]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(in-memory run, its folder), recorded once for the module; tests that damage files copy it first."""
    path = tmp_path_factory.mktemp("storage") / "run"
    return three_stage_pipeline().run(path, progress=False), path


@pytest.fixture
def damaged_copy(recorded, tmp_path):
    _, path = recorded
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    return copy


def test_loaded_run_without_pipeline_gives_identical_effects(recorded, toy_behaviour):
    run, path = recorded
    loaded = sc.Run.load(path)  # no pipeline: the model is built from the recorded model_fn name
    assert loaded.manifest["model_fn"] == "conftest:make_mlp"
    assert loaded.stages == STAGES == run.stages
    in_memory = sc.attribute(run, toy_behaviour, method="aa", mode="linear")
    from_disk = sc.attribute(loaded, toy_behaviour, method="aa", mode="linear")
    assert np.abs(in_memory.effects).max() > 1e-4
    np.testing.assert_array_equal(from_disk.effects, in_memory.effects)
    np.testing.assert_array_equal(from_disk.final_values, in_memory.final_values)
    for k in range(run.num_stages):
        for name, value in in_memory.embedding(k).items():
            assert torch.equal(from_disk.embedding(k)[name], value)
    final = loaded.build_model()
    for name, p in final.named_parameters():
        assert torch.equal(p.detach(), run.checkpoint(3)[name])


def test_rerunning_the_pipeline_is_bit_identical(recorded, tmp_path):
    run, path = recorded
    again = three_stage_pipeline().run(tmp_path / "again", progress=False)
    for rel in CHECKPOINTS:
        first, second = load_file(path / rel), load_file(tmp_path / "again" / rel)
        assert first.keys() == second.keys() and first
        for name in first:
            assert torch.equal(first[name], second[name]), (rel, name)
    for k, name in enumerate(STAGES, start=1):
        steps_rel = f"stages/{k:02d}_{name}/steps.json"
        assert json.loads((path / steps_rel).read_text()) == json.loads((tmp_path / "again" / steps_rel).read_text())
        opt_rel = f"stages/{k:02d}_{name}/optimizer.safetensors"
        first, second = load_file(path / opt_rel), load_file(tmp_path / "again" / opt_rel)
        assert first.keys() == second.keys() and first
        assert all(torch.equal(first[key], second[key]) for key in first)
    # the trained model did move (bit-identity of a no-op would prove nothing)
    assert not torch.equal(again.checkpoint(3)["0.weight"], again.checkpoint(0)["0.weight"])


def test_full_factual_replay_is_bit_identical_to_the_recorded_final_checkpoint(recorded):
    run, _ = recorded
    model = replay(run, 1, run.checkpoint(0), None)
    replayed = model.state_dict()
    recorded_final = run.checkpoint(run.num_stages)
    assert replayed.keys() == recorded_final.keys()
    for name, value in recorded_final.items():
        assert torch.equal(replayed[name], value), name
    assert not torch.equal(recorded_final["2.weight"], run.checkpoint(0)["2.weight"])


def test_replaying_the_later_stages_from_a_middle_checkpoint_is_bit_identical(recorded):
    run, _ = recorded
    model = replay(run, 2, run.checkpoint(1), None)
    for name, value in run.checkpoint(3).items():
        assert torch.equal(model.state_dict()[name], value), name


def test_corrupted_checkpoint_raises_run_file_error_naming_the_file(damaged_copy, toy_behaviour):
    target = damaged_copy / "checkpoints/01_pretrain.safetensors"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF  # a byte of tensor data: the file still parses, only the checksum can tell
    target.write_bytes(bytes(data))
    run = sc.Run.load(damaged_copy)
    with pytest.raises(sc.RunFileError) as info:
        sc.attribute(run, toy_behaviour, method="aa", mode="linear")
    assert str(target) in str(info.value)
    assert "corrupt" in str(info.value)
    with pytest.raises(sc.RunFileError, match="01_pretrain.safetensors"):
        sc.Run.load(damaged_copy).checkpoint(1)
    # the untouched checkpoints still load
    assert torch.equal(sc.Run.load(damaged_copy).checkpoint(2)["0.bias"],
                       load_file(damaged_copy / "checkpoints/02_finetune.safetensors")["0.bias"])


def test_unparseable_checkpoint_without_checksum_raises_run_file_error(damaged_copy):
    manifest_path = damaged_copy / "run.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["stages"][1]["checkpoint"]["sha256"]
    manifest_path.write_text(json.dumps(manifest))
    target = damaged_copy / "checkpoints/02_finetune.safetensors"
    target.write_bytes(target.read_bytes()[:40])  # truncated inside the header
    with pytest.raises(sc.RunFileError) as info:
        sc.Run.load(damaged_copy).checkpoint(2)
    assert str(target) in str(info.value)


def test_deleted_checkpoint_raises_run_file_error_naming_it(damaged_copy, toy_behaviour):
    target = damaged_copy / "checkpoints/02_finetune.safetensors"
    target.unlink()
    run = sc.Run.load(damaged_copy)
    with pytest.raises(sc.RunFileError) as info:
        sc.attribute(run, toy_behaviour, method="delta", mode="model")
    assert str(target) in str(info.value)
    assert "missing" in str(info.value)


def test_deleted_optimizer_state_and_damaged_steps_file_raise_run_file_error(damaged_copy, toy_behaviour):
    (damaged_copy / "stages/02_finetune/optimizer.safetensors").unlink()
    steps = damaged_copy / "stages/03_adapt/steps.json"
    steps.write_text(steps.read_text()[:100])
    run = sc.Run.load(damaged_copy)
    with pytest.raises(sc.RunFileError, match="02_finetune/optimizer.safetensors"):
        run.optimizer_state(2)
    with pytest.raises(sc.RunFileError) as info:
        run.steps(3)
    assert str(steps) in str(info.value)
    with pytest.raises(sc.RunFileError):
        sc.attribute(run, toy_behaviour, method="aa")


def test_missing_manifest_is_a_clear_error(damaged_copy):
    (damaged_copy / "run.json").unlink()
    with pytest.raises(sc.RunFileError) as info:
        sc.Run.load(damaged_copy)
    message = str(info.value)
    assert "run.json" in message and "missing" in message and str(damaged_copy) in message
    with pytest.raises(sc.RunFileError, match="no recorded run"):
        sc.Run.load(damaged_copy / "does-not-exist")


def test_every_tensor_file_is_safetensors_and_nothing_is_pickled(recorded):
    run, path = recorded
    files = sorted(p for p in path.rglob("*") if p.is_file())
    rel = {str(p.relative_to(path)) for p in files}
    expected = set(CHECKPOINTS) | {"run.json"} | {
        f"stages/{k:02d}_{n}/{f}" for k, n in enumerate(STAGES, start=1)
        for f in ("steps.json", "optimizer.safetensors", "batches.safetensors")
    }
    assert rel == expected  # no .pt / .pkl / leftover temporary files
    for p in files:
        head = p.read_bytes()[:4]
        assert not head.startswith(b"\x80"), f"{p} looks like a pickle"
        assert not head.startswith(b"PK"), f"{p} looks like a torch.save zip archive"
        if p.suffix == ".safetensors":
            tensors = load_file(p)
            assert tensors and all(isinstance(t, torch.Tensor) for t in tensors.values())
        else:
            json.loads(p.read_text())
    assert set(load_file(path / CHECKPOINTS[0])) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    adam_state = load_file(path / "stages/02_finetune/optimizer.safetensors")
    assert {"0.weight/exp_avg", "0.weight/exp_avg_sq", "0.weight/step"} <= set(adam_state)
    sgd_state = load_file(path / "stages/01_pretrain/optimizer.safetensors")
    assert "0.weight/momentum_buffer" in sgd_state


def test_json_records_hold_per_step_hyperparameters_and_batches(recorded):
    run, path = recorded
    manifest = json.loads((path / "run.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == STAGES
    assert [s["optimizer_class"] for s in manifest["stages"]] == [
        "torch.optim.sgd.SGD", "torch.optim.adamw.AdamW", "torch.optim.sgd.SGD"]
    assert [s["steps"] for s in manifest["stages"]] == [25, 15, 12]
    assert [s["seed"] for s in manifest["stages"]] == [1, 2, 3]
    X, _ = toy_data()
    pipe = three_stage_pipeline()
    logs = [json.loads((path / f"stages/{k:02d}_{n}/steps.json").read_text()) for k, n in enumerate(STAGES, start=1)]
    for stage, log in zip(pipe.stages, logs):
        assert log["seed"] == stage.seed
        n = len(stage.data[0])
        expected = minibatch_indices(n, stage.steps, stage.batch_size, stage.seed)
        assert "batch_indices" not in log  # binary, beside it
        on_disk = load_file(path / f"stages/{pipe.stages.index(stage) + 1:02d}_{stage.name}/batches.safetensors")
        assert torch.equal(on_disk["batch_indices"], expected)
        assert len(log["steps"]) == stage.steps
        assert all(math.isfinite(s["loss"]) and s["loss"] > 0 for s in log["steps"])

    pretrain = [s["groups"][0] for s in logs[0]["steps"]]
    assert [g["lr"] for g in pretrain] == pytest.approx([0.1 * (1 + math.cos(math.pi * s / 25)) for s in range(25)])
    assert {(g["momentum"], g["weight_decay"], g["dampening"], g["nesterov"]) for g in pretrain} == {(0.9, 5e-3, 0, False)}

    finetune = logs[1]["steps"]
    assert [s["groups"][0]["lr"] for s in finetune] == pytest.approx([0.02 * 0.5 ** (s // 5) for s in range(15)])
    assert [s["adam_step"] for s in finetune] == list(range(1, 16))
    g = finetune[0]["groups"][0]
    assert g["betas"] == [0.9, 0.999] and g["weight_decay"] == 0.3 and g["eps"] == 1e-8

    adapt = [s["groups"][0] for s in logs[2]["steps"]]
    assert [g["lr"] for g in adapt] == pytest.approx([0.3 * (1 - 0.8 * s / 12) for s in range(12)])
    assert {(g["momentum"], g["weight_decay"], g["nesterov"]) for g in adapt} == {(0.8, 0.05, True)}
    # what the Run API hands back is what is on disk
    assert run.steps(2) == finetune
    assert torch.equal(run.batch_indices(3), load_file(path / "stages/03_adapt/batches.safetensors")["batch_indices"])


def test_a_run_in_format_1_still_loads_with_its_minibatch_indices(recorded, tmp_path, toy_behaviour):
    """Format 1 kept the minibatch indices inside steps.json."""
    run, path = recorded
    old = tmp_path / "format-1"
    shutil.copytree(path, old)
    manifest = json.loads((old / "run.json").read_text())
    manifest["format"] = "stagecredit.run/1"
    for k, entry in enumerate(manifest["stages"], start=1):
        batches = old / entry.pop("batches")["path"]
        log = json.loads((old / entry["steps_file"]).read_text())
        log["batch_indices"] = load_file(batches)["batch_indices"].tolist()
        (old / entry["steps_file"]).write_text(json.dumps(log))
        batches.unlink()
    (old / "run.json").write_text(json.dumps(manifest))
    loaded = sc.Run.load(old, pipeline=three_stage_pipeline())
    for k in range(1, 4):
        assert torch.equal(loaded.batch_indices(k), run.batch_indices(k))
    np.testing.assert_allclose(sc.retrain_effects(loaded, toy_behaviour, progress=False).effects,
                               sc.retrain_effects(run, toy_behaviour, progress=False).effects)


def test_recording_over_an_existing_run_needs_overwrite(recorded, tmp_path):
    _, path = recorded
    target = tmp_path / "run"
    shutil.copytree(path, target)
    before = (target / "run.json").read_text()
    with pytest.raises(FileExistsError) as info:
        three_stage_pipeline().run(target, progress=False)
    assert "overwrite=True" in str(info.value)
    assert (target / "run.json").read_text() == before  # the old run is untouched
    rerun = three_stage_pipeline().run(target, progress=False, overwrite=True)
    assert torch.equal(rerun.checkpoint(3)["2.bias"], load_file(path / CHECKPOINTS[3])["2.bias"])


def test_written_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from stagecredit.storage.atomic import atomic_write_text

    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644


def test_library_calls_leave_the_callers_random_stream_alone(tmp_path, toy_behaviour):
    """Recording, rebuilding the model and replays seed themselves, but the caller's generator goes on as before."""
    pipe = three_stage_pipeline()

    def calls():
        run = pipe.run(tmp_path / "run", progress=False, overwrite=True)
        run.build_model()
        sc.attribute(run, toy_behaviour, method="aa-curvature", curvature=sc.CurvatureOptions.exact(), progress=False)
        sc.validate(run, toy_behaviour, methods=["aa"], progress=False)

    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    calls()
    assert torch.equal(torch.rand(5), expected)


class _Interrupt(Exception):
    """Stands in for Ctrl-C or a killed job in the middle of a stage."""


def _interrupting_pipeline(after_calls: int):
    """The toy pipeline whose later stages' loss raises on call ``after_calls + 1`` (finetune takes 15 of them)."""
    calls = [0]

    def loss(model, batch):
        calls[0] += 1
        if calls[0] > after_calls:
            raise _Interrupt
        return ce_loss(model, batch)

    return three_stage_pipeline(later_loss=loss), calls


def _manifest_files(path) -> list:
    """Every tensor file's sha256 the manifest names, stage by stage (checkpoints, optimizer state, batches)."""
    manifest = json.loads((path / "run.json").read_text())
    stages = [(s["checkpoint"]["sha256"], s["optimizer_state"]["sha256"], s["batches"]["sha256"],
               [(c["checkpoint"]["sha256"], c["optimizer_state"]["sha256"]) for c in s["inner_checkpoints"]])
              for s in manifest["stages"]]
    return [manifest["init"]["sha256"], stages]


def test_an_interrupted_recording_resumes_after_its_last_finished_stage_bit_identically(recorded, tmp_path):
    _, uninterrupted = recorded
    path = tmp_path / "run"
    pipe, _ = _interrupting_pipeline(after_calls=20)  # in the middle of adapt, after finetune's 15 steps
    with pytest.raises(_Interrupt):
        pipe.run(path, progress=False)
    with pytest.raises(sc.RunFileError, match=r"interrupted after 2 of its 3 stages .*resume=True"):
        sc.Run.load(path)

    pipe, calls = _interrupting_pipeline(after_calls=10**9)
    run = pipe.run(path, progress=False, resume=True)
    assert calls[0] == 12  # adapt's steps only: pretrain and finetune were not trained again
    assert _manifest_files(path) == _manifest_files(uninterrupted)
    assert not (path / "recording.json").exists()
    assert torch.equal(run.checkpoint(3)["0.weight"], sc.Run.load(uninterrupted).checkpoint(3)["0.weight"])


def test_resume_checks_the_pipeline_and_plain_run_starts_again_with_a_warning(recorded, tmp_path):
    _, uninterrupted = recorded
    path = tmp_path / "run"
    pipe, _ = _interrupting_pipeline(after_calls=20)
    with pytest.raises(_Interrupt):
        pipe.run(path, progress=False)

    changed = three_stage_pipeline()
    changed.stages[1].steps = 14
    with pytest.raises(ValueError, match="does not match"):
        changed.run(path, progress=False, resume=True)
    reseeded = three_stage_pipeline()
    reseeded.seed = 7
    with pytest.raises(ValueError, match="another initialisation"):
        reseeded.run(path, progress=False, resume=True)
    with pytest.raises(ValueError, match="pass one"):
        three_stage_pipeline().run(path, progress=False, resume=True, overwrite=True)

    pipe, calls = _interrupting_pipeline(after_calls=10**9)
    with pytest.warns(UserWarning, match="interrupted after 2 of its stages"):
        pipe.run(path, progress=False)
    assert calls[0] == 27  # finetune and adapt trained again
    assert _manifest_files(path) == _manifest_files(uninterrupted)


def test_resume_with_nothing_to_resume_records_from_the_start(recorded, tmp_path):
    _, uninterrupted = recorded
    three_stage_pipeline().run(tmp_path / "run", progress=False, resume=True)
    assert _manifest_files(tmp_path / "run") == _manifest_files(uninterrupted)
