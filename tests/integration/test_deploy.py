"""Deployment files, checked offline: Dockerfile, docker-compose.yml, Prometheus, Grafana and
the Kubernetes manifests (against the Kubernetes JSON schemas bundled by kubernetes-validate).

Where a file refers to the service (a probe path, an MSFLOW_* setting, a metric in a
dashboard), the reference is checked against the service itself: its FastAPI routes, its
``Settings`` fields and the metrics declared in ``service/metrics.py``.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the deployment files")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
GRAFANA = ROOT / "deploy" / "grafana"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = GRAFANA / "dashboards" / "msflow.json"

# MSFLOW_* variables the deployment sets for parts of the service still being written
# (a setting the worker will read). Any other MSFLOW_* name must be a Settings field:
# pydantic-settings ignores unknown variables, so a typo would otherwise pass silently.
PENDING_SETTINGS: set[str] = set()
# Metrics the dashboard shows that the service has been asked to export.
PENDING_METRICS: set[str] = set()
# Kinds without a schema in upstream Kubernetes (CRDs and kustomize's own file).
NON_CORE_API_GROUPS = ("monitoring.coreos.com/", "kustomize.config.k8s.io/")
# Labels Prometheus adds to every scraped series (plus ours, from the scrape configs).
TARGET_LABELS = {"job", "instance", "component"}


# ====================================================================== Dockerfile
@dataclass
class Instruction:
    cmd: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def last(self, cmd: str) -> Instruction | None:
        found = self.all(cmd)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for ins in self.all("ENV"):
            env.update(_parse_env(ins.args))
        return env


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARGs before the first FROM, stages). Handles comments, line continuations and
    parser directives; enough of the format for these checks, not a full BuildKit parser."""
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") and not buf:
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        if buf.strip():
            logical.append((start, buf.strip()))
        buf = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text_ in logical:
        cmd, _, args = text_.partition(" ")
        cmd, args = cmd.upper(), args.strip()
        if cmd == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            if cmd == "ARG":
                key, _, value = args.partition("=")
                global_args[key] = value
        else:
            stages[-1].instructions.append(Instruction(cmd, args, line))
    return global_args, stages


def _parse_env(args: str) -> dict[str, str]:
    words = shlex.split(args)
    if words and "=" not in words[0]:  # legacy "ENV KEY value"
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)


def _exec_form(args: str) -> list[str]:
    args = args.strip()
    if args.startswith("["):
        return json.loads(args)
    return ["/bin/sh", "-c", args]


@lru_cache(maxsize=None)
def dockerfile() -> tuple[dict[str, str], tuple[Stage, ...]]:
    global_args, stages = parse_dockerfile((ROOT / "Dockerfile").read_text())
    return global_args, tuple(stages)


def final_stage() -> Stage:
    return dockerfile()[1][-1]


def stage_named(name: str) -> Stage:
    for s in dockerfile()[1]:
        if s.name == name:
            return s
    raise AssertionError(f"Dockerfile has no stage {name!r}")


def test_dockerfile_is_multi_stage_with_a_variant_argument():
    global_args, stages = dockerfile()
    assert len(stages) >= 3, "expected bases per variant, a builder and a runtime stage"
    assert global_args.get("VARIANT") == "gpu", "ARG VARIANT=gpu before the first FROM selects the image"
    names = {s.name for s in stages}
    assert {"base-gpu", "base-cpu"} <= names
    gpu_base = stage_named("base-gpu").base
    if gpu_base.startswith("${"):
        gpu_base = global_args[gpu_base.strip("${}")]
    assert re.match(r"(nvidia/cuda:12\.\d+(\.\d+)?-cudnn-runtime|nvcr\.io/nvidia/tensorrt:)", gpu_base), gpu_base
    cpu_base = stage_named("base-cpu").base
    if cpu_base.startswith("${"):
        cpu_base = global_args[cpu_base.strip("${}")]
    assert cpu_base.startswith("python:3.11-slim"), cpu_base
    # builder and runtime both derive from the selected variant, and the runtime copies
    # the environment from the builder (no compilers or caches in the final image).
    assert stage_named("builder").base == "base-${VARIANT}"
    assert final_stage().base == "base-${VARIANT}"
    copies = [i.args for i in final_stage().all("COPY")]
    assert any("--from=builder" in c for c in copies), copies


