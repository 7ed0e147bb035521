"""Privacy accounting for DP-SGD: epsilon of a run, noise calibration, and the ledger.

DP-SGD with Poisson sampling is the Poisson-subsampled Gaussian mechanism composed once
per optimiser step. A stage is described by the tuple Opacus keeps in
``accountant.history``: ``(noise_multiplier, sample_rate, steps)``. The real work is done
by the Opacus accountants (``opacus.accountants``); this module adds only what Opacus lacks:

* input validation with messages that name the argument and the expected form;
* a cost guard for the PRV accountant (its grid grows with sqrt(steps) and with epsilon;
  for tiny noise multipliers Opacus tries to allocate terabytes) and a fallback to the RDP
  bound when the PRV numerics fail, so the reported number is always an upper bound;
* a check of the sigma returned by ``get_noise_multiplier`` (it is not verified there: if
  an accountant returns NaN its search silently returns sigma = 20), and a clear error
  when a target epsilon is out of reach with a sane noise multiplier;
* ``compose_epsilon``, the epsilon of several DP-SGD stages (the privacy ledger), by loading
  the stages into one Opacus accountant, so the composition is the accountant's own (RDP:
  sum of Renyi divergences per order; PRV: convolution of the privacy-loss distributions),
  never a sum of epsilons;
* a small calculator CLI::

      python -m scripts.privacy epsilon --sample_rate 0.01 --noise_multiplier 1.0 \\
          --steps 1000 --delta 1e-5 [--accountant prv|rdp]
      python -m scripts.privacy noise --target_epsilon 10 --delta 1e-5 \\
          --sample_rate 0.01 --steps 15000 [--accountant prv|rdp]

Semantics of the numbers (Opacus 1.6.0):

* ``"rdp"``: Renyi-DP of the sampled Gaussian mechanism (Mironov et al. 2019) at Opacus's
  default orders (1.1 ... 10.9 and 12 ... 63), converted with Balle et al. 2020 (Thm. 21).
  A rigorous upper bound, valid for add and remove neighbours. Because the orders stop at
  63, epsilons below about log(1/delta)/62 cannot be certified.
* ``"prv"``: numerical composition of privacy-loss random variables (Gopi et al. 2021).
  Tighter than RDP (how much: benchmarks/README.md, "Privacy accounting"). Opacus's
  ``get_epsilon`` returns ``eps_upper``, the estimate at ``delta - delta_error`` plus
  ``eps_error``; ``eps_error`` is ABSOLUTE (0.01 by default, in epsilon units, not relative),
  so PRV never reports less than about 0.01.
  It models only the "remove" privacy-loss distribution (mixture vs. N(0, sigma^2)); in
  every setting tests/test_privacy_accounting.py checks, that direction gives the larger
  epsilon of the two ("add" is N(0, sigma^2) vs. mixture), so it covers both.
* ``"gdp"`` (Opacus's Gaussian/CLT accountant) is an approximation, not an upper bound, and
  is refused here.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from scripts.errors import ConfigError

if TYPE_CHECKING:
    from opacus.accountants import PRVAccountant

# Opacus (and with it torch, ~2 s) is imported where it is used, so that importing this
# module and rejecting bad CLI input stay fast.

__all__ = [
    "ACCOUNTANTS",
    "MAX_NOISE_MULTIPLIER",
    "MIN_NOISE_MULTIPLIER",
    "PRV_DELTA_ERROR_RATIO",
    "PRV_EPS_ERROR",
    "PRV_MAX_DOMAIN_SIZE",
    "calibrate_noise",
    "compose_epsilon",
    "compute_epsilon",
    "main",
]

#: Accountants that return a rigorous upper bound on epsilon (Opacus mechanism names).
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")
#: Largest noise multiplier ``calibrate_noise`` will return; beyond it training is pointless.
MAX_NOISE_MULTIPLIER: float = 1e3
#: Smallest noise multiplier ``calibrate_noise`` searches: a target that this much noise already
#: meets (epsilon in the hundreds at typical rates) gets it instead of an unbounded search
#: through ever smaller sigmas, where each PRV evaluation takes seconds and the search never
#: converges to an absolute tolerance (more noise than needed: the guarantee only gets tighter).
MIN_NOISE_MULTIPLIER: float = 0.1
#: Opacus's default PRV ``eps_error`` (absolute, in epsilon units; added to the estimate).
PRV_EPS_ERROR: float = 0.01
#: Opacus's default PRV ``delta_error`` is ``delta / 1000``.
PRV_DELTA_ERROR_RATIO: float = 1e-3
#: Largest PRV discretisation grid (points) computed at ``PRV_EPS_ERROR``; a larger grid is
#: made coarser (larger eps_error) instead. 4e6 points take about 2-3 s and ~1 GB.
PRV_MAX_DOMAIN_SIZE: int = 4_000_000


# --------------------------------------------------------------------------- validation
# Opacus does not validate its inputs (q = 0, delta = 2 or sigma < 0 give silent garbage).


# an infinite epsilon is no privacy at all: the only run it fits is one without noise
INFINITE_HINT = {
    "target_epsilon": " (an infinite target is no privacy: it is accepted only with --noise_multiplier 0, a "
    "non-private baseline whose report covers nothing)"
}


def _as_real(name: str, value: object, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be {expected}, got {value!r}")
    if not math.isfinite(float(value)):
        raise ConfigError(f"{name} must be {expected} and finite, got {value!r}{INFINITE_HINT.get(name, '')}")
    return float(value)


def _check_sample_rate(value: object, name: str = "sample_rate") -> float:
    expected = "a number in (0, 1] (the Poisson sampling rate, batch size / dataset size)"
    q = _as_real(name, value, expected)
    if not 0.0 < q <= 1.0:
        raise ConfigError(f"{name} must be {expected}, got {value!r}")
    return q


def _check_noise_multiplier(value: object, name: str = "noise_multiplier") -> float:
    expected = "a number > 0 (noise std / max_grad_norm)"
    sigma = _as_real(name, value, expected)
    if sigma <= 0.0:
        raise ConfigError(f"{name} must be {expected}, got {value!r}")
    return sigma


def _check_steps(value: object, name: str = "steps") -> int:
    expected = "an integer >= 1 (number of optimiser steps)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be {expected}, got {value!r}")
    if not (math.isfinite(float(value)) and float(value).is_integer() and value >= 1):
        raise ConfigError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def _check_delta(value: object, name: str = "delta") -> float:
    expected = "a number in (0, 1), typically below 1 / dataset size (e.g. 1e-5)"
    delta = _as_real(name, value, expected)
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"{name} must be {expected}, got {value!r}")
    return delta


def _check_epsilon(value: object, name: str) -> float:
    expected = "a number > 0"
    eps = _as_real(name, value, expected)
    if eps <= 0.0:
        raise ConfigError(f"{name} must be {expected}, got {value!r}")
    return eps


def _check_accountant(value: object) -> str:
    if not isinstance(value, str) or value.lower() not in ACCOUNTANTS:
        raise ConfigError(
            f"accountant must be one of {', '.join(repr(a) for a in ACCOUNTANTS)}, got "
            f"{value!r} (Opacus's 'gdp' is a CLT approximation, not an upper bound)"
        )
    return value.lower()


def _check_history(history: object) -> list[tuple[float, float, int]]:
    if isinstance(history, (str, bytes)) or not isinstance(history, Iterable):
        raise ConfigError(f"history must be a list of (noise_multiplier, sample_rate, steps) tuples, got {history!r}")
    stages = []
    for i, stage in enumerate(history):
        if isinstance(stage, (str, bytes)) or not isinstance(stage, Sequence) or len(stage) != 3:
            raise ConfigError(f"history[{i}] must be a (noise_multiplier, sample_rate, steps) tuple, got {stage!r}")
        sigma, q, steps = stage
        stages.append(
            (
                _check_noise_multiplier(sigma, f"history[{i}] noise_multiplier"),
                _check_sample_rate(q, f"history[{i}] sample_rate"),
                _check_steps(steps, f"history[{i}] steps"),
            )
        )
    return stages


# --------------------------------------------------------------------------- accounting


@functools.cache
def _memoise_opacus_rdp() -> None:
    """Memoise Opacus's per-order RDP of the sampled Gaussian mechanism (once per process).

    ``opacus.accountants.analysis.rdp._compute_rdp(q, sigma, alpha)`` is a pure function of its
    three numbers, evaluated in pure Python (a slowly converging series at fractional orders:
    about 9 ms per order at q = 0.5). Every RDP epsilon and every PRV domain size (Opacus bounds
    the PRV grid with RDP) evaluates it at about 150 orders, and a DP stage asks for epsilon many
    times at the same (q, sigma): the calibration's search, the ledger, each epoch, the report.
    Opacus has no cache, so one is added around that function: it returns exactly what Opacus
    computes (tests/test_ledger.py), in half the time for the demo's DP stage.
    """
    from opacus.accountants.analysis import rdp

    rdp._compute_rdp = functools.lru_cache(maxsize=65536)(rdp._compute_rdp)


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    _memoise_opacus_rdp()
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def _prv_domain_size(accountant: PRVAccountant, eps_error: float, delta_error: float) -> int:
    # Opacus has no cost control: the grid it allocates is sized by _get_domain (the
    # private helper get_epsilon itself uses), so ask it first.
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in accountant.history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RDP "optimal order is the largest alpha" noise
        domain = accountant._get_domain(
            prvs=prvs,
            num_self_compositions=[steps for _, _, steps in accountant.history],
            eps_error=eps_error,
            delta_error=delta_error,
        )
    return int(domain.size)


def _prv_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import PRVAccountant

    _memoise_opacus_rdp()
    accountant = PRVAccountant()
    accountant.history = list(history)
    delta_error = delta * PRV_DELTA_ERROR_RATIO
    eps_error = PRV_EPS_ERROR
    size = _prv_domain_size(accountant, eps_error, delta_error)
    if size > PRV_MAX_DOMAIN_SIZE:
        # The mesh is proportional to eps_error, so this shrinks the grid to about the
        # limit. eps_upper still includes the (larger) eps_error: still an upper bound.
        eps_error *= 1.05 * size / PRV_MAX_DOMAIN_SIZE
        warnings.warn(
            f"PRV accounting for {history} would need {size} grid points; using "
            f"eps_error={eps_error:.3g} instead of {PRV_EPS_ERROR} (result stays an "
            "upper bound)",
            RuntimeWarning,
            stacklevel=4,
        )
    failure: BaseException | str
    try:
        # q = 1 makes Opacus take log(0); huge losses overflow exp. Both are handled by
        # np.where in Opacus; the result is checked below.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            eps = float(accountant.get_epsilon(delta=delta, eps_error=eps_error, delta_error=delta_error))
        if math.isfinite(eps):
            return eps
        failure = f"non-finite epsilon {eps}"
    except (RuntimeError, ValueError, FloatingPointError, MemoryError) as err:
        # e.g. "Cannot compute epsilon" (tiny sigma, large delta), "Floating point errors
        # will dominate" (tiny delta), "Discrete mean differs significantly".
        failure = err
    warnings.warn(
        f"PRV accountant failed for {history} at delta={delta} ({failure!s}); reporting the RDP upper bound instead",
        RuntimeWarning,
        stacklevel=4,
    )
    return _rdp_epsilon(history, delta)


def _epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    eps = _rdp_epsilon(history, delta) if accountant == "rdp" else _prv_epsilon(history, delta)
    if math.isnan(eps):
        raise RuntimeError(f"{accountant} accountant returned NaN for {history}")
    # PRV's estimate can dip below 0 when nothing is spent; (0, delta)-DP then holds.
    return max(eps, 0.0)


def compute_epsilon(
    sample_rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str = "prv"
) -> float:
    """Epsilon spent by ``steps`` DP-SGD steps with Poisson sampling (an upper bound).

    Args:
        sample_rate: Poisson sampling rate q in (0, 1] (expected batch size / dataset size).
        noise_multiplier: sigma > 0, noise std divided by the clipping norm.
        steps: number of optimiser steps (>= 1).
        delta: target delta in (0, 1).
        accountant: ``"prv"`` (tight, default) or ``"rdp"`` (looser, cheap).

    Returns:
        epsilon such that the run is (epsilon, delta)-DP. For ``"prv"`` this is Opacus's
        ``eps_upper`` (estimate + eps_error); if the PRV numerics fail, the RDP bound
        (with a ``RuntimeWarning``).

    Raises:
        ValueError: an argument is out of range.
    """
    stage = (_check_noise_multiplier(noise_multiplier), _check_sample_rate(sample_rate), _check_steps(steps))
    return _epsilon([stage], _check_delta(delta), _check_accountant(accountant))


def compose_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str = "prv") -> float:
    """Epsilon of a sequence of DP-SGD stages on the same data (the privacy ledger).

    The stages are loaded into one Opacus accountant and composed by the accountant
    itself (RDP: Renyi divergences added per order; PRV: privacy-loss distributions
    convolved), which is much tighter than adding the stages' epsilons.

    Args:
        history: stages as ``(noise_multiplier, sample_rate, steps)``, the format of
            Opacus's ``accountant.history`` / ``state_dict()["history"]``. Empty means no
            privacy spent.
        delta: target delta in (0, 1).
        accountant: ``"prv"`` or ``"rdp"``.

    Returns:
        epsilon of the composition (an upper bound), 0.0 for an empty history.

    Raises:
        ValueError: a stage or argument is out of range.
    """
    stages = _check_history(history)
    return _epsilon(stages, _check_delta(delta), _check_accountant(accountant))


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (up to ``epsilon_tolerance``) that keeps epsilon <= target.

    Wraps Opacus's ``get_noise_multiplier`` (doubling then bisection on sigma) and checks
    the result with :func:`compute_epsilon`.

    Args:
        target_epsilon: privacy budget epsilon (> 0).
        delta: target delta in (0, 1).
        sample_rate: Poisson sampling rate q in (0, 1].
        steps: number of optimiser steps planned (>= 1).
        accountant: ``"prv"`` or ``"rdp"``.
        epsilon_tolerance: absolute precision of the search in epsilon units (Opacus's
            semantics), in (0, target_epsilon): the achieved epsilon lies in
            [target_epsilon - epsilon_tolerance, target_epsilon] unless sigma had to be
            rounded up.

    Returns:
        noise multiplier sigma with ``compute_epsilon(sample_rate, sigma, steps, delta,
        accountant) <= target_epsilon``.

    Raises:
        ValueError: an argument is out of range, or the target cannot be reached with a
            noise multiplier <= ``MAX_NOISE_MULTIPLIER`` (the message says what would work).
    """
    target = _check_epsilon(target_epsilon, "target_epsilon")
    delta = _check_delta(delta)
    q = _check_sample_rate(sample_rate)
    steps = _check_steps(steps)
    accountant = _check_accountant(accountant)
    tol_expected = f"a number in (0, target_epsilon={target:g})"
    tol = _as_real("epsilon_tolerance", epsilon_tolerance, tol_expected)
    if tol <= 0.0:
        raise ConfigError(f"epsilon_tolerance must be {tol_expected}, got {epsilon_tolerance!r}")

    # Opacus doubles sigma up to 1e6 before giving up with "The privacy budget is too
    # low."; decide reachability at a sane sigma first, and say what would work.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps_at_max = _epsilon([(MAX_NOISE_MULTIPLIER, q, steps)], delta, accountant)
    if eps_at_max > target:
        floor = {
            "prv": f"PRV adds its eps_error ({PRV_EPS_ERROR}) to every estimate",
            "rdp": "the RDP orders stop at 63, which bounds the smallest certifiable epsilon",
        }[accountant]
        raise ConfigError(
            f"target_epsilon={target:g} is unreachable: even noise_multiplier="
            f"{MAX_NOISE_MULTIPLIER:g} gives epsilon={eps_at_max:.4g} with sample_rate="
            f"{q:g}, steps={steps}, delta={delta:g} ({accountant} accountant; {floor}). "
            f"Use a larger target_epsilon (> {eps_at_max:.4g}), fewer steps, a smaller "
            "sample_rate or a larger delta" + (", or accountant='prv'" if accountant == "rdp" else "") + "."
        )

    if tol >= target:
        raise ConfigError(f"epsilon_tolerance must be {tol_expected}, got {epsilon_tolerance!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # RDP first (milliseconds, an upper bound): the accountant's own estimate only when it may pass
        floor = [(MIN_NOISE_MULTIPLIER, q, steps)]
        eps_at_min = _rdp_epsilon(floor, delta)
        if eps_at_min <= target and accountant != "rdp":
            eps_at_min = _epsilon(floor, delta, accountant)
    if eps_at_min <= target:
        warnings.warn(
            f"target_epsilon={target:g} is met by the smallest searched noise_multiplier="
            f"{MIN_NOISE_MULTIPLIER:g} (epsilon={eps_at_min:.4g}): using it",
            RuntimeWarning,
            stacklevel=2,
        )
        return MIN_NOISE_MULTIPLIER
    # an absolute tolerance far below the target makes the bisection chase float precision
    tol = max(tol, 1e-3 * target)

    from opacus.accountants.utils import get_noise_multiplier

    _memoise_opacus_rdp()

    kwargs = {}
    if accountant == "prv":
        kwargs = {"eps_error": PRV_EPS_ERROR, "delta_error": delta * PRV_DELTA_ERROR_RATIO}
    try:
        quiet = np.errstate(divide="ignore", invalid="ignore", over="ignore")
        with warnings.catch_warnings(), quiet:
            warnings.simplefilter("ignore")
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=target,
                    target_delta=delta,
                    sample_rate=q,
                    steps=steps,
                    accountant=accountant,
                    epsilon_tolerance=tol,
                    **kwargs,
                )
            )
    except (RuntimeError, ValueError, FloatingPointError, MemoryError) as err:
        raise ConfigError(
            f"noise calibration for target_epsilon={target:g} failed in the {accountant} "
            f"accountant ({err}); try accountant='rdp', a smaller target_epsilon or more "
            "steps"
        ) from err
    # eps(MAX_NOISE_MULTIPLIER) <= target was checked above.
    sigma = min(sigma, MAX_NOISE_MULTIPLIER)

    # Verify with the same code that reports epsilon (get_noise_multiplier does not, and
    # our PRV guard/fallback may differ from its bare get_epsilon): round sigma up if needed.
    eps = _epsilon([(sigma, q, steps)], delta, accountant)
    while eps > target and sigma < MAX_NOISE_MULTIPLIER:
        sigma = min(sigma * 1.01, MAX_NOISE_MULTIPLIER)
        eps = _epsilon([(sigma, q, steps)], delta, accountant)
    if eps > target:  # pragma: no cover - excluded by the reachability check
        raise RuntimeError(f"calibration failed: epsilon {eps} > target {target}")
    return sigma


