"""Evaluation stage (``configs/evaluate.yaml``): fidelity, diversity, controllability and an empirical privacy audit.

    python -m monai.bundle run evaluating --config_file "['configs/common.yaml','configs/evaluate.yaml']" \\
        --synthetic_dir DIR

From Python, ``Evaluation(inputs=EvaluationInputs(...)).run()`` returns the report
dict (``report["headline"]`` holds the key
numbers: ``lv_found_rate``, ``lvedv_pearson_r``, ``sweep_spearman_rho``, ``FD_seg3d_*``,
``ms_ssim_*``, ``mia_auc``); :func:`run` also writes the report files, the figures and the
MLflow run. Modules: ``volumes`` (reading sets), ``segmenter`` (the measuring instrument),
``lv_detector`` (the classical, non-learned second instrument), ``reconstruction`` and ``ladders``
(autoencoder fidelity and single-attribute control, docs/evaluation.md),
``features`` / ``fidelity`` / ``diversity`` / ``control`` / ``audit`` (the metrics), ``plots``,
``report``, ``settings`` (the stage's settings), ``sections`` (the report's sections), ``stage`` (the
orchestration).
"""

from __future__ import annotations

from scripts.evaluation.ladders import LadderSettings
from scripts.evaluation.reconstruction import ReconstructionSettings
from scripts.evaluation.settings import AuditSettings, EvaluationInputs, FeatureSettings, RunSettings
from scripts.evaluation.stage import Evaluation, headline, run

__all__ = [
    "AuditSettings",
    "Evaluation",
    "EvaluationInputs",
    "FeatureSettings",
    "LadderSettings",
    "ReconstructionSettings",
    "RunSettings",
    "headline",
    "run",
]
