"""The evaluation stage (``configs/evaluate.yaml``): :class:`Evaluation`, built from small settings.

    python -m monai.bundle run evaluating --config_file "['configs/common.yaml','configs/evaluate.yaml']" \\
        --synthetic_dir DIR

From Python::

    from scripts.evaluation import Evaluation, EvaluationInputs
    inputs = EvaluationInputs("outputs/demo", "data/private/datalist.json", "data/public/datalist.json",
                              "models/segmenter.pt", attribute_ranges)
    report = Evaluation(inputs=inputs).run()
    report["headline"]["lv_found_rate"], report["headline"]["lvedv_pearson_r"]
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from scripts.errors import DataError, MissingInputError
from scripts.evaluation import audit, control, plots, segmenter
from scripts.evaluation.features import build_extractors
from scripts.evaluation.ladders import LadderSettings
from scripts.evaluation.reconstruction import ReconstructionSettings
from scripts.evaluation.report import headline_text, log_mlflow, write_report
from scripts.evaluation.sections import (
    Loaded,
    audit_section,
    controllability_section,
    diversity_section,
    fidelity_section,
    instrument_section,
    ladder_section,
    match_real,
    privacy_of,
    reconstruction_section,
    sweep_section,
)
from scripts.evaluation.settings import AuditSettings, EvaluationInputs, FeatureSettings, RunSettings
from scripts.evaluation.volumes import MANIFEST, VolumeSet, check_spacing_compatible, load_real, load_synthetic
from scripts.networks import load_autoencoder
from scripts.synthesis import DP_STAGE, load_generator

logger = logging.getLogger(__name__)


class _Timer:
    """Wall-clock seconds per section (reported under ``timings_s``)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._start = time.perf_counter()
        self._last = self._start

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = round(now - self._last, 2)
        self._last = now
        logger.info(f"evaluation: {name} done in {self.times[name]:.1f} s")

    def total(self) -> float:
        return round(time.perf_counter() - self._start, 2)


def load_candidates(
    synthetic_dir: str, spatial_size: Sequence[int] | None, split: str = "test"
) -> tuple[VolumeSet, list]:
    """The set to evaluate: a ``run inference`` folder (manifest.csv), or a real cohort folder (datalist.json).

    Returns:
        (the set, its ED/ES pairing keys: (seed, attributes) for synthetic, subject for real).
    """
    if synthetic_dir and os.path.isdir(synthetic_dir) and not os.path.isfile(os.path.join(synthetic_dir, MANIFEST)):
        datalist = os.path.join(synthetic_dir, "datalist.json")
        if os.path.isfile(datalist):
            if spatial_size is None:
                raise DataError(f'--synthetic_dir {synthetic_dir} is a real cohort: give --spatial_size "[D,H,W]"')
            real = load_real(datalist, split, spatial_size, name=f"real cohort {synthetic_dir} [{split}]")
            return real, list(real.subjects)
    synthetic = load_synthetic(synthetic_dir, spatial_size)
    keys = []
    for values, seed in zip(synthetic.attributes, synthetic.seeds):
        rest = tuple(None if math.isnan(v) else round(float(v), 6) for k, v in enumerate(values) if k != control.ESED)
        keys.append(None if seed is None else (seed, *rest))
    return synthetic, keys


def _autoencoder_for(
    settings: ReconstructionSettings, model_path: str | None, device: str, bundle_root: str
) -> tuple[torch.nn.Module | None, str | None]:
    """The autoencoder the reconstruction section measures: the settings' file, else the one ``model_path`` names."""
    if settings.autoencoder_path:
        return load_autoencoder(settings.autoencoder_path, device), settings.autoencoder_path
    if not model_path or not os.path.isfile(model_path):
        return None, None
    generator = load_generator(model_path, device=device, bundle_root=bundle_root)
    return generator.autoencoder, generator.files.autoencoder


def _first_sidecar(candidates: VolumeSet) -> tuple[dict | None, str | None]:
    """The JSON sidecar of the first synthetic volume (its sampler, model and weights), if it has one."""
    if not candidates.files or candidates.seeds[0] is None:
        return None, None
    path = candidates.files[0].removesuffix(".nii.gz") + ".json"
    if not os.path.isfile(path):
        return None, None
    with open(path) as f:
        return json.load(f), path


