"""The settings' documentation and the deployment files stay equal to ``service/config.py``.

Every setting is listed, with the default the code has, in docs/DESIGN.md "Configuration" (the
one place a platform engineer finds a setting the prose does not name, e.g. ``MSFLOW_PINNED_VERSIONS``),
every ``MSFLOW_*`` name the docs give is one the service or the project reads, and a setting
written in compose's ``.env`` reaches the service's containers: compose reads ``.env`` only to
fill in ``${...}`` in docker-compose.yml, so a setting the file did not name was dropped before
the server's warning about unknown variables could see it.
Every metric README and DESIGN name (for alerting) is one the service's registry exports, with
those labels (the dashboard's and the alerts' queries: tests/integration/test_deploy.py, test_alert_rules.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from service.config import PROJECT_VARIABLES, Settings

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read docker-compose.yml")

ROOT = Path(__file__).resolve().parents[2]
DESIGN = ROOT / "docs" / "DESIGN.md"
NAME = re.compile(r"MSFLOW_[A-Z0-9_]*[A-Z0-9](?![\w.])")  # not MSFLOW_SPEC.md, a file
ROW = re.compile(r"^\| `MSFLOW_([A-Z0-9_]+)` \| (unset|`([^`]*)`)[^|]*\| (.+) \|$")
# The services that run the project's image and read its settings.
MSFLOW_SERVICES = ("api", "worker", "trainer")


def _configuration_rows() -> dict[str, tuple[str | None, str]]:
    """name (lower case) -> (default as written, None for unset; description) of the table."""
    section = DESIGN.read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str | None, str]] = {}
    for line in section.splitlines():
        m = ROW.match(line)
        if m:
            name = m.group(1).lower()
            assert name not in rows, f"MSFLOW_{m.group(1)} is listed twice"
            rows[name] = (m.group(3), m.group(4).strip())
    return rows


def _default(name: str) -> Any:
    return Settings.model_fields[name].get_default(call_default_factory=True)


def test_every_setting_is_in_the_configuration_table() -> None:
    rows = _configuration_rows()
    assert sorted(set(Settings.model_fields) - set(rows)) == [], "settings docs/DESIGN.md does not list"
    assert sorted(set(rows) - set(Settings.model_fields)) == [], "listed, but no setting"
    assert [n for n, (_, what) in rows.items() if not what] == [], "listed without a description"


def test_the_configuration_table_gives_the_codes_defaults() -> None:
    wrong = []
    for name, (written, _) in _configuration_rows().items():
        default = _default(name)
        if written is None:  # "unset"
            ok = default is None or default == [] or default == {}
        else:  # the value as an operator would write it, read as the variable would be
            ok = getattr(Settings(**{name: written}), name) == default
        if not ok:
            wrong.append(f"MSFLOW_{name.upper()}: docs {written or 'unset'}, code {default!r}")
    assert wrong == []


def test_every_msflow_name_the_docs_give_is_read() -> None:
    """A renamed or removed setting left in the docs would be set and silently do nothing."""
    known = {f"MSFLOW_{name.upper()}" for name in Settings.model_fields} | PROJECT_VARIABLES
    places = [ROOT / "README.md", *ROOT.joinpath("docs").glob("*.md"), ROOT / "deploy" / "env.example",
              *ROOT.joinpath("deploy", "k8s").glob("*.yaml"), ROOT / "docker-compose.yml"]
    unknown = {f"{path.relative_to(ROOT)}: {name}" for path in places
               for name in NAME.findall(path.read_text()) if name not in known}
    assert sorted(unknown) == []


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


def _exported() -> dict[str, set[str]]:
    """Series name -> label names, read from the service's own registry (not from its source)."""
    from service.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    metrics.set_redis_up(True)  # msflow_redis_up is made at the first PING (no Redis: no series)
    out: dict[str, set[str]] = {}
    for collector in list(metrics.registry._collector_to_names):  # every metric the service registers
        name, kind, labels = collector._name, collector._type, set(collector._labelnames)
        if kind == "counter":
            out[f"{name}_total"] = labels
        elif kind in ("histogram", "summary"):
            out.update({name: labels, f"{name}_sum": labels, f"{name}_count": labels, f"{name}_bucket": labels})
        else:
            out[name] = labels
    return out


def test_every_metric_the_docs_name_is_exported_with_its_labels() -> None:
    """README and DESIGN name metrics for alerting (``msflow_review_captures_total{outcome}``):
    each is a series the service exports, with the labels written beside it."""
    exported = _exported()
    wrong = []
    for path in (ROOT / "README.md", DESIGN):
        for name, labels in re.findall(r"\b(msflow_[a-z0-9_]+)(?:\{([^}]*)\})?", path.read_text()):
            wanted = {part.split("=")[0].strip() for part in labels.split(",") if part.strip()}
            if name not in exported:
                wrong.append(f"{path.name}: {name} is not exported")
            elif wanted - exported[name]:
                wrong.append(f"{path.name}: {name} has no label(s) {sorted(wanted - exported[name])}")
    assert wrong == []
