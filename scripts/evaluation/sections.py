"""The sections of an evaluation report, each measured on the sets :class:`Loaded` holds.

Every section that grades images reports the learned segmenter and the classical detector
(``lv_detector``, no learned parameters) side by side.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.networks.schedulers import DDPMScheduler
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.data import get_dataset
from scripts.evaluation import audit, control, diversity, features, fidelity, segmenter
from scripts.evaluation.ladders import LadderSettings, run_ladders
from scripts.evaluation.lv_detector import detect_many
from scripts.evaluation.reconstruction import ReconstructionSettings, detector_summary, evaluate_reconstruction
from scripts.evaluation.settings import AuditSettings, EvaluationInputs, FeatureSettings, RunSettings
from scripts.evaluation.volumes import VolumeSet, load_real, to_network_layout
from scripts.files import sha256
from scripts.synthesis import load_generator, privacy_info

HELDOUT_SPLITS = ("validation", "test")
CARDIAC = ("LVEDV", "LVESV", "LVEF", "RVEDV", "RVESV", "RVEF", "MYOESTHICK", "MYOEDTHICK", "ESED")
PRIVATE_NOTE = "computed on private records: not covered by epsilon"


@dataclass
class Loaded:
    """The sets and instruments an evaluation reads once and every section shares."""

    candidates: VolumeSet
    pair_keys: list
    size: tuple[int, ...]
    reference: VolumeSet
    public_train: VolumeSet | None
    public_test: VolumeSet | None
    net: torch.nn.Module
    extractors: list
    sidecar: dict | None = None
    sidecar_path: str | None = None
    autoencoder: torch.nn.Module | None = None
    autoencoder_path: str | None = None
    sweeps: list = field(default_factory=list)
    features: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def segment(self, images: np.ndarray, runtime: RunSettings) -> np.ndarray:
        """Label maps of the measuring segmenter."""
        return segmenter.segment(self.net, images, runtime.device, runtime.batch_size)

    def measure(self, images: np.ndarray, spacing: np.ndarray, runtime: RunSettings) -> list[dict[str, float]]:
        """The segmenter's measurements (LV volume, ...) of each volume."""
        return segmenter.measure(self.segment(images, runtime), spacing)


def instrument_section(data: Loaded, runtime: RunSettings) -> dict[str, Any]:
    """The instruments first: segmenter accuracy and the classical detector on held-out real volumes."""
    acc = {}
    for name, real in (("public_test", data.public_test), ("private_test", data.reference)):
        if real is not None and real.labels is not None:
            acc[name] = segmenter.accuracy(data.segment(real.images, runtime), real.labels, real.spacing)
    if "private_test" in acc:
        acc["private_test"]["note"] = PRIVATE_NOTE
    detector = {
        name: detector_summary(real.images, real.spacing, real.labels)
        for name, real in (("public_test", data.public_test), ("private_test", data.reference))
        if real is not None
    }
    if "private_test" in detector:
        detector["private_test"]["note"] = PRIVATE_NOTE
    return {"accuracy": acc, "classical_detector": detector}


def controllability_section(data: Loaded, runtime: RunSettings) -> tuple[dict[str, Any], Any]:
    """Requested vs measured attributes by both instruments; returns (section, scatter data for the figure)."""
    candidates, keys = data.candidates, data.pair_keys
    measurements = data.measure(candidates.images, candidates.spacing, runtime)
    ctrl = control.controllability(candidates.attributes, keys, measurements, runtime.min_lv_ml)
    if any(k is not None and not isinstance(k, tuple) for k in keys):  # real cohort: pairs by subject
        pairs = _pairs_from_keys(candidates.attributes, keys)
        volume = [m["LV_VOLUME"] for m in measurements]
        ctrl["phase"]["pair_accuracy"] = float(np.mean([volume[a] > volume[b] for a, b in pairs])) if pairs else None
        ctrl["phase"]["pairs"] = len(pairs)
    scatter = ctrl.pop("scatter")
    detections = detect_many(candidates.images, candidates.spacing)
    ctrl["classical"] = _classical(candidates, detections)
    ctrl["per_volume"] = [
        {
            "id": i,
            "lv_found": control.lv_found(m, runtime.min_lv_ml),
            **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()},
            "classical_lv_found": d.found,
            "classical_lv_volume_ml": d.volume_ml,
        }
        for i, m, d in zip(candidates.ids, measurements, detections)
    ]
    return ctrl, scatter


