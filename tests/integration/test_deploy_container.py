"""The container files, checked offline: the Dockerfile's stages (variants, pins, what it
copies, the runtime's user, volume, healthcheck and entrypoint), docker-compose.yml's stack
(profiles, GPUs, mounts, healthchecks, restart policies, log rotation, the api's settings,
Redis's persistence) and the script that checks a Docker-less install the Dockerfile's way.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess

from deployment_files import (ROOT, bind_mounts, compose, container_ports, dockerfile, exec_form, final_stage,
                              gpu_devices, services, stage_named)


# ====================================================================== Dockerfile
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
    entry = exec_form(stage.last("ENTRYPOINT").args)
    cmd = exec_form(stage.last("CMD").args)
    assert entry + cmd == ["msflow", "serve"]
    exposed = {p.split("/")[0] for i in stage.all("EXPOSE") for p in i.args.split()}
    assert exposed == {stage.env()["MSFLOW_PORT"]}, "EXPOSE matches MSFLOW_PORT"


def test_gpu_variant_keeps_only_one_onnxruntime_build():
    runs = " ".join(i.args for i in stage_named("builder").all("RUN"))
    assert "pip uninstall -y onnxruntime" in runs


# ====================================================================== docker-compose
def test_compose_has_the_stack_and_profiles():
    svc = services()
    assert {"api", "redis", "worker", "prometheus", "grafana", "trainer", "locust"} <= set(svc)
    assert svc["trainer"].get("profiles") == ["trainer"]
    assert svc["locust"].get("profiles") == ["locust"]
    for name in ("api", "redis", "worker", "prometheus", "grafana"):
        assert "profiles" not in svc[name], f"{name} runs with a plain `docker compose up`"
    assert svc["worker"]["command"] == ["worker"]
    assert svc["api"]["command"] == ["serve"]


def test_compose_api_reserves_a_gpu():
    devices = gpu_devices(services()["api"])
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    for name in ("worker", "trainer"):
        assert gpu_devices(services()[name]), f"{name} runs the model too and reserves a GPU"


def test_compose_mounted_files_exist():
    checked = 0
    for name, svc in services().items():
        for src, target in bind_mounts(svc):
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
    assert port in container_ports(api)
    assert str(port) == final_stage().env()["MSFLOW_PORT"], "compose and the image agree on the port"
    assert env["MSFLOW_HOST"] == "0.0.0.0"
    assert env["MSFLOW_MODEL_STORE"] == "/models"
    assert ("model_store", "/models") in bind_mounts(api)
    assert ("model_store", "/models") in bind_mounts(services()["trainer"]), "the trainer fills the api's store"
    assert env["MSFLOW_REDIS_URL"].startswith("redis://redis:")
    hc = " ".join(api["healthcheck"]["test"])
    assert f":{port}/healthz" in hc


def test_compose_redis_persists_with_append_only_file():
    redis = services()["redis"]
    cmd = redis["command"] if isinstance(redis["command"], list) else redis["command"].split()
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory") + 1], "Redis has a memory budget"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction", "queued jobs are never evicted"
    assert any(target == "/data" for _, target in bind_mounts(redis))

def test_locust_profile_mounts_the_locustfile():
    loc = services()["locust"]
    mounts = {t: s for s, t in bind_mounts(loc)}
    cmd = loc["command"]
    f = cmd[cmd.index("-f") + 1]
    target_dir, _, fname = f.rpartition("/")
    assert (ROOT / mounts[target_dir] / fname).is_file()
    assert "http://api:8000" in cmd


# ====================================================================== scripts
def test_check_docker_install_script_is_valid_bash():
    script = ROOT / "scripts" / "check-docker-install.sh"
    assert script.is_file()
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    # Same commands as the Dockerfile's cpu variant (torch from the local pin instead).
    assert "--no-deps --force-reinstall ." in text
    assert "torch==2.13.0" in text
