"""A recorded run on disk: checkpoints and optimizer state in safetensors, the rest in JSON.

Layout::

    run.json                              manifest (written last: its presence marks a complete run)
    checkpoints/00_init.safetensors       θ^(0) (parameters and buffers)
    checkpoints/KK_<stage>.safetensors    θ^(k), end of stage k
    stages/KK_<stage>/optimizer.safetensors  optimizer state at the end of stage k
    stages/KK_<stage>/steps.json          per-step hyper-parameters, minibatch indices, loss
    stages/KK_<stage>/sources.safetensors first-order effect of removing each data source of
                                          stage k on its end state (stages with named sources)
    stages/KK_<stage>/checkpoints/step_NNNNNNN[.optimizer].safetensors
                                          parameters and optimizer state entering step N (every
                                          ``Pipeline.checkpoint_every`` steps)

Nothing is unpickled when a run is loaded.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import json
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import torch

from stagecredit.seeding import seeded
from stagecredit.storage.atomic import atomic_save_tensors, atomic_write_json
from stagecredit.storage.tensor_files import RunFileError, load_tensors

FORMAT = "stagecredit.run/2"
# format 1 kept the minibatch indices in steps.json; runs written by it still load
READABLE_FORMATS = ("stagecredit.run/1", FORMAT)


def _stage_dir(k: int, name: str) -> str:
    return f"{k:02d}_{name}"


PROGRESS_FILE = "recording.json"  # a recording in progress: the stages finished so far (run.json comes last)


class RunWriter:
    def __init__(self, path: Path, *, overwrite: bool) -> None:
        if (path / "run.json").exists():
            if not overwrite:
                raise FileExistsError(f"{path} already holds a recorded run; pass overwrite=True (CLI: --overwrite) to replace it")
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.init_entry: dict[str, str] = {}

    def interrupted(self) -> Optional[dict[str, Any]]:
        """What an interrupted recording in this folder finished: ``{"init", "stages", "planned"}``, or None."""
        progress_path = self.path / PROGRESS_FILE
        if not progress_path.is_file():
            return None
        try:
            return json.loads(progress_path.read_text())
        except json.JSONDecodeError as exc:
            raise RunFileError(f"corrupted run file: {progress_path} is not valid JSON ({exc}); record the run again "
                               "with overwrite=True") from exc

    def write_progress(self, planned: list[str], stages: list[dict[str, Any]]) -> None:
        """Note the stages finished so far, so that an interrupted recording can resume after the last of them."""
        atomic_write_json(self.path / PROGRESS_FILE, {"init": self.init_entry, "stages": stages, "planned": planned})

    def write_checkpoint(self, k: int, name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
        rel = f"checkpoints/{_stage_dir(k, name)}.safetensors"
        entry = {"path": rel, "sha256": atomic_save_tensors(self.path / rel, state_dict)}
        if k == 0:
            self.init_entry = entry
        return entry

    def write_step_checkpoint(self, k: int, name: str, step: int, state_dict, optimizer_state) -> dict[str, Any]:
        """Parameters and optimizer state entering ``step`` of stage k."""
        folder = f"stages/{_stage_dir(k, name)}/checkpoints"
        model_rel, optimizer_rel = f"{folder}/step_{step:07d}.safetensors", f"{folder}/step_{step:07d}.optimizer.safetensors"
        return {
            "step": step,
            "checkpoint": {"path": model_rel, "sha256": atomic_save_tensors(self.path / model_rel, state_dict)},
            "optimizer_state": {"path": optimizer_rel,
                                "sha256": atomic_save_tensors(self.path / optimizer_rel, optimizer_state)},
        }

    def write_stage(self, k, stage, batches: torch.Tensor, result, state_dict,
                    inner: Optional[list[dict[str, Any]]] = None, source_tangents=None) -> dict[str, Any]:
        folder = f"stages/{_stage_dir(k, stage.name)}"
        optimizer_rel = f"{folder}/optimizer.safetensors"
        steps_rel = f"{folder}/steps.json"
        atomic_write_json(self.path / steps_rel, {"seed": stage.seed, "steps": result.steps})
        batches_entry = None
        if batches is not None:  # binary: a long stage's indices would make steps.json slow to parse
            batches_rel = f"{folder}/batches.safetensors"
            batches_entry = {"path": batches_rel, "sha256": atomic_save_tensors(
                self.path / batches_rel, {"batch_indices": torch.as_tensor(batches, dtype=torch.long)})}
        return {
            "name": stage.name,
            "steps": stage.steps,
            "batch_size": stage.batch_size,
            "seed": stage.seed,
            "carry_optimizer_state": stage.carry_optimizer_state,
            "max_grad_norm": getattr(stage, "max_grad_norm", None),
            "optimizer_class": result.optimizer_class,
            "scheduler_class": result.scheduler_class,
            "param_groups": result.param_groups,
            "train_seconds": result.seconds,
            "checkpoint": self.write_checkpoint(k, stage.name, state_dict),
            "optimizer_state": {"path": optimizer_rel, "sha256": atomic_save_tensors(self.path / optimizer_rel, result.optimizer_state)},
            "steps_file": steps_rel,
            "batches": batches_entry,
            "inner_checkpoints": inner or [],
            "external": bool(getattr(stage, "external", False)),
            "sources": self._sources_entry(folder, stage, source_tangents),
        }

    def _sources_entry(self, folder: str, stage, tangents) -> Optional[dict[str, Any]]:
        sources = getattr(stage, "sources", None)
        if sources is None:
            return None
        entry: dict[str, Any] = {"names": sources.names, "sizes": sources.sizes, "weights": sources.weights,
                                 "tangents": None, "untracked_reason": "not tracked while training"}
        if tangents is not None and tangents.unsupported is None:
            rel = f"{folder}/sources.safetensors"
            entry["tangents"] = {"path": rel, "sha256": atomic_save_tensors(self.path / rel, tangents.tensors())}
            entry["untracked_reason"] = None
        elif tangents is not None:
            entry["untracked_reason"] = tangents.unsupported
        return entry

    def finish(self, pipeline, stages: list[dict[str, Any]], model_fn_name: Optional[str]) -> None:
        atomic_write_json(
            self.path / "run.json",
            {
                "format": FORMAT,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "torch_version": torch.__version__,
                "model_fn": model_fn_name,
                "pipeline_seed": pipeline.seed,
                "init": self.init_entry,
                "stages": stages,
            },
        )
        (self.path / PROGRESS_FILE).unlink(missing_ok=True)  # the run is complete: nothing left to resume


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """What was recorded about one stage (1-based ``index`` as in the maths, θ^(index))."""

    index: int
    name: str
    steps: int
    batch_size: Optional[int]
    seed: Optional[int]
    carry_optimizer_state: bool
    optimizer_class: str
    scheduler_class: Optional[str]
    param_groups: list[list[str]]
    external: bool = False
    max_grad_norm: Optional[float] = None  # gradients clipped to this total norm before every step

    @property
    def optimizer_name(self) -> str:
        return self.optimizer_class.rsplit(".", 1)[-1]


class Run:
    """A recorded staged training run. Load with ``Run.load(path, pipeline=None)``."""

    def __init__(self, path: Path, manifest: dict[str, Any], pipeline=None) -> None:
        self.path = path
        self.manifest = manifest
        self._pipeline = pipeline
        self._cache: dict[tuple, Any] = {}
        if pipeline is not None:
            self._check_pipeline(pipeline)

    @classmethod
    def load(cls, path, pipeline=None) -> "Run":
        path = Path(path)
        manifest_path = path / "run.json"
        if not manifest_path.is_file():
            progress_path = path / PROGRESS_FILE
            if progress_path.is_file():
                try:
                    done = json.loads(progress_path.read_text())
                except json.JSONDecodeError as exc:
                    raise RunFileError(f"the recording at {path} was interrupted and its {PROGRESS_FILE} is damaged "
                                       f"({exc}); record it again") from exc
                raise RunFileError(
                    f"the recording at {path} was interrupted after {len(done['stages'])} of its "
                    f"{len(done['planned'])} stages {done['planned']}; finish it with pipe.run(path, resume=True) "
                    "(CLI: stagecredit record --resume)")
            raise RunFileError(f"no recorded run at {path}: {manifest_path} is missing (was the run interrupted?)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise RunFileError(f"corrupted run file: {manifest_path} is not valid JSON ({exc})") from exc
        if manifest.get("format") not in READABLE_FORMATS:
            raise RunFileError(f"{manifest_path}: unknown format {manifest.get('format')!r}, expected one of "
                               f"{', '.join(map(repr, READABLE_FORMATS))}")
        return cls(path, manifest, pipeline)

    def _check_pipeline(self, pipeline) -> None:
        self.check_stages(pipeline.stages)

    def check_stages(self, stages) -> None:
        """Raise ``ValueError`` unless ``stages`` (a pipeline's) are the ones recorded here, in order."""
        recorded = [(s.name, s.steps, s.batch_size, s.seed) for s in self.stage_records]
        given = [(s.name, s.steps, s.batch_size, s.seed) for s in stages]
        # a run recorded from a hand-written loop may not know a stage's batch size or seed
        comparable = [tuple(g if r is not None else None for r, g in zip(rec, giv)) for rec, giv in zip(recorded, given)]
        if len(recorded) != len(given) or recorded != comparable:
            raise ValueError(
                f"the pipeline does not match the run at {self.path}: recorded stages (name, steps, batch, seed) "
                f"{recorded}, pipeline has {given}"
            )
        for rec, stage in zip(self.stage_records, stages):
            given_norm = getattr(stage, "max_grad_norm", None)
            if rec.max_grad_norm != given_norm:
                raise ValueError(
                    f"the pipeline does not match the run at {self.path}: stage {rec.name!r} was recorded with "
                    f"max_grad_norm={rec.max_grad_norm} and the pipeline's stage has max_grad_norm={given_norm}"
                )

    # --- what was recorded -------------------------------------------------
    @cached_property
    def stage_records(self) -> list[StageRecord]:
        return [
            StageRecord(
                index=k,
                name=s["name"],
                steps=s["steps"],
                batch_size=s["batch_size"],
                seed=s["seed"],
                carry_optimizer_state=s["carry_optimizer_state"],
                optimizer_class=s["optimizer_class"],
                scheduler_class=s["scheduler_class"],
                param_groups=s["param_groups"],
                external=s.get("external", False),
                max_grad_norm=s.get("max_grad_norm"),
            )
            for k, s in enumerate(self.manifest["stages"], start=1)
        ]

    @property
    def stages(self) -> list[str]:
        return [s.name for s in self.stage_records]

    @property
    def num_stages(self) -> int:
        return len(self.manifest["stages"])

    def _entry(self, k: int) -> dict[str, Any]:
        if not 1 <= k <= self.num_stages:
            raise IndexError(f"stage index {k} out of range 1..{self.num_stages}")
        return self.manifest["stages"][k - 1]

    def _load(self, entry: dict[str, str], cache: bool = True) -> dict[str, torch.Tensor]:
        key = ("file", entry["path"])
        if key in self._cache:
            return self._cache[key]
        tensors = load_tensors(self.path / entry["path"], entry.get("sha256"))
        if cache:
            self._cache[key] = tensors
        return tensors

    def checkpoint(self, k: int) -> dict[str, torch.Tensor]:
        """State dict θ^(k) at the end of stage k (k = 0: the initialisation)."""
        return self._load(self.manifest["init"] if k == 0 else self._entry(k)["checkpoint"])

    def parameters(self, k: int) -> dict[str, torch.Tensor]:
        """Only the trainable parameters of θ^(k), by name."""
        state = self.checkpoint(k)
        return {name: state[name] for name in self.parameter_names}

    @cached_property
    def parameter_names(self) -> list[str]:
        """Every parameter some stage's optimizer holds: the first stage's in its order, then each later one's new ones.

        A stage may train a subset (a head, adapters): the names are the union
        over all stages, so a parameter frozen in one stage still carries the
        changes of the stages that train it.
        """
        names = (name for record in self.stage_records for groups in record.param_groups for name in groups)
        return list(dict.fromkeys(names))

    def held_names(self, k: int) -> set[str]:
        """The parameters stage k's optimizer holds; the others do not move in stage k."""
        return {name for groups in self.stage_records[k - 1].param_groups for name in groups}

    def optimizer_state(self, k: int) -> dict[str, torch.Tensor]:
        """Per-parameter optimizer state at the end of stage k, keyed ``"<param>/<key>"``."""
        return self._load(self._entry(k)["optimizer_state"])

    def inner_checkpoint_steps(self, k: int) -> list[int]:
        """Steps of stage k whose entering parameters and optimizer state were saved (besides step 0)."""
        return [c["step"] for c in self._entry(k).get("inner_checkpoints", [])]

    def inner_checkpoint(self, k: int, step: int) -> tuple[dict[str, torch.Tensor], Optional[dict[str, torch.Tensor]]]:
        """``(state dict, optimizer state)`` entering ``step`` of stage k.

        Step 0 is the stage's start: ``θ^(k−1)`` and the optimizer state it was
        handed (``None`` for a fresh optimizer). Unlike the stage boundaries,
        inner checkpoints are read from disk on every call and not kept: a long
        stage records many, and holding them would make memory grow with its
        length.
        """
        return self.inner_state_dict(k, step), self.inner_optimizer_state(k, step)

    def inner_state_dict(self, k: int, step: int) -> dict[str, torch.Tensor]:
        """The state dict entering ``step`` of stage k (read from disk, not kept; see :meth:`inner_checkpoint`)."""
        return self.checkpoint(k - 1) if step == 0 else self._load(self._inner_entry(k, step)["checkpoint"], cache=False)

    def inner_optimizer_state(self, k: int, step: int) -> Optional[dict[str, torch.Tensor]]:
        """The optimizer state entering ``step`` of stage k (None: a fresh optimizer; read, not kept)."""
        if step == 0:
            carried = self.stage_records[k - 1].carry_optimizer_state and k >= 2
            return self.optimizer_state(k - 1) if carried else None
        return self._load(self._inner_entry(k, step)["optimizer_state"], cache=False)

    def _inner_entry(self, k: int, step: int) -> dict[str, Any]:
        for entry in self._entry(k).get("inner_checkpoints", []):
            if entry["step"] == step:
                return entry
        raise KeyError(f"stage {k} has no checkpoint entering step {step}; recorded: {self.inner_checkpoint_steps(k)}")

    def sources(self, k: int) -> list[str]:
        """Names of stage k's data sources (empty when its data was not given as named sources)."""
        entry = self._entry(k).get("sources")
        return list(entry["names"]) if entry else []

    def source_info(self, k: int) -> Optional[dict[str, Any]]:
        """Stage k's recorded sources: ``names``, ``sizes``, ``weights`` (None without sources)."""
        return self._entry(k).get("sources")

    def source_tangent(self, k: int, source: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(δθ, δs)`` at the end of stage k, to first order, when ``source`` is removed from stage k (float64)."""
        entry = self._entry(k).get("sources")
        if not entry or source not in entry["names"]:
            raise KeyError(f"stage {self.stages[k - 1]!r} has no data source {source!r}; "
                           f"its sources: {entry['names'] if entry else 'none (data was not given as named sources)'}")
        if entry["tangents"] is None:
            raise RunFileError(
                f"stage {self.stages[k - 1]!r} recorded no source effects ({entry['untracked_reason']}); "
                "retraining without a source (sc.retrain_source_effects) still works"
            )
        tensors = self._load(entry["tangents"])
        theta = {n: tensors[f"{source}/theta/{n}"] for n in self.parameter_names}
        state = {n: tensors[f"{source}/state/{n}"] for n in self.parameter_names}
        return theta, state

    def step_log(self, k: int) -> dict[str, Any]:
        key = ("steps", k)
        if key not in self._cache:
            steps_path = self.path / self._entry(k)["steps_file"]
            if not steps_path.is_file():
                raise RunFileError(f"missing run file: {steps_path}")
            try:
                self._cache[key] = json.loads(steps_path.read_text())
            except json.JSONDecodeError as exc:
                raise RunFileError(f"corrupted run file: {steps_path} is not valid JSON ({exc})") from exc
        return self._cache[key]

    def steps(self, k: int) -> list[dict[str, Any]]:
        """Per step of stage k: ``groups`` (hyper-parameters per param group), ``loss``, ``adam_step``, and
        ``grad_norm`` (the gradient's total norm before clipping) in a stage that clipped it."""
        return self.step_log(k)["steps"]

    def has_batch_indices(self, k: int) -> bool:
        """Whether stage k was recorded with its minibatch indices."""
        entry = self._entry(k)
        return entry.get("batches") is not None or ("batches" not in entry and
                                                    self.step_log(k).get("batch_indices") is not None)

    def batch_indices(self, k: int) -> torch.Tensor:
        """The minibatch indices of stage k, ``[steps, batch_size]``."""
        entry = self._entry(k)
        if entry.get("batches") is not None:
            return self._load(entry["batches"])["batch_indices"]
        indices = None if "batches" in entry else self.step_log(k).get("batch_indices")  # format 1: in steps.json
        if indices is None:
            raise RunFileError(
                f"stage {self.stages[k - 1]!r} was recorded without minibatch indices (pass them with rec.batch()); "
                "retraining and aa-curvature's per-step replay need them; 'delta', 'aa' and aa-curvature's segments "
                "do not"
            )
        return torch.tensor(indices, dtype=torch.long)

    def counterfactual_notes(self) -> list[str]:
        """Plain-language meaning of skipping stages whose counterfactual is not 'train without it'."""
        return [
            f"Stage {s.name!r} arrived pretrained from outside: skipping it means the later stages start from a "
            f"fresh initialisation of the model (model_fn() under torch.manual_seed({self.manifest.get('pipeline_seed', 0)}), "
            "the run's recorded θ^(0)) instead of the pretrained weights, everything else as recorded."
            for s in self.stage_records if s.external
        ]

    # --- models --------------------------------------------------------------
    @property
    def pipeline(self):
        if self._pipeline is None:
            raise RuntimeError(
                f"the run at {self.path} was loaded without its pipeline, so it cannot be retrained; "
                "load it with sc.Run.load(path, pipeline=pipe)"
            )
        return self._pipeline

    def model_fn(self):
        if self._pipeline is not None:
            return self._pipeline.model_fn
        name = self.manifest.get("model_fn")
        if not name:
            raise RuntimeError(
                f"the run at {self.path} does not know how to build its model (its model_fn was not importable "
                "by name when it was recorded); load it with sc.Run.load(path, pipeline=pipe)"
            )
        module, _, qualname = name.partition(":")
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj

    def build_model(self, k: Optional[int] = None) -> torch.nn.Module:
        """A fresh model holding θ^(k) (default: the final model θ_T), in eval mode."""
        with seeded(self.manifest.get("pipeline_seed", 0)):
            model = self.model_fn()()
        model.load_state_dict(self.checkpoint(self.num_stages if k is None else k))
        return model.eval()

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, stages={self.stages})"
