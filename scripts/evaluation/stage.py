"""The evaluation stage: every metric of ``configs/evaluate.yaml`` in one call, :func:`evaluate`.

    python -m monai.bundle run evaluating --config_file "['configs/common.yaml','configs/evaluate.yaml']" \\
        --synthetic_dir DIR

From Python::

    from scripts.evaluation import evaluate
    report = evaluate("outputs/demo", "data/private/datalist.json", "data/public/datalist.json", "models/segmenter.pt")
    report["headline"]["lv_found_rate"], report["headline"]["lvedv_pearson_r"]
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.errors import DataError, MissingInputError
from scripts.evaluation import audit, control, diversity, features, fidelity, segmenter
from scripts.evaluation.ladders import LadderSettings, run_ladders
from scripts.evaluation.lv_detector import detect_many
from scripts.evaluation.reconstruction import ReconstructionSettings, detector_summary, evaluate_reconstruction
from scripts.evaluation.volumes import (
    MANIFEST,
    VolumeSet,
    check_spacing_compatible,
    load_real,
    load_synthetic,
    to_network_layout,
)

logger = logging.getLogger(__name__)

HELDOUT_SPLITS = ("validation", "test")
CARDIAC = ("LVEDV", "LVESV", "LVEF", "RVEDV", "RVESV", "RVEF", "MYOESTHICK", "MYOEDTHICK", "ESED")


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


def _pairs_from_keys(attributes: np.ndarray, keys: Sequence[Any]) -> list[tuple[int, int]]:
    groups: dict[Any, dict[float, int]] = {}
    for i, key in enumerate(keys):
        if key is None or not np.isfinite(attributes[i, control.ESED]) or key == "":
            continue
        groups.setdefault(key, {})[float(attributes[i, control.ESED])] = i
    return [(g[1.0], g[0.0]) for g in groups.values() if 1.0 in g and 0.0 in g]


def match_real(
    candidates: VolumeSet, real: VolumeSet, ranges: Mapping[str, Sequence[float]], count: int
) -> list[tuple]:
    """(title, volume, title, volume) pairs: the first ``count`` candidates and the real volume nearest in attributes.

    Distance: mean absolute difference of the attributes both have, each scaled by its reference range.
    """
    width = np.array([float(ranges[n][1]) - float(ranges[n][0]) for n in ATTRIBUTE_NAMES])
    cardiac = np.array([n in CARDIAC for n in ATTRIBUTE_NAMES])
    out = []
    for i in range(min(count, len(candidates))):
        req = candidates.attributes[i]
        if np.isfinite(req[cardiac]).any():  # match on the cardiac attributes when any was requested
            req = np.where(cardiac, req, np.nan)
        diff = np.abs(real.attributes - req) / width
        both = np.isfinite(diff)
        score = np.where(both.any(1), np.nansum(np.where(both, diff, 0.0), 1) / np.maximum(both.sum(1), 1), np.inf)
        j = int(np.argmin(score))
        shown = [n for n in ("LVEDV", "LVESV", "ESED") if np.isfinite(req[ATTRIBUTE_NAMES.index(n)])]
        text = ", ".join(f"{n} {req[ATTRIBUTE_NAMES.index(n)]:.0f}" for n in shown) or "unconditional"
        real_text = ", ".join(
            f"{n} {real.attributes[j, ATTRIBUTE_NAMES.index(n)]:.0f}" for n in ("LVEDV", "LVESV", "ESED")
        )
        out.append(
            (f"{candidates.ids[i]}\n{text}", candidates.images[i], f"{real.ids[j]}\n{real_text}", real.images[j])
        )
    return out


def _privacy_of(model_path: str | None) -> dict[str, Any]:
    """The model's DP guarantee (from models/privacy_report.json when it names this model), for the report."""
    if not model_path or not os.path.isfile(model_path):
        return {"privacy": None, "privacy_warning": "no model given"}
    from scripts.files import sha256
    from scripts.inference import privacy_info

    return privacy_info(
        os.path.join(os.path.dirname(os.path.abspath(model_path)), "privacy_report.json"), sha256(model_path)
    )


