"""Offline validation of the deployment files under deploy/ (run by scripts/check-deploy.sh).

Checks, each against what the tools of scripts/requirements-deploy-check.txt carry:

1. shellcheck on the deployment's shell scripts;
2. yamllint on every YAML file of deploy/ (syntax, duplicate keys, indentation);
3. every compose file against the Compose Specification's JSON schema, as written;
4. every compose project (single host, control plane, GPU host) as docker compose would load it:
   `include` resolved and every variable interpolated from a deploy/.env that deploy/init-env.sh
   writes for that role, then the schema again and the rules of this deployment (health checks,
   bind addresses, workers' stop grace above their shutdown grace, profiles, references);
5. every Kubernetes manifest against the Kubernetes API schemas (strict: unknown fields fail) of
   the oldest and newest versions checked, and the same rules (probes, grace, GPU limits,
   non-root, Secret keys that init-env.sh writes, the ConfigMap's worker.toml);
6. the worker image's torch version against the fixtures' pin (and torch-sys, when its source
   is in the cargo registry);
7. Prometheus' configuration against the compose files, and with promtool (Debian's prometheus
   package, which scripts/setup.sh installs): the configuration as the container sees it, the
   alert rules, and their unit tests (deploy/prometheus/alerts.test.yml: every alert fires in
   one case and stays quiet in another);
8. traces: the OpenTelemetry collector's and Tempo's configuration files mounted and consistent
   with each other, with Grafana's Tempo data source and with where the coordinator and the
   workers send spans;
9. the Grafana dashboard: panels that do not overlap, data sources that are provisioned, template
   variables that are defined;
10. a self-test: broken copies of a compose file, a manifest and the alert rules must fail.

No network is used: docker and kubectl are not needed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import jsonschema
import yaml

# Kubernetes versions the manifests are validated against: the oldest and the newest that
# kubernetes-validate carries and that clusters still run.
KUBERNETES_VERSIONS = ["1.28.0", "1.37.0"]
# Seconds a worker needs after its shutdown grace: handing the job back and exiting.
GRACE_MARGIN_SECS = 30
# The most workers compose.gpu-host.yml defines (profiles gpus-1 ... gpus-8).
MAX_GPUS = 8
# The OpenTelemetry collector's OTLP/HTTP port, where the coordinator and the workers send spans.
OTLP_HTTP_PORT = 4318
# Prometheus scrape jobs that need no credentials: reachable only on the compose network (their
# ports are not published; prometheus_rules checks that).
UNAUTHENTICATED_JOBS = {"rabbitmq": ("rabbitmq", 15692)}
# Grafana's own variables, usable in any panel query, with a value of the right type for
# checking that a query parses (dashboard_query_errors).
GRAFANA_BUILTIN_VARIABLES = {"__range": "6h", "__rate_interval": "1m", "__interval": "15s", "__range_s": "21600"}
# Documentation addresses (RFC 5737): only written into files, never contacted.
CONTROL_PLANE_ADDRESS = "192.0.2.10"
GPU_HOST_ADDRESS = "192.0.2.20"

YAMLLINT_CONFIG = """
extends: default
rules:
  document-start: disable
  line-length: {max: 130}
  truthy: {check-keys: false}
  comments: {min-spaces-from-content: 1}
  braces: {max-spaces-inside: 1}
  brackets: {max-spaces-inside: 1}
"""


class Checks:
    """Collects the outcome of every check; a failed check does not stop the others."""

    def __init__(self) -> None:
        self.passed = 0
        self.failures: list[str] = []

    def section(self, title: str) -> None:
        print(f"\n-- {title}", flush=True)

    def expect(self, errors: list[str], what: str) -> None:
        if errors:
            self.failures.append(what)
            print(f"FAIL {what}")
            for error in errors:
                print(f"     {error}")
        else:
            self.passed += 1
            print(f"ok   {what}")


def run_tool(args: list[str], cwd: Path | None = None) -> list[str]:
    """Runs a tool; its output as errors when it fails."""
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if result.returncode == 0:
        return []
    output = (result.stdout + result.stderr).strip().splitlines()
    return output[-40:] or [f"{args[0]} exited with {result.returncode}"]


def tool(name: str) -> str:
    """A tool of the venv this script runs in."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SystemExit(f"check-deploy: {name} missing from {path.parent} (run scripts/check-deploy.sh)")
    return str(path)


# ------------------------------------------------------------------------------------------------
# Compose: interpolation and include, as docker compose does them
# ------------------------------------------------------------------------------------------------


class InterpolationError(Exception):
    pass


NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(text: str, env: dict[str, str], where: str) -> str:
    """Compose's interpolation: $$, $VAR, ${VAR}, ${VAR:-x}, ${VAR-x}, ${VAR:?x}, ${VAR?x},
    ${VAR:+x}, ${VAR+x}, nested in the default. An unset variable without a default is an
    error here (compose would substitute an empty string with a warning)."""
    out = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
            continue
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if text.startswith("${", i):
            depth, j = 1, i + 2
            while j < len(text) and depth:
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                j += 1
            if depth:
                raise InterpolationError(f"{where}: unterminated ${{ in {text!r}")
            out.append(resolve(text[i + 2 : j - 1], env, where))
            i = j
            continue
        match = NAME.match(text, i + 1)
        if not match:
            raise InterpolationError(f"{where}: a lone $ in {text!r} (write $$)")
        out.append(lookup(match.group(), env, where))
        i = match.end()
    return "".join(out)


def lookup(name: str, env: dict[str, str], where: str) -> str:
    if name not in env:
        raise InterpolationError(f"{where}: ${name} is not set and has no default")
    return env[name]


