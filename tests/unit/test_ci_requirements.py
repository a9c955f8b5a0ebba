"""What CI needs is installed by CI, and under CI=true a missing tool fails instead of skipping."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import missing

ROOT = Path(__file__).resolve().parents[2]


def test_ci_installs_redis_the_browser_and_wrk_before_the_tests() -> None:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert "export CI=true" in lines
    order = [next(i for i, line in enumerate(lines) if needle in line)
             for needle in ("install-redis.sh", "install-browser.sh", "install-wrk.sh", "scripts/test.sh")]
    assert order == sorted(order), lines
    for tool, name in (("redis-server", "install-redis.sh"), ("wrk", "install-wrk.sh")):
        script = (ROOT / "scripts" / name).read_text()
        assert f"command -v {tool}" in script and "apt-install.sh" in script, name


def test_missing_tools_skip_locally_and_fail_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        missing("no redis-server")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: required"):
        missing("no redis-server")