def reconstruction_section(
    data: Loaded, settings: ReconstructionSettings, runtime: RunSettings, default_dir: str
) -> dict[str, Any]:
    """Autoencoder fidelity on a test split (public by default)."""
    real = data.public_test if settings.split == "public" else data.reference
    if data.autoencoder is None:
        return {"skipped": "no autoencoder (give --model_path or --reconstruction#autoencoder_path)"}
    if real is None:
        return {"skipped": "no public cohort (give --public_datalist, or --reconstruction#split private)"}

    def seg_accuracy(images: np.ndarray) -> dict[str, Any]:
        return segmenter.accuracy(data.segment(images, runtime), real.labels, real.spacing)

    section = evaluate_reconstruction(
        real,
        data.autoencoder,
        seg_accuracy if real.labels is not None else None,
        settings,
        settings.output_dir or default_dir,
        runtime.device,
        runtime.batch_size,
        os.path.join(runtime.plots_dir, "eval_reconstructions.png") if runtime.plots_dir else None,
    )
    section["autoencoder"] = data.autoencoder_path
    return section


def fidelity_section(data: Loaded, runtime: RunSettings) -> dict[str, Any]:
    """Feature distances between the synthetic, real and noise sets; keeps the features for the audit."""
    sets = {"synthetic": data.candidates.images, "private_test": data.reference.images}
    sets["noise"] = fidelity.noise_volumes(data.reference.images, runtime.seed)
    pairs = {"real_vs_synthetic": ("private_test", "synthetic"), "noise_vs_real": ("private_test", "noise")}
    if data.public_train is not None:
        sets["public_train"] = data.public_train.images
        pairs["real_vs_real"] = ("private_test", "public_train")
        pairs["public_vs_synthetic"] = ("public_train", "synthetic")
    out = {}
    for ex in data.extractors:
        key = features.metric_key(ex)
        data.features[key] = {name: ex(images) for name, images in sets.items()}
        out[key] = fidelity.compare(data.features[key], pairs, key)
    return out


def diversity_section(data: Loaded, settings: FeatureSettings, seed: int) -> dict[str, Any]:
    """Pairwise MS-SSIM within each set."""
    sets = [("synthetic", data.candidates, "synthetic set"), ("private_test", data.reference, "private test set")]
    if data.public_train is not None:
        sets.append(("public_train", data.public_train, "public training set"))
    out: dict[str, Any] = {
        key: diversity.pairwise_ms_ssim(vs.images, settings.ms_ssim_pairs, seed, settings.ms_ssim_kernel, label)
        for key, vs, label in sets
    }
    out["method"] = (
        "MONAI MultiScaleSSIMMetric, 2D in-plane per slice, averaged over slices; random pairs of distinct volumes"
    )
    return out


def sweep_section(data: Loaded, inputs: EvaluationInputs, runtime: RunSettings) -> list[dict[str, Any]]:
    """Each sweep re-generated from the model and measured by both instruments."""
    results = []
    for path, meta in data.sweeps:
        volumes, phases = control.regenerate_sweep(
            meta, path, inputs.model, inputs.attribute_ranges, runtime.device, runtime.batch_size, inputs.bundle_root
        )
        spacing = np.tile(
            np.asarray(meta.get("spacing_mm", data.candidates.spacing[0]), dtype=float), (len(volumes), 1)
        )
        vols = np.stack([to_network_layout(np.transpose(v, (1, 2, 0)), data.size) for v in volumes])
        m = data.measure(vols, spacing, runtime)
        result = control.sweep_statistics(meta, phases, m)
        result["file"] = path
        found = detect_many(vols, spacing)
        classical = control.sweep_statistics(meta, phases, [{**x, "LV_VOLUME": d.volume_ml} for x, d in zip(m, found)])
        volume_measured = result.get("measured_quantity") == "LV_VOLUME" or meta["attribute"] == "LVEF"
        result["classical"] = {
            "lv_volume_ml": classical["lv_volume_ml"],
            "lv_found_rate": float(np.mean([d.found for d in found])),
            "spearman_rho": classical["spearman_rho"] if volume_measured else None,
        }
        results.append(result)
    return results


