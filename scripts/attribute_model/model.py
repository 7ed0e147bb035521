"""The released attribute model: copula parameters and the privacy ledger, as JSON (never a private row).

File format (``kind`` = :data:`KIND`, ``version`` = :data:`VERSION`)::

    {"kind": "dp_attribute_model", "version": 1, "method": "...",
     "columns": [{"name", "edges", "discrete", "missing", "probabilities"}, ...],
     "correlation": [[...]], "subjects": n, "privacy": {...}, "privacy_ledger": [...]}

``edges`` are public (the config's ranges), ``missing`` and ``probabilities`` the post-processed
noisy histogram, ``correlation`` the projected noisy correlation of the normal scores; ``subjects``
is the public count n.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scripts.attribute_model.mechanism import Marginal
from scripts.attribute_model.table import SUBJECT_COLUMNS
from scripts.errors import DataError
from scripts.files import write_text_atomic

__all__ = ["KIND", "VERSION", "AttributeModel", "read_model"]

KIND = "dp_attribute_model"
VERSION = 1
METHOD = (
    "Gaussian copula: noisy per-column histograms with a missing bin (Gaussian mechanism, L2 sensitivity sqrt(p)) "
    "and a noisy second-moment matrix of the normal scores (Gaussian mechanism, L2 sensitivity R^2), projected to "
    "the nearest correlation matrix"
)


@dataclass
class AttributeModel:
    """The released parameters.

    Attributes:
        marginals: one per column, in :data:`SUBJECT_COLUMNS` order.
        correlation: (p, p) correlation matrix of the normal scores.
        subjects: n, the number of private subjects (public).
        privacy: the stage's mechanism, parameters and epsilon (see :mod:`.stage`).
        privacy_ledger: every DP stage on the data this model's epsilon composes (earlier ones and this one).
    """

    marginals: list[Marginal]
    correlation: np.ndarray
    subjects: int
    privacy: dict[str, Any] = field(default_factory=dict)
    privacy_ledger: list[dict[str, Any]] = field(default_factory=list)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.marginals)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "version": VERSION,
            "method": METHOD,
            "columns": [
                {
                    "name": m.name,
                    "edges": [float(e) for e in m.edges],
                    "discrete": m.discrete,
                    "missing": float(m.missing),
                    "probabilities": [float(p) for p in m.probabilities],
                }
                for m in self.marginals
            ],
            "correlation": np.round(self.correlation, 10).tolist(),
            "subjects": int(self.subjects),
            "privacy": self.privacy,
            "privacy_ledger": self.privacy_ledger,
        }

    def write(self, path: str) -> None:
        """Write atomically (a failed run leaves the earlier file)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "attribute model") -> AttributeModel:
        expected = f"the JSON file configs/dp_attributes.yaml writes (kind '{KIND}', version {VERSION})"
        if not isinstance(data, Mapping) or data.get("kind") != KIND:
            kind = data.get("kind") if isinstance(data, Mapping) else type(data).__name__
            raise DataError(f"{where}: not an attribute model (kind {kind!r}); expected {expected}")
        if data.get("version") != VERSION:
            raise DataError(
                f"{where}: attribute model version {data.get('version')!r} is not supported; expected {expected}"
            )
        try:
            marginals = []
            for c in data["columns"]:
                if c["name"] not in SUBJECT_COLUMNS:
                    raise ValueError(f"unknown column {c['name']!r}")
                edges, probs = np.asarray(c["edges"], float), np.asarray(c["probabilities"], float)
                missing = float(c["missing"])
                if len(edges) != len(probs) + 1 or not 0 <= missing <= 1 or np.any(probs < 0):
                    raise ValueError(f"column {c['name']}: inconsistent edges / probabilities / missing")
                if not math.isclose(float(probs.sum()), 1.0, abs_tol=1e-6):
                    raise ValueError(f"column {c['name']}: probabilities sum to {probs.sum():g}, not 1")
                marginals.append(Marginal(c["name"], edges, bool(c["discrete"]), missing, probs))
            corr = np.asarray(data["correlation"], float)
            if corr.shape != (len(marginals), len(marginals)) or not np.allclose(np.diag(corr), 1.0, atol=1e-6):
                raise ValueError(f"correlation must be a {len(marginals)}x{len(marginals)} matrix with unit diagonal")
            if np.linalg.eigvalsh(0.5 * (corr + corr.T)).min() < -1e-8:
                raise ValueError("correlation is not positive semi-definite")
            return cls(
                marginals,
                corr,
                int(data["subjects"]),
                dict(data.get("privacy", {})),
                list(data.get("privacy_ledger", [])),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(
                f"{where}: malformed attribute model ({type(err).__name__}: {err}); expected {expected}"
            ) from None


def read_model(path: str) -> AttributeModel:
    """Read an attribute model file, with a clear error naming the file when it is not one."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(
            f"{path}: attribute model not found; it is written by python -m monai.bundle run training "
            "--config_file \"['configs/common.yaml','configs/dp_attributes.yaml']\""
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not an attribute model ({type(err).__name__}: {err}); expected a JSON file") from None
    return AttributeModel.from_dict(data, path)
