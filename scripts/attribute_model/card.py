"""The cohort card: one page on what a synthetic cohort (or a release) is and what protects it.

``cohort_card.json`` + ``cohort_card.md`` are written into every synthesis output folder and every
release archive: the total (epsilon, delta) and its unit, composed by the accountant over every
DP stage behind the images and the attributes (never a sum of epsilons); each stage's mechanism
and parameters; what is covered and what is not; the SHA-256 of the diffusion model, the decoder
and the attribute model; the sampler settings; the bundle version; and, once the evaluation
stage has run on the folder, its headline numbers (:func:`add_evaluation`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from scripts.errors import DataError
from scripts.files import sha256, write_text_atomic

__all__ = ["CARD_JSON", "CARD_MD", "add_evaluation", "build_card", "compose_cohort", "render_markdown", "write_card"]

CARD_JSON = "cohort_card.json"
CARD_MD = "cohort_card.md"
KIND = "cohort_card"
#: evaluation headline numbers shown in the Markdown (all of them are kept in the JSON)
HEADLINE = {
    "FD_seg3d_real_vs_synthetic": "fidelity: FD_seg3d real vs synthetic",
    "FD_seg3d_real_vs_real": "fidelity: FD_seg3d real vs real (scale)",
    "FID_inception2d_real_vs_synthetic": "fidelity: FID_inception2d real vs synthetic",
    "lv_found_rate": "control: LV found",
    "lvedv_pearson_r": "control: LVEDV Pearson r",
    "phase_accuracy": "control: ED/ES accuracy",
    "sweep_spearman_rho": "control: sweep Spearman rho",
    "reconstruction_psnr": "reconstruction fidelity: PSNR",
    "mia_auc": "privacy audit: membership-inference AUC",
}


def _file(path: str | None) -> dict[str, Any] | None:
    return {"path": path, "sha256": sha256(path)} if path and os.path.isfile(path) else None


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _stage_summary(s: Mapping[str, Any]) -> dict[str, Any]:
    mechanism = s.get("mechanism") or (
        "DP-SGD: Poisson-subsampled Gaussian mechanism per step"
        + (f", clipping norm C = {s['max_grad_norm']:g}" if isinstance(s.get("max_grad_norm"), (int, float)) else "")
    )
    return {
        "stage": s.get("stage"),
        "mechanism": mechanism,
        "noise_multiplier": s.get("noise_multiplier"),
        "sample_rate": s.get("sample_rate"),
        "steps": s.get("steps"),
        "privacy_unit": s.get("privacy_unit"),
        "dataset": s.get("dataset"),
        "units": s.get("units"),
    }


def compose_cohort(
    stage_lists: Sequence[Sequence[Mapping[str, Any]]], delta: float, accountant: str
) -> tuple[float, list[dict[str, Any]]]:
    """(epsilon, stages): every DP stage behind a cohort, each once, composed by the accountant.

    Args:
        stage_lists: ledger entries, e.g. the diffusion model's report stages and the attribute
            model's ledger (a stage in both is composed once, as :func:`~scripts.privacy.ledger.ancestors` does).
        delta: the delta of the total.
        accountant: ``prv`` or ``rdp``.
    """
    from scripts.privacy.accounting import compose_epsilon
    from scripts.privacy.ledger import ancestors

    stages = ancestors(*({"privacy_ledger": list(s)} for s in stage_lists))
    history = [(float(s["noise_multiplier"]), float(s["sample_rate"]), int(s["steps"])) for s in stages if s["steps"]]
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf, stages
    return (compose_epsilon(history, delta, accountant) if history else 0.0), stages


def build_card(
    *,
    model_path: str | None,
    autoencoder_path: str | None,
    report_path: str | None,
    attributes_model: str | None = None,
    attributes_csv: str | None = None,
    sampler: Mapping[str, Any] | None = None,
    bundle_version: str | None = None,
    samples: int | None = None,
    subjects: int | None = None,
) -> dict[str, Any]:
    """The cohort card of synthetic images of ``model_path`` decoded with ``autoencoder_path``.

    Args:
        model_path: the diffusion model sampled from (or released).
        autoencoder_path: the decoder.
        report_path: the diffusion model's privacy report.
        attributes_model: the DP attribute model the attribute rows were drawn from (None: not used).
        attributes_csv: the request CSV the rows came from (None: not used).
        sampler: sampler settings (None for a release).
        bundle_version: the bundle's version.
        samples: synthetic volumes in the folder.
        subjects: subjects drawn from the attribute model.
    """
    from scripts.attribute_model.model import read_model
    from scripts.privacy.report import read_report

    files = {
        "diffusion_model": _file(model_path),
        "decoder": _file(autoencoder_path),
        "attribute_model": _file(attributes_model),
        "attributes_csv": _file(attributes_csv),
    }
    covered, not_covered, lists = [], [], []
    delta, accountant, unit = None, "prv", None
    report = read_report(report_path) if report_path and os.path.isfile(report_path) else None
    images_covered = False
    if report is None:
        not_covered.append(f"the synthetic images: no privacy report for the diffusion model ({report_path})")
    elif files["diffusion_model"] and report.get("model_sha256") != files["diffusion_model"]["sha256"]:
        not_covered.append(
            f"the synthetic images: the privacy report {report_path} describes another model (sha256 "
            f"{str(report.get('model_sha256'))[:16]}...), not {model_path}"
        )
    elif files["decoder"] and report.get("autoencoder_sha256") not in (None, files["decoder"]["sha256"]):
        not_covered.append(
            f"the synthetic images: decoded with {autoencoder_path}, not the autoencoder the report {report_path} names"
        )
    elif report.get("status", "complete") != "complete":
        not_covered.append(f"the synthetic images: the privacy report {report_path} is not complete")
    else:
        images_covered = True
        lists.append(report.get("stages", []))
        delta, accountant, unit = float(report["delta"]), report.get("accountant", "prv"), report["privacy_unit"]
        covered.append(
            f"the diffusion model {model_path} and every image sampled from it and decoded with {autoencoder_path}"
        )
    if attributes_model:
        model = read_model(attributes_model)
        p = model.privacy
        lists.append(model.privacy_ledger)
        delta = max(delta or 0.0, float(p.get("delta", 0.0))) or None
        accountant = accountant if images_covered else p.get("accountant", "prv")
        if unit not in (None, p.get("privacy_unit")):
            not_covered.append(
                f"a single unit: the images are {unit}-level, the attribute model {p.get('privacy_unit')}-level"
            )
        unit = unit or p.get("privacy_unit")
        covered.append(f"the attribute model {attributes_model} and the attribute rows drawn from it (post-processing)")
    if attributes_csv:
        not_covered.append(
            f"the attribute rows of {attributes_csv}: the user's input; if they were copied from private records, "
            "releasing them is a separate release this guarantee does not cover"
        )
    not_covered += [
        "repeated runs and hyper-parameter selection on the private data (every run spends its own budget)",
        "evaluation numbers computed on private records (the evaluation report)",
    ]
    epsilon, stages = (math.inf, [])
    if lists and delta:
        epsilon, stages = compose_cohort(lists, delta, accountant)
    if images_covered and not report.get("stages"):  # a report without its ledger: nothing to compose with
        if attributes_model:
            epsilon = None
            not_covered.insert(0, f"a composed total: the privacy report {report_path} lists no stages to compose")
        else:  # JSON has no inf: a report of a run without noise holds null
            epsilon = math.inf if report.get("epsilon") is None else float(report["epsilon"])
    datasets = sorted({str(s.get("dataset")) for s in stages})
    privacy = {
        "epsilon": epsilon if lists else None,
        "delta": delta,
        "privacy_unit": unit,
        "accountant": accountant,
        "composition": f"{accountant} accountant over every stage listed (each once), not a sum of epsilons",
        "datasets": datasets,
        "stages": [_stage_summary(s) for s in stages],
        "covered": covered,
        "not_covered": not_covered,
    }
    if len(datasets) > 1:
        privacy["note"] = "stages on different datasets are composed as if on one (an upper bound)"
    return {
        "kind": KIND,
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "bundle_version": bundle_version,
        "privacy": privacy,
        "files": files,
        "sampler": dict(sampler) if sampler else None,
        "samples": samples,
        "subjects": subjects,
        "attribute_source": "dp_attribute_model" if attributes_model else ("csv" if attributes_csv else None),
        "evaluation": None,
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def render_markdown(card: Mapping[str, Any]) -> str:
    """The card as Markdown."""
    p = card["privacy"]
    eps = p["epsilon"]
    lines = ["# Cohort card", ""]
    if eps is None:
        lines.append("**No differential-privacy guarantee is known for this cohort.**")
    elif math.isinf(eps):
        lines.append("**No differential-privacy guarantee: a stage ran without noise.**")
    else:
        lines.append(
            f"**Total: ({eps:.4g}, {p['delta']:g})-differential privacy, {p['privacy_unit']}-level** "
            f"({p['composition']})."
        )
    lines += ["", "## Stages", "", "| stage | mechanism | sigma | q | steps |", "|---|---|---|---|---|"]
    for s in p["stages"]:
        lines.append(
            f"| {s['stage']} | {s['mechanism']} | {_fmt(s['noise_multiplier'])} | {_fmt(s['sample_rate'])} | "
            f"{_fmt(s['steps'])} |"
        )
    lines += ["", "## Covered", ""] + [f"- {c}" for c in p["covered"] or ["nothing"]]
    lines += ["", "## Not covered", ""] + [f"- {c}" for c in p["not_covered"]]
    lines += ["", "## Files", "", "| role | file | SHA-256 |", "|---|---|---|"]
    for role, f in card["files"].items():
        lines.append(f"| {role} | {f['path'] if f else '-'} | {f['sha256'] if f else '-'} |")
    if card.get("sampler"):
        lines += ["", "## Sampler", ""] + [f"- {k}: {_fmt(v)}" for k, v in card["sampler"].items()]
    lines += [
        "",
        f"Bundle version: {_fmt(card.get('bundle_version'))}; samples: {_fmt(card.get('samples'))}; "
        f"attribute rows from: {_fmt(card.get('attribute_source'))}.",
    ]
    ev = card.get("evaluation")
    lines += ["", "## Evaluation", ""]
    if ev:
        lines.append(f"From {ev['report']}:")
        lines.append("")
        lines += [f"- {label}: {_fmt(ev['headline'].get(k))}" for k, label in HEADLINE.items() if k in ev["headline"]]
    else:
        lines.append(
            "Not evaluated yet (`python -m monai.bundle run evaluating "
            "--config_file \"['configs/common.yaml','configs/evaluate.yaml']\" "
            "--synthetic_dir <this folder>` adds its headline numbers here)."
        )
    return "\n".join(lines) + "\n"


def write_card(folder: str, card: Mapping[str, Any]) -> str:
    """Write ``cohort_card.json`` and ``cohort_card.md`` atomically into ``folder``; returns the JSON path."""
    path = os.path.join(folder, CARD_JSON)
    write_text_atomic(path, json.dumps(card, indent=2))
    write_text_atomic(os.path.join(folder, CARD_MD), render_markdown(card))
    return path


def add_evaluation(synthetic_dir: str | None, report_path: str) -> str | None:
    """Add an evaluation's headline numbers to the card of the folder it evaluated (if it has one).

    Args:
        synthetic_dir: the evaluated folder.
        report_path: the evaluation's ``report.json``.

    Returns:
        the card's path, or None when the folder has no card or the report is absent.
    """
    if not synthetic_dir:
        return None
    card_path = os.path.join(synthetic_dir, CARD_JSON)
    card, report = _read_json(card_path), _read_json(report_path)
    if card is None or report is None:
        return None
    if card.get("kind") != KIND:
        raise DataError(f"{card_path}: not a cohort card (kind {card.get('kind')!r})")
    card["evaluation"] = {
        "report": report_path,
        "report_sha256": sha256(report_path),
        "headline": report.get("headline", {}),
    }
    return write_card(synthetic_dir, card)


def release_entries(
    *,
    model: str | None,
    autoencoder: str | None,
    report: str | None,
    attributes_model: str | None,
    bundle_version: str | None,
) -> list[tuple[bytes, str]]:
    """``(bytes, path in the bundle)`` of the cohort card and the attribute model (when given), for a release."""
    card = build_card(
        model_path=model,
        autoencoder_path=autoencoder,
        report_path=report,
        attributes_model=attributes_model,
        bundle_version=bundle_version,
    )
    card["created"] = None  # the same release gives the same archive bytes
    for role, f in card["files"].items():  # named as in the bundle, not by the local paths
        if f:
            f["path"] = (
                "models/attributes_dp.json" if role == "attribute_model" else f"models/{os.path.basename(f['path'])}"
            )
    entries = [
        (json.dumps(card, indent=2).encode(), f"models/{CARD_JSON}"),
        (render_markdown(card).encode(), f"models/{CARD_MD}"),
    ]
    if attributes_model:
        with open(attributes_model, "rb") as f:
            entries.append((f.read(), "models/attributes_dp.json"))
    return entries
