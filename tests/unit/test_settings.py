"""Every ``MSFLOW_*`` variable the code reads is a setting; unknown ones are named at start-up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service import config
from service.config import Settings, unknown_env, warn_unknown_env

ROOT = Path(__file__).resolve().parents[2]


def test_unknown_msflow_variables_are_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"MSFLOW_MAX_BATCH_SIZE": "4", "MSFLOW_MAX_BATCH_SIZ": "4", "PATH": "/bin"}
    assert unknown_env(env) == ["MSFLOW_MAX_BATCH_SIZ"]
    seen: list[str] = []
    monkeypatch.setattr(config.log, "warning", lambda msg, *args: seen.append(msg % args))
    assert warn_unknown_env(env) == ["MSFLOW_MAX_BATCH_SIZ"]
    assert seen and "MSFLOW_MAX_BATCH_SIZ" in seen[0]


def test_every_msflow_variable_in_product_code_is_a_setting() -> None:
    known = {f"MSFLOW_{name.upper()}" for name in Settings.model_fields}
    read = set()
    for path in [*ROOT.joinpath("service").rglob("*.py"), *ROOT.joinpath("msflow").rglob("*.py")]:
        read |= set(re.findall(r"MSFLOW_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    assert read - known == set(), "read but no setting"
