"""Hugging Face Trainer and Lightning: real trainers on CPU, recorded stage by stage."""

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stagecredit as sc

try:
    import transformers
except ImportError:  # pragma: no cover - the HF test is skipped, the Lightning one still runs
    transformers = None


def tiny_bert():
    """A tiny BERT classifier built from a config: nothing is downloaded."""
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, ids, labels):
        self.ids, self.labels = ids, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _text_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, 8), generator=g)
    labels = (ids[:, 0] > 20).long()
    return ids, labels


def _bert_loss(model, batch):
    return F.cross_entropy(model(input_ids=batch[0]).logits, batch[1], reduction="none")


def _bert_dict_loss(model, batch):
    return F.cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"], reduction="none")


def _bert_own_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def bert_eval():
    """CLI entry point: per-example loss of the tiny BERT on held-out token sequences."""
    return sc.PerExampleLoss(_text_data(16, 9), _bert_loss, name="toy text loss (nats)")


def test_hf_trainer_stages_are_recorded_with_gradient_accumulation(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from stagecredit.integrations.hf import StageCreditCallback

    tiny_bert().save_pretrained(tmp_path / "hub")  # a local 'hub' checkpoint: nothing is downloaded
    model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hub")
    rec = sc.Recorder(tmp_path / "run", model, model_fn=tiny_bert, checkpoint_every=0)
    logged = {}
    for stage, lr, seed in (("pretrain", 5e-3, 1), ("finetune", 1e-3, 2)):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / stage), max_steps=6, per_device_train_batch_size=4,
            gradient_accumulation_steps=2, learning_rate=lr, lr_scheduler_type="linear", weight_decay=0.01,
            report_to=[], save_strategy="no", logging_strategy="steps", logging_steps=1, use_cpu=True, seed=seed,
            disable_tqdm=True, max_grad_norm=0.5 if stage == "pretrain" else 1.0,  # 1.0: the Trainer's default
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Pairs(*_text_data(64, seed)),
                                       callbacks=[StageCreditCallback(rec, stage)])
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*does not clip as declared")
            trainer.train()
        # the Trainer clips to max_grad_norm; the norm before clipping it logs is the one recorded
        logged[stage] = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    run = rec.finish()
    assert run.stages == ["pretrain", "finetune"]
    for k, lr in ((1, 5e-3), (2, 1e-3)):
        record = run.stage_records[k - 1]
        assert record.optimizer_class == "torch.optim.adamw.AdamW" and record.steps == 6  # 12 batches / accumulation 2
        lrs = [step["groups"][0]["lr"] for step in run.steps(k)]
        assert lrs == pytest.approx([lr * (6 - i) / 6 for i in range(6)])  # linear decay, read at each real step
        assert [step["adam_step"] for step in run.steps(k)] == list(range(1, 7))
        assert record.max_grad_norm == (0.5 if k == 1 else 1.0)
        assert [step["grad_norm"] for step in run.steps(k)] == pytest.approx(logged[record.name], rel=1e-5)
    final = run.checkpoint(2)
    assert all(torch.equal(final[n], p.detach()) for n, p in model.named_parameters())
    behaviour = sc.PerExampleLoss(_text_data(16, 9), _bert_loss, name="toy text loss (nats)")
    att = sc.attribute(sc.Run.load(tmp_path / "run"), behaviour, method="aa", mode="model")
    assert att.effects.shape == (2, 16) and np.isfinite(att.effects).all()
    # the last stage in model mode is exact: θ_T − e_K is the recorded checkpoint before it
    before = run.build_model(1)
    with torch.no_grad():
        expected = behaviour(run.build_model()) - behaviour(before)
    np.testing.assert_allclose(att.effects[1], expected.double().numpy(), atol=1e-6)
    # aa-curvature's segments need no minibatch indices: given the stages' data and loss, they draw their examples
    pipe = sc.Pipeline(tiny_bert, [
        sc.Stage(stage, _Pairs(*_text_data(64, seed)), _bert_dict_loss, lambda p: torch.optim.AdamW(p), steps=6,
                 batch_size=8, seed=seed, max_grad_norm=clip)
        for stage, seed, clip in (("pretrain", 1, 0.5), ("finetune", 2, 1.0))], checkpoint_every=0)
    with_data = sc.Run.load(tmp_path / "run", pipeline=pipe)
    with warnings.catch_warnings():  # the default GGN reads the logits out of the SequenceClassifierOutput
        warnings.simplefilter("error", sc.GGNFallbackWarning)
        curved = sc.attribute(with_data, behaviour, "aa-curvature", "model", progress=False)
    assert np.isfinite(curved.effects).all() and np.abs(curved.effects[0] - att.effects[0]).max() > 1e-6
    np.testing.assert_allclose(curved.effects[1], att.effects[1], atol=1e-6)  # the last stage: nothing after it
    # a loss the model computes itself (given labels) is linear in its outputs: no GGN, the Hessian instead
    own = sc.Run.load(tmp_path / "run", pipeline=sc.Pipeline(tiny_bert, [
        dataclasses.replace(stage, loss_fn=_bert_own_loss) for stage in pipe.stages], checkpoint_every=0))
    with pytest.warns(sc.GGNFallbackWarning, match=r"model\(\.\.\.\)\.loss") as caught:
        fell_back = sc.attribute(own, behaviour, "aa-curvature", "model", progress=False)
    assert {w.filename for w in caught if w.category is sc.GGNFallbackWarning} == {__file__}
    hessian = sc.attribute(with_data, behaviour, "aa-curvature", "model",
                           curvature=sc.CurvatureOptions(curvature="hessian"), progress=False)
    np.testing.assert_allclose(fell_back.effects, hessian.effects, rtol=1e-4, atol=1e-7)
    # the CLI attributes a Trainer-recorded run like any other
    from typer.testing import CliRunner

    from stagecredit.cli.main import app

    result = CliRunner().invoke(app, ["attribute", str(tmp_path / "run"), "--eval", "test_integrations:bert_eval",
                                      "--mode", "model", "--out", str(tmp_path / "att")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "att" / "attribution.json").is_file()


def test_lightning_fit_calls_are_recorded_as_stages(tmp_path):
    L = pytest.importorskip("lightning")

    class Module(L.LightningModule):
        def __init__(self, lr):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
            self.lr = lr

        def training_step(self, batch, _):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-3)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}

    from stagecredit.integrations.lightning import StageCreditCallback

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16)
    module = Module(lr=0.1)
    rec = sc.Recorder(tmp_path / "run", module, checkpoint_every=0)
    for stage, lr in (("pretrain", 0.1), ("adapt", 0.05)):
        module.lr = lr
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            gradient_clip_val=0.5 if stage == "adapt" else None,
                            callbacks=[StageCreditCallback(rec, stage)])
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*does not clip as declared")
            trainer.fit(module, loader)
    run = rec.finish()
    assert run.stages == ["pretrain", "adapt"]
    for k, lr in ((1, 0.1), (2, 0.05)):
        steps = run.steps(k)
        assert len(steps) == 8  # 2 epochs × 4 batches
        # StepLR per epoch: the lr halves after the first epoch's four steps
        assert [s["groups"][0]["lr"] for s in steps] == pytest.approx([lr] * 4 + [lr / 2] * 4)
        assert steps[0]["groups"][0]["momentum"] == 0.9 and math.isclose(steps[0]["groups"][0]["weight_decay"], 1e-3)
        assert run.stage_records[k - 1].max_grad_norm == (0.5 if k == 2 else None)
        assert ("grad_norm" in steps[0]) == (k == 2)
    final = run.checkpoint(2)
    assert all(torch.equal(final[n], p.detach()) for n, p in module.named_parameters())
