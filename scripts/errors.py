"""The bundle's own errors, option checks, and a compact report of them on the command line.

Every error the bundle raises on purpose (bad input, a bad option, a corrupt or wrong file, an
output that would be replaced) derives from :class:`BundleError`; its message names the file,
field or option and the expected form. A bundle run evaluates the stages through MONAI's config
machinery, which wraps an exception in two or three others ("Failed to instantiate component",
"Failed to evaluate ConfigExpression", "applying transform"), so Python's default report puts
the useful message in the middle of about 60 lines of traceback.

:func:`install_excepthook` (run when the ``scripts`` package is imported, which every bundle
config does) replaces that report **only** for uncaught exceptions whose chain holds a
:class:`BundleError`: a few lines, the last of which names the problem. Any other exception
(a bug) keeps Python's full traceback, and ``CARDIAC_LDM_TRACEBACK=1`` restores the full
traceback for bundle errors too.
"""

from __future__ import annotations

import math
import os
import sys
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = [
    "BundleError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "MissingInputError",
    "OutputExistsError",
    "OutputWriteError",
    "check_options",
    "compact_report",
    "find_bundle_error",
    "install_excepthook",
]

FULL_TRACEBACK_ENV = "CARDIAC_LDM_TRACEBACK"


class BundleError(Exception):
    """Base of the errors the bundle raises on purpose; the message names the file/option and the expected form."""


class DataError(BundleError, ValueError):
    """Bad input data: the message names the file, the field and the expected form."""


class ConfigError(BundleError, ValueError):
    """A bad option or config field: the message names it and the expected form."""


class CheckpointError(BundleError, ValueError):
    """A checkpoint that cannot be read, or one written by another stage: the message names the file."""


class MissingInputError(BundleError, FileNotFoundError):
    """A required input file is missing: the message names it and the stage that writes it."""


class OutputWriteError(BundleError, OSError):
    """An output cannot be written (permissions, a full disk): the message names the path and what to do."""


class OutputExistsError(BundleError, FileExistsError):
    """An output would replace an earlier run's without ``--overwrite True``."""


# ------------------------------------------------------------------------------------ option checks


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def _at_least(parse: Callable[[Any], Any], low: float, strict: bool = False) -> Callable[[Any], Any]:
    """A parser that accepts what ``parse`` accepts when it is >= ``low`` (> with ``strict``)."""

    def check(value: Any) -> Any:
        parsed = parse(value)
        if parsed is None or parsed < low or (strict and parsed == low):
            return None
        return parsed

    return check


class _UnitInterval:
    def __contains__(self, value: float | None) -> bool:
        return value is not None and 0.0 <= value <= 1.0


_UNIT = _UnitInterval()

# form -> (expected form in words, parser returning the value or None when it does not fit)
_FORMS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "integer >= 0": ("an integer >= 0", _at_least(_integer, 0)),
    "integer >= 1": ("an integer >= 1", _at_least(_integer, 1)),
    "number > 0": ("a number > 0", _at_least(_number, 0.0, strict=True)),
    "number >= 0": ("a number >= 0", _at_least(_number, 0.0)),
    # Fire reads only True/False as booleans: `--resume false` arrives as the (true) string 'false'
    "boolean": ("True or False (capitalised)", lambda value: value if isinstance(value, bool) else None),
    "probability": (
        "a number in [0, 1]",
        lambda value: v if (v := _number(value)) is not None and 0 <= v <= 1 else None,
    ),
}


def _in_open_interval(low: float, high: float, closed_high: bool = False) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        v = _number(value)
        return v if v is not None and low < v and (v <= high if closed_high else v < high) else None

    return check