class Evaluation:
    """An evaluation of a synthetic set: fidelity, diversity, controllability, sweep, ladders and privacy audit.

    Built from small settings (``configs/evaluate.yaml`` declares each once), as MONAI's
    generative bundles build their samplers; :meth:`run` returns the report dict
    (``headline`` holds the key numbers; docs/evaluation_stage.md).

    Args:
        inputs: what is evaluated and against what.
        features: feature extractors and MS-SSIM pairs.
        audit: the privacy audit of the model.
        runtime: device, seed, batch size, "LV found" threshold, figures folder.
        reconstruction: the ``reconstruction`` section (autoencoder fidelity on a test split); None skips it.
        ladders: the single-attribute ladders (sampled from the model); None skips them.
    """

    def __init__(
        self,
        *,
        inputs: EvaluationInputs,
        features: FeatureSettings | None = None,
        audit: AuditSettings | None = None,
        runtime: RunSettings | None = None,
        reconstruction: ReconstructionSettings | None = None,
        ladders: LadderSettings | None = None,
    ) -> None:
        self.inputs = inputs
        self.features = features or FeatureSettings()
        self.audit = audit or AuditSettings()
        self.runtime = runtime or RunSettings()
        self.reconstruction = reconstruction if reconstruction is not None and reconstruction.enabled else None
        self.ladders = ladders if ladders is not None and ladders.enabled else None

    @property
    def audits(self) -> bool:
        """Whether the privacy audit runs (it needs a model)."""
        return bool(self.audit.enabled) and self.inputs.model is not None

    def load(self) -> Loaded:
        """Read every input; bad input fails here, before any network is loaded."""
        inputs, runtime = self.inputs, self.runtime
        candidates, pair_keys = load_candidates(inputs.synthetic_dir, inputs.spatial_size)
        size = tuple(inputs.spatial_size or candidates.spatial_size)
        if candidates.spatial_size != size:
            candidates = load_candidates(inputs.synthetic_dir, size)[0]
        reference = load_real(inputs.real_datalist, "test", size, with_labels=None, name="private test")
        check_spacing_compatible(candidates, reference, inputs.spacing_tolerance)
        public_train = public_test = None
        if inputs.public_datalist:
            public_train = load_real(inputs.public_datalist, "training", size, name="public training")
            public_test = load_real(inputs.public_datalist, "test", size, with_labels=None, name="public test")
        if self.audits and not os.path.isfile(inputs.model):
            raise MissingInputError(
                f"--model_path {inputs.model}: model weights not found (the privacy audit scores this model; it is "
                f"written by {DP_STAGE}); pass the model file, or --audit_privacy False to skip the audit"
            )
        sweeps = control.read_sweep(inputs.sweep_dir) if inputs.sweep_dir else []
        autoencoder = autoencoder_path = None
        if self.reconstruction is not None:
            autoencoder, autoencoder_path = _autoencoder_for(
                self.reconstruction, inputs.model, runtime.device, inputs.bundle_root
            )
        sidecar, sidecar_path = _first_sidecar(candidates)
        net, seg_info = segmenter.load_segmenter(inputs.segmenter_path, runtime.device)
        f = self.features
        extractors = build_extractors(
            net, f.inception_weights, f.feature_3d_weights, f.feature_3d_name, f.inception_slices, runtime.device
        )
        self._segmenter_info = seg_info
        return Loaded(
            candidates, pair_keys, size, reference, public_train, public_test, net, extractors,
            sidecar, sidecar_path, autoencoder, autoencoder_path, sweeps,
        )  # fmt: skip

    def _report_head(self, data: Loaded) -> dict[str, Any]:
        inputs = self.inputs
        report: dict[str, Any] = {
            "synthetic_dir": inputs.synthetic_dir,
            "candidates": data.candidates.name,
            "n_synthetic": len(data.candidates),
            "spatial_size": list(data.size),
            "real_datalist": inputs.real_datalist,
            "public_datalist": inputs.public_datalist,
            "segmenter": {
                "path": inputs.segmenter_path,
                "trained_on": self._segmenter_info.get("trained_on"),
                "architecture": self._segmenter_info.get("architecture"),
            },
            "model_path": inputs.model,
        }
        report.update(privacy_of(inputs.model, data.sidecar))
        report["caveat"] = audit.AUDIT_CAVEAT
        return report

    def run(self) -> dict[str, Any]:
        """Measure every section; returns the report dict."""
        inputs, runtime = self.inputs, self.runtime
        timer = _Timer()
        torch.manual_seed(runtime.seed)
        data = self.load()
        timer.lap("load")
        report = self._report_head(data)
        instruments = instrument_section(data, runtime)
        report["segmenter"]["accuracy"] = instruments["accuracy"]
        report["classical_detector"] = instruments["classical_detector"]
        timer.lap("segmenter accuracy")
        report["controllability"], scatter = controllability_section(data, runtime)
        timer.lap("controllability")
        report["reconstruction"] = None
        if self.reconstruction is not None:
            default_dir = os.path.join(runtime.plots_dir or os.path.join(inputs.bundle_root, "eval"), "reconstructions")
            report["reconstruction"] = reconstruction_section(data, self.reconstruction, runtime, default_dir)
            timer.lap("reconstruction")
        report["fidelity"] = fidelity_section(data, runtime)
        timer.lap("fidelity")
        report["diversity"] = diversity_section(data, self.features, runtime.seed)
        timer.lap("diversity")
        report["sweeps"] = sweep_section(data, inputs, runtime) if data.sweeps else []
        if data.sweeps:
            timer.lap("sweep")
        report["ladders"] = None
        if self.ladders is not None:
            report["ladders"] = ladder_section(data, self.ladders, inputs, runtime)
            timer.lap("ladders")
        extras: dict[str, Any] = {"scatter": scatter}
        report["privacy_audit"] = None
        if self.audits:
            report["privacy_audit"] = audit_section(data, inputs, self.audit, runtime)
            section = report["privacy_audit"]
            extras.update(
                mia=section["membership_inference"],
                control=section["positive_control"],
                memorisation=section["memorisation"],
            )
            timer.lap("privacy audit")
        if data.public_train is not None:
            extras["montage"] = match_real(
                data.candidates, data.public_train, inputs.attribute_ranges, self.features.montage_count
            )
        if runtime.plots_dir:
            report["figures"] = plots.save_all(report, extras, runtime.plots_dir)
            timer.lap("figures")
        report["headline"] = headline(report)
        report["timings_s"] = dict(timer.times, total=timer.total())
        return report


