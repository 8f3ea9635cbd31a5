"""Record a run from your own training loop, without changing its update code.

::

    rec = sc.Recorder("runs/mine", model)
    with rec.stage("pretrain", optimizer, scheduler=scheduler, seed=0):
        for indices, batch in loader:          # your loop, unchanged
            loss = loss_fn(model, batch); loss.backward(); optimizer.step(); optimizer.zero_grad()
            scheduler.step()
            rec.batch(indices, loss=loss)       # optional: minibatch identities (and the loss)
    run = rec.finish()

Hyper-parameters are read from ``optimizer.param_groups`` by a step pre-hook
at the moment of every ``optimizer.step()`` (lr after the scheduler), so the
record is the same as ``sc.Pipeline`` would write for the same training.

What each estimator needs: ``delta`` — nothing beyond the stage boundaries;
``aa`` — the per-step hyper-parameters (always captured); ``aa-curvature`` —
the pipeline that defines the stages' data and loss
(``sc.Run.load(path, pipeline=pipe)``); retraining and ``aa-curvature``'s
per-step replay — also the minibatch indices (``rec.batch``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from stagecredit.call_site import warn
from stagecredit.recording.optimizer_state import (
    adam_step_count,
    group_hyperparameters,
    param_names_by_group,
    state_tensors,
)
from stagecredit.recording.stage import PretrainedStage, check_max_grad_norm
from stagecredit.recording.training import StageResult, class_name, external_result, importable_name
from stagecredit.seeding import seeded


@dataclasses.dataclass
class _StageInfo:
    """The fields of a stage that a run's manifest records."""

    name: str
    steps: int
    batch_size: Optional[int]
    seed: Optional[int]
    carry_optimizer_state: bool
    max_grad_norm: Optional[float] = None


