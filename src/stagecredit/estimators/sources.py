"""Effects of removing one data source from one stage, without retraining.

The recorded end-of-stage tangent of a source (see
:mod:`stagecredit.estimators.source_tangents`) is carried through the later
stages by the chosen estimator, exactly like a stage perturbation:

* ``delta`` — the recorded tangent itself, no later dynamics;
* ``aa`` — the recorded tangent, later steps at ``H = 0``;
* ``aa-curvature`` — the source's own stage is replayed with each step's
  curvature kept (the recorded ``H = 0`` tangent ignores that the remaining
  data pull the parameters back, so it overshoots in long stages), then the
  later stages with their curvature; all sources travel in one pass.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from stagecredit.estimators.attribute import Attribution, estimator_settings, score_embeddings
from stagecredit.estimators.embedding import METHODS, StageEmbedding, aa_propagate
from stagecredit.storage.run import Run

SOURCE_SIGN_CONVENTION = (
    "effect τ_k,j = f(final model) − f(model trained without source j in stage k). For a loss-like behaviour, "
    "τ > 0 means the source made it worse (blame), τ < 0 means it helped (credit)."
)
SOURCE_SIGN_CONVENTION_SCORE = (
    "effect τ_k,j = f(final model) − f(model trained without source j in stage k). For a score where higher is "
    "better (e.g. accuracy), τ > 0 means the source raised it (credit), τ < 0 means it lowered it (blame)."
)


def source_label(stage: str, source: str) -> str:
    """How a (stage, source) pair is named in tables and results: ``"stage/source"``."""
    return f"{stage}/{source}"


def sourced_pairs(run: Run) -> list[tuple[int, str]]:
    """``(stage index, source name)`` for every named source of every stage, in training order."""
    pairs = [(k, name) for k in range(1, run.num_stages + 1) for name in run.sources(k)]
    if not pairs:
        raise ValueError(
            f"the run at {run.path} has no stage with named data sources; give a Stage its data as a dict, "
            "e.g. data={'web': web_ds, 'curated': curated_ds}"
        )
    return pairs


def source_embeddings(run: Run, method: str = "aa", curvature=None, *,
                      progress: bool = True) -> list[StageEmbedding]:
    """``e_{k,j}`` (``θ_T without source j of stage k ≈ θ_T − e_{k,j}``) for every source, cached on the run."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    options = None
    if method == "aa-curvature":
        from stagecredit.estimators.curvature_propagation import CurvatureOptions

        options = curvature or CurvatureOptions()
    key = ("source-embeddings", method, None if options is None else options.key())
    if key in run._cache:
        return run._cache[key]
    pairs = sourced_pairs(run)
    start = time.perf_counter()
    names = run.parameter_names
    dtype = run.parameters(run.num_stages)[names[0]].dtype
    if method == "aa-curvature":
        from stagecredit.estimators.curvature_propagation import curvature_source_tangents
        from stagecredit.progress import progress_bar

        tangents = {}
        stages = sorted({k for k, _ in pairs})
        total = sum(run.stage_records[k - 1].steps for k in stages)
        with progress_bar(f"{method}: sources within their stage", total, enabled=progress) as advance:
            for k in stages:
                for name, tangent in zip(run.sources(k), curvature_source_tangents(run, k, options, advance=advance)):
                    tangents[(k, name)] = tangent
    else:
        tangents = {pair: run.source_tangent(*pair) for pair in pairs}
    if method == "delta":
        finals = {pair: theta for pair, (theta, _) in tangents.items()}
    elif method == "aa":
        finals = {pair: aa_propagate(run, pair[0], *tangent) for pair, tangent in tangents.items()}
    else:
        from stagecredit.estimators.curvature_propagation import propagate_with_curvature

        entering: dict[int, list] = {}
        for pair in pairs:
            entering.setdefault(pair[0], []).append(tangents[pair])
        propagated = propagate_with_curvature(run, entering, options, progress=progress)
        position = {k: 0 for k in entering}
        finals = {}
        for pair in pairs:
            finals[pair] = propagated[pair[0]][position[pair[0]]]
            position[pair[0]] += 1
    seconds = (time.perf_counter() - start) / len(pairs)
    out = [StageEmbedding(source_label(run.stages[k - 1], name), k, method,
                          {n: (-finals[(k, name)][n]).to(dtype) for n in names}, seconds) for k, name in pairs]
    run._cache[key] = out
    return out


def source_sign_convention(behaviour: Callable) -> str:
    return SOURCE_SIGN_CONVENTION_SCORE if getattr(behaviour, "higher_is_better", False) else SOURCE_SIGN_CONVENTION


def attribute_sources(run: Run, behaviour: Callable[[torch.nn.Module], torch.Tensor], method: str = "aa",
                      mode: str = "linear", *, curvature=None, progress: bool = True) -> Attribution:
    """Estimate the effect of removing each data source of each stage on ``behaviour``.

    Returns an :class:`Attribution` whose ``stages`` are ``"stage/source"``
    labels (every named source of every stage, in training order) and whose
    ``effects[i, n] = f_n(θ_T) − f_n(θ_T without that source)``, estimated.
    Modes as in :func:`~stagecredit.attribute`.
    """
    embeddings = source_embeddings(run, method, curvature, progress=progress)
    att = score_embeddings(run, behaviour, embeddings, method, mode, source_sign_convention(behaviour),
                           source_notes(run))
    att.settings = estimator_settings(method, curvature)
    return att


def source_notes(run: Run) -> list[str]:
    return [
        "Removing a source of a stage means that stage replays the same minibatches with that source's examples "
        "contributing zero loss (the step's loss is still divided by the full batch size); later stages replay "
        "as recorded."
    ]


def blamed_source(att: Attribution, stage: Optional[str] = None, column: int = 0) -> str:
    """The source label with the largest blame on behaviour value ``column`` (optionally within one stage)."""
    labels = [s for s in att.stages if stage is None or s.split("/", 1)[0] == stage]
    if not labels:
        raise ValueError(f"stage {stage!r} has no named data sources in this attribution")
    sign = -1.0 if att.higher_is_better else 1.0
    return max(labels, key=lambda s: sign * att.effects[att.stages.index(s), column])
