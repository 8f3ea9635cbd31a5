"""From blame to repair: edit or re-run the accountable stage, and measure what it buys on held-out data.

Interventions compared (every one evaluated on the test split; every choice
made on the validation split):

* ``do nothing`` — the final model ``θ_T``;
* ``stage edit`` — ``θ_T − α e_k`` for the blamed stage k, ``α`` chosen on validation;
* ``source edit`` — ``θ_T − α e_{k,j}`` for the blamed source j of stage k;
* ``targeted re-run`` — re-run stage k without source j (or down-weighted), then the later stages;
* ``drop stage, retrain`` — the naive fix: skip stage k and re-run the later stages.

An edit costs one attribution and a few forward passes; a re-run costs the
optimizer steps it replays. ``α`` maximises validation worst-group accuracy
among the values whose validation accuracy stays within ``max_accuracy_drop``
of the final model's (``α = 0``, doing nothing, always qualifies).
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from stagecredit.behaviours.evaluate import behaviour_at
from stagecredit.behaviours.loss import GroupMean, PerExampleCorrect, PerExampleLoss
from stagecredit.estimators.attribute import attribute, estimator_settings
from stagecredit.estimators.sources import attribute_sources, source_label
from stagecredit.progress import progress_bar
from stagecredit.storage.atomic import atomic_save_tensors, atomic_write_json
from stagecredit.storage.run import Run

DEFAULT_ALPHAS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


@dataclasses.dataclass
class GroupedSplit:
    """An evaluation set with one group label (``0..G-1``) per example; batches are ``(*inputs, labels)``."""

    data: Any
    groups: torch.Tensor

    def __post_init__(self) -> None:
        self.groups = torch.as_tensor(self.groups, dtype=torch.long)
        n = len(PerExampleCorrect(self.data))
        if len(self.groups) != n:
            raise ValueError(f"{len(self.groups)} group labels for {n} examples")


@dataclasses.dataclass
class RepairSplits:
    """Validation (to choose the blamed stage/source and α) and test (to report) sets, with group names."""

    validation: GroupedSplit
    test: GroupedSplit
    group_names: list[str]
    loss_fn: Optional[Callable[[torch.nn.Module, Any], torch.Tensor]] = None  # per-example; default cross-entropy

    def __post_init__(self) -> None:
        for split in (self.validation, self.test):
            if not isinstance(split, GroupedSplit):
                raise TypeError("validation and test must be GroupedSplit(data, groups)")
        count = int(max(self.validation.groups.max(), self.test.groups.max())) + 1
        if len(self.group_names) < count:
            raise ValueError(f"{count} groups but only {len(self.group_names)} group names")


@dataclasses.dataclass
class GroupScores:
    """Accuracy of one model on one split: overall, per group, worst group (fractions in [0, 1])."""

    accuracy: float
    per_group: list[float]

    @property
    def worst_group(self) -> float:
        return min(self.per_group)

    @classmethod
    def of(cls, correct: torch.Tensor, groups: torch.Tensor, count: int) -> "GroupScores":
        per_group = [float(correct[groups == g].mean()) for g in range(count)]
        return cls(float(correct.mean()), per_group)


@dataclasses.dataclass
class Intervention:
    """One candidate fix, its measured accuracy, what it cost, and its checkpoint."""

    name: str
    description: str
    validation: GroupScores
    test: GroupScores
    optimizer_steps: int  # training steps replayed (0 for edits)
    seconds: float  # wall-clock to produce it, on this machine
    alpha: Optional[float] = None
    checkpoint: Optional[str] = None  # file name under the output folder
    state: Optional[dict[str, torch.Tensor]] = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass
class InterventionReport:
    """Before/after comparison of the interventions on held-out data; ``recommended`` is chosen on validation."""

    stage: str
    source: Optional[str]
    method: str
    source_method: str
    group_names: list[str]
    interventions: list[Intervention]
    recommended: str
    blame: dict[str, Any]  # what the estimators said, on validation, before any fix
    max_accuracy_drop: float
    settings: dict = dataclasses.field(default_factory=dict)  # per estimator used: its settings (aa-curvature's)

    def get(self, name: str) -> Intervention:
        for item in self.interventions:
            if item.name == name:
                return item
        raise KeyError(f"no intervention {name!r}; have {[i.name for i in self.interventions]}")

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "source": self.source,
            "method": self.method,
            "source_method": self.source_method,
            "group_names": self.group_names,
            "recommended": self.recommended,
            "max_accuracy_drop": self.max_accuracy_drop,
            "blame": self.blame,
            "settings": self.settings,
            "units": "accuracies are fractions in [0, 1]; seconds are wall-clock on this machine",
            "interventions": [
                {
                    "name": i.name, "description": i.description, "alpha": i.alpha, "checkpoint": i.checkpoint,
                    "optimizer_steps": i.optimizer_steps, "seconds": i.seconds,
                    "validation": {"accuracy": i.validation.accuracy, "worst_group": i.validation.worst_group,
                                   "per_group": i.validation.per_group},
                    "test": {"accuracy": i.test.accuracy, "worst_group": i.test.worst_group,
                             "per_group": i.test.per_group},
                }
                for i in self.interventions
            ],
        }

    def table(self):
        from stagecredit.reports.tables import Table

        base = self.get("do nothing").test
        rows = []
        for i in self.interventions:
            rows.append([i.name + (" ★" if i.name == self.recommended else ""),
                         "" if i.alpha is None else f"{i.alpha:g}",
                         f"{100 * i.test.worst_group:.1f}", f"{100 * (i.test.worst_group - base.worst_group):+.1f}",
                         f"{100 * i.test.accuracy:.1f}", f"{100 * (i.test.accuracy - base.accuracy):+.1f}",
                         *[f"{100 * a:.1f}" for a in i.test.per_group],
                         str(i.optimizer_steps), f"{i.seconds:.2f}"])
        target = f"stage '{self.stage}'" + (f", source '{self.source}'" if self.source else "")
        return Table(
            title=f"Repair of {target}: test accuracy (%) before and after each intervention",
            columns=["intervention", "α", "worst group", "Δ worst", "average", "Δ average",
                     *self.group_names, "training steps", "seconds"],
            rows=rows,
            note=(f"Blame chosen on the validation split with '{self.method}' stage estimates and '{self.source_method}' "
                  f"source estimates (no retraining); α chosen on "
                  f"validation as the value with the best worst-group accuracy whose accuracy stays within "
                  f"{100 * self.max_accuracy_drop:g} points of the final model's. ★ recommended: best validation "
                  "worst-group accuracy within that limit, least compute on ties. Δ: change against doing nothing. "
                  "Training steps: optimizer steps replayed; edits need none. Seconds: wall-clock to produce the fix "
                  "on this machine (the edit's estimator and α search, or the re-run)."),
        )

    def to_json(self, path) -> None:
        atomic_write_json(Path(path), self.to_dict())


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


class _Scorer:
    """Group accuracies of parameter sets on the validation and test splits."""

    def __init__(self, run: Run, splits: RepairSplits) -> None:
        self.model = run.build_model()
        self.final = {n: p.detach() for n, p in self.model.named_parameters()}
        self.splits = splits
        self.count = len(splits.group_names)
        self.correct = {"validation": PerExampleCorrect(splits.validation.data),
                        "test": PerExampleCorrect(splits.test.data)}

    def score(self, params: dict[str, torch.Tensor], split: str) -> GroupScores:
        correct = behaviour_at(self.model, self.correct[split], params)
        return GroupScores.of(correct, getattr(self.splits, split).groups, self.count)

    def edited(self, embedding: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        return {n: self.final[n] - alpha * embedding[n].to(self.final[n].dtype) for n in self.final}

    def of_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: state[n] for n in self.final}


def choose_alpha(scores: dict[float, GroupScores], baseline: GroupScores, max_drop: float) -> float:
    """Best validation worst-group accuracy among α whose accuracy stays within ``max_drop``; smallest α on ties."""
    allowed = [a for a, s in scores.items() if s.accuracy >= baseline.accuracy - max_drop - 1e-12]
    return max(sorted(allowed), key=lambda a: scores[a].worst_group)


def find_blame(run: Run, splits: RepairSplits, method: str = "aa", source_method: str = "aa-curvature",
               curvature=None, *, stage: Optional[str] = None, source: Optional[str] = None,
               progress: bool = True) -> dict[str, Any]:
    """Which stage (and source within it) the estimators blame for the worst validation group's loss."""
    if stage is not None and stage not in run.stages:
        raise ValueError(f"unknown stage {stage!r}; the run's stages are {run.stages}")
    scorer = _Scorer(run, splits)
    base = scorer.score(scorer.final, "validation")
    worst = int(np.argmin(base.per_group))
    loss = GroupMean(PerExampleLoss(splits.validation.data, splits.loss_fn), splits.validation.groups,
                     splits.group_names)
    started = time.perf_counter()
    stage_att = attribute(run, loss, method=method, mode="linear", curvature=curvature, progress=progress)
    stage_effects = {s: float(stage_att.effects[k, worst]) for k, s in enumerate(run.stages)}
    chosen_stage = stage or max(stage_effects, key=stage_effects.get)
    k = run.stages.index(chosen_stage) + 1
    out: dict[str, Any] = {"worst_validation_group": splits.group_names[worst],
                           "behaviour": f"mean validation loss of group '{splits.group_names[worst]}' "
                                        "(in the loss's own unit, e.g. nats for cross-entropy)",
                           "stage_effects": stage_effects, "stage": chosen_stage, "source": None,
                           "source_effects": {}, "stage_seconds": time.perf_counter() - started,
                           "source_seconds": 0.0}
    sources = run.sources(k)
    if source is not None and source not in sources:
        raise ValueError(f"stage {chosen_stage!r} has no data source {source!r}; its sources: {sources or 'none'}")
    if sources:
        started = time.perf_counter()
        source_att = attribute_sources(run, loss, method=source_method, mode="linear", curvature=curvature,
                                       progress=progress)
        effects = {label: float(source_att.effects[i, worst]) for i, label in enumerate(source_att.stages)}
        out["source_effects"] = effects
        mine = {s: effects[source_label(chosen_stage, s)] for s in sources}
        out["source"] = source or max(mine, key=mine.get)
        out["source_seconds"] = time.perf_counter() - started
    return out