class Recorder:
    """Records checkpoints, optimizer state and per-step hyper-parameters of a hand-written loop.

    ``model_fn`` (optional, importable by name) lets ``sc.Run.load(path)`` rebuild the model
    without a pipeline. ``checkpoint_every`` as in ``sc.Pipeline``.

    ``pretrained="pretrain"``: the model arrives with weights trained elsewhere (e.g.
    ``from_pretrained``). They become a first stage of that name with
    ``Δ = θ_pretrained − θ_init``, where ``θ_init = model_fn()`` under
    ``torch.manual_seed(pipeline_seed)`` is recorded as the initialisation
    (``model_fn`` is then required).
    """

    def __init__(self, path, model: torch.nn.Module, *, model_fn: Optional[Callable[[], torch.nn.Module]] = None,
                 checkpoint_every: int = 50, overwrite: bool = False, pipeline_seed: int = 0,
                 pretrained: Optional[str] = None) -> None:
        from stagecredit.storage.run import RunWriter

        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
        self.path = Path(path)
        self.model = model
        self.model_fn = model_fn
        self.checkpoint_every = checkpoint_every
        self.pipeline_seed = pipeline_seed
        self._writer = RunWriter(self.path, overwrite=overwrite)
        self._entries: list[dict[str, Any]] = []
        self._names: set[str] = set()
        self._last_class: Optional[str] = None
        if pretrained is None:
            self._writer.write_checkpoint(0, "init", model.state_dict())
        else:
            if model_fn is None:
                raise ValueError("pretrained= needs model_fn to build the fresh initialisation θ_init it is compared with")
            with seeded(pipeline_seed):
                self._writer.write_checkpoint(0, "init", model_fn().state_dict())
            stage = PretrainedStage(pretrained, None)
            self._entries.append(self._writer.write_stage(1, stage, None, external_result(model), model.state_dict()))
            self._names.add(pretrained)
            self._last_class = "external"
        self._open = False
        self._records: list[dict[str, Any]] = []
        self._indices: list[list[int]] = []
        self._batch_calls = 0
        self._pending: dict[str, Any] = {}
        self._clipping: Optional[_ClipMeter] = None
        self._finished = False

    @contextlib.contextmanager
    def stage(self, name: str, optimizer: torch.optim.Optimizer, *, scheduler: Any = None,
              seed: Optional[int] = None, max_grad_norm: Optional[float] = None, grad_scaler: Any = None,
              clipped_parameters: Optional[Iterable[torch.nn.Parameter]] = None) -> Iterator["Recorder"]:
        """Record one stage: every ``optimizer.step()`` inside the block is one recorded step.

        An optimizer that already holds state (e.g. the previous stage's) is
        recorded as carrying it over. ``seed``, if given, seeds torch's global RNG
        now (as ``sc.Pipeline`` does at a stage's start) and is recorded.

        ``max_grad_norm``: the loop clips the gradient's total norm to this
        before every step (``torch.nn.utils.clip_grad_norm_(model.parameters(),
        max_grad_norm)``). The norm before clipping is then recorded per step:
        the value ``clip_grad_norm_`` returned if it is passed as
        ``rec.batch(..., grad_norm=…)``, else measured as the gradients are
        accumulated (``grad_scaler``: the ``torch.amp.GradScaler`` whose scaled
        loss backward runs on; the measured norm is divided by its scale). A
        step whose gradient does not look clipped that way is warned about at
        the end of the stage, and so is a stage in which no norm was seen (the
        norms are then left out of the record, e.g. with sharded gradients).
        ``clipped_parameters``: the parameters whose norm the loop clips
        (default: the model's, as ``clip_grad_norm_(model.parameters(), …)``).
        """
        if self._finished:
            raise RuntimeError("this Recorder has finished; start a new one for another run")
        if self._open:
            raise RuntimeError("stages cannot be nested: close the current stage first")
        if not name or "/" in name or name in self._names:
            raise ValueError(f"stage name must be unique, non-empty and contain no '/': {name!r}")
        carry = len(optimizer.state) > 0
        if carry and self._entries and self._last_class != class_name(optimizer):
            raise ValueError(
                f"stage {name!r} reuses optimizer state, but the previous stage ran {self._last_class} and this one "
                f"runs {class_name(optimizer)}; state can only be carried between the same optimizer class"
            )
        check_max_grad_norm(name, max_grad_norm)
        if seed is not None:
            torch.manual_seed(seed)
        groups = param_names_by_group(optimizer, self.model)
        self._open, self._records, self._indices, self._batch_calls = True, [], [], 0
        inner: list[dict[str, Any]] = []
        k = len(self._entries) + 1
        pending = self._pending = {}
        start = time.perf_counter()
        clipped = list(clipped_parameters) if clipped_parameters is not None else None
        clipping = self._clipping = (_ClipMeter(lambda: clipped or list(self.model.parameters()), name, max_grad_norm,
                                                grad_scaler) if max_grad_norm is not None else None)

        def before(opt, args, kwargs):
            step = len(self._records)
            if self.checkpoint_every and step > 0 and step % self.checkpoint_every == 0:
                inner.append(self._writer.write_step_checkpoint(k, name, step, self.model.state_dict(),
                                                                state_tensors(opt, self.model)))
            pending["groups"] = group_hyperparameters(opt)
            if clipping is not None:
                clipping.sync()  # a parameter made trainable since the last step gets its hook from now on

        def after(opt, args, kwargs):
            record: dict[str, Any] = {"groups": pending.pop("groups")}
            if "loss" in pending:
                record["loss"] = pending.pop("loss")
            # measured after the step: an optimizer given a closure (Lightning) runs backward and clipping inside it
            measured = clipping.measure() if clipping is not None else None
            if "grad_norm" in pending:
                record["grad_norm"] = pending.pop("grad_norm")
            elif measured is not None:
                record["grad_norm"] = measured
            t = adam_step_count(opt)
            if t is not None:
                record["adam_step"] = t
            self._records.append(record)

        handles = [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]
        if clipping is not None:
            clipping.sync()
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            if clipping is not None:
                clipping.remove()
            self._open = False
            self._clipping = None
        steps = len(self._records)
        if steps == 0:
            raise RuntimeError(f"stage {name!r} took no optimizer step")
        if clipping is not None:
            clipping.check(self._records)
        if self._batch_calls not in (0, steps):
            raise RuntimeError(f"stage {name!r}: rec.batch() was called {self._batch_calls} times for {steps} steps; "
                               "call it once per step, or never")
        indices = torch.tensor(self._indices, dtype=torch.long) if self._indices else None
        info = _StageInfo(name, steps, None if indices is None else indices.shape[1], seed, carry, max_grad_norm)
        result = StageResult(
            optimizer_class=class_name(optimizer),
            scheduler_class=None if scheduler is None else class_name(scheduler),
            param_groups=groups,
            steps=self._records,
            optimizer_state=state_tensors(optimizer, self.model),
            seconds=time.perf_counter() - start,
        )
        self._entries.append(self._writer.write_stage(k, info, indices, result, self.model.state_dict(), inner))
        self._names.add(name)
        self._last_class = result.optimizer_class

    def batch(self, indices: Sequence[int] | torch.Tensor, *, loss: Optional[torch.Tensor | float] = None,
              grad_norm: Optional[torch.Tensor | float] = None) -> None:
        """Identify the current step's minibatch (dataset indices) and, optionally, its loss.

        ``grad_norm``: in a stage opened with ``max_grad_norm``, the total norm
        ``clip_grad_norm_`` returned this step (the norm before clipping).
        Call once per step, before or after ``optimizer.step()``.
        """
        if not self._open:
            raise RuntimeError("rec.batch() must be called inside `with rec.stage(...)`")
        if grad_norm is not None and self._clipping is None:
            raise ValueError("rec.batch(grad_norm=…) records the norm before clipping: open the stage with "
                             "rec.stage(..., max_grad_norm=…)")
        self._batch_calls += 1
        self._indices.append([int(i) for i in torch.as_tensor(indices).reshape(-1)])
        for key, value in (("loss", loss), ("grad_norm", grad_norm)):
            if value is None:
                continue
            value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            if self._batch_calls <= len(self._records):  # called after this step's optimizer.step()
                self._records[self._batch_calls - 1][key] = value
            else:
                self._pending[key] = value

    def finish(self, pipeline=None):
        """Write the manifest and return the recorded ``sc.Run``."""
        from stagecredit.storage.run import Run

        if self._open:
            raise RuntimeError("close the open stage before finishing")
        if not self._entries:
            raise RuntimeError("no stage was recorded")
        seeded = dataclasses.make_dataclass("PipelineInfo", [("seed", int)])(self.pipeline_seed)
        self._writer.finish(seeded, self._entries, importable_name(self.model_fn) if self.model_fn else None)
        self._finished = True
        return Run.load(self.path, pipeline=pipeline)


