"""Build a Model Zoo style release: the bundle archive plus its published weights.

    python -m scripts.release --out DIR --base_url URL
    python -m scripts.release --out DIR --base_url URL --model models/model.pt --report models/privacy_report.json

writes into ``DIR``

- ``<name>_v<version>.zip`` (name and version from ``configs/metadata.json``): one top-level folder
  ``<name>/`` with ``configs/``, ``scripts/``, ``docs/``, ``LICENSE``, ``README.md``,
  ``large_files.yml`` and ``models/`` (its README, the cohort card ``cohort_card.{json,md}`` and, with
  ``--attributes_model``, the DP attribute model: no weights);
- the weight files beside it: the PUBLIC pre-trained ``autoencoder.pt`` and ``diffusion.pt`` and,
  when given, the DP fine-tuned ``model.pt`` with its ``privacy_report.json``.

The ``large_files.yml`` inside the archive lists every published file with ``path``, ``url``
(``URL/<file name>``), ``hash_val`` and ``hash_type`` (sha256), the format that
``python -m monai.bundle download_large_files`` reads; a corrupted or tampered download then
fails its hash check. Upload the zip and the files beside it to ``URL``; users get the bundle with

    python -m monai.bundle download --name <name> --version <version> --url URL/<name>_v<version>.zip --bundle_dir D
    python -m monai.bundle download_large_files --bundle_path D/<name>

Checks before anything is written: the weights exist; the autoencoder and the diffusion model
were trained on public data only (no privacy ledger, no DP state) and belong together (same latent
scale factor); a DP model comes with its report, the report is complete and its ``model_sha256``
is the model file's SHA-256; the version is in the changelog and not already released in ``DIR``.
Everything is built in a temp folder inside ``DIR`` and renamed into place at the end, so a failed
release leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.errors import BundleError
from scripts.files import sha256

HASH_TYPE = "sha256"
# what the archive holds, relative to the bundle root (folders are copied recursively)
ARCHIVE_CONTENT = ("configs", "scripts", "docs", "LICENSE", "README.md", "models/README.md")
SKIP_NAMES = ("__pycache__", ".pytest_cache", ".ipynb_checkpoints")
SKIP_SUFFIXES = (".pyc", ".pyo")
ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # fixed timestamps: the same bundle gives the same archive bytes
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
VERSION_PATTERN = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_+-]*(\.[0-9A-Za-z_+-]+)*$")
AUTOENCODER_STAGE = (
    "python -m monai.bundle run training --config_file \"['configs/common.yaml','configs/train_autoencoder.yaml']\""
)
DIFFUSION_STAGE = (
    "python -m monai.bundle run training --config_file \"['configs/common.yaml','configs/train_diffusion.yaml']\""
)
DP_STAGE = "python -m monai.bundle run training --config_file \"['configs/common.yaml','configs/dp_finetune.yaml']\""
# resume-only content of a stage checkpoint, dropped from the public weights by --strip_training_state
TRAINING_STATE_KEYS = ("optimizer", "lr_scheduler", "rng", "trainer", "loss")
# model.pt and autoencoder.pt keep their bytes: the privacy report names both SHA-256 (its epsilon covers images
# decoded with that autoencoder file)
STRIPPABLE = ("diffusion.pt",)


class ReleaseError(BundleError, ValueError):
    """Bad release input; the message names the file or option and the expected form."""


@dataclass
class Asset:
    """A published file: where it comes from, where it goes in the bundle, and its hash.

    Attributes:
        source: the local file.
        path: its path inside the bundle (``models/<file name>``), as written in ``large_files.yml``.
        sha256: hex SHA-256 of the file.
        size: bytes.
    """

    source: Path
    path: str
    sha256: str
    size: int

    @property
    def file_name(self) -> str:
        """The name of the file published beside the archive (and in its URL)."""
        return Path(self.path).name


def read_metadata(bundle_root: str | os.PathLike) -> dict[str, Any]:
    """Read ``configs/metadata.json`` and check what a release needs from it.

    Args:
        bundle_root: the bundle root.

    Returns:
        the metadata dict.

    Raises:
        ReleaseError: missing file, invalid JSON, no ``version``, or the version not in ``changelog``.
    """
    path = Path(bundle_root) / "configs" / "metadata.json"
    if not path.is_file():
        raise ReleaseError(f"{path} not found: run the release from the bundle root or pass --bundle_root DIR")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReleaseError(f"{path}: invalid JSON ({e})") from e
    version = meta.get("version")
    if not isinstance(version, str) or not VERSION_PATTERN.match(version):
        raise ReleaseError(f"{path}: field 'version' must be a version string such as \"0.3.0\", got {version!r}")
    if version not in (meta.get("changelog") or {}):
        raise ReleaseError(
            f"{path}: version {version} has no entry in 'changelog' (the Model Zoo requires one); add "
            f'"{version}": "<what changed>" to \'changelog\''
        )
    return meta


def bundle_name(meta: dict[str, Any], override: str | None = None) -> str:
    """The bundle's folder name: ``--name``, else ``bundle_name`` of the metadata, else its ``name`` as a slug.

    Args:
        meta: parsed ``configs/metadata.json``.
        override: the ``--name`` option, if given.

    Returns:
        a name of letters, digits, ``_`` and ``-`` (MONAI's download names the folder after the
        archive's name up to its first dot, so the name has none).
    """
    name = (
        override or meta.get("bundle_name") or re.sub(r"[^a-z0-9]+", "_", str(meta.get("name", "")).lower()).strip("_")
    )
    if not name or not NAME_PATTERN.match(name):
        origin = "--name" if override else "configs/metadata.json field 'bundle_name' (or 'name')"
        raise ReleaseError(
            f"{origin}: expected a bundle name of letters, digits, '_' and '-' (e.g. cardiac_dp_ldm), got {name!r}"
        )
    return name


def check_base_url(base_url: str) -> str:
    """Return ``base_url`` without its trailing slash, or raise naming the expected form."""
    url = (base_url or "").strip().rstrip("/")
    if not re.match(r"^(https?|file)://[^\s]+$", url):
        raise ReleaseError(
            f"--base_url: expected the URL of the folder the release files are uploaded to, e.g. "
            f"https://github.com/ORG/REPO/releases/download/v0.2.0 (http, https or file), got {base_url!r}"
        )
    return url


def _load(path: Path, option: str, produced_by: str) -> dict[str, Any]:
    if not path.is_file():
        raise ReleaseError(f"{option}: {path} not found; it is produced by: {produced_by}")
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise ReleaseError(
            f"{option}: {path} is not a readable checkpoint of this bundle ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(ckpt, dict) or "architecture" not in ckpt:
        raise ReleaseError(
            f"{option}: {path} is not a checkpoint of this bundle (no 'architecture'); "
            f"expected the file {produced_by} writes"
        )
    return ckpt


def _check_scale_factor(option: str, path: Path, ckpt: dict[str, Any], autoencoder: Path, expected: float) -> None:
    """Raise unless the diffusion checkpoint was trained on the latents of this autoencoder (same scale factor)."""
    actual = float(ckpt["scale_factor"])
    if abs(actual - expected) > 1e-6 * max(1.0, abs(expected)):
        raise ReleaseError(
            f"{option}: {path} was trained with another autoencoder (latent scale factor {actual:.6g}, "
            f"{autoencoder} has {expected:.6g}); publish the autoencoder it was trained with"
        )


def _check_public_autoencoder(autoencoder: Path) -> float:
    """The public pre-trained autoencoder, complete; returns its latent scale factor."""
    ae = _load(autoencoder, "--autoencoder", AUTOENCODER_STAGE)
    if "network" not in ae or "scale_factor" not in ae["network"]:
        raise ReleaseError(
            f"--autoencoder: {autoencoder} holds no autoencoder weights; expected the file {AUTOENCODER_STAGE} writes"
        )
    if ae.get("privacy_ledger"):
        raise ReleaseError(
            f"--autoencoder: {autoencoder} was fine-tuned on private data (it has a privacy ledger); only the "
            f"autoencoder pre-trained on PUBLIC data is published as models/autoencoder.pt ({AUTOENCODER_STAGE})"
        )
    if not bool(ae["network"].get("scale_factor_measured", True)):
        raise ReleaseError(
            f"--autoencoder: {autoencoder}: the latent scale factor was never measured (the stage did not complete)"
        )
    return float(ae["network"]["scale_factor"])


def _check_report(model: Path, report: Path | None, autoencoder: Path, allow_non_private: bool) -> str:
    """The DP model's report: present, about this model and autoencoder, complete, private; returns the model hash."""
    if report is None or not report.is_file():
        raise ReleaseError(
            f"--model {model}: its privacy report {report or '<none>'} was not found; a DP fine-tuned model is only "
            f"published with the models/privacy_report.json that {DP_STAGE} wrote with it (pass --report FILE)"
        )
    if not model.is_file():
        raise ReleaseError(f"--model: {model} not found; it is produced by: {DP_STAGE}")
    try:
        info = json.loads(report.read_text())
    except json.JSONDecodeError as e:
        raise ReleaseError(f"--report: {report} is not valid JSON ({e})") from e
    digest = sha256(model)
    if info.get("model_sha256") != digest:
        raise ReleaseError(
            f"--report: {report} is about another model: its model_sha256 is {info.get('model_sha256')!r}, but "
            f"{model} has SHA-256 {digest}; publish the model together with the report its DP fine-tuning wrote"
        )
    ae_digest = sha256(autoencoder)
    if info.get("autoencoder_sha256") not in (None, ae_digest):
        raise ReleaseError(
            f"--report: {report} covers images decoded with the autoencoder of SHA-256 {info['autoencoder_sha256']}, "
            f"but --autoencoder {autoencoder} has SHA-256 {ae_digest}; publish the autoencoder the model was "
            f"fine-tuned with"
        )
    if info.get("status", "complete") != "complete":
        raise ReleaseError(f"--report: {report} has status {info.get('status')!r}; the DP fine-tuning did not complete")
    epsilon = info.get("epsilon")  # JSON has no inf: a run without noise reports null
    if (epsilon is None or not math.isfinite(float(epsilon))) and not allow_non_private:
        raise ReleaseError(
            f"--model: {model} was trained on the private data WITHOUT noise ({report}: epsilon "
            f"{'inf' if epsilon is None else epsilon}, covers {info.get('covers', 'nothing')!r}): publishing it "
            f"publishes the private data. Pass --allow_non_private only if that is intended (the archive then says so)"
        )
    return digest


def check_weights(
    autoencoder: Path, diffusion: Path, model: Path | None, report: Path | None, *, allow_non_private: bool = False
) -> list[Asset]:
    """Check the weights to publish and return them as assets (autoencoder, diffusion[, model, report]).

    Args:
        autoencoder: public pre-trained autoencoder (``models/autoencoder.pt``).
        diffusion: public pre-trained diffusion model (``models/diffusion.pt``).
        model: DP fine-tuned model (``models/model.pt``) or None.
        report: its privacy report, required with ``model``.

    Returns:
        the assets, each with its bundle path ``models/<file name>`` and its SHA-256.

    Raises:
        ReleaseError: naming the file, the option and what is expected.
    """
    ae_scale = _check_public_autoencoder(autoencoder)
    ldm = _load(diffusion, "--diffusion", DIFFUSION_STAGE)
    if "dp" in ldm or "ema" not in ldm:
        raise ReleaseError(
            f"--diffusion: {diffusion} is not the public pre-trained diffusion model (expected the file "
            f"{DIFFUSION_STAGE} writes; a DP fine-tuned model is published with --model and --report)"
        )
    _check_scale_factor("--diffusion", diffusion, ldm, autoencoder, ae_scale)
    assets = [_asset(autoencoder, "autoencoder.pt"), _asset(diffusion, "diffusion.pt")]
    if model is None:
        if report is not None:
            raise ReleaseError(
                f"--report {report} given without --model: pass the DP fine-tuned model the report is about"
            )
        # a public-only release: the public diffusion model is also the bundle's models/model.pt (the file the
        # Model Zoo's checks and configs/inference.yaml expect); trained on public data only, it needs no DP guarantee
        return [*assets, _asset(diffusion, "model.pt")]
    digest = _check_report(model, report, autoencoder, allow_non_private)
    dp = _load(model, "--model", DP_STAGE)
    if "dp" not in dp:
        raise ReleaseError(
            f"--model: {model} is not a DP fine-tuned model (no DP state); expected the file {DP_STAGE} writes"
        )
    _check_scale_factor("--model", model, dp, autoencoder, ae_scale)
    stored = str(dp.get("autoencoder") or "")
    if stored and Path(stored).name != "autoencoder.pt":
        raise ReleaseError(
            f"--model: {model} decodes with the autoencoder {stored}, not a public models/autoencoder.pt; only models "
            f"fine-tuned over the public autoencoder can be published"
        )
    return [*assets, _asset(model, "model.pt", digest), _asset(report, "privacy_report.json")]


def _report_epsilon(report: Path) -> float | None:
    """The finite epsilon of a privacy report, or None (a run without noise)."""
    epsilon = json.loads(report.read_text()).get("epsilon")
    return None if epsilon is None or not math.isfinite(float(epsilon)) else float(epsilon)


def _asset(source: Path, file_name: str, digest: str | None = None) -> Asset:
    return Asset(source, f"models/{file_name}", digest or sha256(source), source.stat().st_size)


def write_weights_only(source: Path, target: Path) -> None:
    """Write ``source`` without its resume-only state (``TRAINING_STATE_KEYS``) to ``target``.

    What the later stages read stays: weights (``network``, ``ema``), architecture, scale factor,
    latent shape, schedule, privacy ledger. Resuming training from the result is not possible.

    Args:
        source: a stage checkpoint.
        target: the file to write.
    """
    import torch

    ckpt = torch.load(source, map_location="cpu", weights_only=False)
    torch.save({k: v for k, v in ckpt.items() if k not in TRAINING_STATE_KEYS}, target)


def large_files_yaml(assets: Sequence[Asset], base_url: str, non_private: bool = False) -> str:
    """The ``large_files.yml`` of the archive: one entry per asset (path, url, hash_val, hash_type).

    Args:
        assets: the published files.
        base_url: where they are uploaded (no trailing slash).
        non_private: ``model.pt`` was trained on private data without noise (``--allow_non_private``).

    Returns:
        the YAML text.
    """
    import yaml

    entries = [
        {"path": a.path, "url": f"{base_url}/{a.file_name}", "hash_val": a.sha256, "hash_type": HASH_TYPE}
        for a in assets
    ]
    if non_private:
        model_note = (
            "# model.pt was trained on PRIVATE data WITHOUT noise (--allow_non_private): it has NO differential\n"
            "# privacy guarantee and may reveal its training records; see models/privacy_report.json.\n"
        )
    elif any(a.file_name == "privacy_report.json" for a in assets):
        model_note = "# model.pt is DP fine-tuned, with the guarantee stated in models/privacy_report.json.\n"
    else:  # a public-only release
        model_note = (
            "# model.pt is the public diffusion model (public data only: no differential-privacy guarantee is\n"
            "# needed or given; no private data was used).\n"
        )
    header = (
        "# Published weights of this release, fetched into models/ by\n"
        "#   python -m monai.bundle download_large_files --bundle_path <bundle folder>\n"
        "# Each file is checked against its hash. autoencoder.pt and diffusion.pt were trained on PUBLIC data only;\n"
        + model_note
    )
    return header + yaml.safe_dump({"large_files": entries}, sort_keys=False)


def _archive_files(bundle_root: Path) -> Iterator[tuple[Path, str]]:
    """(file, path inside the bundle) for every file the archive holds, sorted."""
    for item in ARCHIVE_CONTENT:
        source = bundle_root / item
        if source.is_file():
            yield source, item
        elif source.is_dir():
            for path in sorted(source.rglob("*")):
                rel = path.relative_to(bundle_root)
                if (
                    path.is_file()
                    and not any(part in SKIP_NAMES or part.startswith(".") for part in rel.parts)
                    and path.suffix not in SKIP_SUFFIXES
                ):
                    yield path, rel.as_posix()
        elif item in ("configs", "LICENSE"):
            raise ReleaseError(f"{source} not found: a bundle needs configs/ and LICENSE (pass --bundle_root DIR)")


def write_archive(
    path: Path, bundle_root: Path, name: str, large_files: str, extra: Sequence[tuple[bytes, str]] = ()
) -> list[str]:
    """Write the bundle archive: every file under the top-level folder ``name/``.

    Args:
        path: the zip file to write.
        bundle_root: the bundle root to take the files from.
        name: the top-level folder.
        large_files: text of the archive's ``large_files.yml``.
        extra: more ``(bytes, path)`` members (the cohort card).

    Returns:
        the archive's member names.
    """
    members = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        entries = [(source.read_bytes(), rel) for source, rel in _archive_files(bundle_root)]
        entries.append((large_files.encode(), "large_files.yml"))
        entries += list(extra)
        for data, rel in sorted(entries, key=lambda e: e[1]):
            info = zipfile.ZipInfo(f"{name}/{rel}", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
            members.append(info.filename)
    return members


def cohort_card(
    model: Path | None, autoencoder: Path, report: Path | None, attributes_model: Any, version: str
) -> list[tuple[bytes, str]]:
    """The archive's cohort card (scripts/attribute_model/card.py), and the attribute model when given."""
    from scripts.attribute_model.card import release_entries
    from scripts.errors import BundleError

    try:
        return release_entries(
            model=str(model) if model else None,
            autoencoder=str(autoencoder),
            report=str(report) if report else None,
            attributes_model=str(attributes_model) if attributes_model else None,
            bundle_version=version,
        )
    except BundleError as err:
        raise ReleaseError(f"--attributes_model: {err}") from None


def _stage_assets(assets: list[Asset], staging: Path, out_dir: Path, strip_training_state: bool) -> None:
    """Copy (or strip) every asset into the staging folder; refuse to replace another release's file."""
    for asset in assets:
        staged = staging / asset.file_name
        if strip_training_state and asset.file_name in STRIPPABLE:
            write_weights_only(asset.source, staged)
            asset.sha256, asset.size = sha256(staged), staged.stat().st_size
        else:
            shutil.copyfile(asset.source, staged)
            if sha256(staged) != asset.sha256:
                raise ReleaseError(f"{asset.source} changed while the release was built; run it again")
    for asset in assets:  # a published file of another release must not be replaced (that release names its hash)
        target = out_dir / asset.file_name
        if target.exists() and sha256(target) != asset.sha256:
            raise ReleaseError(
                f"--out: {target} exists with other content (published by another release?); its URL and hash "
                f"would change under that release. Use a new --out folder for each release"
            )


def release(
    out: str | os.PathLike,
    base_url: str,
    bundle_root: str | os.PathLike = ".",
    autoencoder: str | os.PathLike | None = None,
    diffusion: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    name: str | None = None,
    strip_training_state: bool = False,
    attributes_model: str | os.PathLike | None = None,
    *,
    allow_non_private: bool = False,
) -> dict[str, Any]:
    """Build the release in ``out`` (see the module docstring).

    Args:
        out: release folder (created if needed).
        base_url: URL of the folder the release files are uploaded to.
        bundle_root: the bundle to release.
        autoencoder: public pre-trained autoencoder (default ``models/autoencoder.pt``).
        diffusion: public pre-trained diffusion model (default ``models/diffusion.pt``).
        model: DP fine-tuned model to publish as ``models/model.pt`` (default: none).
        report: its privacy report (default: ``privacy_report.json`` beside ``model``).
        name: bundle name (default: from ``configs/metadata.json``).
        strip_training_state: publish ``diffusion.pt`` without its resume-only state (optimizer, LR
            scheduler, RNG, trainer): about half the size. ``model.pt`` and ``autoencoder.pt`` are always
            published byte for byte (the privacy report names their SHA-256).
        attributes_model: the DP attribute model (``models/attributes_dp.json``), put into the archive; the
            archive's ``models/cohort_card.{json,md}`` states the composed total of everything released.
        allow_non_private: publish a ``model`` whose report has no finite epsilon (trained on the
            private data without noise); refused otherwise. ``large_files.yml`` then says so.

    Returns:
        a summary: name, version, archive, and every written file with its size and SHA-256.

    Raises:
        ReleaseError: bad input; nothing is written then.
    """
    root = Path(bundle_root)
    meta = read_metadata(root)
    name, version = bundle_name(meta, name), meta["version"]
    url = check_base_url(base_url)
    models = root / "models"
    ae_path = Path(autoencoder) if autoencoder else models / "autoencoder.pt"
    ldm_path = Path(diffusion) if diffusion else models / "diffusion.pt"
    model_path = Path(model) if model else None
    report_path = Path(report) if report else (model_path.parent / "privacy_report.json" if model_path else None)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReleaseError(f"--out: {out_dir} exists and is not a folder; expected the folder to write the release to")
    archive_name = f"{name}_v{version}.zip"
    if (out_dir / archive_name).exists():
        raise ReleaseError(
            f"--out: {out_dir / archive_name} exists: version {version} is already released in {out_dir}; bump "
            f"'version' (with a 'changelog' entry) in configs/metadata.json or choose another --out"
        )
    assets = check_weights(ae_path, ldm_path, model_path, report_path, allow_non_private=allow_non_private)
    non_private = allow_non_private and model_path is not None and _report_epsilon(report_path) is None
    card = cohort_card(model_path, ae_path, report_path, attributes_model, version)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".release_tmp_*"):  # a killed release's staging folder: nothing in it is published
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".release_tmp_", dir=out_dir))
    moved: list[Path] = []
    try:
        _stage_assets(assets, staging, out_dir, strip_training_state)
        members = write_archive(staging / archive_name, root, name, large_files_yaml(assets, url, non_private), card)
        # the archive's own hash (monai.bundle download checks none): `sha256sum -c <archive>.sha256`
        (staging / f"{archive_name}.sha256").write_text(f"{sha256(staging / archive_name)}  {archive_name}\n")
        # rename into place: the published files first, the archive (which names them) and its hash last
        for file_name in [a.file_name for a in assets] + [archive_name, f"{archive_name}.sha256"]:
            target = out_dir / file_name
            if target.exists() and file_name not in (archive_name, f"{archive_name}.sha256"):
                continue  # the identical file, already published
            os.replace(staging / file_name, target)
            moved.append(target)
    except BaseException:
        for target in moved:
            target.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    files = [out_dir / archive_name] + [out_dir / a.file_name for a in assets] + [out_dir / f"{archive_name}.sha256"]
    return {
        "name": name,
        "version": version,
        "archive": str(out_dir / archive_name),
        "archive_members": members,
        "files": [{"file": str(f), "bytes": f.stat().st_size, "sha256": sha256(f)} for f in files],
        "total_bytes": sum(f.stat().st_size for f in files),
        "download": (
            f"python -m monai.bundle download --name {name} --version {version} --url {url}/{archive_name} "
            f"--bundle_dir D && python -m monai.bundle download_large_files --bundle_path D/{name}"
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module docstring); prints a JSON summary. Exit status 1 on bad input.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        the exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m scripts.release", description="Build the bundle archive and its published weights in --out."
    )
    parser.add_argument("--out", required=True, help="release folder (created if needed)")
    parser.add_argument("--base_url", required=True, help="URL of the folder the release files are uploaded to")
    parser.add_argument("--bundle_root", default=".", help="bundle to release (default: .)")
    parser.add_argument(
        "--autoencoder", default=None, help="public pre-trained autoencoder (default: models/autoencoder.pt)"
    )
    parser.add_argument(
        "--diffusion", default=None, help="public pre-trained diffusion model (default: models/diffusion.pt)"
    )
    parser.add_argument(
        "--model", default=None, help="DP fine-tuned model to publish as models/model.pt (default: none)"
    )
    parser.add_argument(
        "--report", default=None, help="its privacy report (default: privacy_report.json beside --model)"
    )
    parser.add_argument("--name", default=None, help="bundle name (default: configs/metadata.json 'bundle_name')")
    parser.add_argument(
        "--strip_training_state",
        action="store_true",
        help="publish diffusion.pt without its optimizer/RNG/trainer state (about half the size)",
    )
    parser.add_argument(
        "--allow_non_private",
        action="store_true",
        help="publish a --model trained on the private data WITHOUT noise (no DP guarantee; refused otherwise)",
    )
    parser.add_argument(
        "--attributes_model",
        default=None,
        help="DP attribute model to put into the archive (models/attributes_dp.json)",
    )
    args = parser.parse_args(argv)
    try:
        summary = release(
            args.out,
            args.base_url,
            args.bundle_root,
            args.autoencoder,
            args.diffusion,
            args.model,
            args.report,
            args.name,
            args.strip_training_state,
            args.attributes_model,
            allow_non_private=args.allow_non_private,
        )
    except ReleaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = {k: v for k, v in summary.items() if k != "archive_members"}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
