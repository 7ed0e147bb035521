"""Data pipeline shared by every stage: datalist + attribute table -> MONAI dataset items.

An item is a dict with ``image`` (1 x D x H x W, per-image scaled to [0, 1]), ``attributes``
(the 14 attributes of :data:`scripts.attributes.ATTRIBUTE_NAMES`, normalised with fixed
reference ranges from the config, missing values set to 0), ``missing`` (1.0 where the
attribute is missing, as in the paper's missing-mask), ``id`` and ``subject``.

Privacy note: nothing here computes a statistic across records. Intensity scaling is per
image (it touches one record) and attribute normalisation uses the fixed ranges written in
the bundle config, never ranges estimated from the (possibly private) training set.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset, Dataset
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Transposed,
)
from monai.utils import look_up_option
from scripts.attributes import ATTRIBUTE_LIMITS, ATTRIBUTE_NAMES, ATTRIBUTE_UNITS, BINARY_ATTRIBUTES
from scripts.errors import ConfigError, DataError
from scripts.files import refuse_duplicate_columns

__all__ = [
    "CSV_META_COLUMNS",
    "CheckVolumed",
    "DataError",
    "EncodeAttributesd",
    "LoadVolumed",
    "check_attribute",
    "check_attribute_names",
    "get_dataset",
    "get_transforms",
    "load_datalist",
    "parse_value",
    "read_attributes_csv",
]

logger = logging.getLogger(__name__)

# Columns of an attribute table that are not attributes; anything else is a typo or an
# attribute this bundle does not know, and is rejected rather than silently ignored.
CSV_META_COLUMNS = ("id", "subject", "phase", "image", "label")


MISSING_TEXTS = ("", "nan", "na", "n/a")


def parse_value(raw: Any, where: str, name: str) -> float:
    """Parse one attribute value; a missing value is returned as NaN.

    Missing is written as an empty CSV cell, JSON ``null`` or an absent key; the texts ``nan``,
    ``NA`` and ``N/A`` (any case) and a float NaN are read as missing too.

    Args:
        raw: the cell or JSON value.
        where: file (and row or entry) for the error message.
        name: the attribute's name.

    Returns:
        the value as a float, NaN when missing.

    Raises:
        DataError: for a value that is not a number (or infinite).
    """
    if raw is None:
        return math.nan
    if isinstance(raw, bool):
        raise DataError(f"{where}: attribute '{name}' must be a number or blank (missing), got {raw!r}")
    if isinstance(raw, (int, float)):
        value = float(raw)
    else:
        text = str(raw).strip()
        if text.lower() in MISSING_TEXTS:
            return math.nan
        try:
            value = float(text)
        except ValueError:
            raise DataError(f"{where}: attribute '{name}' must be a number or blank (missing), got {raw!r}") from None
    if math.isinf(value):
        raise DataError(f"{where}: attribute '{name}' must be finite, got {raw!r}")
    return value


OUT_OF_RANGE_POLICIES = ("error", "clip", "accept")


def check_attribute(
    value: float,
    name: str,
    where: str,
    ranges: Mapping[str, Sequence[float]],
    out_of_range: str = "error",
    hint: str = "",
) -> tuple[float, bool]:
    """The one attribute check of training data and synthesis requests.

    Two tiers:

    1. always: the value is missing (NaN) or possible: SEX and ESED are 0 or 1, the others lie
       within :data:`scripts.attributes.ATTRIBUTE_LIMITS` (no negative volume, EF in [0, 100],
       ...). An impossible value is an error in training and in synthesis alike.
    2. the reference range ``ranges`` (``configs/common.yaml``), by ``out_of_range``:
       ``"error"`` (synthesis default: a request outside it asks the model to extrapolate),
       ``"clip"`` (synthesis's ``--clip_out_of_range True``: clipped, with a warning) or
       ``"accept"`` (training: a real record outside the range is kept and maps beyond +-1;
       nothing is logged, as the record may be private).

    Args:
        value: raw value (NaN = missing, always accepted).
        name: attribute name.
        where: file / row description for messages.
        ranges: reference ranges ``{name: (low, high)}``.
        out_of_range: ``"error"``, ``"clip"`` or ``"accept"``.
        hint: another way out, appended to the out-of-range message (e.g. the clip option).

    Returns:
        (value to use, whether it was clipped).

    Raises:
        DataError: naming ``where``, the column, the value and the expected form.
    """
    out_of_range = look_up_option(out_of_range, OUT_OF_RANGE_POLICIES)
    if math.isnan(value):
        return value, False
    unit = ATTRIBUTE_UNITS[name]
    if name in BINARY_ATTRIBUTES and value not in (0.0, 1.0):
        raise DataError(f"{where}, column '{name}': expected 0 or 1 ({unit}) or blank (missing), got {value:g}")
    limit_low, limit_high = ATTRIBUTE_LIMITS[name]
    if not limit_low <= value <= limit_high:
        raise DataError(
            f"{where}, column '{name}': {value:g} is not a possible value; expected a number in "
            f"[{limit_low:g}, {limit_high:g}] ({unit}) or blank (missing)"
        )
    low, high = (float(r) for r in ranges[name])
    if low <= value <= high or out_of_range == "accept":
        return value, False
    if out_of_range == "error":
        raise DataError(
            f"{where}, column '{name}': {value:g} is outside the reference range [{low:g}, {high:g}] ({unit}) of "
            f"configs/common.yaml (attribute_ranges); give a value in the range, leave it blank (missing)"
            + (f", or {hint}" if hint else "")
        )
    used = min(max(value, low), high)
    logger.warning(f"{where}, column '{name}': {value:g} is outside [{low:g}, {high:g}] ({unit}); clipped to {used:g}")
    return used, True


def _checked(values: np.ndarray, where: str, ranges: Mapping[str, Sequence[float]] | None) -> np.ndarray:
    """``values`` after the training check (:func:`check_attribute`, ``"accept"``), when ``ranges`` are given."""
    if ranges is not None:
        for name, value in zip(ATTRIBUTE_NAMES, values):
            check_attribute(float(value), name, where, ranges, "accept")
    return values


def check_attribute_names(names: Sequence[str], where: str) -> None:
    """Raise :class:`DataError` if ``names`` contains an attribute this bundle does not know.

    Args:
        names: attribute names to check.
        where: file or config field, used in the error message.
    """
    unknown = [n for n in names if n not in ATTRIBUTE_NAMES]
    if unknown:
        raise DataError(f"{where}: unknown attribute(s) {unknown}; expected names from {list(ATTRIBUTE_NAMES)}")


def read_attributes_csv(path: str, ranges: Mapping[str, Sequence[float]] | None = None) -> dict[str, np.ndarray]:
    """Read an attribute table: one row per volume, keyed by ``id``.

    The table must have an ``id`` column and one column per attribute (blank cell = missing).
    Allowed extra columns are ``subject``, ``phase``, ``image`` and ``label``.

    Args:
        path: CSV file.
        ranges: reference ranges; when given every value is checked with :func:`check_attribute`.

    Returns:
        ``{id: float32 array of the 14 attributes in ATTRIBUTE_NAMES order, NaN = missing}``.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: attribute table not found (expected a CSV file with an 'id' column)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        refuse_duplicate_columns(path, header)
        if "id" not in header:
            raise DataError(f"{path}: missing column 'id' (header is {header})")
        missing = [n for n in ATTRIBUTE_NAMES if n not in header]
        if missing:
            raise DataError(f"{path}: missing attribute column(s) {missing}; expected all of {list(ATTRIBUTE_NAMES)}")
        unknown = [c for c in header if c not in ATTRIBUTE_NAMES and c not in CSV_META_COLUMNS]
        if unknown:
            raise DataError(
                f"{path}: unknown column(s) {unknown}; expected the attributes {list(ATTRIBUTE_NAMES)}"
                f" and optionally {list(CSV_META_COLUMNS)}"
            )
        table: dict[str, np.ndarray] = {}
        for line, row in enumerate(reader, start=2):
            rid = (row.get("id") or "").strip()
            if not rid:
                raise DataError(f"{path}, line {line}: empty 'id'")
            if rid in table:
                raise DataError(f"{path}, line {line}: duplicate id '{rid}'")
            where = f"{path}, line {line}"
            values = np.array([parse_value(row[n], where, n) for n in ATTRIBUTE_NAMES], dtype=np.float64)
            table[rid] = _checked(values, where, ranges).astype(np.float32)
    return table


def load_datalist(
    datalist: str,
    split: str = "training",
    attributes_csv: str | None = None,
    base_dir: str | None = None,
    ranges: Mapping[str, Sequence[float]] | None = None,
) -> list[dict[str, Any]]:
    """Load one split of a MONAI-style datalist and attach the attribute vector to each entry.

    Entries give ``image`` (path relative to ``base_dir``) and either inline ``attributes``
    (a mapping name -> value; absent names are missing) or an ``id`` joined with the
    attribute table (``attributes_csv`` argument, else the datalist's ``attributes_csv`` key).

    Args:
        datalist: path of the datalist JSON.
        split: key of the split to load ("training", "validation", "test").
        attributes_csv: attribute table; relative paths are resolved against ``base_dir``.
        base_dir: directory for relative paths; defaults to the datalist's directory.
        ranges: reference ranges; when given every attribute is checked with :func:`check_attribute`
            (the check synthesis applies to requests).

    Returns:
        list of dicts with ``image`` (absolute path), ``id``, ``subject`` ("" if the entry
        has none) and ``attributes`` (float32 array, NaN = missing).
    """
    content, entries = _read_split(datalist, split)
    base_dir = base_dir or os.path.dirname(os.path.abspath(datalist))
    csv_path = attributes_csv or content.get("attributes_csv")
    table = None
    if csv_path is not None:
        table = read_attributes_csv(csv_path if os.path.isabs(csv_path) else os.path.join(base_dir, csv_path), ranges)

    items = []
    for i, entry in enumerate(entries):
        where = f"{datalist}, {split}[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise DataError(f"{where}: field 'image' missing (expected a path string)")
        image = entry["image"] if os.path.isabs(entry["image"]) else os.path.join(base_dir, entry["image"])
        if not os.path.isfile(image):
            raise DataError(f"{where}: field 'image': file {image} does not exist")
        rid = str(entry.get("id", os.path.basename(image)))
        if "attributes" in entry:
            values = _inline_attributes(entry["attributes"], where, ranges)
        elif table is not None:
            if rid not in table:
                raise DataError(f"{where}: id '{rid}' not found in the attribute table {csv_path}")
            values = table[rid]
        else:
            raise DataError(
                f"{where}: no attributes (expected inline 'attributes' or an 'attributes_csv' joined by 'id')"
            )
        # "" when the datalist does not say: subject-level privacy then refuses to guess
        # (scripts.privacy.units.PrivacyUnits)
        items.append({"image": image, "id": rid, "subject": str(entry.get("subject", "")), "attributes": values})
    return items


def _read_split(datalist: str, split: str) -> tuple[dict[str, Any], list]:
    """The datalist's JSON content and its non-empty ``split`` list, or DataError."""
    if not os.path.isfile(datalist):
        raise DataError(
            f"{datalist}: datalist not found (expected a JSON file with a '{split}' list). The demo's cohorts are "
            "written by `python -m monai.bundle run --config_file \"['configs/common.yaml','configs/phantom.yaml']\"`; "
            "give your own with --dataset_dir DIR (a folder holding datalist.json) or --datalist FILE"
        )
    try:
        with open(datalist) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{datalist}: not valid JSON ({e})") from None
    if not isinstance(content, dict) or split not in content:
        raise DataError(f"{datalist}: missing key '{split}' (expected a list of entries with an 'image' path)")
    entries = content[split]
    if not isinstance(entries, list) or len(entries) == 0:
        raise DataError(f"{datalist}: field '{split}' is empty (expected a non-empty list of entries)")
    return content, entries


def _inline_attributes(inline: Any, where: str, ranges: Mapping[str, Sequence[float]] | None) -> np.ndarray:
    """An entry's inline ``attributes`` mapping as the float32 attribute vector (NaN = missing)."""
    if not isinstance(inline, Mapping):
        raise DataError(f"{where}: field 'attributes' must be a mapping name -> value")
    check_attribute_names(list(inline), f"{where}: field 'attributes'")
    values = np.array([parse_value(inline.get(n), where, n) for n in ATTRIBUTE_NAMES], dtype=np.float64)
    return _checked(values, f"{where}: field 'attributes'", ranges).astype(np.float32)


class LoadVolumed(MapTransform):
    """MONAI's ``LoadImaged`` (nibabel reader, channel first) whose errors name the file.

    A truncated or corrupt ``.nii.gz`` otherwise fails with a bare ``EOFError`` or a zlib /
    nibabel message that does not say which of the cohort's files is broken.

    Args:
        keys: keys of the image paths.
    """

    def __init__(self, keys: KeysCollection) -> None:
        super().__init__(keys)
        self.loader = LoadImaged(keys=keys, reader="NibabelReader", ensure_channel_first=True, image_only=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        try:
            return self.loader(data)
        except Exception as e:
            key = next(iter(self.key_iterator(dict(data))), None)
            name = data.get(key, "<unknown>") if key is not None else "<unknown>"
            raise DataError(
                f"{name}: field '{key}': cannot read the volume ({type(e).__name__}: {str(e).strip()[:200]}); "
                "expected a complete NIfTI-1 file (.nii or .nii.gz) holding a 3D volume"
            ) from e


# NIfTI-1 datatype codes of complex64, complex128 and complex256
_NIFTI_COMPLEX_CODES = (32, 1792, 2048)


class CheckVolumed(MapTransform):
    """Reject volumes that are not single-channel 3D, complex, constant or that hold NaN/inf voxels.

    Runs right after loading, so the error names the file instead of failing later in a
    network with an unrelated shape error.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = getattr(img, "meta", {}).get("filename_or_obj", "<in-memory>")
            if img.ndim != 4 or img.shape[0] != 1:
                # the loader moved a 4th axis (time, channels) to the front: report the file's own shape
                shape = (*img.shape[1:], img.shape[0]) if img.shape[0] != 1 else tuple(img.shape[1:])
                raise DataError(
                    f"{name}: field '{key}': expected a 3D volume (X, Y, slices), "
                    f"got {len(shape)}D data of shape {shape}"
                )
            # MONAI's loader casts to float32 and drops the imaginary part with only a NumPy warning
            if int(np.asarray(getattr(img, "meta", {}).get("datatype", 0))) in _NIFTI_COMPLEX_CODES:
                raise DataError(
                    f"{name}: field '{key}': complex-valued voxels (NIfTI datatype "
                    f"{int(np.asarray(img.meta['datatype']))}); expected a real magnitude image"
                )
            if not bool(torch.isfinite(torch.as_tensor(img)).all()):
                raise DataError(f"{name}: field '{key}': volume contains NaN or inf voxels")
            low, high = float(img.min()), float(img.max())
            if low == high:
                raise DataError(
                    f"{name}: field '{key}': every voxel is {low:g}; expected an image with content "
                    "(an empty or blank export?)"
                )
        return d


class EncodeAttributesd(MapTransform):
    """Normalise the attribute vector with fixed reference ranges and add the missing-mask.

    ``low`` maps to -1 and ``high`` to +1; missing (NaN) values become 0 and are flagged in
    ``missing`` (1.0 = missing), which the attribute encoder replaces by a learned embedding.

    Args:
        keys: key of the raw attribute vector (NaN = missing).
        ranges: ``{name: (low, high)}`` for every attribute, written in the bundle config.
        missing_key: output key of the mask.
    """

    def __init__(
        self, keys: KeysCollection, ranges: Mapping[str, Sequence[float]], missing_key: str = "missing"
    ) -> None:
        super().__init__(keys)
        check_attribute_names(list(ranges), "config field 'attribute_ranges'")
        absent = [n for n in ATTRIBUTE_NAMES if n not in ranges]
        if absent:
            raise ConfigError(f"config field 'attribute_ranges': no range for {absent} (expected [low, high] each)")
        bad = [n for n in ATTRIBUTE_NAMES if len(ranges[n]) != 2 or not float(ranges[n][1]) > float(ranges[n][0])]
        if bad:
            raise ConfigError(f"config field 'attribute_ranges': {bad} must be [low, high] with high > low")
        self.low = np.array([float(ranges[n][0]) for n in ATTRIBUTE_NAMES], dtype=np.float32)
        self.high = np.array([float(ranges[n][1]) for n in ATTRIBUTE_NAMES], dtype=np.float32)
        self.missing_key = missing_key

    def encode(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (normalised values with missing set to 0, missing-mask) for a raw vector."""
        values = np.asarray(values, dtype=np.float32)
        missing = np.isnan(values)
        scaled = 2.0 * (values - self.low) / (self.high - self.low) - 1.0
        return np.where(missing, 0.0, scaled).astype(np.float32), missing.astype(np.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key], d[self.missing_key] = (torch.from_numpy(a) for a in self.encode(d[key]))
        return d


def get_transforms(
    spatial_size: Sequence[int], attribute_ranges: Mapping[str, Sequence[float]], upper_percentile: float = 99.5
) -> Compose:
    """The loading pipeline: NIfTI -> checked, per-image scaled, (1, D, H, W) float tensor.

    Args:
        spatial_size: output (D, H, W); volumes are centre padded / cropped to it.
        attribute_ranges: fixed reference ranges for :class:`EncodeAttributesd`.
        upper_percentile: per-image intensity percentile mapped to 1 (values above clip).

    Returns:
        a MONAI ``Compose``.
    """
    return Compose(
        [
            LoadVolumed(keys="image"),
            CheckVolumed(keys="image"),
            # NIfTI stores (X, Y, slices); the networks see (slices, X, Y) = (D, H, W).
            Transposed(keys="image", indices=(0, 3, 1, 2)),
            ScaleIntensityRangePercentilesd(
                keys="image", lower=0.0, upper=upper_percentile, b_min=0.0, b_max=1.0, clip=True
            ),
            ResizeWithPadOrCropd(keys="image", spatial_size=tuple(spatial_size)),
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
            EncodeAttributesd(keys="attributes", ranges=attribute_ranges),
        ]
    )


def get_dataset(
    datalist: str,
    split: str,
    spatial_size: Sequence[int],
    attribute_ranges: Mapping[str, Sequence[float]],
    *,
    attributes_csv: str | None = None,
    cache: bool = True,
) -> Dataset:
    """Build the dataset of one split (cached in memory by default: volumes are small).

    Args:
        datalist: datalist JSON path.
        split: split key.
        spatial_size: output (D, H, W).
        attribute_ranges: fixed reference ranges from the config.
        attributes_csv: optional attribute table overriding the datalist's.
        cache: use MONAI's ``CacheDataset`` (deterministic transforms only, so caching is exact).

    Returns:
        a MONAI dataset.
    """
    items = load_datalist(datalist, split, attributes_csv, ranges=attribute_ranges)
    transform = get_transforms(spatial_size, attribute_ranges)
    if cache:
        return SerialCacheDataset(items, transform, cache_rate=1.0, progress=False)
    return Dataset(items, transform)


class SerialCacheDataset(CacheDataset):
    """MONAI's ``CacheDataset`` that fills its cache in the calling thread.

    ``CacheDataset`` fills the cache in a ``ThreadPool`` (at least one worker thread even with
    ``num_workers=0``). When a record fails (NaN voxels, a 4D file), the pool is torn down
    while its worker is still loading the next record in nibabel / PyTorch code; the
    interpreter then exits under that thread, and the process aborts ("terminate called
    without an active exception", SIGABRT, exit -6) after printing the right message. Filling
    in the calling thread costs nothing here (one worker did the same work, the caller waited)
    and a bad record ends the run with the error's own exit code.
    """

    def _fill_cache(self, indices: Sequence[int] | None = None) -> list:
        if self.cache_num <= 0:
            return []
        return [self._load_cache_item(i) for i in (range(self.cache_num) if indices is None else indices)]