class _ClipMeter:
    """The gradient's total norm before clipping, measured as backward accumulates each parameter's gradient.

    ``measure()`` runs after each step (the step leaves ``.grad`` as it was):
    it returns that norm, computed as ``clip_grad_norm_`` computes it (divided
    by the loss scale of ``grad_scaler``, whose scaled gradients backward
    produces), and keeps the norm of the gradient that was stepped. Parameters
    made trainable during the stage are hooked at the next step (``sync``).
    ``check`` warns, at the end of the stage, if a stepped gradient is not the
    recorded norm clipped to ``max_norm``.
    """

    def __init__(self, parameters: Callable[[], list[torch.nn.Parameter]], stage: str, max_norm: float,
                 grad_scaler: Any = None) -> None:
        self.parameters, self.stage, self.max_norm, self.grad_scaler = parameters, stage, max_norm, grad_scaler
        self.norms: dict[int, torch.Tensor] = {}
        self.handles: dict[int, Any] = {}
        self.stepped: list[Optional[float]] = []

    def sync(self) -> None:
        def keep(p: torch.Tensor) -> None:
            self.norms[id(p)] = torch.linalg.vector_norm(p.grad.detach())

        for p in self.parameters():
            if p.requires_grad and id(p) not in self.handles:
                self.handles[id(p)] = p.register_post_accumulate_grad_hook(keep)

    def remove(self) -> None:
        for handle in self.handles.values():
            handle.remove()
        self.handles = {}

    @staticmethod
    def _total(norms: list[torch.Tensor]) -> Optional[float]:
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None

    def measure(self) -> Optional[float]:
        params = [p for p in self.parameters() if p.grad is not None]
        raw = self._total([self.norms[id(p)] for p in params if id(p) in self.norms])
        self.norms = {}
        if raw is not None and self.grad_scaler is not None:
            raw /= float(self.grad_scaler.get_scale())  # still this step's scale: scaler.update() comes after
        self.stepped.append(self._total([torch.linalg.vector_norm(p.grad.detach()) for p in params]))
        return raw

    def check(self, records: list[dict[str, Any]]) -> None:
        """Warn about steps recorded without a norm (dropping every norm of the stage) or not clipped as declared."""
        missing = [step for step, record in enumerate(records) if record.get("grad_norm") is None]
        if missing:
            for record in records:
                record.pop("grad_norm", None)
            warn(
                f"stage {self.stage!r}: no gradient norm before clipping was seen at {len(missing)} of its "
                f"{len(records)} steps (first: step {missing[0]}; gradients sharded or never accumulated into "
                "the parameters' .grad?), so none is recorded: aa-curvature cannot model this stage's clipping. "
                "Pass rec.batch(..., grad_norm=…) at every step")
            return
        for step, (record, stepped) in enumerate(zip(records, self.stepped)):
            raw = record["grad_norm"]
            expected = raw * min(1.0, self.max_norm / (raw + 1e-6))
            if stepped is not None and abs(stepped - expected) > 1e-3 * max(expected, 1e-12):
                warn(
                    f"stage {self.stage!r}, step {step}: the gradient stepped has norm {stepped:.6g}, but clipping "
                    f"a gradient of norm {raw:.6g} to max_grad_norm={self.max_norm} gives {expected:.6g}. The loop "
                    "does not clip as declared, or scales gradients after backward (a GradScaler: pass it as "
                    "rec.stage(..., grad_scaler=scaler), or the norm clip_grad_norm_ returns as "
                    "rec.batch(..., grad_norm=norm)); aa-curvature's model of the clipping will be off")
                return


class StageScope:
    """A recorder stage opened by one trainer callback and closed by another (HF, Lightning)."""

    def __init__(self, recorder: Recorder, name: str, seed: Optional[int] = None) -> None:
        self.recorder, self.name, self.seed = recorder, name, seed
        self._stack: Optional[contextlib.ExitStack] = None

    def open(self, optimizer: torch.optim.Optimizer, scheduler: Any = None, **clipping: Any) -> None:
        """``clipping``: ``max_grad_norm``, ``grad_scaler``, ``clipped_parameters`` as in ``Recorder.stage``."""
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.recorder.stage(self.name, optimizer, scheduler=scheduler, seed=self.seed,
                                                      **clipping))

    def close(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()
