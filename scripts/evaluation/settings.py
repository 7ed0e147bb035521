"""The settings of the evaluation stage (``configs/evaluate.yaml``), one small dataclass per concern.

The config declares each block once and :class:`scripts.evaluation.Evaluation` is built from them,
so a new option lands in the block it belongs to instead of lengthening one call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

NONE_WORDS = ("", "None", "none", "null")


@dataclass(frozen=True)
class EvaluationInputs:
    """What is evaluated, against what, and with which instrument.

    Attributes:
        synthetic_dir: ``run inference`` output folder (or a real cohort folder with datalist.json).
        real_datalist: the PRIVATE cohort's datalist (test split = reference; training vs
            validation + test = audit members vs non-members).
        public_datalist: the PUBLIC cohort's datalist (real-vs-real scale, segmenter accuracy,
            montage partners); None skips those parts.
        segmenter_path: ``models/segmenter.pt`` (``configs/train_segmenter.yaml``).
        attribute_ranges: reference ranges (``configs/common.yaml``).
        model_path: the diffusion model for the audit, the sweep and the ladders; None skips them.
        sweep_dir: ``run sweep`` output folder; None skips the sweep.
        spatial_size: (D, H, W) every volume is padded/cropped to; None: the synthetic volumes' size.
        weights: the weights of ``model_path`` the audit scores (those the set was sampled with).
        bundle_root: bundle root (relative model paths).
        spacing_tolerance: relative voxel-size difference allowed between synthetic and real sets.
    """

    synthetic_dir: str
    real_datalist: str
    public_datalist: str | None
    segmenter_path: str
    attribute_ranges: Mapping[str, Sequence[float]]
    model_path: str | None = None
    sweep_dir: str | None = None
    spatial_size: Sequence[int] | None = None
    weights: str = "ema"
    bundle_root: str = "."
    spacing_tolerance: float = 0.25

    @property
    def model(self) -> str | None:
        """``model_path``, None when the command line said none."""
        return None if self.model_path in NONE_WORDS else self.model_path


@dataclass(frozen=True)
class FeatureSettings:
    """Fidelity and diversity: the feature extractors and the MS-SSIM pairs.

    Attributes:
        inception_weights: local InceptionV3 weights file (adds ``FID_inception2d``).
        inception_slices: ``middle`` or ``all``.
        feature_3d_weights: local TorchScript 3D feature network (adds ``FD_<feature_3d_name>``).
        feature_3d_name: its report name.
        ms_ssim_pairs: random pairs per set for MS-SSIM.
        ms_ssim_kernel: MS-SSIM Gaussian window.
        montage_count: rows of the real-vs-synthetic montage.
    """

    inception_weights: str | None = None
    inception_slices: str = "middle"
    feature_3d_weights: str | None = None
    feature_3d_name: str = "custom3d"
    ms_ssim_pairs: int = 30
    ms_ssim_kernel: int = 7
    montage_count: int = 6


@dataclass(frozen=True)
class AuditSettings:
    """The empirical privacy audit of ``model_path``.

    Attributes:
        enabled: run it (needs ``model_path``).
        timesteps: timesteps of the membership scores.
        bootstrap: bootstrap resamples of the AUC interval.
        positive_control: also run the over-fitted non-DP positive control.
        control_units: units over-fitted on (and held-out units attacked) in the control.
        control_steps: optimisation steps of the control.
        control_lr: learning rate of the control.
    """

    enabled: bool = True
    timesteps: Sequence[int] = (10, 40, 80, 120)
    bootstrap: int = 1000
    positive_control: bool = False
    control_units: int = 4
    control_steps: int = 200
    control_lr: float = 1e-3


@dataclass(frozen=True)
class RunSettings:
    """How the evaluation runs and what counts as "LV found".

    Attributes:
        device: device.
        seed: seed of pair draws, attack noise and bootstrap.
        batch_size: volumes per forward pass.
        min_lv_ml: smallest LV blood pool that counts as "LV found".
        plots_dir: folder for the PNG figures; None draws none.
    """

    device: str = "cpu"
    seed: int = 0
    batch_size: int = 4
    min_lv_ml: float = 5.0
    plots_dir: str | None = None
