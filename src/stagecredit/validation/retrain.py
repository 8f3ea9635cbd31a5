"""Ground truth: re-run the recorded pipeline with one stage skipped (DESIGN §2)."""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from stagecredit.estimators.attribute import Attribution, behaviour_name, sign_convention
from stagecredit.estimators.embedding import StageEmbedding
from stagecredit.estimators.optimizers import counterfactual_state_source
from stagecredit.progress import progress_bar
from stagecredit.recording.training import train_stage
from stagecredit.storage.run import Run


def replay(run: Run, start_stage: int, initial: dict[str, torch.Tensor],
           carried: Optional[dict[str, torch.Tensor]], *, carried_from: Optional[str] = None,
           advance=lambda: None, source_weights: Optional[dict[int, dict[str, float]]] = None) -> torch.nn.Module:
    """Train stages ``start_stage..K`` from the state dict ``initial`` with the recorded data order and seeds.

    ``source_weights[j]`` overrides the weights of stage j's data sources (``{"web": 0.0}``: without it).
    """
    pipeline = run.pipeline
    model = pipeline.build_model()
    model.load_state_dict(initial)
    state, state_class = carried, carried_from
    for j in range(start_stage, run.num_stages + 1):
        stage = pipeline.stages[j - 1]
        if getattr(stage, "external", False):
            model.load_state_dict(stage.load())
            state, state_class = None, None
            continue
        result = train_stage(model, stage, run.batch_indices(j), state if stage.carry_optimizer_state else None,
                             carried_from=state_class, advance=advance,
                             source_weights=(source_weights or {}).get(j))
        state, state_class = result.optimizer_state, result.optimizer_class
    return model.eval()


def removal_start(run: Run, k: int) -> tuple[dict[str, torch.Tensor], Optional[dict[str, torch.Tensor]], Optional[str]]:
    """Where the pipeline without stage k resumes: ``θ^(k−1)`` and the optimizer state stage k+1 is handed.

    Returns ``(state dict, carried optimizer state or None, class that state came from or None)``.
    """
    source = counterfactual_state_source(run, k) if k < run.num_stages else None
    carried = run.optimizer_state(source) if source is not None else None
    carried_from = run.stage_records[source - 1].optimizer_class if source is not None else None
    return dict(run.checkpoint(k - 1)), carried, carried_from


def resume_after(run: Run, k: int, start: dict[str, torch.Tensor], carried: Optional[dict[str, torch.Tensor]],
                 carried_from: Optional[str], *, advance=lambda: None) -> dict[str, torch.Tensor]:
    """State dict at the end of training when stages k+1..K replay as recorded from ``start`` (and ``carried``)."""
    if k == run.num_stages:
        return {n: t.detach().clone() for n, t in start.items()}
    model = replay(run, k + 1, start, carried, carried_from=carried_from, advance=advance)
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def skipped_stage_model(run: Run, k: int, *, advance=lambda: None) -> dict[str, torch.Tensor]:
    """State dict of ``θ_T^(−k)``: stage k+1 starts from ``θ^(k−1)``, later stages replay as recorded."""
    key = ("retrained", k)
    if key not in run._cache:
        start = time.perf_counter()
        state = resume_after(run, k, *removal_start(run, k), advance=advance)
        run._cache[key] = (state, time.perf_counter() - start)
    return run._cache[key][0]


def retrain_seconds(run: Run, k: int) -> float:
    """Wall-clock seconds the retraining without stage k took (it is cached on the run)."""
    return run._cache[("retrained", k)][1]


def retrain_source_seconds(run: Run, k: int, source: str, weight: float = 0.0) -> float:
    """Wall-clock seconds the re-run of stage k with ``source`` at ``weight`` (and later stages) took."""
    return run._cache[("retrained-source", k, source, float(weight))][1]


def retrain_effects(run: Run, behaviour: Callable[[torch.nn.Module], torch.Tensor], *,
                    progress: bool = True) -> Attribution:
    """``τ_k = f(θ_T) − f(θ_T^(−k))`` for every stage k, by actually retraining without it.

    Returns an :class:`Attribution` with ``method="retrain"``; its embeddings are
    the exact ``e_k = θ_T − θ_T^(−k)``. Counterfactual models are cached on the
    run, so a second behaviour costs only forward passes.
    """
    _ = run.pipeline  # fail early, with the message that says how to load a run for retraining
    K = run.num_stages
    pending = [k for k in range(1, K + 1) if ("retrained", k) not in run._cache]
    total = sum(run.stage_records[j - 1].steps for k in pending for j in range(k + 1, K + 1))
    with progress_bar("retraining without each stage", total, enabled=progress) as advance:
        for k in pending:
            skipped_stage_model(run, k, advance=advance)

    return _retrained_attribution(
        run, behaviour,
        [(record.name, k, skipped_stage_model(run, k), retrain_seconds(run, k))
         for k, record in enumerate(run.stage_records, start=1)],
        sign_convention(behaviour), run.counterfactual_notes())


