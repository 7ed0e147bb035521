"""Synthesis: attribute-conditioned volumes from the DP fine-tuned model (``configs/inference.yaml``).

    python -m monai.bundle run inference --config_file "['configs/common.yaml','configs/inference.yaml']" \
        --attributes_csv FILE --output_dir DIR
    python -m monai.bundle run sweep --config_file "['configs/common.yaml','configs/inference.yaml']" --attribute LVEDV

The request CSV has one row per request: any subset of the 14 attribute columns (blank cell =
missing, masked as in training) plus optional ``count`` (samples for the row, default 1) and
``seed`` (seed of the row's first sample; its k-th sample uses ``seed + k``). Rows without a
seed take ``--seed + n`` where n is the sample's position in the run. Every sample has its own
random streams (:func:`scripts.sampling.sample_latents` with ``seeds``), so a seed always
gives the same volume whatever the batch it is generated in.

Out-of-range policy: a value outside its reference range (``configs/common.yaml``) is an
error; ``--clip_out_of_range True`` clips it to the range with a warning and records the
requested value. SEX and ESED must be 0 or 1.

Outputs (all written to a temp file and renamed): one NIfTI per sample (float32, [0, 1],
array layout (X, Y, slices) like the input cohorts, affine with the configured spacing), a
JSON sidecar per sample (attributes, sampler, seed, model and privacy provenance), a run
manifest ``manifest.csv`` and a ``preview.png`` montage of the first samples.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.networks.schedulers import DDPMScheduler, Scheduler
from scripts.attributes import ATTRIBUTE_NAMES, BINARY_ATTRIBUTES
from scripts.data import EncodeAttributesd, check_attribute, parse_value
from scripts.errors import ConfigError, DataError, MissingInputError, OutputExistsError, check_options
from scripts.files import refuse_duplicate_columns, remove_stale_temp, write_nifti, write_text_atomic
from scripts.sampling import EvaluationCounter, decode_latents, sample_latents
from torch import nn

logger = logging.getLogger(__name__)

REQUEST_COLUMNS = ("count", "seed")
CLIP_HINT = "pass --clip_out_of_range True to clip it"
MANIFEST = "manifest.csv"
PREVIEW = "preview.png"
CARD_FILES = ("cohort_card.json", "cohort_card.md")  # scripts/attribute_model/card.py writes them after a run
SAMPLE_PATTERN = re.compile(r"^row\d+_sample\d+\.(nii\.gz|json)$")
MAX_SEED = 2**63 - 1
DP_STAGE = "python -m monai.bundle run training --config_file \"['configs/common.yaml','configs/dp_finetune.yaml']\""
AUTOENCODER_STAGE = (
    "python -m monai.bundle run training --config_file \"['configs/common.yaml','configs/train_autoencoder.yaml']\""
)
# a model and autoencoder that never saw private data (the public pre-training stages): no DP guarantee applies
PUBLIC_NOTE = (
    "public data only: the model and its autoencoder were trained on public data, no private data was used; "
    "no differential-privacy guarantee is needed or given"
)
ATTRIBUTES_NOTE = (
    "Conditioning attributes are the user's input. If they were copied from private records, releasing them "
    "(e.g. in this sidecar) is a separate release that the model's differential-privacy guarantee does not cover."
)


# --------------------------------------------------------------------------------------- requests


@dataclass
class Request:
    """One row of the request CSV.

    Attributes:
        row: 0-based data row (the header is not counted).
        line: line of the row in the file (the header is line 1).
        values: the 14 attributes in ``ATTRIBUTE_NAMES`` order used for conditioning
            (NaN = missing; clipped values already clipped).
        count: samples to generate for the row.
        seed: seed of the row's first sample, or None (derived from the run seed).
        clipped: ``{name: requested value}`` for values clipped to their reference range.
        source: where the attribute values came from (a CSV line, a DP attribute model's subject).
    """

    row: int
    line: int
    values: np.ndarray
    count: int = 1
    seed: int | None = None
    clipped: dict[str, float] = field(default_factory=dict)
    source: str | None = None

    def attributes(self) -> dict[str, float | None]:
        """``{name: value}`` in raw units, None for missing."""
        return {n: (None if math.isnan(v) else float(v)) for n, v in zip(ATTRIBUTE_NAMES, self.values)}


@dataclass
class SampleSpec:
    """One sample to generate: its request, its index within the row, and its seed."""

    request: Request
    index: int
    seed: int

    @property
    def stem(self) -> str:
        """File name stem: ``row<row>_sample<index>``."""
        return f"row{self.request.row:04d}_sample{self.index:03d}"


def _policy(clip_out_of_range: bool) -> str:
    """The out-of-range policy of :func:`scripts.data.check_attribute` for synthesis requests."""
    return "clip" if clip_out_of_range else "error"


def _parse_int(raw: str | None, where: str, column: str, minimum: int, maximum: int) -> int | None:
    text = (raw or "").strip()
    if text == "":
        return None
    if not re.fullmatch(r"[+]?\d+", text) or not minimum <= int(text) <= maximum:
        raise DataError(
            f"{where}, column '{column}': expected an integer in [{minimum}, {maximum}] or blank, got {raw!r}"
        )
    return int(text)


def read_requests(
    path: str | None, ranges: Mapping[str, Sequence[float]], clip_out_of_range: bool = False
) -> list[Request]:
    """Read and validate a request CSV (see the module docstring for the format).

    Args:
        path: CSV file.
        ranges: attribute reference ranges (``configs/common.yaml``).
        clip_out_of_range: clip values outside their range instead of raising.

    Returns:
        the requests, in file order.

    Raises:
        DataError: naming the file, row/line, column and expected form.
    """
    expected = f"columns: any of {list(ATTRIBUTE_NAMES)}, optionally {list(REQUEST_COLUMNS)}; blank cell = missing"
    if path is None or str(path).strip() in ("", "None"):
        raise DataError(f"no attribute CSV given: pass --attributes_csv FILE ({expected})")
    if not os.path.isfile(path):
        raise DataError(f"{path}: attribute CSV not found ({expected})")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if not any(header):
            raise DataError(f"{path}: empty file or header ({expected})")
        unknown = [h for h in header if h not in ATTRIBUTE_NAMES and h not in REQUEST_COLUMNS]
        if unknown:
            raise DataError(f"{path}, header: unknown column(s) {unknown}; {expected}")
        refuse_duplicate_columns(path, header)
        requests = []
        for cells in reader:
            if not cells:  # blank line (a request with every attribute missing is a line of commas)
                continue
            row, line = len(requests), reader.line_num
            where = f"{path}, row {row} (line {line})"
            if len(cells) > len(header):
                raise DataError(f"{where}: {len(cells)} cells but the header has {len(header)} columns")
            cell = dict(zip(header, cells))
            values = np.full(len(ATTRIBUTE_NAMES), np.nan)
            clipped = {}
            for i, name in enumerate(ATTRIBUTE_NAMES):
                if name not in cell:
                    continue
                value = parse_value(cell[name], where, name)
                values[i], was_clipped = check_attribute(
                    value, name, where, ranges, _policy(clip_out_of_range), CLIP_HINT
                )
                if was_clipped:
                    clipped[name] = value
            count = _parse_int(cell.get("count"), where, "count", 1, 10**6)
            seed = _parse_int(cell.get("seed"), where, "seed", 0, MAX_SEED)
            requests.append(Request(row, line, values, 1 if count is None else count, seed, clipped))
    if not requests:
        raise DataError(f"{path}: no request rows after the header ({expected})")
    return requests


def plan_samples(requests: Sequence[Request], seed: int = 0) -> list[SampleSpec]:
    """Expand requests into samples with their seeds.

    Args:
        requests: parsed requests.
        seed: run seed; sample n of the run (0-based, file order) gets ``seed + n`` unless its
            row gives a seed, whose k-th sample then gets ``row seed + k``.

    Returns:
        one :class:`SampleSpec` per sample, in manifest order.
    """
    samples = []
    for req in requests:
        for k in range(req.count):
            s = req.seed + k if req.seed is not None else int(seed) + len(samples)
            samples.append(SampleSpec(req, k, s))
    return samples


# ------------------------------------------------------------------------------------------ models


def _large_files_hint(path: str, bundle_root: str) -> str:
    """`` or fetch it with ...`` when large_files.yml lists ``path``, else empty."""
    import yaml

    listing = os.path.join(bundle_root, "large_files.yml")
    if not os.path.isfile(listing):
        listing = "large_files.yml"
    if not os.path.isfile(listing):
        return ""
    with open(listing) as f:
        entries = (yaml.safe_load(f) or {}).get("large_files") or []
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(bundle_root))
    if any(os.path.normpath(str(e.get("path", ""))) == os.path.normpath(rel) for e in entries):
        return "; or fetch the published file with: python -m monai.bundle download_large_files"
    return ""


def load_model(
    model_path: str, device: str | torch.device = "cpu", weights: str = "ema", bundle_root: str = "."
) -> tuple[nn.Module, dict]:
    """Load the diffusion model to sample from (``models/model.pt`` by default).

    Args:
        model_path: checkpoint of the DP fine-tuning stage (or any diffusion-stage checkpoint).
        device: device of the network.
        weights: ``"ema"`` (default) or ``"network"``.
        bundle_root: bundle root, to look the file up in ``large_files.yml``.

    Returns:
        (network in eval mode without gradients, checkpoint dict without the weights).
    """
    from scripts.networks import load_diffusion

    if weights not in ("ema", "network"):
        raise ConfigError(f"config field 'weights': expected 'ema' or 'network', got {weights!r}")
    if not os.path.isfile(model_path):
        raise MissingInputError(
            f"model weights {model_path} not found; they are produced by the DP fine-tuning stage: {DP_STAGE}"
            f"{_large_files_hint(model_path, bundle_root)}"
        )
    network, ckpt = load_diffusion(model_path, device, weights)
    info = {k: v for k, v in ckpt.items() if k not in ("network", "ema", "optimizer", "lr_scheduler", "rng", "dp")}
    return network.eval().requires_grad_(False), info


def resolve_autoencoder_path(
    autoencoder_path: str | None, model_info: Mapping, model_path: str, bundle_root: str = "."
) -> str:
    """The autoencoder file: the override, else the path stored in the model checkpoint.

    The stored path is the one the training machine wrote. It is looked up, in this order:
    relative to ``bundle_root`` (a downloaded bundle, ``--bundle_root DIR``), as stored, and as
    ``bundle_root/models/<its file name>`` (an absolute path of another machine). The
    report's SHA-256 check at synthesis still says whether the decoder found is the one the
    privacy report covers.

    Returns:
        the path of an existing file.

    Raises:
        FileNotFoundError: naming the stage that produces the autoencoder.
    """
    if autoencoder_path:
        path = str(autoencoder_path)
        origin = "--autoencoder_path"
    else:
        stored = str(model_info.get("autoencoder") or "")
        origin = f"the autoencoder path stored in {model_path}"
        candidates = [stored] if os.path.isabs(stored) else [os.path.join(bundle_root, stored), stored]
        candidates.append(os.path.join(bundle_root, "models", os.path.basename(stored)))
        path = next((c for c in candidates if stored and os.path.isfile(c)), stored)
    if not path or not os.path.isfile(path):
        raise MissingInputError(
            f"autoencoder {path or '<none>'} ({origin}) not found; it is produced by: {AUTOENCODER_STAGE} "
            f"(a DP-fine-tuned one by configs/dp_finetune_autoencoder.yaml); or pass --autoencoder_path FILE"
        )
    return path


def load_matching_autoencoder(path: str, model_info: Mapping, device: str | torch.device = "cpu") -> nn.Module:
    """Load the autoencoder and check it is the one the diffusion model was trained with.

    Args:
        path: autoencoder checkpoint.
        model_info: the diffusion checkpoint's model information (scale factor, shapes).
        device: device of the network.

    Returns:
        the frozen autoencoder.
    """
    from scripts.networks import check_latent_shape, check_same_autoencoder, load_autoencoder

    autoencoder = load_autoencoder(path, device)
    check_same_autoencoder(model_info, autoencoder, path)
    check_latent_shape(model_info["spatial_size"], model_info["latent_shape"], autoencoder)
    return autoencoder


# --------------------------------------------------------------------------------------- provenance


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
    model_path: str,
    autoencoder_path: str,
    report_path: str,
    model_version: str | None,
    weights: str,
    synthesizer: Synthesizer,
    model_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What every sidecar records about how its image was made.

    ``model_info`` (the checkpoint's entries besides the weights) tells a public model (no privacy
    ledger, not fine-tuned from another model, decoded by a public autoencoder) from a DP one: its
    sidecars say ``privacy_note`` (:data:`PUBLIC_NOTE`) instead of a missing guarantee.

    Returns:
        sampler, steps, guidance scale, weights, model file + SHA-256, bundle version,
        autoencoder file + SHA-256, and the privacy block of :func:`privacy_info`.
    """
    from scripts.files import sha256

    model_sha = sha256(model_path)
    info = {
        "sampler": synthesizer.sampler,
        "steps": synthesizer.steps,
        "guidance_scale": synthesizer.guidance_scale,
        "weights": weights,
        "model": model_path,
        "model_sha256": model_sha,
        "model_version": model_version,
        "autoencoder": autoencoder_path,
        "autoencoder_sha256": sha256(autoencoder_path),
    }
    public = (
        model_info is not None
        and not model_info.get("privacy_ledger")
        and "pretrained" not in model_info
        and not getattr(synthesizer.autoencoder, "privacy_ledger", None)
    )
    if public:
        info.update({"privacy": None, "privacy_note": PUBLIC_NOTE})
    else:
        info.update(privacy_info(report_path, model_sha, info["autoencoder_sha256"]))
    info["attributes_note"] = ATTRIBUTES_NOTE
    return info


# --------------------------------------------------------------------------------------- sampling


def _guidance(scale: Any) -> float | None:
    if scale is None or (isinstance(scale, str) and scale.strip().lower() in ("", "none", "null", "off")):
        return None
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ConfigError(
            f"config field 'guidance_scale': expected a number >= 0 or null (off), got {scale!r}"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"config field 'guidance_scale': expected a number >= 0 or null (off), got {scale!r}")
    return None if value == 1.0 else value


class Synthesizer:
    """Attribute vectors + seeds -> volumes: condition encoding, latent sampling, decoding.

    Args:
        autoencoder: frozen :class:`~scripts.networks.SliceAutoencoder` (holds the scale factor).
        network: :class:`~scripts.networks.ConditionalDiffusionUNet`.
        scheduler: from :func:`scripts.sampling.build_scheduler`.
        latent_shape: (C, D, h, w) of one latent.
        attribute_ranges: reference ranges used to normalise attributes (as in training).
        guidance_scale: classifier-free guidance scale; None or 1 = off.
        device: device to sample on.
        verbose: MONAI's progress bar over the denoising steps of every batch.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        network: nn.Module,
        scheduler: Scheduler,
        latent_shape: Sequence[int],
        attribute_ranges: Mapping[str, Sequence[float]],
        guidance_scale: float | None = None,
        device: str | torch.device = "cpu",
        verbose: bool = False,
    ) -> None:
        self.autoencoder, self.network, self.scheduler = autoencoder, network.eval(), scheduler
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.encoder = EncodeAttributesd(keys="attributes", ranges=attribute_ranges)
        self.guidance_scale = _guidance(guidance_scale)
        self.device = torch.device(device)
        self.verbose = verbose
        self.evaluations = 0  # UNet evaluations so far (counted by a forward hook while sampling)
        if self.device.type == "cuda":  # same kernels for the same shapes
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True

    @property
    def sampler(self) -> str:
        """``"ddpm"`` or ``"ddim"``."""
        return "ddpm" if isinstance(self.scheduler, DDPMScheduler) else "ddim"

    @property
    def steps(self) -> int:
        """Denoising steps per sample."""
        return len(self.scheduler.timesteps)

    def condition(self, values: np.ndarray) -> torch.Tensor:
        """(B, 14) raw attributes (NaN = missing) -> (B, 14, 2) condition on the device."""
        from scripts.engines import make_condition

        scaled, missing = zip(*(self.encoder.encode(v) for v in np.asarray(values, dtype=np.float64)))
        return make_condition(torch.from_numpy(np.stack(scaled)), torch.from_numpy(np.stack(missing))).to(self.device)

    def latents(self, values: np.ndarray, seeds: Sequence[int]) -> torch.Tensor:
        """Sample (B, C, D, h, w) latents, one per attribute row and seed; adds to :attr:`evaluations`."""
        with EvaluationCounter(self.network) as counter:
            latents = sample_latents(
                self.network,
                self.scheduler,
                self.condition(values),
                self.latent_shape,
                self.guidance_scale,
                verbose=self.verbose,
                seeds=list(seeds),
            )
        self.evaluations += counter.count
        return latents

    @torch.no_grad()
    def __call__(self, values: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        """Generate volumes.

        Args:
            values: (B, 14) raw attributes (NaN = missing).
            seeds: one seed per row.

        Returns:
            (B, D, H, W) float32 volumes clipped to [0, 1] (network layout: slices first).
        """
        volumes = decode_latents(self.autoencoder, self.latents(values, seeds))
        return volumes[:, 0].clamp(0.0, 1.0).float().cpu().numpy()


# ----------------------------------------------------------------------------------------- writing


def nifti_affine(shape_xyz: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """A 4x4 affine with voxel size ``spacing`` (mm) and the volume centred on the origin."""
    if len(spacing) != 3 or not all(float(s) > 0 for s in spacing):
        raise ConfigError(
            f"config field 'spacing': expected 3 positive voxel sizes in mm (X, Y, slice), got {spacing!r}"
        )
    affine = np.diag([*(float(s) for s in spacing), 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * float(s) for n, s in zip(shape_xyz, spacing)]
    return affine


def save_nifti(volume: np.ndarray, path: str, spacing: Sequence[float]) -> np.ndarray:
    """Save a (D, H, W) = (slices, X, Y) volume as a float32 NIfTI with array layout (X, Y, slices).

    Written with :func:`scripts.files.write_nifti`, the bundle's one NIfTI writer (atomic,
    byte-reproducible, qform/sform code 1, units mm).

    Args:
        volume: network-layout volume.
        path: ``.nii.gz`` path.
        spacing: (X, Y, slice) voxel size in mm.

    Returns:
        the affine written.
    """
    data = np.ascontiguousarray(np.transpose(np.asarray(volume, dtype=np.float32), (1, 2, 0)))
    affine = nifti_affine(data.shape, spacing)
    write_nifti(path, data, affine, "synthetic (cardiac DP-LDM bundle)")
    return affine


def previous_run_files(output_dir: str) -> list[str]:
    """Files of an earlier synthesis run in ``output_dir`` (manifest, preview, samples, sidecars)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if n in (MANIFEST, PREVIEW, *CARD_FILES) or SAMPLE_PATTERN.match(n))


