"""Readers of the dataset layouts ``scripts.prepare`` imports: ACDC, M&Ms-1, M&Ms-2, ukbb_cardiac, a folder.

A reader lists the subjects of a source folder (:class:`SourceSubject`) without reading any
volume; ``SourceSubject.load()`` reads one subject's ED and ES image and label volumes and raises
:class:`Excluded` (a reason code and a detail) for what makes the subject unusable, so one bad
record is named in the report and never stops the cohort. docs/data.md describes each layout.
"""

from __future__ import annotations

import configparser
import csv
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scripts.errors import ConfigError, DataError

__all__ = [
    "FORMATS",
    "LABEL_CODES",
    "REASONS",
    "DemographicColumns",
    "Excluded",
    "SourceSubject",
    "Volume",
    "read_demographics",
    "subjects",
]

FORMATS: tuple[str, ...] = ("acdc", "mnms", "mnms2", "ukbb", "folder")

#: label codes of each dataset (``folder``: given with ``--labels``)
LABEL_CODES: dict[str, dict[str, int]] = {
    "acdc": {"lv": 3, "myo": 2, "rv": 1},
    "mnms": {"lv": 1, "myo": 2, "rv": 3},
    "mnms2": {"lv": 1, "myo": 2, "rv": 3},
    "ukbb": {"lv": 1, "myo": 2, "rv": 3},
    "folder": {"lv": 1, "myo": 2, "rv": 3},
}

#: exclusion reasons (prepare_report.json ``excluded[].reason``) and what they mean
REASONS: dict[str, str] = {
    "missing_metadata": "the dataset's metadata (Info.cfg, information CSV row, ED/ES frame) is missing or unreadable",
    "missing_image": "an ED or ES image file is missing",
    "missing_label": "an ED or ES label file is missing",
    "unreadable_file": "a file exists but cannot be read as NIfTI",
    "frame_out_of_range": "the ED or ES frame index lies outside the cine",
    "shape_mismatch": "image and label (or ED and ES) shapes differ, or a volume is not 3D",
    "affine_mismatch": "image and label (or ED and ES) affines differ",
    "unknown_label_value": "a label map holds a value outside the dataset's label convention",
    "empty_label": "an ED or ES label map holds no heart label",
    "no_lv_at_ed": "the ED label map has no LV blood pool",
    "esv_above_edv": "an end-systolic volume exceeds the end-diastolic one (LV or RV)",
}

PHASES = ("ED", "ES")


class Excluded(Exception):  # noqa: N818 (an outcome for a subject, reported, not a failure)
    """A subject that cannot be used; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)  # both in args: a worker process can pickle it
        self.reason, self.detail = reason, detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass
class Volume:
    """One phase of a subject as stored: image and label arrays (X, Y, Z) with their affines."""

    image: np.ndarray
    image_affine: np.ndarray
    label: np.ndarray
    label_affine: np.ndarray


@dataclass
class SourceSubject:
    """A subject found in the source folder (nothing read yet; picklable, for worker processes).

    Args:
        subject: the dataset's own identifier.
        where: its folder or file, for messages.
        files: per phase, (image path, label path, frame index of a 4D cine or None).
        demographics: AGE / SEX / BMI from the dataset's metadata (absent = missing).
        group: the dataset's diagnosis or pathology field, '' if none.
        error: an exclusion already known when listing (e.g. no metadata row).
    """

    subject: str
    where: str
    files: dict[str, tuple[Path, Path, int | None]] = field(default_factory=dict)
    demographics: dict[str, float] = field(default_factory=dict)
    group: str = ""
    error: Excluded | None = None

    def load(self) -> dict[str, Volume]:
        """Read ``{"ED": Volume, "ES": Volume}``; raises :class:`Excluded`."""
        if self.error is not None:
            raise self.error
        return {phase: _volume(*self.files[phase]) for phase in PHASES}


# ------------------------------------------------------------------------------------ file reading


def _read(path: Path, kind: str, frame: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Array and affine of a NIfTI file (one frame of a 4D file when ``frame`` is given)."""
    if not path.is_file():
        raise Excluded(f"missing_{kind}", f"{path} not found")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel, gzip and zlib raise many types for a corrupt file
        raise Excluded("unreadable_file", f"{path}: {type(e).__name__}: {str(e).strip()[:120]}") from None
    if frame is not None:
        if data.ndim != 4:
            raise Excluded("shape_mismatch", f"{path}: expected a 4D cine (X, Y, Z, T), got shape {data.shape}")
        if not 0 <= frame < data.shape[3]:
            raise Excluded(
                "frame_out_of_range", f"{path}: frame index {frame} outside the cine's {data.shape[3]} frames"
            )
        data = data[..., frame]
    elif data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise Excluded("shape_mismatch", f"{path}: expected a 3D volume (X, Y, slices), got shape {data.shape}")
    return data, affine