def calibrate_noise_after(
    prior: Sequence[tuple[float, float, int]],
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
) -> float:
    """Noise multiplier for ``steps`` more steps so that the whole ledger stays within the target.

    Without earlier stages this is :func:`calibrate_noise` (Opacus's search). With earlier
    stages on the same data (a DP-fine-tuned autoencoder, an interrupted run) the composition
    must include them, which Opacus's search cannot do: bisect on sigma with
    :func:`compose_epsilon`, rounding sigma up.

    Args:
        prior: ``(noise_multiplier, sample_rate, steps)`` of the earlier stages.
        target_epsilon: budget of the whole ledger.
        delta: target delta.
        sample_rate: Poisson rate of the new stage.
        steps: planned steps of the new stage.
        accountant: ``"prv"`` or ``"rdp"``.

    Returns:
        the noise multiplier.
    """
    if not prior:
        return calibrate_noise(target_epsilon, delta, sample_rate, steps, accountant)
    spent = compose_epsilon(list(prior), delta, accountant)
    if spent >= target_epsilon:
        raise ConfigError(
            f"target_epsilon={target_epsilon:g} is already spent by earlier stages on this data (epsilon={spent:.4g}); "
            "raise target_epsilon or fine-tune from a non-private autoencoder"
        )
    low, high = 0.05, calibrate_noise(target_epsilon - spent, delta, sample_rate, steps, accountant) * 4
    if compose_epsilon([*prior, (high, sample_rate, steps)], delta, accountant) > target_epsilon:
        raise ConfigError(f"target_epsilon={target_epsilon:g} cannot be reached after the earlier stages ({spent:.4g})")
    for _ in range(30):
        mid = 0.5 * (low + high)
        if compose_epsilon([*prior, (mid, sample_rate, steps)], delta, accountant) > target_epsilon:
            low = mid
        else:
            high = mid
        if high - low < 5e-3 * high:  # each evaluation composes PRVs (~1-2 s): a coarse sigma, rounded up
            break
    return high