def resolve(body: str, env: dict[str, str], where: str) -> str:
    match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", body, re.S)
    if not match:
        raise InterpolationError(f"{where}: invalid interpolation ${{{body}}}")
    name, op, arg = match.groups()
    value = env.get(name)
    if op is None:
        return lookup(name, env, where)
    if op == ":-":
        return value if value else interpolate(arg, env, where)
    if op == "-":
        return value if value is not None else interpolate(arg, env, where)
    if op in (":?", "?"):
        if value is None or (op == ":?" and not value):
            raise InterpolationError(f"{where}: ${name} is required: {arg}")
        return value
    if op == ":+":
        return interpolate(arg, env, where) if value else ""
    return interpolate(arg, env, where) if value is not None else ""


def interpolate_tree(node, env: dict[str, str], where: str):
    if isinstance(node, str):
        return interpolate(node, env, where)
    if isinstance(node, list):
        return [interpolate_tree(item, env, f"{where}[{i}]") for i, item in enumerate(node)]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env, f"{where}.{key}") for key, value in node.items()}
    return node


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}: not KEY=VALUE: {line!r}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


RESOURCES = ("services", "volumes", "networks", "secrets", "configs")


def load_project(path: Path, env: dict[str, str]) -> dict:
    """The compose model docker compose would build from `path` (includes merged, variables
    interpolated); `name` and `x-` keys of included files are dropped, as compose does."""
    raw = yaml.safe_load(path.read_text())
    model = interpolate_tree(raw, env, path.name)
    for entry in model.pop("include", None) or []:
        paths = [entry] if isinstance(entry, str) else entry["path"]
        paths = [paths] if isinstance(paths, str) else paths
        for included_path in paths:
            included = load_project(path.parent / included_path, env)
            for kind in RESOURCES:
                target = model.setdefault(kind, {}) or {}
                model[kind] = target
                for name, value in (included.get(kind) or {}).items():
                    if name in target and target[name] != value:
                        raise InterpolationError(f"{path.name}: {kind}.{name} conflicts with {included_path}")
                    target[name] = value
    return model


def duration_secs(text) -> float:
    """A compose duration (1h2m3s, 6m, 330s, 1.5s, 100ms) in seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


# ------------------------------------------------------------------------------------------------
# The deployment's own rules
# ------------------------------------------------------------------------------------------------


def worker_grace_secs(repo: Path) -> int:
    """The longest shutdown grace of the worker configurations compose mounts (deploy/config),
    the worker's default where a file leaves it out."""
    source = (repo / "worker/src/config.rs").read_text()
    match = re.search(r"fn default_grace\(\) -> u64 \{\s*(\d+)\s*\}", source)
    default = int(match.group(1)) if match else 600
    graces = []
    for path in sorted((repo / "deploy/config").glob("worker*.toml")):
        graces.append(tomllib.loads(path.read_text()).get("worker", {}).get("shutdown_grace_secs", default))
    return max(graces, default=default)


def is_worker(name: str, service: dict) -> bool:
    return name.startswith("worker-") or "syncd-worker" in str(service.get("image", ""))


def compose_rules(model: dict, role: str, grace: int, env: dict[str, str]) -> list[str]:
    errors = []
    services = model.get("services") or {}
    declared = {kind: set((model.get(kind) or {}).keys()) for kind in RESOURCES}
    for name, service in services.items():
        where = f"services.{name}"
        one_shot = service.get("restart") == "no"
        health = service.get("healthcheck") or {}
        if not one_shot and (not health.get("test") or health.get("disable")):
            errors.append(f"{where}: a long-running service needs a health check")
        for dependency in service.get("depends_on") or {}:
            if dependency not in services:
                errors.append(f"{where}: depends on {dependency}, which this project does not define")
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source and not source.startswith((".", "/")) and source not in declared["volumes"]:
                errors.append(f"{where}: volume {source} is not declared")
        for kind in ("secrets", "configs"):
            for item in service.get(kind) or []:
                ref = item if isinstance(item, str) else item.get("source")
                if ref not in declared[kind]:
                    errors.append(f"{where}: {kind[:-1]} {ref} is not declared")
        if "build" not in service:
            image = str(service.get("image", ""))
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                errors.append(f"{where}: image {image!r} must name a version")
        for port in service.get("ports") or []:
            text = str(port if not isinstance(port, dict) else port.get("host_ip", ""))
            if text.count(":") < 2:
                errors.append(f"{where}: port {port!r} must name the host address it binds to")
        if is_worker(name, service):
            if service.get("depends_on"):
                errors.append(f"{where}: a worker must not depend on other services")
            stop = duration_secs(service.get("stop_grace_period", "10s"))
            if stop < grace + GRACE_MARGIN_SECS:
                errors.append(
                    f"{where}: stop_grace_period {stop:.0f} s is below the workers' shutdown grace "
                    f"{grace} s + {GRACE_MARGIN_SECS} s"
                )
            url = service.get("environment", {}).get("SYNCD_BROKER__URL", "")
            want = env.get("SYNCD_CONTROL_PLANE_HOST") or "rabbitmq"
            if f"@{want}:" not in url:
                errors.append(f"{where}: the broker URL does not point at {want}")
            if not service.get("environment", {}).get("SYNCD_METRICS__TOKEN"):
                errors.append(f"{where}: the worker's /metrics has no token")
            collector = env.get("SYNCD_CONTROL_PLANE_HOST") or "otel-collector"
            errors += trace_sender_rules(where, service.get("environment", {}), collector, env)
        if name == "coordinator":
            errors += trace_sender_rules(where, service.get("environment", {}), "otel-collector", env)
    workers = sorted(n for n, s in services.items() if is_worker(n, s))
    if role in ("single host", "GPU host"):
        if workers != sorted(f"worker-{i}" for i in range(MAX_GPUS)):
            errors.append(f"workers {workers}: expected worker-0 ... worker-{MAX_GPUS - 1}")
        for count in range(1, MAX_GPUS + 1):
            active = [
                n for n in workers if not services[n].get("profiles") or f"gpus-{count}" in services[n]["profiles"]
            ]
            if active != [f"worker-{i}" for i in range(count)]:
                errors.append(f"profile gpus-{count} starts {active}")
        devices = {
            n: services[n]["deploy"]["resources"]["reservations"]["devices"][0].get("device_ids") for n in workers
        }
        for i, n in enumerate(sorted(workers, key=lambda w: int(w.split("-")[1]))):
            if devices[n] != [str(i)]:
                errors.append(f"services.{n}: pinned to GPU {devices[n]}, expected [{i!r}]")
    elif workers:
        errors.append(f"the control plane defines workers: {workers}")
    if role == "control plane" and "coordinator" not in services:
        errors.append("the control plane has no coordinator")
    return errors


