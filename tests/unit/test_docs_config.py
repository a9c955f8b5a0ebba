"""The settings' documentation and the deployment files stay equal to ``service/config.py``.

Every setting is listed, with the default the code has, in docs/DESIGN.md "Configuration" (the
one place a platform engineer finds a setting the prose does not name, e.g. ``MSFLOW_PINNED_VERSIONS``),
every ``MSFLOW_*`` name the docs give is one the service or the project reads, and a setting
written in compose's ``.env`` reaches the service's containers: compose reads ``.env`` only to
fill in ``${...}`` in docker-compose.yml, so a setting the file did not name was dropped before
the server's warning about unknown variables could see it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read docker-compose.yml")

ROOT = Path(__file__).resolve().parents[2]
# The services that run the project's image and read its settings.
MSFLOW_SERVICES = ("api", "worker", "trainer")


def _env_files(service: dict[str, Any]) -> list[tuple[str, bool]]:
    """(path, required) of a compose service's ``env_file`` in either of its spellings."""
    entries = service.get("env_file") or []
    entries = [entries] if isinstance(entries, (str, dict)) else entries
    return [(e, True) if isinstance(e, str) else (e["path"], e.get("required", True)) for e in entries]


def test_a_setting_written_in_dot_env_reaches_the_services_containers() -> None:
    """`MSFLOW_LOG_LEVEL=warning` in `.env` (as deploy/env.example says to put settings there)
    must reach the API, not only the variables docker-compose.yml happens to name."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in MSFLOW_SERVICES:
        files = _env_files(services[name])
        assert (".env", False) in files, f"{name}: env_file .env (required: false) missing, has {files}"
