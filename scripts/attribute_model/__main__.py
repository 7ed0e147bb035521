"""Command line of the attribute model.

    python -m scripts.attribute_model sample --model models/attributes_dp.json --subjects N --out FILE.csv [--seed S]
    python -m scripts.attribute_model card --dir DIR --evaluation eval/report.json

``sample`` writes drawn rows (two per subject, ED then ES, the request-CSV columns) without
generating images, to inspect the DP table or edit it into a request file; ``card`` adds an
evaluation's headline numbers to the cohort card of a synthesis folder.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from scripts.errors import BundleError

__all__ = ["main"]


def _ranges(path: str) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)["attribute_ranges"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; 0 on success, 2 on bad input (message on stderr)."""
    parser = argparse.ArgumentParser(prog="python -m scripts.attribute_model", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="draw subjects from a DP attribute model into a request CSV")
    s.add_argument("--model", required=True, help="the attribute model (models/attributes_dp.json)")
    s.add_argument("--subjects", required=True, type=int, help="subjects to draw (two rows each: ED, ES)")
    s.add_argument("--out", required=True, help="the CSV to write")
    s.add_argument("--seed", type=int, default=0, help="seed of the draw (as --seed of configs/inference.yaml)")
    s.add_argument("--common", default="configs/common.yaml", help="config with attribute_ranges")
    s.add_argument("--all_rows", action="store_true", help="keep implausible draws (ESV >= EDV, EF out of range)")
    c = sub.add_parser("card", help="add an evaluation's headline numbers to a synthesis folder's cohort card")
    c.add_argument("--dir", required=True, help="the synthesis output folder")
    c.add_argument("--evaluation", default="eval/report.json", help="the evaluation's report.json")
    args = parser.parse_args(argv)
    try:
        if args.command == "sample":
            import numpy as np
            from scripts.attribute_model.model import read_model
            from scripts.attribute_model.sample import draw_subjects, subject_rows, write_rows

            model = read_model(args.model)
            rng = np.random.default_rng([args.seed, 1])  # the draw of configs/inference.yaml with the same seed
            drawn = draw_subjects(model, args.subjects, rng, _ranges(args.common), plausible_only=not args.all_rows)
            write_rows(args.out, subject_rows(model, drawn))
            print(f"wrote {2 * len(drawn)} rows ({len(drawn)} subjects, ED and ES) to {args.out}")
        else:
            from scripts.attribute_model.card import add_evaluation

            path = add_evaluation(args.dir, args.evaluation)
            if path is None:
                raise BundleError(f"--dir {args.dir} has no cohort_card.json, or {args.evaluation} is absent")
            print(f"updated {path}")
    except (BundleError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
