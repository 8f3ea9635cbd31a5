"""Hugging Face ``Trainer`` integration: each ``trainer.train()`` call is one recorded stage.

::

    rec = sc.Recorder("runs/bert", model, model_fn=make_model)
    Trainer(model=model, args=args, train_dataset=pre, callbacks=[StageCreditCallback(rec, "pretrain")]).train()
    Trainer(model=model, args=args2, train_dataset=ft, callbacks=[StageCreditCallback(rec, "finetune")]).train()
    run = rec.finish()

The optimizer the Trainer builds (AdamW by default) and its learning-rate
schedule are read at every optimizer step, so gradient accumulation records
one step per real update. The Trainer's gradient clipping (``max_grad_norm``,
1.0 by default) is recorded with each step's norm before clipping. Minibatch identities are not recorded (the Trainer's
sampler owns them): ``delta`` and ``aa`` work, and so do ``aa-curvature``'s
segments given an ``sc.Pipeline`` that describes the stages' data and loss;
retraining and the per-step replay need a run recorded through ``sc.Pipeline``
or ``rec.batch``. The GGN reads the logits out of a Transformers model's
output; a ``loss_fn`` that returns the model's own ``.loss`` is linear in the
outputs and has no GGN, so the default curvature takes the Hessian there (with
a ``GGNFallbackWarning``): compute the loss from ``.logits`` to keep the GGN.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import TrainerCallback

from stagecredit.recording.recorder import Recorder, StageScope


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while hasattr(optimizer, "optimizer") and isinstance(getattr(optimizer, "optimizer"), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch optimizer from the Trainer, got {type(optimizer).__name__}")
    return optimizer


def unwrap_scheduler(scheduler):
    return getattr(scheduler, "scheduler", scheduler)


class StageCreditCallback(TrainerCallback):
    """Records the ``trainer.train()`` call it is attached to as stage ``stage`` of ``recorder``'s run."""

    def __init__(self, recorder: Recorder, stage: str, *, seed: Optional[int] = None) -> None:
        self.scope = StageScope(recorder, stage, seed)

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if optimizer is None:
            raise RuntimeError("the Trainer created no optimizer before training began; stagecredit cannot record it")
        # the Trainer clips the gradient's norm to args.max_grad_norm (1.0 by default; 0 or None: no clipping)
        clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
        # with fp16 the gradients backward accumulates are scaled: accelerate's optimizer wrapper holds the scaler
        self.scope.open(unwrap_optimizer(optimizer), unwrap_scheduler(lr_scheduler), max_grad_norm=clip,
                        grad_scaler=getattr(optimizer, "scaler", None))

    def on_train_end(self, args, state, control, **kwargs):
        self.scope.close()