def _retrained_attribution(run: Run, behaviour, counterfactuals: list[tuple[str, int, dict, float]],
                           convention: str, notes: list[str]) -> Attribution:
    """An ``Attribution`` with ``method="retrain"`` from ``(label, stage index, state dict, seconds)`` per row."""
    final_model = run.build_model()
    final_params = dict(final_model.named_parameters())
    with torch.no_grad():
        final_values = behaviour(final_model).detach()
    effects, embeddings = [], []
    for label, k, state, seconds in counterfactuals:
        counterfactual = run.build_model()
        counterfactual.load_state_dict(state)
        with torch.no_grad():
            effects.append(final_values - behaviour(counterfactual).detach())
        exact = {n: (final_params[n] - p).detach() for n, p in counterfactual.named_parameters()}
        embeddings.append(StageEmbedding(label, k, "retrain", exact, seconds))
    return Attribution(
        stages=[c[0] for c in counterfactuals],
        effects=torch.stack(effects).double().numpy(),
        method="retrain",
        mode="exact",
        behaviour=behaviour_name(behaviour),
        final_values=final_values.double().numpy(),
        seconds=[c[3] for c in counterfactuals],
        embeddings=embeddings,
        sign_convention=convention,
        notes=notes,
    )


def source_removal_start(run: Run, k: int) -> tuple[dict[str, torch.Tensor], Optional[dict[str, torch.Tensor]],
                                                   Optional[str]]:
    """Where a re-run of stage k starts: ``θ^(k−1)`` and the optimizer state stage k was handed (and its class)."""
    carries = run.stage_records[k - 1].carry_optimizer_state and k >= 2
    carried = run.optimizer_state(k - 1) if carries else None
    carried_from = run.stage_records[k - 2].optimizer_class if carries else None
    return dict(run.checkpoint(k - 1)), carried, carried_from


def without_source_model(run: Run, k: int, source: str, *, weight: float = 0.0,
                         advance=lambda: None) -> dict[str, torch.Tensor]:
    """State dict of the model trained with ``source`` of stage k at ``weight`` (0: removed), all else as recorded.

    Stage k restarts from ``θ^(k−1)`` and the optimizer state it was handed, and
    replays its recorded minibatches; the later stages replay as recorded.
    """
    key = ("retrained-source", k, source, float(weight))
    if key not in run._cache:
        if source not in run.sources(k):
            raise KeyError(f"stage {run.stages[k - 1]!r} has no data source {source!r}; its sources: {run.sources(k)}")
        start = time.perf_counter()
        initial, carried, carried_from = source_removal_start(run, k)
        model = replay(run, k, initial, carried, carried_from=carried_from, advance=advance,
                       source_weights={k: {source: weight}})
        state = {n: t.detach().clone() for n, t in model.state_dict().items()}
        run._cache[key] = (state, time.perf_counter() - start)
    return run._cache[key][0]


def retrain_source_effects(run: Run, behaviour: Callable[[torch.nn.Module], torch.Tensor], *,
                           progress: bool = True) -> Attribution:
    """``τ_k,j = f(θ_T) − f(θ_T without source j of stage k)`` for every named source, by retraining.

    Same layout as :func:`~stagecredit.attribute_sources`: ``stages`` are
    ``"stage/source"`` labels. Retrained models are cached on the run.
    """
    from stagecredit.estimators.sources import source_label, source_notes, source_sign_convention, sourced_pairs

    _ = run.pipeline
    pairs = sourced_pairs(run)
    pending = [(k, s) for k, s in pairs if ("retrained-source", k, s, 0.0) not in run._cache]
    total = sum(run.stage_records[j - 1].steps for k, _ in pending for j in range(k, run.num_stages + 1))
    with progress_bar("retraining without each source", total, enabled=progress) as advance:
        for k, source in pending:
            without_source_model(run, k, source, advance=advance)
    return _retrained_attribution(
        run, behaviour,
        [(source_label(run.stages[k - 1], source), k, without_source_model(run, k, source),
          retrain_source_seconds(run, k, source)) for k, source in pairs],
        source_sign_convention(behaviour), source_notes(run))
