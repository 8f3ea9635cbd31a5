"""Optimizer hyper-parameters and per-parameter state, as plain tensors and JSON."""

from __future__ import annotations

import numbers
from typing import Any

import torch

_SKIP_GROUP_KEYS = {"params", "foreach", "fused", "differentiable", "capturable"}


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, numbers.Number):
        return float(value) if isinstance(value, float) else value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return repr(value)


def group_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The hyper-parameters of every param group, read now (lr after the scheduler)."""
    return [
        {key: _jsonable(value) for key, value in group.items() if key not in _SKIP_GROUP_KEYS}
        for group in optimizer.param_groups
    ]


def param_names_by_group(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        missing = [p for p in group["params"] if id(p) not in names]
        if missing:
            raise ValueError("the optimizer holds tensors that are not parameters of the model")
        groups.append([names[id(p)] for p in group["params"]])
    return groups


def adam_step_count(optimizer: torch.optim.Optimizer) -> int | None:
    """Adam's bias-correction step counter after the latest step (None if not Adam-like)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:
                step = state["step"]
                return int(step.item() if isinstance(step, torch.Tensor) else step)
    return None


def state_tensors(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Per-parameter optimizer state flattened to ``"<param name>/<state key>"`` tensors."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            out[f"{names[id(param)]}/{key}"] = tensor.detach().clone()
    return out


def load_state_tensors(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, tensors: dict[str, torch.Tensor]
) -> None:
    """Put recorded per-parameter state into a freshly built optimizer (hyper-parameters untouched)."""
    params = dict(model.named_parameters())
    for flat_key, value in tensors.items():
        name, _, key = flat_key.rpartition("/")
        if name not in params:
            raise KeyError(f"optimizer state names parameter {name!r}, which the model does not have")
        optimizer.state[params[name]][key] = value.clone()
