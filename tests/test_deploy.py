"""deploy/ agrees with the code: commands, ports, environment variables, probe paths, files.

Reads the compose file, the Kubernetes manifests and the Dockerfiles on one side, and the
CLI parser, the settings module, the app's routes and pyproject.toml on the other. No Docker
engine is needed; `docker compose config` runs only where the compose plugin answers.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = {
    "api": DEPLOY / "api.Dockerfile",
    "worker-gpu": DEPLOY / "worker.Dockerfile",
    "worker-cpu": DEPLOY / "worker-cpu.Dockerfile",
}
# Variables the manifests may set that belong to Python, pip, apt, Hugging Face or matplotlib.
THIRD_PARTY_ENV = {
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONUNBUFFERED",
    "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
    "DEBIAN_FRONTEND",
    "HF_HUB_OFFLINE",
    "MPLCONFIGDIR",
    "PATH",
}
# What every API and worker container must be told: where Redis is, where the store is, and
# which queue (the KEDA trigger reads the same queue's list).
REQUIRED_ENV = {"REDIS_URL", "VITAUDIT_DATA_DIR", "VITAUDIT_QUEUE"}


# ---- readers ----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def k8s_documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def vitaudit_containers() -> dict[str, dict[str, Any]]:
    """The API and worker containers of the Kubernetes Deployments, by Deployment name."""
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
        for d in k8s_documents()
        if d["kind"] == "Deployment"
    }


def compose_vitaudit_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose()["services"].items() if name != "redis"}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions(path):
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in rest.split())  # type: ignore[arg-type]
    return env


def code_env_names() -> set[str]:
    """Every environment variable the service package (settings, CLI, logging, ...) names."""
    text = "".join(path.read_text() for path in sorted((ROOT / "service").glob("*.py")))
    return set(re.findall(r"""["'](REDIS_URL|VITAUDIT_[A-Z0-9_]+)["']""", text))


def app_paths() -> set[str]:
    from service.app import app

    return {route.path for route in app.routes}


def parsed_command(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, Any]]:
    """Run argv through the real `vitaudit` entry point with serve/worker replaced by recorders."""
    import service.cli as cli

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] == "vitaudit" and scripts["vitaudit"] == "service.cli:main"
    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(
        cli, "_serve", lambda host, port: calls.append(("serve", {"host": host, "port": port}))
    )
    monkeypatch.setattr(cli, "_worker", lambda burst: calls.append(("worker", {"burst": burst})))
    assert cli.main(argv[1:]) == 0
    assert len(calls) == 1
    return calls[0]


def requirement_names(lines: list[str]) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.match(r"[A-Za-z0-9_.-]+", line)
            assert match, line
            names.add(match.group(0).lower().replace("_", "-"))
    return names


# ---- everything parses --------------------------------------------------------------------


