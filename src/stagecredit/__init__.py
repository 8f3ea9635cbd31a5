"""stagecredit: which training stage deserves the credit or the blame for a behaviour of the final model.

Sign convention everywhere: ``τ_k = f(θ_T) − f(θ_T without stage k)``; for a
loss-like behaviour ``τ_k > 0`` is blame (stage k made it worse) and
``τ_k < 0`` is credit.
"""

from stagecredit.behaviours.loss import (
    GroupMean,
    PerExampleCorrect,
    PerExampleLoss,
    WorstGroup,
    group_accuracy,
    group_loss,
    worst_group_accuracy,
)
from stagecredit.estimators.attribute import SIGN_CONVENTION, Attribution, attribute
from stagecredit.estimators.curvature import GGNFallbackWarning, GGNUnavailableError
from stagecredit.estimators.curvature_propagation import CurvatureOptions
from stagecredit.estimators.embedding import StageEmbedding
from stagecredit.estimators.optimizers import UnsupportedOptimizerError
from stagecredit.estimators.sources import attribute_sources
from stagecredit.recording.recorder import Recorder
from stagecredit.recording.stage import Pipeline, PretrainedStage, Stage
from stagecredit.repair.intervene import GroupedSplit, InterventionReport, RepairSplits, intervene
from stagecredit.storage.run import Run
from stagecredit.storage.tensor_files import RunFileError
from stagecredit.validation.ceilings import TruthCeilings, truth_ceilings
from stagecredit.validation.retrain import retrain_effects, retrain_source_effects
from stagecredit.validation.validate import ValidationReport, validate, validate_sources

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "CurvatureOptions",
    "GGNFallbackWarning",
    "GGNUnavailableError",
    "GroupMean",
    "GroupedSplit",
    "InterventionReport",
    "PerExampleCorrect",
    "PerExampleLoss",
    "PretrainedStage",
    "Recorder",
    "RepairSplits",
    "Pipeline",
    "Run",
    "RunFileError",
    "SIGN_CONVENTION",
    "Stage",
    "StageEmbedding",
    "TruthCeilings",
    "UnsupportedOptimizerError",
    "ValidationReport",
    "WorstGroup",
    "attribute",
    "attribute_sources",
    "group_accuracy",
    "intervene",
    "group_loss",
    "retrain_effects",
    "retrain_source_effects",
    "truth_ceilings",
    "validate",
    "validate_sources",
    "worst_group_accuracy",
]
