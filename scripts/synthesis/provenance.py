"""What every synthetic image records about how it was made, and which privacy guarantee covers it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a type only: the generator module imports nothing from here
    from scripts.synthesis.generator import GeneratorFiles, Synthesizer

# a model and autoencoder that never saw private data (the public pre-training stages): no DP guarantee applies
PUBLIC_NOTE = (
    "public data only: the model and its autoencoder were trained on public data, no private data was used; "
    "no differential-privacy guarantee is needed or given"
)
ATTRIBUTES_NOTE = (
    "Conditioning attributes are the user's input. If they were copied from private records, releasing them "
    "(e.g. in this sidecar) is a separate release that the model's differential-privacy guarantee does not cover."
)


def bundle_version(meta: Mapping | None) -> str | None:
    """The bundle version from the parsed ``configs/metadata.json`` (MONAI's ``_meta_``)."""
    return None if not meta else meta.get("version")


def privacy_info(report_path: str, model_sha256: str, autoencoder_sha256: str | None = None) -> dict[str, Any]:
    """The privacy guarantee that applies to samples of the model with hash ``model_sha256``.

    The report's epsilon covers images decoded with the autoencoder it names: decoding with
    another one (e.g. a DP-fine-tuned autoencoder the ledger lacks) voids the claim.

    Args:
        report_path: ``models/privacy_report.json`` written by the DP stage.
        model_sha256: SHA-256 of the model file sampled from.
        autoencoder_sha256: SHA-256 of the autoencoder file decoded with.

    Returns:
        ``{"privacy": {epsilon, delta, privacy_unit, accountant, report, covers}}`` when the
        report is complete and names this model; otherwise ``{"privacy": None,
        "privacy_warning": why}``.
    """

    def unknown(why: str) -> dict[str, Any]:
        return {
            "privacy": None,
            "privacy_warning": f"{why}: no differential-privacy guarantee is known for these images",
        }

    if not os.path.isfile(report_path):
        return unknown(f"no privacy report at {report_path}")
    try:
        with open(report_path) as f:
            report = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return unknown(f"privacy report {report_path} is unreadable ({e})")
    if report.get("model_sha256") != model_sha256:
        return unknown(
            f"privacy report {report_path} describes model sha256 {str(report.get('model_sha256'))[:16]}..., "
            f"not the model sampled from (sha256 {model_sha256[:16]}...)"
        )
    if autoencoder_sha256 is not None and report.get("autoencoder_sha256") != autoencoder_sha256:
        return unknown(
            f"privacy report {report_path} covers images decoded with the autoencoder of sha256 "
            f"{str(report.get('autoencoder_sha256'))[:16]}..., not the one used (sha256 {autoencoder_sha256[:16]}...)"
        )
    if report.get("status", "complete") != "complete":
        return unknown(f"privacy report {report_path} has status {report.get('status')!r}, not 'complete'")
    keys = ("epsilon", "delta", "privacy_unit", "accountant")
    missing = [k for k in keys if k not in report]
    if missing:
        return unknown(f"privacy report {report_path} lacks {missing}")
    privacy = {k: report[k] for k in keys}
    privacy.update(report=report_path, covers=report.get("covers"), not_covered=report.get("not_covered"))
    return {"privacy": privacy}


def make_provenance(
    files: GeneratorFiles, report_path: str, model_version: str | None, synthesizer: Synthesizer
) -> dict[str, Any]:
    """What every sidecar records about how its image was made.

    The checkpoint's model information tells a public model (no privacy ledger, not fine-tuned
    from another model, decoded by a public autoencoder) from a DP one: its sidecars say
    ``privacy_note`` (:data:`PUBLIC_NOTE`) instead of a missing guarantee. A DP model's guarantee
    is the report's only when the report names these very files (:func:`privacy_info`).

    Args:
        files: the generator's files (:func:`scripts.synthesis.load_generator`).
        report_path: the privacy report of the DP stage (``models/privacy_report.json``).
        model_version: the bundle version (:func:`bundle_version`).
        synthesizer: the sampler (its sampler, steps and guidance are recorded).

    Returns:
        sampler, steps, guidance scale, weights, model file + SHA-256, bundle version,
        autoencoder file + SHA-256, and the privacy block of :func:`privacy_info`.
    """
    info = {
        "sampler": synthesizer.sampler,
        "steps": synthesizer.steps,
        "guidance_scale": synthesizer.guidance_scale,
        "weights": files.weights,
        "model": files.model,
        "model_sha256": files.model_sha256,
        "model_version": model_version,
        "autoencoder": files.autoencoder,
        "autoencoder_sha256": files.autoencoder_sha256,
    }
    if is_public(files.model_info, synthesizer.autoencoder):
        info.update({"privacy": None, "privacy_note": PUBLIC_NOTE})
    else:
        info.update(privacy_info(report_path, files.model_sha256, files.autoencoder_sha256))
    info["attributes_note"] = ATTRIBUTES_NOTE
    return info


def is_public(model_info: Mapping[str, Any], autoencoder: Any) -> bool:
    """A model that never saw private data: no ledger, not fine-tuned from another model, a public decoder."""
    return (
        not model_info.get("privacy_ledger")
        and "pretrained" not in model_info
        and not getattr(autoencoder, "privacy_ledger", None)
    )
