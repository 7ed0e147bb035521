"""The 14 conditioning attributes (DESIGN.md section 2), their units and reference ranges.

The fixed reference ranges that normalise the attributes live in ``configs/common.yaml``
(``attribute_ranges``): they are written in the config, never estimated from a training set,
so no statistic of private data leaks through normalisation.
"""

from __future__ import annotations

ATTRIBUTE_NAMES: tuple[str, ...] = (
    "LVEDV",
    "LVESV",
    "LVEF",
    "RVEDV",
    "RVESV",
    "RVEF",
    "MYOESTHICK",
    "MYOEDTHICK",
    "AGE",
    "SEX",
    "BMI",
    "ESED",
    "ANGLE",
    "DEPTH",
)

ATTRIBUTE_UNITS: dict[str, str] = {
    "LVEDV": "ml",
    "LVESV": "ml",
    "LVEF": "%",
    "RVEDV": "ml",
    "RVESV": "ml",
    "RVEF": "%",
    "MYOESTHICK": "mm",
    "MYOEDTHICK": "mm",
    "AGE": "years",
    "SEX": "0 = female, 1 = male",
    "BMI": "kg/m2",
    "ESED": "0 = end-systole, 1 = end-diastole",
    "ANGLE": "degrees",
    "DEPTH": "slices",
}
