"""The training loop shared by recording a run and by every retraining replay.

One code path trains both, so a replay with nothing skipped is bit-identical
to the recorded run on CPU.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from stagecredit.call_site import warn
from stagecredit.progress import progress_bar
from stagecredit.recording.batches import collate, dataset_length, minibatch_indices
from stagecredit.recording.optimizer_state import (
    adam_step_count,
    group_hyperparameters,
    load_state_tensors,
    param_names_by_group,
    state_tensors,
)
from stagecredit.recording.stage import Pipeline, PretrainedStage, Stage
from stagecredit.seeding import seeded


@dataclasses.dataclass
class StageResult:
    optimizer_class: str
    scheduler_class: Optional[str]
    param_groups: list[list[str]]
    steps: list[dict[str, Any]]
    optimizer_state: dict[str, torch.Tensor]
    seconds: float


def class_name(obj: Any) -> str:
    """The fully qualified class of ``obj``, as recorded in the manifest (e.g. ``torch.optim.sgd.SGD``)."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def train_stage(
    model: torch.nn.Module,
    stage: Stage,
    batches: torch.Tensor,
    carried_state: Optional[dict[str, torch.Tensor]] = None,
    *,
    carried_from: Optional[str] = None,
    advance: Optional[Callable[[], None]] = None,
    before_step: Optional[Callable[[int, torch.nn.Module, torch.optim.Optimizer], None]] = None,
    after_step: Optional[Callable[[int, Any, dict[str, torch.Tensor], torch.optim.Optimizer], None]] = None,
    source_weights: Optional[dict[str, float]] = None,
    source_hook: Optional[Callable[[int, list, dict, list, torch.optim.Optimizer], None]] = None,
) -> StageResult:
    """Train ``model`` in place through one stage on the given minibatch indices.

    ``carried_state`` (with ``carried_from``, the class that produced it) seeds
    the optimizer's per-parameter state; it must come from the same optimizer class.
    ``before_step(step, model, optimizer)`` sees the state entering a step;
    ``after_step(step, batch, params_before, optimizer)`` sees the step's batch,
    the parameters it started from and the optimizer after it. Neither may
    change the model or the optimizer.
    """
    with seeded(stage.seed):  # dropout and other in-model randomness replay with the stage
        start = time.perf_counter()
        optimizer = stage.optimizer(model.parameters())
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"stage {stage.name!r}: optimizer factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer")
        if carried_state:
            this_class = class_name(optimizer)
            if carried_from is not None and carried_from != this_class:
                raise ValueError(
                    f"stage {stage.name!r} asks to carry optimizer state, but the previous stage ran {carried_from} and "
                    f"this one runs {this_class}; state can only be carried between stages with the same optimizer class"
                )
            load_state_tensors(optimizer, model, carried_state)
        scheduler = stage.scheduler(optimizer) if stage.scheduler is not None else None
        groups = param_names_by_group(optimizer, model)
        sources = getattr(stage, "sources", None)
        if sources is None and (source_weights or source_hook):
            raise ValueError(f"stage {stage.name!r} has no data sources to weight or track")
        weights = sources.weights_with(source_weights) if sources is not None else None
        model.train()
        records = []
        for step in range(stage.steps):
            if before_step is not None:
                before_step(step, model, optimizer)
            batch = collate(stage.data, batches[step])
            hyper = group_hyperparameters(optimizer)  # what this step really uses
            optimizer.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)  # also parameters outside the optimizer: a clip would count their gradient
            source_grads = None
            if sources is None:
                loss = stage.loss_fn(model, batch)
                if loss.ndim > 0:
                    loss = loss.mean()
                _check_finite(stage, step, loss)
                loss.backward()
            else:
                loss, source_grads = sourced_backward(model, stage, batch, sources.source_ids[batches[step]], weights,
                                                      keep=source_hook is not None)
                _check_finite(stage, step, loss)
            grad_norm = None
            if stage.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), stage.max_grad_norm))
            params_before = (
                {n: p.detach().clone() for n, p in model.named_parameters()} if after_step is not None else None
            )
            optimizer.step()
            if source_hook is not None:
                source_hook(step, hyper, source_grads, weights, optimizer)
            if after_step is not None:
                after_step(step, batch, params_before, optimizer)
            record: dict[str, Any] = {"groups": hyper, "loss": float(loss.detach())}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if sources is not None:
                record["source_examples"] = torch.bincount(sources.source_ids[batches[step]],
                                                           minlength=len(sources.names)).tolist()
            t = adam_step_count(optimizer)
            if t is not None:
                record["adam_step"] = t
            records.append(record)
            if scheduler is not None:
                scheduler.step()
            if advance is not None:
                advance()
        return StageResult(
            optimizer_class=class_name(optimizer),
            scheduler_class=None if scheduler is None else class_name(scheduler),
            param_groups=groups,
            steps=records,
            optimizer_state=state_tensors(optimizer, model),
            seconds=time.perf_counter() - start,
        )