def headline(report: Mapping[str, Any]) -> dict[str, Any]:
    """The key numbers: fidelity (real-vs-real, real-vs-synthetic), LV found, LVEDV r, sweep rho, MS-SSIM, MIA AUC."""
    fd = report.get("fidelity", {}).get("FD_seg3d", {})
    ctrl = report.get("controllability") or {}
    lvedv = ctrl.get("attributes", {}).get("LVEDV", {})
    sweeps = report.get("sweeps") or []
    mia = (report.get("privacy_audit") or {}).get("membership_inference") or {}
    control_run = (report.get("privacy_audit") or {}).get("positive_control") or {}
    div = report.get("diversity", {})
    audit = report.get("privacy_audit")
    near_copies = sum(m["near_copies"] for m in audit.get("memorisation", [])) if audit else None
    return {
        "FD_seg3d_real_vs_real": fd.get("real_vs_real", {}).get("FD_seg3d"),
        "FD_seg3d_real_vs_synthetic": fd.get("real_vs_synthetic", {}).get("FD_seg3d"),
        "FD_seg3d_noise_vs_real": fd.get("noise_vs_real", {}).get("FD_seg3d"),
        "FID_inception2d_real_vs_synthetic": report.get("fidelity", {})
        .get("FID_inception2d", {})
        .get("real_vs_synthetic", {})
        .get("FID_inception2d"),
        "lv_found_rate": ctrl.get("lv_found_rate"),
        "lvedv_pearson_r": lvedv.get("pearson_r"),
        "lvedv_n": lvedv.get("n"),
        "lvedv_mae_ml": lvedv.get("mae"),
        "phase_accuracy": (ctrl.get("phase") or {}).get("accuracy"),
        "sweep_spearman_rho": next(
            (s.get("spearman_rho") for s in sweeps if s.get("attribute") == "LVEDV"),
            sweeps[0].get("spearman_rho") if sweeps else None,
        ),
        "ms_ssim_synthetic": div.get("synthetic", {}).get("mean"),
        "ms_ssim_real": div.get("private_test", {}).get("mean"),
        "mia_auc": mia.get("auc"),
        "mia_auc_ci95": mia.get("auc_ci95"),
        "mia_tpr_at_1pct_fpr": mia.get("tpr_at_1pct_fpr"),
        "near_copies": near_copies,
        "positive_control_auc": control_run.get("auc"),
        "segmenter_dice_public_test": ((report.get("segmenter") or {}).get("accuracy", {}).get("public_test") or {})
        .get("dice", {})
        .get("mean"),
        "epsilon": (report.get("privacy") or {}).get("epsilon"),
        **_instrument_headline(report),
    }


