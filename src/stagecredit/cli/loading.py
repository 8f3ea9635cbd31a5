"""Resolving ``module:function`` (or ``path/to/file.py:function``) specs given on the command line."""

from __future__ import annotations

import importlib
import inspect
import importlib.util
import sys
from pathlib import Path
from typing import Any


class SpecError(ValueError):
    pass


def load_object(spec: str) -> Any:
    """Import ``module:attr`` or ``file.py:attr`` and return the attribute."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise SpecError(f"expected 'module:function' or 'file.py:function', got {spec!r}")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise SpecError(f"no such file: {path}")
        name = f"_stagecredit_user_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise SpecError(f"cannot import module {target!r} from {spec!r}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"{target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_pipeline(spec: str):
    from stagecredit.recording.stage import Pipeline

    factory = load_object(spec)
    pipeline = factory() if _is_factory(factory) else factory
    if not isinstance(pipeline, Pipeline):
        raise SpecError(f"{spec!r} must be (or return) a stagecredit.Pipeline, got {type(pipeline).__name__}")
    return pipeline


def _is_factory(obj: Any) -> bool:
    """A plain function that takes no required arguments builds the thing we want."""
    if not inspect.isfunction(obj):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in inspect.signature(obj).parameters.values())


def load_behaviour(spec: str, pipeline=None):
    """A behaviour from ``spec``: a callable ``model -> Tensor[N]``, or a dataset / tensor tuple.

    A dataset becomes the per-example loss under the last stage's ``loss_fn``
    (which must then return one loss per example).
    """
    from stagecredit.behaviours.loss import PerExampleLoss

    obj = load_object(spec)
    if _is_factory(obj):
        obj = obj()
    if isinstance(obj, (tuple, list)) or hasattr(obj, "__getitem__"):
        if pipeline is None:
            raise SpecError(f"{spec!r} gave a dataset; a pipeline is needed to know its loss function")
        return PerExampleLoss(obj, pipeline.stages[-1].loss_fn, name=f"per-example loss on {spec}")
    if not callable(obj):
        raise SpecError(f"{spec!r} must give a behaviour (model -> Tensor[N]) or a dataset, got {type(obj).__name__}")
    return obj


def load_splits(spec: str):
    """A ``RepairSplits`` (validation and test sets with group labels) from ``spec``."""
    from stagecredit.repair.intervene import RepairSplits

    obj = load_object(spec)
    if _is_factory(obj):
        obj = obj()
    if not isinstance(obj, RepairSplits):
        raise SpecError(f"{spec!r} must be (or return) a stagecredit.RepairSplits, got {type(obj).__name__}")
    return obj
