"""Refuse command-line overrides that the stage's configs do not define, and check their forms.

``python -m monai.bundle run ... --key value`` merges every ``--key`` into the config, defined
there or not: a typo (``--target_epsilon_ 1``, ``--epoch 5``) adds an unused key and the stage
runs with the default, privacy options included. MONAI has no switch against that, so each stage
calls :func:`check_command_line` first: it reads the overrides from ``sys.argv`` (the only place
they are still told apart from the config's own keys), refuses any top-level key that none of
the stage's config files defines, naming the close matches, and checks the value of each
option whose form :data:`OPTION_FORMS` knows, as Fire parsed it.

Only a ``monai.bundle`` command line is checked; a ``ConfigWorkflow`` built in Python (tests,
the Model Zoo's unit tests) passes its overrides as arguments and is left alone. Overrides read
from ``--args_file`` are not checked (MONAI merges them before the config is parsed).
"""

from __future__ import annotations

import ast
import difflib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fire.parser import DefaultParseValue
from monai.bundle import ConfigParser
from monai.bundle import scripts as bundle_scripts
from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS
from scripts.errors import OPTION_FORMS, ConfigError, check_options

__all__ = ["check_command_line", "check_function_options", "command_line", "config_keys", "refuse_unknown"]

# the arguments `monai.bundle run` takes itself (not config overrides)
_RUN_ARGUMENTS = frozenset(
    name
    for fn in (bundle_scripts.run, bundle_scripts.create_workflow)
    for name, p in inspect.signature(fn).parameters.items()
    if p.kind is not inspect.Parameter.VAR_KEYWORD
) | {"workflow_type", "properties_path"}
_BUNDLE_MAIN = os.path.join("monai", "bundle", "__main__.py")


def command_line(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """The positional words and the ``--key value`` / ``--key=value`` pairs of ``argv`` (Fire's reading).

    Args:
        argv: the words after the program name.

    Returns:
        positional words, and the options with their values parsed as Fire parses them
        (a bare ``--flag`` is True).
    """
    words: list[str] = []
    options: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word.startswith("--") and len(word) > 2:
            key, eq, value = word[2:].partition("=")
            if eq:
                options[key] = DefaultParseValue(value)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                options[key] = DefaultParseValue(argv[i + 1])
                i += 1
            else:
                options[key] = True
        else:
            words.append(word)
        i += 1
    return words, options


def _config_files(value: Any) -> list[str]:
    """``--config_file`` as MONAI reads it: a path, a comma-separated string or a list of paths."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = ast.literal_eval(text)
        else:
            return [part for part in text.split(",") if part]
    return [str(v) for v in value]


def config_keys(config_file: Any) -> set[str]:
    """Top-level keys defined by the config files (merged as MONAI merges them), plus ``_meta_``."""
    return set(ConfigParser.load_config_files(_config_files(config_file))) | {"_meta_"}


def refuse_unknown(unknown: Sequence[str], known: set[str], why: str) -> None:
    """Raise :class:`ConfigError` naming each ``unknown`` option with its close matches among ``known``."""
    if not unknown:
        return
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key.split("#", 1)[0], sorted(known), n=3, cutoff=0.6)
        parts.append(f"--{key}" + (f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""))
    raise ConfigError(
        f"unknown option{'s' if len(parts) > 1 else ''} {'; '.join(parts)}: {why}. Fix the spelling"
        + (", or add the key to a config file if it is meant" if "config" in why else "")
    )


def check_function_options(fn: Callable[..., Any], argv: Sequence[str], program: str) -> None:
    """Refuse ``--options`` in ``argv`` that ``fn`` (a Fire entry point) does not take.

    Fire calls the function with the options it knows and complains about the rest only after the
    call returned, so ``python -m scripts.phantom --subject 3`` generated a whole default cohort.
    """
    _, options = command_line(argv)
    known = set(inspect.signature(fn).parameters) | {"help"}
    refuse_unknown([key for key in options if key not in known], known, f"{program} does not take it")


def check_command_line(argv: Sequence[str] | None = None) -> None:
    """Refuse unknown top-level overrides and badly formed option values of a ``monai.bundle`` command.

    Args:
        argv: the process's arguments (default ``sys.argv``); anything but a ``monai.bundle``
            command line is left alone.

    Raises:
        ConfigError: naming each unknown option with its close matches, or the first option whose
            value does not have its form.
    """
    argv = list(sys.argv if argv is None else argv)
    if not argv or not argv[0].endswith(_BUNDLE_MAIN):
        return
    _, options = command_line(argv[1:])
    if "config_file" not in options:  # an --args_file run: the files are named there
        return
    known = config_keys(options["config_file"])
    if options.get("tracking"):
        known |= set(DEFAULT_MLFLOW_SETTINGS["configs"])
    unknown = [key for key in options if key not in _RUN_ARGUMENTS and key.split("#", 1)[0] not in known]
    refuse_unknown(
        unknown, known, f"no config of this stage ({options['config_file']}) defines it, so it would be ignored"
    )
    check_options(**{key: value for key, value in options.items() if key in OPTION_FORMS})