def test_dockerfile_installs_torch_pinned_then_the_project_with_the_right_extras():
    runs = " ".join(i.args for i in stage_named("builder").all("RUN"))
    args = {i.args.partition("=")[0]: i.args.partition("=")[2] for i in stage_named("builder").all("ARG")}
    assert args.get("TORCH_VERSION") == "2.13.0", "same torch pin as scripts/setup.sh"
    assert args.get("TORCH_CPU_INDEX") == "https://download.pytorch.org/whl/cpu"
    assert '"torch==${TORCH_VERSION}" --index-url "$index"' in runs
    assert 'python -m pip install ".[gpu]"' in runs, "the gpu variant installs the project's gpu extra"
    assert "--no-deps --force-reinstall ." in runs
    # torch comes before the project (so `torch>=...` never pulls another build).
    assert runs.index("torch==") < runs.index('pip install ".[gpu]"')


def test_dockerfile_copies_only_existing_paths_that_dockerignore_keeps():
    ignore = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
              if p.strip() and not p.startswith("#")]
    for stage in dockerfile()[1]:
        for ins in stage.all("COPY"):
            if "--from=" in ins.args:
                continue
            sources = ins.args.split()[:-1]
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: no such path"
                top = src.rstrip("/").split("/")[0]
                assert not any(fnmatch.fnmatch(top, pat) for pat in ignore if not pat.startswith("!")), (
                    f"COPY {src} is excluded by .dockerignore")
    for heavy in (".venv", ".git", "data", "runs", "model_store"):
        assert heavy in ignore, f".dockerignore should keep {heavy} out of the build context"


def test_dockerfile_runtime_runs_as_non_root_with_store_volume_and_server_env():
    stage = final_stage()
    user = stage.last("USER")
    assert user is not None, "the runtime stage must set USER"
    name = user.args.split(":")[0]
    assert name not in ("root", "0"), "the service must not run as root"
    assert any(name in i.args for i in stage.all("RUN") if "useradd" in i.args), "USER is created in the stage"
    env = stage.env()
    assert env["MSFLOW_MODEL_STORE"] == "/models"
    assert env["MSFLOW_HOST"] == "0.0.0.0", "Settings defaults to loopback; a container must listen on all"
    volumes = " ".join(i.args for i in stage.all("VOLUME"))
    assert "/models" in volumes
    chowns = " ".join(i.args for i in stage.all("RUN"))
    assert re.search(r"chown \S*msflow\S* [^&]*/models", chowns), "the non-root user must own /models"


def test_dockerfile_healthcheck_entrypoint_and_port():
    stage = final_stage()
    hc = stage.last("HEALTHCHECK")
    assert hc is not None and "/healthz" in hc.args
    assert "MSFLOW_PORT" in hc.args or ":8000/" in hc.args
    entry = _exec_form(stage.last("ENTRYPOINT").args)
    cmd = _exec_form(stage.last("CMD").args)
    assert entry + cmd == ["msflow", "serve"]
    exposed = {p.split("/")[0] for i in stage.all("EXPOSE") for p in i.args.split()}
    assert exposed == {stage.env()["MSFLOW_PORT"]}, "EXPOSE matches MSFLOW_PORT"


def test_gpu_variant_keeps_only_one_onnxruntime_build():
    runs = " ".join(i.args for i in stage_named("builder").all("RUN"))
    assert "pip uninstall -y onnxruntime" in runs


