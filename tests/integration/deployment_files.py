"""Readers of the deployment files, for the tests that check them (``test_deploy``,
``test_deploy_container``, ``test_deploy_kubernetes``, ``test_alert_rules``): the Dockerfile
(a small parser of its stages and instructions), docker-compose.yml's services and their
mounts and ports, the Kubernetes documents of deploy/k8s, Prometheus's scrape targets, the
metrics service/metrics.py declares and the series they export, the vector selectors of a
PromQL expression, and the Grafana dashboard's queries. They read and parse; the checks are
the tests'. Test modules import this, never each other.
"""

from __future__ import annotations

import ast
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


def exec_form(args: str) -> list[str]:
    """The argv of an ENTRYPOINT or CMD, JSON (exec) form or shell form."""
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


# ====================================================================== docker-compose
@lru_cache(maxsize=None)
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def bind_mounts(svc: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every volume of a compose service, short or long syntax."""
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            src, _, rest = v.partition(":")
            target = rest.split(":")[0]
        else:
            src, target = v.get("source", ""), v.get("target", "")
        out.append((src, target))
    return out


def container_ports(svc: dict[str, Any]) -> set[int]:
    """The container-side ports a compose service publishes or exposes."""
    ports: set[int] = set()
    for p in svc.get("ports", []):
        text = str(p["target"] if isinstance(p, dict) else p)
        ports.add(int(text.split(":")[-1].split("/")[0]))
    ports |= {int(str(p).split("/")[0]) for p in svc.get("expose", [])}
    return ports


def gpu_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    return svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


# ====================================================================== Prometheus
def prometheus_targets() -> list[tuple[str, str, int, str]]:
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


def pod_container(deployment: dict[str, Any]) -> dict[str, Any]:
    """The one container of a Deployment's pod."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def named_port(container: dict[str, Any], port: int | str) -> int:
    """A port number, or the number of the container's port of that name."""
    if isinstance(port, int):
        return port
    for p in container["ports"]:
        if p["name"] == port:
            return p["containerPort"]
    raise AssertionError(f"no container port named {port!r}")


# ====================================================================== metrics and PromQL
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


def promql_grouping_labels(expr: str) -> set[str]:
    """Label names an expression groups or matches by (``by``, ``without``, ``on``,
    ``ignoring``, ``group_left``/``group_right``): each must be a label of a series it reads, or
    the grouping quietly collapses (one unlabelled line, a legend with holes)."""
    found = re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr)
    return {label.strip() for group in found for label in group.split(",") if label.strip()}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title or $variable, PromQL) for every panel target and label_values variable."""
    dash = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.match(r"label_values\(\s*([^,)]+)\s*(?:,\s*(\w+))?\)", q or "")
        if m:
            queries.append((f"${var['name']}", f'{m.group(1)}{{{m.group(2)}=""}}' if m.group(2) else m.group(1)))
    return queries
