"""The import contracts of pyproject's ``[tool.importlinter]`` hold (docs/DESIGN.md, "Import
contracts"): models never imports the service, layers import downwards only, no cycles."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept() -> None:
    pytest.importorskip("importlinter.cli", reason="pip install import-linter (the test extra)")
    # In a process of its own: run in this one, import-linter's logging set-up disabled the
    # loggers that already existed, and later tests' caplog read nothing from them.
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_every_service_package_is_in_a_layer() -> None:
    """A new subpackage of service/ must be placed in the layers contract, or it escapes it."""
    text = (ROOT / "pyproject.toml").read_text()
    for entry in sorted(os.listdir(ROOT / "service")):
        if (ROOT / "service" / entry / "__init__.py").is_file() or entry.endswith(".py") and entry != "__init__.py":
            name = "service." + entry.removesuffix(".py")
            assert f'"{name}' in text or f"| {name}" in text, f"{name} is in no import-linter layer"


def test_the_design_map_names_every_module() -> None:
    """docs/DESIGN.md is the living map: a module it does not name is a part of the architecture
    a newcomer cannot find there (seven had gone unnamed, a moved one among them)."""
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    unnamed = [str(path.relative_to(ROOT)) for folder in ("models", "service", "msflow", "loadtests")
               for path in sorted((ROOT / folder).rglob("*.py"))
               if path.name != "__init__.py" and not re.search(rf"\b{re.escape(path.stem)}\b", design)]
    assert not unnamed, f"docs/DESIGN.md names none of: {unnamed}"


def test_serving_imports_no_trainer() -> None:
    """`msflow serve` builds the whole CLI parser and then the server: neither may import torch
    or scikit-learn (the torch engine imports torch itself, when chosen). A parser that read a
    default from models.recalibrate once put both into every server process: 190,000 more
    objects for each of the collector's full passes, and their memory."""
    code = ("import sys, msflow.cli; msflow.cli.build_parser(); "
            "import service.supervisor, service.server, service.engine_core, service.worker; "
            "print(sorted({'torch', 'sklearn'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