def _volume(image: Path, label: Path, frame: int | None = None) -> Volume:
    img, img_affine = _read(image, "image", frame)
    lab, lab_affine = _read(label, "label", frame)
    return Volume(np.asarray(img, dtype=np.float32), img_affine, lab, lab_affine)


# ------------------------------------------------------------------------------------ metadata


def _number(text: str | None) -> float:
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def _sex(text: str | None) -> float:
    """1 male, 0 female (``M``/``F``, ``male``/``female``, ``1``/``0``); NaN otherwise."""
    value = str(text or "").strip().lower()
    return {"m": 1.0, "male": 1.0, "1": 1.0, "1.0": 1.0, "f": 0.0, "female": 0.0, "0": 0.0, "0.0": 0.0}.get(
        value, math.nan
    )


def _bmi(height_cm: float, weight_kg: float) -> float:
    if not (height_cm > 0 and weight_kg > 0):
        return math.nan
    return weight_kg / (height_cm / 100.0) ** 2


def _present(values: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if math.isfinite(v)}


def _column(header: Iterable[str], *names: str) -> str | None:
    """The header entry equal to one of ``names`` (case and surrounding spaces ignored)."""
    lookup = {h.strip().lower(): h for h in header}
    for name in names:
        if name.strip().lower() in lookup:
            return lookup[name.strip().lower()]
    return None


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read the CSV file ({e})") from None


@dataclass(frozen=True)
class DemographicColumns:
    """Column names of a demographics CSV (matched case-insensitively)."""

    id: str = "subject"
    age: str = "age"
    sex: str = "sex"
    bmi: str = "bmi"


