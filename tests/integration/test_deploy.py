"""What the deployment files refer to, checked offline against the service, and what Prometheus
and Grafana read: the scrape targets, the Grafana provisioning and the dashboard's queries.

Where a file refers to the service (a probe path, an MSFLOW_* setting, a metric in a
dashboard), the reference is checked against the service itself: its FastAPI routes, its
``Settings`` fields and the metrics declared in ``service/metrics.py``.

The containers' and Kubernetes' own files are checked in ``test_deploy_container`` and
``test_deploy_kubernetes``; the readers of all of them live in ``deployment_files``.
"""

from __future__ import annotations

import json
import re

import pytest

from deployment_files import (DASHBOARD, GRAFANA, ROOT, TARGET_LABELS, bind_mounts, container_ports,
                              dashboard_queries, exported_series, final_stage, k8s, pod_container,
                              prometheus_targets, promql_grouping_labels, promql_selectors, services)

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the deployment files")

# MSFLOW_* variables the deployment sets for parts of the service still being written
# (a setting the worker will read). Any other MSFLOW_* name must be a Settings field:
# pydantic-settings ignores unknown variables, so a typo would otherwise pass silently.
PENDING_SETTINGS: set[str] = set()
# Metrics the dashboard shows that the service has been asked to export.
PENDING_METRICS: set[str] = set()


# ====================================================================== against the service
@pytest.fixture(scope="module")
def app_routes(tmp_path_factory) -> set[tuple[str, str]]:
    """(method, path) of every route of the real FastAPI app (built, not started)."""
    from service.api.app import create_app
    from service.config import Settings

    app = create_app(Settings(model_store=tmp_path_factory.mktemp("empty-store")))
    routes = set()
    pending = list(app.routes)
    while pending:  # included APIRouters are kept as their own route lists by recent FastAPI
        r = pending.pop()
        inner = getattr(r, "original_router", None)
        if inner is not None:
            pending.extend(inner.routes)
        for m in getattr(r, "methods", None) or ():
            routes.add((m, r.path))
    return routes


def test_probe_and_scrape_paths_are_real_routes(app_routes):
    gets = {p for m, p in app_routes if m == "GET"}
    dep = k8s("Deployment", "msflow-api")
    c = pod_container(dep)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] in gets, probe
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] in gets
    for job, host, _, path in prometheus_targets():
        if host == "api":
            assert path in gets, job
    assert re.search(r"/healthz", final_stage().last("HEALTHCHECK").args) and "/healthz" in gets
    api_hc = " ".join(services()["api"]["healthcheck"]["test"])
    assert re.search(r"https?://[^/]+(/\w+)", api_hc).group(1) in gets


def test_locustfile_uses_real_routes(app_routes):
    source = (ROOT / "loadtests" / "locustfile.py").read_text()
    assert ("POST", "/v1/inspect/{category}") in app_routes and 'f"/v1/inspect/{category}"' in source
    assert ("GET", "/v1/models") in app_routes and "/v1/models" in source
    assert ("GET", "/readyz") in app_routes and "/readyz" in source


def _settings_fields() -> set[str]:
    from service.config import Settings

    return {f"MSFLOW_{name.upper()}" for name in Settings.model_fields}


def test_every_msflow_variable_the_deployment_sets_is_a_setting():
    fields = _settings_fields()
    used: dict[str, str] = {}
    for key in final_stage().env():
        used.setdefault(key, "Dockerfile")
    for name in ("api", "worker"):
        for key in services()[name].get("environment", {}):
            used.setdefault(key, f"compose {name}")
    for key in k8s("ConfigMap", "msflow-config")["data"]:
        used.setdefault(key, "k8s ConfigMap")
    for key in k8s("Secret", "msflow-secrets")["stringData"]:
        used.setdefault(key, "k8s Secret")
    unknown = {k: where for k, where in used.items()
               if k.startswith("MSFLOW_") and k not in fields and k not in PENDING_SETTINGS}
    assert not unknown, f"not service settings (typo?): {unknown}"


# ====================================================================== Prometheus and Grafana
def test_prometheus_scrapes_api_and_workers_on_their_ports():
    targets = prometheus_targets()
    svc = services()
    scraped = {host for _, host, _, _ in targets}
    assert {"api", "worker"} <= scraped
    for job, host, port, _ in targets:
        if host in svc:
            assert port in container_ports(svc[host]), f"{job}: {host}:{port} is not a port of service {host}"
    worker_port = int(svc["worker"]["environment"]["MSFLOW_WORKER_METRICS_PORT"])
    assert ("worker", worker_port) in {(h, p) for _, h, p, _ in targets}
    mounts = dict((t, s) for s, t in bind_mounts(svc["prometheus"]))
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"


