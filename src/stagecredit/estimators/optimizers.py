"""Which recorded optimizers the dynamics-aware estimators understand."""

from __future__ import annotations

from typing import Optional

import torch

from stagecredit.estimators.propagation import ADAM, SGD
from stagecredit.storage.run import Run, StageRecord

SUPPORTED = {
    "torch.optim.sgd.SGD": SGD,
    "torch.optim.adam.Adam": ADAM,
    "torch.optim.adamw.AdamW": ADAM,
}
STATE_KEY = {SGD: "momentum_buffer", ADAM: "exp_avg"}


class UnsupportedOptimizerError(ValueError):
    """A stage's optimizer (or one of its settings) has no linearised update here."""


def optimizer_kind(record: StageRecord, method: str) -> str:
    kind = SUPPORTED.get(record.optimizer_class)
    if kind is None:
        raise UnsupportedOptimizerError(
            f"stage {record.name!r} was trained with {record.optimizer_class}, whose update the {method!r} "
            f"estimator cannot propagate (supported: torch.optim.SGD, Adam, AdamW). "
            f"method='delta' still works on this run."
        )
    return kind


def check_step_settings(record: StageRecord, steps: list[dict], method: str) -> None:
    for group in steps[0]["groups"] if steps else []:
        if group.get("maximize", False):
            raise UnsupportedOptimizerError(
                f"stage {record.name!r} uses maximize=True, which {method!r} does not model; method='delta' still works."
            )


def stage_steps(run: Run, k: int) -> list[dict]:
    """Recorded steps of stage k, with AdamW's decay marked decoupled whatever the torch version recorded."""
    steps = run.steps(k)
    if run.stage_records[k - 1].optimizer_class == "torch.optim.adamw.AdamW":
        # AdamW's param groups gained the 'decoupled_weight_decay' key only in recent torch releases. Marked in the
        # run's cached step log itself (a fact about the run), not in a copy of every step: a long stage's log
        # holds tens of thousands of them.
        for step in steps:
            for group in step["groups"]:
                group["decoupled_weight_decay"] = True
    return steps


def clip_coefficients(run: Run, k: int) -> Optional[list[float]]:
    """Per step of stage k, the factor clipping scaled its gradient by (None: the stage did not clip).

    ``min(1, max_grad_norm / (‖g‖ + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` computes it.
    """
    limit = run.stage_records[k - 1].max_grad_norm
    if limit is None:
        return None
    norms = [s.get("grad_norm") for s in run.steps(k)]
    if any(n is None for n in norms):
        raise ValueError(f"stage {run.stages[k - 1]!r} clipped its gradients, but the run holds no norm before "
                         "clipping for some of its steps")
    return [min(1.0, limit / (n + 1e-6)) for n in norms]


def stage_kind(run: Run, k: int, method: str) -> str:
    record = run.stage_records[k - 1]
    kind = optimizer_kind(record, method)
    check_step_settings(record, run.steps(k), method)
    return kind


def stepped_names(run: Run, k: int) -> set[str]:
    """The parameters stage k's optimizer stepped at least once; the others did not move in stage k.

    torch's optimizers skip a parameter whose gradient is None (frozen with
    ``requires_grad=False``, or unused by the loss), weight decay included.
    Adam and SGD with momentum keep state for every parameter they stepped
    (state carried in from the stage before and left as it was does not
    count). Plain SGD keeps none: a parameter whose value did not change
    through the stage counts as not stepped, which for plain SGD is the same
    map (no gradient and no decay moved it).
    """
    key = ("stepped", k)
    if key not in run._cache:
        held = run.held_names(k)
        state = run.optimizer_state(k)
        if any(name.endswith(("/exp_avg", "/momentum_buffer")) for name in state):
            source = carried_state_source(run, k)
            carried = run.optimizer_state(source) if source is not None else {}

            def stepped_here(n: str) -> bool:
                mark = f"{n}/step" if f"{n}/exp_avg" in state else f"{n}/momentum_buffer"
                if mark not in state:
                    return False
                return mark not in carried or not torch.equal(torch.as_tensor(state[mark]), torch.as_tensor(carried[mark]))

            stepped = {n for n in held if stepped_here(n)}
        else:
            before, after = run.parameters(k - 1), run.parameters(k)
            stepped = {n for n in held if not torch.equal(before[n], after[n])}
        run._cache[key] = stepped
    return run._cache[key]


def carried_state_source(run: Run, k: int) -> Optional[int]:
    """The stage whose end-of-stage optimizer state stage ``k`` starts from (None: fresh)."""
    return k - 1 if run.stage_records[k - 1].carry_optimizer_state and k >= 2 else None


def counterfactual_state_source(run: Run, skipped: int) -> Optional[int]:
    """With stage ``skipped`` removed, the stage whose state the next stage starts from.

    The counterfactual carries the state from the end of stage ``skipped − 1`` when
    that stage ran the same optimizer class; otherwise the next stage starts fresh.
    """
    prev = skipped - 1
    nxt = skipped + 1
    if prev < 1 or nxt > run.num_stages or not run.stage_records[nxt - 1].carry_optimizer_state:
        return None
    if run.stage_records[prev - 1].optimizer_class != run.stage_records[nxt - 1].optimizer_class:
        return None
    return prev


def adam_preconditioner(run: Run, k: int, name: str, group_hp: dict) -> torch.Tensor:
    """``1 / (√v̂ + ε)`` from the optimizer state recorded at the end of stage k."""
    state = run.optimizer_state(k)
    key = f"{name}/max_exp_avg_sq" if group_hp.get("amsgrad", False) else f"{name}/exp_avg_sq"
    if key not in state:
        raise KeyError(f"stage {k} optimizer state has no {key!r}; was it trained with Adam/AdamW?")
    t = float(state[f"{name}/step"])
    beta2 = group_hp["betas"][1]
    v_hat = state[key].to(torch.float64) / (1 - beta2**t)
    return 1.0 / (v_hat.sqrt() + group_hp["eps"])


def live_adam_preconditioner(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, hp: dict) -> torch.Tensor:
    """``1 / (√v̂ + ε)`` from a live Adam/AdamW optimizer's state for ``param`` (after its latest step)."""
    state = optimizer.state[param]
    v = state["max_exp_avg_sq"] if hp.get("amsgrad", False) else state["exp_avg_sq"]
    t = float(state["step"])
    return 1.0 / ((v / (1 - hp["betas"][1] ** t)).sqrt() + hp["eps"])