def _epsilon(value: Any) -> Any:
    """A privacy target: a number > 0; ``inf`` passes here so that the ledger can say when it is allowed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        return None
    return float(value)


def _or_none(form: str) -> tuple[str, Callable[[Any], Any]]:
    expected, parse = _FORMS[form]
    return f"{expected}, or None", lambda value: True if value is None else parse(value)


_FORMS["number in (0, 1)"] = ("a number in (0, 1)", _in_open_interval(0.0, 1.0))
_FORMS["number in (0, 1]"] = ("a number in (0, 1]", _in_open_interval(0.0, 1.0, closed_high=True))
_FORMS["epsilon"] = ("a number > 0", _epsilon)
_FORMS["number >= 0 or None"] = _or_none("number >= 0")
_FORMS["integer >= 1 or None"] = _or_none("integer >= 1")


def _one_of(*choices: str) -> tuple[str, Callable[[Any], Any]]:
    return f"one of {', '.join(choices)}", lambda value: value if value in choices else None


# choices the stages check later, with a less direct message, once the networks are built
_FORMS["grad_sample_mode"] = _one_of("auto", "loop", "vmap", "bookkeeping")
_FORMS["finetune_scope"] = _one_of("all", "attention", "conditioning")
_FORMS["privacy_unit"] = _one_of("subject", "record")

#: the expected form of the command-line options that the stages share
OPTION_FORMS: dict[str, str] = {
    "seed": "integer >= 0",
    "epochs": "integer >= 1",
    "batch_size": "integer >= 1",
    "val_batch_size": "integer >= 1",
    "num_workers": "integer >= 0",
    "lr": "number > 0",
    "discriminator_lr": "number > 0",
    "kl_weight": "number >= 0",
    "ssim_weight": "number >= 0",
    "perceptual_weight": "number >= 0",
    "adversarial_weight": "number >= 0",
    "ema_momentum": "number in (0, 1]",
    "target_epsilon": "epsilon",
    "target_delta": "number in (0, 1)",
    "max_grad_norm": "number > 0",
    "noise_multiplier": "number >= 0 or None",
    "max_noise_ratio": "number > 0",
    "beta_start": "number in (0, 1)",
    "beta_end": "number in (0, 1)",
    "guidance_scale": "number >= 0 or None",
    "num_inference_steps": "integer >= 1 or None",
    "preview_count": "integer >= 0",
    "sweep_count": "integer >= 1",
    "passes_per_epoch": "integer >= 1",
    "noise_multiplicity": "integer >= 1",
    "max_physical_batch_size": "integer >= 1",
    "logical_batch_size": "integer >= 1",
    "resume": "boolean",
    "overwrite": "boolean",
    "secure_mode": "boolean",
    "clip_out_of_range": "boolean",
    "condition_dropout": "probability",
    "spacing_tolerance": "number >= 0",
    "grad_sample_mode": "grad_sample_mode",
    "finetune_scope": "finetune_scope",
    "privacy_unit": "privacy_unit",
}


def check_options(**options: Any) -> None:
    """Check command-line options against the form their name calls for (:data:`OPTION_FORMS`).

    ``--epochs abc`` reaches the config as the string ``'abc'``, which otherwise fails deep
    inside Ignite or PyTorch with a TypeError that names neither the option nor its form.

    Args:
        options: ``name=value`` pairs; every name must be a key of :data:`OPTION_FORMS`.

    Raises:
        ConfigError: naming the first bad option, the expected form and the value given.
    """
    for name, value in options.items():
        expected, parse = _FORMS[OPTION_FORMS[name]]
        if parse(value) is None:
            raise ConfigError(f"option --{name}: expected {expected}, got {value!r}")


# --------------------------------------------------------------------------------- compact report


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and its causes / contexts, outermost first (cycles cut)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ if exc.__cause__ is not None else (None if exc.__suppress_context__ else exc.__context__)
    return out


def find_bundle_error(exc: BaseException | None) -> BundleError | None:
    """The innermost :class:`BundleError` in the chain of ``exc`` (its causes and contexts), or None."""
    found = [e for e in _chain(exc) if isinstance(e, BundleError)]
    return found[-1] if found else None


def _first_line(exc: BaseException, width: int = 160) -> str:
    """``Type: message`` on one line, cut to ``width`` characters (MONAI puts the expression on line 2)."""
    line = " ".join(part.strip() for part in str(exc).strip().splitlines() if part.strip())
    return f"{type(exc).__name__}: {line[:width]}{'...' if len(line) > width else ''}"


def compact_report(exc: BaseException) -> str | None:
    """A few lines about ``exc`` when its chain holds a :class:`BundleError`, else None.

    The lines: the exceptions that wrap it (one line each, outermost first), where it was
    raised, and last ``error: <message>``.

    Args:
        exc: an uncaught exception.

    Returns:
        the report, or None for exceptions that are not the bundle's own (they keep the full traceback).
    """
    error = find_bundle_error(exc)
    if error is None:
        return None
    lines = ["The run stopped on a bundle error (set CARDIAC_LDM_TRACEBACK=1 for the full traceback):"]
    for wrapper in _chain(exc):
        if wrapper is error:
            break
        lines.append(f"  while: {_first_line(wrapper)}")
    frames = traceback.extract_tb(error.__traceback__)
    if frames:
        where = frames[-1]
        lines.append(f"  raised at {os.path.relpath(where.filename)}:{where.lineno} ({type(error).__name__})")
    message = str(error).strip() or type(error).__name__
    lines.append(f"error: {message}")
    return "\n".join(lines)


def excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook``: the compact report for bundle errors, Python's default for anything else."""
    report = None if os.environ.get(FULL_TRACEBACK_ENV, "") not in ("", "0") else compact_report(exc)
    if report is None:
        sys.__excepthook__(exc_type, exc, tb)
        return
    sys.stderr.write(report + "\n")
    sys.stderr.flush()


def install_excepthook() -> None:
    """Make :func:`excepthook` the process's ``sys.excepthook`` unless another tool replaced the default."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = excepthook
