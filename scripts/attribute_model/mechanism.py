"""The DP Gaussian copula: two Gaussian mechanisms with stated L2 sensitivities.

Why our own: the ready-made DP tabular libraries conflict with the bundle's pins (smartnoise-synth
needs opacus < 0.15, synthcity torch < 2.3 and numpy < 2), and a Gaussian copula (Li, Xiong and
Jiang, "Differentially private synthesization of multi-dimensional data using copula functions",
EDBT 2014; here with Gaussian mechanisms only, so the ledger composes them exactly with the DP-SGD
steps) needs two statistics:

1. **Marginals**: per column, a histogram over public bins of its public range (``attribute_ranges``)
   plus a *missing* bin. Adding or removing one subject changes one bin of every column by 1, so
   the concatenated histograms have L2 sensitivity ``sqrt(p)`` for p columns.
2. **Dependence**: each subject's normal scores ``z_j = Phi^-1(F_j(x_j))`` under the *released*
   (noisy) marginals F_j, clipped to L2 norm R; the upper triangle (with the diagonal) of
   ``sum_i z_i z_i^T`` has L2 sensitivity ``||z z^T||_F = ||z||^2 <= R^2``. The marginals are
   an earlier DP output, so this is adaptive composition, which the accountant covers.

Mechanism k adds ``N(0, (sigma_k Delta_k)^2)`` per entry, with ``sigma_k = sigma / sqrt(w_k)``,
``w_marginals + w_dependence = 1``. The adaptive composition of Gaussian mechanisms with noise
multipliers sigma_k is exactly a Gaussian mechanism with ``1 / sigma^2 = sum_k 1 / sigma_k^2``
(Dong, Roth and Su, "Gaussian differential privacy", 2022, Corollary 3.3; in RDP both are
``alpha / (2 sigma^2)``), so the ledger records the stage as ONE step with q = 1 and noise
multiplier sigma (tests/test_attribute_model.py checks it against the two mechanisms composed).

Everything after the noise (the projection of each histogram onto the simplex, the nearest
correlation matrix) is post-processing. The number of subjects n is public (as for DP-SGD's sample rate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri
from scripts.attribute_model.table import DISCRETE, SubjectTable, column_range
from scripts.errors import ConfigError

__all__ = [
    "Marginal",
    "Release",
    "marginal_counts",
    "marginal_sensitivity",
    "nearest_correlation",
    "normal_scores",
    "score_moments",
    "fit",
]

#: CDF values are kept in [EPS_F, 1 - EPS_F] before Phi^-1 (|z| <= 3.09)
EPS_F = 1e-3


@dataclass
class Marginal:
    """One column's released marginal: public bin edges and noisy probabilities.

    Attributes:
        name: the column.
        edges: bin edges over the public range (B + 1 values); for a discrete column the
            integer values are the bin centres.
        discrete: integer-valued column (values are bin centres, not uniform within bins).
        missing: probability of a missing value.
        probabilities: probability of each bin among observed values (sums to 1).
    """

    name: str
    edges: np.ndarray
    discrete: bool
    missing: float
    probabilities: np.ndarray

    @property
    def values(self) -> np.ndarray:
        """Bin centres."""
        return 0.5 * (self.edges[:-1] + self.edges[1:])

    def cdf(self, x: np.ndarray) -> np.ndarray:
        """The copula CDF: missing is the lowest value (mass ``missing``, scored at its middle)."""
        x = np.asarray(x, dtype=np.float64)
        out = np.full(x.shape, 0.5 * self.missing)
        seen = ~np.isnan(x)
        k = bin_index(x[seen], self.edges)
        below = np.concatenate([[0.0], np.cumsum(self.probabilities)])[k]
        if self.discrete:
            within = 0.5 * self.probabilities[k]
        else:
            lo, hi = self.edges[k], self.edges[k + 1]
            within = self.probabilities[k] * np.clip((x[seen] - lo) / (hi - lo), 0.0, 1.0)
        out[seen] = self.missing + (1.0 - self.missing) * (below + within)
        return out

    def quantile(self, u: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`cdf`: NaN below ``missing``, else a value in the public range."""
        u = np.asarray(u, dtype=np.float64)
        out = np.full(u.shape, np.nan)
        seen = u >= self.missing if self.missing < 1 else np.zeros(u.shape, bool)
        t = (u[seen] - self.missing) / max(1.0 - self.missing, 1e-12)
        cum = np.cumsum(self.probabilities)
        k = np.minimum(np.searchsorted(cum, t, side="right"), len(cum) - 1)
        if self.discrete:
            out[seen] = self.values[k]
        else:
            start = np.concatenate([[0.0], cum])[k]
            frac = np.clip((t - start) / np.maximum(self.probabilities[k], 1e-12), 0.0, 1.0)
            out[seen] = self.edges[k] + frac * (self.edges[k + 1] - self.edges[k])
        return out


