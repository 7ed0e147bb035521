"""The 14 conditioning attributes (docs/data.md, "What is measured and how"), their units and reference ranges.

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

#: attributes whose only values are 0 and 1 (or missing)
BINARY_ATTRIBUTES: tuple[str, ...] = ("SEX", "ESED")

#: possible values (low, high), checked in training and synthesis alike (scripts.data.check_attribute);
#: the reference ranges of configs/common.yaml are narrower and only normalise. The upper bounds
#: are far beyond any human heart (the largest dilated ventricles hold about 500 ml) and catch
#: unit and typing errors (1e6 ml, 1e30) that would otherwise train to non-finite weights.
ATTRIBUTE_LIMITS: dict[str, tuple[float, float]] = {
    "LVEDV": (0.0, 1000.0),
    "LVESV": (0.0, 1000.0),
    "LVEF": (0.0, 100.0),
    "RVEDV": (0.0, 1000.0),
    "RVESV": (0.0, 1000.0),
    "RVEF": (0.0, 100.0),
    "MYOESTHICK": (0.0, 50.0),
    "MYOEDTHICK": (0.0, 50.0),
    "AGE": (0.0, 150.0),
    "SEX": (0.0, 1.0),
    "BMI": (0.0, 100.0),
    "ESED": (0.0, 1.0),
    "ANGLE": (-180.0, 180.0),
    "DEPTH": (0.0, 100.0),
}

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
