"""Every ``MSFLOW_*`` variable the code reads is a setting; unknown ones are named at start-up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service import config
from service.config import Settings, largest_heatmap_png_bytes, unknown_env, warn_unknown_env

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
        names = set(re.findall(r"MSFLOW_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
        if path == ROOT / "service" / "config.py":
            names -= config.PROJECT_VARIABLES  # named there only to be let through
        read |= names
    assert read - known == set(), "read but no setting"


def test_the_projects_own_other_variables_pass_without_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """`MSFLOW_DEMO_CATEGORIES=brick ./scripts/demo.sh` logged its own variable as ignored;
    the scripts', compose's and tools' variables pass, a typo still warns."""
    env = {"MSFLOW_DEMO_CATEGORIES": "brick", "MSFLOW_DEMO_FULL": "0", "MSFLOW_TORCH_SPEC": "torch==2.5",
           "MSFLOW_VARIANT": "cpu", "MSFLOW_DEMO_CATEGORIE": "brick"}
    seen: list[str] = []
    monkeypatch.setattr(config.log, "warning", lambda msg, *args: seen.append(msg % args))
    assert warn_unknown_env(env) == ["MSFLOW_DEMO_CATEGORIE"]
    assert len(seen) == 1 and "MSFLOW_DEMO_CATEGORIE" in seen[0] and "MSFLOW_DEMO_CATEGORIES" not in seen[0]


def test_each_other_variable_is_read_by_the_project_and_is_no_setting() -> None:
    """The list stays true: every name on it is used outside the server and no setting has it."""
    known = {f"MSFLOW_{name.upper()}" for name in Settings.model_fields}
    assert config.PROJECT_VARIABLES.isdisjoint(known)
    used: set[str] = set()
    places = [ROOT / "docker-compose.yml", ROOT / "deploy" / "env.example", *ROOT.joinpath("scripts").iterdir(),
              *ROOT.joinpath("loadtests").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py")]
    for path in places:
        if path.is_file() and path != Path(__file__).resolve():
            used |= set(re.findall(r"MSFLOW_[A-Z0-9_]*[A-Z0-9]", path.read_text(errors="replace")))
    assert config.PROJECT_VARIABLES - used == set(), "listed but used nowhere"


def test_the_development_admin_switch_is_refused_off_loopback() -> None:
    assert Settings(dev_open_admin=True).dev_open_admin  # default host: 127.0.0.1
    with pytest.raises(ValueError, match="loopback"):
        Settings(dev_open_admin=True, host="0.0.0.0")


def test_example_keys_are_refused() -> None:
    for field in ("api_keys", "admin_api_keys"):
        with pytest.raises(ValueError, match="change-me"):
            Settings(**{field: "real-key-1,change-me-admin-key"})
    assert Settings(api_keys="a-real-key").api_keys == ["a-real-key"]


def test_an_empty_key_in_a_json_list_is_refused() -> None:
    """'["k", ""]' (a template whose variable was unset) started a server holding an empty key;
    the comma form drops empty parts, as it always did."""
    for field in ("api_keys", "admin_api_keys"):
        for value in ('["a-real-key", ""]', '["a-real-key", "  "]'):
            with pytest.raises(ValueError, match="empty"):
                Settings(**{field: value})
    assert Settings(api_keys="a-real-key,,").api_keys == ["a-real-key"]


def test_the_deployment_examples_carry_only_refused_keys() -> None:
    """The env example and the k8s secret template must never start a server as they are."""
    env = dict(line.split("=", 1) for line in ROOT.joinpath("deploy/env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    secret = ROOT.joinpath("deploy/k8s/secret.yaml").read_text()
    for name in ("MSFLOW_API_KEYS", "MSFLOW_ADMIN_API_KEYS"):
        assert env[name].startswith(config.PLACEHOLDER_KEY_PREFIX)
        assert re.search(rf"^\s+{name}: {config.PLACEHOLDER_KEY_PREFIX}", secret, re.M), name


def test_a_link_budget_smaller_than_the_largest_heatmap_is_refused() -> None:
    pixels = Settings().max_heatmap_pixels
    assert Settings().heatmap_max_bytes >= largest_heatmap_png_bytes(pixels)  # the defaults hold
    with pytest.raises(ValueError, match="largest heatmap PNG"):
        Settings(heatmap_max_bytes=largest_heatmap_png_bytes(pixels) - 1)
    assert Settings(heatmap_max_bytes=1024 * 1024, max_heatmap_pixels=200_000).heatmap_max_bytes == 1024 * 1024


@pytest.mark.parametrize("grace", ["nan", "NaN"])
def test_a_removal_grace_that_is_not_a_number_is_refused(monkeypatch: pytest.MonkeyPatch, grace: str) -> None:
    # NaN compares False with everything: the watch then never let go of anything, as a
    # negative grace does, while the setting read as if it were a time.
    monkeypatch.setenv("MSFLOW_STORE_REMOVAL_GRACE_S", grace)
    with pytest.raises(ValueError, match="store_removal_grace_s"):
        Settings()
    monkeypatch.setenv("MSFLOW_STORE_REMOVAL_GRACE_S", "-1")
    assert Settings().store_removal_grace_s == -1.0


KEY = "a-real-line-key-42"


@pytest.mark.parametrize("env", [
    {"MSFLOW_REVIEWER_API_KEYS": f"alice:{KEY}"},  # the wrong separator
    {"MSFLOW_REVIEWER_API_KEYS": f'{{"alice": "{KEY}", "b b": "x"}}'},  # a bad name beside a real key
    {"MSFLOW_ADMIN_API_KEYS": f'["{KEY}", ""]'},  # a template's unset variable beside a real key
    {"MSFLOW_API_KEYS": f'["{KEY}", 5'},  # broken JSON
    {"MSFLOW_REDIS_URL": f"http://:{KEY}@redis/0"},  # the model's own check: its whole input
], ids=["reviewer-separator", "reviewer-name", "empty-key", "broken-json", "redis-scheme"])
def test_a_refused_setting_does_not_repeat_its_keys(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """`msflow serve` prints the refusal and the container log keeps it: pydantic's error
    carried the value refused, every key of a list with it (and a Redis URL's password)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as refused:
        Settings()
    assert KEY not in str(refused.value), refused.value
    assert next(iter(env)).removeprefix("MSFLOW_").lower() in str(refused.value) or "redis_url" in str(refused.value)


@pytest.mark.parametrize("field, value", [("reviewer_api_keys", {"alice\n": "k" * 24}),
                                          ("pinned_versions", {"brick\n": "1"})])
def test_a_name_with_a_trailing_newline_is_refused(field: str, value: dict[str, str]) -> None:
    """`re.match` with `$` lets one trailing newline through: a reviewer named "alice\\n" was
    recorded (a line break in every log and label record naming them), and a pin of "brick\\n"
    was accepted and never matched its category, so the pin was silently not in force."""
    with pytest.raises(ValueError, match="must match"):
        Settings(**{field: value})
