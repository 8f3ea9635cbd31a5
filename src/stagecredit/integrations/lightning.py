"""Lightning integration: each ``trainer.fit()`` call is one recorded stage.

::

    rec = sc.Recorder("runs/lit", module, model_fn=make_module)
    L.Trainer(max_steps=500, callbacks=[StageCreditCallback(rec, "pretrain")]).fit(module, pretrain_loader)
    L.Trainer(max_steps=200, callbacks=[StageCreditCallback(rec, "finetune")]).fit(module, finetune_loader)
    run = rec.finish()

The optimizer returned by ``configure_optimizers`` (one optimizer) and its
scheduler are read at every step, and so is ``gradient_clip_val`` (clipping by
norm, recorded with each step's norm before clipping). Minibatch identities are not recorded:
``delta`` and ``aa`` work, and so do ``aa-curvature``'s segments given an
``sc.Pipeline`` that describes the stages' data and loss; retraining and the
per-step replay need a run recorded through ``sc.Pipeline`` or ``rec.batch``.
"""

from __future__ import annotations

from typing import Optional

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the standalone package name
    from pytorch_lightning.callbacks import Callback

from stagecredit.call_site import warn
from stagecredit.recording.recorder import Recorder, StageScope


class StageCreditCallback(Callback):
    """Records the ``trainer.fit()`` it is attached to as stage ``stage`` of ``recorder``'s run."""

    def __init__(self, recorder: Recorder, stage: str, *, seed: Optional[int] = None) -> None:
        self.scope = StageScope(recorder, stage, seed)

    def on_train_start(self, trainer, pl_module) -> None:
        if len(trainer.optimizers) != 1:
            raise RuntimeError(f"stagecredit records one optimizer per stage; this module configured {len(trainer.optimizers)}")
        configs = getattr(trainer, "lr_scheduler_configs", [])
        scheduler = configs[0].scheduler if configs else None
        clip = trainer.gradient_clip_val or None
        algorithm = str(getattr(trainer, "gradient_clip_algorithm", None) or "norm").lower()
        if clip is not None and not algorithm.endswith("norm"):
            warn(f"stage {self.scope.name!r}: the Trainer clips gradients by value, which aa-curvature does not "
                 "model; delta and aa are unaffected")
            clip = None
        optimizer = trainer.optimizers[0]
        # Lightning clips the norm of the optimizer's parameters, not the module's
        self.scope.open(optimizer, scheduler, max_grad_norm=None if clip is None else float(clip),
                        grad_scaler=getattr(getattr(trainer, "precision_plugin", None), "scaler", None),
                        clipped_parameters=[p for group in optimizer.param_groups for p in group["params"]])

    def on_train_end(self, trainer, pl_module) -> None:
        self.scope.close()
