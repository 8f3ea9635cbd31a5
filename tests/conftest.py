import os

import pytest
import torch

os.environ.setdefault("STAGECREDIT_PROGRESS", "0")

from hypothesis import settings as _hypothesis_settings  # noqa: E402

# CI replays the same examples every run (a red run does not land); locally they vary and keep searching.
_hypothesis_settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")

import stagecredit as sc  # noqa: E402


def make_mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def ce_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def zero_loss(model, batch):
    """A loss that is identically zero: only weight decay and momentum move the parameters."""
    return 0.0 * model(batch[0]).sum()


def toy_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    return X, y


def three_stage_pipeline(later_loss=ce_loss, carry=False):
    """SGD+momentum (cosine) → AdamW (step schedule) → SGD Nesterov with coupled decay."""
    X, y = toy_data()
    return sc.Pipeline(
        model_fn=make_mlp,
        stages=[
            sc.Stage("pretrain", (X, y), ce_loss,
                     lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, weight_decay=5e-3), steps=25, batch_size=16,
                     seed=1, scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=25)),
            sc.Stage("finetune", (X[:48], y[:48]), later_loss,
                     lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.3), steps=15, batch_size=8, seed=2,
                     scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5)),
            sc.Stage("adapt", (X[48:], y[48:]), later_loss,
                     lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.8, nesterov=True, weight_decay=0.05),
                     steps=12, batch_size=8, seed=3,
                     scheduler=lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.2, total_iters=12)),
        ],
    )


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    pipe = three_stage_pipeline()
    return pipe.run(tmp_path_factory.mktemp("toy") / "run", progress=False)


@pytest.fixture(scope="module")
def toy_behaviour():
    X, y = toy_data(n=64, seed=7)
    return sc.PerExampleLoss((X, y), lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"))


def _with_frozen_first_layer(params, frozen: bool, make):
    """``make(params)`` after setting the first layer's ``requires_grad`` (weight and bias) to ``not frozen``."""
    params = list(params)
    for p in params[:2]:
        p.requires_grad_(not frozen)
    return make(params)


def _decay_groups(params, make):
    """``make(groups)``: matrices with the optimizer's weight decay, biases without (as Hugging Face's Trainer does)."""
    params = list(params)
    return make([{"params": [p for p in params if p.ndim > 1]},
                 {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0}])


SGD_ADAMW_SCHEDULES = {
    "sgd-momentum-cosine": (
        lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, weight_decay=1e-3),
        [(lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, dampening=0.1, weight_decay=0.05),
          lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=17))],
    ),
    "sgd-nesterov-then-adamw": (
        lambda p: torch.optim.Adam(p, lr=0.01),
        [(lambda p: torch.optim.SGD(p, lr=0.4, momentum=0.7, nesterov=True, weight_decay=0.08),
          lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.7)),
         (lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5),
          lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=17))],
    ),
    # stages that train part of the model: the body first, then the head alone
    "subsets": (
        lambda p: torch.optim.SGD(list(p)[:2], lr=0.2, momentum=0.9),
        [(lambda p: torch.optim.SGD(list(p)[2:], lr=0.3, momentum=0.9, weight_decay=0.05),
          lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=17)),
         (lambda p: torch.optim.AdamW(list(p)[2:], lr=0.05, weight_decay=0.5),
          lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=17))],
    ),
    # later stages hand the optimizer every parameter but freeze the first layer (requires_grad=False), as
    # fine-tuning loops do: torch skips it, decay included
    "frozen-layer": (
        lambda p: _with_frozen_first_layer(p, False, lambda q: torch.optim.SGD(q, lr=0.2, momentum=0.9)),
        [(lambda p: _with_frozen_first_layer(p, True, lambda q: torch.optim.SGD(q, lr=0.3, weight_decay=0.05)),
          lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=17)),
         (lambda p: _with_frozen_first_layer(p, True, lambda q: torch.optim.SGD(q, lr=0.2, momentum=0.9,
                                                                                weight_decay=0.05)), None),
         (lambda p: _with_frozen_first_layer(p, True, lambda q: torch.optim.AdamW(q, lr=0.05, weight_decay=0.5)),
          None)],
    ),
    # AdamW whose biases are exempt from decay: the groups differ in decoupled decay
    "adamw-decay-groups": (
        lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9),
        [(lambda p: _decay_groups(p, lambda g: torch.optim.AdamW(g, lr=0.05, weight_decay=0.5)),
          lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=17)),
         (lambda p: _decay_groups(p, lambda g: torch.optim.AdamW(g, lr=0.02, weight_decay=0.3)), None)],
    ),
    # OneCycleLR cycles SGD's momentum and Adam's β1 along with the learning rate
    "one-cycle": (
        lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9),
        [(lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, weight_decay=0.05),
          lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.3, total_steps=17)),
         (lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.5),
          lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=17))],
    ),
}