def _check_finite(stage, step: int, loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(f"stage {stage.name!r}, step {step}: training loss is {loss.item()}")


def sourced_backward(model: torch.nn.Module, stage, batch: Any, ids: torch.Tensor, weights: list[float], *,
                     keep: bool) -> tuple[torch.Tensor, Optional[dict[int, dict[str, torch.Tensor]]]]:
    """Set ``.grad`` to ``Σ_j w_j ∇(Σ_{i∈j} ℓ_i / B)`` and return the weighted loss.

    Each source's part is differentiated on its own so that ``keep`` can hand
    the per-source gradients (unweighted, by parameter name) to source tracking;
    replays run the same code, so they stay bit-identical to the record.
    """
    per_example = stage.loss_fn(model, batch)
    if per_example.ndim != 1 or len(per_example) != len(ids):
        raise ValueError(
            f"stage {stage.name!r} has data sources, so its loss_fn must return one loss per example "
            f"(shape [{len(ids)}]), got shape {tuple(per_example.shape)}"
        )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    present = [j for j, w in enumerate(weights) if bool((ids == j).any()) and (w != 0 or keep)]
    total = per_example.new_zeros(())
    grads: dict[int, dict[str, torch.Tensor]] = {}
    for i, j in enumerate(present):
        part = per_example[ids == j].sum() / len(ids)
        pieces = torch.autograd.grad(part, params, retain_graph=i < len(present) - 1, allow_unused=True)
        grads[j] = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, pieces)}
        total = total + weights[j] * part.detach()
    for n, p in named:
        p.grad = torch.zeros_like(p)
        for j in present:
            if weights[j] != 0:
                p.grad += weights[j] * grads[j][n]
    return total, (grads if keep else None)


def external_result(model: torch.nn.Module) -> StageResult:
    """What a stage trained elsewhere contributes to the record: its end checkpoint and nothing else."""
    return StageResult(optimizer_class="external", scheduler_class=None,
                       param_groups=[[n for n, _ in model.named_parameters()]], steps=[], optimizer_state={},
                       seconds=0.0)


