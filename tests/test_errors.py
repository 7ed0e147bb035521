"""scripts/errors.py: option checks and the compact report of the bundle's own errors (real bundle runs)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import AE, ROOT, TINY
from scripts.errors import BundleError, ConfigError, DataError, check_options, compact_report


@pytest.mark.parametrize(
    "options, message",
    [
        ({"epochs": "abc"}, "option --epochs: expected an integer >= 1, got 'abc'"),
        ({"epochs": 2.5}, "option --epochs: expected an integer >= 1, got 2.5"),
        ({"lr": "abc"}, "option --lr: expected a number > 0, got 'abc'"),
        ({"lr": 0}, "option --lr: expected a number > 0, got 0"),
        ({"seed": -1}, "option --seed: expected an integer >= 0, got -1"),
        ({"num_workers": True}, "option --num_workers: expected an integer >= 0, got True"),
    ],
)
def test_check_options_names_option_and_form(options, message):
    with pytest.raises(ConfigError) as err:
        check_options(**options)
    assert str(err.value) == message


def test_check_options_accepts_good_values():
    check_options(epochs=3, lr=1e-4, seed=0, num_workers=0, kl_weight=0.0, batch_size=2.0)


def test_compact_report_only_for_bundle_errors():
    try:
        try:
            raise DataError("f.nii.gz: field 'image': volume contains NaN or inf voxels")
        except DataError as e:
            raise RuntimeError("applying transform <CheckVolumed>") from e
    except RuntimeError as wrapped:
        report = compact_report(wrapped)
    lines = report.splitlines()
    assert lines[-1] == "error: f.nii.gz: field 'image': volume contains NaN or inf voxels"
    assert "while: RuntimeError: applying transform <CheckVolumed>" in report and len(lines) <= 5
    assert compact_report(KeyError("bug")) is None  # not the bundle's own: full traceback
    assert issubclass(DataError, BundleError) and issubclass(DataError, ValueError)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=dict(os.environ, OMP_NUM_THREADS="1", **env),
    )


def test_hook_is_compact_for_bundle_errors_and_keeps_tracebacks_of_bugs():
    bundle_error = "import scripts\nfrom scripts.errors import DataError\nraise DataError('x.csv, line 2: bad')"
    proc = _python(bundle_error)
    assert proc.returncode == 1 and proc.stderr.splitlines()[-1] == "error: x.csv, line 2: bad"
    assert "Traceback" not in proc.stderr
    assert "Traceback (most recent call last)" in _python(bundle_error, CARDIAC_LDM_TRACEBACK="1").stderr
    bug = _python("import scripts\n{}['missing']")
    assert bug.returncode == 1 and "Traceback (most recent call last)" in bug.stderr and "KeyError" in bug.stderr


def test_bundle_run_with_wrong_type_override_ends_with_the_problem(bundle, tmp_path, cohorts):
    """--epochs abc: a few lines whose last names the option and its form (was a TypeError deep in Ignite)."""
    proc = bundle(
        "run",
        "training",
        "--config_file",
        AE,
        "--dataset_dir",
        str(cohorts["public"]),
        "--bundle_root",
        str(tmp_path),
        *TINY,
        "--epochs",
        "abc",
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "error: option --epochs: expected an integer >= 1, got 'abc'"
    assert "Traceback" not in proc.stderr and len(lines) < 20


def _bundle_error_classes() -> set[type]:
    """Every subclass of BundleError the package defines (all its modules imported)."""
    import importlib
    import pkgutil

    import scripts

    for module in pkgutil.walk_packages(scripts.__path__, "scripts."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found, todo = set(), [BundleError]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.add(sub)
            todo.append(sub)
    return found


def test_no_bundle_checked_error_prints_a_traceback(capsys):
    """Each kind of bundle error, raised inside the wrappers MONAI's config runner and Ignite put around it,
    reaches the user as a few lines ending in ``error: <message>``, without a traceback."""
    from scripts.errors import excepthook

    classes = _bundle_error_classes()
    assert {"ConfigError", "DataError", "ReleaseError", "TrackingServerError", "OutputWriteError"} <= {
        c.__name__ for c in classes
    }
    for cls in sorted(classes, key=lambda c: c.__name__):
        try:
            try:
                try:
                    raise cls("x.csv, line 2: bad")
                except BundleError as inner:  # what ConfigExpression.evaluate does
                    raise RuntimeError("Failed to evaluate ConfigExpression: $scripts.stage()") from inner
            except RuntimeError as middle:  # what the bundle's run() does with an instantiation error
                raise RuntimeError("Failed to instantiate component 'scripts.Stage'") from middle
        except RuntimeError as outer:
            excepthook(type(outer), outer, outer.__traceback__)
        err = capsys.readouterr().err
        assert err.splitlines()[-1] == "error: x.csv, line 2: bad", (cls, err)
        assert "Traceback" not in err and len(err.splitlines()) < 10, (cls, err)
