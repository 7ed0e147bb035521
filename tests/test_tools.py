"""The developer tools (``tools/``: make demo, make pretrain) stay outside the bundle the Model Zoo archive holds."""

from __future__ import annotations

import ast
import json

from conftest import ROOT
from scripts.release import _archive_files


def test_archive_holds_the_bundle_and_not_the_tools():
    members = {inside for _, inside in _archive_files(ROOT)}
    assert "scripts/cohort_table.py" in members and "configs/phantom.yaml" in members
    assert not [m for m in members if m.startswith("tools/")]
    assert not {"scripts/demo.py", "scripts/summary.py", "scripts/pretrained.py"} & members


def test_the_bundle_never_imports_the_tools():
    """A downloaded bundle has no tools/: neither its code nor its configs may reach for it."""
    for path in sorted((ROOT / "scripts").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not [n for n in names if n == "tools" or n.startswith("tools.")], f"{path} imports {names}"
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        assert "tools." not in config.read_text(), f"{config} refers to tools/"


def test_provenance_names_bundle_commands_not_the_runner_module():
    """The shipped record stays true across the runner's move: it names ``make pretrain`` and bundle commands only."""
    from tools.demo import pretrain_steps

    ship = pretrain_steps(out="models/demo")[-1]
    assert ship.module == "tools.pretrained"
    settings = json.loads(ship.argv[ship.argv.index("--settings") + 1])
    committed = json.loads((ROOT / "models" / "demo" / "PROVENANCE.json").read_text())
    for record in (settings, committed):
        commands = [record["data_command"], *record["stage_commands"].values()]
        assert all(c.startswith("python -m monai.bundle ") for c in commands), commands
        assert not [c for c in commands if "scripts.demo" in c or "tools." in c]
    assert committed["command"] == "make pretrain"