def default_norm_bound(columns: int) -> float:
    """Default R: half the expected norm sqrt(p) of a subject's normal scores (docs/attributes.md)."""
    return 0.5 * math.sqrt(columns)


def bin_edges(column: str, ranges: Mapping[str, Sequence[float]], bins: int) -> tuple[np.ndarray, bool]:
    """Public bin edges of a column: ``bins`` equal bins of its range, or one bin per integer (discrete)."""
    low, high = column_range(column, ranges)
    if column in DISCRETE:
        values = np.arange(math.ceil(low), math.floor(high) + 1, dtype=np.float64)
        return np.concatenate([values - 0.5, [values[-1] + 0.5]]), True
    return np.linspace(low, high, int(bins) + 1), False


def bin_index(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each (non-missing) value; values outside the public range go to the first/last bin (clipping)."""
    return np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)


def marginal_counts(table: SubjectTable, edges: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per column ``[missing count, bin counts...]``: one subject adds 1 to one entry of each column."""
    counts = []
    for j, e in enumerate(edges):
        x = table.values[:, j]
        seen = ~np.isnan(x)
        c = np.zeros(len(e))  # missing + (len(e) - 1) bins
        c[0] = np.count_nonzero(~seen)
        np.add.at(c, 1 + bin_index(x[seen], e), 1.0)
        counts.append(c)
    return counts


def marginal_sensitivity(columns: int) -> float:
    """L2 sensitivity of the concatenated histograms (add/remove one subject): sqrt(p)."""
    return math.sqrt(columns)


def normal_scores(table: SubjectTable, marginals: Sequence[Marginal], norm_bound: float) -> np.ndarray:
    """``Phi^-1`` of each value's CDF under the released marginals, each row clipped to L2 norm ``norm_bound``."""
    z = np.stack([ndtri(np.clip(m.cdf(table.values[:, j]), EPS_F, 1 - EPS_F)) for j, m in enumerate(marginals)], axis=1)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return z * np.minimum(1.0, norm_bound / np.maximum(norms, 1e-12))


def score_moments(z: np.ndarray) -> np.ndarray:
    """Upper triangle (with the diagonal) of ``sum_i z_i z_i^T``; L2 sensitivity ``max ||z_i||^2``."""
    iu = np.triu_indices(z.shape[1])
    return (z.T @ z)[iu]


def simplex_projection(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (subtract one constant, clip at 0).

    Post-processing of a noisy histogram divided by the public n ("Norm-Sub", Wang et al., "Locally
    differentially private frequency estimation with consistency", NDSS 2020): unlike clipping the
    negative counts and renormalising, it does not spread the noise of the empty bins over the range.
    """
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    k = np.nonzero(u - cumulative / np.arange(1, len(u) + 1) > 0)[0][-1]
    return np.maximum(v - cumulative[k] / (k + 1), 0.0)


def nearest_correlation(matrix: np.ndarray, iterations: int = 100, floor: float = 1e-4) -> np.ndarray:
    """Nearest correlation matrix (Higham, IMA J. Numer. Anal. 22, 2002; alternating projections, Dykstra).

    Neither numpy nor scipy has it; post-processing of a noisy symmetric matrix.
    """
    a = 0.5 * (matrix + matrix.T)
    y, ds = a.copy(), np.zeros_like(a)
    for _ in range(iterations):
        r = y - ds
        w, v = np.linalg.eigh(r)
        x = (v * np.maximum(w, floor)) @ v.T
        ds = x - r
        y = x.copy()
        np.fill_diagonal(y, 1.0)
        if np.linalg.norm(y - x) < 1e-9:
            break
    w, v = np.linalg.eigh(0.5 * (y + y.T))
    y = (v * np.maximum(w, floor)) @ v.T
    d = np.sqrt(np.diag(y))
    return y / np.outer(d, d)


@dataclass
class Release:
    """What the two mechanisms released (the noisy statistics) and the model parameters derived from them."""

    noisy_counts: list[np.ndarray]
    noisy_moments: np.ndarray
    marginals: list[Marginal]
    correlation: np.ndarray
    sensitivities: dict[str, float]
    noise_multipliers: dict[str, float]


def _check_share(share: float) -> float:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < float(share) < 1.0:
        raise ConfigError(f"config field 'marginal_share': expected a number in (0, 1), got {share!r}")
    return float(share)


def fit(
    table: SubjectTable,
    ranges: Mapping[str, Sequence[float]],
    *,
    noise_multiplier: float,
    marginal_share: float = 0.5,
    bins: int = 16,
    norm_bound: float | None = None,
    rng: np.random.Generator,
) -> Release:
    """Run the two Gaussian mechanisms on the subject table and derive the copula's parameters.

    Args:
        table: the private subject table.
        ranges: public reference ranges (``configs/common.yaml``).
        noise_multiplier: sigma of the stage (the ledger's); 0 switches the noise off (tests only).
        marginal_share: w of the marginals (1 - w goes to the dependence), as a share of 1 / sigma^2.
        bins: bins of a continuous column.
        norm_bound: R, the L2 clip of a subject's normal scores (default sqrt(p) / 2: the clip rescales
            a row, which the normalisation by the diagonal largely undoes, and quarters the noise).
        rng: the noise's random generator.

    Returns:
        the noisy statistics and the model parameters.
    """
    share = _check_share(marginal_share)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ConfigError(f"config field 'bins': expected an integer >= 2, got {bins!r}")
    n, p = table.values.shape
    bound = default_norm_bound(p) if norm_bound is None else float(norm_bound)
    if not bound > 0:
        raise ConfigError(f"config field 'norm_bound': expected a number > 0 or null (sqrt(p) / 2), got {norm_bound!r}")
    sigmas = (
        {"marginals": noise_multiplier / math.sqrt(share), "dependence": noise_multiplier / math.sqrt(1 - share)}
        if noise_multiplier > 0
        else {"marginals": 0.0, "dependence": 0.0}
    )
    sens = {"marginals": marginal_sensitivity(p), "dependence": bound**2}
    edges, discrete = zip(*(bin_edges(c, ranges, bins) for c in table.columns))
    # mechanism 1: histograms with the missing bin
    noisy_counts = [
        c + rng.normal(0.0, sigmas["marginals"] * sens["marginals"], c.shape) for c in marginal_counts(table, edges)
    ]
    marginals = []
    for name, e, d, c in zip(table.columns, edges, discrete, noisy_counts):
        c = simplex_projection(c / n)
        observed = c[1:]
        probs = observed / observed.sum() if observed.sum() > 0 else np.full(observed.shape, 1.0 / len(observed))
        marginals.append(Marginal(name, np.asarray(e), bool(d), float(c[0]), probs))
    # mechanism 2: second moments of the normal scores under the released marginals
    moments = score_moments(normal_scores(table, marginals, bound))
    noisy_moments = moments + rng.normal(0.0, sigmas["dependence"] * sens["dependence"], moments.shape)
    m = np.zeros((p, p))
    m[np.triu_indices(p)] = noisy_moments / n
    m = m + np.triu(m, 1).T
    diag = np.maximum(np.diag(m), 1e-2)
    corr = nearest_correlation(m / np.sqrt(np.outer(diag, diag)))
    return Release(noisy_counts, noisy_moments, marginals, corr, sens, sigmas)


def draw_scores(correlation: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` normal-score vectors of the copula."""
    return rng.multivariate_normal(np.zeros(len(correlation)), correlation, size=int(count), method="eigh")


def uniform_scores(z: np.ndarray) -> np.ndarray:
    """``Phi(z)``."""
    return ndtr(z)