def check_output_dir(output_dir: str, overwrite: bool = False) -> list[str]:
    """Refuse an ``output_dir`` that holds a run (unless ``overwrite``) or is not a directory.

    Returns:
        the files of the earlier run (to be replaced when ``overwrite``).
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"--output_dir {output_dir} exists and is not a directory; expected a folder path")
    old = previous_run_files(output_dir)
    if old and not overwrite:
        raise OutputExistsError(
            f"--output_dir {output_dir} already holds a synthesis run ({len(old)} files, e.g. {old[0]}); "
            "choose another --output_dir or pass --overwrite True to replace that run"
        )
    return old


def prepare_output_dir(output_dir: str, overwrite: bool = False) -> str:
    """Create ``output_dir`` after :func:`check_output_dir`; with ``overwrite`` remove the earlier run's files.

    Only the files a run writes are removed (and the temp files an interrupted run left,
    ``.<name>.<random>.part``); anything else in the folder is left alone.

    Returns:
        the output directory.
    """
    for name in check_output_dir(output_dir, overwrite):
        os.remove(os.path.join(output_dir, name))
    for stale in remove_stale_temp(output_dir):
        logger.info(f"removed {stale}, the temp file of an interrupted write")
    os.makedirs(output_dir, exist_ok=True)
    return output_dir


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:g}"


def write_manifest(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """Write the run manifest atomically: one row per sample."""
    columns = ["file", "sidecar", "row", "sample", "seed", *ATTRIBUTE_NAMES, "clipped", "source"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or int(size) < 1:
        raise ConfigError(f"option --batch_size: expected an integer >= 1, got {size!r}")
    return [items[i : i + int(size)] for i in range(0, len(items), int(size))]


def run_inference(
    requests: Sequence[Request],
    synthesizer: Synthesizer,
    output_dir: str,
    provenance: Mapping[str, Any],
    spacing: Sequence[float] = (1.8, 1.8, 10.0),
    batch_size: int = 4,
    seed: int = 0,
    preview_count: int = 4,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate every requested sample and write images, sidecars, the manifest and the preview.

    Args:
        requests: from :func:`read_requests`.
        synthesizer: the sampler.
        output_dir: output folder (see :func:`prepare_output_dir`).
        provenance: from :func:`make_provenance` (copied into every sidecar).
        spacing: (X, Y, slice) voxel size in mm of the written NIfTI files.
        batch_size: samples generated together.
        seed: run seed (samples of rows without a ``seed``).
        preview_count: samples shown in ``preview.png`` (0 = no preview).
        progress: tqdm progress bar over the samples.
        overwrite: replace a run already in ``output_dir``.

    Returns:
        a summary: output_dir, samples, manifest, preview, unet_evaluations_per_volume.
    """
    from scripts.visualize import save_montage
    from tqdm import tqdm

    check_options(seed=seed, batch_size=batch_size, preview_count=preview_count)
    samples = plan_samples(requests, seed)
    nifti_affine((1, 1, 1), spacing)  # validate before sampling
    prepare_output_dir(output_dir, overwrite)
    logger.info(
        f"{len(samples)} sample(s) from {len(requests)} request(s): {synthesizer.sampler} {synthesizer.steps} steps, "
        f"guidance {synthesizer.guidance_scale or 'off'}, batch {batch_size}, device {synthesizer.device}"
    )
    if provenance.get("privacy_warning"):
        logger.warning(provenance["privacy_warning"])
    elif provenance.get("privacy_note"):
        logger.info(provenance["privacy_note"])
    manifest, preview = [], []
    evaluations = 0
    bar = tqdm(total=len(samples), unit="volume", desc="synthesis", disable=not progress)
    for batch in _batches(samples, batch_size):
        before = synthesizer.evaluations
        volumes = synthesizer(np.stack([s.request.values for s in batch]), [s.seed for s in batch])
        per_volume = (synthesizer.evaluations - before) / len(batch)
        evaluations += synthesizer.evaluations - before
        for spec, volume in zip(batch, volumes):
            image, sidecar = f"{spec.stem}.nii.gz", f"{spec.stem}.json"
            affine = save_nifti(volume, os.path.join(output_dir, image), spacing)
            attrs = spec.request.attributes()
            meta = {
                "image": image,
                "row": spec.request.row,
                "sample": spec.index,
                "seed": spec.seed,
                "attributes": attrs,
                "missing": [n for n, v in attrs.items() if v is None],
                "clipped": dict(spec.request.clipped),
                "attributes_source": spec.request.source,
                "shape": list(np.transpose(volume, (1, 2, 0)).shape),
                "layout": "array axes (X, Y, slices); the networks see (slices, X, Y)",
                "spacing_mm": [float(s) for s in spacing],
                "affine": np.round(affine, 6).tolist(),
                "intensity_range": [0.0, 1.0],
                "unet_evaluations": int(per_volume) if float(per_volume).is_integer() else per_volume,
                **provenance,
                "synthetic": True,
            }
            write_text_atomic(os.path.join(output_dir, sidecar), json.dumps(meta, indent=2))
            row = {"file": image, "sidecar": sidecar, "row": spec.request.row, "sample": spec.index, "seed": spec.seed}
            row.update({n: _fmt(v) for n, v in zip(ATTRIBUTE_NAMES, spec.request.values)})
            row["clipped"] = ";".join(f"{n}={v:g}" for n, v in spec.request.clipped.items())
            row["source"] = spec.request.source or ""
            manifest.append(row)
            if len(preview) < preview_count:
                preview.append((f"row {spec.request.row} #{spec.index} seed {spec.seed}", volume))
        bar.update(len(batch))
    bar.close()
    manifest_path = os.path.join(output_dir, MANIFEST)
    write_manifest(manifest_path, manifest)
    preview_path = save_montage(preview, os.path.join(output_dir, PREVIEW)) if preview else None
    summary = {
        "output_dir": output_dir,
        "samples": len(samples),
        "manifest": manifest_path,
        "preview": preview_path,
        "unet_evaluations_per_volume": evaluations / max(len(samples), 1),
    }
    logger.info(f"wrote {len(samples)} volume(s), {manifest_path} and {preview_path}")
    return summary