def ladder_section(
    data: Loaded, settings: LadderSettings, inputs: EvaluationInputs, runtime: RunSettings
) -> dict[str, Any]:
    """Single-attribute ladders sampled from the model with the set's own sampler settings."""
    model = inputs.model
    if model is None or not os.path.isfile(model) or data.sidecar is None:
        return {"skipped": "needs --model_path and a synthetic set with sidecars (its sampler, steps and guidance)"}
    synth = control.synthesizer_for(
        data.sidecar, data.sidecar_path, model, inputs.attribute_ranges, runtime.device, inputs.bundle_root
    )

    def measure_volumes(volumes: np.ndarray, spacing: np.ndarray) -> list[dict[str, float]]:
        return data.measure(volumes, spacing, runtime)

    def synthesize(values: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        # through the same layout and scaling as a written and re-read sample
        return np.stack([to_network_layout(np.transpose(v, (1, 2, 0)), data.size) for v in synth(values, seeds)])

    out = run_ladders(
        settings,
        synthesize,
        measure_volumes,
        data.candidates.spacing[0],
        lambda m: control.lv_found(m, runtime.min_lv_ml),
        runtime.batch_size,
        runtime.plots_dir,
    )
    out["sampler"] = {k: data.sidecar.get(k) for k in ("sampler", "steps", "guidance_scale", "weights")}
    return out


def audit_section(
    data: Loaded, inputs: EvaluationInputs, settings: AuditSettings, runtime: RunSettings
) -> dict[str, Any]:
    """Membership inference, memorisation and the optional positive control."""
    mia, ctrl_result = run_audit(inputs, settings, runtime)
    private_train = load_real(inputs.real_datalist, "training", data.size, name="private training")
    heldout = load_real(inputs.real_datalist, list(HELDOUT_SPLITS), data.size, name="private held-out")
    seg = next(ex for ex in data.extractors if isinstance(ex, features.SegmenterFeatures))
    mem = [
        audit.memorisation(
            torch.from_numpy(data.candidates.images).flatten(1),
            torch.from_numpy(private_train.images).flatten(1),
            torch.from_numpy(heldout.images).flatten(1),
            "pixels",
        ),
        audit.memorisation(
            data.features["FD_seg3d"]["synthetic"], seg(private_train.images), seg(heldout.images), "FD_seg3d features"
        ),
    ]
    return {
        "membership_inference": mia,
        "memorisation": mem,
        "positive_control": ctrl_result,
        "caveat": audit.AUDIT_CAVEAT,
    }


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


def privacy_of(model_path: str | None, sidecar: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The DP guarantee of the synthetic set, for the report.

    The samples' own sidecar says which weights they were drawn from and the guarantee that
    covered those (a public ``diffusion.pt`` has none): that is the set's guarantee, whatever
    ``model_path`` the audit scores. Without sidecars (a real cohort as candidates), the model's,
    from the privacy report beside it when the report names this model.
    """
    if sidecar is not None and "privacy" in sidecar:
        out = {k: sidecar[k] for k in ("privacy", "privacy_warning", "privacy_note") if k in sidecar}
        out["privacy_of"] = {"model": sidecar.get("model"), "model_sha256": sidecar.get("model_sha256")}
        return out
    if not model_path or not os.path.isfile(model_path):
        return {"privacy": None, "privacy_warning": "no model given"}
    return privacy_info(
        os.path.join(os.path.dirname(os.path.abspath(model_path)), "privacy_report.json"), sha256(model_path)
    )


def run_audit(
    inputs: EvaluationInputs, settings: AuditSettings, runtime: RunSettings
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Membership inference on the private cohort (and the positive control) against the model's weights.

    Returns:
        (mia, control).
    """
    model_path, real_datalist, attribute_ranges = inputs.model, inputs.real_datalist, inputs.attribute_ranges
    weights, bundle_root = inputs.weights, inputs.bundle_root
    device, batch_size, seed = runtime.device, runtime.batch_size, runtime.seed
    timesteps, bootstrap = settings.timesteps, settings.bootstrap
    generator = load_generator(model_path, device=device, weights=weights, bundle_root=bundle_root)
    network, autoencoder, info = generator.network, generator.autoencoder, generator.info
    scheduler = DDPMScheduler(**{**info["scheduler"], "clip_sample": False})
    unit = (privacy_of(model_path).get("privacy") or {}).get("privacy_unit") or "subject"

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
    if settings.positive_control:

        def first_units(data: tuple, k: int) -> tuple:
            lat, cond, units = data
            keep_units = list(dict.fromkeys(units))[:k]
            idx = [i for i, u in enumerate(units) if u in keep_units]
            return lat[idx], cond[idx], [units[i] for i in idx]

        ctrl = audit.overfit_control(
            network,
            scheduler,
            first_units(members, settings.control_units),
            first_units(nonmembers, settings.control_units),
            timesteps,
            settings.control_steps,
            settings.control_lr,
            seed,
            device,
            batch_size,
            min(bootstrap, 200),
        )
    return mia, ctrl


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
