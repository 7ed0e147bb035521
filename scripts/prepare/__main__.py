"""``python -m scripts.prepare``: import a dataset into the bundle's cohort layout (docs/data.md)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from scripts.errors import BundleError
from scripts.prepare import FORMATS, PrepareSpec, prepare_cohort, summary_text
from scripts.prepare.layouts import DemographicColumns


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; returns the exit status (2 for a bad option or an unusable source)."""
    parser = argparse.ArgumentParser(prog="python -m scripts.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--format", required=True, choices=FORMATS, help="dataset layout")
    parser.add_argument("--source", required=True, help="dataset folder")
    parser.add_argument("--out", required=True, help="cohort folder to write")
    parser.add_argument("--spacing", default="1.8", help="in-plane spacing in mm, or 'source' (default 1.8)")
    parser.add_argument("--size", type=int, default=112, help="in-plane size of the LV-centred box (default 112)")
    parser.add_argument("--centre", default="lv", choices=("lv", "heart"), help="box centre: ED LV or ED heart")
    parser.add_argument("--demographics", help="CSV of age / sex / bmi per subject")
    parser.add_argument("--id_column", help="subject id column of --demographics (default: eid for ukbb, else subject)")
    parser.add_argument("--age_column", default="age")
    parser.add_argument("--sex_column", default="sex", help="0/F/female or 1/M/male")
    parser.add_argument("--bmi_column", default="bmi")
    parser.add_argument("--labels", help="source label codes, e.g. lv=3,myo=2,rv=1 (default: the dataset's)")
    parser.add_argument("--image_pattern", default="images/{subject}_{phase}.nii.gz", help="folder layout: image files")
    parser.add_argument("--label_pattern", default="labels/{subject}_{phase}.nii.gz", help="folder layout: label files")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subject-level split")
    parser.add_argument("--split_fractions", default="0.7,0.15,0.15", help="training,validation,test")
    parser.add_argument("--num_workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--strict", action="store_true", help="any excluded subject is an error")
    parser.add_argument("--overwrite", action="store_true", help="replace a cohort already in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    columns = DemographicColumns(
        id=args.id_column or ("eid" if args.format == "ukbb" else "subject"),
        age=args.age_column,
        sex=args.sex_column,
        bmi=args.bmi_column,
    )
    try:
        fractions = [float(x) for x in args.split_fractions.split(",")]
    except ValueError:
        fractions = []
    try:
        spec = PrepareSpec(
            format=args.format,
            source=args.source,
            out=args.out,
            spacing=args.spacing,
            size=args.size,
            centre=args.centre,
            demographics=args.demographics,
            seed=args.seed,
            split_fractions=fractions,
            strict=args.strict,
            overwrite=args.overwrite,
            labels=args.labels,
            image_pattern=args.image_pattern,
            label_pattern=args.label_pattern,
            columns=columns,
            num_workers=args.num_workers,
        )
        report = prepare_cohort(spec)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