def trace_sender_rules(where: str, environment: dict, host: str, env: dict[str, str]) -> list[str]:
    """A process that sends spans: to the collector at `host` over OTLP/HTTP, with its token."""
    errors = []
    endpoint = environment.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint != f"http://{host}:{OTLP_HTTP_PORT}":
        errors.append(f"{where}: OTEL_EXPORTER_OTLP_ENDPOINT is {endpoint!r}, not http://{host}:{OTLP_HTTP_PORT}")
    token = env.get("SYNCD_TRACES_TOKEN")
    if not token or environment.get("OTEL_EXPORTER_OTLP_HEADERS") != f"Authorization=Bearer%20{token}":
        errors.append(f"{where}: OTEL_EXPORTER_OTLP_HEADERS does not carry SYNCD_TRACES_TOKEN")
    return errors


def raw_port_rules(path: Path) -> list[str]:
    """Every published port binds to SYNCD_BIND_ADDRESS or SYNCD_ADMIN_BIND_ADDRESS, written so."""
    errors = []
    raw = yaml.safe_load(path.read_text())
    for name, service in (raw.get("services") or {}).items():
        for port in service.get("ports") or []:
            if not re.match(r"^\$\{SYNCD_(ADMIN_)?BIND_ADDRESS:-127\.0\.0\.1\}:\d+:\d+$", str(port)):
                errors.append(f"{path.name}: services.{name}: port {port!r} does not bind to ${{SYNCD_BIND_ADDRESS}}")
    return errors


def compose_schema_errors(model: dict, schema: dict) -> list[str]:
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    return [
        f"{'/'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in sorted(validator.iter_errors(model), key=lambda e: list(map(str, e.absolute_path)))
    ]


def compose_schema() -> dict:
    import check_jsonschema  # the vendored Compose Specification schema

    path = Path(check_jsonschema.__file__).parent / "builtin_schemas/vendor/compose-spec.json"
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------
# Environments written by deploy/init-env.sh
# ------------------------------------------------------------------------------------------------


def init_env(repo: Path, workdir: Path) -> dict[str, dict[str, str]]:
    """deploy/init-env.sh run in a scratch copy of deploy/ for each role: the .env of a single
    host, of a control plane, of a GPU host, and the file 'gpu-host' writes. Raises on failure."""
    envs = {}

    def run(folder: Path, *args: str, **extra: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        script = folder / "init-env.sh"
        shutil.copy(repo / "deploy/init-env.sh", script)
        env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "SYNCD_GPUS": "2", **extra}
        result = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"init-env.sh {' '.join(args)}: {result.stdout}{result.stderr}")

    run(workdir / "single")
    envs["single host"] = read_env_file(workdir / "single/.env")
    run(workdir / "control", "control-plane", CONTROL_PLANE_ADDRESS)
    envs["control plane"] = read_env_file(workdir / "control/.env")
    run(workdir / "control", "gpu-host", str(workdir / "gpu-host.env"))
    envs["gpu-host file"] = read_env_file(workdir / "gpu-host.env")
    (workdir / "gpu").mkdir()
    shutil.copy(workdir / "gpu-host.env", workdir / "gpu/.env")
    run(workdir / "gpu", SYNCD_BIND_ADDRESS=GPU_HOST_ADDRESS)
    envs["GPU host"] = read_env_file(workdir / "gpu/.env")
    return envs


def init_env_rules(envs: dict[str, dict[str, str]], workdir: Path) -> list[str]:
    errors = []
    gpu, control = envs["GPU host"], envs["control plane"]
    if gpu.get("SYNCD_CONTROL_PLANE_HOST") != CONTROL_PLANE_ADDRESS:
        errors.append("the GPU host's file does not name the control plane's address")
    for key in (
        "RABBITMQ_PASSWORD",
        "GARAGE_WORKER_ACCESS_KEY",
        "GARAGE_WORKER_SECRET_KEY",
        "SYNCD_METRICS_TOKEN",
        "SYNCD_TRACES_TOKEN",
    ):
        if not control.get(key) or gpu.get(key) != control.get(key):
            errors.append(f"the GPU host's {key} differs from the control plane's")
    for key in ("POSTGRES_PASSWORD", "GARAGE_DEFAULT_SECRET_KEY", "GARAGE_ADMIN_TOKEN", "GRAFANA_ADMIN_PASSWORD"):
        if key in envs["gpu-host file"]:
            errors.append(f"the GPU host's file holds {key}, which a GPU host does not need")
    if envs["single host"].get("COMPOSE_PROFILES") != "gpus-2" or gpu.get("COMPOSE_PROFILES") != "gpus-2":
        errors.append("COMPOSE_PROFILES does not follow SYNCD_GPUS=2")
    if "COMPOSE_PROFILES" in control:
        errors.append("a control plane without workers got COMPOSE_PROFILES")
    for path in [workdir / "single/.env", workdir / "gpu/.env", workdir / "gpu-host.env"]:
        if path.stat().st_mode & 0o077:
            errors.append(f"{path.name} is readable by others")
    for path in sorted(workdir.glob("*/prometheus/targets/*.yml")):
        targets = yaml.safe_load(path.read_text())
        if not (isinstance(targets, list) and all(t.get("targets") for t in targets)):
            errors.append(f"{path}: not a file_sd target list")
    gpu_targets = yaml.safe_load((workdir / f"gpu/prometheus/targets/workers-{gpu['SYNCD_HOST_NAME']}.yml").read_text())
    if gpu_targets[0]["targets"] != [f"{GPU_HOST_ADDRESS}:9465", f"{GPU_HOST_ADDRESS}:9466"]:
        errors.append(f"the GPU host's worker targets are {gpu_targets[0]['targets']}")
    return errors


