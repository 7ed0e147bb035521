"""Write a phantom cohort in a real dataset's layout (ACDC, M&Ms-1 4D cine, M&Ms-2, ukbb_cardiac).

So the importer (``scripts.prepare``) and the demo walk the path real data takes: the dataset's
file names, label codes and metadata files, optionally with another in-plane spacing, the heart
off-centre in a larger field of view, or the arrays stored flipped / transposed (the affine says
so, as a scanner's would). What each layout holds is in docs/data.md; what is the phantom's own:

- ACDC ``Info.cfg`` gets ``Height`` 175 cm (male) or 162 cm (female) and the ``Weight`` that
  gives the phantom's BMI; ACDC has no age or sex, so the phantom also writes
  ``demographics.csv`` (subject, age, sex, bmi) beside the patient folders, read only when
  ``--demographics`` names it;
- M&Ms cines have :attr:`LayoutOptions.frames` frames, ED at frame 1 and ES at frame 4
  (0-based); the other frames blend the ED and ES images and carry no labels, as in M&Ms.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scripts.cardiac import LABELS
from scripts.cohort import csv_bytes
from scripts.errors import ConfigError
from scripts.files import nifti_gz_bytes, write_bytes_atomic, write_text_atomic
from scripts.prepare import geometry
from scripts.prepare.layouts import LABEL_CODES

__all__ = ["LAYOUTS", "STORAGES", "LayoutOptions", "subject_name", "write_layout"]

LAYOUTS: tuple[str, ...] = ("bundle", "acdc", "mnms", "mnms2", "ukbb")
# nibabel orientations applied to the in-plane axes before writing (the affine follows)
STORAGES: dict[str, list[list[int]]] = {
    "native": [[0, 1], [1, 1], [2, 1]],
    "flip": [[0, -1], [1, 1], [2, 1]],
    "transpose": [[1, 1], [0, 1], [2, 1]],
    "flip_transpose": [[1, -1], [0, -1], [2, 1]],
}
_ED_FRAME, _ES_FRAME = 1, 4  # 0-based frames of the M&Ms cine (1-based in ACDC: ED 1, ES 5)


@dataclass(frozen=True)
class LayoutOptions:
    """How a phantom cohort is written.

    Args:
        layout: one of :data:`LAYOUTS` (``bundle``: the phantom's own layout).
        storage: in-plane storage order, a key of :data:`STORAGES`.
        spacing: in-plane spacing (mm) to resample to before writing; None keeps the phantom's.
        offset: voxels of extra field of view added before the first in-plane voxels (X, Y):
            the heart then lies off-centre.
        frames: frames of an M&Ms cine (>= 5).
    """

    layout: str = "bundle"
    storage: str = "native"
    spacing: float | None = None
    offset: tuple[int, int] = (0, 0)
    frames: int = 6

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}; got {self.layout!r}")
        if self.storage not in STORAGES:
            raise ConfigError(f"storage must be one of {', '.join(STORAGES)}; got {self.storage!r}")
        if self.spacing is not None and not float(self.spacing) > 0:
            raise ConfigError(f"spacing must be a number of mm > 0 or None; got {self.spacing!r}")
        if len(self.offset) != 2 or any(int(o) < 0 for o in self.offset):
            raise ConfigError(f"offset must be two integers >= 0 (voxels); got {self.offset!r}")
        if self.frames < _ES_FRAME + 1:
            raise ConfigError(f"frames must be >= {_ES_FRAME + 1}; got {self.frames!r}")


def subject_name(layout: str, index: int) -> str:
    """The dataset-style identifier the phantom's subject ``index`` gets in ``layout``."""
    return {
        "bundle": f"sub-{index:04d}",
        "acdc": f"patient{index + 1:03d}",
        "mnms": f"A{index:04d}M",
        "mnms2": f"{index + 1:03d}",
        "ukbb": f"{1000000 + index}",
    }[layout]


def _transform(array: np.ndarray, affine: np.ndarray, options: LayoutOptions, label: bool):
    array, affine = geometry.resample_inplane(array, affine, options.spacing, label=label)
    ox, oy = (int(o) for o in options.offset)
    if ox or oy:
        shape = (array.shape[0] + ox, array.shape[1] + oy, *array.shape[2:])
        array, affine = geometry.crop_or_pad(array, affine, (-ox, -oy), max(shape[:2]))
    return geometry.reorient(array, affine, np.array(STORAGES[options.storage], dtype=float))


def _codes(label: np.ndarray, layout: str) -> np.ndarray:
    codes = LABEL_CODES["folder" if layout == "bundle" else layout]
    out = np.zeros_like(label)
    for name in ("lv", "myo", "rv"):
        out[label == LABELS[name]] = codes[name]
    return out


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _number(text: str) -> float:
    return float(text) if text not in ("", None) else math.nan


def _put(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    write_bytes_atomic(path, nifti_gz_bytes(array, affine))


def write_layout(cohort: str | os.PathLike, out: str | os.PathLike, options: LayoutOptions) -> None:
    """Write the phantom cohort in ``cohort`` (the phantom's own layout) into ``out`` in ``options.layout``.

    Args:
        cohort: a folder written by ``scripts.phantom`` (images/, labels/, attributes.csv, subjects.csv).
        out: the folder to write (created; the caller moves it into place).
        options: layout, storage, spacing, offset.
    """
    cohort, out, layout = Path(cohort), Path(out), options.layout
    out.mkdir(parents=True, exist_ok=True)
    rows = {r["id"]: r for r in _read_rows(cohort / "attributes.csv")}
    groups = {r["subject"]: r["group"] for r in _read_rows(cohort / "subjects.csv")}
    demo_rows, info_rows = [], []
    for sid in sorted(groups):
        name = subject_name(layout, int(sid.split("-")[1]))
        vol = {}
        for phase in ("ED", "ES"):
            image_nii = nib.load(str(cohort / rows[f"{sid}_{phase}"]["image"]))
            label_nii = nib.load(str(cohort / rows[f"{sid}_{phase}"]["label"]))
            image, affine = _transform(np.asarray(image_nii.dataobj), image_nii.affine, options, label=False)
            label, _ = _transform(np.asarray(label_nii.dataobj), label_nii.affine, options, label=True)
            vol[phase] = (image.astype(np.float32), _codes(label, layout).astype(np.uint8), affine)
        ed = rows[f"{sid}_ED"]
        demo_rows.append([name, ed["AGE"], ed["SEX"], ed["BMI"]])
        info_row = _WRITERS[layout](out / name, vol, _Demographics.of(ed, groups[sid]), options)
        if info_row is not None:
            info_rows.append(info_row)
    id_column = "eid" if layout == "ukbb" else "subject"
    _write_csv(out / "demographics.csv", [id_column, "age", "sex", "bmi"], demo_rows)
    if layout == "mnms":
        header = ["External code", "VendorName", "Vendor", "Centre", "ED", "ES", "Age", "Pathology", "Sex"]
        _write_csv(out / "mnms_dataset_info.csv", [*header, "Height", "Weight"], info_rows)
    elif layout == "mnms2":
        header = ["SUBJECT_CODE", "DISEASE", "VENDOR", "SEX", "AGE", "HEIGHT", "WEIGHT"]
        _write_csv(out / "dataset_information.csv", header, info_rows)


@dataclass(frozen=True)
class _Demographics:
    """What the dataset tables say of one subject, as text ("" = missing)."""

    group: str
    sex: str  # "M" / "F"
    age: str
    height: str  # cm, from the sex (the phantom draws BMI, not height)
    weight: str  # kg, from BMI and height

    @classmethod
    def of(cls, ed: dict[str, str], group: str) -> _Demographics:
        age, sex, bmi = _number(ed["AGE"]), _number(ed["SEX"]), _number(ed["BMI"])
        height = math.nan if math.isnan(sex) else (175.0 if sex == 1 else 162.0)
        weight = bmi * (height / 100.0) ** 2 if math.isfinite(bmi) and math.isfinite(height) else math.nan
        text = {k: "" if math.isnan(v) else f"{v:.1f}" for k, v in {"h": height, "w": weight, "age": age}.items()}
        sex_text = "" if math.isnan(sex) else ("M" if sex == 1 else "F")
        return cls(group=group, sex=sex_text, age=text["age"], height=text["h"], weight=text["w"])


_Volumes = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # phase -> (image, label, affine)


def _write_bundle(folder: Path, vol: _Volumes, who: _Demographics, options: LayoutOptions) -> None:
    out, name = folder.parent, folder.name
    for phase, (image, label, affine) in vol.items():
        _put(out / "images" / f"{name}_{phase}.nii.gz", image, affine)
        _put(out / "labels" / f"{name}_{phase}.nii.gz", label, affine)


def _write_acdc(folder: Path, vol: _Volumes, who: _Demographics, options: LayoutOptions) -> None:
    name = folder.name
    frames = {"ED": 1, "ES": 5}
    for phase, (image, label, affine) in vol.items():
        _put(folder / f"{name}_frame{frames[phase]:02d}.nii.gz", image, affine)
        _put(folder / f"{name}_frame{frames[phase]:02d}_gt.nii.gz", label, affine)
    lines = [f"ED: {frames['ED']}", f"ES: {frames['ES']}", f"Group: {who.group}"]
    lines += [f"Height: {who.height}"] if who.height and who.weight else []
    lines += [f"NbFrame: {max(options.frames, frames['ES'])}"]
    lines += [f"Weight: {who.weight}"] if who.height and who.weight else []
    write_text_atomic(folder / "Info.cfg", "\n".join(lines) + "\n")


def _write_mnms(folder: Path, vol: _Volumes, who: _Demographics, options: LayoutOptions) -> list:
    name = folder.name
    folder = folder.parent / "Training" / "Labeled" / name
    (ed_img, ed_lab, affine), (es_img, es_lab, _) = vol["ED"], vol["ES"]
    cine = np.zeros((*ed_img.shape, options.frames), dtype=np.float32)
    gt = np.zeros((*ed_lab.shape, options.frames), dtype=np.uint8)
    for t in range(options.frames):
        w = min(abs(t - _ED_FRAME) / (_ES_FRAME - _ED_FRAME), 1.0)
        cine[..., t] = (1.0 - w) * ed_img + w * es_img
    cine[..., _ED_FRAME], cine[..., _ES_FRAME] = ed_img, es_img
    gt[..., _ED_FRAME], gt[..., _ES_FRAME] = ed_lab, es_lab
    _put(folder / f"{name}_sa.nii.gz", cine, affine)
    _put(folder / f"{name}_sa_gt.nii.gz", gt, affine)
    return [name, "Phantom", "P", "1", _ED_FRAME, _ES_FRAME, who.age, who.group, who.sex, who.height, who.weight]


def _write_mnms2(folder: Path, vol: _Volumes, who: _Demographics, options: LayoutOptions) -> list:
    name = folder.name
    folder = folder.parent / "dataset" / name
    for phase, (image, label, affine) in vol.items():
        _put(folder / f"{name}_SA_{phase}.nii.gz", image, affine)
        _put(folder / f"{name}_SA_{phase}_gt.nii.gz", label, affine)
    return [name, who.group, "PHANTOM", who.sex, who.age, who.height, who.weight]


def _write_ukbb(folder: Path, vol: _Volumes, who: _Demographics, options: LayoutOptions) -> None:
    for phase, (image, label, affine) in vol.items():
        _put(folder / f"sa_{phase}.nii.gz", image, affine)
        _put(folder / f"seg_sa_{phase}.nii.gz", label, affine)


# layout -> writer of one subject (its files; returns its row of the dataset's information table, if any)
_WRITERS = {
    "bundle": _write_bundle,
    "acdc": _write_acdc,
    "mnms": _write_mnms,
    "mnms2": _write_mnms2,
    "ukbb": _write_ukbb,
}


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    write_bytes_atomic(path, csv_bytes(header, rows))
