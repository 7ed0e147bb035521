"""The same phantom subjects written as ACDC, M&Ms, M&Ms-2 and UK Biobank, prepared: how far apart do they come out?

Writes the subjects of one phantom cohort in each dataset layout (other label codes, storage
orders, spacings, a 4D cine, a larger field of view), imports each with ``scripts.prepare`` at
1.8 mm and prints, per layout, the largest and mean difference from the ACDC import (volumes and
wall thickness relative, EF in points, ANGLE in degrees) and the smallest Dice of the prepared
label maps; then the ACDC import against the phantom's own attributes (ANGLE: drawn vs measured).
docs/data.md quotes its output.

    python benchmarks/layout_agreement.py [--subjects 20 --domain public --seed 0]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.phantom import CohortSpec, generate_cohorts  # noqa: E402
from scripts.phantom_layouts import LayoutOptions, subject_name  # noqa: E402
from scripts.prepare import PrepareSpec, prepare_cohort  # noqa: E402

LAYOUTS = {
    "acdc": LayoutOptions("acdc"),
    "ukbb": LayoutOptions("ukbb", storage="transpose", offset=(24, 8)),
    "mnms": LayoutOptions("mnms", storage="flip", spacing=1.4),
    "mnms2": LayoutOptions("mnms2", storage="flip_transpose", spacing=2.0),
}
RELATIVE = ("LVEDV", "LVESV", "RVEDV", "RVESV", "MYOEDTHICK", "MYOESTHICK")
ABSOLUTE = ("LVEF", "RVEF", "ANGLE")


def rows(cohort: Path) -> dict[str, dict[str, str]]:
    with open(cohort / "attributes.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def differences(a: dict[str, str], b: dict[str, str]) -> dict[str, float]:
    out = {k: abs(float(b[k]) / float(a[k]) - 1.0) * 100.0 for k in RELATIVE}
    out.update({k: abs(float(b[k]) - float(a[k])) for k in ABSOLUTE})
    return out


def label_map(cohort: Path, subject: str, phase: str) -> np.ndarray:
    return np.asarray(nib.load(cohort / "labels" / f"{subject}_{phase}.nii.gz").dataobj)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=20)
    parser.add_argument("--domain", default="public")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        specs = [
            CohortSpec(root / "bundle", subjects=args.subjects, domain=args.domain, seed=args.seed, progress=False)
        ]
        specs += [
            CohortSpec(root / n, subjects=args.subjects, domain=args.domain, seed=args.seed, progress=False, layout=o)
            for n, o in LAYOUTS.items()
        ]
        generate_cohorts(specs)
        for name in LAYOUTS:
            demo = root / name / "demographics.csv" if name in ("acdc", "ukbb") else None
            columns = {"id": "eid" if name == "ukbb" else "subject"}
            spec = PrepareSpec(
                format=name, source=root / name, out=root / f"prepared_{name}", demographics=demo, columns=columns
            )
            report = prepare_cohort(spec)
            assert report["included_subjects"] == args.subjects, report["excluded"]
        ref = rows(root / "prepared_acdc")
        keys = RELATIVE + ABSOLUTE
        print("| layout (storage, source spacing) | " + " | ".join(keys) + " | min Dice LV / MYO / RV |")
        print("|---" * (len(keys) + 2) + "|")
        for name, opts in LAYOUTS.items():
            if name == "acdc":
                continue
            got = rows(root / f"prepared_{name}")
            diffs, dices = [], []
            for i in range(args.subjects):
                a, b = ref[f"{subject_name('acdc', i)}_ED"], got[f"{subject_name(name, i)}_ED"]
                diffs.append(differences(a, b))
                for phase in ("ED", "ES"):
                    la = label_map(root / "prepared_acdc", subject_name("acdc", i), phase)
                    lb = label_map(root / f"prepared_{name}", subject_name(name, i), phase)
                    dices.append([dice(la == c, lb == c) for c in (1, 2, 3)])
            cells = [f"{max(d[k] for d in diffs):.2f} ({np.mean([d[k] for d in diffs]):.2f})" for k in keys]
            label = f"{name} ({opts.storage}, {opts.spacing or 'phantom'} mm)"
            print(
                f"| {label} | "
                + " | ".join(cells)
                + " | "
                + " / ".join(f"{v:.3f}" for v in np.min(dices, axis=0))
                + " |"
            )
        truth = rows(root / "bundle")
        diffs = [
            differences(truth[f"sub-{i:04d}_ED"], ref[f"{subject_name('acdc', i)}_ED"]) for i in range(args.subjects)
        ]
        cells = [f"{max(d[k] for d in diffs):.2f} ({np.mean([d[k] for d in diffs]):.2f})" for k in keys]
        print("| acdc vs the phantom's attributes | " + " | ".join(cells) + " | - |")
        angle = [
            float(ref[f"{subject_name('acdc', i)}_ED"]["ANGLE"]) - float(truth[f"sub-{i:04d}_ED"]["ANGLE"])
            for i in range(args.subjects)
        ]
        spread = f"mean {np.mean(angle):+.2f}, sd {np.std(angle):.2f}, max |.| {max(map(abs, angle)):.2f}"
        print(f"\nANGLE measured - drawn: {spread} degrees")


if __name__ == "__main__":
    main()
