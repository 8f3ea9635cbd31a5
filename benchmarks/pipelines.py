"""Pipelines the benchmarks run: the MNIST demo and two more with other optimizers and schedules.

Each entry gives ``(pipeline, behaviour)``; every pipeline is small enough to
retrain without each stage on 2 CPU cores in seconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import stagecredit as sc
from stagecredit.demos import mnist


def _digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    return torch.tensor(X, dtype=torch.float32)[order] / 16.0, torch.tensor(y, dtype=torch.long)[order]


def digits_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def mnist_demo(scale: float = 1.0):
    """The demo's pipeline; ``scale`` multiplies every stage's steps (``benchmarks/cost_scaling.py``)."""
    data = mnist.make_data()
    return mnist.build_pipeline(data, scale), sc.PerExampleLoss(data.test, mnist.cross_entropy, name="MNIST test loss (nats)")


def _scaled(steps: int, scale: float) -> int:
    return max(10, round(steps * scale))


def digits_adam_l2_then_sgd(scale: float = 1.0):
    """2 stages: Adam with coupled L2 (per-parameter preconditioner matters) → SGD Nesterov, cosine.

    ``scale`` multiplies every stage's steps and its schedule's length (``benchmarks/segment_length.py``).
    """
    X, y = _digits()
    n = lambda steps: _scaled(steps, scale)  # noqa: E731
    pipe = sc.Pipeline(digits_model, [
        sc.Stage("pretrain", (X[:800], y[:800]), ce, lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=1e-2),
                 steps=n(300), batch_size=32, seed=11),
        sc.Stage("finetune", (X[800:1200], y[800:1200]), ce,
                 lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                 scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=n(200)),
                 steps=n(200), batch_size=32, seed=12),
    ])
    return pipe, sc.PerExampleLoss((X[1200:1597], y[1200:1597]), ce, name="digits test loss (nats)")


def _two_groups(params):
    params = list(params)
    # first layer slower than the head: two param groups with their own lr / decay
    return [{"params": params[:2], "lr_scale": 0.3}, {"params": params[2:], "lr_scale": 1.0}]


def _grouped_sgd(lr, **kw):
    def make(params):
        groups = _two_groups(params)
        return torch.optim.SGD([{"params": g["params"], "lr": lr * g["lr_scale"]} for g in groups], lr=lr, **kw)

    return make


def digits_five_stages(scale: float = 1.0):
    """5 stages, two param groups, carried momentum: SGD → AdamW → SGD(carry) → SGD(carry) → AdamW.

    ``scale`` multiplies every stage's steps and its schedule's length (``benchmarks/segment_length.py``).
    """
    X, y = _digits()
    n = lambda steps: _scaled(steps, scale)  # noqa: E731
    parts = [slice(0, 400), slice(400, 700), slice(700, 900), slice(900, 1100), slice(1100, 1300)]
    return sc.Pipeline(digits_model, [
        sc.Stage("s1-sgd", (X[parts[0]], y[parts[0]]), ce, _grouped_sgd(0.2, momentum=0.9, weight_decay=5e-4),
                 steps=n(150), batch_size=32, seed=21),
        sc.Stage("s2-adamw", (X[parts[1]], y[parts[1]]), ce, lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.05),
                 scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=n(40), gamma=0.5),
                 steps=n(120), batch_size=32, seed=22),
        sc.Stage("s3-sgd", (X[parts[2]], y[parts[2]]), ce, _grouped_sgd(0.1, momentum=0.9, weight_decay=1e-3),
                 steps=n(80), batch_size=32, seed=23),
        sc.Stage("s4-sgd-carry", (X[parts[3]], y[parts[3]]), ce, _grouped_sgd(0.05, momentum=0.9, weight_decay=1e-3),
                 steps=n(80), batch_size=32, seed=24, carry_optimizer_state=True,
                 scheduler=lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.1, total_iters=n(80))),
        sc.Stage("s5-adamw", (X[parts[4]], y[parts[4]]), ce, lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1),
                 steps=n(60), batch_size=32, seed=25),
    ]), sc.PerExampleLoss((X[1300:1797], y[1300:1797]), ce, name="digits test loss (nats)")


PIPELINES = {
    "mnist-demo": mnist_demo,
    "digits-adam-l2-sgd": digits_adam_l2_then_sgd,
    "digits-5-stage": digits_five_stages,
}


def mnist_wide(scale: float = 1.0):
    """3 stages of a 1.9M-parameter MLP on the demo's MNIST data, batches of 128: big enough to be compute-bound.

    ``scale`` multiplies every stage's 100 steps (``benchmarks/cost_scaling.py --pipeline mnist-wide``).
    """
    data = mnist.make_data()
    steps = max(10, int(100 * scale))

    def model():
        return torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                   torch.nn.ReLU(), torch.nn.Linear(1024, 10))

    ce_mnist = mnist.cross_entropy
    return sc.Pipeline(model, [
        sc.Stage("pretrain", data.pretrain, ce_mnist, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), steps=steps,
                 batch_size=128, seed=1),
        sc.Stage("finetune", data.finetune, ce_mnist, lambda p: torch.optim.AdamW(p, lr=1e-3), steps=steps,
                 batch_size=128, seed=2),
        sc.Stage("adapt", data.adapt["digits"], ce_mnist, lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9),
                 steps=steps, batch_size=128, seed=3),
    ]), sc.PerExampleLoss(data.test, ce_mnist, name="MNIST test loss (nats)")


# cost.py only: too slow to retrain for every fidelity variant on 2 cores
COST_PIPELINES = {**PIPELINES, "mnist-wide": mnist_wide}


def digits_sourced():
    """2 stages with two sources each: SGD {clean, relabelled: 30% wrong labels} → AdamW {clean, noisy images}."""
    X, y = _digits()
    g = torch.Generator().manual_seed(5)
    wrong = torch.rand(300, generator=g) < 0.3
    relabelled = torch.where(wrong, (y[500:800] + 1) % 10, y[500:800])
    noisy = (X[1000:1200] + 0.5 * torch.randn(200, 64, generator=g)).clamp(0, 1)
    return sc.Pipeline(digits_model, [
        sc.Stage("pretrain", {"clean": (X[:500], y[:500]), "relabelled": (X[500:800], relabelled)}, ce,
                 lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4), steps=200, batch_size=32,
                 seed=31),
        sc.Stage("finetune", {"clean": (X[800:1000], y[800:1000]), "noisy": (noisy, y[1000:1200])}, ce,
                 lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.05), steps=100, batch_size=32, seed=32),
    ]), sc.PerExampleLoss((X[1300:1797], y[1300:1797]), ce, name="digits test loss (nats)")


SOURCED_PIPELINES = {
    "mnist-demo": mnist_demo,
    "digits-sourced": digits_sourced,
}