# ------------------------------------------------------------------------------------------------
# Kubernetes
# ------------------------------------------------------------------------------------------------


def kubernetes_manifests(folder: Path) -> list[Path]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return [folder / resource for resource in kustomization.get("resources", [])]


def kubernetes_schema_errors(paths: list[Path]) -> list[str]:
    errors = []
    for version in KUBERNETES_VERSIONS:
        errors += run_tool([tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, *map(str, paths)])
    return errors


def kubernetes_rules(folder: Path, repo: Path, secret_keys: set[str]) -> list[str]:
    errors = []
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    documents = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        if not path.exists():
            errors.append(f"kustomization.yaml: resource {resource} does not exist")
            continue
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    names = {(d["kind"], d["metadata"]["name"]) for d in documents}
    unlisted = sorted(
        p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml" and p.name not in kustomization["resources"]
    )
    if unlisted:
        errors.append(f"manifests not listed in kustomization.yaml: {unlisted}")
    images = {image["name"] for image in kustomization.get("images", [])}

    config_toml = None
    for document in documents:
        if document["kind"] == "ConfigMap" and "worker.toml" in document.get("data", {}):
            config_toml = tomllib.loads(document["data"]["worker.toml"])
            compose_toml = tomllib.loads((repo / "deploy/config/worker.toml").read_text())
            if config_toml != compose_toml:
                errors.append(
                    "the ConfigMap's worker.toml has other settings than deploy/config/worker.toml: "
                    "copy them into deploy/kubernetes/worker-config.yaml"
                )
    grace = (config_toml or {}).get("worker", {}).get("shutdown_grace_secs", worker_grace_secs(repo))

    workloads = [d for d in documents if d["kind"] in ("Deployment", "StatefulSet")]
    if not workloads:
        errors.append("no worker Deployment or StatefulSet")
    for workload in workloads:
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        pod = workload["spec"]["template"]["spec"]
        for container in pod["containers"]:
            cwhere = f"{where}: container {container['name']}"
            resources = container.get("resources", {})
            if str(resources.get("limits", {}).get("nvidia.com/gpu")) != "1":
                errors.append(f"{cwhere}: needs limits nvidia.com/gpu: 1 (one worker per GPU)")
            if not {"cpu", "memory"} <= set(resources.get("requests", {})):
                errors.append(f"{cwhere}: needs cpu and memory requests")
            if container.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
                errors.append(f"{cwhere}: liveness probe must be /healthz")
            if container.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
                errors.append(f"{cwhere}: readiness probe must be /readyz")
            pre_stop = container.get("lifecycle", {}).get("preStop")
            if not pre_stop:
                errors.append(f"{cwhere}: needs a preStop hook")
            command = (pre_stop or {}).get("exec", {}).get("command", [])
            hook_secs = int(command[1]) if len(command) == 2 and command[0] == "sleep" else 0
            period = pod.get("terminationGracePeriodSeconds", 30)
            if period < hook_secs + grace + GRACE_MARGIN_SECS:
                errors.append(
                    f"{where}: terminationGracePeriodSeconds {period} is below preStop {hook_secs} s + "
                    f"shutdown grace {grace} s + {GRACE_MARGIN_SECS} s"
                )
            security = container.get("securityContext", {})
            if not (pod.get("securityContext", {}).get("runAsNonRoot") or security.get("runAsNonRoot")):
                errors.append(f"{cwhere}: must run as non-root")
            if security.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{cwhere}: allowPrivilegeEscalation must be false")
            if container["image"].split(":")[0] not in images:
                errors.append(f"{cwhere}: image {container['image']} is not under `images` in kustomization.yaml")
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["key"] not in secret_keys:
                    errors.append(f"{cwhere}: Secret key {ref['key']} is not in the file init-env.sh gpu-host writes")
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref and ("ConfigMap", ref["name"]) not in names:
                    errors.append(f"{cwhere}: ConfigMap {ref['name']} is not among the manifests")
        for volume in pod.get("volumes", []):
            if "configMap" in volume and ("ConfigMap", volume["configMap"]["name"]) not in names:
                errors.append(f"{where}: ConfigMap {volume['configMap']['name']} is not among the manifests")
    return errors


# ------------------------------------------------------------------------------------------------
# Images and Prometheus
# ------------------------------------------------------------------------------------------------


def image_rules(repo: Path) -> list[str]:
    errors = []
    dockerfile = (repo / "deploy/Dockerfile.worker").read_text()
    match = re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M)
    if not match:
        return ["Dockerfile.worker: no ARG TORCH_VERSION=..."]
    version = match.group(1)
    pin = re.search(r"^torch==(\S+)$", (repo / "scripts/requirements-fixtures.txt").read_text(), re.M)
    if not pin or pin.group(1) != version:
        errors.append(f"Dockerfile.worker's TORCH_VERSION {version} is not requirements-fixtures.txt's torch pin")
    if "LIBTORCH_BYPASS_VERSION_CHECK" in dockerfile.replace("# ", ""):
        errors.append("Dockerfile.worker bypasses torch-sys' version check")
    cuda = re.search(r"^ARG TORCH_CUDA=(\S+)$", dockerfile, re.M)
    if not cuda or cuda.group(1) not in ("cu130", "cu128", "cu126"):
        errors.append("Dockerfile.worker: ARG TORCH_CUDA must default to cu130, cu128 or cu126")
    # torch-sys names the libtorch version it was made for; compare when cargo fetched it.
    lock = (repo / "Cargo.lock").read_text()
    sys_version = re.search(r'name = "torch-sys"\nversion = "([^"]+)"', lock)
    if sys_version:
        home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
        for build_rs in home.glob(f"registry/src/*/torch-sys-{sys_version.group(1)}/build.rs"):
            expected = re.search(r'const TORCH_VERSION: &str = "([^"]+)"', build_rs.read_text())
            if expected and expected.group(1) != version:
                errors.append(f"torch-sys {sys_version.group(1)} expects libtorch {expected.group(1)}, not {version}")
            if expected:
                print(f"     torch-sys {sys_version.group(1)} expects libtorch {expected.group(1)}")
            break
        else:
            print(f"     (torch-sys {sys_version.group(1)} not in the cargo registry: compared with the fixtures' pin only)")
    for name in ("Dockerfile.worker", "Dockerfile.coordinator"):
        runtime = (repo / "deploy" / name).read_text().rsplit("\nFROM ", 1)[-1]
        if not re.search(r"apt-get install[^\n]*\bcurl\b", runtime):
            errors.append(f"{name}: the runtime image needs curl for the health checks")
    return errors


