"""Bundle metadata verifies offline against the official MONAI schema and matches the pins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


@pytest.mark.skipif(not SCHEMA.exists(), reason="official schema copy (../shared/schemas) not present")
def test_verify_metadata_against_official_schema(tmp_path, bundle):
    schema = tmp_path / "schema.json"
    shutil.copy(SCHEMA, schema)  # verify_metadata skips the download when the file exists
    proc = bundle("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(schema))
    assert proc.returncode == 0, proc.stderr
    assert "metadata is verified with no error" in proc.stdout + proc.stderr


def test_metadata_versions_match_requirements():
    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    pins = _pins()
    assert meta["monai_version"] == pins["monai"]
    assert meta["pytorch_version"] == pins["torch"]
    for name, version in meta["required_packages_version"].items():
        assert pins[name.lower()] == version, name
    for key in ("name", "task", "description", "authors", "copyright", "data_source", "data_type", "intended_use"):
        assert meta[key]
    assert any("2407.16405" in ref for ref in meta["references"])
    assert "autoencoder_data_format" in meta and "network_data_format" in meta


def test_numpy_version_matches_installed():
    import numpy

    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    assert meta["numpy_version"] == numpy.__version__
