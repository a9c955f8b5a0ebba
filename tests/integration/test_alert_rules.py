"""The alerting rules (deploy/prometheus/alerts.yml), checked by Prometheus's own promtool and
against the service: the config that loads them is valid, every rule has a unit test that
fires it and keeps it quiet beside a healthy series (tests/promtool/alerts_test.yml), every
metric and label a rule reads is one the service exports, and the Kubernetes form
(deploy/k8s/prometheusrule.yaml) holds the same groups."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deployment_files import (PROMETHEUS_YML, ROOT, TARGET_LABELS, exported_series, k8s, promql_grouping_labels,
                              promql_selectors, services)
from harness import missing

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the deployment files")

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "tests" / "promtool" / "alerts_test.yml"


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing("no promtool: run scripts/install-promtool.sh")
    return path


def run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_prometheus_config_loads_the_rules(promtool: str) -> None:
    """``promtool check config`` reads prometheus.yml and the rule files it names (relative to
    it, as Prometheus does in the compose stack)."""
    assert yaml.safe_load(PROMETHEUS_YML.read_text())["rule_files"] == ["alerts.yml"]
    out = run(promtool, "check", "config", str(PROMETHEUS_YML))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(rules())} rules found" in out.stdout


def test_every_alert_fires_in_its_unit_test_and_stays_quiet_beside_healthy_series(promtool: str) -> None:
    out = run(promtool, "test", "rules", str(ALERT_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
    fired, quiet = set(), set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
            # promtool compares the whole set: a healthy series beside the failing one must be
            # in the input, or "stays quiet" is not tested.
        assert len(case["input_series"]) >= 2, case["name"]
    names = {r["alert"] for r in rules()}
    assert names <= fired, f"alerts no test makes fire: {sorted(names - fired)}"


def test_a_rule_that_would_never_fire_fails_its_unit_test(promtool: str, tmp_path: Path) -> None:
    """The unit test can fail: the same test against rules whose thresholds were raised."""
    changed = ALERTS.read_text().replace("> 0.05", "> 0.5")
    (tmp_path / "deploy" / "prometheus").mkdir(parents=True)
    (tmp_path / "deploy" / "prometheus" / "alerts.yml").write_text(changed)
    (tmp_path / "tests" / "promtool").mkdir(parents=True)
    shutil.copy(ALERT_TESTS, tmp_path / "tests" / "promtool" / "alerts_test.yml")
    out = subprocess.run([promtool, "test", "rules", "tests/promtool/alerts_test.yml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "MsflowInspectErrors" in out.stdout + out.stderr


def test_rules_read_only_metrics_and_labels_the_service_exports() -> None:
    series = exported_series()
    problems = []
    for rule in rules():
        selectors = promql_selectors(rule["expr"])
        assert selectors, rule["alert"]
        for name, labels in selectors:
            if name == "up":
                continue
            if name not in series:
                problems.append(f"{rule['alert']}: {name} is not exported")
            elif labels - series[name] - TARGET_LABELS:
                problems.append(f"{rule['alert']}: {name} has no label(s) {sorted(labels - series[name])}")
        # Grouped by a label no series has: one unlabelled alert for all categories. Named in an
        # annotation but dropped by the aggregation: an empty word in the page.
        read = set().union(*(series.get(n, ls) for n, ls in selectors)) | TARGET_LABELS | {"app_kubernetes_io_part_of"}
        grouped = promql_grouping_labels(rule["expr"])
        if grouped - read:
            problems.append(f"{rule['alert']}: grouped by {sorted(grouped - read)}, which no series it reads has")
        named = {n for text in rule["annotations"].values() for n in re.findall(r"\$labels\.(\w+)", text)}
        kept = grouped or read
        if named - kept:
            problems.append(f"{rule['alert']}: annotations name {sorted(named - kept)}, which the result lacks")
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    assert not problems, problems


def test_compose_mounts_the_rules_beside_the_config() -> None:
    mounts = [v.split(":") for v in services()["prometheus"]["volumes"] if v.startswith("./")]
    targets = {target: source for source, target, *_ in mounts}
    assert targets["/etc/prometheus/alerts.yml"] == "./deploy/prometheus/alerts.yml"
    assert Path(targets["/etc/prometheus/prometheus.yml"]).parent == Path(targets["/etc/prometheus/alerts.yml"]).parent


def test_kubernetes_rules_are_the_same_groups() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "prometheusrule.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rule = k8s("PrometheusRule", "msflow")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_each_api_pod_is_scraped_once() -> None:
    """The pod template carries the prometheus.io annotations and the Service none: both
    annotated, the stock chart's kubernetes-pods and kubernetes-service-endpoints jobs each
    scraped every pod, doubling every rate."""
    pod = k8s("Deployment", "msflow-api")["spec"]["template"]["metadata"]["annotations"]
    assert pod["prometheus.io/scrape"] == "true"
    service = k8s("Service", "msflow-api")["metadata"].get("annotations") or {}
    assert not [k for k in service if k.startswith("prometheus.io/")]