# ====================================================================== docker-compose
@lru_cache(maxsize=None)
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def _bind_mounts(svc: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            src, _, rest = v.partition(":")
            target = rest.split(":")[0]
        else:
            src, target = v.get("source", ""), v.get("target", "")
        out.append((src, target))
    return out


def _container_ports(svc: dict[str, Any]) -> set[int]:
    ports: set[int] = set()
    for p in svc.get("ports", []):
        text = str(p["target"] if isinstance(p, dict) else p)
        ports.add(int(text.split(":")[-1].split("/")[0]))
    ports |= {int(str(p).split("/")[0]) for p in svc.get("expose", [])}
    return ports


def test_compose_has_the_stack_and_profiles():
    svc = services()
    assert {"api", "redis", "worker", "prometheus", "grafana", "trainer", "locust"} <= set(svc)
    assert svc["trainer"].get("profiles") == ["trainer"]
    assert svc["locust"].get("profiles") == ["locust"]
    for name in ("api", "redis", "worker", "prometheus", "grafana"):
        assert "profiles" not in svc[name], f"{name} runs with a plain `docker compose up`"
    assert svc["worker"]["command"] == ["worker"]
    assert svc["api"]["command"] == ["serve"]


def _gpu_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    return svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_compose_api_reserves_a_gpu():
    devices = _gpu_devices(services()["api"])
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    for name in ("worker", "trainer"):
        assert _gpu_devices(services()[name]), f"{name} runs the model too and reserves a GPU"


def test_compose_mounted_files_exist():
    checked = 0
    for name, svc in services().items():
        for src, target in _bind_mounts(svc):
            if src.startswith("./") or src.startswith("../"):
                path = (ROOT / src).resolve()
                assert path.exists(), f"{name} mounts {src}, which does not exist"
                assert ROOT in path.parents, f"{name} mounts {src} from outside the repository"
                if target.endswith((".yml", ".yaml", ".json", ".py")):
                    assert path.is_file(), f"{name}: {src} should be a file for {target}"
                checked += 1
            elif src and not src.startswith("/"):
                assert src in (compose().get("volumes") or {}), f"{name}: named volume {src} is not declared"
    assert checked >= 4


def test_compose_every_service_has_healthcheck_and_restart_policy():
    for name, svc in services().items():
        assert "restart" in svc, f"{name} has no restart policy"
        hc = svc.get("healthcheck")
        assert hc, f"{name} has no healthcheck"
        one_shot = bool(svc.get("profiles"))
        if hc.get("disable"):
            assert name == "trainer", f"only the one-shot trainer may disable its healthcheck, not {name}"
        else:
            assert hc.get("test"), f"{name}: healthcheck without test"
        if one_shot:
            assert svc["restart"] == "no", f"{name} is a one-shot profile service"
        else:
            assert svc["restart"] in ("always", "unless-stopped", "on-failure"), name
    for name, svc in services().items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            if cond.get("condition") == "service_healthy":
                assert services()[dep].get("healthcheck", {}).get("test"), f"{name} waits on {dep}'s healthcheck"


def test_compose_bounds_what_the_stack_keeps_on_disk():
    # Docker's json-file driver keeps a container's output unbounded unless told otherwise.
    for name, svc in services().items():
        logging = svc.get("logging") or {}
        assert logging.get("driver") == "json-file", f"{name} logs without rotation"
        size, files = logging["options"]["max-size"], logging["options"]["max-file"]
        assert re.fullmatch(r"\$\{MSFLOW_LOG_MAX_SIZE:-\d+[kmg]\}", size), size
        assert re.fullmatch(r"\$\{MSFLOW_LOG_MAX_FILES:-\d+\}", files), files
    prometheus = " ".join(services()["prometheus"]["command"])
    assert "--storage.tsdb.retention.size=" in prometheus and "--storage.tsdb.retention.time=" in prometheus


def test_compose_api_port_healthcheck_and_settings():
    api = services()["api"]
    env = api["environment"]
    port = int(env["MSFLOW_PORT"])
    assert port in _container_ports(api)
    assert str(port) == final_stage().env()["MSFLOW_PORT"], "compose and the image agree on the port"
    assert env["MSFLOW_HOST"] == "0.0.0.0"
    assert env["MSFLOW_MODEL_STORE"] == "/models"
    assert ("model_store", "/models") in _bind_mounts(api)
    assert ("model_store", "/models") in _bind_mounts(services()["trainer"]), "the trainer fills the api's store"
    assert env["MSFLOW_REDIS_URL"].startswith("redis://redis:")
    hc = " ".join(api["healthcheck"]["test"])
    assert f":{port}/healthz" in hc


def test_compose_redis_persists_with_append_only_file():
    redis = services()["redis"]
    cmd = redis["command"] if isinstance(redis["command"], list) else redis["command"].split()
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory") + 1], "Redis has a memory budget"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction", "queued jobs are never evicted"
    assert any(target == "/data" for _, target in _bind_mounts(redis))


def _prometheus_targets() -> list[tuple[str, str, int, str]]:
    """(job, host, port, metrics_path) for every static and DNS target."""
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    out = []
    for job in cfg["scrape_configs"]:
        path = job.get("metrics_path", "/metrics")
        for sc in job.get("static_configs", []):
            for t in sc["targets"]:
                host, _, port = t.rpartition(":")
                out.append((job["job_name"], host, int(port), path))
        for dns in job.get("dns_sd_configs", []):
            for host in dns["names"]:
                out.append((job["job_name"], host, int(dns["port"]), path))
    return out


def test_prometheus_scrapes_api_and_workers_on_their_ports():
    targets = _prometheus_targets()
    svc = services()
    scraped = {host for _, host, _, _ in targets}
    assert {"api", "worker"} <= scraped
    for job, host, port, _ in targets:
        if host in svc:
            assert port in _container_ports(svc[host]), f"{job}: {host}:{port} is not a port of service {host}"
    worker_port = int(svc["worker"]["environment"]["MSFLOW_WORKER_METRICS_PORT"])
    assert ("worker", worker_port) in {(h, p) for _, h, p, _ in targets}
    mounts = dict((t, s) for s, t in _bind_mounts(svc["prometheus"]))
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"


def test_grafana_provisioning_matches_the_mounts_and_prometheus():
    svc = services()["grafana"]
    mounts = {s: t for s, t in _bind_mounts(svc)}
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    prom = [d for d in ds["datasources"] if d["type"] == "prometheus"]
    assert len(prom) == 1
    prom_port = next(iter(_container_ports(services()["prometheus"])))
    assert prom[0]["url"] == f"http://prometheus:{prom_port}"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "msflow.yml").read_text())["providers"]
    assert providers[0]["options"]["path"] == mounts["./deploy/grafana/dashboards"]
    assert mounts["./deploy/grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    assert mounts["./deploy/grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    dash = json.loads(DASHBOARD.read_text())
    uids = {json.dumps(p.get("datasource"), sort_keys=True) for p in dash["panels"]}
    assert uids == {json.dumps({"type": "prometheus", "uid": prom[0]["uid"]}, sort_keys=True)}


def test_locust_profile_mounts_the_locustfile():
    loc = services()["locust"]
    mounts = {t: s for s, t in _bind_mounts(loc)}
    cmd = loc["command"]
    f = cmd[cmd.index("-f") + 1]
    target_dir, _, fname = f.rpartition("/")
    assert (ROOT / mounts[target_dir] / fname).is_file()
    assert "http://api:8000" in cmd


# ====================================================================== Kubernetes
def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def k8s(kind: str, name: str) -> dict[str, Any]:
    for _, doc in k8s_documents():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in deploy/k8s")


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


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _named_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    for p in container["ports"]:
        if p["name"] == port:
            return p["containerPort"]
    raise AssertionError(f"no container port named {port!r}")


def test_k8s_api_deployment_gpu_probes_and_drain():
    dep = k8s("Deployment", "msflow-api")
    pod = dep["spec"]["template"]["spec"]
    c = _container(dep)
    assert c["image"].split(":")[0] == "msflow"
    assert c["args"] == ["serve"]
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    config = k8s("ConfigMap", "msflow-config")["data"]
    port = int(config["MSFLOW_PORT"])
    assert config["MSFLOW_HOST"] == "0.0.0.0"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert _named_port(c, c[probe]["httpGet"]["port"]) == port, probe
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
        c = _container(k8s("Deployment", name))
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
        _named_port(_container(dep), p["targetPort"])
    hpa = k8s("HorizontalPodAutoscaler", "msflow-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "msflow-api"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    worker = k8s("Deployment", "msflow-worker")
    wc = _container(worker)
    assert wc["args"] == ["worker"]
    assert int(wc["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    ann = worker["spec"]["template"]["metadata"]["annotations"]
    config = k8s("ConfigMap", "msflow-config")["data"]
    assert int(ann["prometheus.io/port"]) == int(config["MSFLOW_WORKER_METRICS_PORT"]) == _named_port(wc, "metrics")


def test_servicemonitor_selects_the_api_service():
    monitors = [d for f, d in k8s_documents() if d["kind"] == "ServiceMonitor"]
    assert monitors
    svc = k8s("Service", "msflow-api")
    for m in monitors:
        assert m["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert {e["port"] for e in m["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}


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
    c = _container(dep)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] in gets, probe
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"] in gets
    for job, host, _, path in _prometheus_targets():
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


# ====================================================================== Grafana dashboard
@dataclass
class MetricDecl:
    name: str
    kind: str
    labels: set[str]


@lru_cache(maxsize=None)
def declared_metrics() -> dict[str, MetricDecl] | None:
    """Metrics declared in service/metrics.py (Counter/Gauge/Histogram/Summary calls)."""
    path = ROOT / "service" / "metrics.py"
    if not path.exists():
        return None
    found: dict[str, MetricDecl] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("Counter", "Gauge", "Histogram", "Summary", "Info", "Enum")):
            continue
        if not (node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            continue
        labels_node = node.args[2] if len(node.args) > 2 else next(
            (k.value for k in node.keywords if k.arg == "labelnames"), None)
        labels = set()
        if isinstance(labels_node, (ast.List, ast.Tuple)):
            labels = {e.value for e in labels_node.elts if isinstance(e, ast.Constant)}
        found[node.args[0].value] = MetricDecl(node.args[0].value, node.func.id, labels)
    return found


def exported_series() -> dict[str, set[str]]:
    """Series name -> label names, as prometheus_client exposes the declared metrics."""
    decls = declared_metrics()
    assert decls is not None, "service/metrics.py declares the service's metrics"
    out: dict[str, set[str]] = {}
    for d in decls.values():
        base = d.name[:-6] if d.kind == "Counter" and d.name.endswith("_total") else d.name
        if d.kind == "Counter":
            names = {f"{base}_total": d.labels, f"{base}_created": d.labels}
        elif d.kind in ("Histogram", "Summary"):
            names = {base: d.labels, f"{base}_sum": d.labels, f"{base}_count": d.labels,
                     f"{base}_created": d.labels}
            if d.kind == "Histogram":
                names[f"{base}_bucket"] = d.labels | {"le"}
            else:
                names[base] = d.labels | {"quantile"}
        else:
            names = {base: d.labels}
        out.update(names)
    return out


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                 "offset", "inf", "nan", "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                 "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"}


def promql_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) for every vector selector in a PromQL expression."""
    expr = re.sub(r"\[[^\]]*\]", "", expr)                  # range and subquery windows
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", expr)
    out = []
    pattern = re.compile(r'(?<![\w.$"])([a-zA-Z_:][\w:]*)\s*(\{(?:[^{}"]|"(?:[^"\\]|\\.)*")*\})?(\s*\()?')
    for m in pattern.finditer(re.sub(r'"(?:[^"\\]|\\.)*"(?![^{]*\})', '""', expr)):
        name, matchers, call = m.group(1), m.group(2), m.group(3)
        if call and not matchers:
            continue  # a function
        if name in _PROMQL_WORDS or re.fullmatch(r"\d.*", name):
            continue
        labels = set(re.findall(r'([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*"', matchers or ""))
        out.append((name, labels))
    return out


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.match(r"label_values\(\s*([^,)]+)\s*(?:,\s*(\w+))?\)", q or "")
        if m:
            queries.append((f"${var['name']}", f'{m.group(1)}{{{m.group(2)}=""}}' if m.group(2) else m.group(1)))
    return queries


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


def test_dashboard_requested_metrics_are_exported():
    """Metrics the dashboard shows that the service was asked to add (see PENDING_METRICS)."""
    series = exported_series()
    used = {n for _, e in dashboard_queries() for n, _ in promql_selectors(e)} & PENDING_METRICS
    absent = sorted(used - set(series))
    assert not absent, f"requested from the service, not exported: {absent}"


# ====================================================================== scripts
def test_check_docker_install_script_is_valid_bash():
    import subprocess

    script = ROOT / "scripts" / "check-docker-install.sh"
    assert script.is_file()
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    # Same commands as the Dockerfile's cpu variant (torch from the local pin instead).
    assert "--no-deps --force-reinstall ." in text
    assert "torch==2.13.0" in text