# ------------------------------------------------------------------------------------------- sweep


def sweep_values(
    attribute: str,
    values: Sequence[float] | None,
    count: int,
    ranges: Mapping[str, Sequence[float]],
    plausible: Mapping[str, Sequence[float]],
    clip_out_of_range: bool = False,
) -> list[float]:
    """The values of a sweep: the given ones (validated), else ``count`` evenly spaced ones.

    The default spacing covers the attribute's reference range clipped to its plausible
    sub-range (``sweep_ranges``); SEX and ESED sweep [0, 1].

    Returns:
        the values, in raw units.
    """
    if attribute not in ATTRIBUTE_NAMES:
        raise DataError(f"--attribute: unknown attribute {attribute!r}; expected one of {list(ATTRIBUTE_NAMES)}")
    where = "--values"
    if values is not None:
        if isinstance(values, (int, float, str)) or not len(values):
            raise DataError(f'{where}: expected a non-empty list of numbers, e.g. "[100,150,200]", got {values!r}')
        return [
            check_attribute(
                parse_value(v, where, attribute), attribute, where, ranges, _policy(clip_out_of_range), CLIP_HINT
            )[0]
            for v in values
        ]
    if attribute in BINARY_ATTRIBUTES:
        return [0.0, 1.0]
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or int(count) < 1:
        raise ConfigError(f"option --sweep_count: expected an integer >= 1, got {count!r}")
    low, high = (float(r) for r in ranges[attribute])
    if attribute in plausible:
        low, high = max(low, float(plausible[attribute][0])), min(high, float(plausible[attribute][1]))
    return [float(v) for v in np.linspace(low, high, int(count))] if int(count) > 1 else [(low + high) / 2]