def read_demographics(path: str | os.PathLike, columns: DemographicColumns) -> dict[str, dict[str, float]]:
    """AGE / SEX / BMI per subject from a CSV; blank or unreadable cells stay missing (never imputed).

    Raises:
        DataError: when the file or its id column is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--demographics {path}: file not found (expected a CSV with columns {columns.id}, ...)")
    header, rows = _read_csv(path)
    id_col = _column(header, columns.id)
    if id_col is None:
        raise DataError(f"--demographics {path}: no id column '{columns.id}' (header is {header}); set --id_column")
    cols = {name: _column(header, getattr(columns, name.lower())) for name in ("AGE", "SEX", "BMI")}
    if all(c is None for c in cols.values()):
        raise DataError(
            f"--demographics {path}: none of the columns '{columns.age}', '{columns.sex}', '{columns.bmi}' "
            f"(header is {header}); set --age_column / --sex_column / --bmi_column"
        )
    out = {}
    for row in rows:
        sid = (row.get(id_col) or "").strip()
        if not sid:
            continue
        values = {
            "AGE": _number(row.get(cols["AGE"])) if cols["AGE"] else math.nan,
            "SEX": _sex(row.get(cols["SEX"])) if cols["SEX"] else math.nan,
            "BMI": _number(row.get(cols["BMI"])) if cols["BMI"] else math.nan,
        }
        out[sid] = _present(values)
    return out


def _info_csv(source: Path, id_names: tuple[str, ...]) -> tuple[Path, str, list[str], list[dict[str, str]]] | None:
    """The first CSV in ``source`` (top level, sorted) with one of the id columns ``id_names``."""
    for path in sorted(source.glob("*.csv")):
        header, rows = _read_csv(path)
        id_col = _column(header, *id_names)
        if id_col is not None:
            return path, id_col, header, rows
    return None


def _info_demographics(header: list[str], row: Mapping[str, str]) -> dict[str, float]:
    age, sex = _column(header, "Age", "AGE"), _column(header, "Sex", "SEX")
    height, weight = _column(header, "Height", "HEIGHT"), _column(header, "Weight", "WEIGHT")
    return _present(
        {
            "AGE": _number(row.get(age)) if age else math.nan,
            "SEX": _sex(row.get(sex)) if sex else math.nan,
            "BMI": _bmi(_number(row.get(height)), _number(row.get(weight))) if height and weight else math.nan,
        }
    )


# ------------------------------------------------------------------------------------ layouts


def _acdc(source: Path, options: Mapping) -> list[SourceSubject]:
    found = []
    for folder in sorted(p for p in source.iterdir() if p.is_dir() and re.fullmatch(r"patient\d+", p.name)):
        pid = folder.name
        info = folder / "Info.cfg"
        parser = configparser.ConfigParser()
        error, frames, demo, group = None, {}, {}, ""
        try:
            parser.read_string("[info]\n" + info.read_text())
            section = parser["info"]
            frames = {ph: int(section[ph]) for ph in PHASES}
            group = section.get("Group", "").strip()
            demo = _present({"BMI": _bmi(_number(section.get("Height")), _number(section.get("Weight")))})
            n_frames = int(section["NbFrame"]) if "NbFrame" in section else None
            bad = [ph for ph in PHASES if frames[ph] < 1 or (n_frames is not None and frames[ph] > n_frames)]
            if bad:
                error = Excluded(
                    "frame_out_of_range",
                    f"{info}: {bad[0]} frame {frames[bad[0]]} outside 1..{n_frames or 'NbFrame'} (1-based)",
                )
        except (OSError, configparser.Error, KeyError, ValueError) as e:
            error = Excluded(
                "missing_metadata", f"{info}: expected 'ED: n' and 'ES: n' lines ({type(e).__name__}: {e})"
            )

        files = {
            ph: (folder / f"{pid}_frame{f:02d}.nii.gz", folder / f"{pid}_frame{f:02d}_gt.nii.gz", None)
            for ph, f in frames.items()
        }
        found.append(SourceSubject(pid, str(folder), files, demo, group, error))
    return found


def _mnms(source: Path, options: Mapping) -> list[SourceSubject]:
    info = _info_csv(source, ("External code",))
    if info is None:
        raise DataError(
            f"{source}: no information CSV with an 'External code' column (expected the M&Ms CSV in --source)"
        )
    csv_path, id_col, header, rows = info
    by_code = {(r.get(id_col) or "").strip(): r for r in rows}
    ed_col, es_col = _column(header, "ED"), _column(header, "ES")
    group_col = _column(header, "Pathology")
    found = []
    for cine in sorted(source.glob("**/*_sa.nii.gz")):
        code = cine.name[: -len("_sa.nii.gz")]
        if cine.parent.name != code:
            continue
        row, error, frames = by_code.get(code), None, {}
        if row is None:
            error = Excluded("missing_metadata", f"{csv_path}: no row with External code '{code}'")
        else:
            try:
                frames = {"ED": int(_number(row.get(ed_col))), "ES": int(_number(row.get(es_col)))}
            except (TypeError, ValueError):
                error = Excluded("missing_metadata", f"{csv_path}, code '{code}': ED / ES frame indices missing")

        gt = cine.with_name(f"{code}_sa_gt.nii.gz")
        files = {ph: (cine, gt, f) for ph, f in frames.items()}
        demo = _info_demographics(header, row) if row else {}
        group = (row.get(group_col) or "").strip() if row and group_col else ""
        found.append(SourceSubject(code, str(cine.parent), files, demo, group, error))
    return found


def _mnms2(source: Path, options: Mapping) -> list[SourceSubject]:
    info = _info_csv(source, ("SUBJECT_CODE", "External code", "subject"))
    by_id, header, group_col = {}, [], None
    if info is not None:
        _, id_col, header, rows = info
        by_id = {(r.get(id_col) or "").strip(): r for r in rows}
        group_col = _column(header, "DISEASE", "Pathology")
    found = []
    root = source / "dataset"
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for folder in folders:
        sid = folder.name

        files = {ph: (folder / f"{sid}_SA_{ph}.nii.gz", folder / f"{sid}_SA_{ph}_gt.nii.gz", None) for ph in PHASES}
        row = by_id.get(sid) or by_id.get(sid.lstrip("0"))
        demo = _info_demographics(header, row) if row else {}
        group = (row.get(group_col) or "").strip() if row and group_col else ""
        found.append(SourceSubject(sid, str(folder), files, demo, group))
    return found


def _ukbb(source: Path, options: Mapping) -> list[SourceSubject]:
    found = []
    for folder in sorted(p for p in source.iterdir() if p.is_dir() and (p / "sa_ED.nii.gz").exists()):
        files = {ph: (folder / f"sa_{ph}.nii.gz", folder / f"seg_sa_{ph}.nii.gz", None) for ph in PHASES}
        found.append(SourceSubject(folder.name, str(folder), files))
    return found


def _pattern_regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\{subject\}|\{phase\})", pattern)
    regex = "".join(
        "(?P<subject>[^/]+?)" if p == "{subject}" else "(?:ED|ES)" if p == "{phase}" else re.escape(p) for p in parts
    )
    return re.compile(regex + r"\Z")


def _folder(source: Path, options: Mapping) -> list[SourceSubject]:
    image_pattern, label_pattern = options["image_pattern"], options["label_pattern"]
    for name, pattern in (("image_pattern", image_pattern), ("label_pattern", label_pattern)):
        if "{subject}" not in pattern or "{phase}" not in pattern:
            raise ConfigError(
                f"--{name} must hold '{{subject}}' and '{{phase}}', e.g. 'images/{{subject}}_{{phase}}.nii.gz'"
            )
    regex = _pattern_regex(image_pattern)
    glob = image_pattern.replace("{subject}", "*").replace("{phase}", "E[DS]")
    ids = sorted({m["subject"] for p in source.glob(glob) if (m := regex.match(p.relative_to(source).as_posix()))})
    found = []
    for sid in ids:
        files = {
            ph: (
                source / image_pattern.format(subject=sid, phase=ph),
                source / label_pattern.format(subject=sid, phase=ph),
                None,
            )
            for ph in PHASES
        }
        found.append(SourceSubject(sid, str(files["ED"][0]), files))
    return found


_READERS: dict[str, Callable[[Path, Mapping], list[SourceSubject]]] = {
    "acdc": _acdc,
    "mnms": _mnms,
    "mnms2": _mnms2,
    "ukbb": _ukbb,
    "folder": _folder,
}


def subjects(fmt: str, source: str | os.PathLike, **options) -> list[SourceSubject]:
    """List the subjects of ``source`` in layout ``fmt`` (see docs/data.md).

    Args:
        fmt: one of :data:`FORMATS`.
        source: the dataset folder.
        options: ``image_pattern`` / ``label_pattern`` for ``folder``.

    Raises:
        DataError: when ``source`` is not a folder or a required metadata file is missing.
    """
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"--source {source}: not a folder (expected the {fmt} dataset folder)")
    return _READERS[fmt](source, options)