def prometheus_rules(repo: Path, control_plane_raw: dict) -> list[str]:
    errors = []
    config = yaml.safe_load((repo / "deploy/prometheus.yml").read_text())
    service = control_plane_raw["services"]["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"] if isinstance(v, str)}
    secrets = {f"/run/secrets/{s if isinstance(s, str) else s['source']}" for s in service.get("secrets", [])}
    jobs = set()
    for job in config["scrape_configs"]:
        jobs.add(job["job_name"])
        for file_sd in job.get("file_sd_configs", []):
            for pattern in file_sd["files"]:
                folder = str(Path(pattern).parent)
                if folder not in mounts:
                    errors.append(f"job {job['job_name']}: {folder} is not mounted into Prometheus")
                elif not (repo / "deploy" / mounts[folder]).is_dir():
                    errors.append(f"job {job['job_name']}: deploy/{mounts[folder]} does not exist")
        for auth_file in [
            job.get("authorization", {}).get("credentials_file"),
            job.get("basic_auth", {}).get("password_file"),
        ]:
            if auth_file and auth_file not in secrets:
                errors.append(f"job {job['job_name']}: {auth_file} is not a secret of the prometheus service")
        unauthenticated = UNAUTHENTICATED_JOBS.get(job["job_name"])
        if unauthenticated:
            name, port = unauthenticated
            published = [str(p) for p in control_plane_raw["services"][name].get("ports", [])]
            if any(p.endswith(f":{port}") for p in published):
                errors.append(f"job {job['job_name']}: scrapes without credentials a port {name} publishes ({port})")
        elif job["job_name"] != "dcgm" and not (job.get("authorization") or job.get("basic_auth")):
            errors.append(f"job {job['job_name']}: scrapes without credentials")
    for rule_file in config.get("rule_files", []):
        if rule_file not in mounts:
            errors.append(f"rule file {rule_file} is not mounted into Prometheus")
        elif not (repo / "deploy" / mounts[rule_file]).is_file():
            errors.append(f"rule file {rule_file}: deploy/{mounts[rule_file]} does not exist")
    if not config.get("rule_files"):
        errors.append("prometheus.yml loads no alert rules (rule_files)")
    missing = {"syncd-coordinator", "syncd-worker", "dcgm", "garage", "prometheus", "rabbitmq"} - jobs
    if missing:
        errors.append(f"no scrape jobs for {sorted(missing)}")
    if "--web.config.file" not in " ".join(service["command"]):
        errors.append("Prometheus runs without a web configuration (basic auth)")
    datasource = (repo / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text()
    if "basicAuthPassword: $PROMETHEUS_PASSWORD" not in datasource:
        errors.append("Grafana's Prometheus data source has no basic-auth password")
    plugins = control_plane_raw["services"]["rabbitmq"].get("volumes", [])
    source = next((v.split(":")[0] for v in plugins if ":/etc/rabbitmq/enabled_plugins" in str(v)), None)
    if not source or "rabbitmq_prometheus" not in (repo / "deploy" / source).read_text():
        errors.append("RabbitMQ's enabled_plugins (mounted) does not enable rabbitmq_prometheus")
    return errors


def promtool() -> str | None:
    return shutil.which("promtool")


def promtool_config_errors(repo: Path, control_plane_raw: dict, scratch: Path) -> list[str]:
    """`promtool check config` on prometheus.yml as the container sees it: the compose service's
    bind mounts copied to the same paths under a scratch root, its secrets as placeholder files,
    and the configuration's absolute paths moved under that root. promtool reads the rule files
    and credential files, so a file the configuration names but compose does not mount fails."""
    service = control_plane_raw["services"]["prometheus"]
    root = scratch / "prometheus-root"
    for volume in service["volumes"]:
        if not isinstance(volume, str) or not volume.startswith("."):
            continue
        source, target = volume.split(":")[:2]
        destination = root / target.lstrip("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        if (repo / "deploy" / source).is_dir():
            shutil.copytree(repo / "deploy" / source, destination)
        else:
            shutil.copy(repo / "deploy" / source, destination)
    (root / "run/secrets").mkdir(parents=True, exist_ok=True)
    for secret in service.get("secrets", []):
        name = secret if isinstance(secret, str) else secret.get("target", secret["source"])
        (root / "run/secrets" / name).write_text("placeholder\n")
    config = root / "etc/prometheus/prometheus.yml"
    text = (repo / "deploy/prometheus.yml").read_text()
    for prefix in ("/etc/prometheus/", "/run/secrets/"):
        text = text.replace(prefix, f"{root}{prefix}")
    config.write_text(text)
    return run_tool([promtool(), "check", "config", str(config)])


def alert_rules(repo: Path) -> list[str]:
    """Every alert says how long it must hold, how bad it is and what to do, and its unit tests
    have a case where it fires and one where it does not."""
    errors = []
    rules = yaml.safe_load((repo / "deploy/prometheus/alerts.yml").read_text())
    tests = yaml.safe_load((repo / "deploy/prometheus/alerts.test.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]
    if not alerts:
        errors.append("alerts.yml defines no alerts")
    cases: dict[str, set[bool]] = {}
    for test in tests.get("tests", []):
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    for rule in alerts:
        name = rule["alert"]
        if "for" not in rule:
            errors.append(f"{name}: no `for`")
        if rule.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
            errors.append(f"{name}: severity must be critical, warning or info")
        if not {"summary", "description"} <= set(rule.get("annotations", {})):
            errors.append(f"{name}: needs the annotations summary and description")
        if cases.get(name) != {True, False}:
            errors.append(f"{name}: alerts.test.yml needs a case where it fires and one where it does not")
    unknown = set(cases) - {rule["alert"] for rule in alerts}
    if unknown:
        errors.append(f"alerts.test.yml tests alerts alerts.yml does not define: {sorted(unknown)}")
    if not (repo / "docs/alerts.md").exists() or any(
        f"## {rule['alert']}" not in (repo / "docs/alerts.md").read_text() for rule in alerts
    ):
        errors.append("docs/alerts.md does not describe every alert (a `## NAME` section each)")
    return errors


# ------------------------------------------------------------------------------------------------
# Traces and the dashboard
# ------------------------------------------------------------------------------------------------


def mounted_source(service: dict, target: str) -> str | None:
    for volume in service.get("volumes", []):
        if isinstance(volume, str) and volume.split(":")[1] == target:
            return volume.split(":")[0]
    return None


def trace_rules(repo: Path, control_plane_raw: dict) -> list[str]:
    """The collector receives OTLP/HTTP behind the token and hands spans to Tempo; Grafana reads
    Tempo; every configuration file is mounted where the service reads it."""
    errors = []
    deploy = repo / "deploy"
    services = control_plane_raw["services"]
    collector_service, tempo_service = services.get("otel-collector"), services.get("tempo")
    if not collector_service or not tempo_service:
        return ["the control plane has no otel-collector or no tempo service"]
    collector_file = mounted_source(collector_service, "/etc/otelcol-contrib/config.yaml")
    tempo_file = mounted_source(tempo_service, "/etc/tempo/tempo.yaml")
    if collector_file != "./otel-collector/config.yaml":
        errors.append("otel-collector does not mount ./otel-collector/config.yaml")
    if tempo_file != "./tempo/tempo.yaml":
        errors.append("tempo does not mount ./tempo/tempo.yaml")
    if "/etc/otelcol-contrib/config.yaml" not in " ".join(collector_service.get("command", [])):
        errors.append("otel-collector is not started with its mounted configuration")
    if "/etc/tempo/tempo.yaml" not in " ".join(tempo_service.get("command", [])):
        errors.append("tempo is not started with its mounted configuration")
    if errors:
        return errors
    collector = yaml.safe_load((deploy / collector_file).read_text())
    tempo = yaml.safe_load((deploy / tempo_file).read_text())

    http = collector["receivers"]["otlp"]["protocols"]["http"]
    if not http["endpoint"].endswith(f":{OTLP_HTTP_PORT}"):
        errors.append(f"the collector's OTLP/HTTP receiver does not listen on {OTLP_HTTP_PORT}")
    authenticator = http.get("auth", {}).get("authenticator")
    if not authenticator or authenticator not in collector.get("extensions", {}):
        errors.append("the collector's OTLP/HTTP receiver asks for no credentials")
    elif collector["extensions"][authenticator].get("token") != "${env:SYNCD_TRACES_TOKEN}":
        errors.append(f"the collector's {authenticator} does not check SYNCD_TRACES_TOKEN")
    if "SYNCD_TRACES_TOKEN" not in (collector_service.get("environment") or {}):
        errors.append("otel-collector's environment has no SYNCD_TRACES_TOKEN")
    if not any(str(p).endswith(f":{OTLP_HTTP_PORT}:{OTLP_HTTP_PORT}") for p in collector_service.get("ports", [])):
        errors.append(f"otel-collector does not publish {OTLP_HTTP_PORT} for the workers of other hosts")
    service = collector["service"]
    for extension in service.get("extensions", []):
        if extension not in collector.get("extensions", {}):
            errors.append(f"the collector's service uses extension {extension}, which it does not define")
    for name, pipeline in service["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                if component not in collector.get(kind, {}):
                    errors.append(f"pipeline {name}: {kind[:-1]} {component} is not defined")
    tempo_grpc = tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    tempo_port = tempo_grpc.rsplit(":", 1)[1]
    exporters = [
        collector["exporters"][e] for p in service["pipelines"].values() for e in p.get("exporters", [])
    ]
    if not any(e.get("endpoint") == f"tempo:{tempo_port}" for e in exporters):
        errors.append(f"no exporter of the collector sends to tempo:{tempo_port}, Tempo's OTLP/gRPC receiver")

    datasources = yaml.safe_load((deploy / "grafana/provisioning/datasources/tempo.yaml").read_text())
    source = datasources["datasources"][0]
    http_port = tempo["server"]["http_listen_port"]
    if source.get("type") != "tempo" or source.get("url") != f"http://tempo:{http_port}":
        errors.append(f"Grafana's Tempo data source does not point at http://tempo:{http_port}")
    prometheus = yaml.safe_load((deploy / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    metrics_uid = source.get("jsonData", {}).get("tracesToMetrics", {}).get("datasourceUid")
    if metrics_uid and metrics_uid != prometheus["datasources"][0]["uid"]:
        errors.append(f"the Tempo data source links to metrics of {metrics_uid}, not the Prometheus data source")
    for query in source.get("jsonData", {}).get("tracesToMetrics", {}).get("queries", []):
        # Grafana expands $VAR in provisioning files: its own $__tags must be written $$__tags.
        if re.search(r"(?<!\$)\$__", query["query"]):
            errors.append(f"the Tempo data source's query {query['name']!r}: write $$__tags, not $__tags")
    grafana = services["grafana"]
    if "tempo" not in (grafana.get("depends_on") or {}):
        errors.append("grafana does not wait for tempo")
    return errors


def dashboard_query_errors(path: Path, scratch: Path) -> list[str]:
    """Every panel query parses as PromQL: with the template variables (an "All" regex) and
    Grafana's own variables substituted, each becomes a recording rule for `promtool check
    rules`, which reports the panel's query that does not parse."""
    dashboard = json.loads(path.read_text())
    variables = {v["name"]: v.get("allValue") or ".*" for v in dashboard.get("templating", {}).get("list", [])}
    values = {**variables, **GRAFANA_BUILTIN_VARIABLES}
    rules = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), target["expr"])
            rules.append({"record": f"panel_{panel['id']}_{target['refId']}", "expr": expr})
    rules_file = scratch / f"{path.stem}-queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": path.stem, "rules": rules}]}))
    return run_tool([promtool(), "check", "rules", str(rules_file)])