def quadratic_run(tmp_path, batch_size=16, b_params=lambda params: params, b_optimizer=None, max_grad_norm=None):
    """Linear regression with squared error: the training loss is exactly quadratic (constant Hessian per batch).

    ``b_params(params)``: what stage b's default optimizer is given (default: every parameter);
    ``b_optimizer``: another optimizer factory for stage b; ``max_grad_norm``: stages b and c clip to it.
    """
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(64, 6, generator=g), torch.randn(64, 2, generator=g)
    mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(1)  # noqa: E731
    b_optimizer = b_optimizer or (lambda p: torch.optim.SGD(b_params(list(p)), lr=0.03, momentum=0.8, nesterov=True,
                                                            weight_decay=0.01))
    stages = [
        sc.Stage("a", (X, Y), mse, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), steps=20,
                 batch_size=batch_size, seed=1),
        sc.Stage("b", (X, Y), mse, b_optimizer, steps=16, batch_size=batch_size, seed=2, max_grad_norm=max_grad_norm,
                 scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=16)),
        sc.Stage("c", (X, Y), mse, lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.5, dampening=0.1), steps=12,
                 batch_size=batch_size, seed=3, max_grad_norm=max_grad_norm),
    ]
    run = sc.Pipeline(lambda: torch.nn.Linear(6, 2), stages, checkpoint_every=1).run(tmp_path / "q", progress=False)
    return run, sc.PerExampleLoss((X[:20], Y[:20]), mse)


def recorded_loop(pipe, path, *, max_grad_norm=None, clip=True, pass_norm=False, with_batches=True):
    """The pipeline's training as a hand-written loop, recorded by sc.Recorder (a fresh optimizer per stage).

    ``max_grad_norm``: the stages are declared clipped, and the loop clips with
    ``clip_grad_norm_`` unless ``clip`` is False; ``pass_norm``: the norm it
    returns goes to ``rec.batch``; ``with_batches``: ``rec.batch`` is called.
    """
    from stagecredit.recording.batches import collate, dataset_length, minibatch_indices

    torch.manual_seed(pipe.seed)
    model = pipe.model_fn()
    rec = sc.Recorder(path, model, checkpoint_every=pipe.checkpoint_every)
    for stage in pipe.stages:
        batches = minibatch_indices(dataset_length(stage.data), stage.steps, stage.batch_size, stage.seed)
        torch.manual_seed(stage.seed)
        optimizer = stage.optimizer(model.parameters())
        scheduler = stage.scheduler(optimizer) if stage.scheduler else None
        with rec.stage(stage.name, optimizer, scheduler=scheduler, max_grad_norm=max_grad_norm):
            model.train()
            for step in range(stage.steps):
                optimizer.zero_grad(set_to_none=True)
                loss = stage.loss_fn(model, collate(stage.data, batches[step])).mean()
                loss.backward()
                norm = None
                if max_grad_norm is not None and clip:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if with_batches:
                    rec.batch(batches[step], loss=loss, grad_norm=norm if pass_norm else None)
    return rec.finish(pipeline=pipe)


def toy_eval():
    """CLI entry point: per-example loss on a held-out toy set."""
    X, y = toy_data(n=64, seed=7)
    return sc.PerExampleLoss((X, y), lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"),
                             name="toy loss (nats)")


def toy_eval_dataset():
    """CLI entry point that gives a dataset instead of a behaviour."""
    return toy_data(n=32, seed=9)