def _instrument_headline(report: Mapping[str, Any]) -> dict[str, Any]:
    """The classical detector beside the segmenter, the reconstruction numbers and the ladders."""
    ctrl = report.get("controllability") or {}
    classical = ctrl.get("classical") or {}
    rec = report.get("reconstruction") or {}
    det = rec.get("classical_detector") or {}
    seg = rec.get("segmenter") or {}
    lad = report.get("ladders") or {}
    sweeps = report.get("sweeps") or []

    def ladder(name: str, instrument: str, key: str) -> Any:
        return ((lad.get(name) or {}).get(instrument) or {}).get(key)

    out = {
        "classical_lv_found_rate": classical.get("lv_found_rate"),
        "classical_lvedv_pearson_r": (classical.get("attributes") or {}).get("LVEDV", {}).get("pearson_r"),
        "classical_sweep_spearman_rho": next(
            ((s.get("classical") or {}).get("spearman_rho") for s in sweeps if s.get("attribute") == "LVEDV"), None
        ),
        "recon_split": rec.get("split"),
        "recon_psnr_db": rec.get("psnr_db_median"),
        "recon_ssim": rec.get("ssim_median"),
        "recon_contrast_ratio": (rec.get("contrast") or {}).get("ratio_median"),
        "recon_classical_lv_found_originals": (det.get("originals") or {}).get("lv_found_rate"),
        "recon_classical_lv_found": (det.get("reconstructions") or {}).get("lv_found_rate"),
        "recon_segmenter_dice_originals": ((seg.get("originals") or {}).get("dice") or {}).get("mean"),
        "recon_segmenter_dice": ((seg.get("reconstructions") or {}).get("dice") or {}).get("mean"),
        "recon_segmenter_lv_volume_r": (seg.get("reconstructions") or {}).get("lv_volume_pearson_r"),
    }
    for instrument in ("segmenter", "classical"):
        out[f"ladder_lvedv_rho_{instrument}"] = ladder("LVEDV", instrument, "spearman_rho_pooled")
        per_seed = ladder("LVEDV", instrument, "spearman_rho_per_seed") or {}
        out[f"ladder_lvedv_rho_min_seed_{instrument}"] = (
            None if not per_seed or any(v is None for v in per_seed.values()) else min(per_seed.values())
        )
        out[f"ladder_lvedv_lv_found_{instrument}"] = ladder("LVEDV", instrument, "lv_found_rate")
        out[f"ladder_lvef_rho_{instrument}"] = ladder("LVEF", instrument, "spearman_rho_pooled")
        out[f"ladder_esed_accuracy_{instrument}"] = ladder("ESED", instrument, "ed_es_accuracy")
    return out


def run(
    evaluation: Evaluation,
    *,
    output_dir: str,
    tracking_uri: str | None = None,
    experiment_name: str = "cardiac_ldm",
    run_name: str | None = None,
    report_name: str = "report",
) -> dict[str, Any]:
    """The bundle entry: the evaluation, then the report files, the figures, MLflow and the printed headline.

    Args:
        evaluation: what to measure (its ``runtime.plots_dir`` is where the figures go).
        output_dir: folder of ``report.json`` and ``report.md`` (``eval/``).
        tracking_uri: MLflow store (None: no MLflow run).
        experiment_name: MLflow experiment (the bundle's stages share ``cardiac_ldm``).
        run_name: MLflow run name (default ``evaluation_<time>``).
        report_name: stem of the report files.

    Returns:
        the report dict.
    """
    report = evaluation.run()
    json_path, md_path = write_report(report, output_dir, report_name)
    if tracking_uri:
        inputs = evaluation.inputs
        params = {
            k: getattr(inputs, k)
            for k in ("synthetic_dir", "real_datalist", "public_datalist", "segmenter_path", "sweep_dir")
        }
        params["model_path"] = inputs.model
        params["n_synthetic"] = report["n_synthetic"]
        report["mlflow_run_id"] = log_mlflow(
            report,
            [json_path, md_path, *(report.get("figures") or {}).values()],
            tracking_uri,
            experiment_name,
            run_name or "evaluation_" + time.strftime("%Y%m%d_%H%M%S"),
            params,
        )
    print(headline_text(report, json_path), flush=True)
    return report
