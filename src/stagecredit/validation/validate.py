"""Run estimators and retraining side by side and score the estimators."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from stagecredit.estimators.attribute import MODES, Attribution, attribute, behaviour_name
from stagecredit.storage.atomic import atomic_write_json
from stagecredit.storage.run import Run
from stagecredit.validation.ceilings import TruthCeilings, truth_ceilings
from stagecredit.validation.metrics import pearson, relative_error, sign_agreement, spearman
from stagecredit.validation.retrain import retrain_effects


@dataclasses.dataclass
class ValidationReport:
    """Per stage × method × mode: agreement with retraining and cost.

    ``rows`` hold ``stage, method, mode, pearson, spearman, sign_agreement,
    relative_error, mean_estimate, mean_retrained, seconds, retrain_seconds``;
    seconds are wall-clock on this machine. With ``ceilings`` (``validate(...,
    ceilings=True)``) each row also holds ``pearson_derivative`` (agreement with
    the scaled partial removal, which first-order estimators approximate) and
    the stage's ``reproducibility``, ``ceiling`` and ``linearity``.
    """

    behaviour: str
    rows: list[dict]
    truth: Attribution
    attributions: list[Attribution]
    forward_seconds: float
    ceilings: Optional[TruthCeilings] = None

    @property
    def sign_convention(self) -> str:
        return self.truth.sign_convention

    def to_dict(self) -> dict:
        return {
            "behaviour": self.behaviour,
            "sign_convention": self.sign_convention,
            "forward_seconds": self.forward_seconds,
            "settings": {a.method: a.settings for a in self.attributions if a.settings},
            "rows": self.rows,
            **({"ceilings": self.ceilings.to_dict()} if self.ceilings is not None else {}),
        }

    def to_json(self, path) -> None:
        atomic_write_json(Path(path), self.to_dict())

    def to_markdown(self) -> str:
        from stagecredit.reports.tables import validation_markdown

        return validation_markdown(self)


def validate(run: Run, behaviour: Callable[[torch.nn.Module], torch.Tensor],
             methods: Sequence[str] = ("delta", "aa"), modes: Sequence[str] = MODES, *,
             curvature=None, ceilings: Union[bool, dict] = False, progress: bool = True) -> ValidationReport:
    """Compare every ``method × mode`` against the retraining ground truth, stage by stage.

    ``curvature``: ``CurvatureOptions`` for ``"aa-curvature"``. ``ceilings``: also
    measure how reproducible and how linear the ground truth is
    (:func:`~stagecredit.truth_ceilings`, two more retrainings per stage), which
    says how well any estimator could agree with it; a dict passes its settings
    (``{"epsilon": 0.1, "nudge": 0.01}``).
    """
    truth = retrain_effects(run, behaviour, progress=progress)
    forward_seconds = _forward_seconds(run, behaviour)
    bounds = _ceilings(run, behaviour, truth, ceilings, sources=False, progress=progress)

    attributions = [attribute(run, behaviour, method=method, mode=mode, curvature=curvature, progress=progress)
                    for method in methods for mode in modes]
    return ValidationReport(behaviour_name(behaviour), comparison_rows(truth, attributions, bounds), truth,
                            attributions, forward_seconds, bounds)


def validate_sources(run: Run, behaviour: Callable[[torch.nn.Module], torch.Tensor],
                     methods: Sequence[str] = ("delta", "aa"), modes: Sequence[str] = MODES, *,
                     curvature=None, ceilings: Union[bool, dict] = False,
                     progress: bool = True) -> ValidationReport:
    """Like :func:`validate`, one row per ``"stage/source"``: estimates against retraining without that source.

    ``ceilings``: also measure the truth's reproducibility and linearity per source
    (:func:`~stagecredit.truth_ceilings` with ``sources=True``); a dict passes its settings.
    """
    from stagecredit.estimators.sources import attribute_sources
    from stagecredit.validation.retrain import retrain_source_effects

    truth = retrain_source_effects(run, behaviour, progress=progress)
    forward_seconds = _forward_seconds(run, behaviour)
    bounds = _ceilings(run, behaviour, truth, ceilings, sources=True, progress=progress)
    attributions = [attribute_sources(run, behaviour, method=method, mode=mode, curvature=curvature,
                                      progress=progress) for method in methods for mode in modes]
    return ValidationReport(behaviour_name(behaviour), comparison_rows(truth, attributions, bounds), truth,
                            attributions, forward_seconds, bounds)


def _ceilings(run: Run, behaviour, truth: Attribution, ceilings: Union[bool, dict], *, sources: bool,
              progress: bool) -> Optional[TruthCeilings]:
    if not ceilings:
        return None
    settings = ceilings if isinstance(ceilings, dict) else {}
    unknown = set(settings) - {"epsilon", "nudge"}
    if unknown:
        raise ValueError(f"ceilings settings are 'epsilon' and 'nudge'; got {sorted(unknown)}")
    return truth_ceilings(run, behaviour, sources=sources, truth=truth, progress=progress, **settings)


def _forward_seconds(run: Run, behaviour) -> float:
    model = run.build_model()
    start = time.perf_counter()
    with torch.no_grad():
        behaviour(model)
    return time.perf_counter() - start


def comparison_rows(truth: Attribution, attributions: Sequence[Attribution],
                    ceilings: Optional[TruthCeilings] = None) -> list[dict]:
    """One row per estimate row (stage, or stage/source) × attribution: agreement with ``truth`` and cost."""
    rows = []
    for att in attributions:
        for k, stage in enumerate(truth.stages):
            est, tru = att.effects[k], truth.effects[k]
            rows.append({
                "stage": stage,
                "method": att.method,
                "mode": att.mode,
                "pearson": pearson(est, tru),
                "spearman": spearman(est, tru),
                "sign_agreement": sign_agreement(est, tru),
                "relative_error": relative_error(est, tru),
                "mean_estimate": float(est.mean()),
                "mean_retrained": float(tru.mean()),
                "seconds": att.seconds[k],
                "retrain_seconds": truth.seconds[k],
            })
            if ceilings is not None:
                rows[-1].update({
                    "pearson_derivative": pearson(est, ceilings.derivative.effects[k]),
                    "reproducibility": float(ceilings.reproducibility[k]),
                    "ceiling": float(ceilings.ceiling[k]),
                    "linearity": float(ceilings.linearity[k]),
                })
    return rows