def test_every_k8s_manifest_is_in_the_kustomization_and_parses() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    kinds = sorted(d["kind"] for d in k8s_documents())
    assert kinds == sorted(
        [
            "Namespace",
            "ConfigMap",
            "Secret",
            "PersistentVolumeClaim",
            "Service",
            "StatefulSet",
            "Deployment",
            "Service",
            "Deployment",
            "ScaledObject",
        ]
    )
    for doc in k8s_documents():
        assert doc["apiVersion"] and doc["metadata"]["name"]


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="the docker compose plugin is not installed here; the YAML tests below still run",
)
def test_docker_compose_config_validates_the_compose_file() -> None:
    result = subprocess.run(
        [
            "docker",
            "compose",
            "-f",
            str(DEPLOY / "compose.yaml"),
            "--profile",
            "gpu",
            "config",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_compose_has_redis_with_aof_api_cpu_worker_and_gpu_worker_profile() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "api", "worker-cpu", "worker-gpu"}
    redis_args = services["redis"]["command"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    assert "profiles" not in services["worker-cpu"] and services["worker-gpu"]["profiles"] == [
        "gpu"
    ]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in services["worker-cpu"]


# ---- commands and ports ------------------------------------------------------------------


def test_compose_k8s_and_images_run_the_same_cli_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    commands = {f"compose {name}": s["command"] for name, s in compose_vitaudit_services().items()}
    commands |= {f"k8s {name}": c["command"] for name, c in vitaudit_containers().items()}
    for image, path in DOCKERFILES.items():
        cmd = [args for keyword, args in dockerfile_instructions(path) if keyword == "CMD"]
        commands[f"image {image}"] = json.loads(cmd[-1])
    parsed = {where: parsed_command(argv, monkeypatch) for where, argv in commands.items()}
    api = {w for w, (name, _) in parsed.items() if name == "serve"}
    assert api == {"compose api", "k8s vitaudit-api", "image api"}
    for where in api:
        assert parsed[where][1] == {"host": "0.0.0.0", "port": 8000}, where
    workers = {w for w, (name, _) in parsed.items() if name == "worker"}
    assert workers == set(parsed) - api
    assert all(args == {"burst": False} for w, (_, args) in parsed.items() if w in workers)


def test_the_api_port_is_the_same_everywhere() -> None:
    from service.cli import DEFAULT_PORT

    port = 8000
    assert port == DEFAULT_PORT
    assert compose()["services"]["api"]["ports"] == [f"{port}:{port}"]
    container = vitaudit_containers()["vitaudit-api"]
    assert container["ports"] == [{"name": "http", "containerPort": port}]
    service = k8s_object("Service", "vitaudit-api")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert (
        service["spec"]["selector"]
        == k8s_object("Deployment", "vitaudit-api")["spec"]["template"]["metadata"]["labels"]
    )
    instructions = dockerfile_instructions(DOCKERFILES["api"])
    assert ("EXPOSE", str(port)) in instructions
    healthcheck = next(args for keyword, args in instructions if keyword == "HEALTHCHECK")
    assert f"http://127.0.0.1:{port}/healthz" in healthcheck


# ---- probes --------------------------------------------------------------------------------


def test_probes_use_paths_the_app_defines() -> None:
    paths = app_paths()
    assert {"/healthz", "/readyz"} <= paths
    api = vitaudit_containers()["vitaudit-api"]
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    compose_check = " ".join(compose()["services"]["api"]["healthcheck"]["test"])
    image_check = next(
        a for k, a in dockerfile_instructions(DOCKERFILES["api"]) if k == "HEALTHCHECK"
    )
    for text in (compose_check, image_check):
        used = re.findall(r"http://127\.0\.0\.1:\d+(/\w+)", text)
        assert used and set(used) <= paths, text


def test_worker_health_checks_run_the_script_the_images_copy() -> None:
    script = "/app/worker_healthcheck.py"
    for image in ("worker-gpu", "worker-cpu"):
        instructions = dockerfile_instructions(DOCKERFILES[image])
        assert ("COPY", f"deploy/worker_healthcheck.py {script}") in instructions
        assert script in next(a for k, a in instructions if k == "HEALTHCHECK")
    probe = vitaudit_containers()["vitaudit-worker-gpu"]["livenessProbe"]["exec"]["command"]
    assert probe == ["python", script]


# ---- environment variables -----------------------------------------------------------------


def test_every_setting_the_manifests_set_is_one_the_code_reads() -> None:
    known = code_env_names()
    assert REQUIRED_ENV | {"VITAUDIT_API_KEYS_FILE", "VITAUDIT_WORKER_TTL_S"} <= known
    used: dict[str, set[str]] = {}
    for name, service in compose_vitaudit_services().items():
        used[f"compose {name}"] = set(service["environment"])
    used["k8s configmap"] = set(k8s_object("ConfigMap", "vitaudit-settings")["data"])
    for image, path in DOCKERFILES.items():
        used[f"image {image}"] = set(dockerfile_env(path))
    for where, names in used.items():
        unknown = names - known - THIRD_PARTY_ENV
        assert not unknown, f"{where} sets variables no code reads: {sorted(unknown)}"


def test_every_container_gets_the_required_settings_and_a_way_to_authenticate() -> None:
    for name, service in compose_vitaudit_services().items():
        assert set(service["environment"]) >= REQUIRED_ENV, name
    configmap = k8s_object("ConfigMap", "vitaudit-settings")["data"]
    assert set(configmap) >= REQUIRED_ENV
    for name, container in vitaudit_containers().items():
        assert container["envFrom"] == [{"configMapRef": {"name": "vitaudit-settings"}}], name
    api_env = compose()["services"]["api"]["environment"]
    assert {"VITAUDIT_API_KEYS", "VITAUDIT_LOCAL_MODE"} <= set(api_env)
    # Kubernetes: the keys file lies in the mounted Secret, under the key the Secret defines.
    keys_file = Path(configmap["VITAUDIT_API_KEYS_FILE"])
    api_pod = k8s_object("Deployment", "vitaudit-api")["spec"]["template"]["spec"]
    mount = next(
        m
        for m in api_pod["containers"][0]["volumeMounts"]
        if m["mountPath"] == str(keys_file.parent)
    )
    volume = next(v for v in api_pod["volumes"] if v["name"] == mount["name"])
    secret = k8s_object("Secret", volume["secret"]["secretName"])
    assert keys_file.name in secret["stringData"]
    from service.settings import _read_api_keys

    keys_file_text = secret["stringData"][keys_file.name]
    example_digest = hashlib.sha256(
        b"change-me"
    ).hexdigest()  # the placeholder secret.yaml documents
    assert _read_api_keys({"VITAUDIT_API_KEYS": ",".join(keys_file_text.split())}) == {
        example_digest: "example"
    }


def test_the_store_is_one_shared_volume_mounted_where_the_settings_say() -> None:
    data_dir = "/data"
    for name, service in compose_vitaudit_services().items():
        assert service["environment"]["VITAUDIT_DATA_DIR"] == data_dir
        assert f"store:{data_dir}" in service["volumes"], name
    assert k8s_object("ConfigMap", "vitaudit-settings")["data"]["VITAUDIT_DATA_DIR"] == data_dir
    pvc = k8s_object("PersistentVolumeClaim", "vitaudit-store")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("vitaudit-api", "vitaudit-worker-gpu"):
        pod = k8s_object("Deployment", name)["spec"]["template"]["spec"]
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == data_dir)
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["persistentVolumeClaim"]["claimName"] == "vitaudit-store", name
    for path in DOCKERFILES.values():
        assert dockerfile_env(path)["VITAUDIT_DATA_DIR"] == data_dir


# ---- Redis, GPU and autoscaling ------------------------------------------------------------


def test_keda_scales_the_gpu_workers_on_the_list_rq_keeps_the_queue_in() -> None:
    from redis import Redis
    from rq import Queue

    configmap = k8s_object("ConfigMap", "vitaudit-settings")["data"]
    queue_key = Queue(configmap["VITAUDIT_QUEUE"], connection=Redis()).key  # no connection is made
    scaled = k8s_object("ScaledObject", "vitaudit-worker-gpu")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "vitaudit-worker-gpu"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == queue_key == "rq:queue:vitaudit"
    redis_url = urlparse(configmap["REDIS_URL"])
    host, port = trigger["metadata"]["address"].rsplit(":", 1)
    assert host.split(".")[0] == redis_url.hostname and int(port) == redis_url.port
    assert trigger["metadata"]["databaseIndex"] == redis_url.path.lstrip("/")
    assert int(trigger["metadata"]["listLength"]) >= 1


def test_redis_statefulset_keeps_an_append_only_file_on_its_own_volume() -> None:
    statefulset = k8s_object("StatefulSet", "redis")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    claim = statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert {"name": claim, "mountPath": "/data"} in container["volumeMounts"]
    service = k8s_object("Service", "redis")
    assert (
        urlparse(k8s_object("ConfigMap", "vitaudit-settings")["data"]["REDIS_URL"]).hostname
        == "redis"
    )
    assert service["spec"]["ports"][0]["port"] == 6379


def test_the_gpu_worker_requests_a_gpu_and_waits_for_its_audit_on_shutdown() -> None:
    pod = k8s_object("Deployment", "vitaudit-worker-gpu")["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    job_timeout = int(
        k8s_object("ConfigMap", "vitaudit-settings")["data"]["VITAUDIT_JOB_TIMEOUT_S"]
    )
    assert pod["terminationGracePeriodSeconds"] >= job_timeout
    worker = compose()["services"]["worker-cpu"]
    assert int(worker["stop_grace_period"].rstrip("s")) >= int(
        worker["environment"]["VITAUDIT_JOB_TIMEOUT_S"]
    )


def test_pods_and_images_run_as_a_non_root_user() -> None:
    for name in ("vitaudit-api", "vitaudit-worker-gpu"):
        context = k8s_object("Deployment", name)["spec"]["template"]["spec"]["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
    for path in DOCKERFILES.values():
        users = [args for keyword, args in dockerfile_instructions(path) if keyword == "USER"]
        assert users and users[-1] not in ("root", "0"), path.name
        assert any(keyword == "HEALTHCHECK" for keyword, _ in dockerfile_instructions(path)), (
            path.name
        )


# ---- images ----------------------------------------------------------------------------------


def test_dockerfiles_copy_files_that_exist_and_are_not_ignored() -> None:
    for path in DOCKERFILES.values():
        ignored = {
            line.strip()
            for line in Path(f"{path}.dockerignore").read_text().splitlines()
            if line.strip()
        }
        copies = [
            args.split() for keyword, args in dockerfile_instructions(path) if keyword == "COPY"
        ]
        assert copies, path.name
        for args in copies:
            sources = [a for a in args[:-1] if not a.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), (
                    f"{path.name} copies {source}, which does not exist"
                )
                assert Path(source).parts[0] not in ignored, (
                    f"{path.name} copies {source}, which is ignored"
                )


def test_compose_builds_the_dockerfiles_in_deploy() -> None:
    services = compose_vitaudit_services()
    built = {
        name: (DEPLOY / s["build"]["context"] / s["build"]["dockerfile"]).resolve()
        for name, s in services.items()
    }
    assert built == {name: path.resolve() for name, path in DOCKERFILES.items()}
    k8s_images = {c["image"] for c in vitaudit_containers().values()}
    assert k8s_images == {
        services["api"]["image"].split(":")[0],
        services["worker-gpu"]["image"].split(":")[0],
    }


def installed_closure(specs: list[str]) -> set[str]:
    """Distributions the requirement strings pull in, read from the installed metadata."""
    from importlib.metadata import PackageNotFoundError, requires

    seen: set[tuple[str, frozenset[str]]] = set()
    todo = list(specs)
    while todo:
        match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?([^;]*)(?:;(.*))?", todo.pop())
        assert match, specs
        name = match.group(1).lower().replace("_", "-")
        extras = frozenset(e.strip() for e in (match.group(2) or "").split(",") if e.strip())
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            lines = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in lines:
            marker = line.partition(";")[2]
            wanted = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
            if not wanted or set(wanted) & extras:
                todo.append(line.partition(";")[0])
    return {name for name, _ in seen}


def test_every_module_the_service_imports_comes_with_the_base_dependencies() -> None:
    """The API image installs only the base set: a module-level import of anything else breaks it."""
    import ast
    import sys
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    available = installed_closure(project["dependencies"])
    distributions = packages_distributions()
    for path in sorted((ROOT / "service").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            for statement in node.body if isinstance(node, ast.Try) else [node]:
                if isinstance(statement, ast.Import):
                    modules = [alias.name for alias in statement.names]
                elif (
                    isinstance(statement, ast.ImportFrom)
                    and statement.level == 0
                    and statement.module
                ):
                    modules = [statement.module]
                else:
                    continue
                for module in (m.split(".")[0] for m in modules):
                    if module in sys.stdlib_module_names or module in ("service", "workers"):
                        continue
                    owners = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
                    assert owners & available, (
                        f"{path.name} imports {module}, which no base dependency installs"
                    )


def test_the_api_image_installs_no_torch_and_pins_the_service_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    api_pins = (DEPLOY / "requirements-api.txt").read_text().splitlines()
    worker_pins = (DEPLOY / "requirements-worker.txt").read_text().splitlines()
    for line in api_pins + worker_pins:
        line = line.split("#", 1)[0].strip()
        assert not line or re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][A-Za-z0-9.+]*", line), line
    assert requirement_names(api_pins) == requirement_names(project["dependencies"])
    assert not {"torch", "torchvision", "timm"} & requirement_names(api_pins)
    worker_extra = requirement_names(project["optional-dependencies"]["worker"])
    assert requirement_names(worker_pins) | {"torch", "torchvision"} == worker_extra
    api_text = DOCKERFILES["api"].read_text()
    assert "requirements-worker" not in api_text and "torch==" not in api_text
    for image in ("worker-gpu", "worker-cpu"):
        args = dict(
            a.split("=", 1)
            for k, a in dockerfile_instructions(DOCKERFILES[image])
            if k == "ARG" and "=" in a
        )
        assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"]) and re.fullmatch(
            r"\d+\.\d+\.\d+", args["TORCHVISION_VERSION"]
        )
    assert "nvidia/cuda:" in DOCKERFILES["worker-gpu"].read_text()