def test_grafana_provisioning_matches_the_mounts_and_prometheus():
    svc = services()["grafana"]
    mounts = {s: t for s, t in bind_mounts(svc)}
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    prom = [d for d in ds["datasources"] if d["type"] == "prometheus"]
    assert len(prom) == 1
    prom_port = next(iter(container_ports(services()["prometheus"])))
    assert prom[0]["url"] == f"http://prometheus:{prom_port}"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "msflow.yml").read_text())["providers"]
    assert providers[0]["options"]["path"] == mounts["./deploy/grafana/dashboards"]
    assert mounts["./deploy/grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    assert mounts["./deploy/grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    dash = json.loads(DASHBOARD.read_text())
    uids = {json.dumps(p.get("datasource"), sort_keys=True) for p in dash["panels"]}
    assert uids == {json.dumps({"type": "prometheus", "uid": prom[0]["uid"]}, sort_keys=True)}


def test_promql_selector_parser():
    sel = promql_selectors('histogram_quantile(0.95, sum by (le, engine) (rate(x_bucket{category=~"$c", a="{b}"}'
                           '[$__rate_interval]))) / clamp_min(sum(rate(y_total[5m])), 1e-9) + up')
    assert sel == [("x_bucket", {"category", "a"}), ("y_total", set()), ("up", set())]


def test_dashboard_is_valid_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for wanted in ("latency", "batch size", "queue depth", "anomaly rate", "engine", "gpu memory", "images / s"):
        assert wanted in titles, f"dashboard lacks a {wanted!r} panel"
    exprs = " ".join(e for _, e in dashboard_queries())
    for q in ("0.50", "0.95", "0.99"):
        assert f"histogram_quantile({q}" in exprs
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for t in p["targets"]:
            assert promql_selectors(t["expr"]), f"{p['title']}: no metric in {t['expr']!r}"


def test_dashboard_metrics_are_exported_by_the_service():
    series = exported_series()
    missing, bad_labels = [], []
    for title, expr in dashboard_queries():
        for name, labels in promql_selectors(expr):
            if name == "up":
                assert labels <= TARGET_LABELS | {"app_kubernetes_io_part_of"}, (title, labels)
                continue
            if name in PENDING_METRICS:
                continue
            if name not in series:
                missing.append(f"{title}: {name}")
            elif labels - series[name] - TARGET_LABELS:
                bad_labels.append(f"{title}: {name} has no label(s) {sorted(labels - series[name] - TARGET_LABELS)}")
    assert not missing, f"metrics the service does not export: {missing}"
    assert not bad_labels, bad_labels


def test_dashboard_groups_and_legends_by_labels_its_series_have():
    """A ``sum by (le, engine)`` over a series without ``engine``, or a legend's ``{{engine}}``
    that the aggregation dropped, draws one unlabelled line and no error: every label a query
    groups by is one of the series it reads, and every legend label one its result keeps."""
    series = exported_series()
    legends = {(p["title"], t["expr"]): t.get("legendFormat", "") for p in json.loads(DASHBOARD.read_text())["panels"]
               for t in p.get("targets", [])}
    wrong = []
    for title, expr in dashboard_queries():
        read = set().union(*(series.get(name, labels) for name, labels in promql_selectors(expr)))
        read |= TARGET_LABELS | {"app_kubernetes_io_part_of"}
        grouped = promql_grouping_labels(expr)
        if grouped - read:
            wrong.append(f"{title}: grouped by {sorted(grouped - read)}, which {expr!r} does not read")
        kept = grouped if re.search(r"\b(sum|max|min|avg|count)\s*(by\s*\([^)]*\)\s*)?\(", expr) else read
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legends.get((title, expr), "")))
        if legend - kept:
            wrong.append(f"{title}: legend {sorted(legend - kept)} not in the result of {expr!r}")
    assert wrong == []


def test_dashboard_requested_metrics_are_exported():
    """Metrics the dashboard shows that the service was asked to add (see PENDING_METRICS)."""
    series = exported_series()
    used = {n for _, e in dashboard_queries() for n, _ in promql_selectors(e)} & PENDING_METRICS
    absent = sorted(used - set(series))
    assert not absent, f"requested from the service, not exported: {absent}"