def dashboard_rules(path: Path, repo: Path) -> list[str]:
    """Panels inside the 24-column grid without overlapping, unique ids, provisioned data sources,
    and only defined template variables in queries."""
    errors = []
    dashboard = json.loads(path.read_text())
    uids = set()
    for source_file in (repo / "deploy/grafana/provisioning/datasources").glob("*.yaml"):
        uids |= {d["uid"] for d in yaml.safe_load(source_file.read_text())["datasources"]}
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    for variable in dashboard.get("templating", {}).get("list", []):
        uid = (variable.get("datasource") or {}).get("uid")
        if uid and uid not in uids:
            errors.append(f"variable {variable['name']}: data source {uid} is not provisioned")
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    if len(ids) != len(set(ids)):
        errors.append("panel ids are not unique")
    boxes = []
    for panel in panels:
        where = f"panel {panel['id']} ({panel.get('title')!r})"
        grid = panel["gridPos"]
        if grid["x"] < 0 or grid["x"] + grid["w"] > 24:
            errors.append(f"{where}: outside the 24 columns")
        for other, box in boxes:
            if (
                grid["x"] < box["x"] + box["w"]
                and box["x"] < grid["x"] + grid["w"]
                and grid["y"] < box["y"] + box["h"]
                and box["y"] < grid["y"] + grid["h"]
            ):
                errors.append(f"{where} overlaps panel {other}")
        boxes.append((panel["id"], grid))
        uid = (panel.get("datasource") or {}).get("uid")
        if uid and uid not in uids:
            errors.append(f"{where}: data source {uid} is not provisioned")
        for target in panel.get("targets", []):
            for name in re.findall(r"\$\{?(\w+)", target.get("expr", "")):
                if name not in variables | set(GRAFANA_BUILTIN_VARIABLES):
                    errors.append(f"{where}: query uses ${name}, which is not a template variable")
    return errors