# --------------------------------------------------------------------------- CLI


def _cli_epsilon(
    sample_rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str = "prv"
) -> None:
    """Print the epsilon of a DP-SGD run as JSON.

    Args:
        sample_rate: Poisson sampling rate in (0, 1].
        noise_multiplier: noise std / max_grad_norm (> 0).
        steps: optimiser steps (integer >= 1).
        delta: target delta in (0, 1).
        accountant: prv (tight) or rdp.
    """
    eps = compute_epsilon(sample_rate, noise_multiplier, steps, delta, accountant)
    record = {
        "sample_rate": _check_sample_rate(sample_rate),
        "noise_multiplier": _check_noise_multiplier(noise_multiplier),
        "steps": _check_steps(steps),
        "delta": _check_delta(delta),
        "accountant": _check_accountant(accountant),
        "epsilon": eps,
    }
    print(json.dumps(record))


def _cli_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
) -> None:
    """Print the noise multiplier reaching a target epsilon, and the epsilon achieved, as JSON.

    Args:
        target_epsilon: privacy budget (> 0).
        delta: target delta in (0, 1).
        sample_rate: Poisson sampling rate in (0, 1].
        steps: optimiser steps planned (integer >= 1).
        accountant: prv (tight) or rdp.
        epsilon_tolerance: absolute precision of the search, in epsilon units.
    """
    sigma = calibrate_noise(target_epsilon, delta, sample_rate, steps, accountant, epsilon_tolerance)
    record = {
        "target_epsilon": float(target_epsilon),
        "delta": float(delta),
        "sample_rate": float(sample_rate),
        "steps": int(steps),
        "accountant": accountant.lower(),
        "epsilon_tolerance": float(epsilon_tolerance),
        "noise_multiplier": sigma,
        "epsilon": compute_epsilon(sample_rate, sigma, steps, delta, accountant),
    }
    print(json.dumps(record))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the calculator CLI (``epsilon`` / ``noise`` subcommands).

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        0 on success, 2 on invalid input (message on stderr). Fire's own usage errors
        exit with code 2 as well.
    """
    import fire

    try:
        fire.Fire(
            {"epsilon": _cli_epsilon, "noise": _cli_noise},
            command=None if argv is None else list(argv),
            name="scripts.privacy",
        )
    except ValueError as err:
        # User errors: a one-line message, no traceback (fire would let it propagate).
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