def intervene(run: Run, splits: RepairSplits, *, stage: Optional[str] = None, source: Optional[str] = None,
              method: str = "aa", source_method: str = "aa-curvature", curvature=None,
              alphas: Sequence[float] = DEFAULT_ALPHAS,
              rerun_weight: float = 0.0, max_accuracy_drop: float = 0.02, retrain: bool = True,
              out: Optional[Path] = None, progress: bool = True) -> InterventionReport:
    """Blame a stage (and source), try every intervention, measure them on the test split.

    ``method`` estimates stage effects (blame, stage edit); ``source_method``
    estimates source effects (blame, source edit) — ``aa-curvature`` by
    default, because a source's effect builds up inside its own stage, where
    the ``H = 0`` recurrence overshoots.
    ``stage``/``source``: skip the blame search and repair these. ``retrain``:
    also run the re-run interventions (they need the run's pipeline).
    ``out``: write ``interventions.json``, every candidate's checkpoint
    (safetensors) and ``repaired.safetensors`` (the recommended one) there.
    """
    from stagecredit.estimators.embedding import stage_embeddings
    from stagecredit.estimators.sources import source_embeddings
    from stagecredit.validation.retrain import (
        retrain_seconds,
        retrain_source_seconds,
        skipped_stage_model,
        without_source_model,
    )

    if any(a <= 0 for a in alphas):
        raise ValueError(f"edit strengths α must be > 0, got {list(alphas)}")
    if retrain and run._pipeline is None:
        raise RuntimeError(f"the run at {run.path} was loaded without its pipeline, so its stages cannot be re-run: "
                           "load it with sc.Run.load(path, pipeline=pipe), or pass retrain=False to try the edits only")
    blame = find_blame(run, splits, method, source_method, curvature, stage=stage, source=source, progress=progress)
    k = run.stages.index(blame["stage"]) + 1
    chosen_source = blame["source"]
    scorer = _Scorer(run, splits)
    base_val = scorer.score(scorer.final, "validation")
    candidates = [Intervention("do nothing", "the final model as trained", base_val,
                               scorer.score(scorer.final, "test"), 0, 0.0, state=None)]

    def edit(name: str, description: str, embedding: dict[str, torch.Tensor], seconds: float) -> None:
        t0 = time.perf_counter()
        scores = {0.0: base_val, **{float(a): scorer.score(scorer.edited(embedding, a), "validation") for a in alphas}}
        alpha = choose_alpha(scores, base_val, max_accuracy_drop)
        params = scorer.edited(embedding, alpha)
        candidates.append(Intervention(name, description, scores[alpha], scorer.score(params, "test"), 0,
                                       seconds + time.perf_counter() - t0, alpha=alpha, state=params))

    embeddings = stage_embeddings(run, method, curvature, progress=progress)
    emb = embeddings[k - 1]
    edit("stage edit", f"θ_T − α·e_k for stage '{blame['stage']}' ({method} embedding)", emb.vector,
         emb.seconds)
    if chosen_source is not None:
        label = source_label(blame["stage"], chosen_source)
        source_emb = next(e for e in source_embeddings(run, source_method, curvature, progress=progress)
                          if e.stage == label)
        edit("source edit", f"θ_T − α·e_(k,j) for source '{chosen_source}' of stage '{blame['stage']}'",
             source_emb.vector, source_emb.seconds)

    if retrain:
        later = sum(run.stage_records[j - 1].steps for j in range(k + 1, run.num_stages + 1))
        total = later + (run.stage_records[k - 1].steps if chosen_source is not None else 0)
        with progress_bar("re-running for the interventions", total, enabled=progress) as advance:
            if chosen_source is not None:
                state = without_source_model(run, k, chosen_source, weight=rerun_weight, advance=advance)
                verb = "without" if rerun_weight == 0 else f"with weight {rerun_weight:g} on"
                params = scorer.of_state(state)
                candidates.append(Intervention(
                    "targeted re-run", f"re-run stage '{blame['stage']}' {verb} source '{chosen_source}', then the "
                    "later stages", scorer.score(params, "validation"), scorer.score(params, "test"),
                    total, retrain_source_seconds(run, k, chosen_source, rerun_weight), state=state))
            state = skipped_stage_model(run, k, advance=advance)
            params = scorer.of_state(state)
            candidates.append(Intervention(
                "drop stage, retrain", f"skip stage '{blame['stage']}' entirely and re-run the later stages",
                scorer.score(params, "validation"), scorer.score(params, "test"), later, retrain_seconds(run, k),
                state=state))

    allowed = [c for c in candidates if c.validation.accuracy >= base_val.accuracy - max_accuracy_drop - 1e-12]
    best = max(allowed, key=lambda c: (round(c.validation.worst_group, 6), -c.optimizer_steps, -c.seconds))
    report = InterventionReport(blame["stage"], chosen_source, method, source_method, list(splits.group_names),
                                candidates,
                                best.name, blame, max_accuracy_drop,
                                {m: estimator_settings(m, curvature) for m in (method, source_method)
                                 if m == "aa-curvature"})
    if out is not None:
        write_interventions(run, report, Path(out))
    return report


def write_interventions(run: Run, report: InterventionReport, out: Path) -> None:
    """Every candidate's full state dict (edited parameters, the final model's buffers) as safetensors, plus JSON."""
    out.mkdir(parents=True, exist_ok=True)
    final_state = run.checkpoint(run.num_stages)
    for item in report.interventions:
        state = {n: t.contiguous() for n, t in {**final_state, **(item.state or {})}.items()}
        if item.state is not None:  # 'do nothing' is the run's own final checkpoint
            item.checkpoint = f"{_slug(item.name)}.safetensors"
            atomic_save_tensors(out / item.checkpoint, state)
        if item.name == report.recommended:
            atomic_save_tensors(out / "repaired.safetensors", state)
    report.to_json(out / "interventions.json")