# ------------------------------------------------------------------------------------------------
# The checks
# ------------------------------------------------------------------------------------------------

COMPOSE_PROJECTS = {
    "single host": "docker-compose.yml",
    "control plane": "compose.control-plane.yml",
    "GPU host": "compose.gpu-host.yml",
}


def check_compose(deploy: Path, repo: Path, envs: dict, checks: Checks, schema: dict, grace: int) -> None:
    for role, file_name in COMPOSE_PROJECTS.items():
        env = envs[role]
        try:
            model = load_project(deploy / file_name, env)
        except (InterpolationError, ValueError, KeyError) as error:
            checks.expect([str(error)], f"{file_name} loads with the {role}'s .env")
            continue
        checks.expect(compose_schema_errors(model, schema), f"{file_name} ({role}, interpolated) against the schema")
        try:
            errors = compose_rules(model, role, grace, env)
        except (KeyError, TypeError, ValueError) as error:
            errors = [f"unexpected structure: {error!r}"]
        checks.expect(errors, f"{file_name} ({role}): health checks, ports, grace, profiles, references")


def self_test(deploy: Path, repo: Path, envs: dict, schema: dict, grace: int, scratch: Path) -> list[str]:
    """Broken copies must fail: otherwise a check passes whatever it is given."""
    errors = []
    broken = scratch / "broken"
    shutil.copytree(deploy, broken, ignore=shutil.ignore_patterns(".env", "*.env"))

    compose = broken / "compose.control-plane.yml"
    compose.write_text(compose.read_text().replace("    restart: unless-stopped\n", "    restart_policy: always\n", 1))
    if not run_tool([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose)]):
        errors.append("the schema accepted a compose file with an unknown service key")

    gpu_host = broken / "compose.gpu-host.yml"
    gpu_host.write_text(gpu_host.read_text().replace("stop_grace_period: 6m", "stop_grace_period: 1m"))
    model = load_project(gpu_host, envs["GPU host"])
    if not any("stop_grace_period" in e for e in compose_rules(model, "GPU host", grace, envs["GPU host"])):
        errors.append("a worker stop_grace_period below its shutdown grace passed")

    manifests = scratch / "broken-kubernetes"
    shutil.copytree(deploy / "kubernetes", manifests)
    manifest = manifests / "worker.yaml"
    original = manifest.read_text()
    manifest.write_text(original.replace("terminationGracePeriodSeconds:", "terminationGracePeriodSecond:"))
    if not run_tool([tool("kubernetes-validate"), "--strict", "--quiet", str(manifest)]):
        errors.append("kubernetes-validate accepted a Deployment with a misspelt field")
    manifest.write_text(original)

    config = manifests / "worker-config.yaml"
    config.write_text(config.read_text().replace("shutdown_grace_secs = 300", "shutdown_grace_secs = 900"))
    if not any("terminationGracePeriodSeconds" in e for e in kubernetes_rules(manifests, repo, set())):
        errors.append("a terminationGracePeriodSeconds below the ConfigMap's grace passed")

    # An alert whose threshold moved must fail its unit tests.
    if promtool():
        rules = broken / "prometheus/alerts.yml"
        text = rules.read_text()
        if "> 1800" not in text:
            errors.append("self-test: alerts.yml has no '> 1800' to break")
        rules.write_text(text.replace("> 1800", "> 3600"))
        if not run_tool([promtool(), "test", "rules", str(broken / "prometheus/alerts.test.yml")]):
            errors.append("promtool test rules passed an alert whose threshold changed")
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    repo = parser.parse_args().repo.resolve()
    deploy = repo / "deploy"
    started = time.monotonic()
    checks = Checks()

    checks.section("shellcheck")
    scripts = sorted(p for p in deploy.rglob("*") if p.suffix in (".sh", ".sbatch"))
    scripts += sorted((repo / "scripts").glob("*.sh"))
    for script in scripts:
        checks.expect(run_tool([tool("shellcheck"), "-x", str(script)], cwd=repo), f"shellcheck {script.relative_to(repo)}")

    checks.section("yamllint")
    yaml_files = sorted(p for p in deploy.rglob("*") if p.suffix in (".yml", ".yaml"))
    checks.expect(
        run_tool([tool("yamllint"), "-s", "-d", YAMLLINT_CONFIG, *map(str, yaml_files)], cwd=repo),
        f"yamllint ({len(yaml_files)} files)",
    )
    for dashboard in sorted((deploy / "grafana/dashboards").glob("*.json")):
        try:
            json.loads(dashboard.read_text())
            checks.expect([], f"{dashboard.relative_to(repo)} is JSON")
        except json.JSONDecodeError as error:
            checks.expect([str(error)], f"{dashboard.relative_to(repo)} is JSON")

    checks.section("compose files against the Compose Specification schema")
    schema = compose_schema()
    compose_files = [deploy / name for name in COMPOSE_PROJECTS.values()]
    for path in compose_files:
        checks.expect(
            run_tool([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)]),
            f"{path.name} (as written)",
        )
        checks.expect(raw_port_rules(path), f"{path.name}: ports bind to SYNCD_BIND_ADDRESS or SYNCD_ADMIN_BIND_ADDRESS")

    with tempfile.TemporaryDirectory(prefix="syncd-check-deploy-") as scratch_dir:
        scratch = Path(scratch_dir)
        checks.section("deploy/init-env.sh for every role")
        try:
            envs = init_env(repo, scratch / "env")
            checks.expect(init_env_rules(envs, scratch / "env"), "init-env.sh: single host, control plane, GPU host")
        except (RuntimeError, OSError, KeyError, ValueError) as error:
            checks.expect([str(error)], "init-env.sh: single host, control plane, GPU host")
            envs = None

        grace = worker_grace_secs(repo)
        if envs:
            checks.section(f"compose projects as docker compose loads them (workers' shutdown grace {grace} s)")
            check_compose(deploy, repo, envs, checks, schema, grace)

        checks.section(f"Kubernetes manifests (strict, Kubernetes {' and '.join(KUBERNETES_VERSIONS)})")
        folder = deploy / "kubernetes"
        manifests = kubernetes_manifests(folder)
        checks.expect(kubernetes_schema_errors(manifests), f"{len(manifests)} manifests of kustomization.yaml")
        secret_keys = set(envs["gpu-host file"]) if envs else set()
        checks.expect(
            kubernetes_rules(folder, repo, secret_keys),
            "probes, grace, GPU limits, non-root, Secret keys, worker.toml",
        )

        checks.section("worker image and Prometheus")
        checks.expect(image_rules(repo), "torch version of Dockerfile.worker; curl in both images")
        control_raw = yaml.safe_load((deploy / "compose.control-plane.yml").read_text())
        checks.expect(prometheus_rules(repo, control_raw), "prometheus.yml: mounts, secrets, credentials")

        checks.section("alert rules (promtool)")
        checks.expect(alert_rules(repo), "alerts.yml: for, severity, summary and description; tests; docs")
        if promtool():
            checks.expect(
                promtool_config_errors(repo, control_raw, scratch), "promtool check config (as mounted in compose)"
            )
            rules = deploy / "prometheus/alerts.yml"
            checks.expect(run_tool([promtool(), "check", "rules", str(rules)]), "promtool check rules alerts.yml")
            checks.expect(
                run_tool([promtool(), "test", "rules", str(deploy / "prometheus/alerts.test.yml")]),
                "promtool test rules alerts.test.yml",
            )
        elif os.environ.get("CI") == "true":
            checks.expect(["promtool not found: run scripts/setup.sh (Debian's prometheus)"], "promtool")
        else:
            print("skip promtool not found (scripts/setup.sh installs Debian's prometheus); CI=true fails here")

        checks.section("traces and the dashboard")
        checks.expect(trace_rules(repo, control_raw), "otel-collector, Tempo and Grafana's Tempo data source")
        for dashboard in sorted((deploy / "grafana/dashboards").glob("*.json")):
            try:
                errors = dashboard_rules(dashboard, repo)
            except (KeyError, TypeError, ValueError) as error:
                errors = [f"unexpected structure: {error!r}"]
            checks.expect(errors, f"{dashboard.relative_to(repo)}: layout, data sources, variables")
            if promtool():
                checks.expect(dashboard_query_errors(dashboard, scratch), f"{dashboard.name}: every query parses")

        if envs:
            checks.section("self-test: broken copies must fail")
            checks.expect(self_test(deploy, repo, envs, schema, grace, scratch), "every broken copy was rejected")

    elapsed = time.monotonic() - started
    if checks.failures:
        print(f"\ncheck-deploy: FAILED {len(checks.failures)} of {len(checks.failures) + checks.passed} checks:")
        for failure in checks.failures:
            print(f"  - {failure}")
        return 1
    print(f"\ncheck-deploy: OK, all {checks.passed} checks in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
