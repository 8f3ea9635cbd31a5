"""Stage effects on a behaviour from stage embeddings, without retraining."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Union

import numpy as np
import torch

from stagecredit.behaviours.evaluate import behaviour_at, behaviour_jvp
from stagecredit.estimators.embedding import METHODS, StageEmbedding, stage_embeddings
from stagecredit.storage.run import Run

MODES = ("linear", "model")

SIGN_CONVENTION = (
    "effect τ_k = f(final model) − f(model trained without stage k). For a loss-like behaviour, "
    "τ_k > 0 means stage k made it worse (blame), τ_k < 0 means stage k helped (credit)."
)
SIGN_CONVENTION_SCORE = (
    "effect τ_k = f(final model) − f(model trained without stage k). For a score where higher is better "
    "(e.g. accuracy), τ_k > 0 means stage k raised it (credit), τ_k < 0 means it lowered it (blame)."
)


def sign_convention(behaviour: Callable) -> str:
    """The sentence that states what the sign of an effect on ``behaviour`` means."""
    return SIGN_CONVENTION_SCORE if getattr(behaviour, "higher_is_better", False) else SIGN_CONVENTION


@dataclasses.dataclass
class Attribution:
    """Estimated stage effects ``τ̂_k(f)`` for every value of one behaviour.

    ``effects[k, i]`` is the effect of stage ``stages[k]`` on behaviour value ``i``,
    in the behaviour's own unit (e.g. nats for a cross-entropy loss).
    """

    stages: list[str]
    effects: np.ndarray  # [K, N]
    method: str
    mode: str
    behaviour: str
    final_values: np.ndarray  # f(θ_T), [N]
    seconds: list[float]  # per stage: embedding + scoring
    embeddings: list[StageEmbedding]
    sign_convention: str = SIGN_CONVENTION
    notes: list[str] = dataclasses.field(default_factory=list)  # what skipping some stages means
    settings: dict = dataclasses.field(default_factory=dict)  # the estimator's settings (aa-curvature's options)

    def embedding(self, k: Union[int, str]) -> dict[str, torch.Tensor]:
        """``e_k`` as parameter tensors; ``k`` is a 0-based position in ``stages`` or a stage name."""
        index = self.stages.index(k) if isinstance(k, str) else k
        return self.embeddings[index].vector

    @property
    def higher_is_better(self) -> bool:
        return "higher is better" in self.sign_convention

    def totals(self) -> np.ndarray:
        """Mean effect per stage over the N behaviour values, ``[K]``."""
        return self.effects.mean(axis=1)

    def to_dict(self) -> dict:
        return {
            "behaviour": self.behaviour,
            "method": self.method,
            "mode": self.mode,
            "sign_convention": self.sign_convention,
            "notes": self.notes,
            "settings": self.settings,
            "stages": self.stages,
            "mean_effect": self.totals().tolist(),
            "seconds": self.seconds,
            "effects": self.effects.tolist(),
        }


def behaviour_name(behaviour: Callable) -> str:
    return getattr(behaviour, "name", getattr(behaviour, "__name__", type(behaviour).__name__))


def attribute(run: Run, behaviour: Callable[[torch.nn.Module], torch.Tensor], method: str = "aa",
              mode: str = "linear", *, curvature=None, progress: bool = True) -> Attribution:
    """Estimate every stage's effect on ``behaviour`` (DESIGN §3).

    ``mode="linear"``: ``τ̂_k = ∇f(θ_T)·e_k``, one forward-mode JVP per stage over
    the whole evaluation set. ``mode="model"``: ``τ̂_k = f(θ_T) − f(θ_T − e_k)``,
    one forward pass per stage; works for non-differentiable metrics.
    ``curvature``: a ``CurvatureOptions`` for ``method="aa-curvature"`` (default scheme: segments).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    embeddings = stage_embeddings(run, method, curvature, progress=progress)
    att = score_embeddings(run, behaviour, embeddings, method, mode, sign_convention(behaviour),
                           run.counterfactual_notes())
    att.settings = estimator_settings(method, curvature)
    return att


def estimator_settings(method: str, curvature=None) -> dict:
    """What an attribution records of how it was made: ``aa-curvature``'s options (the default where none given)."""
    if method != "aa-curvature":
        return {}
    from stagecredit.estimators.curvature_propagation import CurvatureOptions

    return {"curvature_options": (curvature or CurvatureOptions()).to_dict()}


def score_embeddings(run: Run, behaviour: Callable[[torch.nn.Module], torch.Tensor], embeddings: list,
                     method: str, mode: str, convention: str, notes: list[str]) -> Attribution:
    """The effects of embeddings ``e`` (``θ' ≈ θ_T − e``, one row each, labelled by ``e.stage``) on ``behaviour``."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    model = run.build_model()
    built = {name: p.detach() for name, p in model.named_parameters()}
    missing = [name for name in run.parameter_names if name not in built]
    if missing:
        raise ValueError(f"the model built for this run lacks the recorded parameters {missing[:5]}")
    # parameters no stage trains keep the values the model was loaded with
    final = {name: built[name] for name in run.parameter_names}
    rows, seconds = [], []
    final_values = behaviour_at(model, behaviour, final) if mode == "model" else None
    for emb in embeddings:
        start = time.perf_counter()
        if mode == "linear":
            value, derivative = behaviour_jvp(model, behaviour, final, emb.vector)
            final_values = value if final_values is None else final_values
            rows.append(derivative)
        else:
            edited = {name: final[name] - emb.vector[name] for name in final}
            rows.append(final_values - behaviour_at(model, behaviour, edited))
        seconds.append(emb.seconds + time.perf_counter() - start)
    if final_values is None:  # no embeddings: still report f(θ_T)
        final_values = behaviour_at(model, behaviour, final)
    return Attribution(
        stages=[e.stage for e in embeddings],
        effects=torch.stack(rows).double().numpy() if rows else np.zeros((0, len(final_values))),
        method=method,
        mode=mode,
        behaviour=behaviour_name(behaviour),
        final_values=final_values.double().numpy(),
        seconds=seconds,
        embeddings=embeddings,
        sign_convention=convention,
        notes=notes,
    )