def sweep_base(
    defaults: Mapping[str, float],
    base_csv: str | None,
    ranges: Mapping[str, Sequence[float]],
    clip_out_of_range: bool = False,
) -> tuple[np.ndarray, int | None]:
    """The fixed attributes of a sweep: ``defaults``, or the single row of ``base_csv``.

    A base CSV replaces the defaults entirely (absent or blank columns are missing); its
    ``seed`` column, if set, is the sweep's seed.

    Returns:
        (14 raw attributes, NaN = missing; the CSV row's seed or None).
    """
    if base_csv:
        requests = read_requests(base_csv, ranges, clip_out_of_range)
        if len(requests) != 1 or requests[0].count != 1:
            raise DataError(f"{base_csv}: expected exactly one row with count 1 (the fixed attributes of the sweep)")
        return requests[0].values, requests[0].seed
    from scripts.data import check_attribute_names

    check_attribute_names(list(defaults), "config field 'sweep_defaults'")
    values = np.full(len(ATTRIBUTE_NAMES), np.nan)
    for i, name in enumerate(ATTRIBUTE_NAMES):
        if defaults.get(name) is not None:
            where = "config field 'sweep_defaults'"
            values[i] = check_attribute(parse_value(defaults[name], where, name), name, where, ranges)[0]
    return values, None