def run_audit(
    model_path: str,
    real_datalist: str,
    attribute_ranges: Mapping[str, Sequence[float]],
    timesteps: Sequence[int],
    bootstrap: int,
    seed: int,
    device: str,
    batch_size: int,
    bundle_root: str,
    positive_control: bool = False,
    control_units: int = 4,
    control_steps: int = 200,
    control_lr: float = 1e-3,
    weights: str = "ema",
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Membership inference on the private cohort (and the positive control) against ``weights`` of the model.

    Returns:
        (mia, control).
    """
    from scripts.data import get_dataset
    from scripts.inference import load_matching_autoencoder, load_model, resolve_autoencoder_path

    network, info = load_model(model_path, device, weights, bundle_root)
    autoencoder = load_matching_autoencoder(resolve_autoencoder_path(None, info, model_path, bundle_root), info, device)
    from monai.networks.schedulers import DDPMScheduler

    scheduler = DDPMScheduler(**{**info["scheduler"], "clip_sample": False})
    unit = (_privacy_of(model_path).get("privacy") or {}).get("privacy_unit") or "subject"

    def encoded(splits: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        items: list[dict] = []
        for split in splits:
            ds = get_dataset(real_datalist, split, info["spatial_size"], attribute_ranges, cache=False)
            items += [ds[i] for i in range(len(ds))]
        lat, cond = audit.encode_items(autoencoder, items, device, batch_size)
        units = [it["subject"] or it["id"] if unit == "subject" else it["id"] for it in items]
        return lat, cond, units

    members, nonmembers = encoded(["training"]), encoded(HELDOUT_SPLITS)
    scores = []
    for lat, cond, units in (members, nonmembers):
        losses = audit.denoising_losses(network, scheduler, lat, cond, timesteps, seed, device, batch_size)
        scores.append(audit.unit_scores(losses, units)[1])
    mia = audit.membership_inference(scores[0], scores[1], timesteps, bootstrap, seed)
    mia["privacy_unit"] = unit
    mia["weights"] = weights
    ctrl = None
    if positive_control:

        def first_units(data: tuple, k: int) -> tuple:
            lat, cond, units = data
            keep_units = list(dict.fromkeys(units))[:k]
            idx = [i for i, u in enumerate(units) if u in keep_units]
            return lat[idx], cond[idx], [units[i] for i in idx]

        ctrl = audit.overfit_control(
            network,
            scheduler,
            first_units(members, control_units),
            first_units(nonmembers, control_units),
            timesteps,
            control_steps,
            control_lr,
            seed,
            device,
            batch_size,
            min(bootstrap, 200),
        )
    return mia, ctrl


def _autoencoder_for(
    settings: ReconstructionSettings, model_path: str | None, device: str, bundle_root: str
) -> tuple[torch.nn.Module | None, str | None]:
    """The autoencoder the reconstruction section measures: the settings' file, else the one ``model_path`` names."""
    from scripts.inference import load_matching_autoencoder, load_model, resolve_autoencoder_path
    from scripts.networks import load_autoencoder

    if settings.autoencoder_path:
        return load_autoencoder(settings.autoencoder_path, device), settings.autoencoder_path
    if not model_path or not os.path.isfile(model_path):
        return None, None
    _, info = load_model(model_path, device, "ema", bundle_root)
    path = resolve_autoencoder_path(None, info, model_path, bundle_root)
    return load_matching_autoencoder(path, info, device), path


def _first_sidecar(candidates: VolumeSet) -> tuple[dict | None, str | None]:
    """The JSON sidecar of the first synthetic volume (its sampler, model and weights), if it has one."""
    import json

    if not candidates.files or candidates.seeds[0] is None:
        return None, None
    path = candidates.files[0].removesuffix(".nii.gz") + ".json"
    if not os.path.isfile(path):
        return None, None
    with open(path) as f:
        return json.load(f), path


def _classical(candidates: VolumeSet, detections: Sequence[Any]) -> dict[str, Any]:
    """The classical detector on the candidate set: LV found, and its volume against the requested LVEDV / LVESV."""
    out: dict[str, Any] = {
        "n": len(detections),
        "lv_found": int(sum(d.found for d in detections)),
        "lv_found_rate": float(np.mean([d.found for d in detections])) if detections else None,
        "lv_found_definition": "a round bright component enclosed by a dark, sharp ring, tracked over >= 3 slices "
        "(scripts/evaluation/lv_detector.py; no learned parameters)",
        "attributes": {},
    }
    for name in ("LVEDV", "LVESV"):
        phase, _ = control.MEASURABLE[name]
        col = ATTRIBUTE_NAMES.index(name)
        keep = [i for i, v in enumerate(candidates.attributes) if np.isfinite(v[col]) and v[control.ESED] == phase]
        out["attributes"][name] = control.correlation(
            [candidates.attributes[i, col] for i in keep], [detections[i].volume_ml for i in keep]
        )
    return out


def evaluate(
    synthetic_dir: str,
    real_datalist: str,
    public_datalist: str | None,
    segmenter_path: str,
    model_path: str | None = None,
    sweep_dir: str | None = None,
    audit_privacy: bool = True,
    attribute_ranges: Mapping[str, Sequence[float]] | None = None,
    spatial_size: Sequence[int] | None = None,
    inception_weights: str | None = None,
    inception_slices: str = "middle",
    feature_3d_weights: str | None = None,
    feature_3d_name: str = "custom3d",
    ms_ssim_pairs: int = 30,
    ms_ssim_kernel: int = 7,
    mia_timesteps: Sequence[int] = (10, 40, 80, 120),
    mia_bootstrap: int = 1000,
    positive_control: bool = False,
    control_units: int = 4,
    control_steps: int = 200,
    control_lr: float = 1e-3,
    min_lv_ml: float = 5.0,
    spacing_tolerance: float = 0.25,
    montage_count: int = 6,
    device: str | torch.device = "cpu",
    seed: int = 0,
    batch_size: int = 4,
    bundle_root: str = ".",
    plots_dir: str | None = None,
    weights: str = "ema",
    *,
    reconstruction: ReconstructionSettings | None = None,
    ladders: LadderSettings | None = None,
) -> dict[str, Any]:
    """Evaluate a synthetic set: fidelity, diversity, controllability, sweep and privacy audit.

    Args:
        synthetic_dir: ``run inference`` output folder (or a real cohort folder with datalist.json).
        real_datalist: the PRIVATE cohort's datalist (test split = reference; training vs
            validation + test = audit members vs non-members).
        public_datalist: the PUBLIC cohort's datalist (real-vs-real scale, segmenter accuracy,
            montage partners); None skips those parts.
        segmenter_path: ``models/segmenter.pt`` (``configs/train_segmenter.yaml``).
        model_path: the diffusion model for the audit and the sweep; None skips the audit.
        sweep_dir: ``run sweep`` output folder; None skips the sweep.
        audit_privacy: run the privacy audit (needs ``model_path``).
        attribute_ranges: reference ranges (``configs/common.yaml``).
        spatial_size: (D, H, W) every volume is padded/cropped to; None: the synthetic volumes' size.
        inception_weights: local InceptionV3 weights file (adds ``FID_inception2d``).
        inception_slices: ``middle`` or ``all``.
        feature_3d_weights: local TorchScript 3D feature network (adds ``FD_<feature_3d_name>``).
        feature_3d_name: its report name.
        ms_ssim_pairs: random pairs per set for MS-SSIM.
        ms_ssim_kernel: MS-SSIM Gaussian window.
        mia_timesteps: timesteps of the membership scores.
        mia_bootstrap: bootstrap resamples of the AUC interval.
        positive_control: also run the over-fitted non-DP positive control.
        control_units: units over-fitted on (and held-out units attacked) in the control.
        control_steps: optimisation steps of the control.
        control_lr: learning rate of the control.
        min_lv_ml: smallest LV blood pool that counts as "LV found".
        spacing_tolerance: relative voxel-size difference allowed between synthetic and real sets.
        montage_count: rows of the real-vs-synthetic montage.
        device: device.
        seed: seed of pair draws, attack noise and bootstrap.
        batch_size: volumes per forward pass.
        bundle_root: bundle root (relative model paths).
        plots_dir: folder for the PNG figures; None draws none.
        weights: the weights of ``model_path`` the audit scores, ``ema`` or ``network``: those the
            synthetic set was sampled with (its sidecars' ``weights``).
        reconstruction: the ``reconstruction`` section (autoencoder fidelity on a test split);
            None skips it.
        ladders: the single-attribute ladders (sampled from ``model_path``); None skips them.

    Returns:
        the report dict (``headline`` holds the key numbers; see docs/README.md, "Evaluation").
    """
    if attribute_ranges is None:
        import yaml

        with open(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "common.yaml")) as f:
            attribute_ranges = yaml.safe_load(f)["attribute_ranges"]
    device = str(device)
    timer = _Timer()
    torch.manual_seed(seed)
    # -- inputs (bad input fails before any network is loaded)
    candidates, pair_keys = load_candidates(synthetic_dir, spatial_size)
    size = spatial_size or candidates.spatial_size
    if candidates.spatial_size != tuple(size):
        candidates = load_candidates(synthetic_dir, size)[0]
    reference = load_real(real_datalist, "test", size, with_labels=None, name="private test")
    check_spacing_compatible(candidates, reference, spacing_tolerance)
    public_train = public_test = None
    if public_datalist:
        public_train = load_real(public_datalist, "training", size, name="public training")
        public_test = load_real(public_datalist, "test", size, with_labels=None, name="public test")
    if model_path in ("", "None", "none", "null"):
        model_path = None
    audit_privacy = bool(audit_privacy) and model_path is not None
    if audit_privacy and not os.path.isfile(model_path):
        raise MissingInputError(
            f"--model_path {model_path}: model weights not found (the privacy audit scores this model; it is written "
            "by python -m monai.bundle run training "
            "--config_file \"['configs/common.yaml','configs/dp_finetune.yaml']\"); "
            "pass the model file, "
            "or --audit_privacy False to skip the audit"
        )
    if sweep_dir:
        sweeps_meta = control.read_sweep(sweep_dir)
    autoencoder = autoencoder_path = None
    if reconstruction is not None and reconstruction.enabled:
        autoencoder, autoencoder_path = _autoencoder_for(reconstruction, model_path, device, bundle_root)
    sidecar, sidecar_path = _first_sidecar(candidates)
    net, seg_info = segmenter.load_segmenter(segmenter_path, device)
    extractors = features.build_extractors(
        net, inception_weights, feature_3d_weights, feature_3d_name, inception_slices, device
    )
    timer.lap("load")

    report: dict[str, Any] = {
        "synthetic_dir": synthetic_dir,
        "candidates": candidates.name,
        "n_synthetic": len(candidates),
        "spatial_size": list(size),
        "real_datalist": real_datalist,
        "public_datalist": public_datalist,
        "segmenter": {
            "path": segmenter_path,
            "trained_on": seg_info.get("trained_on"),
            "architecture": seg_info.get("architecture"),
        },
        "model_path": model_path,
    }
    report.update(_privacy_of(model_path))
    report["caveat"] = audit.AUDIT_CAVEAT

    # -- the instrument first: segmenter accuracy on held-out real volumes
    acc = {}
    for name, real in (("public_test", public_test), ("private_test", reference)):
        if real is not None and real.labels is not None:
            acc[name] = segmenter.accuracy(
                segmenter.segment(net, real.images, device, batch_size), real.labels, real.spacing
            )
    if "private_test" in acc:
        acc["private_test"]["note"] = "computed on private records: not covered by epsilon"
    report["segmenter"]["accuracy"] = acc
    # ... and the classical detector beside it, on the same volumes
    report["classical_detector"] = {
        name: detector_summary(real.images, real.spacing, real.labels)
        for name, real in (("public_test", public_test), ("private_test", reference))
        if real is not None
    }
    if "private_test" in report["classical_detector"]:
        report["classical_detector"]["private_test"]["note"] = "computed on private records: not covered by epsilon"
    timer.lap("segmenter accuracy")

    # -- controllability
    labels = segmenter.segment(net, candidates.images, device, batch_size)
    measurements = segmenter.measure(labels, candidates.spacing)
    ctrl = control.controllability(candidates.attributes, pair_keys, measurements, min_lv_ml)
    if any(k is not None and not isinstance(k, tuple) for k in pair_keys):  # real cohort: pairs by subject
        pairs = _pairs_from_keys(candidates.attributes, pair_keys)
        ctrl["phase"]["pair_accuracy"] = (
            float(np.mean([measurements[a]["LV_VOLUME"] > measurements[b]["LV_VOLUME"] for a, b in pairs]))
            if pairs
            else None
        )
        ctrl["phase"]["pairs"] = len(pairs)
    scatter = ctrl.pop("scatter")
    detections = detect_many(candidates.images, candidates.spacing)
    ctrl["classical"] = _classical(candidates, detections)
    ctrl["per_volume"] = [
        {
            "id": i,
            "lv_found": control.lv_found(m, min_lv_ml),
            **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()},
            "classical_lv_found": d.found,
            "classical_lv_volume_ml": d.volume_ml,
        }
        for i, m, d in zip(candidates.ids, measurements, detections)
    ]
    report["controllability"] = ctrl
    timer.lap("controllability")

    # -- autoencoder fidelity on a test split
    report["reconstruction"] = None
    if reconstruction is not None and reconstruction.enabled:
        real = public_test if reconstruction.split == "public" else reference
        if autoencoder is None or real is None:
            report["reconstruction"] = {
                "skipped": "no autoencoder (give --model_path or --reconstruction#autoencoder_path)"
                if autoencoder is None
                else "no public cohort (give --public_datalist, or --reconstruction#split private)"
            }
        else:

            def seg_accuracy(images: np.ndarray) -> dict[str, Any]:
                return segmenter.accuracy(segmenter.segment(net, images, device, batch_size), real.labels, real.spacing)

            report["reconstruction"] = evaluate_reconstruction(
                real,
                autoencoder,
                seg_accuracy if real.labels is not None else None,
                reconstruction,
                reconstruction.output_dir
                or os.path.join(plots_dir or os.path.join(bundle_root, "eval"), "reconstructions"),
                device,
                batch_size,
            )
            report["reconstruction"]["autoencoder"] = autoencoder_path
        timer.lap("reconstruction")

    # -- fidelity
    sets = {"synthetic": candidates.images, "private_test": reference.images}
    sets["noise"] = fidelity.noise_volumes(reference.images, seed)
    pairs = {"real_vs_synthetic": ("private_test", "synthetic"), "noise_vs_real": ("private_test", "noise")}
    if public_train is not None:
        sets["public_train"] = public_train.images
        pairs["real_vs_real"] = ("private_test", "public_train")
        pairs["public_vs_synthetic"] = ("public_train", "synthetic")
    feats: dict[str, dict[str, torch.Tensor]] = {}
    report["fidelity"] = {}
    for ex in extractors:
        key = features.metric_key(ex)
        feats[key] = {name: ex(images) for name, images in sets.items()}
        report["fidelity"][key] = fidelity.compare(feats[key], pairs, key)
    timer.lap("fidelity")

    # -- diversity
    report["diversity"] = {
        "synthetic": diversity.pairwise_ms_ssim(
            candidates.images, ms_ssim_pairs, seed, ms_ssim_kernel, "synthetic set"
        ),
        "private_test": diversity.pairwise_ms_ssim(
            reference.images, ms_ssim_pairs, seed, ms_ssim_kernel, "private test set"
        ),
    }
    if public_train is not None:
        report["diversity"]["public_train"] = diversity.pairwise_ms_ssim(
            public_train.images, ms_ssim_pairs, seed, ms_ssim_kernel, "public training set"
        )
    method = "MONAI MultiScaleSSIMMetric, 2D in-plane per slice, averaged over slices; random pairs of distinct volumes"
    report["diversity"]["method"] = method
    timer.lap("diversity")

    # -- sweep
    report["sweeps"] = []
    if sweep_dir:
        for path, meta in sweeps_meta:
            volumes, phases = control.regenerate_sweep(
                meta, path, model_path, attribute_ranges, device, batch_size, bundle_root
            )
            spacing = np.tile(np.asarray(meta.get("spacing_mm", candidates.spacing[0]), dtype=float), (len(volumes), 1))
            vols = np.stack([to_network_layout(np.transpose(v, (1, 2, 0)), size) for v in volumes])
            m = segmenter.measure(segmenter.segment(net, vols, device, batch_size), spacing)
            result = control.sweep_statistics(meta, phases, m)
            result["file"] = path
            found = detect_many(vols, spacing)
            result["classical"] = control.sweep_statistics(
                meta, phases, [{**x, "LV_VOLUME": d.volume_ml} for x, d in zip(m, found)]
            )
            result["classical"] = {
                "lv_volume_ml": result["classical"]["lv_volume_ml"],
                "lv_found_rate": float(np.mean([d.found for d in found])),
                "spearman_rho": result["classical"]["spearman_rho"]
                if result.get("measured_quantity") == "LV_VOLUME" or meta["attribute"] == "LVEF"
                else None,
            }
            report["sweeps"].append(result)
        timer.lap("sweep")

    # -- single-attribute ladders
    report["ladders"] = None
    if ladders is not None and ladders.enabled:
        if model_path is None or not os.path.isfile(model_path) or sidecar is None:
            report["ladders"] = {
                "skipped": "needs --model_path and a synthetic set with sidecars (its sampler, steps and guidance)"
            }
        else:
            synth = control.synthesizer_for(sidecar, sidecar_path, model_path, attribute_ranges, device, bundle_root)

            def measure_volumes(volumes: np.ndarray, spacing: np.ndarray) -> list[dict[str, float]]:
                return segmenter.measure(segmenter.segment(net, volumes, device, batch_size), spacing)

            def synthesize(values: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
                # through the same layout and scaling as a written and re-read sample
                return np.stack([to_network_layout(np.transpose(v, (1, 2, 0)), size) for v in synth(values, seeds)])

            report["ladders"] = run_ladders(
                ladders,
                synthesize,
                measure_volumes,
                candidates.spacing[0],
                lambda m: control.lv_found(m, min_lv_ml),
                batch_size,
            )
            report["ladders"]["sampler"] = {
                k: sidecar.get(k) for k in ("sampler", "steps", "guidance_scale", "weights")
            }
        timer.lap("ladders")

    # -- privacy audit
    extras: dict[str, Any] = {"scatter": scatter}
    if audit_privacy:
        mia, ctrl_result = run_audit(
            model_path,
            real_datalist,
            attribute_ranges,
            mia_timesteps,
            mia_bootstrap,
            seed,
            device,
            batch_size,
            bundle_root,
            positive_control,
            control_units,
            control_steps,
            control_lr,
            weights,
        )
        private_train = load_real(real_datalist, "training", size, name="private training")
        heldout = load_real(real_datalist, list(HELDOUT_SPLITS), size, name="private held-out")
        seg = next(ex for ex in extractors if isinstance(ex, features.SegmenterFeatures))
        mem = [
            audit.memorisation(
                torch.from_numpy(candidates.images).flatten(1),
                torch.from_numpy(private_train.images).flatten(1),
                torch.from_numpy(heldout.images).flatten(1),
                "pixels",
            ),
            audit.memorisation(
                feats["FD_seg3d"]["synthetic"], seg(private_train.images), seg(heldout.images), "FD_seg3d features"
            ),
        ]
        report["privacy_audit"] = {
            "membership_inference": mia,
            "memorisation": mem,
            "positive_control": ctrl_result,
            "caveat": audit.AUDIT_CAVEAT,
        }
        extras.update(mia=mia, control=ctrl_result, memorisation=mem)
        timer.lap("privacy audit")
    else:
        report["privacy_audit"] = None

    # -- figures
    if public_train is not None:
        extras["montage"] = match_real(candidates, public_train, attribute_ranges, montage_count)
    if plots_dir:
        from scripts.evaluation import plots

        report["figures"] = plots.save_all(report, extras, plots_dir)
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
    output_dir: str,
    tracking_uri: str | None = None,
    experiment_name: str = "cardiac_ldm",
    run_name: str | None = None,
    report_name: str = "report",
    **kwargs: Any,
) -> dict[str, Any]:
    """The bundle entry: :func:`evaluate`, then the report files, the figures, MLflow and the printed headline.

    Args:
        output_dir: folder of ``report.json``, ``report.md`` and the figures (``eval/``).
        tracking_uri: MLflow store (None: no MLflow run).
        experiment_name: MLflow experiment (the bundle's stages share ``cardiac_ldm``).
        run_name: MLflow run name (default ``evaluation_<time>``).
        report_name: stem of the report files.
        kwargs: forwarded to :func:`evaluate`.

    Returns:
        the report dict.
    """
    from scripts.evaluation.report import headline_text, log_mlflow, write_report

    report = evaluate(plots_dir=output_dir, **kwargs)
    json_path, md_path = write_report(report, output_dir, report_name)
    if tracking_uri:
        params = {
            k: kwargs.get(k)
            for k in ("synthetic_dir", "real_datalist", "public_datalist", "segmenter_path", "model_path", "sweep_dir")
        }
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