def importable_name(fn: Callable) -> Optional[str]:
    """``"module:qualname"`` when ``fn`` can be imported back by that name, else None."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        return None
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}:{qualname}" if obj is fn else None


def record_pipeline(pipeline: Pipeline, path, *, progress: bool = True, overwrite: bool = False,
                    resume: bool = False):
    from stagecredit.storage.run import Run, RunWriter

    if resume and overwrite:
        raise ValueError("resume=True continues an interrupted recording and overwrite=True discards it: pass one")
    writer = RunWriter(Path(path), overwrite=overwrite)
    model = pipeline.build_model()
    planned = [s.name for s in pipeline.stages]
    done = writer.interrupted()
    if done is not None and not resume:
        warn(f"{path} holds a recording interrupted after {len(done['stages'])} of its stages {done['planned']}; "
             "recording from the start (pipe.run(path, resume=True) would have continued it)")
        done = None
    state: Optional[dict[str, torch.Tensor]] = None
    state_class: Optional[str] = None
    stage_entries: list[dict[str, Any]] = []
    if done is None:
        writer.write_checkpoint(0, "init", model.state_dict())
    else:
        partial = Run(Path(path), {"init": done["init"], "stages": done["stages"]})
        stage_entries = _resume_point(partial, pipeline, model)
        writer.init_entry = done["init"]
        if stage_entries:
            model.load_state_dict(partial.checkpoint(len(stage_entries)))
            if not stage_entries[-1].get("external", False):  # a pretrained stage hands on no optimizer state
                state, state_class = partial.optimizer_state(len(stage_entries)), stage_entries[-1]["optimizer_class"]
    finished = len(stage_entries)
    total = sum(s.steps for s in pipeline.stages[finished:])
    every = pipeline.checkpoint_every
    with progress_bar("training", total, enabled=progress) as advance:
        for k, stage in enumerate(pipeline.stages, start=1):
            if k <= finished:  # before the interruption
                continue
            if isinstance(stage, PretrainedStage):
                model.load_state_dict(stage.load())
                stage_entries.append(writer.write_stage(k, stage, None, external_result(model), model.state_dict()))
                writer.write_progress(planned, stage_entries)
                continue
            batches = minibatch_indices(dataset_length(stage.data), stage.steps, stage.batch_size, stage.seed)
            carried = state if stage.carry_optimizer_state else None
            inner: list[dict[str, Any]] = []

            def save_inner(step, model_now, optimizer, k=k, stage=stage, inner=inner):
                if every and step > 0 and step % every == 0:
                    inner.append(writer.write_step_checkpoint(k, stage.name, step, model_now.state_dict(),
                                                              state_tensors(optimizer, model_now)))

            tracker = None
            if getattr(stage, "sources", None) is not None:
                from stagecredit.estimators.source_tangents import SourceTangents

                tracker = SourceTangents(model, stage.sources.names, carried, max_grad_norm=stage.max_grad_norm)
            result = train_stage(model, stage, batches, carried, carried_from=state_class, advance=advance,
                                 before_step=save_inner, source_hook=tracker.step if tracker else None)
            stage_entries.append(writer.write_stage(k, stage, batches, result, model.state_dict(), inner, tracker))
            state, state_class = result.optimizer_state, result.optimizer_class
            writer.write_progress(planned, stage_entries)
    writer.finish(pipeline, stage_entries, importable_name(pipeline.model_fn))
    return Run.load(path, pipeline=pipeline)


def _resume_point(partial, pipeline: Pipeline, model: torch.nn.Module) -> list[dict[str, Any]]:
    """The finished stages' entries of an interrupted recording, checked against ``pipeline`` and its initialisation.

    Resuming is only bit-identical to an uninterrupted recording when the
    pipeline is the one that started it: the same stages in the same order
    and the same initialisation (``model_fn`` under the pipeline's seed).
    """
    from stagecredit.storage.tensor_files import RunFileError

    where = f"the interrupted recording at {partial.path}"
    again = "record it from the start with pipe.run(path) (without resume)"
    try:
        partial.check_stages(pipeline.stages[:partial.num_stages])
    except ValueError as exc:
        raise ValueError(f"{exc}; {again}") from exc
    for record, stage in zip(partial.stage_records, pipeline.stages):
        if record.carry_optimizer_state != stage.carry_optimizer_state:
            raise ValueError(f"{where}: stage {record.name!r} was recorded with carry_optimizer_state="
                             f"{record.carry_optimizer_state}, the pipeline's has {stage.carry_optimizer_state}; {again}")
    try:
        init = partial.checkpoint(0)
    except RunFileError as exc:
        raise RunFileError(f"{where} cannot resume: {exc}") from exc
    fresh = model.state_dict()
    if set(init) != set(fresh) or any(not torch.equal(init[n], fresh[n]) for n in fresh):
        raise ValueError(f"{where} began from another initialisation than the pipeline's model_fn gives now (its "
                         f"model_fn, or the seed, changed); {again}")
    return list(partial.manifest["stages"])
