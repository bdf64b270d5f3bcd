"""Model selection: profile candidates, score transferability, recommend, report.

Importing this package does not import TensorFlow; the functions that need it
import it when called.
"""

from tfhub_finetune.selection.profile import (
    ProfileOptions,
    ProfileResult,
    profile_in_subprocess,
    profile_model,
    profile_saved_model,
)
from tfhub_finetune.selection.ranking import prior_verdicts, transferability_correlations
from tfhub_finetune.selection.recommend import (
    Candidate,
    ConstraintChange,
    Recommendation,
    Relaxation,
    pareto_front,
    recommend,
)
from tfhub_finetune.selection.report import read_results, write_report
from tfhub_finetune.selection.transferability import (
    TransferabilityScore,
    extract_features,
    kendall_tau,
    knn_accuracy,
    linear_probe_accuracy,
    logme_score,
    score_transferability,
    weighted_kendall_tau,
)

__all__ = [
    "Candidate",
    "ConstraintChange",
    "ProfileOptions",
    "ProfileResult",
    "Recommendation",
    "Relaxation",
    "TransferabilityScore",
    "extract_features",
    "kendall_tau",
    "knn_accuracy",
    "linear_probe_accuracy",
    "logme_score",
    "pareto_front",
    "prior_verdicts",
    "profile_in_subprocess",
    "profile_model",
    "profile_saved_model",
    "read_results",
    "recommend",
    "score_transferability",
    "transferability_correlations",
    "weighted_kendall_tau",
    "write_report",
]