def check_sweep_output(output_dir: str, attribute: str, overwrite: bool = False) -> str:
    """Refuse to replace an existing ``sweep_<attribute>.png`` unless ``overwrite``; returns its path."""
    png = os.path.join(output_dir, f"sweep_{attribute}.png")
    if os.path.exists(png) and not overwrite:
        raise OutputExistsError(f"{png} already exists; choose another --output_dir or pass --overwrite True")
    return png


def run_sweep(
    attribute: str,
    synthesizer: Synthesizer,
    output_dir: str,
    provenance: Mapping[str, Any],
    defaults: Mapping[str, float],
    ranges: Mapping[str, Sequence[float]],
    plausible: Mapping[str, Sequence[float]],
    values: Sequence[float] | None = None,
    base_csv: str | None = None,
    count: int = 5,
    phases: Sequence[int] | None = (1, 0),
    seed: int = 0,
    batch_size: int = 4,
    clip_out_of_range: bool = False,
    overwrite: bool = False,
) -> str:
    """Vary one attribute with the others fixed, same seed for every value; save a PNG grid.

    Rows are the phases in ``phases`` (ESED = 1 ED, 0 ES) unless the swept attribute is
    ESED or ``phases`` is empty (then one row with the base ESED). Writes
    ``sweep_<ATTRIBUTE>.png`` and ``sweep_<ATTRIBUTE>.json`` (values, base attributes, seed,
    provenance) to ``output_dir``.

    Returns:
        the PNG path.
    """
    from scripts.visualize import save_sweep_grid
    from tqdm import tqdm

    check_options(seed=seed, batch_size=batch_size)
    sweep = sweep_values(attribute, values, count, ranges, plausible, clip_out_of_range)
    base, base_seed = sweep_base(defaults, base_csv, ranges, clip_out_of_range)
    seed = int(seed if base_seed is None else base_seed)
    png = check_sweep_output(output_dir, attribute, overwrite)
    sidecar = os.path.join(output_dir, f"sweep_{attribute}.json")
    remove_stale_temp(output_dir, [os.path.basename(png), os.path.basename(sidecar)])
    os.makedirs(output_dir, exist_ok=True)
    phase_index = ATTRIBUTE_NAMES.index("ESED")
    if attribute == "ESED" or not phases:
        rows = [(None, "ESED " + ("missing" if math.isnan(base[phase_index]) else f"{base[phase_index]:g}"))]
    else:
        rows = [(float(p), {1.0: "ED", 0.0: "ES"}.get(float(p), f"ESED {p}")) for p in phases]
    conditions = []
    for phase, _ in rows:
        for v in sweep:
            vec = base.copy()
            if phase is not None:
                vec[phase_index] = phase
            vec[ATTRIBUTE_NAMES.index(attribute)] = v
            conditions.append(vec)
    volumes = []
    for batch in tqdm(_batches(conditions, batch_size), desc=f"sweep {attribute}", unit="batch"):
        volumes.append(synthesizer(np.stack(batch), [seed] * len(batch)))
    grid = np.concatenate(volumes).reshape(len(rows), len(sweep), *volumes[0].shape[1:])
    title = (
        f"{attribute} sweep, seed {seed}, {synthesizer.sampler} {synthesizer.steps} steps, "
        f"guidance {synthesizer.guidance_scale or 'off'}"
    )
    save_sweep_grid(grid, sweep, [label for _, label in rows], attribute, png, title)
    meta = {
        "attribute": attribute,
        "values": sweep,
        "rows": [label for _, label in rows],
        "base_attributes": {n: (None if math.isnan(v) else float(v)) for n, v in zip(ATTRIBUTE_NAMES, base)},
        "base_csv": base_csv,
        "seed": seed,
        "slice": int(grid.shape[2] // 2),
        "image": os.path.basename(png),
        **provenance,
        "synthetic": True,
    }
    write_text_atomic(sidecar, json.dumps(meta, indent=2))
    logger.info(f"wrote {png}")
    return png
