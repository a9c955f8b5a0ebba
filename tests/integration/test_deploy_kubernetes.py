"""The Kubernetes manifests (deploy/k8s), checked offline: valid against the Kubernetes JSON
schemas bundled by kubernetes-validate (and that validation is no no-op), all listed by the
kustomization, and the api's and worker's Deployments, Service, autoscaler and ServiceMonitor
consistent with one another and with the ConfigMap and Secret they read.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from deployment_files import K8S, ROOT, dashboard_queries, k8s, k8s_documents, named_port, pod_container

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the deployment files")

# Kinds without a schema in upstream Kubernetes (CRDs and kustomize's own file).
NON_CORE_API_GROUPS = ("monitoring.coreos.com/", "kustomize.config.k8s.io/")


@pytest.fixture(scope="module")
def kv():
    return pytest.importorskip("kubernetes_validate", reason="kubernetes-validate validates manifests offline")


@pytest.mark.parametrize("version", ["1.29.0", "latest"])
def test_k8s_manifests_validate_against_the_kubernetes_schemas(kv, version):
    version = kv.utils.latest_version() if version == "latest" else version
    validated = 0
    for filename, doc in k8s_documents():
        if doc["apiVersion"].startswith(NON_CORE_API_GROUPS):
            continue
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{filename}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version} "
                        f"at {path}: {e.message}")
        validated += 1
    assert validated >= 8


def test_k8s_validator_rejects_a_broken_manifest(kv):
    """The validation above is not a no-op: a misspelt probe field is caught."""
    doc = json.loads(json.dumps(k8s("Deployment", "msflow-api")))
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/readyz"
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, "1.29.0", strict=True)


def test_kustomization_lists_every_core_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    for name in listed:
        assert (K8S / name).is_file(), name
    core = {f for f, d in k8s_documents() if not d["apiVersion"].startswith(NON_CORE_API_GROUPS)}
    assert core == listed


def test_k8s_api_deployment_gpu_probes_and_drain():
    dep = k8s("Deployment", "msflow-api")
    pod = dep["spec"]["template"]["spec"]
    c = pod_container(dep)
    assert c["image"].split(":")[0] == "msflow"
    assert c["args"] == ["serve"]
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    config = k8s("ConfigMap", "msflow-config")["data"]
    port = int(config["MSFLOW_PORT"])
    assert config["MSFLOW_HOST"] == "0.0.0.0"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert named_port(c, c[probe]["httpGet"]["port"]) == port, probe
    # Drain: preStop sleep, then SIGTERM -> graceful shutdown; the kubelet's grace period
    # must cover both, or batches in flight are killed.
    pre_stop = c["lifecycle"]["preStop"]
    if "exec" in pre_stop:
        cmd = pre_stop["exec"]["command"]
        assert cmd[0] == "sleep"
        sleep_s = float(cmd[1])
    else:
        sleep_s = float(pre_stop["sleep"]["seconds"])
    assert sleep_s >= 5
    graceful = float(config.get("MSFLOW_GRACEFUL_SHUTDOWN_S", 30))
    assert pod["terminationGracePeriodSeconds"] >= sleep_s + graceful + 5
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == port
    assert ann["prometheus.io/path"] == "/metrics"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[config["MSFLOW_MODEL_STORE"]])
    k8s("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])


def test_k8s_env_comes_from_the_configmap_and_the_redis_secret():
    secret = k8s("Secret", "msflow-secrets")
    assert secret["stringData"]["MSFLOW_REDIS_URL"].startswith(("redis://", "rediss://"))
    for name in ("msflow-api", "msflow-worker"):
        c = pod_container(k8s("Deployment", name))
        refs = {(next(iter(e)), e[next(iter(e))]["name"]) for e in c["envFrom"]}
        assert ("configMapRef", "msflow-config") in refs
        assert ("secretRef", "msflow-secrets") in refs


def test_k8s_service_hpa_and_worker():
    dep = k8s("Deployment", "msflow-api")
    svc = k8s("Service", "msflow-api")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for p in svc["spec"]["ports"]:
        named_port(pod_container(dep), p["targetPort"])
    hpa = k8s("HorizontalPodAutoscaler", "msflow-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "msflow-api"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    worker = k8s("Deployment", "msflow-worker")
    wc = pod_container(worker)
    assert wc["args"] == ["worker"]
    assert int(wc["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    ann = worker["spec"]["template"]["metadata"]["annotations"]
    config = k8s("ConfigMap", "msflow-config")["data"]
    assert int(ann["prometheus.io/port"]) == int(config["MSFLOW_WORKER_METRICS_PORT"]) == named_port(wc, "metrics")


def test_servicemonitor_selects_the_api_service():
    monitors = [d for f, d in k8s_documents() if d["kind"] == "ServiceMonitor"]
    assert monitors
    svc = k8s("Service", "msflow-api")
    for m in monitors:
        assert m["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert {e["port"] for e in m["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}


def _pod_labels_as_built() -> dict[str, dict[str, str]]:
    """Deployment name -> its pods' labels once kustomize has built deploy/k8s: ``kubectl
    kustomize`` where kubectl is installed, else kustomize's rule (a ``labels`` entry reaches
    pod templates only with includeTemplates or includeSelectors)."""
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
                for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment"}
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    added = {k: v for entry in kust.get("labels", []) if entry.get("includeTemplates") or entry.get("includeSelectors")
             for k, v in entry["pairs"].items()}
    return {d["metadata"]["name"]: {**d["spec"]["template"]["metadata"]["labels"], **added}
            for _, d in k8s_documents() if d["kind"] == "Deployment"}


def test_pods_carry_the_label_the_dashboard_and_the_alerts_find_them_by():
    """Pods scraped by their prometheus.io/* annotations (the stock chart's kubernetes-pods job,
    which copies each pod label to a series label) are found by the "Targets up" panel and
    MsflowTargetDown as up{app_kubernetes_io_part_of="msflow"}. The kustomization put that
    label on the Deployments' metadata only, not on their pods: both saw no pod at all."""
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    exprs = [e for _, e in dashboard_queries()] + [r["expr"] for g in alerts["groups"] for r in g["rules"]
                                                   if r.get("alert") == "MsflowTargetDown"]
    wanted = {(name, value) for e in exprs for name, value in re.findall(r'\bup\{(\w+)="([^"]*)"\}', e)
              if name != "job"}
    assert ("app_kubernetes_io_part_of", "msflow") in wanted, "the panel and the alert find pods by part-of"
    for deployment, labels in _pod_labels_as_built().items():
        as_series = {re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in labels.items()}
        assert wanted <= as_series.items(), f"{deployment}'s pods: {labels}"
